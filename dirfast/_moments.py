"""Per-bucket moments as count, mean and M2 (the sum of squared deviations from the mean), and
Chan's merge of two sets of them: how FDS folds each batch into its streaming statistics and how
the ranks of ``torch.distributed`` combine theirs, as accurate as one pass over all the rows."""

from __future__ import annotations

import torch


def rows_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether each row of the 2-D ``t`` is free of NaN and infinite values. ``t * 0`` sums to 0
    exactly then (``inf * 0`` is NaN): a multiply and a row sum, where ``isfinite(t).all(1)`` takes
    four passes and a boolean reduction, each slow on CPU (256 x 512 float64, 1 thread: 0.12-0.25
    against 0.61-0.74 ms, benchmarks/results/cpu/fds-accumulate-met-buckets.txt)."""
    return (t * 0).sum(1) == 0


def m2_from_var(count: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-bin sums of squared deviations ``M2`` from the unbiased ``var`` of ``count`` rows."""
    return var * (count.to(var.dtype) - 1).clamp(min=0).unsqueeze(1)


def var_from_m2(count: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """The unbiased variance ``M2 / (n - 1)`` of each bin, 0 where it holds fewer than two rows."""
    n = count.to(m2.dtype).unsqueeze(1)
    return torch.where(n > 1, m2 / (n - 1).clamp(min=1), torch.zeros_like(m2))


def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """The ``(count, mean, M2)`` of the rows of two sets, per bin (Chan, Golub and LeVeque):
    counts ``[B]`` (float64), means and M2 ``[B, D]``; the arithmetic is in the dtype of
    ``mean_b``, and a bin empty in both stays empty."""
    count = count_a + count_b
    share_b = (count_b / count.clamp(min=1)).to(mean_b.dtype).unsqueeze(1)
    cross = (count_a * count_b / count.clamp(min=1)).to(mean_b.dtype).unsqueeze(1)
    delta = mean_b - mean_a
    return count, mean_a + delta * share_b, m2_a + (m2_b + delta * delta * cross)
