"""``dirfast::calibrate`` and ``dirfast::calibrate_`` (in place): FDS whitening and re-colouring
of each row with its bin's statistics."""

from __future__ import annotations

import torch

from .. import reference
from . import _checks, _dispatch
from ._library import op_overload, qualname, register_fallback

OP = "calibrate"
OP_INPLACE = "calibrate_"

register_fallback(OP, reference.calibrate)
register_fallback(OP_INPLACE, reference.calibrate_)


@torch.library.register_fake(qualname(OP))
def _fake(x, bin_idx, m1, v1, m2, v2, clip_min=0.1, clip_max=10.0):
    return torch.empty_like(x)


@torch.library.register_fake(qualname(OP_INPLACE))
def _fake_inplace(x, bin_idx, m1, v1, m2, v2, clip_min=0.1, clip_max=10.0):
    return None


def _save_for_grad(ctx, bin_idx, v1, v2, clip_min, clip_max) -> None:
    ctx.save_for_backward(bin_idx, v1, v2)  # the means do not enter dy/dx
    ctx.clips = (clip_min, clip_max)


def _grad_x(kernel, ctx, grad):
    """dy/dx of calibrate times ``grad``, with ``kernel`` an out-of-place calibrate.

    calibrate is ``y = x * s[b] + t[b]``, so ``dy/dx = s[b]``: the same op with both means at
    zero multiplies by ``s`` alone, with the same rules for rows and dimensions left unchanged.
    The statistics are buffers and get no gradient.
    """
    bin_idx, v1, v2 = ctx.saved_tensors
    zeros = torch.zeros_like(v1)
    grad_x = kernel(grad, bin_idx, zeros, v1, zeros, v2, *ctx.clips)
    return grad_x, None, None, None, None, None, None, None


def _setup_context(ctx, inputs, output):
    x, bin_idx, m1, v1, m2, v2, clip_min, clip_max = inputs
    _save_for_grad(ctx, bin_idx, v1, v2, clip_min, clip_max)


def register_calibrate_autograd(op: str) -> None:
    """Make ``dirfast::<op>``, an op with calibrate's schema, differentiable in ``x``."""
    def backward(ctx, grad):
        return _grad_x(op_overload(op), ctx, grad)

    torch.library.register_autograd(qualname(op), backward, setup_context=_setup_context)


register_calibrate_autograd(OP)


def calibrate(x, bin_idx, m1, v1, m2, v2, clip_min: float = 0.1, clip_max: float = 10.0):
    """Whiten each row with its bin's ``(m1, v1)`` and re-colour it with ``(m2, v2)``.

    For a row in bin ``b``: ``(x - m1[b]) * sqrt(clamp(v2[b] / v1[b], clip_min, clip_max)) +
    m2[b]``, with the published zero-variance rules: a bin whose ``v1`` sums below 1e-10 leaves
    its rows unchanged, and dimensions where ``v1 == 0`` are left unchanged. Rows whose index is
    outside ``[0, B)`` are returned unchanged. The statistics are ``[B, D]`` tensors; the
    arithmetic is float32 (float64 for float64 statistics) and the result has the dtype and
    shape of ``x``. Differentiable in ``x``.
    """
    clips = _check(x, bin_idx, m1, v1, m2, v2, clip_min, clip_max)
    return _dispatch.kernel(OP, x.device)(x, bin_idx, m1, v1, m2, v2, *clips)


def _check(x, bin_idx, m1, v1, m2, v2, clip_min, clip_max) -> tuple:
    """Every argument check of calibrate (shapes, dtypes, devices, clips); returns the clips."""
    dim = _checks.features_and_bins(x, bin_idx)
    _checks.tensor("m1", m1)
    if m1.dim() != 2 or not 1 <= m1.shape[0] <= _checks.MAX_BINS:
        raise ValueError(f"m1 must be [B, D] with 1 <= B <= {_checks.MAX_BINS}, got shape {tuple(m1.shape)}")
    for name, table in (("m1", m1), ("v1", v1), ("m2", m2), ("v2", v2)):
        _checks.bin_table(name, table, (m1.shape[0], dim), x.device)
    return _checks.clips(clip_min, clip_max)


class _CalibrateInPlace(torch.autograd.Function):
    """Autograd for the in-place op (torch.library's register_autograd takes functional ops
    only): the forward overwrites ``x``, the backward is the out-of-place op on the gradient,
    as :func:`register_calibrate_autograd` does."""

    @staticmethod
    def forward(ctx, x, bin_idx, m1, v1, m2, v2, clip_min, clip_max):
        ctx.backend = _dispatch.get_backend()  # the backward runs on the forward's backend
        _dispatch.kernel(OP_INPLACE, x.device, ctx.backend)(x, bin_idx, m1, v1, m2, v2, clip_min, clip_max)
        ctx.mark_dirty(x)
        _save_for_grad(ctx, bin_idx, v1, v2, clip_min, clip_max)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _grad_x(_dispatch.kernel(OP, grad.device, ctx.backend), ctx, grad)


def calibrate_(x, bin_idx, m1, v1, m2, v2, clip_min: float = 0.1, clip_max: float = 10.0):
    """:func:`calibrate` written into ``x``, which is returned (one pass, no new tensor).

    Differentiable in ``x`` like any in-place op: ``x`` must not be a leaf that requires grad
    (nor a view of one) or an expanded tensor, which raise RuntimeError before anything is
    written; and what autograd saved of ``x`` before must not be needed afterwards.
    """
    clips = _check(x, bin_idx, m1, v1, m2, v2, clip_min, clip_max)
    _checks.writable_in_place("x", x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _CalibrateInPlace.apply(x, bin_idx, m1, v1, m2, v2, *clips)
    _dispatch.kernel(OP_INPLACE, x.device)(x, bin_idx, m1, v1, m2, v2, *clips)
    return x
