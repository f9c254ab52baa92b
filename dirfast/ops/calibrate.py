"""``dirfast::calibrate`` and ``dirfast::calibrate_`` (in place): FDS whitening and re-colouring
of each row with its bin's statistics.

Kernels: the reference below; ``csrc/cpu/calibrate.cpp``; ``csrc/cuda/calibrate.cu``;
``dirfast/triton/calibrate.py``.
"""

from __future__ import annotations

import torch

from . import _checks, _common, _dispatch
from .bin_stats import bin_rows

_ARGS = ("Tensor bin_idx, Tensor src_mean, Tensor src_var, Tensor dst_mean, Tensor dst_var, "
         "float clip_min=0.1, float clip_max=10.0")
SCHEMA = f"calibrate(Tensor x, {_ARGS}) -> Tensor"
SCHEMA_INPLACE = f"calibrate_(Tensor(a!) x, {_ARGS}) -> ()"  # FDS.smooth calibrates in place


def calibrate(x: torch.Tensor, bin_idx: torch.Tensor, src_mean: torch.Tensor, src_var: torch.Tensor,
              dst_mean: torch.Tensor, dst_var: torch.Tensor, clip_min: float = 0.1,
              clip_max: float = 10.0) -> torch.Tensor:
    """Whiten each row with its bin's ``(src_mean, src_var)`` and re-colour it with
    ``(dst_mean, dst_var)``.

    For a row in bin ``b``: ``(x - src_mean[b]) * sqrt(clamp(dst_var[b] / src_var[b], clip_min,
    clip_max)) + dst_mean[b]``, with the published zero-variance rules: a bin whose ``src_var``
    sums below 1e-10 leaves its rows unchanged (a sum within rounding of 1e-10 may go either way:
    each backend adds in its own order), and dimensions where ``src_var == 0`` are left
    unchanged. Rows whose index is outside ``[0, B)`` are returned unchanged. The statistics are
    ``[B, D]`` tensors in any strides; the arithmetic is float32 (float64 for float64 statistics)
    and the result has the dtype and shape of ``x``. Differentiable in ``x``, not in the
    statistics (buffers): one that requires grad raises NotImplementedError.

    The map is computed as ``x * s + t`` (:func:`scale_shift`), the same on every backend. With
    ``clip_max=inf``, a ratio beyond the arithmetic's range makes ``s`` infinite and that
    dimension of the bin's rows NaN or +-inf, where the formula above gives +-inf (NaN where ``x``
    equals ``src_mean``): either way no usable feature; a finite ``clip_max`` avoids both.

    At thousands of bins, contiguous statistics are read fastest: the published FDS leaves its
    smoothed ones transposed, so make them ``.contiguous()`` once per epoch (``dirfast.FDS`` keeps
    its own contiguous).
    """
    clips = _check(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)
    return calibrate_unchecked(x, bin_idx, src_mean, src_var, dst_mean, dst_var, *clips)


def calibrate_(x: torch.Tensor, bin_idx: torch.Tensor, src_mean: torch.Tensor, src_var: torch.Tensor,
               dst_mean: torch.Tensor, dst_var: torch.Tensor, clip_min: float = 0.1,
               clip_max: float = 10.0) -> torch.Tensor:
    """:func:`calibrate` written into ``x``, which is returned (one pass, no new tensor).

    Differentiable in ``x`` like any in-place op: ``x`` must not be a leaf that requires grad
    (nor a view of one) or an expanded tensor, which raise RuntimeError before anything is
    written; and what autograd saved of ``x`` before must not be needed afterwards.
    """
    clips = _check(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)
    return calibrate_unchecked_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, *clips)


# For a caller that has checked the arguments (FDS.smooth: its batch, the bins of its binning, its
# own statistics and clips): the Python checks, a noticeable part of a training batch's step
# (benchmarks/results/cpu/design-constants.md), are not made twice. The compiled kernels check
# them all the same.
def calibrate_unchecked(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float, clip_max: float):
    """:func:`calibrate` without its argument checks."""
    return _dispatch.call("calibrate", x.device, x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)


def calibrate_unchecked_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float, clip_max: float):
    """:func:`calibrate_` without its argument checks (x is still refused if torch could not write
    it in place)."""
    _checks.writable_in_place("x", x, ", or use the out-of-place calibrate")
    kernel = _dispatch.kernels(x.device)
    args = (x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)
    _dispatch.refuse_unsupported_derivatives("calibrate_", args)
    if torch.is_grad_enabled() and x.requires_grad:
        if torch.compiler.is_compiling():
            # Traced, an in-place op is made functional and written back anyway: the functional op
            # with its registered autograd, copied into x (torch 2.10 traces _CalibrateInPlace's
            # backward wrongly).
            return x.copy_(_dispatch.call("calibrate", x.device, *args))
        return _CalibrateInPlace.apply(kernel, *args)
    kernel("calibrate_")(*args)
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


def scale_shift(src_mean, src_var, dst_mean, dst_var, clip_min: float, clip_max: float, acc=None):
    """Per-bin ``(s, t)`` with ``calibrate(x) = x * s + t``, the published rules included.

    ``s = sqrt(clamp(dst_var / src_var, clip_min, clip_max))`` and ``t = dst_mean - src_mean * s``;
    a bin whose ``src_var`` sums below 1e-10 is left alone (``s = 1, t = -0.0``: ``x * 1 - 0.0``
    is ``x``, the sign of a zero included), and so is every dimension where ``src_var == 0``.
    """
    acc = acc or _common.acc_dtype(src_mean.dtype)
    src_mean, src_var, dst_mean, dst_var = (t.to(acc) for t in (src_mean, src_var, dst_mean, dst_var))
    keep = (src_var.sum(dim=1, keepdim=True) < 1e-10) | (src_var == 0)
    s = torch.sqrt(torch.clamp(dst_var / torch.where(keep, torch.ones_like(src_var), src_var), clip_min, clip_max))
    s = torch.where(keep, torch.ones_like(s), s)
    t = torch.where(keep, torch.full_like(src_mean, -0.0), dst_mean - src_mean * s)
    return s, t


def reference(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1, clip_max: float = 10.0):
    """The definition, in PyTorch: ``x * s[b] + t[b]`` with :func:`scale_shift`'s tables; rows
    whose index selects no bin are returned unchanged."""
    num_bins = src_mean.shape[0]
    acc = _common.acc_dtype(x.dtype, src_mean.dtype)
    s, t = scale_shift(src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, acc)
    # One identity row for indices outside [0, num_bins).
    s = torch.cat([s, torch.ones_like(s[:1])])
    t = torch.cat([t, torch.full_like(t[:1], -0.0)])
    idx = bin_rows(bin_idx, num_bins).reshape(bin_idx.shape)
    if x.dim() == 2:
        s_rows, t_rows = s[idx], t[idx]
    else:  # dense: gather [B, *spatial, C] and move C next to the batch axis (views only)
        s_rows, t_rows = s[idx].movedim(-1, 1), t[idx].movedim(-1, 1)
    out = torch.empty_like(x)  # the strides of the fake kernel
    out.copy_(x.to(s.dtype) * s_rows + t_rows)
    return out


def reference_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1,
               clip_max: float = 10.0) -> None:
    """:func:`reference` written into ``x``."""
    x.copy_(reference(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max))


def _fake(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min=0.1, clip_max=10.0):
    return torch.empty_like(x)


def _fake_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min=0.1, clip_max=10.0):
    return None


def _triton(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min=0.1, clip_max=10.0):
    from ..triton import calibrate as kernels

    return kernels.calibrate(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)


def _triton_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min=0.1, clip_max=10.0):
    from ..triton import calibrate as kernels

    kernels.calibrate_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)


_common.define(SCHEMA, reference, _fake, _triton)
_common.define(SCHEMA_INPLACE, reference_, _fake_, _triton_)


# -------------------------------------------------------------------------------- autograd
# y = x * s[b] + t[b], so dy/dx = s[b]: calibrate with both means at zero multiplies by s alone,
# with the same rules for rows and dimensions left unchanged. The statistics are buffers: no
# derivative in them is computed, and a table that requires grad is refused.
def _save(ctx, inputs) -> None:
    _, bin_idx, _, src_var, _, dst_var, clip_min, clip_max = inputs
    ctx.save_for_backward(bin_idx, src_var, dst_var)  # the means do not enter dy/dx
    ctx.clips = (clip_min, clip_max)


def _grad_x(ctx, grad):
    bin_idx, src_var, dst_var = ctx.saved_tensors
    zeros = torch.zeros_like(src_var)
    return ctx.kernel("calibrate")(grad, bin_idx, zeros, src_var, zeros, dst_var, *ctx.clips)


def _backward(ctx, grad):
    return (_grad_x(ctx, grad),) + (None,) * 7


_dispatch.register_autograd("calibrate", lambda ctx, inputs, output: _save(ctx, inputs), _backward, twice=True)
_dispatch.without_derivative("calibrate", "src_mean", "src_var", "dst_mean", "dst_var")
_dispatch.without_derivative("calibrate_", "src_mean", "src_var", "dst_mean", "dst_var")


class _CalibrateInPlace(torch.autograd.Function):
    """Autograd of the in-place op (register_autograd takes functional ops only): the forward
    overwrites ``x`` with one backend's ``calibrate_``, the backward is that backend's
    ``calibrate``."""

    @staticmethod
    def forward(ctx, kernel, *args):
        x = args[0]
        kernel("calibrate_")(*args)
        ctx.mark_dirty(x)
        ctx.kernel = kernel
        _save(ctx, args)
        return x

    @staticmethod
    def backward(ctx, grad):
        _dispatch.check_second_order("calibrate_", ctx, twice=True)
        return (None, _grad_x(ctx, grad)) + (None,) * 7
