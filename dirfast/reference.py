"""Pure-PyTorch definitions of the three dirfast ops.

These are the oracle the compiled and Triton kernels are tested against, and the fallback
on any device where no kernel is built. They are vectorised (no Python loop over bins or
samples) and numerically careful, but make no attempt at the single-pass speed of the kernels.

Shapes: ``x`` is ``[N, D]`` with ``bin_idx`` ``[N]``, or dense ``[B, C, *spatial]`` with
``bin_idx`` ``[B, *spatial]`` (features along dim 1, as in depth maps). An index outside
``[0, num_bins)`` selects no bin: that row is ignored by :func:`bin_stats` and left unchanged
by :func:`calibrate`. Arguments are validated by :mod:`dirfast.ops`, not here.
"""

from __future__ import annotations

import torch

__all__ = ["bin_stats", "smooth_bins", "calibrate", "calibrate_", "mixture_logpdf", "mixture_logpdf_backward",
           "accumulate_dtype", "mixture_dtype", "m2_from_var", "var_from_m2"]



def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, D]``. Dense input is moved to channels-last, which copies unless the
    tensor is already channels-last: fine for the oracle, which the kernels avoid."""
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _bin_rows(bin_idx: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Flattened bin indices with every out-of-range index sent to a spare bin ``num_bins``."""
    idx = bin_idx.reshape(-1).long()
    return torch.where((idx >= 0) & (idx < num_bins), idx, num_bins)


def bin_stats(x: torch.Tensor, bin_idx: torch.Tensor, num_bins: int):
    """Per-bin count, mean and unbiased variance of the rows of ``x``.

    Returns ``(count int64 [num_bins], mean [num_bins, D], var [num_bins, D])``. The variance is
    0 where a bin holds fewer than two rows, the mean 0 where it holds none.

    Uses the corrected two-pass algorithm (Chan, Golub and LeVeque): a first pass for the mean,
    then sums of the deviations ``d`` and of ``d**2``; ``var = (S2 - S1**2 / n) / (n - 1)``
    cancels the error of the first-pass mean, so float32 keeps its accuracy even when a bin's
    mean is thousands of times its standard deviation.
    """
    acc = accumulate_dtype(x.dtype)
    rows = _rows(x).to(acc)
    idx = _bin_rows(bin_idx, num_bins)
    dim = rows.shape[1]

    count = torch.zeros(num_bins + 1, dtype=torch.int64, device=x.device)
    count.index_add_(0, idx, torch.ones_like(idx))
    n = count.to(acc).unsqueeze(1)

    total = torch.zeros(num_bins + 1, dim, dtype=acc, device=x.device).index_add_(0, idx, rows)
    mean0 = total / n.clamp(min=1)
    dev = rows - mean0[idx]
    s1 = torch.zeros_like(total).index_add_(0, idx, dev)
    s2 = torch.zeros_like(total).index_add_(0, idx, dev * dev)

    mean = mean0 + s1 / n.clamp(min=1)
    var = ((s2 - s1 * s1 / n.clamp(min=1)) / (n - 1).clamp(min=1)).clamp(min=0)
    var = torch.where(n > 1, var, torch.zeros_like(var))
    return count[:num_bins], mean[:num_bins], var[:num_bins]


def m2_from_var(count: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-bin sums of squared deviations ``M2`` from the unbiased ``var`` of ``count`` rows."""
    return var * (count.to(var.dtype) - 1).clamp(min=0).unsqueeze(1)


def var_from_m2(count: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """The unbiased variance ``M2 / (n - 1)`` of each bin, 0 where it holds fewer than two rows."""
    n = count.to(m2.dtype).unsqueeze(1)
    return torch.where(n > 1, m2 / (n - 1).clamp(min=1), torch.zeros_like(m2))


def padded_indices(num_bins: int, ks: int, padding: str, device=None):
    """``[num_bins, ks]`` source bins of each window tap, and whether the tap is inside.

    Tap ``k`` of output bin ``b`` reads bin ``b + k - h``. Outside the range: ``"reflect"``
    mirrors without repeating the edge (``torch.nn.functional.pad``), as often as needed when the
    window is wider than the bins; ``"symmetric"`` mirrors repeating the edge (scipy.ndimage's
    "reflect"); ``"replicate"`` repeats the edge; ``"constant"`` reads zero.
    """
    h = (ks - 1) // 2
    j = torch.arange(num_bins, device=device).unsqueeze(1) + torch.arange(ks, device=device) - h
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


def smooth_bins(stats: torch.Tensor, window: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
    """Convolve ``stats`` (``[B]`` or ``[B, D]``) with ``window`` along the bin axis.

    ``out[b] = sum_k window[k] * stats[b + k - h]`` (a correlation, as ``F.conv1d``; the DIR
    windows are symmetric, so it is also scipy's convolution). The taps are summed in the order
    scipy.ndimage uses (centre first, then mirrored pairs from the outside in, each pair added
    before it is weighted when the window is symmetric there), so LDS reproduces scipy's
    float64 results bit for bit, which its integer truncation quirk depends on.
    """
    num_bins, ks = stats.shape[0], window.shape[0]
    h = (ks - 1) // 2
    w = window.to(device=stats.device, dtype=stats.dtype)
    src, inside = padded_indices(num_bins, ks, padding, stats.device)
    taps = stats[src]  # [B, ks] or [B, ks, D]
    if padding == "constant":
        mask = inside if stats.dim() == 1 else inside.unsqueeze(-1)
        taps = torch.where(mask, taps, torch.zeros((), dtype=stats.dtype, device=stats.device))
    # scipy treats the window as symmetric where mirrored taps differ by at most DBL_EPSILON.
    w64 = window.to(device=stats.device, dtype=torch.float64)
    symmetric = (w64[:h].flip(0) - w64[h + 1:]).abs() <= 2.0 ** -52
    out = taps[:, h] * w[h]
    for j in range(h, 0, -1):  # a loop over window taps (a handful), never over bins
        left, right = taps[:, h - j], taps[:, h + j]
        paired = (left + right) * w[h + j]
        separate = left * w[h - j] + right * w[h + j]
        out = out + torch.where(symmetric[j - 1], paired, separate)
    return out


def scale_shift(src_mean, src_var, dst_mean, dst_var, clip_min: float, clip_max: float, acc=None):
    """Per-bin ``(s, t)`` with ``calibrate(x) = x * s + t``, the published rules included.

    ``s = sqrt(clamp(dst_var / src_var, clip_min, clip_max))`` and ``t = dst_mean - src_mean * s``;
    a bin whose ``src_var`` sums below 1e-10 is left alone (``s = 1, t = 0``), and so is every
    dimension where ``src_var == 0``.
    """
    acc = acc or accumulate_dtype(src_mean.dtype)
    src_mean, src_var, dst_mean, dst_var = (t.to(acc) for t in (src_mean, src_var, dst_mean, dst_var))
    keep = (src_var.sum(dim=1, keepdim=True) < 1e-10) | (src_var == 0)
    s = torch.sqrt(torch.clamp(dst_var / torch.where(keep, torch.ones_like(src_var), src_var), clip_min, clip_max))
    s = torch.where(keep, torch.ones_like(s), s)
    t = torch.where(keep, torch.zeros_like(src_mean), dst_mean - src_mean * s)
    return s, t


def calibrate(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1, clip_max: float = 10.0):
    """Whiten each row with its bin's ``(src_mean, src_var)`` and re-colour it with
    ``(dst_mean, dst_var)``.

    Differentiable in ``x`` through ordinary autograd. Rows whose index selects no bin are
    returned unchanged.
    """
    num_bins = src_mean.shape[0]
    acc = torch.promote_types(accumulate_dtype(x.dtype), accumulate_dtype(src_mean.dtype))
    s, t = scale_shift(src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, acc)
    # One identity row for indices outside [0, num_bins).
    s = torch.cat([s, torch.ones_like(s[:1])])
    t = torch.cat([t, torch.zeros_like(t[:1])])
    idx = _bin_rows(bin_idx, num_bins).reshape(bin_idx.shape)
    if x.dim() == 2:
        s_rows, t_rows = s[idx], t[idx]
    else:  # dense: gather [B, *spatial, C] and move C next to the batch axis (views only)
        s_rows, t_rows = s[idx].movedim(-1, 1), t[idx].movedim(-1, 1)
    out = torch.empty_like(x)  # the strides of the fake kernel
    out.copy_(x.to(s.dtype) * s_rows + t_rows)
    return out


def calibrate_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1,
               clip_max: float = 10.0) -> None:
    """:func:`calibrate` written into ``x``."""
    x.copy_(calibrate(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max))


def mixture_dtype(*tensors) -> torch.dtype:
    """The dtype mixture_logpdf computes and returns in: float64 when any input is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _mixture_chunks(x, means, variances, log_weights):
    """(flat x in the arithmetic dtype, per-component terms as a function of an x chunk, chunk
    length): the [chunk, K] matrix of ``log w_k - log(v_k) / 2 - (x - m_k)^2 / (2 v_k)`` is built
    a bounded number of elements at a time."""
    acc = mixture_dtype(x, means, variances, log_weights)
    m, v, lw = means.to(acc), variances.to(acc), log_weights.to(acc)
    const = lw - 0.5 * torch.log(v)

    def terms(xs):
        return const - 0.5 * (xs.unsqueeze(1) - m) ** 2 / v

    return x.reshape(-1).to(acc), terms, max(1, (1 << 22) // max(m.shape[0], 1))


def mixture_logpdf(x, means, variances, log_weights):
    """``log sum_k w_k N(x; m_k, v_k) + log(2 pi) / 2`` for every element of ``x`` (any shape), with
    ``w_k = exp(log_weights[k])``; float32 (float64 when an input is). The log-sum-exp over the K
    components, element by element, that Balanced MSE's BNI and GAI terms need."""
    flat, terms, chunk = _mixture_chunks(x, means, variances, log_weights)
    out = torch.cat([_log_sum_exp(terms(part)) for part in flat.split(chunk)]) if flat.numel() else flat
    return out.reshape(x.shape)


def _log_sum_exp(terms):
    """logsumexp over dim 1, whose gradient is 0 (not NaN) in a row of -inf terms (density 0)."""
    none = torch.isneginf(terms.amax(1))
    return torch.where(none, -torch.inf, torch.logsumexp(torch.where(none.unsqueeze(1), 0, terms), dim=1))


def mixture_logpdf_backward(grad, x, out, means, variances, log_weights):
    """The gradients of :func:`mixture_logpdf` in x, means, variances and log_weights, from the
    responsibilities ``r_k = exp(term_k - out)`` of each element."""
    flat, terms, chunk = _mixture_chunks(x, means, variances, log_weights)
    acc = flat.dtype
    m, v = means.to(acc), variances.to(acc)
    g_all, o_all = grad.reshape(-1).to(acc), out.reshape(-1).to(acc)
    grad_x = torch.empty_like(flat)
    grad_m, grad_v, grad_w = (torch.zeros(m.shape, dtype=acc, device=flat.device) for _ in range(3))
    for start in range(0, flat.numel(), chunk):
        xs, g, o = flat[start:start + chunk], g_all[start:start + chunk], o_all[start:start + chunk]
        none = torch.isneginf(o)  # density 0: no responsibilities, zero gradients
        g, o = torch.where(none, 0, g), torch.where(none, 0, o)
        gr = g.unsqueeze(1) * torch.exp(terms(xs) - o.unsqueeze(1))  # [chunk, K]
        d = (xs.unsqueeze(1) - m) / v
        grad_x[start:start + chunk] = -(gr * d).sum(1)
        grad_m += (gr * d).sum(0)
        grad_v += (gr * (0.5 * d * d - 0.5 / v)).sum(0)
        grad_w += gr.sum(0)
    return (grad_x.reshape(x.shape).to(x.dtype), grad_m.to(means.dtype), grad_v.to(variances.dtype),
            grad_w.to(log_weights.dtype))
