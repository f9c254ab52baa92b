"""The Triton kernels of ``dirfast::rnc_loss``: the Rank-N-Contrast loss of each anchor row, and
its gradient in the features.

``_pairs_kernel`` computes, a tile of anchors x keys at a time, the exact feature distances
``r = ||z_i - z_k||`` (differences summed over D in chunks, so identical rows are exactly 0
apart) and the L1 label distances (the anchor's own at -inf, so it sorts first). The launch
function sorts each row by label distance (``torch.sort(stable=True)``) and finds each entry's
tie group (``torch.searchsorted``). Then one program per anchor walks its sorted row in chunks,
every sum kept in distance units (see dirfast/ops/rnc_loss.py: the logits ``-r / t`` are never
formed): ``_suffix_kernel`` from the end, each suffix's ``S = exp(-low / t) * total`` with a carry
(an associative scan of (low, total) pairs, every exponent <= 0); ``_terms_kernel`` the loss from
``(low, log total)`` at each entry's group start; ``_weights_kernel`` (backward) the prefix sums
of ``1 / S`` to the end of each group, at the group's ``low``, and the weights ``w = dL/ds / r``
of every pair. The gradient is then two products of the [count, m] weights with the features. No host
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
def _low_combine(low1, total1, t1, low2, total2, t2):
    """Two sums in distance units, (low, total = sum exp((low - r) / t)), joined at the smaller
    low ((+inf, 0) is the empty sum); t rides along, the same in every lane."""
    low = tl.minimum(low1, low2)
    safe = tl.where(low == float("inf"), 0.0, low)
    return low, total1 * tl.exp((safe - low1) / t1) + total2 * tl.exp((safe - low2) / t1), t1


@triton.jit
def _keys(r_ptr, order_ptr, row, p, m, i):
    """The distances of the sorted entries p of a row (+inf for the anchor itself and past the
    end), their rows, and which entries are other rows."""
    live = p < m
    k = tl.load(order_ptr + row * m + p, mask=live, other=0)
    key = live & (k != i)
    r = tl.load(r_ptr + row * m + k, mask=key, other=float("inf"))
    return r, k, key


@triton.jit
def _suffix_kernel(r_ptr, order_ptr, t_ptr, low_ptr, log_total_ptr, m, offset,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    """At each entry p of the sorted row, the suffix q >= p as low[row, p] = min r_q and
    log_total[row, p] = log sum exp((low - r_q) / t), from the end in chunks."""
    row = tl.program_id(0).to(tl.int64)
    i = offset + row
    t = tl.full([BLOCK], 0.0, ACC) + tl.load(t_ptr).to(ACC)
    carry_low = tl.full([], float("inf"), ACC)
    carry_total = tl.zeros([], ACC)
    lanes = tl.arange(0, BLOCK)
    for c in range(0, tl.cdiv(m, BLOCK)):
        p = (tl.cdiv(m, BLOCK) - 1 - c) * BLOCK + lanes
        r, k, key = _keys(r_ptr, order_ptr, row, p, m, i)
        low, total, _ = tl.associative_scan((r, tl.where(key, 1.0, 0.0).to(ACC), t), 0, _low_combine, reverse=True)
        low, total, _ = _low_combine(low, total, t, carry_low, carry_total, t)
        tl.store(low_ptr + row * m + p, low, mask=p < m)
        tl.store(log_total_ptr + row * m + p, tl.log(total), mask=p < m)  # total >= 1 at every key
        carry_low = tl.sum(tl.where(lanes == 0, low, 0.0), 0)  # the whole chunk and after: entry 0
        carry_total = tl.sum(tl.where(lanes == 0, total, 0.0), 0)


@triton.jit
def _terms_kernel(r_ptr, order_ptr, start_ptr, low_ptr, log_total_ptr, t_ptr, out_ptr, m, offset,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = sum_p (r_p - low_p) / (m-1) / t + sum_p log total_p / (m-1), (low, log total) at
    p's tie-group start: two sums of terms >= 0, t applied last."""
    row = tl.program_id(0).to(tl.int64)
    i = offset + row
    spread = tl.zeros([BLOCK], ACC)
    logs = tl.zeros([BLOCK], ACC)
    for p0 in range(0, m, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        r, k, key = _keys(r_ptr, order_ptr, row, p, m, i)
        start = tl.load(start_ptr + row * m + p, mask=p < m, other=0)
        low = tl.load(low_ptr + row * m + start, mask=key, other=0.0)
        spread += tl.where(key, r - low, 0.0)
        logs += tl.where(key, tl.load(log_total_ptr + row * m + start, mask=key, other=0.0), 0.0)
    n = (m - 1).to(ACC)
    tl.store(out_ptr + row, tl.sum(spread, 0) / n / tl.load(t_ptr).to(ACC) + tl.sum(logs, 0) / n)


@triton.jit
def _weights_kernel(r_ptr, order_ptr, start_ptr, end_ptr, low_ptr, log_total_ptr, t_ptr, grad_ptr, w_ptr, m, offset,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    """w[row, k] = dL/ds_k / r_k (0 for the anchor and where r_k = 0; the gradient is divided by t
    last, dL/ds / (r t) passing float32's range for close pairs at a tiny t), with dL/ds_k =
    c (exp(s_k) sum_{j: d_j <= d_k} 1 / S_j - 1), c = grad[row] / (m - 1): the prefix sums of
    1 / S_j = exp(low_j / t) / total_j as (-low, sum) pairs with a carry (low only grows along the
    row), extended to the end of each tie group (whose members share S), at the group's low."""
    row = tl.program_id(0).to(tl.int64)
    i = offset + row
    t = tl.full([BLOCK], 0.0, ACC) + tl.load(t_ptr).to(ACC)
    c = tl.load(grad_ptr + row).to(ACC) / (m - 1).to(ACC)
    carry_low = tl.full([], float("inf"), ACC)
    carry_total = tl.zeros([], ACC)
    lanes = tl.arange(0, BLOCK)
    for p0 in range(0, m, BLOCK):
        p = p0 + lanes
        r, k, key = _keys(r_ptr, order_ptr, row, p, m, i)
        start = tl.load(start_ptr + row * m + p, mask=p < m, other=0)
        end = tl.load(end_ptr + row * m + p, mask=p < m, other=0)
        neg = tl.where(key, -tl.load(low_ptr + row * m + start, mask=key, other=0.0), float("inf"))
        inverse = tl.where(key, tl.exp(-tl.load(log_total_ptr + row * m + start, mask=key, other=0.0)), 0.0)
        low, total, _ = tl.associative_scan((neg, inverse, t), 0, _low_combine)
        low, total, _ = _low_combine(carry_low, carry_total, t, low, total, t)
        carry_low = tl.sum(tl.where(lanes == BLOCK - 1, low, 0.0), 0)
        carry_total = tl.sum(tl.where(lanes == BLOCK - 1, total, 0.0), 0)
        # the rest of the group after p: (end - p) more entries of the same 1 / S, at the same low
        low, total, _ = _low_combine(low, total, t, neg, tl.maximum(end - p, 0).to(ACC) * inverse, t)
        weight = total * tl.exp((-low - r) / t)
        ds = c * (weight - 1.0)
        w = tl.where(key & (r != 0.0), ds / tl.where(r == 0.0, 1.0, r), 0.0)
        tl.store(w_ptr + row * m + k, w, mask=p < m)


def _sizes(acc: torch.dtype, m: int, D: int):
    """(BLOCK_A, BLOCK_K, BLOCK_D, BLOCK, warps): pair tiles of 8,192 differences (4,096 in
    float64), rows walked 1,024 entries at a time; under the interpreter, small tiles and chunks
    of 8 entries, so that tiny rows cross chunks."""
    if _common.INTERPRET:
        return 16, 16, min(_common.next_pow2(max(D, 1)), 16), 8, 1
    return 32, 32, (8 if acc == torch.float32 else 4), min(1024, _common.next_pow2(m)), 4


def _sorted_rows(features, labels, temperature, offset, count):
    """(r, order, start, d_sorted, t, (low, log_total), acc, sizes): the anchors' distances to every
    row [count, m], each row's order by label distance, the start of each sorted entry's tie group,
    the sorted label distances, the temperature as an acc tensor, and each sorted entry's suffix
    sum in distance units ([count, m] each)."""
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
    low = torch.empty((count, m), dtype=acc, device=features.device)
    log_total = torch.empty((count, m), dtype=acc, device=features.device)
    with _common.device_guard(features):
        _suffix_kernel[(count,)](r, order, t, low, log_total, m, offset, ACC=_common.tl_acc(acc), BLOCK=block,
                                 num_warps=warps)
    return r, order, start, d_sorted, t, (low, log_total), acc, (block, warps)


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
        _terms_kernel[(count,)](r, order, start, *suffix, t, out, m, offset, ACC=_common.tl_acc(acc), BLOCK=block,
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
        _weights_kernel[(count,)](r, order, start, end, *suffix, t, grad.to(acc).contiguous(), w, m, offset,
                                  ACC=_common.tl_acc(acc), BLOCK=block, num_warps=warps)
    # the anchors get sum_k w_k (z_k - z_i) / t, each key w_k (z_i - z_k) / t: of centred rows (the
    # reference's), which the products' sums do not cancel
    z = _common.centred_rows(features.to(acc))
    za = z[offset:offset + count]
    total = torch.mm(w.t(), za) - w.sum(0)[:, None] * z
    total[offset:offset + count] += torch.mm(w, z) - w.sum(1)[:, None] * za
    return (total / t).to(features.dtype)
