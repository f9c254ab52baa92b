"""``dirfast::ranksim_loss``: RankSim's per-anchor rank-similarity loss (Gong, Mori, Tung, ICML
2022) on the anchors ``offset .. offset + count - 1`` of a batch, against every kept row as key,
and its blackbox-differentiation backward (Vlastelica et al. 2020), without an [m, m, D] tensor.

For a kept anchor ``i``, over the kept keys ``K`` (``M = |K|``, the anchor itself included):
``C_ij = q_i . q_j`` with ``q = F.normalize(z)``, ``l_ij = sum_k |y_ik - y_jk|``,
``rn(v) = (rank(v) + 1) / M`` with ``rank`` the 0-based DESCENDING rank among the kept keys,
and ``out = (1/M) sum_j (rn(C_i)_j - rn(-l_i)_j)^2``; an anchor that is not kept gives 0.
Ties are broken by key index, the higher index first, so every backend gives the same ranks:
the published ranking ``argsort(argsort(v).flip(1))`` with a stable sort (the STS-B-DIR code's;
the AgeDB-DIR one's torch.argsort is not stable, which leaves its ties unspecified).

Kernels: the reference below; ``csrc/cpu/ranksim_loss.cpp``; ``dirfast/triton/ranksim_loss.py``.
"""

from __future__ import annotations

import torch

from . import _checks, _common, _dispatch

_ARGS = "Tensor features, Tensor labels, Tensor keep, float lambda_val, SymInt offset, SymInt count"
SCHEMA = f"ranksim_loss({_ARGS}) -> Tensor"
SCHEMA_BACKWARD = f"ranksim_loss_backward(Tensor grad, {_ARGS}) -> Tensor"
LAMBDA_EPS = 1e-8    # the published backward divides by lambda + 1e-8


def ranksim_loss(features: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None,
                 lambda_val: float = 2.0, offset: int = 0, count: int | None = None) -> torch.Tensor:
    """RankSim's loss of each anchor row ``offset .. offset + count - 1`` of ``features``.

    Args:
        features: ``[m, D]`` floating features (any strides); only they get a gradient.
        labels: ``[m, L]`` floating labels (L >= 1); label distances are L1.
        keep: ``[m]`` bool, the rows taking part (RankSim keeps one row per distinct label);
            None keeps every row. Read on the device, never on the host.
        lambda_val: the blackbox interpolation strength (RankSim's ``--interpolation_lambda``),
            a finite real > 0; it only changes the gradient.
        offset, count: the anchors (default: every row from ``offset``); the keys are all rows.

    Returns:
        ``[count]`` per-anchor losses in float32 (float64 when an input is float64); the
        published loss is ``out.sum()`` with every row an anchor. An anchor with a NaN among its
        similarities or label distances gives NaN (and NaN gradients).
    """
    m = _checks.features_and_labels(features, labels)
    if keep is None:
        keep = torch.ones(m, dtype=torch.bool, device=features.device)
    _checks.tensor("keep", keep)
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
    if tuple(keep.shape) != (m,):
        raise ValueError(f"keep must have shape ({m},) (one flag per row of features), got {tuple(keep.shape)}")
    if keep.device != features.device:
        raise ValueError(f"keep is on {keep.device} but features is on {features.device}")
    lambda_val = _checks.real("lambda_val", lambda_val, 0.0, above=True,
                              dtype=_common.acc_dtype(features.dtype, labels.dtype))
    offset = _checks.integer("offset", offset)
    count = None if count is None else _checks.integer("count", count)
    count = _checks.anchors(m, offset, count)
    return _dispatch.call("ranksim_loss", features.device, features, labels, keep, lambda_val, offset, count)


# -------------------------------------------------------------------------------- reference
def ranks(values, keep):
    """The 0-based descending rank of each entry of each row of ``values`` among the kept
    columns (ties: the higher column first; NaN ranks above everything); garbage where
    ``keep`` is False."""
    order = _common.descending_order(values)
    kept = keep[order].to(torch.int64)
    before = torch.cumsum(kept, 1) - kept  # kept columns sorted before each position
    return torch.empty_like(order).scatter_(1, order, before)


def _rows(features, labels, keep, offset, count):
    """What forward and backward share, in the arithmetic dtype: q, the norms, M, the kept
    flags of the keys (as 0/1) and of the anchors, and the chunks of anchor rows (bounded
    [chunk, m] temporaries)."""
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    q, norm = _common.normalize_rows(features, acc)
    m = features.shape[0]
    kept = keep.to(acc)
    size = kept.sum()
    anchors_kept = keep[offset:offset + count]
    chunk = max(1, (1 << 20) // max(m, 1))
    return acc, q, norm, size, kept, anchors_kept, chunk


def _row_terms(q, labels, keep, size, start, stop, acc):
    """For anchor rows start .. stop - 1: C, rn(C), rn(-l), and whether a kept key's C or l is NaN."""
    cos = q[start:stop] @ q.T
    dist = _common.l1_distances(labels.to(acc), labels[start:stop].to(acc))
    rn_c = (ranks(cos, keep) + 1).to(acc) / size
    rn_l = (ranks(-dist, keep) + 1).to(acc) / size
    bad = ((torch.isnan(cos) | torch.isnan(dist)) & keep).any(1)
    return cos, rn_c, rn_l, bad


def reference(features, labels, keep, lambda_val, offset, count):
    """The definition, in PyTorch, a bounded chunk of anchor rows at a time."""
    acc, q, _, size, kept, anchors_kept, chunk = _rows(features, labels, keep, offset, count)
    parts = []
    for start in range(offset, offset + count, chunk):
        stop = min(start + chunk, offset + count)
        _, rn_c, rn_l, bad = _row_terms(q, labels, keep, size, start, stop, acc)
        diff = rn_c - rn_l
        loss = (diff * diff * kept).sum(1) / size
        loss = torch.where(bad, torch.nan, loss)
        parts.append(torch.where(anchors_kept[start - offset:stop - offset], loss, 0))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=features.device)


def reference_backward(grad, features, labels, keep, lambda_val, offset, count):
    """The gradient in features of ``sum_a grad[a] out[a]``: per kept anchor row the blackbox
    surrogate ``dC_ij = -(rn(C_i)_j - rn(C_i + lambda G_i)_j) / (lambda + 1e-8)`` with ``G`` the
    gradient of the loss in rn(C), then through C = q q^T and F.normalize."""
    acc, q, norm, size, kept, anchors_kept, chunk = _rows(features, labels, keep, offset, count)
    g_all = grad.to(acc)
    grad_q = torch.zeros_like(q)
    for start in range(offset, offset + count, chunk):
        stop = min(start + chunk, offset + count)
        cos, rn_c, rn_l, bad = _row_terms(q, labels, keep, size, start, stop, acc)
        g = g_all[start - offset:stop - offset].unsqueeze(1)
        shifted = cos + lambda_val * (g * 2 * (rn_c - rn_l) / size)
        rn_shifted = (ranks(shifted, keep) + 1).to(acc) / size
        d_cos = -(rn_c - rn_shifted) / (lambda_val + LAMBDA_EPS)
        d_cos = torch.where(bad.unsqueeze(1), torch.nan, d_cos)
        d_cos = torch.where(anchors_kept[start - offset:stop - offset].unsqueeze(1) & keep, d_cos, 0)
        grad_q[start:stop] += d_cos @ q
        grad_q += d_cos.T @ q[start:stop]
    return _common.normalize_rows_backward(grad_q, q, norm).to(features.dtype)


def _fake(features, labels, keep, lambda_val, offset, count):
    return features.new_empty((count,), dtype=_common.acc_dtype(features.dtype, labels.dtype))


def _fake_backward(grad, features, labels, keep, lambda_val, offset, count):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _triton(features, labels, keep, lambda_val, offset, count):
    from ..triton import ranksim_loss as kernels

    return kernels.ranksim_loss(features, labels, keep, lambda_val, offset, count)


def _triton_backward(grad, features, labels, keep, lambda_val, offset, count):
    from ..triton import ranksim_loss as kernels

    return kernels.ranksim_loss_backward(grad, features, labels, keep, lambda_val, offset, count)


_common.define(SCHEMA, reference, _fake, _triton)
_common.define(SCHEMA_BACKWARD, reference_backward, _fake_backward, _triton_backward)


# -------------------------------------------------------------------------------- autograd
# The backward recomputes the similarities and ranks (no [count, m] tensor is kept); only the
# features get a gradient (the label ranks get none, as in the published code).
def _save(ctx, inputs, output) -> None:
    features, labels, keep, lambda_val, offset, count = inputs
    ctx.save_for_backward(features, labels, keep)
    ctx.lambda_val, ctx.offset, ctx.count = lambda_val, offset, count


def _backward(ctx, grad):
    features, labels, keep = ctx.saved_tensors
    grad_features = ctx.kernel("ranksim_loss_backward")(grad.contiguous(), features, labels, keep, ctx.lambda_val,
                                                        ctx.offset, ctx.count)
    return grad_features, None, None, None, None, None


_dispatch.register_autograd("ranksim_loss", _save, _backward)
