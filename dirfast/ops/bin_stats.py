"""``dirfast::bin_stats``: per-bin count, mean and unbiased variance of feature rows."""

from __future__ import annotations

import torch

from . import _checks, _dispatch

OP = "bin_stats"


def bin_stats(x: torch.Tensor, bin_idx: torch.Tensor, num_bins: int):
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
        is 0 in an empty bin.

    On a GPU the sums use float atomics (the last bits vary from run to run) unless
    ``torch.use_deterministic_algorithms(True)`` is set, which selects a variant without them.
    """
    _checks.features_and_bins(x, bin_idx)
    _checks.num_bins(num_bins)
    return _dispatch.kernel(OP, x.device)(x, bin_idx, num_bins)
