"""``dirfast::smooth_bins``: the contract every backend meets, against a float64 loop oracle, the
reference's bits and scipy where scipy is the definition; then what only the compiled kernels
promise (the reference's bits in 16-bit dtypes too).

Bad arguments are in test_bad_inputs.py; opcheck and torch.compile in test_backends.py.
"""

import functools
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import convolve1d

import dirfast
from dirfast.ops.smooth_bins import PADDINGS, reference
from testing import FLOAT_DTYPES, backend_device_params, dtype_params, gen, on, pairwise, same_bits, tol

BACKEND_DEVICE = list(backend_device_params())


# =========================================================================== the oracle
def reflect_index(j: int, num_bins: int) -> int:
    """torch F.pad ``reflect`` (edge not repeated), applied again and again if needed."""
    if num_bins == 1:
        return 0
    while j < 0 or j >= num_bins:
        if j < 0:
            j = -j
        if j >= num_bins:
            j = 2 * (num_bins - 1) - j
    return j


def _window_values(window) -> list:
    if isinstance(window, torch.Tensor):
        return window.detach().cpu().double().tolist()
    return [float(v) for v in np.asarray(window, dtype=np.float64)]


def loop_smooth_bins(stats: torch.Tensor, window, padding: str = "reflect") -> torch.Tensor:
    """``out[b] = sum_k window[k] * stats[b + k - h]`` with the four paddings, in float64, tap by
    tap."""
    s = stats.detach().cpu().double()
    w = _window_values(window)
    squeeze = s.dim() == 1
    if squeeze:
        s = s.unsqueeze(1)
    num_bins, ks = s.shape[0], len(w)
    h = (ks - 1) // 2
    out = torch.zeros_like(s)
    for b in range(num_bins):
        for k in range(ks):
            j = b + k - h
            if 0 <= j < num_bins:
                src = j
            elif padding == "constant":
                continue
            elif padding == "replicate":
                src = min(max(j, 0), num_bins - 1)
            elif padding == "reflect":
                src = reflect_index(j, num_bins)
            elif padding == "symmetric":  # scipy.ndimage "reflect": d c b a | a b c d | d c b a
                src = j % (2 * num_bins)
                src = src if src < num_bins else 2 * num_bins - 1 - src
            else:
                raise ValueError(padding)
            out[b] += w[k] * s[src]
    return out.squeeze(1) if squeeze else out


def fds_smooth_conv1d(stats: torch.Tensor, window) -> torch.Tensor:
    """The published smoothing of ``[K, D]`` running stats: F.pad reflect + conv1d, in float64
    (needs h < K, like the published code)."""
    w = torch.tensor(_window_values(window), dtype=torch.float64)
    h = (w.numel() - 1) // 2
    s = stats.detach().cpu().double()
    return F.conv1d(F.pad(s.unsqueeze(1).permute(2, 1, 0), pad=(h, h), mode="reflect"),
                    weight=w.view(1, 1, -1), padding=0).permute(2, 1, 0).squeeze(1)


def window(ks, seed, symmetric):
    w = torch.rand(ks, generator=gen(seed), dtype=torch.float64) + 0.1
    return (w + w.flip(0)) / 2 if symmetric else w


def test_oracle_agrees_with_pad_conv1d():
    """The loop oracle's reflect padding is torch's F.pad reflect where that one works."""
    stats = torch.randn(9, 4, generator=gen(3), dtype=torch.float64)
    w = window(5, seed=2, symmetric=False)
    torch.testing.assert_close(loop_smooth_bins(stats, w, "reflect"), fds_smooth_conv1d(stats, w))


# =========================================================================== every backend
SMOOTH_CASES = [(10, 5), (7, 3), (6, 1), (4, 7), (3, 9), (2, 5), (2, 3), (1, 5), (1, 1), (5, 11), (97, 5)]


@functools.lru_cache(maxsize=None)
def _tables(dtype, padding, case):
    """(table, window, the oracle's float64 result): tables [B, D], [B] and non-contiguous, with
    an asymmetric and a symmetric window of each length."""
    num_bins, ks = case
    g = gen(num_bins)
    out = []
    for symmetric in (False, True):
        w = window(ks, ks, symmetric)
        for stats in (torch.randn(num_bins, 3, generator=g), torch.randn(num_bins, generator=g),
                      torch.randn(4, num_bins, generator=g).t()):
            stats = stats.to(dtype)
            out.append((stats, w, loop_smooth_bins(stats, w, padding)))
    return out


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype, padding, case", pairwise(FLOAT_DTYPES, PADDINGS, SMOOTH_CASES),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_values_and_bits(backend, device, dtype, padding, case):
    """Tables [B, D], [B] and non-contiguous, windows wider than the bins, asymmetric windows
    (which pin the orientation: a correlation, as F.conv1d) and symmetric ones (scipy's order of
    summation): float32 and float64 give the reference's bits, float16 and bfloat16 the oracle's
    values within their precision; the result has the dtype, shape and device of the table."""
    for stats, w, expected in _tables(dtype, padding, case):
        stats, w = stats.to(device), w.to(device)
        got = on(backend, dirfast.ops.smooth_bins, stats, w, padding)
        assert got.dtype == dtype and got.shape == stats.shape and got.device == stats.device
        if dtype in (torch.float32, torch.float64):
            same_bits(got, reference(stats.cpu(), w.cpu(), padding))
        torch.testing.assert_close(got.cpu().double(), expected, **tol(dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("num_bins, dim, width", [(9, 3, 5), (7, None, 3), (3, 2, 9)], ids=["rows", "1d", "wide"])
def test_gradients(backend, device, padding, num_bins, dim, width):
    """Differentiable in ``stats`` and ``window`` (float64 gradcheck, a window wider than the bins
    included), on the backend of the forward."""
    g = gen(32)
    stats = torch.randn((num_bins,) if dim is None else (num_bins, dim), generator=g, dtype=torch.float64)
    window = torch.rand(width, generator=g, dtype=torch.float64)
    inputs = (stats.to(device).requires_grad_(), window.to(device).requires_grad_())
    assert torch.autograd.gradcheck(lambda s, w: on(backend, dirfast.ops.smooth_bins, s, w, padding), inputs)


@pytest.mark.parametrize("padding", PADDINGS)
def test_backward_in_blocks_of_taps(padding, monkeypatch):
    """The backward takes the window's taps in blocks of a bounded size: blocks of 2 taps here (7
    taps over 5 bins, the last block of one) give the float64 gradcheck's gradients."""
    module = importlib.import_module("dirfast.ops.smooth_bins")
    monkeypatch.setattr(module, "_BACKWARD_ELEMENTS", 2 * 5 * 3)
    g = gen(33)
    inputs = (torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_(),
              torch.rand(7, generator=g, dtype=torch.float64).requires_grad_())
    assert torch.autograd.gradcheck(lambda s, w: dirfast.ops.smooth_bins(s, w, padding), inputs)
    empty = torch.zeros(5, 0, dtype=torch.float64, requires_grad=True)  # no products: zero gradients
    grads = torch.autograd.grad(dirfast.ops.smooth_bins(empty, inputs[1], padding).sum(), (empty, inputs[1]))
    assert grads[0].shape == (5, 0) and torch.equal(grads[1], torch.zeros_like(inputs[1]))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_constant_padding_passes_no_gradient_through_the_zeros(backend, device):
    """With "constant" padding a tap outside the bins reads a zero: an infinite statistic or a NaN
    tap there adds nothing to the gradients (the products with the zeros were NaN)."""
    stats = torch.tensor([1.0, 2.0, float("inf")], dtype=torch.float64, device=device, requires_grad=True)
    window = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64, device=device, requires_grad=True)
    grad_stats, grad_window = torch.autograd.grad(on(backend, dirfast.ops.smooth_bins, stats, window, "constant").sum(),
                                                  (stats, window))
    assert grad_window.tolist() == [3.0, float("inf"), float("inf")] and grad_stats.tolist() == [0.75, 1.0, 0.75]
    wide = torch.full((9,), 0.1, dtype=torch.float64, device=device)
    wide[0] = float("nan")  # reads 4 bins to the left: only zeros, for 2 bins
    stats = torch.tensor([1.0, 2.0], dtype=torch.float64, device=device, requires_grad=True)
    (grad_stats,) = torch.autograd.grad(on(backend, dirfast.ops.smooth_bins, stats, wide.requires_grad_(), "constant")
                                        .nan_to_num().sum(), (stats,))
    assert torch.isfinite(grad_stats).all()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_scipy_where_scipy_is_the_definition(backend, device):
    """padding="constant" is the LDS convolution, scipy.ndimage.convolve1d(mode="constant"), and
    "symmetric" its mode="reflect" (the NYUD2-DIR LDS), to the bit in float64; the window may be
    given in float32 or float64; one bin under reflect padding gets the window's sum."""
    base = torch.rand(30, generator=gen(4), dtype=torch.float64) * 50
    for w in (dirfast.kernel_window("gaussian", 5, 2.0), window(7, seed=8, symmetric=True)):  # LDS's, and another
        for padding, mode in (("constant", "constant"), ("symmetric", "reflect")):
            got = on(backend, dirfast.ops.smooth_bins, base.to(device), w.to(device), padding)
            assert torch.equal(got.cpu(), torch.as_tensor(convolve1d(base.numpy(), weights=w.numpy(), mode=mode)))
    stats = torch.randn(8, 2, generator=gen(1)).to(device)
    w64 = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(device)
    torch.testing.assert_close(on(backend, dirfast.ops.smooth_bins, stats, w64),
                               on(backend, dirfast.ops.smooth_bins, stats, w64.float()))
    one = torch.tensor([[2.0, -3.0]], dtype=torch.float64, device=device)
    w7 = window(7, seed=9, symmetric=False).to(device)
    torch.testing.assert_close(on(backend, dirfast.ops.smooth_bins, one, w7, "reflect"), one * w7.sum())


def test_window_moves_to_the_stats_device_but_meta_holds_no_values():
    """A window is moved to the device of ``stats``; one on the meta device is refused (it has no
    values to move), unless ``stats`` is on meta too, where only shapes are computed."""
    stats, window = torch.randn(6, 2, generator=gen(6)), torch.ones(3) / 3
    with pytest.raises(ValueError, match="window is on the meta device"):
        dirfast.ops.smooth_bins(stats, window.to("meta"))
    out = dirfast.ops.smooth_bins(stats.to("meta"), window.to("meta"))
    assert out.is_meta and out.shape == stats.shape


@pytest.mark.parametrize("padding", PADDINGS)
def test_reference_memory_does_not_grow_with_the_window(padding):
    """The reference reads one tap of every bin at a time: a window far wider than the bins (LDS
    allows ks up to 2^20 - 1 over any bins) needed a [B, ks] table (27 GB at 1,000 bins). Its
    largest allocation (torch's CPU allocator, as the profiler records it) stays a few [B, D]
    rows, and its result is the loop oracle's."""
    from torch.profiler import ProfilerActivity, profile

    stats = torch.randn(16, 64, generator=gen(11), dtype=torch.float64)
    w = window(513, seed=12, symmetric=True)  # a [B, ks] table: 4 MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = reference(stats, w, padding)
    largest = max(event.cpu_memory_usage for event in prof.events() if event.name.startswith("aten::"))
    assert 0 < largest <= 4 * stats.numel() * 8, f"largest allocation {largest} bytes"
    torch.testing.assert_close(got, loop_smooth_bins(stats, w, padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, device", [p for p in backend_device_params(include_auto=False)
                                             if p.values[0] != "reference"])
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("padding", PADDINGS)
def test_kernels_give_the_reference_bits_in_every_dtype(backend, device, dtype, padding):
    """Every kernel rounds every operation to the dtype as the reference does, so float16 and
    bfloat16 tables get its bits too (Triton computes in float32 and rounds after each operation;
    it had kept float32 throughout); pairs of unequal taps take two products and a sum, each
    rounded (no fused multiply-add)."""
    g = gen(5)
    asymmetric = torch.tensor([0.05, 0.2, 0.3, 0.25, 0.1, 0.07, 0.03], dtype=torch.float64)
    for num_bins, ks in ((100, 5), (10, 5), (7, 9), (4, 7), (3, 11), (1, 3), (40, 1)):
        for w in (torch.rand(ks, generator=g, dtype=torch.float64) + 0.1, dirfast.kernel_window("gaussian", ks, 2.0),
                  asymmetric):
            stats = torch.randn(num_bins, 33, generator=g).to(dtype)
            for table in (stats, stats[:, 0]):
                got = on(backend, dirfast.ops.smooth_bins, table.to(device), w.to(device), padding)
                same_bits(got, reference(table, w, padding))
