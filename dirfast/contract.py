"""The contract of the dirfast ops, defined once: schemas, fake kernels and autograd.

Every layer builds on this module and nothing here imports a layer above it: the ops front end
(:mod:`dirfast.ops`) validates and dispatches, and each backend implements these schemas (the
compiled extension registers its kernels for them; the Triton ops reuse the fakes and the
autograd). ``setup.py`` reads ``SCHEMAS`` and ``PADDINGS`` from this file's source (plain
literals) to generate the C++ header that registers the same schemas and numbers the paddings.
The pure-PyTorch reference is each op's ``CompositeExplicitAutograd`` kernel: a kernel registered
for a device key takes precedence over it, and a device without one still works.
"""

from __future__ import annotations

import torch

from . import _ext, reference

NAMESPACE = "dirfast"

# The padding modes of smooth_bins; a mode's number (its index here) is what the C++, CUDA and
# Triton kernels receive.
PADDINGS = ("reflect", "replicate", "constant", "symmetric")

SCHEMAS = {
    "bin_stats": "bin_stats(Tensor x, Tensor bin_idx, int num_bins) -> (Tensor, Tensor, Tensor)",
    "smooth_bins": "smooth_bins(Tensor stats, Tensor window, str padding=\"reflect\") -> Tensor",
    "calibrate": (
        "calibrate(Tensor x, Tensor bin_idx, Tensor src_mean, Tensor src_var, Tensor dst_mean, "
        "Tensor dst_var, float clip_min=0.1, float clip_max=10.0) -> Tensor"
    ),
    # calibrate written into x: FDS.smooth calibrates the features in place.
    "calibrate_": (
        "calibrate_(Tensor(a!) x, Tensor bin_idx, Tensor src_mean, Tensor src_var, Tensor dst_mean, "
        "Tensor dst_var, float clip_min=0.1, float clip_max=10.0) -> ()"
    ),
    # log sum_k w_k N(x; mean_k, var_k) (+ log(2 pi) / 2) for every element of x: Balanced MSE.
    "mixture_logpdf": "mixture_logpdf(Tensor x, Tensor means, Tensor variances, Tensor log_weights) -> Tensor",
    "mixture_logpdf_backward": (
        "mixture_logpdf_backward(Tensor grad, Tensor x, Tensor out, Tensor means, Tensor variances, "
        "Tensor log_weights) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

def _defined(op: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), op)
    except AttributeError:
        return False
    return True


LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
for _op, _schema in SCHEMAS.items():  # dirfast._C defines them when it is loaded (and is up to date)
    if not _defined(_op):
        LIBRARY.define(_schema)
for _op in SCHEMAS:
    LIBRARY.impl(_op, getattr(reference, _op), "CompositeExplicitAutograd")


def qualname(op: str) -> str:
    return f"{NAMESPACE}::{op}"


def op_overload(op: str):
    """The ``torch.ops.dirfast.<op>.default`` overload."""
    return getattr(getattr(torch.ops, NAMESPACE), op).default


def has_device_kernel(op: str, dispatch_key: str) -> bool:
    """Whether a kernel is registered for ``dispatch_key`` itself (not only the composite)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), dispatch_key)


# -------------------------------------------------------------------------------- fake kernels
def fake_bin_stats(x, bin_idx, num_bins):
    acc = reference.accumulate_dtype(x.dtype)
    count = x.new_empty((num_bins,), dtype=torch.int64)
    mean = x.new_empty((num_bins, x.shape[1]), dtype=acc)
    return count, mean, torch.empty_like(mean)


def fake_smooth_bins(stats, window, padding="reflect"):
    return torch.empty_like(stats)


def fake_calibrate(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min=0.1, clip_max=10.0):
    return torch.empty_like(x)


def fake_calibrate_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min=0.1, clip_max=10.0):
    return None


def fake_mixture_logpdf(x, means, variances, log_weights):
    return torch.empty_like(x, dtype=reference.mixture_dtype(x, means, variances, log_weights),
                            memory_format=torch.contiguous_format)


def fake_mixture_logpdf_backward(grad, x, out, means, variances, log_weights):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(means),
            torch.empty_like(variances), torch.empty_like(log_weights))


for _op, _fake in (("bin_stats", fake_bin_stats), ("smooth_bins", fake_smooth_bins),
                   ("calibrate", fake_calibrate), ("calibrate_", fake_calibrate_),
                   ("mixture_logpdf", fake_mixture_logpdf), ("mixture_logpdf_backward", fake_mixture_logpdf_backward)):
    torch.library.register_fake(qualname(_op), _fake)


# -------------------------------------------------------------------------------- autograd
# calibrate is y = x * s[b] + t[b], so dy/dx = s[b]: the same op with both means at zero
# multiplies by s alone, with the same rules for rows and dimensions left unchanged. The
# statistics are buffers and get no gradient.
def _save_for_grad(ctx, bin_idx, src_var, dst_var, clip_min, clip_max) -> None:
    ctx.save_for_backward(bin_idx, src_var, dst_var)  # the means do not enter dy/dx
    ctx.clips = (clip_min, clip_max)


def _grad_x(calibrate, ctx, grad):
    """dy/dx times ``grad``, computed with ``calibrate`` (an out-of-place calibrate kernel)."""
    bin_idx, src_var, dst_var = ctx.saved_tensors
    zeros = torch.zeros_like(src_var)
    return calibrate(grad, bin_idx, zeros, src_var, zeros, dst_var, *ctx.clips)


def register_calibrate_autograd(op: str) -> None:
    """Make ``dirfast::<op>``, an op with calibrate's schema, differentiable in ``x``; its
    backward is the same op."""
    def setup_context(ctx, inputs, output):
        x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max = inputs
        _save_for_grad(ctx, bin_idx, src_var, dst_var, clip_min, clip_max)

    def backward(ctx, grad):
        return (_grad_x(op_overload(op), ctx, grad),) + (None,) * 7

    torch.library.register_autograd(qualname(op), backward, setup_context=setup_context)


register_calibrate_autograd("calibrate")


def register_mixture_autograd(op: str, backward_op: str) -> None:
    """Make ``dirfast::<op>`` (mixture_logpdf's schema) differentiable in all four inputs through
    ``dirfast::<backward_op>``, which recomputes each element's responsibilities from the saved
    output instead of keeping an [N, K] matrix."""
    def setup_context(ctx, inputs, output):
        x, means, variances, log_weights = inputs
        ctx.save_for_backward(x, output, means, variances, log_weights)

    def backward(ctx, grad):
        x, out, means, variances, log_weights = ctx.saved_tensors
        return op_overload(backward_op)(grad.contiguous(), x, out, means, variances, log_weights)

    torch.library.register_autograd(qualname(op), backward, setup_context=setup_context)


register_mixture_autograd("mixture_logpdf", "mixture_logpdf_backward")


class CalibrateInPlace(torch.autograd.Function):
    """Autograd of the in-place calibration (register_autograd takes functional ops only): the
    forward runs ``inplace`` (which overwrites ``x``), the backward ``calibrate`` -- the two
    kernels of one backend, picked by the caller, so the backward runs where the forward ran."""

    @staticmethod
    def forward(ctx, inplace, calibrate, x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max):
        inplace(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max)
        ctx.mark_dirty(x)
        ctx.calibrate = calibrate
        _save_for_grad(ctx, bin_idx, src_var, dst_var, clip_min, clip_max)
        return x

    @staticmethod
    def backward(ctx, grad):
        return (None, None, _grad_x(ctx.calibrate, ctx, grad)) + (None,) * 7
