"""``dirfast::conr_loss``: the per-anchor losses of ConR (Keramati, Meng, Evans, ICLR 2024), the
contrastive regulariser that pulls features of similar labels together and pushes apart features
whose predictions are similar but whose labels are not, without the [N, N] masks and float
temporaries of the published vectorised code.

Kernels: the reference below; ``csrc/cpu/conr_loss.cpp``; ``dirfast/triton/conr_loss.py`` (on a
GPU). The forward needs the cosine of each anchor with its members (its positives and
negatives) and one fused pass per anchor; the backward recomputes them and turns each anchor's
coefficients ``G_aj = grad_a * d out_a / d prod_aj`` into feature gradients. Where the members
are a small share of the pairs (real labels: a few percent), the C++ kernel takes only their dot
products, as sparse rows; otherwise the cosine rows and the gradients are matrix products.
"""

from __future__ import annotations

import math

import torch

from . import _checks, _common, _dispatch

PUSHES = ("exp", "linear")

_ARGS = ("Tensor features, Tensor labels, Tensor preds, Tensor weights, float w, float tau, float e, str push, "
         "bool exp0_terms, bool anchor_in_divisor, SymInt offset, SymInt count")
SCHEMA = f"conr_loss({_ARGS}) -> Tensor"
SCHEMA_BACKWARD = f"conr_loss_backward(Tensor grad, {_ARGS}) -> Tensor"


def conr_loss(features: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, weights: torch.Tensor,
              w: float = 1.0, tau: float = 0.07, e: float = 0.01, push: str = "exp", exp0_terms: bool = True,
              anchor_in_divisor: bool = False, offset: int = 0, count: int | None = None) -> torch.Tensor:
    """The ConR loss of each anchor: rows ``offset .. offset + count - 1`` of ``features``
    against all ``m`` rows (the keys; under DDP the anchors are the local rows of a gathered
    batch).

    With ``q_j = z_j / max(||z_j||, 1e-12)``, ``prod_ij = q_i . q_j / tau``, the L1 distances
    ``l_ij`` of the labels and ``p_ij`` of the predictions, the positives
    ``P(i) = {j != i : l_ij <= w}`` and negatives ``Q(i) = {j : l_ij > w, p_ij <= w}``:
    ``out_i = -1/div_i sum_{j in P(i)} (prod_ij - log(pos_i + neg_i))`` with
    ``neg_i = sum_{Q(i)} push_ij exp(prod_ij)``, ``push_ij = weights_i exp(e l_ij)``
    (``push="exp"``, the AgeDB-DIR / IMDB-WIKI-DIR code) or ``weights_i e l_ij``
    (``"linear"``, NYUD2-DIR), ``pos_i = sum_{P(i)} exp(prod_ij)`` plus ``m - |P(i)|`` when
    ``exp0_terms`` (the published masking adds exp(0) = 1 for each non-positive, the anchor
    included), and ``div_i = |P(i)|`` (+1 with ``anchor_in_divisor``, NYUD2-DIR's).

    Args:
        features: ``[m, D]`` floating, any strides.
        labels, preds: ``[m, L]`` floating (one shape), on the device of ``features``.
        weights: ``[m]`` floating, the per-row (LDS) weights.
        w: the label and prediction threshold, finite, >= 0. tau: the temperature, > 0, a normal
            number in the dtype the op computes in (at least 1.18e-38 in float32).
        e: the pushing strength, finite. push: ``"exp"`` or ``"linear"``.
        exp0_terms, anchor_in_divisor: the published variants above (bools).
        offset, count: the anchors (``count=None``: up to the last row).

    Returns:
        ``[count]`` per-anchor losses, float32 (float64 when an input is float64); only
        ``features`` gets a gradient (the masks depend on labels and predictions only; ``weights``
        that require grad are refused, NotImplementedError: their derivative is not computed).

    An anchor with no negatives gives 0 (as published); one with no positives gives 0 too (the
    published code would give 0/0 = NaN). ``log(pos + neg)`` is computed shifted by the largest
    exponent among its terms (``prod``, ``prod + e l`` for an exp push, and 0 for the exp(0)
    terms), a negative term counting only when its push is not 0, so a small ``tau`` does not
    overflow; and ``out_i = |P(i)| / div_i * (log(pos_i + neg_i) - mean_{P(i)} cos / tau)``, the
    positives' mean cosine divided by tau last: ``|P(i)| log(...)`` and ``sum_{P(i)} prod`` would
    each pass float32's range at a small tau (inf - inf) where the loss, below ``2 / tau`` plus
    logs, does not. Values are not checked: a NaN feature gives NaN in every anchor whose pairs it
    is in; a NaN label puts its row in no pair, a NaN prediction in no negative pair.
    """
    m = _checks.features_and_labels(features, labels)
    _checks.floating("preds", preds)
    if preds.shape != labels.shape:
        raise ValueError(f"preds must have the shape of labels {tuple(labels.shape)}, got {tuple(preds.shape)}")
    _checks.floating("weights", weights)
    if tuple(weights.shape) != (m,):
        raise ValueError(f"weights must have shape ({m},) (one weight per row of features), got "
                         f"{tuple(weights.shape)}")
    for name, value in (("preds", preds), ("weights", weights)):
        if value.device != features.device:
            raise ValueError(f"{name} is on {value.device} but features is on {features.device}")
    acc = _common.acc_dtype(features.dtype, labels.dtype, preds.dtype, weights.dtype)  # the kernels' (and C++ check's)
    w = _checks.real("w", w, low=0.0, dtype=acc)
    tau = _checks.real("tau", tau, low=0.0, above=True, dtype=acc, reciprocal=True)
    e = _checks.real("e", e, dtype=acc)
    _checks.choice("push", push, PUSHES)
    exp0_terms = _checks.boolean("exp0_terms", exp0_terms)
    anchor_in_divisor = _checks.boolean("anchor_in_divisor", anchor_in_divisor)
    offset = _checks.integer("offset", offset)
    count = _checks.anchors(m, offset, None if count is None else _checks.integer("count", count))
    return _dispatch.call("conr_loss", features.device, features, labels, preds, weights, w, tau, e, push,
                          exp0_terms, anchor_in_divisor, offset, count)


# -------------------------------------------------------------------------------- reference
def _rows(features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor, offset, count):
    """The [count, m] pieces of the anchors' losses: the normalised rows and their norms, the
    cosines, the positives, each term's exponent ``x`` (-inf outside the sum) and coefficient,
    the shifted terms and, per anchor, |P|, the divisor, the log of the sum, and validity."""
    acc = _common.acc_dtype(features.dtype, labels.dtype, preds.dtype, weights.dtype)
    m, device = features.shape[0], features.device
    q, norms = _common.normalize_rows(features, acc)
    qa = q[offset:offset + count]
    cosine = qa @ q.T
    prod = cosine / tau
    y, p = labels.to(acc), preds.to(acc)
    l = _common.l1_distances(y, y[offset:offset + count])
    d = _common.l1_distances(p, p[offset:offset + count])
    self_pair = torch.arange(m, device=device) == torch.arange(offset, offset + count, device=device)[:, None]
    pos = (l <= w) & ~self_pair  # a Python float compares in acc, as the kernels do
    neg = (l > w) & (d <= w)
    wt = weights.to(acc)[offset:offset + count, None]
    coef_neg, x_neg = (wt.expand_as(l), prod + e * l) if push == "exp" else (wt * (e * l), prod)
    member = pos | (neg & (coef_neg != 0))
    x = torch.where(pos, prod, torch.where(member, x_neg, -math.inf))
    coef = torch.where(pos, 1.0, torch.where(member, coef_neg, 0.0)).to(acc)
    n_pos, n_neg = pos.sum(1).to(acc), neg.sum(1)
    top = x.amax(1) if m else torch.zeros(count, dtype=acc, device=device)
    if exp0_terms:
        top = top.clamp_min(0.0)
    top = torch.where(top == -math.inf, 0.0, top)
    terms = coef * torch.exp(x - top[:, None])
    total = terms.sum(1)
    if exp0_terms:
        total = total + (m - n_pos) * torch.exp(-top)
    log_total = top + torch.log(total)
    div = n_pos + (1.0 if anchor_in_divisor else 0.0)
    valid = (n_pos > 0) & (n_neg > 0)
    return q, norms, cosine, pos, terms, total, n_pos, div, log_total, valid


def reference(features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor, offset, count):
    """The definition (see :func:`conr_loss`), on [count, m] matrices: ``|P| / div * (log of the
    sum - mean_P prod)``, the positives' mean product as their mean cosine over tau."""
    _, _, cosine, pos, _, _, n_pos, div, log_total, valid = _rows(
        features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor, offset, count)
    mean_prod = torch.where(pos, cosine, 0.0).sum(1) / n_pos.clamp_min(1.0) / tau
    return torch.where(valid, n_pos / div * (log_total - mean_prod), 0.0)


def reference_backward(grad, features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor,
                       offset, count):
    """The gradient of ``sum_a grad[a] out[a]`` in ``features``: ``G_aj = grad_a (|P| / div
    r_aj - [j in P] / div)`` with ``r_aj`` each term's share of the sum, then through
    ``prod = q_a . q_j / tau`` (both rows) and the normalisation."""
    q, norms, _, pos, terms, total, n_pos, div, _, valid = _rows(
        features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor, offset, count)
    g = grad.to(q.dtype)[:, None]
    coefficients = g * ((n_pos / div)[:, None] * (terms / total[:, None]) - pos / div[:, None])
    coefficients = torch.where(valid[:, None], coefficients, 0.0) / tau
    grad_q = coefficients.T @ q[offset:offset + count]
    grad_q[offset:offset + count] += coefficients @ q
    return _common.normalize_rows_backward(grad_q, q, norms).to(features.dtype)


def _fake(features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor, offset, count):
    acc = _common.acc_dtype(features.dtype, labels.dtype, preds.dtype, weights.dtype)
    return features.new_empty((count,), dtype=acc)


def _fake_backward(grad, features, *args):
    return features.new_empty(features.shape)


def _triton(features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor, offset, count):
    from ..triton import conr_loss as kernels

    return kernels.conr_loss(features, labels, preds, weights, w, tau, e, push == "exp", exp0_terms,
                             anchor_in_divisor, offset, count)


def _triton_backward(grad, features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor,
                     offset, count):
    from ..triton import conr_loss as kernels

    return kernels.conr_loss_backward(grad, features, labels, preds, weights, w, tau, e, push == "exp", exp0_terms,
                                      anchor_in_divisor, offset, count)


_common.define(SCHEMA, reference, _fake, _triton)
_common.define(SCHEMA_BACKWARD, reference_backward, _fake_backward, _triton_backward)


# -------------------------------------------------------------------------------- autograd
# Nothing of size [count, m] is kept: the backward recomputes the cosine rows.
def _save(ctx, inputs, output) -> None:
    features, labels, preds, weights, *options = inputs
    ctx.save_for_backward(features, labels, preds, weights)
    ctx.options = options


def _backward(ctx, grad):
    features, labels, preds, weights = ctx.saved_tensors
    grad_features = ctx.kernel("conr_loss_backward")(grad.contiguous(), features, labels, preds, weights, *ctx.options)
    return (grad_features,) + (None,) * 11


_dispatch.register_autograd("conr_loss", _save, _backward)
_dispatch.without_derivative("conr_loss", "weights")
