"""``dirfast::rnc_loss``: the per-anchor Rank-N-Contrast loss (Zha et al., NeurIPS 2023) in
O(m^2 log m + m^2 D) time and O(m) memory per anchor, where the published code takes O(m^3) time
and builds an [m, m, D] tensor.

For anchor row ``i`` and every other row ``j`` of the m rows: the L1 label distance ``d_ij``,
the logit ``s_ij = -||z_i - z_j|| / temperature`` and ``S_ij``, the sum of ``exp(s_ik)`` over
the rows ``k != i`` at least as far from ``i`` in label as ``j`` (``j`` itself included).
``out = -1/(m-1) * sum_{j != i} (s_ij - log S_ij)``. Sorting the row by label distance makes
every ``S_ij`` a suffix sum (a tie group shares the suffix starting at its first member).

Every backend keeps each sum in distance units: ``S = exp(-low / t) * total`` with ``low`` the
smallest distance in the suffix and ``total = sum exp((low - r_k) / t)`` (in [1, m - 1]), so that
``s_ij - log S_ij = (low - r_ij) / t - log total`` and
``out = sum (r_ij - low) / (m - 1) / t + sum log total / (m - 1)``: no exponent is above 0 and
nothing is divided by t before the distances are subtracted. (Logits ``-r / t`` overflow float32
where ``r / t`` passes 3.4e38 while the loss may not, and ``-low / t + log total`` rounds the
``log total`` away once ``r / t`` is large: the gradient's weights came out wrong by factors.)

Kernels: the reference below; ``csrc/cpu/rnc_loss.cpp``; ``dirfast/triton/rnc_loss.py``.
"""

from __future__ import annotations

import math

import torch

from . import _checks, _common, _dispatch

_ARGS = "Tensor features, Tensor labels, float temperature, SymInt offset, SymInt count"
SCHEMA = f"rnc_loss({_ARGS}) -> Tensor"
SCHEMA_BACKWARD = f"rnc_loss_backward(Tensor grad, {_ARGS}) -> Tensor"


def rnc_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0, offset: int = 0,
             count: int | None = None) -> torch.Tensor:
    """The Rank-N-Contrast loss of each anchor row ``offset .. offset + count - 1`` against all
    ``m`` rows (the keys).

    Args:
        features: ``[m, D]`` floating features (any strides); the gradient flows to every row.
        labels: ``[m, L]`` floating labels, ``L >= 1``; two rows are ``sum_k |y_ik - y_jk|``
            apart. Constant (no gradient).
        temperature: a finite real number > 0 dividing the feature distances, a normal number in
            the dtype the op computes in (at least 1.18e-38 in float32).
        offset, count: the anchors, ``0 <= offset``, ``0 <= count``, ``offset + count <= m``;
            ``count=None`` means ``m - offset`` (under DDP: the local rows among gathered keys).

    Returns:
        ``[count]`` per-anchor losses, float32 (float64 if an input is float64); 0 when
        ``m == 1``. The published loss on ``n`` rows is ``rnc_loss(z, y).mean()``.

    Values are not checked (no host synchronisation): NaN features or labels give NaN. Two identical
    feature rows are exactly 0 apart, and a zero distance passes no gradient (as torch's norm).
    """
    m = _checks.features_and_labels(features, labels)
    temperature = _checks.real("temperature", temperature, 0.0, above=True,
                               dtype=_common.acc_dtype(features.dtype, labels.dtype), reciprocal=True)
    offset = _checks.integer("offset", offset)
    count = _checks.anchors(m, offset, None if count is None else _checks.integer("count", count))
    return _dispatch.call("rnc_loss", features.device, features, labels, temperature, offset, count)


# -------------------------------------------------------------------------------- reference
CHUNK_PAIRS = 1 << 20  # anchors x keys per chunk of the reference: its [c, m] matrices stay this size


def _rows(features, labels, temperature, offset, count):
    """Per chunk of anchors ``[a0, a1)``: ``(a0, a1, z, za, dist, r_sorted, order, d_sorted, keep)``
    -- the features in the arithmetic dtype, the anchors' features, their distances to every row
    ``[c, m]``, the distances sorted by label distance (the anchor itself first, at +inf), the
    sorting order, the sorted label distances and which sorted entries are not the anchor.
    Chunks of about CHUNK_PAIRS pairs keep the [c, m] matrices a bounded size."""
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    z, y = features.to(acc), labels.to(acc)
    m = z.shape[0]
    chunk = max(1, CHUNK_PAIRS // max(m, 1))
    for a0 in range(0, count, chunk):
        a1 = min(count, a0 + chunk)
        za, ya = z[offset + a0:offset + a1], y[offset + a0:offset + a1]
        dist = torch.cdist(za, z, compute_mode="donot_use_mm_for_euclid_dist")
        d = _common.l1_distances(y, ya)  # in label order, as every kernel: ties are exact ties
        rows = torch.arange(offset + a0, offset + a1, device=z.device)
        is_self = torch.arange(m, device=z.device)[None, :] == rows[:, None]
        dist = torch.where(torch.isnan(d), math.nan, dist)  # a NaN label: NaN pairs, NaN losses
        d = d.masked_fill(is_self, -math.inf)
        d_sorted, order = torch.sort(d, dim=1, stable=True)
        r_sorted = dist.masked_fill(is_self, math.inf).gather(1, order)
        yield a0, a1, z, za, dist, r_sorted, order, d_sorted, order != rows[:, None]


SCAN_BLOCK = 32  # entries per step of the reference's scans ([c, 32, 32] terms at a time)


def _scan(v, w, temperature):
    """Along each row of ``v`` [c, n], at every entry p: ``low[p] = min(v[..p])`` and
    ``total[p] = sum_{q <= p} w[q] exp((low[p] - v[q]) / t)`` -- exponents <= 0, the scale kept
    apart from the sum. A block of entries at a time, with the block before's (low, total)."""
    c, n = v.shape
    low, total = torch.empty_like(v), torch.empty_like(v)
    carry_low, carry = v.new_full((c, 1), math.inf), v.new_zeros((c, 1))
    upto = torch.ones(SCAN_BLOCK, SCAN_BLOCK, dtype=torch.bool, device=v.device).tril()  # q <= p
    for b0 in range(0, n, SCAN_BLOCK):
        vb, wb = v[:, b0:b0 + SCAN_BLOCK], w[:, b0:b0 + SCAN_BLOCK]
        k = vb.shape[1]
        lb = torch.minimum(vb.cummin(1).values, carry_low)  # NaN spreads, as through the sums
        terms = wb[:, None, :] * torch.exp((lb[:, :, None] - vb[:, None, :]) / temperature)
        tb = torch.where(upto[:k, :k], terms, 0).sum(2)
        tb = tb + torch.where(carry == 0, 0, carry * torch.exp((lb - carry_low) / temperature))
        low[:, b0:b0 + k], total[:, b0:b0 + k] = lb, tb
        carry_low, carry = lb[:, -1:], tb[:, -1:]
    return low, total


def _suffix(r_sorted, keep, d_sorted, temperature):
    """``(low, total)`` at each sorted entry for the suffix from the first entry of its tie group:
    ``S = exp(-low / t) * total``."""
    low, total = _scan(r_sorted.flip(1), keep.flip(1).to(r_sorted.dtype), temperature)
    start = torch.searchsorted(d_sorted, d_sorted, side="left").clamp_(max=d_sorted.shape[1] - 1)  # NaN: past the end
    return low.flip(1).gather(1, start), total.flip(1).gather(1, start)


def reference(features, labels, temperature, offset, count):
    """The definition in PyTorch, a chunk of anchors at a time (sort, suffix sums in distance units)."""
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    m = features.shape[0]
    out = torch.zeros(count, dtype=acc, device=features.device)
    if m < 2:
        return out
    for a0, a1, _, _, _, r_sorted, _, d_sorted, keep in _rows(features, labels, temperature, offset, count):
        low, total = _suffix(r_sorted, keep, d_sorted, temperature)
        spread = torch.where(keep, r_sorted - low, 0).sum(1)
        logs = torch.where(keep, torch.log(total), 0).sum(1)
        out[a0:a1] = spread / (m - 1) / temperature + logs / (m - 1)
    return out


def reference_backward(grad, features, labels, temperature, offset, count):
    """The gradient in ``features`` of ``sum_a grad[a] * out[a]``: per anchor, with
    ``c = grad[a] / (m - 1)``, ``dL/ds_k = c * (exp(s_k) * sum_{j: d_j <= d_k} 1 / S_j - 1)``, where
    ``exp(s_k) sum_j 1 / S_j = exp((low_k - r_k) / t) sum_j exp((low_j - low_k) / t) / total_j`` (a
    prefix scan to the end of k's tie group; ``low`` only grows along the row), then through the
    distances: ``w_k = dL/ds_k / r_k`` (0 where ``r_k = 0``), the anchor gets
    ``sum_k w_k (z_k - z_i) / t`` and each key ``w_k (z_i - z_k) / t`` (t divides last: per pair,
    ``dL/ds / (r t)`` passes float32's range for pairs 0.1 apart at t = 1e-38). Those sums are
    products of the rows less their mean (``_common.centred_rows``): of the rows themselves, they
    cancel where the rows share an offset far larger than their spread."""
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    m = features.shape[0]
    total = torch.zeros(features.shape, dtype=acc, device=features.device)
    if m < 2:
        return total.to(features.dtype)
    g = grad.to(acc) / (m - 1)
    zc = None
    for a0, a1, z, za, dist, r_sorted, order, d_sorted, keep in _rows(features, labels, temperature, offset, count):
        zc = _common.centred_rows(z) if zc is None else zc
        za = zc[offset + a0:offset + a1]
        low, sums = _suffix(r_sorted, keep, d_sorted, temperature)
        _, prefix = _scan(-low, torch.where(keep, 1 / sums, 0), temperature)
        last = torch.searchsorted(d_sorted, d_sorted, side="right") - 1
        weight = prefix.gather(1, last) * torch.exp((low - r_sorted) / temperature)
        g_sorted = torch.where(keep, g[a0:a1, None] * (weight - 1), 0)
        g_s = torch.zeros_like(g_sorted).scatter_(1, order, g_sorted)
        w = torch.where(dist == 0, 0, g_s / dist)  # NaN distances stay NaN
        total[offset + a0:offset + a1] += w @ zc - w.sum(1, keepdim=True) * za
        total += w.t() @ za - w.sum(0)[:, None] * zc
    return (total / temperature).to(features.dtype)


def _fake(features, labels, temperature, offset, count):
    return features.new_empty((count,), dtype=_common.acc_dtype(features.dtype, labels.dtype))


def _fake_backward(grad, features, labels, temperature, offset, count):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _triton(features, labels, temperature, offset, count):
    from ..triton import rnc_loss as kernels

    return kernels.rnc_loss(features, labels, temperature, offset, count)


def _triton_backward(grad, features, labels, temperature, offset, count):
    from ..triton import rnc_loss as kernels

    return kernels.rnc_loss_backward(grad, features, labels, temperature, offset, count)


_common.define(SCHEMA, reference, _fake, _triton)
_common.define(SCHEMA_BACKWARD, reference_backward, _fake_backward, _triton_backward)


# -------------------------------------------------------------------------------- autograd
# The backward recomputes the distances and sorts (nothing of size m x m is saved); only the
# features get a gradient.
def _save(ctx, inputs, output) -> None:
    features, labels, temperature, offset, count = inputs
    ctx.save_for_backward(features, labels)
    ctx.args = (temperature, offset, count)


def _backward(ctx, grad):
    features, labels = ctx.saved_tensors
    grad_features = ctx.kernel("rnc_loss_backward")(grad.contiguous(), features, labels, *ctx.args)
    return grad_features, None, None, None, None


_dispatch.register_autograd("rnc_loss", _save, _backward)
