"""Combining per-bucket statistics across the processes of ``torch.distributed``.

Each rank sees its own shard of the training set; FDS and LDS must hold the statistics of the
whole set on every rank, identically. Counts are added with ``all_reduce``; per-bucket
statistics are gathered from every rank and merged in rank order with Chan's formula (the one
FDS folds its batches with), so they are as accurate as one pass over all the rows and equal,
bit for bit, on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from . import _validate as validate
from ._autograd import in_place_refusal
from ._types import ProcessGroup
from .ops.accumulate_bin_stats import chan_merge, m2_from_var, var_from_m2

__all__ = ["is_distributed", "all_gather_rows", "all_reduce_bin_stats", "all_reduce_sum", "checked_on_every_rank"]

T = TypeVar("T")


class SharesProcessGroup:
    """For the classes that hold a ``process_group``: ``copy.deepcopy`` (an EMA copy of a model,
    ``torch.optim.swa_utils.AveragedModel``) gives a copy that shares the group, a handle on the
    running processes that cannot be copied; everything else is copied as ever."""

    def __deepcopy__(self, memo):
        group = getattr(self, "process_group", None)
        if group is not None:
            memo[id(group)] = group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied


def is_distributed(process_group: ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process in the group."""
    validate.process_group("process_group", process_group)
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def checked_on_every_rank(check: Callable[[], T], process_group: ProcessGroup | None = None) -> T:
    """``check()`` (the checks of a rank's own data, which may raise ValueError, TypeError,
    RuntimeError, or any other exception: a warning that ``-W error`` turns into one), then one
    all-reduce of whether it raised on any rank of the group: a rank whose data was
    refused raises its error, and every other rank a ValueError saying so, instead of waiting in
    the collective that follows until the process group times out. Returns what check returned.
    Under NCCL the vote goes through the current CUDA device."""
    if not callable(check):
        raise TypeError(f"check must be a callable (of no arguments), got {type(check).__name__}")
    validate.process_group("process_group", process_group, member=True)
    return _checked_on_every_rank(check, process_group)


def _vote_device(process_group: ProcessGroup | None, device: torch.device | None) -> torch.device:
    """Where a small collective's tensor goes (a vote, LDS's counts): the CPU under gloo; under
    NCCL, which reduces CUDA tensors only, the CUDA device of the data it concerns (a rank that
    never called torch.cuda.set_device is still on its own GPU), else the current one."""
    if dist.get_backend(process_group) != "nccl":
        return torch.device("cpu")
    if device is not None and device.type == "cuda":
        return device
    return torch.device("cuda", torch.cuda.current_device())


def _checked_on_every_rank(check: Callable[[], T], process_group: ProcessGroup | None = None,
                           device: torch.device | None = None) -> T:
    """:func:`checked_on_every_rank`, its arguments valid, the vote on ``device`` under NCCL."""
    try:
        result, error = check(), None
    except Exception as exc:  # any, a warning made an error (-W error) too: else the other ranks wait in the vote
        result, error = None, exc
    refused = torch.tensor([error is not None], dtype=torch.int32, device=_vote_device(process_group, device))
    dist.all_reduce(refused, op=dist.ReduceOp.MAX, group=process_group)
    if error is not None:
        raise error
    if bool(refused):
        raise ValueError("another rank's data was refused (its error says why): nothing was updated on any rank")
    return cast(T, result)  # check() returned it: error is None


def _agreed_on_every_rank(flag: bool, what: str, process_group: ProcessGroup | None = None,
                          device: torch.device | None = None) -> bool:
    """``flag``, when every rank of the group has the same (one all-reduce, on ``device`` under
    NCCL); else a ValueError on every rank saying on how many ``what`` holds, instead of some
    ranks waiting in a collective the others skip until the process group times out."""
    votes = torch.tensor([int(flag)], dtype=torch.int32, device=_vote_device(process_group, device))
    dist.all_reduce(votes, op=dist.ReduceOp.SUM, group=process_group)
    holding, ranks = int(votes.item()), dist.get_world_size(process_group)
    if 0 < holding < ranks:
        raise ValueError(f"{what} on {holding} of {ranks} ranks, not on the others: nothing was updated on any rank")
    return flag


def all_reduce_sum(tensor: torch.Tensor, process_group: ProcessGroup | None = None) -> torch.Tensor:
    """``tensor`` summed over the ranks of the group (in place, and returned): a tensor torch would
    not let be written in place (a leaf that requires grad, an inference tensor, an expanded one)
    is refused first, as dirfast's in-place ops refuse it."""
    validate.collective("tensor", tensor)
    problem = in_place_refusal("tensor", tensor)
    if problem is not None:
        raise RuntimeError(f"{problem}; pass a tensor of its own (a copy)")
    validate.process_group("process_group", process_group, member=True)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor


def all_reduce_bin_stats(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         process_group: ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bucket ``(count, mean, unbiased var)`` of every rank's rows, from each rank's own:
    one all-gather of each rank's count, mean and M2, merged in float64. ``count`` ``[B]``, ``mean``
    and ``var`` ``[B, D]`` floating, on one device (each rank's of the same shape)."""
    _check_bin_stats(count, mean, var)
    validate.process_group("process_group", process_group, member=True)
    n = count.to(torch.float64)
    packed = torch.cat([n.unsqueeze(1), mean.double(), m2_from_var(n, var.double())], dim=1)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, packed, group=process_group)
    dim = mean.shape[1]
    total, merged_mean, merged_m2 = parts[0][:, 0], parts[0][:, 1:1 + dim], parts[0][:, 1 + dim:]
    for part in parts[1:]:
        total, merged_mean, merged_m2 = chan_merge(total, merged_mean, merged_m2,
                                                   part[:, 0], part[:, 1:1 + dim], part[:, 1 + dim:])
    return total.round().long(), merged_mean.to(mean.dtype), var_from_m2(total, merged_m2).to(var.dtype)


def all_gather_rows(tensor: torch.Tensor, process_group: ProcessGroup | None = None) -> tuple[torch.Tensor, int]:
    """The rows of ``tensor`` from every rank, concatenated in rank order (ranks may hold
    different numbers of rows), and the index of this rank's first row in the result.

    Not differentiable: the result is for a prior (Balanced MSE's BMC targets), not for a loss
    term that needs the other ranks' gradients."""
    if validate.collective("tensor", tensor).dim() == 0:
        raise ValueError("tensor must have rows (at least one dimension), got a 0-d tensor")
    validate.process_group("process_group", process_group, member=True)
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    gathered = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(gathered, rows, group=process_group)
    sizes = [int(size) for size in gathered]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=process_group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sum(sizes[:rank])


def _check_bin_stats(count, mean, var) -> None:
    """all_reduce_bin_stats' arguments: a count per bucket ``[B]`` of real numbers, floating
    ``mean`` and ``var`` ``[B, D]``, with values to read, on one device."""
    validate.tensor("count", count)
    if count.dtype.is_complex or count.dtype == torch.bool:
        raise TypeError(f"count must be a tensor of real numbers, got {count.dtype}")
    validate.floating("mean", mean)
    validate.floating("var", var)
    for name, table in (("count", count), ("mean", mean), ("var", var)):
        validate.readable(name, table)
    if count.dim() != 1 or mean.dim() != 2 or mean.shape[0] != count.shape[0] or var.shape != mean.shape:
        raise ValueError(f"count must be [B] and mean and var [B, D], got shapes {tuple(count.shape)}, "
                         f"{tuple(mean.shape)} and {tuple(var.shape)}")
    if not count.device == mean.device == var.device:
        raise ValueError(f"count, mean and var must be on one device, got {count.device}, {mean.device} and "
                         f"{var.device}")
