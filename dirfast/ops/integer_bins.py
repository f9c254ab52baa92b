"""``dirfast::integer_bins``: the bin ``int(label * scale)`` of every label, clamped into range,
-1 for a label with no bin (``Binning.integer``: ages, NYUD2-DIR's depth buckets).

Kernels: the reference below (what runs on a GPU, and the "triton" backend's entry: elementwise
torch ops, no Triton kernel of its own); ``csrc/cpu/integer_bins.cpp`` (one pass, where the
reference takes six).
"""

from __future__ import annotations

import torch

from . import _checks, _common, _dispatch

SCHEMA = "integer_bins(Tensor labels, int num_bins, float scale=1.0, int first=0) -> Tensor"
MAX_BINS = 1 << 24  # whole numbers up to here are exact in float32, the dtype the bins are computed in


def integer_bins(labels: torch.Tensor, num_bins: int, scale: float = 1.0, first: int = 0) -> torch.Tensor:
    """The bin of each label, ``int(label * scale)`` clamped into ``[first, num_bins)`` and counted
    from ``first``: int64 in ``[0, num_bins - first)``, the shape of ``labels``, -1 where a label is
    NaN or infinite. Bins below ``first`` join it (FDS's ``bucket_start``).

    Computed in float32 (float64 for float64 labels): ``label * scale`` rounds there, then is
    clamped and floored (for labels at least 0, as int() truncates). ``num_bins`` is at most 2**24.
    """
    _checks.floating("labels", labels)
    num_bins = _checks.integer("num_bins", num_bins)
    if not 1 <= num_bins <= MAX_BINS:
        raise ValueError(f"num_bins must be in [1, {MAX_BINS}], got {num_bins}")
    # 1 / scale finite too: a scale that rounds to 0 there would put every label in bin 0
    scale = _checks.real("scale", scale, 0.0, above=True, dtype=_common.acc_dtype(labels.dtype), reciprocal=True)
    first = _checks.integer("first", first)
    if not 0 <= first < num_bins:
        raise ValueError(f"first must be in [0, {num_bins}) (num_bins), got {first}")
    return integer_bins_unchecked(labels, num_bins, scale, first)


def integer_bins_unchecked(labels: torch.Tensor, num_bins: int, scale: float, first: int) -> torch.Tensor:
    """:func:`integer_bins` for a caller that has checked its arguments (a Binning, at its
    construction and on each call's labels): the Python checks, a large part of its time on a
    training batch's labels (benchmarks/results/cpu/design-constants.md), are not made twice. The
    compiled kernels check them all the same."""
    return _dispatch.call("integer_bins", labels.device, labels, num_bins, scale, first)


def reference(labels, num_bins, scale=1.0, first=0):
    """The definition, in PyTorch: clamped first (huge labels cannot overflow the int64
    conversion), then floored (the values are at least ``first >= 0``, where floor truncates);
    ``+ labels * 0`` is NaN exactly where a label is NaN or infinite (``inf * 0``), which becomes
    -1."""
    values = labels.to(_common.acc_dtype(labels.dtype))
    bins = (values * scale) if scale != 1.0 else values.clone()
    bins.clamp_(float(first), float(num_bins - 1)).floor_()
    if first:
        bins.sub_(first)
    return bins.add_(values, alpha=0).nan_to_num_(nan=-1.0).long().contiguous()


def _fake(labels, num_bins, scale=1.0, first=0):
    return labels.new_empty(labels.shape, dtype=torch.int64)


_common.define(SCHEMA, reference, _fake, triton=reference)  # elementwise torch ops: any device
