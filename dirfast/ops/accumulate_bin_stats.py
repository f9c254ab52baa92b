"""``dirfast::accumulate_bin_stats_``: a batch's per-bin moments merged into running per-bin
(count, mean, M2) tables, in place -- what ``FDS.accumulate`` does every training step.

Kernels: the composite below (its statistics from ``bin_stats`` on the selected backend, the merge
in PyTorch): the definition, what runs on a GPU, and the "triton" backend's entry (over Triton's
bin_stats); ``csrc/cpu/accumulate_bin_stats.cpp``, the merge fused with the batch's moments (one
pass over the batch and over the buckets it meets).
"""

from __future__ import annotations

import torch

from . import _checks, _common, _dispatch

SCHEMA = "accumulate_bin_stats_(Tensor(a!) count, Tensor(b!) mean, Tensor(c!) m2, Tensor x, Tensor bin_idx) -> Tensor"


def accumulate_bin_stats_(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor,
                          bin_idx: torch.Tensor) -> torch.Tensor:
    """Add the rows of ``x`` to running per-bin statistics, in place, without gradient.

    Each bin's rows in the batch (their count, mean and sum of squared deviations ``M2``) are
    merged into ``count[k]``, ``mean[k]`` and ``m2[k]`` by Chan's formula, as accurate as one pass
    over all the rows ever added. A bin whose merged mean or M2 would not be finite in the tables'
    dtype (a NaN or infinite feature, an overflow) keeps what it had: one bad batch cannot poison
    its statistics.

    Args:
        count: float64 ``[B]``, the rows each bin holds so far.
        mean, m2: ``[B, D]`` float32 or float64 (one dtype), each bin's mean and ``M2`` so far.
        x: features, ``[N, D]``, or dense ``[B_, D, *spatial]`` with the features along dim 1.
        bin_idx: int64/int32 bin of each row, ``[N]`` or ``[B_, *spatial]``; an index outside
            ``[0, B)`` (such as -1) selects no bin.

    Returns:
        An int64 scalar tensor: the rows not added (of no bin, or of a bin left as it was). Nothing
        is read on the host.

    Arithmetic in float32, or float64 when ``x`` or the tables are float64.
    """
    _checks.features_and_bins(x, bin_idx)
    _checks.running_moments(count, mean, m2, x)
    return accumulate_bin_stats_unchecked_(count, mean, m2, x, bin_idx)


def accumulate_bin_stats_unchecked_(count, mean, m2, x, bin_idx) -> torch.Tensor:
    """:func:`accumulate_bin_stats_` for a caller that has checked its arguments (FDS.accumulate:
    its batch, the bins of its binning, its own tables): the Python checks, a noticeable part of a
    training batch's step (benchmarks/results/cpu/design-constants.md), are not made twice. The
    compiled kernels check them all the same."""
    return _dispatch.call("accumulate_bin_stats_", x.device, count, mean, m2, x.detach(), bin_idx)


# ------------------------------------------------------------------ per-bin moments and their merge
# Count, mean and M2 (the sum of squared deviations from the mean) per bin, and Chan's merge of two
# sets of them: how the composite below folds a batch into running tables, and how the ranks of
# torch.distributed combine theirs (dirfast.distributed), as accurate as one pass over all the rows.
def rows_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether each row of the 2-D ``t`` is free of NaN and infinite values. ``t * 0`` sums to 0
    exactly then (``inf * 0`` is NaN): a multiply and a row sum, where ``isfinite(t).all(1)`` takes
    four passes and a boolean reduction, each slow on CPU
    (benchmarks/results/cpu/fds-accumulate-met-buckets.txt)."""
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


def _distinct_ranks(keys: torch.Tensor) -> torch.Tensor:
    """Each key's rank among the distinct values of the 1-D ``keys`` (0 for the smallest), with no
    host sync (``torch.unique`` reads its output size on the host)."""
    ordered, order = keys.sort(stable=True)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[1:] = ordered[1:] != ordered[:-1]
    ranks = torch.empty_like(keys)
    ranks[order] = (new.cumsum(0) - 1).to(keys.dtype)
    return ranks


def reference(count, mean, m2, x, bin_idx):
    """The definition: ``bin_stats`` of the batch (on the selected backend), Chan's merge with the
    tables (:func:`chan_merge`), and each bin written only where the merge is finite.

    A batch of fewer rows than bins (a training batch against a grid of bins) costs its rows, not
    every bin: its statistics are taken over the bins it meets, numbered in order (bin_stats gives
    a bin the same bits either way), and merged a row at a time with the tables gathered at the
    rows' bins; rows of one bin compute and write the same values.
    """
    num_bins = count.shape[0]
    acc = _common.acc_dtype(x.dtype, mean.dtype)
    x = x.to(acc) if acc == torch.float64 else x  # float64 tables: the batch's moments in float64 too
    rows = bin_idx.reshape(-1)
    valid = (rows >= 0) & (rows < num_bins)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if rows.numel() < num_bins:
        at = torch.where(valid, rows, 0)
        met = _distinct_ranks(at)
        n_b, mean_b, var_b = _dispatch.call("bin_stats", x.device, x, torch.where(valid, met, -1).view(bin_idx.shape),
                                            max(rows.numel(), 1), deterministic)
        n_b, mean_b, var_b = n_b[met], mean_b[met], var_b[met]
        n_a, mean_a, m2_a = count[at], mean[at], m2[at]
    else:
        at = None
        n_b, mean_b, var_b = _dispatch.call("bin_stats", x.device, x, bin_idx, num_bins, deterministic)
        n_a, mean_a, m2_a = count, mean, m2
    total, merged_mean, merged_m2 = chan_merge(n_a, mean_a.to(acc), m2_a.to(acc), n_b.to(torch.float64),
                                               mean_b.to(acc), m2_from_var(n_b, var_b.to(acc)))
    merged_mean, merged_m2 = merged_mean.to(mean.dtype), merged_m2.to(mean.dtype)
    finite = rows_finite(merged_mean) & rows_finite(merged_m2)
    if at is None:
        left_out = torch.where(finite, 0, n_b).sum()
    else:
        left_out = (valid & ~finite).sum()
    updates = ((count, torch.where(finite, total, n_a)),
               (mean, torch.where(finite.unsqueeze(1), merged_mean, mean_a)),
               (m2, torch.where(finite.unsqueeze(1), merged_m2, m2_a)))
    for table, value in updates:
        if at is None:
            table.copy_(value)
        else:
            table.index_put_((at,), value)
    return left_out + (~valid).sum()


def _fake(count, mean, m2, x, bin_idx):
    return x.new_empty((), dtype=torch.int64)


_common.define(SCHEMA, reference, _fake, triton=reference)  # composed over the selected backend's bin_stats
