"""The C++ CPU kernels (csrc/cpu/*.cpp) against dirfast.reference, beyond tests/test_ops.py.

Odd sizes (rows not a multiple of any block, D = 1 and 3, one row, one bucket for every row,
buckets of one row), both layouts read in place and the ones that are copied, 1 and 65,536
bins, float32 accuracy at mean/std = 1000, bitwise determinism across thread counts,
torch.library.opcheck, and gradcheck of the calibration through the "cpp" backend.
"""

import contextlib

import pytest
import torch

import dirfast
import dirfast.ops
import dirfast.reference as reference
from dirfast.ops import PADDINGS
from testing import dtype_params, gen, rand_stats, stats_dtype, stats_tol, tol

_CPP = dirfast.backends()["cpp"]
if not _CPP["available"]:
    pytest.skip(f"cpp backend unavailable: {_CPP['reason']}", allow_module_level=True)

OPS = torch.ops.dirfast
FLOATS = list(dtype_params())


@contextlib.contextmanager
def num_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def features(layout, dtype, *, n=37, d=3, num_bins=5, seed=0, low=-1, high=None, shift=0.0):
    """``(x, bin_idx)`` with indices in ``[low, high)`` (default ``[-1, num_bins + 1)``: rows
    with -1 and num_bins select no bin). Dense layouts have ``n`` pixels in total."""
    high = num_bins + 1 if high is None else high
    g = gen(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if layout == "rows":
        x = rand(n, d)
    elif layout == "rows_transposed":  # column-major: read in place as [1, D, N]
        x = rand(d, n).t()
    elif layout == "rows_padded":  # row stride > D: read in place
        x = rand(n, d + 2)[:, 1:-1]
    elif layout == "rows_sliced":  # feature stride 2: copied
        x = rand(n, 2 * d)[:, ::2]
    elif layout == "dense":  # planar: read in place
        x = rand(2, d, 3, n // 6)
    elif layout == "dense_channels_last":  # rows layout: read in place
        x = rand(2, d, 3, n // 6).contiguous(memory_format=torch.channels_last)
    elif layout == "dense_3d":
        x = rand(3, d, n // 3)
    elif layout == "dense_5d":
        x = rand(2, d, 2, 3, n // 12)
    elif layout == "dense_batch_major":  # [C, B, HW] memory: planar with its own strides
        x = rand(d, 2, 3, n // 6).transpose(0, 1)
    elif layout == "dense_sliced":  # spatial stride 2: copied
        x = rand(2, d, 3, 2 * (n // 6))[..., ::2]
    else:
        raise ValueError(layout)
    x = (x + shift).to(dtype)
    shape = (x.shape[0],) + tuple(x.shape[2:])
    idx = torch.randint(low, high, shape, generator=g)
    return x, idx


LAYOUTS = ["rows", "rows_transposed", "rows_padded", "rows_sliced", "dense", "dense_channels_last",
           "dense_3d", "dense_5d", "dense_batch_major", "dense_sliced"]


def check_stats(got, x, idx, num_bins):
    count, mean, var = got
    sd = stats_dtype(x.dtype)
    assert count.dtype == torch.int64 and count.shape == (num_bins,)
    assert mean.dtype == sd and var.dtype == sd
    assert mean.shape == (num_bins, x.shape[1]) and var.shape == (num_bins, x.shape[1])
    e_count, e_mean, e_var = reference.bin_stats(x, idx, num_bins)
    torch.testing.assert_close(count, e_count, rtol=0, atol=0)
    torch.testing.assert_close(mean, e_mean, **stats_tol(x.dtype))
    torch.testing.assert_close(var, e_var, **stats_tol(x.dtype))
    empty = count == 0
    assert torch.all(mean[empty] == 0) and torch.all(var[empty] == 0)
    assert torch.all(var[count == 1] == 0) and torch.all(var >= 0)


def test_kernels_are_registered_for_cpu():
    for op in ("bin_stats", "smooth_bins", "calibrate"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dirfast::{op}", "CPU")


# =========================================================================== bin_stats
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 3])
def test_bin_stats_layouts(dtype, layout, d):
    x, idx = features(layout, dtype, n=96, d=d, num_bins=5, seed=d)
    with dirfast.use_backend("cpp"):
        check_stats(dirfast.ops.bin_stats(x, idx, 5), x, idx, 5)


@pytest.mark.parametrize("n, d, num_bins", [
    (1, 1, 1), (1, 3, 4), (2, 1, 1), (37, 3, 1), (1000, 1, 7), (4097, 3, 11),
    (70001, 8, 97),  # 16 chunks of rows not a multiple of anything
    (30001, 1, 65536),  # more bins than rows
])
def test_bin_stats_sizes(n, d, num_bins):
    x, idx = features("rows", torch.float32, n=n, d=d, num_bins=num_bins, seed=n)
    check_stats(OPS.bin_stats(x, idx, num_bins), x, idx, num_bins)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bin_stats_dense_tiles_across_chunks(dtype):
    """A dense tensor whose pixel tiles and chunks cut through batch items at odd places."""
    g = gen(3)
    x = torch.randn(4, 7, 101, 103, generator=g).to(dtype)
    idx = torch.randint(-1, 12, (4, 101, 103), generator=g)
    check_stats(OPS.bin_stats(x, idx, 11), x, idx, 11)


def test_bin_stats_one_bucket_and_single_rows():
    g = gen(4)
    x = torch.randn(50000, 5, generator=g)
    idx = torch.zeros(50000, dtype=torch.long)  # every row in bucket 0
    check_stats(OPS.bin_stats(x, idx, 3), x, idx, 3)
    idx = torch.arange(50000) % 7  # buckets 5 and 6 below get one row each
    idx[idx >= 5] = -1
    idx[123] = 5
    idx[40000] = 6
    count, mean, var = OPS.bin_stats(x, idx, 7)
    check_stats((count, mean, var), x, idx, 7)
    assert count[5] == 1 and count[6] == 1
    assert torch.equal(mean[5], x[123]) and torch.equal(mean[6], x[40000])


def test_bin_stats_ignored_rows_and_int32():
    x, idx = features("rows", torch.float32, n=500, d=4, num_bins=6, low=-3, high=9)
    for index in (idx, idx.int()):
        check_stats(OPS.bin_stats(x, index, 6), x, idx, 6)
    count, mean, var = OPS.bin_stats(x, torch.full((500,), -1), 6)
    assert count.sum() == 0 and torch.all(mean == 0) and torch.all(var == 0)


def test_bin_stats_empty_inputs():
    count, mean, var = OPS.bin_stats(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 4)
    assert count.tolist() == [0] * 4 and mean.shape == (4, 3) and torch.all(var == 0)
    count, mean, var = OPS.bin_stats(torch.zeros(5, 0), torch.tensor([0, 1, 1, -1, 3]), 4)
    assert count.tolist() == [1, 2, 0, 1] and mean.shape == (4, 0)


@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_accuracy_mean_over_std_1000(layout):
    """float32 variance within 1e-4 (relative) of float64 when mean / std = 1000, with enough
    rows per bucket for several chunks to be merged."""
    n = 48000
    x, idx = features(layout, torch.float32, n=n, d=16, num_bins=3, low=0, high=3, shift=1000.0, seed=5)
    count, mean, var = OPS.bin_stats(x, idx, 3)
    _, e_mean, e_var = reference.bin_stats(x.double(), idx, 3)
    assert torch.all(count > 10000)
    assert ((var.double() - e_var).abs() / e_var).max() < 1e-4
    assert ((mean.double() - e_mean).abs() / e_mean.abs()).max() < 1e-6


# =========================================================================== calibrate
def calibration_stats(num_bins, d, dtype, seed=4):
    """Random stats with the published special cases: bin 0 v1 == 0 (unchanged), bin 1 v1 tiny
    with a sum below 1e-10 (unchanged), bin 2 some dims v1 == 0 (those unchanged), bin 3
    ratios outside [0.1, 10] (clipped)."""
    m1, v1, m2, v2 = rand_stats(num_bins, d, dtype=torch.float64, seed=seed)
    if num_bins >= 4:
        v1[0] = 0
        v1[1] = 1e-12
        v1[2, ::2] = 0
        v1[3] = 0.01
        v2[3, : (d + 1) // 2] = 5.0
        v2[3, (d + 1) // 2:] = 1e-5
    return tuple(t.to(dtype) for t in (m1, v1, m2, v2))


def close(got, expected):
    """calibrate against the reference: the same arithmetic in the same order, but torch's
    vectorised sqrt is not always correctly rounded (std::sqrt is), so s may differ by 1 ulp."""
    t = tol(got.dtype)
    if got.dtype == torch.float32:
        t["atol"] = 2e-5  # |x * s| and |t| up to ~10, y near 0
    torch.testing.assert_close(got, expected, **t)


def same_bits(a, b):
    """Equal values, the sign of zeros included (NaN payloads aside)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b)
    assert torch.equal(torch.signbit(a), torch.signbit(b))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 3])
def test_calibrate_layouts(dtype, layout, d):
    x, idx = features(layout, dtype, n=96, d=d, num_bins=6, seed=10 + d)
    stats = calibration_stats(6, d, stats_dtype(dtype))
    before = x.clone()
    with dirfast.use_backend("cpp"):
        got = dirfast.ops.calibrate(x, idx, *stats)
    assert torch.equal(x, before)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert got.stride() == torch.empty_like(x).stride()
    close(got, reference.calibrate(x, idx, *stats))


@pytest.mark.parametrize("x_dtype, stats_dtype_", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float64), (torch.float32, torch.float64),
    (torch.float64, torch.float32), (torch.float32, torch.float16),
])
def test_calibrate_mixed_dtypes(x_dtype, stats_dtype_):
    x, idx = features("rows", x_dtype, n=40, d=3, num_bins=6)
    stats = calibration_stats(6, 3, stats_dtype_)
    got = OPS.calibrate(x, idx, *stats)
    close(got, reference.calibrate(x, idx, *stats))


@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_calibrate_unchanged_values_keep_their_bits(layout):
    """Rows outside [0, B), buckets with sum(v1) < 1e-10 and dims with v1 == 0 are copied: the
    sign of -0.0 included."""
    x, idx = features(layout, torch.float32, n=96, d=4, num_bins=6, low=-2, high=8, seed=7)
    if layout == "rows":
        x[:20] = -0.0
    else:
        x[:, :, 0] = -0.0
    stats = calibration_stats(6, 4, torch.float32)
    got = OPS.calibrate(x, idx, *stats)
    rows = lambda t: t.movedim(1, -1).reshape(-1, 4)  # noqa: E731
    gx, xx, flat = rows(got), rows(x), idx.reshape(-1)
    keep = (flat < 0) | (flat >= 6) | (flat == 0) | (flat == 1)
    assert keep.any() and (xx[keep] == 0).any()
    same_bits(gx[keep], xx[keep])
    same_bits(gx[flat == 2][:, ::2], xx[flat == 2][:, ::2])
    assert not torch.equal(gx[flat == 4], xx[flat == 4])


def test_calibrate_sizes_and_bins():
    for n, d, num_bins in [(1, 1, 1), (1, 3, 5), (4097, 3, 6), (70001, 8, 97), (300, 2, 65536)]:
        x, idx = features("rows", torch.float32, n=n, d=d, num_bins=num_bins, seed=n)
        stats = calibration_stats(num_bins, d, torch.float32)
        got = OPS.calibrate(x, idx, *stats)
        close(got, reference.calibrate(x, idx, *stats))
    x = torch.randn(4, 5, 33, 47, generator=gen(8))
    idx = torch.randint(-1, 98, (4, 33, 47), generator=gen(9))
    stats = calibration_stats(97, 5, torch.float32)
    close(OPS.calibrate(x, idx, *stats), reference.calibrate(x, idx, *stats))
    empty = OPS.calibrate(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), *stats)
    assert empty.shape == (0, 5)
    # More bins than pixels, dense: only the buckets in use get a scale and shift.
    x, idx = features("dense", torch.float32, n=96, d=3, num_bins=65536, seed=2)
    stats = calibration_stats(65536, 3, torch.float32)
    close(OPS.calibrate(x, idx, *stats), reference.calibrate(x, idx, *stats))
    check_stats(OPS.bin_stats(x, idx, 65536), x, idx, 65536)


@pytest.mark.parametrize("clip_min, clip_max", [(0.1, 10.0), (0.0, 100.0), (1.0, 1.0)])
def test_calibrate_clips(clip_min, clip_max):
    x, idx = features("dense", torch.float32, n=96, d=3, num_bins=6)
    stats = calibration_stats(6, 3, torch.float32)
    got = OPS.calibrate(x, idx, *stats, clip_min, clip_max)
    close(got, reference.calibrate(x, idx, *stats, clip_min, clip_max))


@pytest.mark.parametrize("layout", ["rows", "dense", "dense_channels_last"])
def test_calibrate_gradcheck(layout):
    x, idx = features(layout, torch.float64, n=24, d=3, num_bins=6, seed=30)
    stats = calibration_stats(6, 3, torch.float64)
    x.requires_grad_(True)

    def fn(inp):
        with dirfast.use_backend("cpp"):
            return dirfast.ops.calibrate(inp, idx, *stats)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


# =========================================================================== smooth_bins
SMOOTH_CASES = [(10, 5), (7, 3), (6, 1), (4, 7), (3, 9), (2, 5), (2, 3), (1, 5), (1, 1), (5, 11), (97, 5)]


def window(ks, seed, symmetric):
    w = torch.rand(ks, generator=gen(seed), dtype=torch.float64) + 0.1
    return (w + w.flip(0)) / 2 if symmetric else w


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("num_bins, ks", SMOOTH_CASES)
def test_smooth_bins_same_bits_as_reference(dtype, padding, num_bins, ks):
    g = gen(num_bins)
    for symmetric in (False, True):
        w = window(ks, ks, symmetric)
        for stats in (torch.randn(num_bins, 3, generator=g), torch.randn(num_bins, generator=g),
                      torch.randn(4, num_bins, generator=g).t()):
            stats = stats.to(dtype)
            with dirfast.use_backend("cpp"):
                got = dirfast.ops.smooth_bins(stats, w, padding)
            assert got.stride() == torch.empty_like(stats).stride()
            same_bits(got, reference.smooth_bins(stats, w, padding))


def test_smooth_bins_window_dtype_and_scipy():
    from scipy.ndimage import convolve1d

    stats = torch.rand(121, generator=gen(4), dtype=torch.float64) * 50
    w = dirfast.kernel_window("gaussian", 5, 2.0)
    got = OPS.smooth_bins(stats, w, "constant")
    assert torch.equal(got, torch.as_tensor(convolve1d(stats.numpy(), w.numpy(), mode="constant")))
    s32 = stats.float().reshape(-1, 1)
    same_bits(OPS.smooth_bins(s32, w.float(), "reflect"), reference.smooth_bins(s32, w.float(), "reflect"))
    same_bits(OPS.smooth_bins(s32, w, "reflect"), reference.smooth_bins(s32, w, "reflect"))


# =========================================================================== determinism
def test_bitwise_deterministic_across_threads():
    g = gen(12)
    rows = torch.randn(70001, 24, generator=g) * 3 + 100
    rows_idx = torch.randint(-1, 98, (70001,), generator=g)
    dense = torch.randn(3, 16, 97, 101, generator=g)
    dense_idx = torch.randint(-1, 98, (3, 97, 101), generator=g)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum")

    def run():
        out = []
        for x, idx in ((rows, rows_idx), (dense, dense_idx), (rows.half(), rows_idx.int())):
            count, mean, var = OPS.bin_stats(x, idx, 97)
            m2, v2 = OPS.smooth_bins(mean, w, "reflect"), OPS.smooth_bins(var, w, "reflect")
            out += [count, mean, var, m2, v2, OPS.calibrate(x, idx, mean, var, m2, v2, 0.1, 10.0)]
        return out

    results = []
    for threads in (1, 2, 3, 2):
        with num_threads(threads):
            results.append(run())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# =========================================================================== opcheck, errors
def test_opcheck():
    g = gen(40)
    cases = [
        (torch.randn(23, 3, generator=g), torch.randint(-1, 5, (23,), generator=g)),
        (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), torch.randint(-1, 5, (2, 4, 5), generator=g)),
        (torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
         torch.randint(-1, 5, (2, 4, 5), generator=g, dtype=torch.int32)),
        (torch.randn(9, 3, generator=g).half(), torch.randint(0, 5, (9,), generator=g)),
    ]
    for x, idx in cases:
        torch.library.opcheck(OPS.bin_stats.default, (x, idx, 5))
        stats = calibration_stats(5, 3, stats_dtype(x.dtype))
        for requires_grad in (False, True):
            xi = x.clone().requires_grad_(requires_grad)
            torch.library.opcheck(OPS.calibrate.default, (xi, idx, *stats, 0.1, 10.0))
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum")
    for stats in (torch.randn(7, 3), torch.randn(9, dtype=torch.float64), torch.randn(3, 6).t()):
        for padding in PADDINGS:
            torch.library.opcheck(OPS.smooth_bins.default, (stats, w.to(stats.dtype), padding))

