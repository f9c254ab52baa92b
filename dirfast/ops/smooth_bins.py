"""``dirfast::smooth_bins``: convolution of per-bin statistics with a window along the bins.

Kernels: the reference below; ``csrc/cpu/smooth_bins.cpp``; ``csrc/cuda/smooth_bins.cu``;
``dirfast/triton/smooth_bins.py``.
"""

from __future__ import annotations

import torch

from . import _checks, _common, _dispatch
from ._common import PADDINGS

SCHEMA = 'smooth_bins(Tensor stats, Tensor window, str padding="reflect") -> Tensor'


def smooth_bins(stats: torch.Tensor, window: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
    """Smooth ``stats`` (``[B]`` or ``[B, D]``) along the bin axis with ``window``.

    ``out[b] = sum_k window[k] * stats[b + k - h]`` with ``h = (len(window) - 1) // 2``.
    ``padding`` says what lies beyond the bins: ``"reflect"`` mirrors without repeating the edge
    bin, as ``torch.nn.functional.pad`` (FDS), and keeps mirroring when the window is wider
    than the bins; ``"constant"`` is zero, as ``scipy.ndimage.convolve1d(mode="constant")``
    (LDS); ``"symmetric"`` mirrors repeating the edge bin, as scipy.ndimage's ``"reflect"``
    (the NYUD2-DIR LDS); ``"replicate"`` repeats the edge bin. The result has the dtype of
    ``stats`` and is computed in it, unlike the other ops (float16 and bfloat16 round after every
    operation, as torch's arithmetic in them: LDS and FDS smooth float64 and float32 tables).
    ``window`` is moved to the device of ``stats``; a window on the meta device, which holds no
    values, is refused unless ``stats`` is there too. Differentiable in ``stats`` and ``window``
    (first derivatives).
    """
    _checks.floating("stats", stats)
    _checks.floating("window", window)
    if stats.dim() not in (1, 2) or stats.shape[0] == 0:
        raise ValueError(f"stats must be [B] or [B, D] with B >= 1, got shape {tuple(stats.shape)}")
    if window.dim() != 1 or window.shape[0] % 2 == 0:
        raise ValueError(f"window must be 1-D with an odd length, got shape {tuple(window.shape)}")
    if window.is_meta and not stats.is_meta:
        raise ValueError(f"window is on the meta device, which holds no values to read (stats are on {stats.device})")
    _checks.choice("padding", padding, PADDINGS)
    return _dispatch.call("smooth_bins", stats.device, stats, window.to(stats.device), padding)


def source_bins(num_bins: int, offset: int | torch.Tensor, padding: str, device=None):
    """The bin each output bin's tap at ``offset`` reads (``[num_bins]``), and whether it is inside;
    ``offset`` may be a ``[taps, 1]`` tensor of offsets, for ``[taps, num_bins]`` results.

    Output bin ``b`` reads bin ``b + offset``. Outside the range: ``"reflect"`` mirrors without
    repeating the edge, as often as needed when the window is wider than the bins;
    ``"symmetric"`` mirrors repeating the edge; ``"replicate"`` repeats the edge; ``"constant"``
    reads zero. A tap, or a block of taps, at a time: a window far wider than the bins (ks 2^20 -
    1) needs no ``[num_bins, ks]`` table.
    """
    j = torch.arange(num_bins, device=device) + offset
    inside = (j >= 0) & (j < num_bins)
    if padding == "reflect":
        if num_bins == 1:
            j = torch.zeros_like(j)
        else:
            period = 2 * (num_bins - 1)
            j = torch.remainder(j, period)
            j = torch.where(j >= num_bins, period - j, j)
    elif padding == "symmetric":
        period = 2 * num_bins
        j = torch.remainder(j, period)
        j = torch.where(j >= num_bins, period - 1 - j, j)
    else:
        j = j.clamp(0, num_bins - 1)
    return j, inside


def reference(stats: torch.Tensor, window: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
    """The definition, in PyTorch: a correlation along the bins (as ``F.conv1d``; the DIR windows
    are symmetric, so it is also scipy's convolution).

    The taps are summed in the order scipy.ndimage uses (centre first, then mirrored pairs from
    the outside in, each pair added before it is weighted when the window is symmetric there),
    so LDS reproduces scipy's float64 results bit for bit, which its integer truncation quirk
    depends on.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    num_bins, ks = stats.shape[0], window.shape[0]
    h = (ks - 1) // 2
    w = window.to(device=stats.device, dtype=stats.dtype)
    # "constant" reads a row of zeros appended after the last bin where a tap falls outside
    padded = torch.cat([stats, stats.new_zeros((1,) + stats.shape[1:])]) if padding == "constant" else stats

    def tap(offset: int) -> torch.Tensor:  # [B] or [B, D]: what each bin's tap at offset reads
        src, inside = source_bins(num_bins, offset, padding, stats.device)
        return padded[src] if padding != "constant" else padded[torch.where(inside, src, num_bins)]

    # scipy treats the window as symmetric where mirrored taps differ by at most DBL_EPSILON.
    w64 = window.to(device=stats.device, dtype=torch.float64)
    symmetric = (w64[:h].flip(0) - w64[h + 1:]).abs() <= 2.0 ** -52
    out = tap(0) * w[h]
    for j in range(h, 0, -1):  # a loop over window taps (a handful), never over bins
        left, right = tap(-j), tap(j)
        paired = (left + right) * w[h + j]
        separate = left * w[h - j] + right * w[h + j]
        out = out + torch.where(symmetric[j - 1], paired, separate)
    return out


def _fake(stats, window, padding="reflect"):
    return torch.empty_like(stats)


def _triton(stats, window, padding="reflect"):
    from ..triton import smooth_bins as kernels

    return kernels.smooth_bins(stats, window, padding)


_common.define(SCHEMA, reference, _fake, _triton)


# -------------------------------------------------------------------------------- autograd
# out[b] = sum_k window[k] * stats[src_k(b)] (0 where a "constant" tap falls outside), so the
# gradient in stats adds window[k] * grad[b] into src_k(b), and the gradient in window[k] is
# sum_b stats[src_k(b)] * grad[b]. In PyTorch, in float32 (float64 for float64 inputs), the same
# on every backend: the taps in blocks of at most _BACKWARD_ELEMENTS products (one tap at a time
# where a tap alone has more), so a window of thousands of taps is not a Python loop over them,
# nor a [B, ks, D] table (benchmarks/results/cpu/smooth-bins-backward-xeon.md).
_BACKWARD_ELEMENTS = 1 << 18


def _save(ctx, inputs, output) -> None:
    stats, window, padding = inputs
    ctx.save_for_backward(stats, window)
    ctx.padding = padding


def _backward(ctx, grad):
    stats, window = ctx.saved_tensors
    acc = _common.acc_dtype(stats.dtype, window.dtype)
    num_bins, ks = stats.shape[0], window.shape[0]
    h = (ks - 1) // 2
    values = stats.to(acc).reshape(num_bins, -1)  # [B, D], D = 1 for [B] statistics
    grad = grad.to(acc).reshape(num_bins, -1)
    weights = window.to(device=stats.device, dtype=acc)
    grad_stats = torch.zeros_like(values)
    grad_window = torch.empty(ks, dtype=acc, device=stats.device)
    block = max(1, _BACKWARD_ELEMENTS // max(values.numel(), 1))  # [B, 0] statistics: one block
    for k0 in range(0, ks, block):
        k1 = min(ks, k0 + block)
        offsets = torch.arange(k0 - h, k1 - h, device=stats.device).unsqueeze(1)
        src, inside = source_bins(num_bins, offsets, ctx.padding, stats.device)  # [taps, B]
        to_stats, to_window = weights[k0:k1, None, None] * grad, values[src] * grad  # [taps, B, D]
        if ctx.padding == "constant":  # a tap outside reads a zero: it passes no gradient, whatever it holds
            to_stats = torch.where(inside.unsqueeze(2), to_stats, 0.0)
            to_window = torch.where(inside.unsqueeze(2), to_window, 0.0)
        grad_stats.index_add_(0, src.reshape(-1), to_stats.reshape(src.numel(), values.shape[1]))
        grad_window[k0:k1] = to_window.sum(dim=(1, 2))
    return grad_stats.reshape(stats.shape).to(stats.dtype), grad_window.to(window.dtype), None


_dispatch.register_autograd("smooth_bins", _save, _backward)
