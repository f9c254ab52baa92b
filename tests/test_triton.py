"""The Triton backend (dirfast/triton): its three ops against dirfast.reference.

Runs on a GPU when there is one, and otherwise on CPU tensors under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton), at small sizes.
The shared backend-parametrised tests of test_ops.py run the Triton backend too; this module
adds what is specific to it: both bin_stats strategies, chunked bins, deterministic mode,
layouts and strides, the custom-op machinery (opcheck, autograd, torch.compile), and on a GPU
CUDA-graph capture.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import dirfast
import dirfast.ops
from dirfast._schema import PADDINGS
from dirfast import reference
from testing import check_fds_step_replays_from_a_cuda_graph, deterministic, gen, tol

pytestmark = pytest.mark.skipif(
    not dirfast.backends()["triton"]["available"],
    reason=f"triton backend unavailable: {dirfast.backends()['triton']['reason']}",
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def dt_id(dtype):
    return str(dtype).replace("torch.", "")


def _ops():
    import dirfast.triton  # noqa: F401  (registers the ops)

    return torch.ops.dirfast


@contextlib.contextmanager
def bin_stats_config(strategy="auto", rows_per_chunk=None, tile_rows=None):
    from dirfast.triton import bin_stats as module

    saved = module.STRATEGY, module.ROWS_PER_CHUNK, module.TILE_ROWS
    module.STRATEGY, module.ROWS_PER_CHUNK, module.TILE_ROWS = strategy, rows_per_chunk, tile_rows
    try:
        yield
    finally:
        module.STRATEGY, module.ROWS_PER_CHUNK, module.TILE_ROWS = saved


# ------------------------------------------------------------------------------- inputs
def features(layout, dtype, *, n=45, d=3, num_bins=6, seed=0, shift=0.0, outside=True):
    """(x, bin_idx) in a layout; bins drawn from [-1, num_bins] when ``outside``."""
    g = gen(seed)
    low, high = (-1, num_bins + 1) if outside else (0, num_bins)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) + shift

    def bins(*shape):
        return torch.randint(low, high, shape, generator=g)

    if layout == "rows":
        x, idx = randn(n, d), bins(n)
    elif layout == "rows_transposed":
        x, idx = randn(d, n).t(), bins(n)
    elif layout == "rows_sliced":
        x, idx = randn(2 * n, 2 * d + 1)[::2, 1::2], bins(2 * n)[::2]
    elif layout == "dense":
        x, idx = randn(2, d, 5, 7), bins(2, 5, 7)
    elif layout == "dense_channels_last":
        x, idx = randn(2, d, 5, 7).contiguous(memory_format=torch.channels_last), bins(2, 5, 7)
    elif layout == "dense_sliced":
        x, idx = randn(2, d, 10, 8)[:, :, ::2, 1:], bins(2, 10, 8)[:, ::2, 1:]
    elif layout == "dense_1d":  # [B, C, L]
        x, idx = randn(3, d, 11), bins(3, 11)
    elif layout == "dense_3d":  # [B, C, T, H, W]
        x, idx = randn(2, d, 2, 3, 4), bins(2, 2, 3, 4)
    else:
        raise ValueError(layout)
    return x.to(dtype=dtype, device=DEVICE), idx.to(DEVICE)


LAYOUTS = ["rows", "rows_transposed", "rows_sliced", "dense", "dense_channels_last", "dense_sliced",
           "dense_1d", "dense_3d"]


def rand_tables(num_bins, d, dtype=torch.float32, seed=4):
    """(m1, v1, m2, v2) with the published special cases in bins 0-3."""
    g = gen(seed)
    m1, m2 = (torch.randn(num_bins, d, generator=g, dtype=torch.float64) for _ in range(2))
    v1, v2 = (torch.rand(num_bins, d, generator=g, dtype=torch.float64) * 3 + 0.05 for _ in range(2))
    if num_bins >= 4:
        v1[0] = 0  # sum(v1) < 1e-10: unchanged
        v1[1] = 1e-12  # also below 1e-10 in sum
        v1[2, ::2] = 0  # those dims unchanged
        v1[3] = 0.01
        v2[3, ::2] = 5.0  # ratio 500: clipped to clip_max
        v2[3, 1::2] = 1e-5  # ratio 1e-3: clipped to clip_min
    return tuple(t.to(dtype=dtype, device=DEVICE) for t in (m1, v1, m2, v2))


def check_stats(got, x, idx, num_bins, exact_count=True):
    count, mean, var = got
    e_count, e_mean, e_var = reference.bin_stats(x.double(), idx, num_bins)
    acc = reference.accumulate_dtype(x.dtype)
    assert count.dtype == torch.int64 and mean.dtype == acc and var.dtype == acc
    assert mean.shape == (num_bins, x.shape[1]) and var.shape == mean.shape
    assert mean.is_contiguous() and var.is_contiguous()
    torch.testing.assert_close(count.cpu(), e_count.cpu(), rtol=0, atol=0)
    t = tol(acc)
    torch.testing.assert_close(mean.cpu().double(), e_mean.cpu(), **t)
    torch.testing.assert_close(var.cpu().double(), e_var.cpu(), **t)


# ----------------------------------------------------------------------------- availability
def test_backend_reported_available():
    import dirfast.triton as dirfast_triton

    assert dirfast_triton.unavailable_reason() == ""
    info = dirfast.backends()["triton"]
    assert info["available"] and info["reason"] == ""
    for op in ("triton_bin_stats", "triton_smooth_bins", "triton_calibrate"):
        assert hasattr(torch.ops.dirfast, op)


def test_version_parsing():
    import dirfast.triton as dirfast_triton

    assert dirfast_triton._version_ok("3.6.0") and dirfast_triton._version_ok("3.7.1+git1234")
    assert dirfast_triton._version_ok("4.0.0") and not dirfast_triton._version_ok("3.5.1")
    assert dirfast_triton._version_tuple("3.6.0rc1") == (3, 6, 0)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_set_backend_routes_through_the_triton_ops():
    x, idx = features("rows", torch.float32)
    m1, v1, m2, v2 = rand_tables(6, 3)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(DEVICE)
    dirfast.set_backend("triton")
    assert dirfast.get_backend() == "triton"
    with _OpRecorder() as rec:
        count, mean, var = dirfast.ops.bin_stats(x, idx, 6)
        smoothed = dirfast.ops.smooth_bins(mean, w)
        out = dirfast.ops.calibrate(x, idx, m1, v1, m2, v2)
    for op in ("dirfast.triton_bin_stats.default", "dirfast.triton_smooth_bins.default",
               "dirfast.triton_calibrate.default"):
        assert op in rec.names, rec.names
    check_stats((count, mean, var), x, idx, 6)
    torch.testing.assert_close(smoothed, reference.smooth_bins(mean, w))
    torch.testing.assert_close(out, reference.calibrate(x, idx, m1, v1, m2, v2), rtol=2e-5, atol=2e-5)


def test_fds_smooth_on_triton_backend():
    """The FDS module end to end on the Triton backend equals the reference backend."""
    torch.manual_seed(0)
    feats = torch.randn(64, 8, device=DEVICE)
    labels = torch.randint(0, 20, (64,), device=DEVICE).float()
    results = {}
    for backend in ("reference", "triton"):
        with dirfast.use_backend(backend):
            fds = dirfast.FDS(8, bucket_num=20, bucket_start=0, start_smooth=1).to(DEVICE)
            fds.update_running_stats(feats, labels, 0)
            fds.update_last_epoch_stats(1)
            fds.update_running_stats(feats * 2, labels, 1)
            results[backend] = fds.smooth(feats.clone(), labels, 1)
    torch.testing.assert_close(results["triton"], results["reference"], rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- bin_stats
@pytest.mark.parametrize("strategy", ["auto", "csr", "direct", "tiles"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bin_stats_layouts_and_strategies(layout, strategy):
    x, idx = features(layout, torch.float32, seed=len(layout))
    with bin_stats_config(strategy, rows_per_chunk=4):  # several chunks per bin
        check_stats(_ops().triton_bin_stats(x, idx, 6), x, idx, 6)
    with bin_stats_config(strategy, rows_per_chunk=8, tile_rows=2):  # several tiles per chunk
        check_stats(_ops().triton_bin_stats(x, idx, 6), x, idx, 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_bin_stats_dtypes(dtype, det):
    x, idx = features("rows", dtype, n=70, d=5, seed=3)
    for strategy in ("csr", "direct", "tiles"):
        with deterministic(det), bin_stats_config(strategy, rows_per_chunk=8, tile_rows=4):
            check_stats(_ops().triton_bin_stats(x, idx, 6), x, idx, 6)
    xd, idxd = features("dense", dtype, d=3, seed=4)
    with deterministic(det):
        check_stats(_ops().triton_bin_stats(xd, idxd, 6), xd, idxd, 6)


@pytest.mark.parametrize("n, d, num_bins, rows_per_chunk", [
    (1, 1, 1, None),  # one row, one bin
    (37, 1, 1, 4),  # num_bins = 1, D = 1, N not a multiple of anything
    (53, 3, 7, 2),
    (40, 70, 5, 16),  # D wider than a column block (64 under the interpreter)
    (300, 2, 97, None),
    (25, 2, 70_000, None),  # more than 65,536 bins, most of them empty
])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_bin_stats_sizes(n, d, num_bins, rows_per_chunk, det):
    g = gen(n + d)
    x = torch.randn(n, d, generator=g).to(DEVICE)
    idx = torch.randint(-1, min(num_bins, 300) + 1, (n,), generator=g).to(DEVICE)
    with deterministic(det), bin_stats_config(rows_per_chunk=rows_per_chunk):
        check_stats(_ops().triton_bin_stats(x, idx, num_bins), x, idx, num_bins)


@pytest.mark.parametrize("strategy", ["csr", "direct", "tiles"])
def test_bin_stats_special_bins(strategy):
    """Empty bins, single-row bins, ignored rows (-1, >= num_bins), zero-variance dims, int32."""
    x = torch.randn(12, 4, generator=gen(5), dtype=torch.float64).to(DEVICE)
    x[:, 1] = 0.0  # dead feature: variance exactly 0
    x[:, 3] = 0.1  # constant feature: variance exactly 0 with the shifted sums
    idx = torch.tensor([5, 2, 5, 7, -1, 5, 7, 5, 9, 100, -7, 5], dtype=torch.int32, device=DEVICE)
    with bin_stats_config(strategy, rows_per_chunk=2):
        count, mean, var = _ops().triton_bin_stats(x, idx, 9)
    check_stats((count, mean, var), x, idx, 9)
    assert count.tolist() == [0, 0, 1, 0, 0, 5, 0, 2, 0]
    assert torch.all(var[:, 1] == 0) and torch.all(var[:, 3] == 0)
    empty = (count == 0).cpu()
    assert torch.all(mean.cpu()[empty] == 0) and torch.all(var.cpu()[empty] == 0)
    assert torch.all(var[2] == 0)
    torch.testing.assert_close(mean[2], x[1], rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["sorted", "one_bin", "ignored_tile", "alternating", "depth"])
def test_bin_stats_tiles_strategy_runs(pattern):
    """The "tiles" candidate's sort and segmented sums: runs that cross tiles, a tile of a single
    bin, a tile with no bin at all, runs of length one, and dense depth-like bins."""
    g = gen(len(pattern))
    n, num_bins = 200, 7
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 2
    idx = {"sorted": torch.arange(n) * num_bins // n,
           "one_bin": torch.full((n,), 3),
           "ignored_tile": torch.cat([torch.full((70,), -1), torch.randint(0, num_bins, (n - 70,), generator=g)]),
           "alternating": torch.arange(n) % 2 * 5 - (torch.arange(n) % 3 == 0).long(),
           "depth": None}[pattern]
    if pattern == "depth":
        x = torch.randn(2, 5, 12, 20, generator=g, dtype=torch.float64)
        idx = (torch.linspace(0, num_bins - 1, 12).view(1, 12, 1) + torch.randn(2, 12, 20, generator=g) * 0.3
               ).round().long()
    x, idx = x.float().to(DEVICE), idx.to(DEVICE)
    for tile_rows in (None, 16):
        with bin_stats_config("tiles", tile_rows=tile_rows):
            check_stats(_ops().triton_bin_stats(x, idx, num_bins), x, idx, num_bins)


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_tiles_strategy_wide_features(dtype, layout):
    """The "tiles" candidate with more features than one tile holds (two column blocks on a GPU)."""
    g = gen(41)
    if layout == "rows":
        x, idx = torch.randn(150, 40, generator=g), torch.randint(-1, 9, (150,), generator=g)
    else:
        x, idx = torch.randn(2, 40, 6, 11, generator=g), torch.randint(-1, 9, (2, 6, 11), generator=g)
    x, idx = x.to(dtype=dtype, device=DEVICE), idx.to(DEVICE)
    with bin_stats_config("tiles"):
        check_stats(_ops().triton_bin_stats(x, idx, 8), x, idx, 8)


def test_bin_stats_all_ignored_and_empty():
    x = torch.randn(5, 3, device=DEVICE)
    idx = torch.tensor([-1, -1, 4, 7, -5], device=DEVICE)
    count, mean, var = _ops().triton_bin_stats(x, idx, 4)
    assert count.tolist() == [0] * 4 and torch.all(mean == 0) and torch.all(var == 0)
    count, mean, var = _ops().triton_bin_stats(x[:0], idx[:0], 4)
    assert count.tolist() == [0] * 4 and mean.shape == (4, 3) and torch.all(var == 0)


@pytest.mark.parametrize("layout", ["rows", "dense"])
@pytest.mark.parametrize("mode", ["csr", "direct", "tiles", "deterministic"])
def test_bin_stats_variance_accuracy_at_mean_1000_std(layout, mode):
    """float32 variance within 1e-4 (relative) of float64 when mean/std = 1000."""
    num_bins = 4
    if layout == "rows":
        x, idx = features("rows", torch.float32, n=1500, d=4, num_bins=num_bins, seed=11, shift=1000.0,
                          outside=False)
    else:
        g = gen(12)
        x = (torch.randn(2, 4, 24, 32, generator=g, dtype=torch.float64) + 1000.0).float().to(DEVICE)
        idx = torch.randint(0, num_bins, (2, 24, 32), generator=g).to(DEVICE)
    strategy = "auto" if mode == "deterministic" else mode
    with bin_stats_config(strategy, rows_per_chunk=16), deterministic(mode == "deterministic"):
        _, mean, var = _ops().triton_bin_stats(x, idx, num_bins)
    _, e_mean, e_var = reference.bin_stats(x.double(), idx, num_bins)
    assert torch.all(e_var > 0.5)
    rel = ((var.double() - e_var).abs() / e_var).max().item()
    assert rel < 1e-4, f"float32 variance relative error {rel:.2e}"
    torch.testing.assert_close(mean.double(), e_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_deterministic_is_bitwise_reproducible(layout):
    x, idx = features(layout, torch.float32, n=200, d=5, seed=13)
    with deterministic(), bin_stats_config(rows_per_chunk=4):
        first = _ops().triton_bin_stats(x, idx, 6)
        second = _ops().triton_bin_stats(x, idx, 6)
        # and from a different order of the same rows: same bins, same sums in a fixed order
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_stats(first, x, idx, 6)


# ----------------------------------------------------------------------------- smooth_bins
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("num_bins, ks", [(12, 5), (5, 3), (4, 7), (3, 9), (2, 5), (1, 5), (1, 1), (6, 13)])
def test_smooth_bins_bitwise_equals_reference(padding, num_bins, ks):
    """float32/float64: the reference's summation order without FMA, so the same bits."""
    g = gen(num_bins * ks)
    window = torch.rand(ks, generator=g, dtype=torch.float64) + 0.1  # asymmetric: orientation
    symmetric = (window + window.flip(0)) / 2
    for dtype in (torch.float32, torch.float64):
        for stats in (torch.randn(num_bins, 3, generator=g, dtype=dtype),
                      torch.randn(num_bins, generator=g, dtype=dtype),
                      torch.randn(5, num_bins, generator=g, dtype=dtype).t()):
            stats = stats.to(DEVICE)
            for w in (window, symmetric.float()):
                w = w.to(DEVICE)
                got = _ops().triton_smooth_bins(stats, w, padding)
                assert got.dtype == dtype and got.shape == stats.shape and got.stride() == stats.stride()
                assert torch.equal(got, reference.smooth_bins(stats, w, padding)), (dtype, tuple(stats.shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dt_id)
@pytest.mark.parametrize("padding", PADDINGS)
def test_smooth_bins_low_precision(dtype, padding):
    stats = torch.randn(9, 4, generator=gen(2), dtype=torch.float64)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum")
    got = _ops().triton_smooth_bins(stats.to(dtype=dtype, device=DEVICE), w.to(DEVICE), padding)
    assert got.dtype == dtype
    expected = reference.smooth_bins(stats.to(dtype).double(), w, padding)
    torch.testing.assert_close(got.double().cpu(), expected, **tol(dtype))


def test_smooth_bins_wide_stats():
    """More columns than one program's block, and more bins than one block."""
    stats = torch.randn(300, 150, generator=gen(3)).to(DEVICE)
    w = dirfast.kernel_window("laplace", 7, 2.0, normalize="sum").to(DEVICE)
    for padding in PADDINGS:
        got = _ops().triton_smooth_bins(stats, w, padding)
        assert torch.equal(got, reference.smooth_bins(stats, w, padding))


# ----------------------------------------------------------------------------- calibrate
def check_calibrate(x, idx, tables, clip_min=0.1, clip_max=10.0):
    before = x.clone()
    got = _ops().triton_calibrate(x, idx, *tables, clip_min, clip_max)
    assert torch.equal(x, before), "the input must not change"
    assert got.dtype == x.dtype and got.shape == x.shape and got.stride() == torch.empty_like(x).stride()
    expected = reference.calibrate(x, idx, *tables, clip_min, clip_max)
    t = tol(x.dtype)
    if x.dtype == torch.float32:
        t["atol"] = 2e-5  # x * s + t vs (x - m1) * s + m2
    torch.testing.assert_close(got, expected, **t)
    # rows outside [0, B) and bins whose v1 sums below 1e-10 are copied exactly
    num_bins = tables[0].shape[0]
    quiet = torch.nonzero(tables[1].double().sum(dim=1) < 1e-10).flatten()
    untouched = (idx < 0) | (idx >= num_bins) | torch.isin(idx, quiet)
    got_rows = got.movedim(1, -1)[untouched]
    assert torch.equal(got_rows, x.movedim(1, -1)[untouched])
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_calibrate_layouts_and_dtypes(layout, dtype):
    x, idx = features(layout, dtype, d=3, seed=20)
    check_calibrate(x, idx, rand_tables(6, 3, reference.accumulate_dtype(dtype)))


@pytest.mark.parametrize("x_dtype, stats_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                  (torch.bfloat16, torch.float16)])
def test_calibrate_mixed_dtypes(x_dtype, stats_dtype):
    """The arithmetic is float64 when x or the statistics are (as the reference)."""
    x, idx = features("rows", x_dtype, d=4, seed=21)
    check_calibrate(x, idx, rand_tables(6, 4, stats_dtype))


@pytest.mark.parametrize("clip_min, clip_max", [(0.1, 10.0), (0.5, 2.0), (0.0, 100.0), (1.0, 1.0),
                                                (0.0, float("inf"))])
def test_calibrate_clips_float64_exact_bounds(clip_min, clip_max):
    x, idx = features("rows", torch.float64, d=4, seed=22)
    check_calibrate(x, idx, rand_tables(6, 4, torch.float64), clip_min, clip_max)


def test_calibrate_zero_variance_dims_and_single_bin():
    x, idx = features("rows", torch.float32, d=4, num_bins=1, seed=23)
    m1, v1, m2, v2 = rand_tables(1, 4)
    v1[0, 1] = 0
    got = check_calibrate(x, idx, (m1, v1, m2, v2))
    assert torch.equal(got[:, 1], x[:, 1])


def test_calibrate_wide_and_many_rows():
    x = torch.randn(300, 130, generator=gen(24)).to(DEVICE)
    idx = torch.randint(-1, 9, (300,), generator=gen(25)).to(DEVICE)
    check_calibrate(x, idx, rand_tables(8, 130))


def test_calibrate_expanded_gradient_like_input():
    """Stride-0 inputs (an expanded gradient) are read in place."""
    idx = torch.randint(-1, 6, (2, 5, 7), generator=gen(26)).to(DEVICE)
    x = torch.ones((), dtype=torch.float64, device=DEVICE).expand(2, 3, 5, 7)
    check_calibrate(x, idx, rand_tables(6, 3, torch.float64))
    xr = torch.full((), 2.0, device=DEVICE).expand(9, 3)
    check_calibrate(xr, idx.flatten()[:9], rand_tables(6, 3))


@pytest.mark.parametrize("layout", ["rows", "dense_channels_last"])
def test_calibrate_backward_is_scale(layout):
    x, idx = features(layout, torch.float32, d=3, seed=27)
    tables = rand_tables(6, 3)
    x.requires_grad_(True)
    out = _ops().triton_calibrate(x, idx, *tables, 0.1, 10.0)
    g = torch.randn_like(out)
    out.backward(g)
    s, _ = reference.scale_shift(*tables, 0.1, 10.0)
    s = torch.cat([s, torch.ones_like(s[:1])])
    safe = torch.where((idx >= 0) & (idx < 6), idx, 6)
    scale = s[safe] if x.dim() == 2 else s[safe].movedim(-1, 1)
    torch.testing.assert_close(x.grad, g * scale)


def test_calibrate_gradcheck_float64():
    x, idx = features("rows", torch.float64, n=6, d=3, seed=28)
    xd, idxd = features("dense", torch.float64, d=2, seed=29)
    xd, idxd = xd[:1, :, :2, :3], idxd[:1, :2, :3]
    for inp, bins in ((x, idx), (xd, idxd)):
        tables = rand_tables(6, inp.shape[1], torch.float64)
        inp = inp.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda t: _ops().triton_calibrate(t, bins, *tables, 0.1, 10.0), (inp,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- custom ops
def test_opcheck_triton_ops():
    g = gen(40)
    x = torch.randn(23, 3, generator=g).to(DEVICE)
    idx = torch.randint(-1, 5, (23,), generator=g).to(DEVICE)
    xd = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).to(DEVICE)
    idxd = torch.randint(-1, 5, (2, 4, 5), generator=g).to(DEVICE)
    ops = _ops()
    for inp, bins in ((x, idx), (xd, idxd)):
        torch.library.opcheck(ops.triton_bin_stats.default, (inp, bins, 5))
        tables = rand_tables(5, 3, inp.dtype)
        for requires_grad in (False, True):
            xi = inp.clone().requires_grad_(requires_grad)
            torch.library.opcheck(ops.triton_calibrate.default, (xi, bins, *tables, 0.1, 10.0))
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(DEVICE)
    for stats in (torch.randn(7, 3, device=DEVICE), torch.randn(9, dtype=torch.float64, device=DEVICE)):
        for padding in PADDINGS:
            torch.library.opcheck(ops.triton_smooth_bins.default, (stats, w.to(stats.dtype), padding))


def _compile_or_skip(fn, **kwargs):
    try:
        return torch.compile(fn, fullgraph=True, **kwargs)
    except Exception as exc:  # torch.compile itself unsupported here
        pytest.skip(f"torch.compile unavailable: {exc}")


def test_compile_fullgraph_calibrate_on_triton_backend():
    """No graph break: dispatch, checks and the custom op trace into one graph, forward and
    backward (aot_eager runs the fake kernels and the registered autograd)."""
    x, idx = features("rows", torch.float32, n=20, d=3, seed=41)
    tables = rand_tables(6, 3)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").float().to(DEVICE)

    def step(x, idx):
        count, mean, var = dirfast.ops.bin_stats(x.detach(), idx, 6)
        m2 = dirfast.ops.smooth_bins(mean, w)
        v2 = dirfast.ops.smooth_bins(var, w)
        return dirfast.ops.calibrate(x, idx, *tables) + dirfast.ops.calibrate(x, idx, mean, var, m2, v2)

    with dirfast.use_backend("triton"):
        compiled = _compile_or_skip(step, backend="aot_eager")
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        got = compiled(xa, idx)
        expected = step(xb, idx)
        torch.testing.assert_close(got, expected)
        got.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)


# ----------------------------------------------------------------------------- GPU only
@needs_gpu
def test_gpu_larger_sizes_match_reference():
    g = gen(50)
    x = torch.randn(20000, 300, generator=g).cuda()
    idx = torch.randint(-1, 101, (20000,), generator=g).cuda()
    for det in (False, True):
        with deterministic(det):
            check_stats(_ops().triton_bin_stats(x, idx, 100), x, idx, 100)
    xd = torch.randn(4, 32, 60, 80, generator=g).cuda()
    idxd = torch.randint(-1, 97, (4, 60, 80), generator=g).cuda()
    check_stats(_ops().triton_bin_stats(xd, idxd, 97), xd, idxd, 97)
    check_calibrate(x, idx, rand_tables(100, 300))
    check_calibrate(xd, idxd, rand_tables(97, 32))


@needs_gpu
def test_gpu_cuda_graph_capture_of_an_fds_step():
    check_fds_step_replays_from_a_cuda_graph("triton")


@needs_gpu
def test_gpu_compile_inductor_fullgraph():
    x = torch.randn(512, 64, device="cuda")
    idx = torch.randint(0, 10, (512,), device="cuda")
    tables = rand_tables(10, 64)

    def step(x):
        return torch.relu(dirfast.ops.calibrate(x * 2, idx, *tables))

    with dirfast.use_backend("triton"):
        compiled = _compile_or_skip(step)
        torch.testing.assert_close(compiled(x), step(x))


# ----------------------------------------------------------------------------- compiled for a GPU
def test_every_kernel_compiles_for_sm90_within_its_limits(tmp_path):
    """benchmarks/triton_compile.py: every Triton kernel, at the launch sizes the ops choose on a
    GPU (which the interpreter runs above never use), compiled -- not run -- for sm_90 by the
    installed Triton, in every dtype and strategy: it must compile, and fit one H100/H200 block
    (227 KiB of shared memory, 255 registers)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.triton_compile", "--json", str(out)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    compiled = {(row["case"].split()[0], row["kernel"]) for row in rows}
    expected = {("bin_stats", name) for name in ("_hist_kernel", "_scan_kernel", "_scatter_kernel", "_csr_kernel",
                                                 "_direct_kernel", "_tiles_kernel", "_finalize_kernel")}
    expected |= {("calibrate", "_tables_kernel"), ("calibrate", "_apply_kernel"), ("smooth_bins", "_smooth_kernel")}
    assert compiled == expected
    for row in rows:
        assert row["shared_bytes"] <= 227 * 1024, row
        if row.get("registers") is not None:  # ptxas comes with Triton's NVIDIA backend
            assert row["registers"] <= 255, row
