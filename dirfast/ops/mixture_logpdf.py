"""``dirfast::mixture_logpdf``: the log density of a 1-D Gaussian mixture at every element of a
tensor, without an [N, K] matrix (Balanced MSE's BNI and GAI terms on dense predictions); its
backward; and ``mixture_logpdf_with_grads``, the density with its per-element gradients in one
pass (the Balanced MSE losses, whose upstream gradient is one scalar).

Kernels: the reference below; ``csrc/cpu/mixture_logpdf.cpp``; ``dirfast/triton/mixture_logpdf.py``
(on a GPU, the CUDA kernel).
"""

from __future__ import annotations

import torch

from . import _checks, _common, _dispatch

_ARGS = "Tensor means, Tensor variances, Tensor log_weights"
SCHEMA = f"mixture_logpdf(Tensor x, {_ARGS}) -> Tensor"
SCHEMA_BACKWARD = f"mixture_logpdf_backward(Tensor grad, Tensor x, Tensor out, {_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)"
SCHEMA_WITH_GRADS = f"mixture_logpdf_with_grads(Tensor x, {_ARGS}) -> (Tensor, Tensor, Tensor)"


def mixture_logpdf(x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                   log_weights: torch.Tensor) -> torch.Tensor:
    """``log sum_k exp(log_weights[k]) N(x; means[k], variances[k]) + log(2 pi) / 2`` for every
    element of ``x``.

    Args:
        x: predictions of any shape (a depth map ``[B, 1, H, W]`` goes in as it is).
        means, variances, log_weights: the K components, 1-D tensors of one length on the
            device of ``x``.

    Returns:
        A tensor shaped like ``x``, float32 (float64 when an input is float64), differentiable
        in all four inputs. The log-sum-exp runs element by element over the K components, so
        memory is O(N + K) forward and backward.

    Values are not checked (that would wait on the GPU); on every backend they mean:

    * a NaN element of ``x`` gives NaN; ``x = +-inf`` gives ``-inf`` (density 0);
    * a component with a mean that is not finite, a variance that is NaN, not positive or
      infinite, or a log-weight that is NaN or ``+inf`` makes the mixture invalid: every output
      is NaN;
    * a log-weight of ``-inf`` is a weight of 0: the component is left out, and with every
      weight 0 each output is ``-inf``;
    * positive subnormal variances are valid and computed in full.

    An output of ``-inf`` gets zero gradients; a NaN output, NaN gradients. The backward takes
    each element's responsibilities as the softmax of its terms, not from the output (which in
    float32 rounds by 2^-5 at 1,000 standard deviations from every component): the gradient in
    ``x``, and each gradient's sum over the components, keep float32 accuracy at any distance.
    A component's own gradient from an element whose responsibility it shares with others is
    ill-conditioned that far out: half an ulp of an input there moves the term by about
    ``3e-8 z^2`` for ``z`` standard deviations (a 2% change of the gradient at 1,000, all of it
    at 10,000), in float64 autograd too; pass float64 inputs where that matters.
    """
    _checks.floating("x", x)
    _checks.tensor("means", means)
    if means.dim() != 1 or means.shape[0] == 0:
        raise ValueError(f"means must be 1-D with at least one component, got shape {tuple(means.shape)}")
    for name, value in (("means", means), ("variances", variances), ("log_weights", log_weights)):
        _checks.bin_table(name, value, means.shape, x.device)
    return mixture_logpdf_unchecked(x, means, variances, log_weights)


# For a caller that has checked the arguments and runs its own autograd (Balanced MSE's 1-D losses,
# one autograd node for the whole loss): the op, and the op with its per-element gradients.
def mixture_logpdf_unchecked(x, means, variances, log_weights):
    """:func:`mixture_logpdf` without its argument checks, on this thread's backend."""
    return _dispatch.call("mixture_logpdf", x.device, x, means, variances, log_weights)


def mixture_logpdf_with_grads_unchecked(x, means, variances, log_weights):
    """``(out, grad_x, grad_shift)``, each shaped like ``x`` in the arithmetic dtype, on this
    thread's backend: :func:`mixture_logpdf`, and per element its derivatives in ``x`` and in a
    variance ``t`` added to every component (``sum_k d out / d variances[k]``), in the forward's
    pass over the components. For a loss whose upstream gradient is one scalar (a mean), this
    replaces the backward's second pass; not differentiable itself."""
    return _dispatch.call("mixture_logpdf_with_grads", x.device, x, means, variances, log_weights)


def components(means, variances, log_weights, acc: torch.dtype):
    """The components as every kernel uses them, in ``acc``: means ``m``, inverse standard
    deviations ``s = 1 / sqrt(v)`` and ``c = log w + log s``, so that the term of component k at
    ``x`` is ``c - z**2 / 2`` with ``z = (x - m) * s`` (a subnormal variance keeps a finite ``s``).
    ``c`` is NaN for an invalid component (see :func:`mixture_logpdf`)."""
    m, v, lw = means.to(acc), variances.to(acc), log_weights.to(acc)
    root = torch.sqrt(v)
    valid = torch.isfinite(m) & (v > 0) & torch.isfinite(v) & ~torch.isnan(lw) & (lw != torch.inf)
    return m, 1.0 / root, torch.where(valid, lw - torch.log(root), torch.nan)


def _chunks(x, means, variances, log_weights):
    """(flat x in the arithmetic dtype, the [chunk, K] terms of an x chunk, z of an x chunk, the
    components, the chunk length): the [chunk, K] matrices stay a bounded size."""
    acc = _common.acc_dtype(x.dtype, means.dtype, variances.dtype, log_weights.dtype)
    m, s, c = components(means, variances, log_weights, acc)

    def z_of(xs):
        return (xs.unsqueeze(1) - m) * s

    def terms(xs):
        return c - 0.5 * z_of(xs) ** 2

    return x.reshape(-1).to(acc), terms, z_of, (m, s, c), max(1, (1 << 22) // max(m.shape[0], 1))


def _shifted_exp(terms):
    """(exp(terms - top), its sum over dim 1, top), top each row's max term: 0 for a row of -inf
    terms (density 0: every exponential 0, the sum 0); a NaN term makes the row's sum NaN."""
    top = terms.amax(1)
    shift = torch.where(torch.isneginf(top), 0, top)  # amax propagates NaN, and NaN stays NaN
    e = torch.exp(terms - shift.unsqueeze(1))
    return e, e.sum(1), shift


def _log_sum_exp(terms):
    """logsumexp over dim 1: -inf for a row of -inf terms (density 0), NaN for a row with a NaN."""
    _, total, shift = _shifted_exp(terms)
    return shift + torch.log(total)


def _responsibilities(terms, g):
    """``g exp(term_k - top) / sum_j exp(term_j - top)``, each row's softmax of its terms times its
    upstream gradient, summing to ``g`` at any distance from the components; ``exp(term_k - out)``
    would take the rounding of the float32 log density (``ulp(z^2 / 2)``, 2^-5 at z = 1,000
    standard deviations, 2^9 at 100,000). A row of density 0 (a sum of 0) gets zeros."""
    e, total, _ = _shifted_exp(terms)
    scale = torch.where(total == 0, 0, g / total)
    return scale.unsqueeze(1) * e


def reference(x, means, variances, log_weights):
    """The definition, in PyTorch, a bounded chunk of elements at a time."""
    flat, terms, _, _, chunk = _chunks(x, means, variances, log_weights)
    out = torch.cat([_log_sum_exp(terms(part)) for part in flat.split(chunk)]) if flat.numel() else flat
    return out.reshape(x.shape)


def _gradient_terms(r, z, s):
    """The [chunk, K] terms of the gradients of responsibilities ``r``: ``r z s`` (in a mean; in x
    negated) and ``r (z^2 - 1) s^2 / 2`` (in a variance). A zero responsibility adds nothing, also
    where z is infinite."""
    zero = r == 0
    return torch.where(zero, 0, r * z * s), torch.where(zero, 0, 0.5 * r * (z * z - 1) * (s * s))


def reference_backward(grad, x, out, means, variances, log_weights):
    """The gradients of :func:`reference` in x, means, variances and log_weights, from the
    responsibilities ``r_k = grad * exp(term_k - out)`` of each element, a chunk at a time, taken
    as the softmax of its terms (:func:`_responsibilities`): ``out`` only says where the density
    is 0."""
    flat, terms, z_of, (m, s, c), chunk = _chunks(x, means, variances, log_weights)
    acc = flat.dtype
    g_all, o_all = grad.reshape(-1).to(acc), out.reshape(-1).to(acc)
    grad_x = torch.empty_like(flat)
    grad_m, grad_v, grad_w = (torch.zeros(m.shape, dtype=acc, device=flat.device) for _ in range(3))
    for start in range(0, flat.numel(), chunk):
        xs, g, o = flat[start:start + chunk], g_all[start:start + chunk], o_all[start:start + chunk]
        g = torch.where(torch.isneginf(o), 0, g)  # density 0: no responsibilities, zero gradients
        r = _responsibilities(terms(xs), g)  # [chunk, K]
        rz, rv = _gradient_terms(r, z_of(xs), s)
        grad_x[start:start + chunk] = -rz.sum(1)
        grad_m += rz.sum(0)
        grad_v += rv.sum(0)
        grad_w += r.sum(0)
    return (grad_x.reshape(x.shape).to(x.dtype), grad_m.to(means.dtype), grad_v.to(variances.dtype),
            grad_w.to(log_weights.dtype))


def reference_with_grads(x, means, variances, log_weights):
    """:func:`reference` and, per element, its gradients in x and in a variance added to every
    component (the backward's terms with an upstream gradient of 1, summed over the components)."""
    flat, terms, z_of, (m, s, c), chunk = _chunks(x, means, variances, log_weights)
    out, grad_x, grad_shift = (torch.empty_like(flat) for _ in range(3))
    for start in range(0, flat.numel(), chunk):
        xs = flat[start:start + chunk]
        e, total, shift = _shifted_exp(terms(xs))
        r = e / torch.where(total == 0, 1, total).unsqueeze(1)  # density 0: every r is 0
        rz, rv = _gradient_terms(r, z_of(xs), s)
        part = slice(start, start + chunk)
        out[part], grad_x[part], grad_shift[part] = shift + torch.log(total), -rz.sum(1), rv.sum(1)
    return tuple(t.reshape(x.shape) for t in (out, grad_x, grad_shift))


def _fake(x, means, variances, log_weights):
    dtype = _common.acc_dtype(x.dtype, means.dtype, variances.dtype, log_weights.dtype)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def _fake_with_grads(x, means, variances, log_weights):
    return tuple(_fake(x, means, variances, log_weights) for _ in range(3))


def _fake_backward(grad, x, out, means, variances, log_weights):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(means),
            torch.empty_like(variances), torch.empty_like(log_weights))


def _triton_entry(kernel: str):
    """The Triton entry of the forward ``kernel`` of :mod:`dirfast.triton.mixture_logpdf`, given
    the components in the arithmetic dtype."""
    def run(x, means, variances, log_weights):
        from ..triton import mixture_logpdf as kernels

        acc = _common.acc_dtype(x.dtype, means.dtype, variances.dtype, log_weights.dtype)
        return getattr(kernels, kernel)(x, *components(means, variances, log_weights, acc))
    return run


def _triton_backward(grad, x, out, means, variances, log_weights):
    from ..triton import mixture_logpdf as kernels

    grad_x, grad_m, grad_v, grad_w = kernels.mixture_logpdf_backward(
        grad, x, out, *components(means, variances, log_weights, out.dtype))
    return grad_x, grad_m.to(means.dtype), grad_v.to(variances.dtype), grad_w.to(log_weights.dtype)


_common.define(SCHEMA, reference, _fake, _triton_entry("mixture_logpdf"))
_common.define(SCHEMA_BACKWARD, reference_backward, _fake_backward, _triton_backward)
_common.define(SCHEMA_WITH_GRADS, reference_with_grads, _fake_with_grads, _triton_entry("mixture_logpdf_with_grads"))


# -------------------------------------------------------------------------------- autograd
# The backward recomputes each element's responsibilities from the saved output instead of
# keeping an [N, K] matrix.
def _save(ctx, inputs, output) -> None:
    x, means, variances, log_weights = inputs
    ctx.save_for_backward(x, output, means, variances, log_weights)


def _backward(ctx, grad):
    x, out, means, variances, log_weights = ctx.saved_tensors
    return ctx.kernel("mixture_logpdf_backward")(grad.contiguous(), x, out, means, variances, log_weights)


_dispatch.register_autograd("mixture_logpdf", _save, _backward)
