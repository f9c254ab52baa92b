"""``dirfast::calibrate`` and ``dirfast::calibrate_`` (in place): FDS whitening and re-colouring
of each row with its bin's statistics."""

from __future__ import annotations

import torch

from ..contract import CalibrateInPlace
from . import _checks, _dispatch

OP = "calibrate"
OP_INPLACE = "calibrate_"


def calibrate(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1, clip_max: float = 10.0):
    """Whiten each row with its bin's ``(src_mean, src_var)`` and re-colour it with
    ``(dst_mean, dst_var)``.

    For a row in bin ``b``: ``(x - src_mean[b]) * sqrt(clamp(dst_var[b] / src_var[b], clip_min,
    clip_max)) + dst_mean[b]``, with the published zero-variance rules: a bin whose ``src_var``
    sums below 1e-10 leaves its rows unchanged, and dimensions where ``src_var == 0`` are left
    unchanged. Rows whose index is outside ``[0, B)`` are returned unchanged. The statistics are
    ``[B, D]`` tensors; the arithmetic is float32 (float64 for float64 statistics) and the result
    has the dtype and shape of ``x``. Differentiable in ``x``.
    """
    clips = _check(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)
    return _dispatch.kernel(OP, x.device)(x, bin_idx, src_mean, src_var, dst_mean, dst_var, *clips)


def calibrate_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1, clip_max: float = 10.0):
    """:func:`calibrate` written into ``x``, which is returned (one pass, no new tensor).

    Differentiable in ``x`` like any in-place op: ``x`` must not be a leaf that requires grad
    (nor a view of one) or an expanded tensor, which raise RuntimeError before anything is
    written; and what autograd saved of ``x`` before must not be needed afterwards.
    """
    clips = _check(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)
    _checks.writable_in_place("x", x)
    inplace = _dispatch.kernel(OP_INPLACE, x.device)
    args = (x, bin_idx, src_mean, src_var, dst_mean, dst_var, *clips)
    if torch.is_grad_enabled() and x.requires_grad:
        return CalibrateInPlace.apply(inplace, _dispatch.kernel(OP, x.device), *args)
    inplace(*args)
    return x


def _check(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max) -> tuple:
    """Every argument check of calibrate (shapes, dtypes, devices, clips); returns the clips."""
    dim = _checks.features_and_bins(x, bin_idx)
    _checks.tensor("src_mean", src_mean)
    if src_mean.dim() != 2 or not 1 <= src_mean.shape[0] <= _checks.MAX_BINS:
        raise ValueError(f"src_mean must be [B, D] with 1 <= B <= {_checks.MAX_BINS}, "
                         f"got shape {tuple(src_mean.shape)}")
    for name, table in (("src_mean", src_mean), ("src_var", src_var), ("dst_mean", dst_mean), ("dst_var", dst_var)):
        _checks.bin_table(name, table, (src_mean.shape[0], dim), x.device)
    return _checks.clips(clip_min, clip_max)
