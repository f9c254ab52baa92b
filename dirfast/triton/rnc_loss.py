"""The Triton kernels of ``dirfast::rnc_loss``: the Rank-N-Contrast loss of each anchor row, and
its gradient in the features.

``_pairs_kernel`` computes, a tile of anchors x keys at a time, the exact feature distances
``r = ||z_i - z_k||`` (differences summed over D in chunks, so identical rows are exactly 0
apart) and the L1 label distances (the anchor's own at -inf, so it sorts first). The launch
function sorts each row by label distance (``torch.sort(stable=True)``) and finds each entry's
tie group (``torch.searchsorted``). Then one program per anchor walks its sorted row in chunks:
``_suffix_kernel`` from the end, the suffix log-sum-exp of the logits ``s = -r / t`` with a carry
(an associative scan of (max, sum) pairs: nothing overflows or underflows); ``_terms_kernel``
the loss from ``log S`` at each entry's group start; ``_weights_kernel`` (backward) the prefix
log-sum-exp of ``-log S`` to the end of each group, and the weights ``w = dL/ds / (t r)`` of every
pair. The gradient is then two products of the [count, m] weights with the features. No host
synchronisation; the temperature travels as a tensor (a Python float argument would be float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _pairs_kernel(z_ptr, y_ptr, r_ptr, d_ptr, m, D, L, offset, count, szm, szd, sym, syl,
                  ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    a = tl.program_id(0).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    live_a, live_k = a < count, k < m
    i = offset + a
    total = tl.zeros([BLOCK_A, BLOCK_K], ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)  # times a feature stride (m when column-major): past int32
        live_d = dd < D
        zi = tl.load(z_ptr + i[:, None] * szm + dd[None, :] * szd, mask=live_a[:, None] & live_d[None, :],
                     other=0.0).to(ACC)
        zk = tl.load(z_ptr + k[:, None] * szm + dd[None, :] * szd, mask=live_k[:, None] & live_d[None, :],
                     other=0.0).to(ACC)
        diff = zi[:, None, :] - zk[None, :, :]
        total += tl.sum(diff * diff, 2)
    d = tl.zeros([BLOCK_A, BLOCK_K], ACC)
    for l in range(0, L):  # in label order, as every kernel: ties are exact ties
        yi = tl.load(y_ptr + i * sym + l * syl, mask=live_a, other=0.0).to(ACC)
        yk = tl.load(y_ptr + k * sym + l * syl, mask=live_k, other=0.0).to(ACC)
        d += tl.abs(yi[:, None] - yk[None, :])
    if ACC == tl.float32:  # correctly rounded, as torch (tl.sqrt is sqrt.approx.ftz on NVIDIA GPUs)
        r = tl.sqrt_rn(total)
    else:
        r = tl.sqrt(total)
    r = tl.where(d != d, float("nan"), r)  # a NaN label: NaN pairs, NaN losses
    d = tl.where(i[:, None] == k[None, :], float("-inf"), d)
    out = a[:, None] * m + k[None, :]
    live = live_a[:, None] & live_k[None, :]
    tl.store(r_ptr + out, r, mask=live)
    tl.store(d_ptr + out, d, mask=live)


@triton.jit
def _lse_combine(top1, sum1, top2, sum2):
    """Two log-sum-exps as (max, sum of exp(v - max)) pairs, joined (-inf with -inf stays -inf)."""
    top = tl.maximum(top1, top2)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return top, sum1 * tl.exp(top1 - safe) + sum2 * tl.exp(top2 - safe)


@triton.jit
def _lse_value(top, total):
    """top + log(total); a sum of 0 comes only with top = -inf, which it stays (no log 0)."""
    return top + tl.log(tl.where(total == 0.0, 1.0, total))


@triton.jit
def _logits(r_ptr, order_ptr, t_ptr, row, p, m, i, ACC: tl.constexpr):
    """The logits of the sorted entries p of a row (-inf for the anchor itself and past the end),
    their distances, rows, and which entries are other rows."""
    live = p < m
    k = tl.load(order_ptr + row * m + p, mask=live, other=0)
    r = tl.load(r_ptr + row * m + k, mask=live, other=0.0)
    key = live & (k != i)
    s = tl.where(key, -r / tl.load(t_ptr).to(ACC), float("-inf"))
    return s, r, k, key


@triton.jit
def _suffix_kernel(r_ptr, order_ptr, t_ptr, suffix_ptr, m, offset,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    """suffix[row, p] = log sum_{q >= p} exp(s_q) over the sorted row, from the end in chunks."""
    row = tl.program_id(0).to(tl.int64)
    i = offset + row
    carry_top = tl.full([], float("-inf"), ACC)
    carry_sum = tl.zeros([], ACC)
    lanes = tl.arange(0, BLOCK)
    for c in range(0, tl.cdiv(m, BLOCK)):
        p = (tl.cdiv(m, BLOCK) - 1 - c) * BLOCK + lanes
        s, r, k, key = _logits(r_ptr, order_ptr, t_ptr, row, p, m, i, ACC)
        top, total = tl.associative_scan((s, tl.full([BLOCK], 1.0, ACC)), 0, _lse_combine, reverse=True)
        top, total = _lse_combine(top, total, carry_top, carry_sum)
        tl.store(suffix_ptr + row * m + p, _lse_value(top, total), mask=p < m)
        carry_top = tl.sum(tl.where(lanes == 0, top, 0.0), 0)  # the whole chunk and after: entry 0
        carry_sum = tl.sum(tl.where(lanes == 0, total, 0.0), 0)


@triton.jit
def _terms_kernel(r_ptr, order_ptr, start_ptr, suffix_ptr, t_ptr, out_ptr, m, offset,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = -1/(m-1) sum_p (s_p - log S_p), log S_p the suffix at p's tie-group start."""
    row = tl.program_id(0).to(tl.int64)
    i = offset + row
    acc = tl.zeros([BLOCK], ACC)
    for p0 in range(0, m, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        s, r, k, key = _logits(r_ptr, order_ptr, t_ptr, row, p, m, i, ACC)
        start = tl.load(start_ptr + row * m + p, mask=p < m, other=0)
        log_s = tl.load(suffix_ptr + row * m + start, mask=key, other=0.0)
        acc += tl.where(key, s - log_s, 0.0)
    tl.store(out_ptr + row, tl.sum(acc, 0) / -(m - 1).to(ACC))


@triton.jit
def _weights_kernel(r_ptr, order_ptr, start_ptr, end_ptr, suffix_ptr, t_ptr, grad_ptr, w_ptr, m, offset,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    """w[row, k] = dL/ds_k / (t r_k) (0 for the anchor and where r_k = 0), with dL/ds_k =
    c (exp(s_k) sum_{j: d_j <= d_k} 1 / S_j - 1), c = grad[row] / (m - 1): a prefix log-sum-exp
    of -log S with a carry, extended to the end of each tie group (whose members share S)."""
    row = tl.program_id(0).to(tl.int64)
    i = offset + row
    t = tl.load(t_ptr).to(ACC)
    c = tl.load(grad_ptr + row).to(ACC) / (m - 1).to(ACC)
    carry_top = tl.full([], float("-inf"), ACC)
    carry_sum = tl.zeros([], ACC)
    lanes = tl.arange(0, BLOCK)
    for p0 in range(0, m, BLOCK):
        p = p0 + lanes
        s, r, k, key = _logits(r_ptr, order_ptr, t_ptr, row, p, m, i, ACC)
        start = tl.load(start_ptr + row * m + p, mask=p < m, other=0)
        end = tl.load(end_ptr + row * m + p, mask=p < m, other=0)
        inverse = tl.where(key, -tl.load(suffix_ptr + row * m + start, mask=key, other=0.0), float("-inf"))
        top, total = tl.associative_scan((inverse, tl.full([BLOCK], 1.0, ACC)), 0, _lse_combine)
        top, total = _lse_combine(carry_top, carry_sum, top, total)
        carry_top = tl.sum(tl.where(lanes == BLOCK - 1, top, 0.0), 0)
        carry_sum = tl.sum(tl.where(lanes == BLOCK - 1, total, 0.0), 0)
        # the rest of the group after p: (end - p) more entries of the same 1 / S
        rest = tl.where(end > p, inverse + tl.log(tl.maximum(end - p, 1).to(ACC)), float("-inf"))
        top, total = _lse_combine(top, total, rest, tl.full([BLOCK], 1.0, ACC))
        weight = tl.exp(s + _lse_value(top, total))
        ds = c * (weight - 1.0)
        w = tl.where(key & (r != 0.0), ds / (t * tl.where(r == 0.0, 1.0, r)), 0.0)
        tl.store(w_ptr + row * m + k, w, mask=p < m)


def _sizes(acc: torch.dtype, m: int, D: int):
    """(BLOCK_A, BLOCK_K, BLOCK_D, BLOCK, warps): pair tiles of 8,192 differences (4,096 in
    float64), rows walked 1,024 entries at a time; under the interpreter, small tiles and chunks
    of 8 entries, so that tiny rows cross chunks."""
    if _common.INTERPRET:
        return 16, 16, min(_common.next_pow2(max(D, 1)), 16), 8, 1
    return 32, 32, (8 if acc == torch.float32 else 4), min(1024, _common.next_pow2(m)), 4


def _sorted_rows(features, labels, temperature, offset, count):
    """(r, order, start, d_sorted, t, acc, sizes): the anchors' distances to every row [count, m],
    each row's order by label distance, the start of each sorted entry's tie group, the sorted
    distances, and the temperature as an acc tensor."""
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    m, D = features.shape
    ba, bk, bd, block, warps = _sizes(acc, m, D)
    r = torch.empty((count, m), dtype=acc, device=features.device)
    d = torch.empty((count, m), dtype=acc, device=features.device)
    with _common.device_guard(features):
        _pairs_kernel[(_common.cdiv(count, ba), _common.cdiv(m, bk))](
            features, labels, r, d, m, D, labels.shape[1], offset, count, features.stride(0), features.stride(1),
            labels.stride(0), labels.stride(1), ACC=_common.tl_acc(acc), BLOCK_A=ba, BLOCK_K=bk, BLOCK_D=bd,
            num_warps=warps)
    d_sorted, order = torch.sort(d, dim=1, stable=True)
    start = torch.searchsorted(d_sorted, d_sorted, side="left").clamp_(max=m - 1)  # a NaN's is past the end
    t = torch.full((1,), temperature, dtype=acc, device=features.device)
    suffix = torch.empty((count, m), dtype=acc, device=features.device)
    with _common.device_guard(features):
        _suffix_kernel[(count,)](r, order, t, suffix, m, offset, ACC=_common.tl_acc(acc), BLOCK=block,
                                 num_warps=warps)
    return r, order, start, d_sorted, t, suffix, acc, (block, warps)


def rnc_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float, offset: int, count: int):
    """:func:`dirfast.ops.rnc_loss` on Triton (arguments checked by the caller)."""
    _common.check_device(features, "rnc_loss")
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    m = features.shape[0]
    out = torch.zeros(count, dtype=acc, device=features.device)
    if count == 0 or m < 2:
        return out
    r, order, start, _, t, suffix, acc, (block, warps) = _sorted_rows(features, labels, temperature, offset, count)
    with _common.device_guard(features):
        _terms_kernel[(count,)](r, order, start, suffix, t, out, m, offset, ACC=_common.tl_acc(acc), BLOCK=block,
                                num_warps=warps)
    return out


def rnc_loss_backward(grad: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, temperature: float,
                      offset: int, count: int):
    """The gradient of ``sum_a grad[a] * rnc_loss(...)[a]`` in ``features`` (its dtype and shape)."""
    _common.check_device(features, "rnc_loss_backward")
    acc = _common.acc_dtype(features.dtype, labels.dtype)
    m = features.shape[0]
    if count == 0 or m < 2:
        return torch.zeros(features.shape, dtype=features.dtype, device=features.device)
    r, order, start, d_sorted, t, suffix, acc, (block, warps) = _sorted_rows(features, labels, temperature, offset,
                                                                             count)
    end = torch.searchsorted(d_sorted, d_sorted, side="right") - 1
    w = torch.empty((count, m), dtype=acc, device=features.device)
    with _common.device_guard(features):
        _weights_kernel[(count,)](r, order, start, end, suffix, t, grad.to(acc).contiguous(), w, m, offset,
                                  ACC=_common.tl_acc(acc), BLOCK=block, num_warps=warps)
    # the anchors get sum_k w_k (z_k - z_i), each key w_k (z_i - z_k)
    z = features.to(acc)
    za = z[offset:offset + count]
    total = torch.mm(w.t(), za) - w.sum(0)[:, None] * z
    total[offset:offset + count] += torch.mm(w, z) - w.sum(1)[:, None] * za
    return total.to(features.dtype)
