"""The three ops (bin_stats, smooth_bins, calibrate) on every backend against the oracle.

Parametrised over backend x device x dtype x layout; the oracle is tests/oracle.py (float64,
bin by bin, row by row).
"""

import pytest
import torch

import dirfast
from dirfast._schema import PADDINGS
import dirfast.ops
import oracle
from testing import (
    backend_device_params,
    dtype_params,
    gen,
    rand_bins,
    rand_features,
    rand_stats,
    stats_dtype,
    stats_tol,
    tol,
)

BACKEND_DEVICE = list(backend_device_params())
LAYOUTS = ["rows", "rows_transposed", "rows_sliced", "dense", "dense_channels_last", "dense_sliced"]


def on(backend, fn, *args, **kwargs):
    with dirfast.use_backend(backend):
        return fn(*args, **kwargs)


def make_features(layout, dtype, device, num_bins, *, d=3, n=37, seed=0, outside=True, shift=0.0):
    """``(x, bin_idx)`` in the given layout; bins in [-1, num_bins] when ``outside`` (so rows
    with -1 and with num_bins, which select no bin, are present). Strided layouts are views
    of a bigger tensor of the final dtype and device."""
    low, high = (-1, num_bins + 1) if outside else (0, num_bins)
    g = gen(seed)

    def base(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).to(dtype=dtype, device=device)

    def bins(*shape):
        return torch.randint(low, high, shape, generator=g).to(device)

    b, h, w = 2, 5, 7  # dense: 70 pixels, not a multiple of anything useful
    if layout == "rows":
        x, idx = base(n, d), bins(n)
    elif layout == "rows_transposed":
        x, idx = base(d, n).t(), bins(n)
    elif layout == "rows_sliced":  # every other row, odd columns, strided bin_idx
        x, idx = base(2 * n, 2 * d + 1)[::2, 1::2], bins(2 * n)[::2]
    elif layout == "dense":
        x, idx = base(b, d, h, w), bins(b, h, w)
    elif layout == "dense_channels_last":
        x, idx = base(b, d, h, w).contiguous(memory_format=torch.channels_last), bins(b, h, w)
    elif layout == "dense_sliced":
        x, idx = base(b, 2 * d, 2 * h, w + 1)[:, ::2, ::2, 1:], bins(b, 2 * h, w + 1)[:, ::2, 1:]
    else:
        raise AssertionError(layout)
    assert x.shape[1] == d and tuple(idx.shape) == (x.shape[0],) + tuple(x.shape[2:])
    if layout in ("rows_sliced", "dense_sliced") or (layout in ("rows_transposed", "dense_channels_last") and d > 1):
        assert not x.is_contiguous()
    return x, idx


def check_bin_stats(result, x, idx, num_bins):
    count, mean, var = result
    sd = stats_dtype(x.dtype)
    assert count.dtype == torch.int64 and count.shape == (num_bins,)
    assert mean.dtype == sd and var.dtype == sd, (mean.dtype, var.dtype)
    assert mean.shape == (num_bins, x.shape[1]) and var.shape == (num_bins, x.shape[1])
    assert count.device == x.device and mean.device == x.device and var.device == x.device
    e_count, e_mean, e_var = oracle.bin_stats(x, idx, num_bins)
    torch.testing.assert_close(count.cpu(), e_count)
    t = stats_tol(x.dtype)
    torch.testing.assert_close(mean.cpu().double(), e_mean, **t)
    torch.testing.assert_close(var.cpu().double(), e_var, **t)


# =========================================================================== bin_stats
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 3])
def test_bin_stats_matches_oracle(backend, device, dtype, layout, d):
    num_bins = 6
    x, idx = make_features(layout, dtype, device, num_bins, d=d, n=41, seed=d)
    result = on(backend, dirfast.ops.bin_stats, x, idx, num_bins)
    check_bin_stats(result, x, idx, num_bins)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("n, d, num_bins", [(1, 1, 1), (7, 5, 1), (129, 17, 11), (300, 2, 97)])
def test_bin_stats_sizes(backend, device, n, d, num_bins):
    x = rand_features(n, d, device=device, seed=n)
    idx = rand_bins(n, num_bins, low=-1, device=device, seed=n + 1)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, num_bins), x, idx, num_bins)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bin_stats_empty_and_single_sample_bins(backend, device, dtype):
    num_bins = 9
    x = rand_features(8, 4, dtype=dtype, device=device, seed=5)
    # bin 2: 1 row; bin 5: 4 rows; bin 7: 2 rows; bin 8 and the rest: empty; one row ignored
    idx = torch.tensor([5, 2, 5, 7, -1, 5, 7, 5], device=device)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, num_bins)
    check_bin_stats((count, mean, var), x, idx, num_bins)
    assert count.tolist() == [0, 0, 1, 0, 0, 4, 0, 2, 0]
    empty = count.cpu() == 0
    assert torch.all(mean.cpu()[empty] == 0) and torch.all(var.cpu()[empty] == 0)
    assert torch.all(var.cpu()[2] == 0), "one sample: variance 0"
    torch.testing.assert_close(mean[2], x[1].to(mean.dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_bin_stats_all_rows_ignored_and_empty_input(backend, device):
    x = rand_features(5, 3, device=device)
    idx = torch.tensor([-1, -1, 4, 7, -5], device=device)  # 4 and 7 are >= num_bins
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 4)
    assert count.tolist() == [0, 0, 0, 0]
    assert torch.all(mean == 0) and torch.all(var == 0)
    x0 = torch.zeros(0, 3, device=device)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x0, torch.zeros(0, dtype=torch.long, device=device), 4)
    assert count.tolist() == [0, 0, 0, 0] and mean.shape == (4, 3)
    assert torch.all(mean == 0) and torch.all(var == 0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", list(dtype_params()))
def test_bin_stats_zero_variance_dimension(backend, device, dtype):
    """A dead (all-zero) feature has variance exactly 0 (calibrate then leaves it alone, as the
    published code does); a constant non-zero feature has variance ~0."""
    x = rand_features(30, 4, dtype=dtype, device=device, seed=7)
    x[:, 1] = 0
    x[:, 3] = 0.1
    idx = rand_bins(30, 3, device=device, seed=8)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 3)
    assert torch.all(var[:, 1] == 0)
    assert torch.all(var[:, 3].abs() < 1e-12)
    check_bin_stats((count, mean, var), x, idx, 3)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_bin_stats_int32_index(backend, device):
    x = rand_features(50, 3, device=device, seed=9)
    idx = rand_bins(50, 5, low=-1, device=device, seed=10, dtype=torch.int32)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, 5), x, idx, 5)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_variance_accuracy(backend, device, layout):
    """ISSUE section 3: float32 variance within 1e-4 (relative) of float64 when a bin's mean is
    1000 times its standard deviation."""
    num_bins = 4
    x, idx = make_features(layout, torch.float32, device, num_bins, d=8, n=2000, seed=11, outside=False,
                           shift=1000.0)
    _, _, var = on(backend, dirfast.ops.bin_stats, x, idx, num_bins)
    _, _, expected = oracle.bin_stats(x, idx, num_bins)  # float64 on the same float32 values
    assert torch.all(expected > 0.5)
    rel = ((var.cpu().double() - expected).abs() / expected).max().item()
    assert rel < 1e-4, f"float32 variance relative error {rel:.2e}"


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_large(backend, device, layout):
    """Enough elements for the kernels' multi-chunk / multi-program paths (and their merges)."""
    num_bins = 97
    if layout == "rows":
        x = rand_features(20011, 7, device=device, seed=50, shift=3.0)
        idx = rand_bins(20011, num_bins + 1, low=-1, device=device, seed=51)
    else:
        x = torch.randn(3, 5, 61, 67, generator=gen(52)).to(device) + 3.0
        idx = rand_bins((3, 61, 67), num_bins + 1, low=-1, device=device, seed=53)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, num_bins), x, idx, num_bins)


# =========================================================================== smooth_bins
SMOOTH_CASES = [  # (num_bins, ks): ordinary, window as wide as / wider than the bins, one bin
    (10, 5), (7, 3), (6, 1), (4, 7), (3, 9), (2, 5), (2, 3), (1, 5), (1, 1), (5, 11),
]


def random_window(ks, seed, symmetric):
    w = torch.rand(ks, generator=gen(seed), dtype=torch.float64) + 0.1
    if symmetric:
        w = (w + w.flip(0)) / 2
    return w


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("num_bins, ks", SMOOTH_CASES)
def test_smooth_bins_matches_oracle(backend, device, dtype, padding, num_bins, ks):
    # an asymmetric window pins down the orientation (cross-correlation, like F.conv1d)
    window = random_window(ks, seed=ks, symmetric=False)
    for stats in (
        torch.randn(num_bins, 3, generator=gen(num_bins), dtype=torch.float64),
        torch.randn(num_bins, generator=gen(num_bins + 1), dtype=torch.float64),
        torch.randn(4, num_bins, generator=gen(num_bins + 2), dtype=torch.float64).t(),  # non-contiguous
    ):
        stats = stats.to(dtype=dtype, device=device)
        got = on(backend, dirfast.ops.smooth_bins, stats, window.to(device), padding)
        assert got.dtype == dtype and got.shape == stats.shape and got.device == stats.device
        expected = oracle.smooth_bins(stats, window, padding)
        torch.testing.assert_close(got.cpu().double(), expected, **tol(dtype))


def test_oracle_smooth_bins_agrees_with_pad_conv1d():
    """The loop oracle's reflect padding is torch's F.pad reflect where that one works."""
    stats = torch.randn(9, 4, generator=gen(3), dtype=torch.float64)
    w = random_window(5, seed=2, symmetric=False)
    torch.testing.assert_close(oracle.smooth_bins(stats, w, "reflect"), oracle.fds_smooth_conv1d(stats, w))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("padding", PADDINGS)
def test_smooth_bins_window_dtypes(backend, device, padding):
    """Window given in float32 or float64 for float32 stats: same result."""
    stats = torch.randn(8, 2, generator=gen(1)).to(device)
    w64 = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(device)
    a = on(backend, dirfast.ops.smooth_bins, stats, w64, padding)
    b = on(backend, dirfast.ops.smooth_bins, stats, w64.float(), padding)
    torch.testing.assert_close(a, b, **tol(torch.float32))
    torch.testing.assert_close(a.cpu().double(), oracle.smooth_bins(stats.cpu(), w64.cpu(), padding), **tol(torch.float32))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_smooth_bins_constant_is_scipy_convolve1d(backend, device):
    """padding="constant" is what LDS needs: scipy.ndimage.convolve1d(mode="constant")."""
    from scipy.ndimage import convolve1d

    base = torch.rand(30, generator=gen(4), dtype=torch.float64) * 50
    window = oracle.lds_window("gaussian", 5, 2)
    got = on(backend, dirfast.ops.smooth_bins, base.to(device), torch.as_tensor(window, device=device), "constant")
    expected = convolve1d(base.numpy(), weights=window, mode="constant")
    torch.testing.assert_close(got.cpu(), torch.as_tensor(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_smooth_bins_single_bin_reflect_is_window_sum(backend, device):
    stats = torch.tensor([[2.0, -3.0]], dtype=torch.float64, device=device)
    w = random_window(7, seed=9, symmetric=False).to(device)
    got = on(backend, dirfast.ops.smooth_bins, stats, w, "reflect")
    torch.testing.assert_close(got, stats * w.sum())


# =========================================================================== calibrate
def calibration_stats(num_bins, d, dtype, device, seed=4):
    """Random stats plus the published special cases in the first bins (num_bins >= 5):
    bin 0: v1 == 0 everywhere (sum < 1e-10: unchanged); bin 1: v1 tiny but not zero, summing
    below 1e-10 (unchanged); bin 2: some dims with v1 == 0 (those unchanged); bin 3: ratios far
    outside [0.1, 10] (clipped)."""
    m1, v1, m2, v2 = rand_stats(num_bins, d, dtype=torch.float64, seed=seed)
    v1[0] = 0
    v1[1] = 1e-12
    v1[2, ::2] = 0
    v1[3] = 0.01
    v2[3, : (d + 1) // 2] = 5.0  # ratio 500 -> clipped to 10
    v2[3, (d + 1) // 2 :] = 1e-5  # ratio 1e-3 -> clipped to 0.1
    return tuple(t.to(dtype=dtype, device=device) for t in (m1, v1, m2, v2))


def calibrate_tol(dtype):
    t = tol(dtype)
    if dtype == torch.float32:  # x * s + t form vs (x - m1) * s + m2: cancellation at |m1 * s| ~ 10
        t["atol"] = 2e-5
    return t


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 3])
def test_calibrate_matches_oracle(backend, device, dtype, layout, d):
    num_bins = 6
    x, idx = make_features(layout, dtype, device, num_bins, d=d, n=43, seed=20 + d)
    stats = calibration_stats(num_bins, d, stats_dtype(dtype), device)
    before = x.clone()
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    assert got.dtype == dtype and got.shape == x.shape and got.device == x.device
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is not modified
    expected = oracle.calibrate(x, idx, *stats)
    torch.testing.assert_close(got.cpu().double(), expected, **calibrate_tol(dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calibrate_special_rows_exactly_unchanged(backend, device, dtype):
    d = 4
    stats = calibration_stats(6, d, dtype, device)
    x = rand_features(8, d, dtype=dtype, device=device, seed=3)
    idx = torch.tensor([0, 1, 2, -1, 6, 100, 3, 4], device=device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    for row in (0, 1, 3, 4, 5):  # sum(v1) < 1e-10, and indices outside [0, B)
        assert torch.equal(got[row], x[row]), row
    assert torch.equal(got[2, ::2], x[2, ::2])  # dims with v1 == 0
    assert not torch.allclose(got[2, 1::2], x[2, 1::2])
    torch.testing.assert_close(got.cpu().double(), oracle.calibrate(x, idx, *stats), **calibrate_tol(dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("clip_min, clip_max", [(0.1, 10.0), (0.5, 2.0), (0.0, 100.0), (1.0, 1.0)])
def test_calibrate_clips(backend, device, clip_min, clip_max):
    x = rand_features(40, 3, device=device, seed=12)
    idx = rand_bins(40, 5, device=device, seed=13)
    stats = calibration_stats(5, 3, torch.float32, device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats, clip_min=clip_min, clip_max=clip_max)
    expected = oracle.calibrate(x, idx, *stats, clip_min=clip_min, clip_max=clip_max)
    torch.testing.assert_close(got.cpu().double(), expected, **calibrate_tol(torch.float32))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_calibrate_single_bin_and_empty(backend, device):
    m1, v1, m2, v2 = rand_stats(1, 2, device=device)
    x = rand_features(5, 2, device=device)
    idx = torch.zeros(5, dtype=torch.long, device=device)
    got = on(backend, dirfast.ops.calibrate, x, idx, m1, v1, m2, v2)
    torch.testing.assert_close(got.cpu().double(), oracle.calibrate(x, idx, m1, v1, m2, v2),
                               **calibrate_tol(torch.float32))
    x0 = torch.zeros(0, 2, device=device)
    got = on(backend, dirfast.ops.calibrate, x0, idx[:0], m1, v1, m2, v2)
    assert got.shape == (0, 2)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_calibrate_large(backend, device, layout):
    num_bins = 97
    if layout == "rows":
        x = rand_features(20011, 7, device=device, seed=60)
        idx = rand_bins(20011, num_bins + 1, low=-1, device=device, seed=61)
        d = 7
    else:
        x = torch.randn(3, 5, 61, 67, generator=gen(62)).to(device)
        idx = rand_bins((3, 61, 67), num_bins + 1, low=-1, device=device, seed=63)
        d = 5
    stats = calibration_stats(num_bins, d, torch.float32, device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    torch.testing.assert_close(got.cpu().double(), oracle.calibrate(x, idx, *stats), **calibrate_tol(torch.float32))


def _gradcheck_inputs(layout, device, seed):
    """Small float64 inputs (gradcheck perturbs every element twice) with rows in every
    special bin and outside the range; ``x`` requires grad."""
    g = gen(seed)
    if layout == "rows":
        x = torch.randn(9, 3, generator=g, dtype=torch.float64)
        idx = torch.tensor([0, 1, 2, 3, 4, 5, -1, 6, 2])
    else:
        x = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64)
        idx = torch.tensor([[[0, 1, 2, 3], [4, 5, -1, 3]]])
    stats = calibration_stats(6, 3, torch.float64, device)
    return x.to(device).requires_grad_(True), idx.to(device), stats


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_calibrate_gradcheck(backend, device, layout):
    x, idx, stats = _gradcheck_inputs(layout, device, seed=30)

    def fn(inp):
        return on(backend, dirfast.ops.calibrate, inp, idx, *stats)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_calibrate_gradient_is_scale(backend, device, dtype):
    """d out / d x = sqrt(clamp(v2 / v1)) where calibrated, 1 where unchanged."""
    d = 4
    stats = calibration_stats(6, d, torch.float32, device)
    x = rand_features(30, d, dtype=dtype, device=device, seed=14).requires_grad_(True)
    idx = rand_bins(30, 7, low=-1, device=device, seed=15)  # includes -1 and 6 (= B): no bin
    g = rand_features(30, d, dtype=dtype, device=device, seed=16)
    out = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    out.backward(g)
    assert x.grad.dtype == dtype
    expected = g.double().cpu() * oracle.calibrate_scale(idx, stats[1], stats[3], d)
    torch.testing.assert_close(x.grad.cpu().double(), expected, **tol(dtype))


# =========================================================================== calibrate_ (in place)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_calibrate_inplace_equals_out_of_place(backend, device, dtype, layout):
    """calibrate_ writes exactly what calibrate returns into x (every layout, incl. strided
    views, whose untouched neighbours stay as they were) and returns x itself."""
    num_bins, d = 6, 3
    x, idx = make_features(layout, dtype, device, num_bins, d=d, n=41, seed=50)
    stats = calibration_stats(num_bins, d, stats_dtype(dtype), device)
    expected = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    base = x._base if x._base is not None else x
    outside = base.clone()
    got = on(backend, dirfast.ops.calibrate_, x, idx, *stats)
    assert got is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    mask = torch.ones_like(base, dtype=torch.bool)
    mask.as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset()).fill_(False)
    torch.testing.assert_close(base[mask], outside[mask], rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_calibrate_inplace_gradcheck(backend, device, layout):
    """Gradients flow through the in-place form to what x was computed from."""
    x, idx, stats = _gradcheck_inputs(layout, device, seed=51)

    def fn(inp):
        return on(backend, dirfast.ops.calibrate_, inp * 1.0, idx, *stats)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


# =========================================================================== opcheck
def _opcheck_inputs(device):
    g = gen(40)
    x = torch.randn(23, 3, generator=g).to(device)
    idx = torch.randint(-1, 5, (23,), generator=g).to(device)
    xd = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).to(device)
    idxd = torch.randint(-1, 5, (2, 4, 5), generator=g).to(device)
    return [(x, idx), (xd, idxd)]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_bin_stats(device):
    for x, idx in _opcheck_inputs(device):
        torch.library.opcheck(torch.ops.dirfast.bin_stats.default, (x, idx, 5))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_smooth_bins(device):
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(device)
    for stats in (torch.randn(7, 3, device=device), torch.randn(9, dtype=torch.float64, device=device)):
        for padding in PADDINGS:
            torch.library.opcheck(torch.ops.dirfast.smooth_bins.default, (stats, w.to(stats.dtype), padding))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_calibrate(device):
    for x, idx in _opcheck_inputs(device):
        stats = calibration_stats(5, 3, x.dtype, device)
        for requires_grad in (False, True):
            xi = x.clone().requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.dirfast.calibrate.default, (xi, idx, *stats, 0.1, 10.0))
        torch.library.opcheck(torch.ops.dirfast.calibrate_.default, (x.clone(), idx, *stats, 0.1, 10.0))


def test_compile_fullgraph():
    """The fake kernels let torch.compile(fullgraph=True) trace a whole FDS-style step."""
    x = rand_features(20, 3, seed=41)
    idx = rand_bins(20, 5, seed=42)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").float()

    def step(x, idx):
        count, mean, var = dirfast.ops.bin_stats(x, idx, 5)
        m2 = dirfast.ops.smooth_bins(mean, w)
        v2 = dirfast.ops.smooth_bins(var, w)
        return dirfast.ops.calibrate(x, idx, mean, var, m2, v2)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, idx), step(x, idx))
