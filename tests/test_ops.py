"""The op contract on every backend: bin_stats, smooth_bins, calibrate, calibrate_ and
mixture_logpdf against the float64 loop oracle (tests/oracle.py), over the shared layouts and dtypes (tests/testing.py),
with opcheck and torch.compile once per backend.

What is particular to one backend (its paths, its limits, its bitwise guarantees) lives in that
backend's own file; bad arguments are in test_bad_inputs.py.
"""

import pytest
import torch
from scipy.ndimage import convolve1d

import dirfast
import dirfast.reference as reference
import oracle
from testing import (DEVICES, FLOAT_DTYPES, LAYOUTS, backend_device_params, check_bin_stats, features, gen,
                     pairwise, rand_bins, rand_features, rand_stats, stats_dtype, tol)

BACKEND_DEVICE = list(backend_device_params(include_auto=False))
# mixture_logpdf runs on the backends that have a kernel for it (dirfast.backends() says which).
MIXTURE_BACKEND_DEVICE = [p for p in BACKEND_DEVICE
                          if "mixture_logpdf" in dirfast.backends().get(p.values[0], {}).get("ops", ("mixture_logpdf",))]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in FLOAT_DTYPES]
PADDINGS = dirfast.ops.PADDINGS


def on(backend, fn, *args, **kwargs):
    with dirfast.use_backend(backend):
        return fn(*args, **kwargs)


# =========================================================================== bin_stats
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 5])  # 5: a block of four feature planes and one more
def test_bin_stats_layouts(backend, device, dtype, layout, d):
    x, idx = features(layout, dtype, device, num_bins=6, n=41, d=d, seed=d)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, 6), x, idx, 6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("n, d, num_bins", [(1, 1, 1), (2, 1, 1), (7, 5, 1), (37, 3, 1), (129, 17, 11), (300, 2, 97)])
def test_bin_stats_sizes(backend, device, n, d, num_bins):
    x, idx = features("rows", torch.float32, device, num_bins=num_bins, n=n, d=d, seed=n)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, num_bins), x, idx, num_bins)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_bin_stats_special_bins(backend, device):
    """Empty bins, bins of one row, ignored rows, an input whose rows all select no bin, an empty
    input, features of dimension 0, int32 indices."""
    x = rand_features(8, 4, device=device, seed=5)
    idx = torch.tensor([5, 2, 5, 7, -1, 5, 7, 5], device=device)  # bin 2: 1 row; 5: 4; 7: 2
    for index in (idx, idx.int()):
        count, mean, var = on(backend, dirfast.ops.bin_stats, x, index, 9)
        check_bin_stats((count, mean, var), x, idx, 9)
        assert count.tolist() == [0, 0, 1, 0, 0, 4, 0, 2, 0]
        torch.testing.assert_close(mean[2], x[1])
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, torch.tensor([-1, 9, 12, -5, 9, 9, -1, 10], device=device), 9)
    assert count.sum() == 0 and torch.all(mean == 0) and torch.all(var == 0)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x[:0], idx[:0], 4)
    assert count.tolist() == [0] * 4 and mean.shape == (4, 4) and torch.all(mean == 0) and torch.all(var == 0)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x[:, :0], idx, 9)
    assert count.tolist() == [0, 0, 1, 0, 0, 4, 0, 2, 0] and mean.shape == (9, 0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bin_stats_zero_variance_dimension(backend, device, dtype):
    """A dead (all-zero) feature has variance exactly 0 (calibrate then leaves it alone, as the
    published code does); a constant non-zero feature has variance ~0."""
    x = rand_features(30, 4, dtype=dtype, device=device, seed=7)
    x[:, 1] = 0
    x[:, 3] = 0.1
    idx = rand_bins(30, 3, device=device, seed=8)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 3)
    assert torch.all(var[:, 1] == 0) and torch.all(var[:, 3].abs() < 1e-12)
    check_bin_stats((count, mean, var), x, idx, 3)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_accuracy_mean_over_std_1000(backend, device, layout):
    """float32 variance within 1e-4 (relative) of float64 when a bin's mean is 1000 times its
    standard deviation, and the mean within 1e-6."""
    if layout == "rows":
        x, idx = rand_features(2000, 8, device=device, seed=11, shift=1000.0), rand_bins(2000, 4, device=device)
    else:
        x = (torch.randn(2, 8, 40, 25, generator=gen(11)) + 1000.0).to(device)
        idx = rand_bins((2, 40, 25), 4, device=device)
    _, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 4)
    _, e_mean, e_var = oracle.bin_stats(x, idx, 4)  # float64 on the same float32 values
    assert torch.all(e_var > 0.5)
    assert ((var.cpu().double() - e_var).abs() / e_var).max() < 1e-4
    assert ((mean.cpu().double() - e_mean).abs() / e_mean.abs()).max() < 1e-6


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_large(backend, device, layout):
    """Enough elements for the kernels' multi-chunk, multi-program paths and their merges."""
    if layout == "rows":
        x = rand_features(20011, 7, device=device, seed=50, shift=3.0)
        idx = rand_bins(20011, 98, low=-1, device=device, seed=51)
    else:
        x = (torch.randn(3, 5, 61, 67, generator=gen(52)) + 3.0).to(device)
        idx = rand_bins((3, 61, 67), 98, low=-1, device=device, seed=53)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, 97), x, idx, 97, against="reference")


# =========================================================================== smooth_bins
SMOOTH_CASES = [(10, 5), (7, 3), (6, 1), (4, 7), (3, 9), (2, 5), (2, 3), (1, 5), (1, 1), (5, 11), (97, 5)]


def window(ks, seed, symmetric):
    w = torch.rand(ks, generator=gen(seed), dtype=torch.float64) + 0.1
    return (w + w.flip(0)) / 2 if symmetric else w


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype, padding, case", pairwise(FLOAT_DTYPES, PADDINGS, SMOOTH_CASES),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_smooth_bins(backend, device, dtype, padding, case):
    """Tables [B, D], [B] and non-contiguous, asymmetric windows (which pin the orientation:
    a correlation, as F.conv1d) and symmetric ones (scipy's order of summation): float32 and
    float64 give the reference's bits, float16 and bfloat16 its values within their precision."""
    num_bins, ks = case
    g = gen(num_bins)
    for symmetric in (False, True):
        w = window(ks, ks, symmetric).to(device)
        for stats in (torch.randn(num_bins, 3, generator=g), torch.randn(num_bins, generator=g),
                      torch.randn(4, num_bins, generator=g).t()):
            stats = stats.to(dtype=dtype, device=device)
            got = on(backend, dirfast.ops.smooth_bins, stats, w, padding)
            assert got.dtype == dtype and got.shape == stats.shape and got.device == stats.device
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(got.cpu(), reference.smooth_bins(stats.cpu(), w.cpu(), padding))
            torch.testing.assert_close(got.cpu().double(), oracle.smooth_bins(stats, w, padding), **tol(dtype))


def test_oracle_smooth_bins_agrees_with_pad_conv1d():
    """The loop oracle's reflect padding is torch's F.pad reflect where that one works."""
    stats = torch.randn(9, 4, generator=gen(3), dtype=torch.float64)
    w = window(5, seed=2, symmetric=False)
    torch.testing.assert_close(oracle.smooth_bins(stats, w, "reflect"), oracle.fds_smooth_conv1d(stats, w))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_smooth_bins_is_scipy_where_scipy_is_the_definition(backend, device):
    """padding="constant" is the LDS convolution, scipy.ndimage.convolve1d(mode="constant"), and
    "symmetric" its mode="reflect" (the NYUD2-DIR LDS), to the bit in float64; the window may be
    given in float32 or float64; one bin under reflect padding gets the window's sum."""
    base = torch.rand(30, generator=gen(4), dtype=torch.float64) * 50
    w = oracle.lds_window("gaussian", 5, 2)
    for padding, mode in (("constant", "constant"), ("symmetric", "reflect")):
        got = on(backend, dirfast.ops.smooth_bins, base.to(device), torch.as_tensor(w, device=device), padding)
        assert torch.equal(got.cpu(), torch.as_tensor(convolve1d(base.numpy(), weights=w, mode=mode)))
    stats = torch.randn(8, 2, generator=gen(1)).to(device)
    w64 = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(device)
    torch.testing.assert_close(on(backend, dirfast.ops.smooth_bins, stats, w64),
                               on(backend, dirfast.ops.smooth_bins, stats, w64.float()))
    one = torch.tensor([[2.0, -3.0]], dtype=torch.float64, device=device)
    w7 = window(7, seed=9, symmetric=False).to(device)
    torch.testing.assert_close(on(backend, dirfast.ops.smooth_bins, one, w7, "reflect"), one * w7.sum())


# =========================================================================== calibrate
def calibration_stats(num_bins, d, dtype, device="cpu", seed=4):
    """Random statistics with the published special cases in the first bins (num_bins >= 4):
    bin 0: src_var == 0 everywhere (sum < 1e-10: unchanged); bin 1: src_var tiny but not zero,
    summing below 1e-10 (unchanged); bin 2: some dims with src_var == 0 (those unchanged); bin 3:
    ratios far outside [0.1, 10] (clipped)."""
    src_mean, src_var, dst_mean, dst_var = rand_stats(num_bins, d, dtype=torch.float64, seed=seed)
    if num_bins >= 4:
        src_var[0] = 0
        src_var[1] = 1e-12
        src_var[2, ::2] = 0
        src_var[3] = 0.01
        dst_var[3, : (d + 1) // 2] = 5.0  # ratio 500 -> clipped to 10
        dst_var[3, (d + 1) // 2:] = 1e-5  # ratio 1e-3 -> clipped to 0.1
    return tuple(t.to(dtype=dtype, device=device) for t in (src_mean, src_var, dst_mean, dst_var))


def calibrate_tol(dtype):
    t = tol(dtype)
    if dtype == torch.float32:  # x * s + t against (x - m) * s + m: cancellation at |m * s| ~ 10
        t["atol"] = 2e-5
    return t


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [1, 5])
def test_calibrate_layouts(backend, device, dtype, layout, d):
    """The oracle's values, x untouched, and the strides of torch.empty_like(x) (the fake's)."""
    x, idx = features(layout, dtype, device, num_bins=6, n=43, d=d, seed=20 + d)
    stats = calibration_stats(6, d, stats_dtype(dtype), device)
    before = x.clone()
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    assert got.dtype == dtype and got.shape == x.shape and got.stride() == torch.empty_like(x).stride()
    assert torch.equal(x, before)
    torch.testing.assert_close(got.cpu().double(), oracle.calibrate(x, idx, *stats), **calibrate_tol(dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_calibrate_inplace_equals_out_of_place(backend, device, dtype, layout):
    """calibrate_ writes exactly what calibrate returns into x (every layout, strided views
    included, whose untouched neighbours stay as they were) and returns x itself."""
    x, idx = features(layout, dtype, device, num_bins=6, n=41, d=3, seed=50)
    stats = calibration_stats(6, 3, stats_dtype(dtype), device)
    expected = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    base = x._base if x._base is not None else x
    outside = base.clone()
    assert on(backend, dirfast.ops.calibrate_, x, idx, *stats) is x
    assert torch.equal(x, expected)
    mask = torch.ones_like(base, dtype=torch.bool)
    mask.as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset()).fill_(False)
    assert torch.equal(base[mask], outside[mask])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calibrate_special_rows_unchanged(backend, device, dtype):
    stats = calibration_stats(6, 4, dtype, device)
    x = rand_features(8, 4, dtype=dtype, device=device, seed=3)
    idx = torch.tensor([0, 1, 2, -1, 6, 100, 3, 4], device=device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    for row in (0, 1, 3, 4, 5):  # sum(src_var) < 1e-10, and indices outside [0, B)
        assert torch.equal(got[row], x[row]), row
    assert torch.equal(got[2, ::2], x[2, ::2])  # dims with src_var == 0
    assert not torch.allclose(got[2, 1::2], x[2, 1::2])
    torch.testing.assert_close(got.cpu().double(), oracle.calibrate(x, idx, *stats), **calibrate_tol(dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("clip_min, clip_max", [(0.1, 10.0), (0.5, 2.0), (0.0, 100.0), (1.0, 1.0)])
def test_calibrate_clips(backend, device, clip_min, clip_max):
    x, idx = features("dense", torch.float32, device, num_bins=5, d=3, seed=12)
    stats = calibration_stats(5, 3, torch.float32, device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats, clip_min=clip_min, clip_max=clip_max)
    expected = oracle.calibrate(x, idx, *stats, clip_min=clip_min, clip_max=clip_max)
    torch.testing.assert_close(got.cpu().double(), expected, **calibrate_tol(torch.float32))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("x_dtype, table_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float64),
                                                  (torch.float32, torch.float64), (torch.float64, torch.float32),
                                                  (torch.float32, torch.float16)], ids=str)
def test_calibrate_mixed_dtypes(backend, device, x_dtype, table_dtype):
    """The arithmetic is float64 when x or the tables are, float32 otherwise."""
    x, idx = features("rows", x_dtype, device, num_bins=6, n=40, d=3)
    stats = calibration_stats(6, 3, table_dtype, device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    assert got.dtype == x_dtype
    torch.testing.assert_close(got.cpu().double(), oracle.calibrate(x, idx, *stats), **calibrate_tol(x_dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_calibrate_sizes(backend, device):
    """One bin, an empty input, many rows and bins, more bins than rows."""
    for n, d, num_bins in [(5, 2, 1), (1, 1, 1), (20011, 7, 97), (300, 2, 4096)]:
        x = rand_features(n, d, device=device, seed=n)
        idx = rand_bins(n, num_bins + 1, low=-1, device=device, seed=n + 1)
        stats = calibration_stats(num_bins, d, torch.float32, device)
        expected = reference.calibrate(x.cpu(), idx.cpu(), *(t.cpu() for t in stats))
        torch.testing.assert_close(on(backend, dirfast.ops.calibrate, x, idx, *stats).cpu(), expected,
                                   **calibrate_tol(torch.float32))
    x = (torch.randn(3, 5, 61, 67, generator=gen(62))).to(device)
    idx = rand_bins((3, 61, 67), 98, low=-1, device=device, seed=63)
    stats = calibration_stats(97, 5, torch.float32, device)
    torch.testing.assert_close(on(backend, dirfast.ops.calibrate, x, idx, *stats).cpu(),
                               reference.calibrate(x.cpu(), idx.cpu(), *(t.cpu() for t in stats)),
                               **calibrate_tol(torch.float32))
    assert on(backend, dirfast.ops.calibrate, x[:0], idx[:0], *stats).shape == (0, 5, 61, 67)


def gradcheck_inputs(layout, device, seed):
    """Small float64 inputs (gradcheck perturbs every element twice) with rows in every special
    bin and outside the range; ``x`` requires grad."""
    g = gen(seed)
    if layout == "rows":
        x = torch.randn(9, 3, generator=g, dtype=torch.float64)
        idx = torch.tensor([0, 1, 2, 3, 4, 5, -1, 6, 2])
    else:
        x = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64)
        idx = torch.tensor([[[0, 1, 2, 3], [4, 5, -1, 3]]])
        if layout == "dense_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    stats = calibration_stats(6, 3, torch.float64, device)
    return x.to(device).requires_grad_(True), idx.to(device), stats


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense", "dense_channels_last"])
@pytest.mark.parametrize("inplace", [False, True], ids=["calibrate", "calibrate_"])
def test_calibrate_gradcheck(backend, device, layout, inplace):
    """Gradients in x, out of place and through the in-place form (to what x came from)."""
    x, idx, stats = gradcheck_inputs(layout, device, seed=30)

    def fn(inp):
        if inplace:
            return on(backend, dirfast.ops.calibrate_, inp * 1.0, idx, *stats)
        return on(backend, dirfast.ops.calibrate, inp, idx, *stats)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_calibrate_gradient_is_the_scale(backend, device, dtype):
    """d out / d x = sqrt(clamp(dst_var / src_var)) where calibrated, 1 where unchanged."""
    stats = calibration_stats(6, 4, torch.float32, device)
    x = rand_features(30, 4, dtype=dtype, device=device, seed=14).requires_grad_(True)
    idx = rand_bins(30, 7, low=-1, device=device, seed=15)  # includes -1 and 6 (= B): no bin
    g = rand_features(30, 4, dtype=dtype, device=device, seed=16)
    on(backend, dirfast.ops.calibrate, x, idx, *stats).backward(g)
    assert x.grad.dtype == dtype
    expected = g.double().cpu() * oracle.calibrate_scale(idx, stats[1], stats[3], 4)
    torch.testing.assert_close(x.grad.cpu().double(), expected, **tol(dtype))


# =========================================================================== mixture_logpdf
def mixture_inputs(shape, k, dtype, device, seed, table_dtype=None):
    g = gen(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    means = torch.linspace(-4, 4, k, dtype=torch.float64) + 0.1 * torch.randn(k, generator=g, dtype=torch.float64)
    variances = torch.rand(k, generator=g, dtype=torch.float64) * 2 + 0.05
    log_weights = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    table_dtype = table_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    return (x.to(device, dtype), means.to(device, table_dtype), variances.to(device, table_dtype),
            log_weights.to(device, table_dtype))


def check_mixture(backend, inputs, x_tol=None):
    """Value and the four gradients (upstream gradient 1) against the oracle."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = on(backend, dirfast.ops.mixture_logpdf, *leaves)
    expected, expected_grads = oracle.mixture_logpdf(*inputs)
    accumulate = torch.float64 if torch.float64 in [t.dtype for t in inputs] else torch.float32
    assert out.dtype == accumulate and out.shape == inputs[0].shape and out.device == inputs[0].device
    torch.testing.assert_close(out.cpu().double(), expected, **(x_tol or tol(accumulate)))
    with dirfast.use_backend(backend):
        out.backward(torch.ones_like(out))
    for leaf, grad in zip(leaves, expected_grads):
        assert leaf.grad.dtype == leaf.dtype
        scale = max(1.0, float(grad.abs().max()))
        grad_tol = tol(leaf.dtype) if leaf.dtype in (torch.float16, torch.bfloat16) else x_tol or tol(accumulate)
        torch.testing.assert_close(leaf.grad.cpu().double() / scale, grad / scale, **grad_tol)


@pytest.mark.parametrize("backend, device", MIXTURE_BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape, k", [((1,), 1), ((37,), 5), ((300, 1), 100), ((2, 1, 9, 13), 17), ((4100,), 3)])
def test_mixture_logpdf(backend, device, dtype, shape, k):
    check_mixture(backend, mixture_inputs(shape, k, dtype, device, seed=k))


@pytest.mark.parametrize("backend, device", MIXTURE_BACKEND_DEVICE)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixture_logpdf_low_precision_predictions(backend, device, x_dtype):
    """16-bit predictions are read exactly and computed in float32 (the output is float32)."""
    check_mixture(backend, mixture_inputs((2, 1, 5, 7), 9, x_dtype, device, seed=50))


@pytest.mark.parametrize("backend, device", MIXTURE_BACKEND_DEVICE)
def test_mixture_logpdf_layouts(backend, device):
    """Non-contiguous predictions (channels-last depth maps, a transposed view) give the values of
    their contiguous copy, in the predictions' shape."""
    x, m, v, lw = mixture_inputs((2, 3, 6, 5), 7, torch.float32, device, seed=51)
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3), x[:, 1:2]):
        torch.testing.assert_close(on(backend, dirfast.ops.mixture_logpdf, view, m, v, lw),
                                   on(backend, dirfast.ops.mixture_logpdf, view.contiguous(), m, v, lw))
        check_mixture(backend, (view, m, v, lw))


@pytest.mark.parametrize("backend, device", MIXTURE_BACKEND_DEVICE)
def test_mixture_logpdf_special_values(backend, device):
    """Components of weight 0 (log-weight -inf) drop out; predictions far from every component
    (terms of -1e6) stay finite (the log-sum-exp is max-shifted); no elements, no work; every
    weight 0 gives -inf and zero gradients (not NaN)."""
    x, m, v, lw = mixture_inputs((64,), 6, torch.float32, device, seed=52)
    lw = lw.clone()
    lw[[1, 4]] = -torch.inf
    check_mixture(backend, (x, m, v, lw))
    far = torch.tensor([-3000.0, 0.0, 2500.0], dtype=torch.float64, device=device)
    check_mixture(backend, (far, m.double(), v.double(), torch.zeros_like(lw).double()))
    far32 = far.float().requires_grad_()  # float32 terms of -1e6 carry rounding of ~0.1: values only
    out = on(backend, dirfast.ops.mixture_logpdf, far32, m, v, torch.zeros_like(lw))
    torch.testing.assert_close(out.double(), oracle.mixture_logpdf(far, m, v, torch.zeros_like(lw))[0], rtol=1e-6, atol=0)
    with dirfast.use_backend(backend):
        out.sum().backward()
    assert bool(torch.isfinite(far32.grad).all())
    empty = on(backend, dirfast.ops.mixture_logpdf, x[:0], m, v, lw)
    assert empty.shape == (0,)
    xs = x[:5].clone().requires_grad_()
    none = on(backend, dirfast.ops.mixture_logpdf, xs, m, v, torch.full_like(lw, -torch.inf))
    assert bool(torch.isneginf(none).all())
    with dirfast.use_backend(backend):
        none.sum().backward()
    assert torch.equal(xs.grad, torch.zeros_like(xs))


@pytest.mark.parametrize("backend, device", MIXTURE_BACKEND_DEVICE)
def test_mixture_logpdf_gradcheck(backend, device):
    inputs = [t.detach().requires_grad_() for t in mixture_inputs((3, 1, 2, 4), 4, torch.float64, device, seed=53)]
    with dirfast.use_backend(backend):
        assert torch.autograd.gradcheck(dirfast.ops.mixture_logpdf, inputs)


# =========================================================================== opcheck, compile
def op_implementations():
    """Each registered implementation of the ops: the dirfast:: ops on every device (the C++ or
    CUDA kernels, or the reference composite), and the Triton backend's ops."""
    for device in DEVICES:
        yield pytest.param(torch.ops.dirfast, device, id=f"dirfast-{device}")
    triton = dirfast.backends()["triton"]
    marks = [] if triton["available"] else [pytest.mark.skip(reason=f"triton: {triton['reason']}")]
    yield pytest.param("triton", "cuda" if torch.cuda.is_available() else "cpu", id="triton", marks=marks)


OP_NAMES = ("bin_stats", "smooth_bins", "calibrate", "calibrate_", "mixture_logpdf", "mixture_logpdf_backward")


@pytest.mark.parametrize("ops, device", list(op_implementations()))
def test_opcheck(ops, device):
    """torch.library.opcheck: schemas, fake kernels, autograd registration and aliasing."""
    if ops == "triton":
        from dirfast import triton as _  # noqa: F401  (registers the ops)

        names = {name: f"triton_{name}" for name in OP_NAMES}
        ops = torch.ops.dirfast
    else:
        names = {name: name for name in OP_NAMES}
    g = gen(40)
    cases = [(torch.randn(23, 3, generator=g), torch.randint(-1, 5, (23,), generator=g)),
             (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), torch.randint(-1, 5, (2, 4, 5), generator=g)),
             (torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
              torch.randint(-1, 5, (2, 4, 5), generator=g, dtype=torch.int32))]
    for x, idx in cases:
        x, idx = x.to(device), idx.to(device)
        torch.library.opcheck(getattr(ops, names["bin_stats"]).default, (x, idx, 5))
        stats = calibration_stats(5, 3, stats_dtype(x.dtype), device)
        for requires_grad in (False, True):
            args = (x.clone().requires_grad_(requires_grad), idx, *stats, 0.1, 10.0)
            torch.library.opcheck(getattr(ops, names["calibrate"]).default, args)
        torch.library.opcheck(getattr(ops, names["calibrate_"]).default, (x.clone(), idx, *stats, 0.1, 10.0))
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(device)
    for stats in (torch.randn(7, 3, device=device), torch.randn(9, dtype=torch.float64, device=device)):
        for padding in PADDINGS:
            torch.library.opcheck(getattr(ops, names["smooth_bins"]).default, (stats, w.to(stats.dtype), padding))
    for shape, dtype in (((11,), torch.float32), ((2, 1, 3, 4), torch.float64), ((5, 3), torch.float16)):
        x, m, v, lw = mixture_inputs(shape, 6, dtype, device, seed=43)
        torch.library.opcheck(getattr(ops, names["mixture_logpdf"]).default, (x.requires_grad_(), m, v, lw))
        out = getattr(ops, names["mixture_logpdf"])(x.detach(), m, v, lw)
        torch.library.opcheck(getattr(ops, names["mixture_logpdf_backward"]).default,
                              (torch.ones_like(out), x.detach(), out, m, v, lw))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_compile_fullgraph(backend, device):
    """The fake kernels let torch.compile(fullgraph=True) trace a whole FDS step, in-place
    calibration and backward included, on every backend."""
    x = rand_features(20, 3, seed=41, device=device)
    idx = rand_bins(20, 5, seed=42, device=device)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").float().to(device)

    def step(x, idx):
        count, mean, var = dirfast.ops.bin_stats(x, idx, 5)
        m2, v2 = dirfast.ops.smooth_bins(mean, w), dirfast.ops.smooth_bins(var, w)
        y = x * 2.0
        return dirfast.ops.calibrate(x, idx, mean, var, m2, v2), dirfast.ops.calibrate_(y, idx, mean, var, m2, v2)

    with dirfast.use_backend(backend):
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        got = compiled(x, idx)
        expected = step(x, idx)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend, device", MIXTURE_BACKEND_DEVICE)
def test_compile_fullgraph_mixture(backend, device):
    """Balanced MSE's balancing term, forward and backward, traced whole by torch.compile."""
    x, m, v, lw = mixture_inputs((2, 1, 4, 5), 8, torch.float32, device, seed=44)
    noise = torch.tensor(0.5, device=device)

    def step(x, noise):
        return dirfast.ops.mixture_logpdf(x, m, v + noise, lw).mean()

    grads = []
    with dirfast.use_backend(backend):
        for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
            xs, ns = x.clone().requires_grad_(), noise.clone().requires_grad_()
            loss = fn(xs, ns)
            loss.backward()
            grads.append((loss.detach(), xs.grad, ns.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
