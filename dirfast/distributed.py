"""Combining per-bucket statistics across the processes of ``torch.distributed``.

Each rank sees its own shard of the training set; FDS and LDS must hold the statistics of the
whole set on every rank, identically. Counts and sums are added with ``all_reduce``; the
variance is combined from each rank's M2 (sum of squared deviations) around the global mean,
so it is as accurate as one pass over all the rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._moments import m2_from_var, var_from_m2

__all__ = ["is_distributed", "all_gather_rows", "all_reduce_bin_stats", "all_reduce_sum"]


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
    m2 = m2_from_var(n, var.double()) + n.unsqueeze(1) * deviation * deviation
    all_reduce_sum(m2, process_group)
    global_var = var_from_m2(total, m2)
    return total.round().long(), global_mean.to(mean.dtype), global_var.to(var.dtype)


def all_gather_rows(tensor: torch.Tensor, process_group=None):
    """The rows of ``tensor`` from every rank, concatenated in rank order (ranks may hold
    different numbers of rows), and the index of this rank's first row in the result.

    Not differentiable: the result is for a prior (Balanced MSE's BMC targets), not for a loss
    term that needs the other ranks' gradients."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(sizes, rows, group=process_group)
    sizes = [int(size) for size in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=process_group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sum(sizes[:rank])
