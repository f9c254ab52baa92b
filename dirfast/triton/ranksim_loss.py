"""The Triton kernels of ``dirfast::ranksim_loss``: RankSim's per-anchor loss and its blackbox
backward (``dirfast.ops.ranksim_loss`` states the definition).

Glue in PyTorch: the normalised features, the cosine rows ``C = q[anchors] q^T`` (torch.mm), the
label distances, the per-row orders (ops._common.descending_order: ties by key index, the higher
first), the products of the backward and F.normalize's backward. The per-row work is Triton, one
program per anchor row walking the row BLOCK keys at a time: the ranks among the kept keys (a
running prefix count of kept keys along each order, scattered back to the keys), the loss, the
shifted row ``C + lambda G``, and the surrogate gradient ``dC`` from the order of the shifted
row. ``M`` (the kept rows) and ``lambda`` come in device tensors: nothing is read on the host,
so a step that calls these can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import descending_order, l1_distances, normalize_rows, normalize_rows_backward
from . import _common

LAMBDA_EPS = 1e-8    # the published backward divides by lambda + 1e-8 (the same as dirfast.ops.ranksim_loss)


@triton.jit
def _rank_kernel(order_ptr, keep_ptr, rank_ptr, n, BLOCK: tl.constexpr):
    """rank[row, order[row, p]] = the kept keys among order[row, :p] (garbage for a key not kept)."""
    row = tl.program_id(0).to(tl.int64)
    carry = tl.zeros([1], tl.int32)
    for start in range(0, n, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        live = pos < n
        key = tl.load(order_ptr + row * n + pos, mask=live, other=0)
        kept = tl.load(keep_ptr + key, mask=live, other=0)
        before = tl.cumsum(kept, 0) - kept + carry
        tl.store(rank_ptr + row * n + key, before, mask=live)
        carry += tl.sum(kept, 0)

@triton.jit
def _row_kernel(cos_ptr, dist_ptr, rank_c_ptr, rank_l_ptr, keep_ptr, size_ptr, grad_ptr, lam_ptr, out_ptr,
                shifted_ptr, bad_ptr, n, offset, SHIFT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Anchor row ``row``: the loss (0 for an anchor not kept, NaN for a row with a NaN), and with
    SHIFT the shifted row C + lambda G and whether the row has a NaN."""
    row = tl.program_id(0).to(tl.int64)
    size = tl.load(size_ptr).to(ACC)
    anchor_kept = tl.load(keep_ptr + offset + row) != 0
    if SHIFT:
        g2 = tl.load(grad_ptr + row).to(ACC) * 2
        lam = tl.load(lam_ptr)
    total = tl.zeros([BLOCK], ACC)
    nans = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        live = pos < n
        base = row * n + pos
        kept = (tl.load(keep_ptr + pos, mask=live, other=0) != 0) & live
        cos = tl.load(cos_ptr + base, mask=live, other=0.0)
        dist = tl.load(dist_ptr + base, mask=live, other=0.0)
        rn_c = (tl.load(rank_c_ptr + base, mask=live, other=0) + 1).to(ACC) / size
        rn_l = (tl.load(rank_l_ptr + base, mask=live, other=0) + 1).to(ACC) / size
        diff = rn_c - rn_l
        total += tl.where(kept, diff * diff, 0.0)
        nans += tl.where(kept & ((cos != cos) | (dist != dist)), 1, 0)
        if SHIFT:
            tl.store(shifted_ptr + base, cos + lam * (g2 * diff / size), mask=live)
    bad = tl.sum(nans, 0) > 0
    loss = tl.where(bad, float("nan"), tl.sum(total, 0) / size)
    tl.store(out_ptr + row, tl.where(anchor_kept, loss, 0.0))
    if SHIFT:
        tl.store(bad_ptr + row, bad.to(tl.int32))

@triton.jit
def _surrogate_kernel(order_ptr, keep_ptr, rank_c_ptr, bad_ptr, size_ptr, denom_ptr, d_cos_ptr, n, offset,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    """dC[row, j] = -(rn(C)_j - rn(C')_j) / (lambda + 1e-8) for the kept keys of a kept anchor
    (NaN for a row with a NaN), 0 elsewhere; rn(C') from the order of the shifted row."""
    row = tl.program_id(0).to(tl.int64)
    size = tl.load(size_ptr).to(ACC)
    denom = tl.load(denom_ptr)
    anchor_kept = tl.load(keep_ptr + offset + row) != 0
    bad = tl.load(bad_ptr + row) != 0
    carry = tl.zeros([1], tl.int32)
    for start in range(0, n, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        live = pos < n
        key = tl.load(order_ptr + row * n + pos, mask=live, other=0)
        kept_i = tl.load(keep_ptr + key, mask=live, other=0)
        rank_s = tl.cumsum(kept_i, 0) - kept_i + carry
        carry += tl.sum(kept_i, 0)
        rn_c = (tl.load(rank_c_ptr + row * n + key, mask=live, other=0) + 1).to(ACC) / size
        rn_s = (rank_s + 1).to(ACC) / size
        d = -(rn_c - rn_s) / denom
        d = tl.where(bad, float("nan"), d)
        d = tl.where((kept_i != 0) & anchor_kept, d, 0.0)
        tl.store(d_cos_ptr + row * n + key, d, mask=live)

def _block(n: int) -> int:
    return min(_common.next_pow2(max(n, 1)), 1024)

def _ranks(values: torch.Tensor, keep_i: torch.Tensor) -> torch.Tensor:
    """[count, m] int32 descending ranks among the kept keys (ties by key index, the higher first)."""
    order = descending_order(values).contiguous()
    rank = torch.empty(values.shape, dtype=torch.int32, device=values.device)
    count, n = values.shape
    with _common.device_guard(values):
        _rank_kernel[(count,)](order, keep_i, rank, n, BLOCK=_block(n))
    return rank

def _setup(features, labels, keep, offset, count):
    """The glue both directions share: acc, q, the norms, the anchors' cosine and label-distance
    rows, keep as int32, M as a device tensor, and the rank rows of C and -l."""
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    q, norm = normalize_rows(features, acc)
    cos = (q[offset:offset + count] @ q.T).contiguous()
    y = labels.to(acc)
    dist = l1_distances(y, y[offset:offset + count])
    keep_i = keep.to(torch.int32).contiguous()
    size = keep_i.sum(dtype=torch.int32).reshape(1)
    return acc, q, norm, cos, dist, keep_i, size, _ranks(cos, keep_i), _ranks(-dist, keep_i)

def ranksim_loss(features, labels, keep, lambda_val: float, offset: int, count: int) -> torch.Tensor:
    """:func:`dirfast.ops.ranksim_loss` with Triton's per-row kernels."""
    _common.check_device(features, "ranksim_loss")
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    out = torch.empty(count, dtype=acc, device=features.device)
    if count == 0:
        return out
    _, _, _, cos, dist, keep_i, size, rank_c, rank_l = _setup(features, labels, keep, offset, count)
    n = cos.shape[1]
    with _common.device_guard(features):
        _row_kernel[(count,)](cos, dist, rank_c, rank_l, keep_i, size, out, out, out, out, out, n, offset,
                              SHIFT=False, ACC=_common.tl_acc(acc), BLOCK=_block(n))
    return out

def ranksim_loss_backward(grad, features, labels, keep, lambda_val: float, offset: int, count: int) -> torch.Tensor:
    """The gradient in features of ``sum_a grad[a] out[a]`` (features' dtype)."""
    _common.check_device(features, "ranksim_loss_backward")
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    m = features.shape[0]
    if count == 0:
        q, norm = normalize_rows(features, acc)
        return normalize_rows_backward(torch.zeros_like(q), q, norm).to(features.dtype)
    _, q, norm, cos, dist, keep_i, size, rank_c, rank_l = _setup(features, labels, keep, offset, count)
    n = m
    dev = features.device
    lam = torch.full((1,), lambda_val, dtype=acc, device=dev)
    denom = torch.full((1,), lambda_val + LAMBDA_EPS, dtype=acc, device=dev)
    shifted = torch.empty_like(cos)
    bad = torch.empty(count, dtype=torch.int32, device=dev)
    out = torch.empty(count, dtype=acc, device=dev)
    g = grad.to(acc).contiguous()
    block, tacc = _block(n), _common.tl_acc(acc)
    with _common.device_guard(features):
        _row_kernel[(count,)](cos, dist, rank_c, rank_l, keep_i, size, g, lam, out, shifted, bad, n, offset,
                              SHIFT=True, ACC=tacc, BLOCK=block)
        order = descending_order(shifted).contiguous()
        d_cos = torch.empty_like(cos)
        _surrogate_kernel[(count,)](order, keep_i, rank_c, bad, size, denom, d_cos, n, offset, ACC=tacc, BLOCK=block)
    grad_q = torch.zeros_like(q)
    grad_q[offset:offset + count] = d_cos @ q
    grad_q += d_cos.T @ q[offset:offset + count]
    return normalize_rows_backward(grad_q, q, norm).to(features.dtype)
