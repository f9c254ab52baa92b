"""The Triton kernels of ``dirfast::conr_loss``: the per-anchor ConR losses and the
coefficients of their backward.

The launch functions normalise the rows and take the cosine rows of the anchors with torch.mm
(glue); one program per anchor then walks its row BLOCK keys at a time, recomputing the L1
label and prediction distances, the masks, exponents and coefficients in each pass: pass 1 the
shift (largest exponent), the counts and the sum of positive products; pass 2 the shifted sum;
in the backward, pass 3 writes the coefficients ``G_aj / tau`` into a [count, m] buffer, which
torch.mm turns into the gradient of the normalised rows. w, tau and e come in a tensor of the
arithmetic dtype (a Python float would be a float32 argument). No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import acc_dtype, normalize_rows, normalize_rows_backward
from . import _common



@triton.jit
def _pairs(cos_row, y_ptr, p_ptr, cols, i, m, L, wi, w, tau, e, PUSH_EXP: tl.constexpr):
    """Keys ``cols``: the cosine, prod, each term's exponent (-inf outside the sum) and coefficient
    (0 outside), and the positive and negative masks."""
    live = cols < m
    dl = tl.zeros(cols.shape, tau.dtype)
    dp = tl.zeros(cols.shape, tau.dtype)
    for k in range(0, L):  # labels and predictions are [L, m], contiguous
        dl += tl.abs(tl.load(y_ptr + k * m + i) - tl.load(y_ptr + k * m + cols, mask=live, other=0.0))
        dp += tl.abs(tl.load(p_ptr + k * m + i) - tl.load(p_ptr + k * m + cols, mask=live, other=0.0))
    cos = tl.load(cos_row + cols, mask=live, other=0.0)
    prod = cos / tau
    pos = live & (dl <= w) & (cols != i)
    neg = live & (dl > w) & (dp <= w)
    if PUSH_EXP:
        coef_neg = tl.zeros(cols.shape, tau.dtype) + wi
        x_neg = prod + e * dl
    else:
        coef_neg = wi * (e * dl)
        x_neg = prod
    member = pos | (neg & (coef_neg != 0.0))
    x = tl.where(pos, prod, tl.where(member, x_neg, float("-inf")))
    coef = tl.where(pos, 1.0, tl.where(member, coef_neg, 0.0))
    return cos, prod, x, coef, pos, neg


@triton.jit
def _conr_kernel(cos_ptr, y_ptr, p_ptr, wt_ptr, par_ptr, out_ptr, grad_ptr, m, L, offset,
                 PUSH_EXP: tl.constexpr, EXP0: tl.constexpr, ANCHOR_DIV: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Anchor ``program_id``: its loss (forward) or its coefficients G / tau over its cosine row
    (backward, ``out_ptr`` the [count, m] buffer)."""
    a = tl.program_id(0).to(tl.int64)
    i = offset + a
    w = tl.load(par_ptr)
    tau = tl.load(par_ptr + 1)
    e = tl.load(par_ptr + 2)
    wi = tl.load(wt_ptr + i)
    cos_row = cos_ptr + a * m
    base = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], float("-inf"), tau.dtype)
    sum_cos = tl.zeros([BLOCK], tau.dtype)
    n_pos = tl.zeros([BLOCK], tl.int32)
    n_neg = tl.zeros([BLOCK], tl.int32)
    for j0 in range(0, m, BLOCK):
        cos, prod, x, coef, pos, neg = _pairs(cos_row, y_ptr, p_ptr, j0 + base, i, m, L, wi, w, tau, e, PUSH_EXP)
        top = tl.maximum(top, x)
        sum_cos += tl.where(pos, cos, 0.0)
        n_pos += pos.to(tl.int32)
        n_neg += neg.to(tl.int32)
    shift = tl.max(top, 0)
    if EXP0:
        shift = tl.maximum(shift, 0.0)
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    total = tl.zeros([BLOCK], tau.dtype)
    for j0 in range(0, m, BLOCK):
        cos, prod, x, coef, pos, neg = _pairs(cos_row, y_ptr, p_ptr, j0 + base, i, m, L, wi, w, tau, e, PUSH_EXP)
        total += coef * tl.exp(x - shift)
    positives = tl.sum(n_pos, 0)
    total_sum = tl.sum(total, 0)
    if EXP0:
        total_sum += (m - positives).to(tau.dtype) * tl.exp(-shift)
    n = positives.to(tau.dtype)
    valid = (positives > 0) & (tl.sum(n_neg, 0) > 0)
    div = tl.where(valid, n + ANCHOR_DIV, 1.0)  # an anchor without pairs gives 0: no 0 / 0 computed
    if BACKWARD:
        # (share term / total - minus pos) / tau: each term's share of the sum first (at most 1), tau
        # last (g |P| / total / tau passes float32's range at the smallest tau where total < 1)
        g = tl.load(grad_ptr + a).to(tau.dtype)
        share = g * (n / div)
        minus = g / div
        safe_total = tl.where(valid, total_sum, 1.0)
        for j0 in range(0, m, BLOCK):
            cols = j0 + base
            cos, prod, x, coef, pos, neg = _pairs(cos_row, y_ptr, p_ptr, cols, i, m, L, wi, w, tau, e, PUSH_EXP)
            value = (share * (coef * tl.exp(x - shift) / safe_total) - tl.where(pos, minus, 0.0)) / tau
            tl.store(out_ptr + a * m + cols, tl.where(valid, value, 0.0), mask=cols < m)
    else:
        # |P| / div (log of the sum - the positives' mean cosine / tau): no |P| / tau formed
        mean_prod = tl.sum(sum_cos, 0) / tl.where(valid, n, 1.0) / tau
        loss = n / div * ((shift + tl.log(total_sum)) - mean_prod)
        tl.store(out_ptr + a, tl.where(valid, loss, 0.0))


def _block(m: int) -> tuple:
    """(BLOCK keys, warps)."""
    if _common.INTERPRET:
        return min(_common.next_pow2(m), 64), 1
    return min(max(_common.next_pow2(m), 128), 1024), 4


def _prepare(features, labels, preds, weights, w, tau, e, offset, count):
    """The arithmetic dtype, the normalised rows and their norms, the anchors' cosine rows, the
    transposed labels and predictions, the weights and the parameters, all contiguous."""
    acc = acc_dtype(features.dtype, labels.dtype, preds.dtype, weights.dtype)
    q, norms = normalize_rows(features, acc)
    cosine = torch.mm(q[offset:offset + count], q.T).contiguous()
    params = torch.full((3,), w, dtype=acc, device=features.device)
    params[1], params[2] = tau, e  # fills on the device: no copy from the host
    return (acc, q, norms, cosine, labels.to(acc).T.contiguous(), preds.to(acc).T.contiguous(),
            weights.to(acc).contiguous(), params)


def _launch(cosine, labels_t, preds_t, weights, params, out, grad, m, offset, count, push_exp, exp0_terms,
            anchor_in_divisor, backward):
    block, warps = _block(m)
    with _common.device_guard(cosine):
        _conr_kernel[(count,)](cosine, labels_t, preds_t, weights, params, out, grad, m, labels_t.shape[0], offset,
                               PUSH_EXP=push_exp, EXP0=exp0_terms, ANCHOR_DIV=int(anchor_in_divisor),
                               BACKWARD=backward, BLOCK=block, num_warps=warps)


def conr_loss(features, labels, preds, weights, w, tau, e, push_exp, exp0_terms, anchor_in_divisor, offset, count):
    """:func:`dirfast.ops.conr_loss` (``push_exp``: the push is ``"exp"``)."""
    _common.check_device(features, "conr_loss")
    acc = acc_dtype(features.dtype, labels.dtype, preds.dtype, weights.dtype)
    out = torch.empty(count, dtype=acc, device=features.device)
    if count == 0:
        return out
    _, _, _, cosine, labels_t, preds_t, wt, params = _prepare(features, labels, preds, weights, w, tau, e, offset,
                                                               count)
    _launch(cosine, labels_t, preds_t, wt, params, out, out, features.shape[0], offset, count, push_exp, exp0_terms,
            anchor_in_divisor, False)
    return out


def conr_loss_backward(grad, features, labels, preds, weights, w, tau, e, push_exp, exp0_terms, anchor_in_divisor,
                       offset, count):
    """The gradient of ``sum_a grad[a] out[a]`` in ``features`` (features' dtype)."""
    _common.check_device(features, "conr_loss_backward")
    m = features.shape[0]
    if count == 0:
        return torch.zeros(features.shape, dtype=features.dtype, device=features.device)
    acc, q, norms, cosine, labels_t, preds_t, wt, params = _prepare(features, labels, preds, weights, w, tau, e,
                                                                     offset, count)
    coefficients = torch.empty((count, m), dtype=acc, device=features.device)
    _launch(cosine, labels_t, preds_t, wt, params, coefficients, grad.to(acc).contiguous(), m, offset, count,
            push_exp, exp0_terms, anchor_in_divisor, True)
    if 2 * count >= m:  # one [m, m] product costs no more than two [count, m] ones
        full = torch.zeros((m, m), dtype=acc, device=features.device)
        full[offset:offset + count] = coefficients
        grad_q = (full + full.T) @ q
    else:
        grad_q = coefficients.T @ q[offset:offset + count]
        grad_q[offset:offset + count] += coefficients @ q
    return normalize_rows_backward(grad_q, q, norms).to(features.dtype)
