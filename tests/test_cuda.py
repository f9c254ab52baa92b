"""The CUDA C++ backend (src/*.cu, csrc/cuda/*.cpp).

Without a GPU (CI): the CUDA sources compiled into dirfast._C for the architectures setup.py
asks for, the kernels are registered for the CUDA dispatch key, and the extension loads and
reports ``compiled: True, available: False`` with the reason. With a GPU: the kernels against
dirfast.reference on the paths the shared tests of test_ops.py do not reach (the shared-memory
and the direct bin_stats kernels, vectorised and scalar passes, deterministic mode, the float32
accuracy criterion) and a CUDA-graph capture of an FDS step.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest
import torch

import dirfast
from dirfast import _ext, contract, reference
from dirfast.ops import PADDINGS, _dispatch
from testing import check_fds_step_replays_from_a_cuda_graph, deterministic, gen, tol

GPU = torch.cuda.is_available()
COMPILED = _ext.cuda_compiled()
needs_gpu = pytest.mark.skipif(not (GPU and COMPILED), reason="needs a CUDA GPU and the CUDA kernels")


def _cuda_toolkit():
    """The nvcc setup.py would have found (None when there is none)."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# setup.py builds the CUDA kernels when torch has CUDA or FORCE_CUDA=1 asks, and nvcc is found.
BUILT_WITH_CUDA_EXPECTED = (_cuda_toolkit() is not None and _ext.EXTENSION is not None
                            and (torch.version.cuda is not None or os.environ.get("FORCE_CUDA", "0") not in ("", "0")))


# ----------------------------------------------------------------------------- build (no GPU)
def test_cuda_kernels_compiled_when_the_build_asks_for_them():
    if not BUILT_WITH_CUDA_EXPECTED:
        pytest.skip("a torch without CUDA and no FORCE_CUDA=1 (or no nvcc): a CPU-only build is right")
    assert COMPILED, "the build asked for the CUDA kernels but dirfast._C holds none"
    assert dirfast.backends()["cuda"]["compiled"] is True


@pytest.mark.skipif(not COMPILED, reason="dirfast._C built without the CUDA kernels")
@pytest.mark.parametrize("op", _dispatch.CUDA_OPS)
def test_cuda_kernels_registered_for_the_cuda_key(op):
    assert contract.has_device_kernel(op, "CUDA")


def fatbinaries(path):
    """The device code linked into a shared library: one list of (kind, sm) per fat binary in
    it, kind "cubin" (machine code) or "ptx". Reads nvcc's fat-binary container directly (a
    16-byte header -- magic 0xBA55ED50, version, header size, payload size -- then entries of
    kind, header size and payload size, the architecture at byte 28), so no CUDA tool is needed."""
    data = open(path, "rb").read()
    magic = struct.pack("<I", 0xBA55ED50)
    binaries, position = [], data.find(magic)
    while position >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, position)
        entries, entry, end = [], position + header, position + header + size
        while entry < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            entries.append(({1: "ptx", 2: "cubin"}.get(kind, str(kind)), arch))
            entry += entry_header + entry_size
        binaries.append(entries)
        position = data.find(magic, max(end, position + 4))
    return binaries


@pytest.mark.skipif(not COMPILED, reason="dirfast._C built without the CUDA kernels")
def test_extension_holds_sm80_sm90_and_ptx_of_every_source():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST chose other architectures")
    binaries = fatbinaries(_ext.EXTENSION.__file__)
    assert len(binaries) == 3, binaries  # src/bin_stats.cu, calibrate.cu, smooth_bins.cu
    for entries in binaries:
        assert {("cubin", 80), ("cubin", 90), ("ptx", 90)} <= set(entries), entries


@pytest.mark.skipif(GPU or not COMPILED, reason="checks the report on a machine without a GPU")
def test_without_gpu_cuda_is_compiled_not_available():
    report = dirfast.backends()["cuda"]
    assert report == {"available": False, "compiled": True, "reason": report["reason"], "ops": report["ops"]}
    assert "GPU" in report["reason"]
    with pytest.raises(RuntimeError, match="not available"):
        dirfast.set_backend("cuda")
    assert dirfast.get_backend() == "auto"


def test_cuda_preference_table_names_known_backends():
    public = {op for op in _dispatch.OPS if not op.endswith("_backward")}
    assert set(_dispatch.CUDA_PREFERENCE) == public
    for op, order in _dispatch.CUDA_PREFERENCE.items():
        assert set(order) == ({"cuda", "triton"} if op in _dispatch.CUDA_OPS else {"triton"})
    assert _dispatch.CUDA_PREFERENCE_MEASURED_ON


# ----------------------------------------------------------------------------- GPU
def check_stats(got, x, idx, num_bins, atomics_per_address=None):
    """``atomics_per_address``: the float32 sums of one (bucket, feature) come from up to that many
    float atomics in some order (the kernels for planes), so their rounding error grows with it:
    about sqrt(n) float32 half-ulps of S2, times up to ~10 from the cancellation in S2 - S1^2 / n
    when the bucket's shift is a few standard deviations off (1 + z^2). The tolerance follows
    (1e-6 sqrt(n)) instead of assuming the few rounding steps of a register reduction."""
    count, mean, var = got
    e_count, e_mean, e_var = reference.bin_stats(x.double().cpu(), idx.cpu(), num_bins)
    acc = reference.accumulate_dtype(x.dtype)
    assert count.dtype == torch.int64 and mean.dtype == acc and var.dtype == acc
    assert mean.shape == (num_bins, x.shape[1]) and mean.is_contiguous() and var.is_contiguous()
    assert torch.equal(count.cpu(), e_count)
    t = tol(acc)
    if atomics_per_address and acc == torch.float32:
        t = {"rtol": max(t["rtol"], 1e-6 * atomics_per_address ** 0.5), "atol": max(t["atol"], 1e-5)}
    torch.testing.assert_close(mean.cpu().double(), e_mean, **t)
    torch.testing.assert_close(var.cpu().double(), e_var, **t)


def check_float32_accuracy(x64, idx, num_bins):
    """bin_stats of float64 features ``x64`` (mean/std = 1000) rounded to float32, on the GPU:
    the variance within 1e-4 (relative) and the mean within 1e-6 of float64 sums of the same
    float32 values (the foundation's accuracy criterion)."""
    x = x64.float()
    _, mean, var = torch.ops.dirfast.bin_stats(x.cuda(), idx.cuda(), num_bins)
    _, e_mean, e_var = reference.bin_stats(x.double().cpu(), idx.cpu(), num_bins)
    rel = ((var.double().cpu() - e_var).abs() / e_var).max().item()
    assert rel < 1e-4, f"float32 variance relative error {rel:.2e}"
    torch.testing.assert_close(mean.double().cpu(), e_mean, rtol=1e-6, atol=0)


def tables(num_bins, d, dtype=torch.float32, seed=4):
    """(src_mean, src_var, dst_mean, dst_var) on the GPU with the published special cases in bins 0-3."""
    g = gen(seed)
    src_mean, dst_mean = (torch.randn(num_bins, d, generator=g, dtype=torch.float64) for _ in range(2))
    src_var, dst_var = (torch.rand(num_bins, d, generator=g, dtype=torch.float64) * 3 + 0.05 for _ in range(2))
    if num_bins >= 4:
        src_var[0] = 0
        src_var[1] = 1e-12
        src_var[2, ::2] = 0
        src_var[3] = 0.01
        dst_var[3, ::2] = 5.0
        dst_var[3, 1::2] = 1e-5
    return tuple(t.to(dtype=dtype, device="cuda") for t in (src_mean, src_var, dst_mean, dst_var))


def check_calibrate(x, idx, stats, inplace=False):
    before = x.clone()
    if inplace:
        got = x
        torch.ops.dirfast.calibrate_(x, idx, *stats)
    else:
        got = torch.ops.dirfast.calibrate(x, idx, *stats)
        assert torch.equal(x, before), "the input must not change"
        assert got.stride() == torch.empty_like(x).stride()
    expected = reference.calibrate(before, idx, *stats)
    t = tol(x.dtype)
    if x.dtype == torch.float32:
        t["atol"] = 2e-5  # x * s + t (fused) against (x - src_mean) * s + dst_mean
    torch.testing.assert_close(got, expected, **t)
    untouched = (idx < 0) | (idx >= stats[0].shape[0])
    assert torch.equal(got.movedim(1, -1)[untouched], before.movedim(1, -1)[untouched])


def layouts(n=3000, d=96, seed=0):
    """(name, x, idx) in every layout the kernels walk, and one they copy."""
    g = gen(seed)
    idx = torch.randint(-1, 41, (n,), generator=g).cuda()
    base = torch.randn(n, 2 * d + 2, generator=g).cuda()
    yield "rows", base[:, :d].contiguous(), idx
    yield "rows_wide", torch.randn(n, 4 * d, generator=g).cuda(), idx  # the grouped bin_stats kernel
    yield "rows_strided", base[:, :d], idx  # row stride 2d + 2: vector loads still aligned
    yield "rows_odd_d", base[:, : d - 1].contiguous(), idx  # scalar paths
    yield "rows_misaligned", base[:, 1 : d + 1], idx  # scalar paths
    yield "column_major", base[:, :d].t().contiguous().t(), idx
    yield "sliced", base[::2, 1::2][:, :d], idx[::2]  # copied once
    dense = torch.randn(3, 24, 20, 52, generator=g).cuda()
    idx_dense = torch.randint(-1, 41, (3, 20, 52), generator=g).cuda()
    yield "dense", dense, idx_dense
    yield "dense_odd", torch.randn(2, 5, 7, 9, generator=g).cuda(), torch.randint(-1, 41, (2, 7, 9), generator=g).cuda()
    yield "channels_last", dense.contiguous(memory_format=torch.channels_last), idx_dense


LAYOUT_NAMES = [name for name, _, _ in layouts(n=4, d=4)] if GPU else ["rows"]


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_bin_stats_layouts(layout, det):
    name, x, idx = next(item for item in layouts() if item[0] == layout)
    with deterministic(det):
        check_stats(torch.ops.dirfast.bin_stats(x, idx, 40), x, idx, 40)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_bins", [1, 97, 300, 5000])  # 300, 5000: too many for shared memory
@pytest.mark.parametrize("dim", [130, 256])  # 256: rows grouped by bucket (16-byte rows, >= 32 vectors)
def test_bin_stats_dtypes_and_bin_counts(dtype, num_bins, dim):
    g = gen(num_bins)
    x = torch.randn(20000, dim, generator=g).to(dtype=dtype, device="cuda")
    idx = torch.randint(-2, num_bins + 2, (20000,), generator=g).cuda().int()
    check_stats(torch.ops.dirfast.bin_stats(x, idx, num_bins), x, idx, num_bins)


# The accumulate kernels of src/bin_stats.cu: one of them runs per call.
ACCUMULATE_KERNELS = ("accumulate_grouped_kernel", "accumulate_shared_kernel", "accumulate_direct_kernel")


def kernels_that_ran(call, kernels) -> set:
    """Which of ``kernels`` (names of src/bin_stats.cu) ran during call(), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    names = {event.key for event in prof.key_averages()}
    # demangled ("kernel<float, ...>") or mangled ("...kernelIfE...") names
    return {kernel for kernel in kernels if any(kernel + "<" in name or kernel + "I" in name for name in names)}


def check_kernel(expected, x, idx, num_bins, atomics_per_address=None):
    """bin_stats against the reference, and of the accumulate kernels only ``expected`` ran."""
    ran = kernels_that_ran(lambda: check_stats(torch.ops.dirfast.bin_stats(x, idx, num_bins), x, idx, num_bins,
                                               atomics_per_address), ACCUMULATE_KERNELS)
    assert ran == {expected}, f"ran {ran or 'none'} of {ACCUMULATE_KERNELS}"


def check_grouped(x, idx, num_bins):
    """bin_stats against the reference, and the grouped kernel ran."""
    check_kernel("accumulate_grouped_kernel", x, idx, num_bins)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_bins, n", [(1, 5000), (7, 20000), (97, 20000), (3000, 2000)])
@pytest.mark.parametrize("dim", [264, 512, 1032])  # 264, 1032: lanes past the last feature in every dtype
def test_bin_stats_grouped_kernels(dtype, num_bins, n, dim):
    """The kernel that walks rows grouped by bucket (rows of 16-byte vectors, dim >= 32 vectors):
    a warp's rows in one bucket, a few, and many buckets of one or two rows; rows of no bucket."""
    g = gen(num_bins + dim)
    x = (torch.randn(n, dim, generator=g) * 3 + 10).to(dtype=dtype, device="cuda")
    idx = torch.randint(-2, num_bins + 2, (n,), generator=g).cuda()
    check_grouped(x, idx, num_bins)


@needs_gpu
@pytest.mark.parametrize("case", ["int32_bins", "row_stride", "few_rows", "one_row"])
def test_bin_stats_grouped_kernels_layouts(case):
    """int32 indices, rows with a stride past dim, and fewer valid rows than a warp's range."""
    g = gen(31)
    n, dim, num_bins = {"few_rows": 50, "one_row": 1}.get(case, 3000), 256, 9
    x = torch.randn(n, dim + 8, generator=g).cuda()
    x = x[:, :dim] if case == "row_stride" else x[:, :dim].contiguous()  # 16-byte aligned rows either way
    idx = torch.randint(-1, num_bins, (n,), generator=g).cuda()
    if case == "int32_bins":
        idx = idx.int()
    if case == "one_row":
        idx[0] = 4
    check_grouped(x, idx, num_bins)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_bins", [1, 40, 100, 5000])
@pytest.mark.parametrize("case", ["depth", "depth_odd_width", "random", "column_major"])
def test_bin_stats_plane_kernels(dtype, num_bins, case):
    """Planes of pixels: buckets that follow the image rows, 64 pixels wide (nearly every warp's
    32 pixels in one bucket) or 53 wide with noise (warps straddling rows and buckets), random
    buckets (every warp mixed), and [N, D] stored column-major (one plane per feature)."""
    g = gen(num_bins + 7)
    if case == "column_major":
        x = (torch.randn(3001, 24, generator=g) * 2 + 5).t().contiguous().t()
        idx = torch.randint(-1, num_bins + 1, (3001,), generator=g)
    else:
        width = 64 if case == "depth" else 53
        x = torch.randn(3, 24, 37, width, generator=g) * 2 + 5
        rows = torch.linspace(0, num_bins - 1, 37).view(1, 37, 1).expand(3, 37, width)
        if case == "random":
            idx = torch.randint(-1, num_bins + 1, (3, 37, width), generator=g)
        else:
            noise = 0.01 if case == "depth" else 0.3
            idx = (rows + torch.randn(3, 37, width, generator=g) * noise).round().long()
            idx[0, :2] = -1  # no bucket
            idx[1, -1, :10] = num_bins  # outside [0, B)
    x, idx = x.to(dtype=dtype, device="cuda"), idx.cuda()
    largest_bucket = int(torch.bincount(idx[(idx >= 0) & (idx < num_bins)].flatten().cpu(), minlength=1).max())
    check_kernel("accumulate_direct_kernel", x, idx, num_bins, atomics_per_address=largest_bucket)


@needs_gpu
def test_bin_stats_plane_kernels_at_mean_1000_std():
    g = gen(23)
    x = torch.randn(4, 16, 48, 64, generator=g, dtype=torch.float64) + 1000.0
    check_float32_accuracy(x, torch.randint(0, 5, (4, 48, 64), generator=g), 5)


@needs_gpu
def test_bin_stats_grouped_kernels_at_mean_1000_std():
    g = gen(21)
    x = torch.randn(40000, 256, generator=g, dtype=torch.float64) + 1000.0
    check_float32_accuracy(x, torch.randint(0, 9, (40000,), generator=g), 9)


@needs_gpu
@pytest.mark.parametrize("dtype, num_bins", [(torch.float32, 148), (torch.float32, 149),
                                             (torch.float64, 74), (torch.float64, 75)], ids=str)
def test_bin_stats_at_the_shared_memory_limit(dtype, num_bins):
    """The largest bucket count of the shared-memory kernel (112 KiB) and the first past it."""
    g = gen(num_bins)
    x = torch.randn(30000, 100, generator=g).to(dtype=dtype, device="cuda")
    idx = torch.randint(-1, num_bins + 1, (30000,), generator=g).cuda()
    got = torch.ops.dirfast.bin_stats(x, idx, num_bins)
    if dtype == torch.float32 and num_bins == 149:
        # Past the limit every element is a float atomic on S1 = sum(x - K): its rounding grows
        # with n * |mean - K| (K, the first row, may be 3 std from the mean), so the mean of a
        # bucket near 0 carries an absolute error of a few 1e-6 at n ~ 200 -- as many float32
        # ulps of the data's scale. Checked at that scale.
        count, mean, var = got
        e_count, e_mean, e_var = reference.bin_stats(x.double().cpu(), idx.cpu(), num_bins)
        assert torch.equal(count.cpu(), e_count)
        torch.testing.assert_close(mean.cpu().double(), e_mean, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(var.cpu().double(), e_var, **tol(torch.float32))
    else:
        check_stats(got, x, idx, num_bins)


@needs_gpu
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_one_channel_depth_maps(det):
    """[B, 1, H, W]: one feature, rows of one element."""
    g = gen(14)
    x = torch.randn(4, 1, 60, 80, generator=g).cuda()
    idx = torch.randint(-1, 51, (4, 60, 80), generator=g).cuda()
    with deterministic(det):
        check_stats(torch.ops.dirfast.bin_stats(x, idx, 50), x, idx, 50)
    check_calibrate(x, idx, tables(50, 1))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1])
def test_calibrate_low_precision_aligned_and_not(dtype, offset):
    g = gen(15)
    base = torch.randn(3000, 65, generator=g).to(dtype=dtype, device="cuda")
    x = base[:, offset : offset + 64]  # 16-byte vectors only when offset == 0
    idx = torch.randint(-1, 21, (3000,), generator=g).cuda()
    check_calibrate(x, idx, tables(20, 64))


@needs_gpu
@pytest.mark.parametrize("layout", ["rows", "dense"])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_bin_stats_variance_accuracy_at_mean_1000_std(layout, det):
    g = gen(12)
    if layout == "rows":  # 128 features: the grouped kernel (atomic mode)
        x = torch.randn(50000, 128, generator=g, dtype=torch.float64) + 1000.0
        idx = torch.randint(0, 5, (50000,), generator=g)
    else:
        x = torch.randn(4, 16, 48, 64, generator=g, dtype=torch.float64) + 1000.0
        idx = torch.randint(0, 5, (4, 48, 64), generator=g)
    with deterministic(det):
        check_float32_accuracy(x, idx, 5)


@needs_gpu
def test_bin_stats_deterministic_is_bitwise_reproducible():
    g = gen(13)
    x = torch.randn(30000, 200, generator=g).cuda()
    idx = torch.randint(-1, 60, (30000,), generator=g).cuda()
    with deterministic():
        first = torch.ops.dirfast.bin_stats(x, idx, 60)
        second = torch.ops.dirfast.bin_stats(x, idx, 60)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_stats(first, x, idx, 60)


@needs_gpu
def test_bin_stats_edge_cases():
    x = torch.randn(5, 3, device="cuda")
    idx = torch.tensor([-1, -1, 4, 7, -5], device="cuda")
    count, mean, var = torch.ops.dirfast.bin_stats(x, idx, 4)
    assert count.tolist() == [0] * 4 and torch.all(mean == 0) and torch.all(var == 0)
    count, mean, var = torch.ops.dirfast.bin_stats(x[:0], idx[:0], 4)
    assert count.tolist() == [0] * 4 and mean.shape == (4, 3) and torch.all(var == 0)
    one = torch.randn(1, 7, device="cuda", dtype=torch.float64)
    count, mean, var = torch.ops.dirfast.bin_stats(one, torch.zeros(1, dtype=torch.long, device="cuda"), 1)
    assert count.tolist() == [1] and torch.equal(mean[0], one[0]) and torch.all(var == 0)


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_calibrate_layouts(layout, inplace):
    name, x, idx = next(item for item in layouts(seed=3) if item[0] == layout)
    if inplace and name == "sliced":
        x = x.clone()  # (a view: calibrated in place through the copy-back path)
    check_calibrate(x, idx, tables(40, x.shape[1]), inplace=inplace)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64], ids=str)
def test_calibrate_dtypes(dtype, stats_dtype):
    g = gen(7)
    x = torch.randn(4000, 72, generator=g).to(dtype=dtype, device="cuda")
    idx = torch.randint(-1, 31, (4000,), generator=g).cuda()
    check_calibrate(x, idx, tables(30, 72, stats_dtype))
    xd = torch.randn(2, 8, 16, 24, generator=g).to(dtype=dtype, device="cuda")
    check_calibrate(xd, torch.randint(-1, 31, (2, 16, 24), generator=g).cuda(), tables(30, 8, stats_dtype))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("num_bins, ks", [(100, 5), (7, 9), (3, 11), (1, 5), (40, 1)])
def test_smooth_bins_bitwise_equals_reference(dtype, padding, num_bins, ks):
    g = gen(num_bins + ks)
    stats = torch.randn(num_bins, 33, generator=g).to(dtype)
    window = dirfast.kernel_window("gaussian", ks, 2.0)
    expected = reference.smooth_bins(stats, window, padding)
    got = torch.ops.dirfast.smooth_bins(stats.cuda(), window.cuda(), padding)
    assert got.dtype == dtype and torch.equal(got.cpu(), expected)
    got1 = torch.ops.dirfast.smooth_bins(stats[:, 0].cuda(), window.cuda(), padding)
    assert torch.equal(got1.cpu(), reference.smooth_bins(stats[:, 0], window, padding))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
def test_smooth_bins_asymmetric_window_bitwise(dtype, padding):
    """Pairs of unequal taps take two products and a sum, each rounded: no fused multiply-add."""
    g = gen(16)
    stats = torch.randn(50, 40, generator=g, dtype=torch.float64).to(dtype)
    window = torch.tensor([0.05, 0.2, 0.3, 0.25, 0.1, 0.07, 0.03], dtype=torch.float64)
    expected = reference.smooth_bins(stats, window, padding)
    got = torch.ops.dirfast.smooth_bins(stats.cuda(), window.cuda(), padding)
    assert torch.equal(got.cpu(), expected)


@needs_gpu
def test_cuda_graph_capture_of_an_fds_step():
    check_fds_step_replays_from_a_cuda_graph("cuda")

