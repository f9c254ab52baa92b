"""``dirfast::bin_stats``: per-bin count, mean and unbiased variance of feature rows.

Kernels: the reference below; ``csrc/cpu/bin_stats.cpp``; ``csrc/cuda/bin_stats.cu``;
``dirfast/triton/bin_stats.py``.
"""

from __future__ import annotations

import torch

from . import _checks, _common, _dispatch

SCHEMA = "bin_stats(Tensor x, Tensor bin_idx, int num_bins, bool deterministic=False) -> (Tensor, Tensor, Tensor)"


def bin_stats(x: torch.Tensor, bin_idx: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and unbiased variance of the rows of ``x`` in each of ``num_bins`` bins.

    Args:
        x: features, ``[N, D]``, or dense ``[B, C, *spatial]`` with the features along dim 1.
        bin_idx: int64/int32 bin of each row, ``[N]`` or ``[B, *spatial]``. An index outside
            ``[0, num_bins)`` (such as -1) selects no bin and its row is ignored.
        num_bins: the number of bins ``B`` (passed, never derived from the data, so nothing
            waits on the GPU).

    Returns:
        ``(count, mean, var)``: int64 ``[B]``, and ``[B, D]`` in float32 (float64 for float64
        ``x``). The variance is unbiased, and 0 where a bin holds fewer than two rows; the mean
        is 0 in an empty bin. A NaN or an infinity in a feature of a bin's rows makes that
        feature's mean NaN and, in a bin of two or more rows, its variance NaN. A float32
        variance stays accurate however far the bin is from zero (the C++ kernels redo a bin over
        20 standard deviations out on the rows' differences from one of them, which costs such
        data about twice the time). ``mean`` and ``var`` are differentiable in ``x`` (first
        derivatives).

    On a GPU the sums use float atomics (the last bits vary from run to run) unless
    ``torch.use_deterministic_algorithms(True)`` is set, which selects a variant without them.
    """
    _checks.features_and_bins(x, bin_idx)
    _checks.num_bins(num_bins)
    deterministic = torch.are_deterministic_algorithms_enabled()
    return _dispatch.call("bin_stats", x.device, x, bin_idx, num_bins, deterministic)


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, D]`` (dense input moved to channels-last: a copy unless it already is);
    flattened, not reshaped to ``(-1, D)``, which is ambiguous when D is 0."""
    return x if x.dim() == 2 else x.movedim(1, -1).flatten(0, -2)


def bin_rows(bin_idx: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Flattened bin indices with every out-of-range index sent to a spare bin ``num_bins``."""
    idx = bin_idx.reshape(-1).long()
    return torch.where((idx >= 0) & (idx < num_bins), idx, num_bins)


def reference(x: torch.Tensor, bin_idx: torch.Tensor, num_bins: int, deterministic: bool = False):
    """The definition, in PyTorch: the corrected two-pass algorithm (Chan, Golub and LeVeque).

    A first pass for the mean, then sums of the deviations ``d`` and of ``d**2``;
    ``var = (S2 - S1**2 / n) / (n - 1)`` cancels the error of the first-pass mean, so float32
    keeps its accuracy even when a bin's mean is thousands of times its standard deviation.
    Deterministic whatever ``deterministic`` says.
    """
    acc = _common.acc_dtype(x.dtype)
    values = rows(x).to(acc)
    idx = bin_rows(bin_idx, num_bins)
    dim = values.shape[1]

    count = torch.zeros(num_bins + 1, dtype=torch.int64, device=x.device)
    count.index_add_(0, idx, torch.ones_like(idx))
    n = count.to(acc).unsqueeze(1)

    total = torch.zeros(num_bins + 1, dim, dtype=acc, device=x.device).index_add_(0, idx, values)
    mean0 = total / n.clamp(min=1)
    dev = values - mean0[idx]
    s1 = torch.zeros_like(total).index_add_(0, idx, dev)
    s2 = torch.zeros_like(total).index_add_(0, idx, dev * dev)

    mean = mean0 + s1 / n.clamp(min=1)
    var = ((s2 - s1 * s1 / n.clamp(min=1)) / (n - 1).clamp(min=1)).clamp(min=0)
    var = torch.where(torch.isposinf(s2) & torch.isfinite(s1), s2, var)  # a spread beyond acc: inf, not inf - inf
    var = torch.where(n > 1, var, torch.zeros_like(var))
    return count[:num_bins], mean[:num_bins], var[:num_bins]


def _fake(x, bin_idx, num_bins, deterministic=False):
    acc = _common.acc_dtype(x.dtype)
    count = x.new_empty((num_bins,), dtype=torch.int64)
    mean = x.new_empty((num_bins, x.shape[1]), dtype=acc)
    return count, mean, torch.empty_like(mean)


def _triton(x, bin_idx, num_bins, deterministic=False):
    from ..triton import bin_stats as kernels

    return kernels.bin_stats(x, bin_idx, num_bins, deterministic=deterministic)


_common.define(SCHEMA, reference, _fake, _triton)


# -------------------------------------------------------------------------------- autograd
# For the rows i of bin b: d mean_b / d x_i = 1 / n_b, and d var_b / d x_i = 2 (x_i - mean_b) /
# (n_b - 1) (0 in a bin of one row, whose variance is 0 by definition); rows of no bin get 0. The
# deviations from the saved (rounded) mean are corrected by their own mean, as the forward's
# second pass corrects its first: a float32 mean 1e4 standard deviations from zero would
# otherwise cost the gradient 1e-4 of its accuracy. In PyTorch: the same on every backend, O(N D).
def _save(ctx, inputs, output) -> None:
    x, bin_idx, num_bins, _ = inputs
    count, mean, _ = output
    ctx.save_for_backward(x, bin_idx, count, mean)
    ctx.num_bins = num_bins


def _backward(ctx, grad_count, grad_mean, grad_var):
    x, bin_idx, count, mean = ctx.saved_tensors
    n = count.to(mean.dtype).unsqueeze(1)

    def per_row(table):  # each row's entry of a [B, D] table, 0 for rows of no bin (index B)
        return torch.cat([table, table.new_zeros((1, table.shape[1]))])[idx]

    per_bin = grad_mean / n.clamp(min=1) if grad_mean is not None else torch.zeros_like(mean)
    per_deviation = (torch.where(n > 1, 2 * grad_var / (n - 1).clamp(min=1), 0.0) if grad_var is not None
                     else torch.zeros_like(mean))
    idx = bin_rows(bin_idx, ctx.num_bins)
    slope = per_row(per_deviation)
    deviation = rows(x).to(mean.dtype) - per_row(mean)
    drift = torch.zeros((mean.shape[0] + 1, mean.shape[1]), dtype=mean.dtype, device=mean.device)
    drift.index_add_(0, idx, deviation)  # n (true mean - mean), and the rows of no bin's at index B
    deviation = deviation - per_row(drift[:-1] / n.clamp(min=1))
    grad = per_row(per_bin) + torch.where(slope != 0, slope * deviation, 0.0)
    if x.dim() > 2:  # rows in channels-last order, back to [B, C, *spatial]
        grad = grad.reshape((x.shape[0],) + tuple(x.shape[2:]) + (x.shape[1],)).movedim(-1, 1)
    return grad.to(x.dtype), None, None, None


_dispatch.register_autograd("bin_stats", _save, _backward)
