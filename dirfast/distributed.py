"""Combining per-bucket statistics across the processes of ``torch.distributed``.

Each rank sees its own shard of the training set; FDS and LDS must hold the statistics of the
whole set on every rank, identically. Counts and sums are added with ``all_reduce``; the
variance is combined from each rank's M2 (sum of squared deviations) around the global mean,
so it is as accurate as one pass over all the rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import reference

__all__ = ["is_distributed", "all_reduce_bin_stats", "all_reduce_sum"]


def is_distributed(process_group=None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process in the group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def all_reduce_sum(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """``tensor`` summed over the ranks of the group (in place, and returned)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor


def all_reduce_bin_stats(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, process_group=None):
    """Per-bucket ``(count, mean, unbiased var)`` of every rank's rows, from each rank's own.

    Two collectives, in float64: the counts and sums, then the M2 terms
    ``var_r * (n_r - 1) + n_r * (mean_r - mean)**2`` around the global mean.
    """
    n = count.to(torch.float64)
    packed = torch.cat([n.unsqueeze(1), mean.double() * n.unsqueeze(1)], dim=1)
    all_reduce_sum(packed, process_group)
    total = packed[:, 0]
    global_mean = packed[:, 1:] / total.clamp(min=1).unsqueeze(1)
    deviation = mean.double() - global_mean
    m2 = reference.m2_from_var(n, var.double()) + n.unsqueeze(1) * deviation * deviation
    all_reduce_sum(m2, process_group)
    global_var = reference.var_from_m2(total, m2)
    return total.round().long(), global_mean.to(mean.dtype), global_var.to(var.dtype)
