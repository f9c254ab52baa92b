"""The Triton kernels of ``dirfast::bin_stats``: per-bin count, mean and unbiased variance on the GPU.

One pass of shifted sums: every bin's reference value ``K[b]`` is one of its own rows, the kernels
add ``S1 = sum(x - K)`` and ``S2 = sum((x - K)**2)``, and ``mean = K + S1 / n``,
``var = (S2 - S1**2 / n) / (n - 1)``: float32 keeps the variance accurate when a bin's mean is
far from zero, and ``x`` is read exactly once. Two work decompositions: ``"csr"`` groups the rows
by bin (a counting sort, or a stable sort for the deterministic variant) and sums chunks
of a bin in registers with one atomic (or one slot, deterministically) per chunk and feature;
``"direct"`` reads tiles in place (pixels of dense maps, or bins of a few rows) and adds every
element atomically. Nothing waits on the host: grid sizes are upper bounds from the shapes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common

STRATEGIES = ("csr", "direct")


@triton.jit
def _row_offsets(r, S, sP, sS, SINGLE_P: tl.constexpr):
    """Offsets of rows r in a [P, (C,) S] view with strides sP, sS (their feature 0 in x, their index
    in bin_idx); SINGLE_P: one image, row r at r * sS, no division."""
    if SINGLE_P:
        return r * sS
    p = r // S
    return p * sP + (r - p * S) * sS


@triton.jit(do_not_specialize=["N", "S", "B"])
def _hist_kernel(bins_ptr, ws_ptr, N, S, bP, bS, B,
                 WITH_REP: tl.constexpr, HB: tl.constexpr, SINGLE_P: tl.constexpr, BLOCK: tl.constexpr):
    """count[b] += rows of bin b. With HB > 0 (few bins) each program first builds its own
    histogram in registers and adds it with one integer atomic per bin present, instead of
    one per row (same-address atomics serialise). Optionally the first row of each bin, kept
    as ``N - row`` under atomic max so that a zeroed buffer means "none"."""
    count_ptr = ws_ptr
    rep_ptr = ws_ptr + B
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    src = _row_offsets(r, S, bP, bS, SINGLE_P)
    k = tl.load(bins_ptr + src, mask=r < N, other=-1).to(tl.int64)
    valid = (r < N) & (k >= 0) & (k < B)
    if HB > 0:  # HB > B: bin HB - 1 collects the rows that select no bin
        hist = tl.histogram(tl.where(valid, k, HB - 1).to(tl.int32), HB)
        b = tl.arange(0, HB)
        tl.atomic_add(count_ptr + b, hist.to(tl.int64), mask=(b < B) & (hist > 0), sem="relaxed")
    else:
        tl.atomic_add(count_ptr + tl.where(valid, k, 0), tl.full([BLOCK], 1, tl.int64), mask=valid,
                      sem="relaxed")
    if WITH_REP:
        tl.atomic_max(rep_ptr + tl.where(valid, k, 0), N - r, mask=valid, sem="relaxed")


@triton.jit(do_not_specialize=["B", "CHUNK"])
def _scan_kernel(ws_ptr, B, CHUNK, BLOCK_B: tl.constexpr):
    """One program: bin offsets in the grouped order, the scatter cursors, the first chunk of
    each bin, and the first partial slot of each multi-chunk bin (exclusive prefix sums;
    entry 0 of each is already 0)."""
    count_ptr = ws_ptr
    off_ptr = ws_ptr + 2 * B
    cursor_ptr = ws_ptr + 3 * B + 1
    chunk_off_ptr = ws_ptr + 4 * B + 1
    slot_off_ptr = ws_ptr + 5 * B + 2
    carry_n = tl.zeros([1], dtype=tl.int64)
    carry_c = tl.zeros([1], dtype=tl.int64)
    carry_s = tl.zeros([1], dtype=tl.int64)
    for start in range(0, B, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        m = b < B
        n = tl.load(count_ptr + b, mask=m, other=0)
        chunks = (n + CHUNK - 1) // CHUNK
        slots = tl.where(chunks > 1, chunks, 0)
        n_inc = tl.cumsum(n, 0) + carry_n
        c_inc = tl.cumsum(chunks, 0) + carry_c
        s_inc = tl.cumsum(slots, 0) + carry_s
        tl.store(off_ptr + b + 1, n_inc, mask=m)
        tl.store(cursor_ptr + b, n_inc - n, mask=m)
        tl.store(chunk_off_ptr + b + 1, c_inc, mask=m)
        tl.store(slot_off_ptr + b + 1, s_inc, mask=m)
        carry_n += tl.sum(n, 0)
        carry_c += tl.sum(chunks, 0)
        carry_s += tl.sum(slots, 0)


@triton.jit(do_not_specialize=["N", "S", "B"])
def _scatter_kernel(bins_ptr, ws_ptr, perm_ptr, N, S, bP, bS, B,
                    SINGLE_P: tl.constexpr, BLOCK: tl.constexpr):
    """perm[cursor[b]++] = row: rows grouped by bin (in an arbitrary order within a bin)."""
    cursor_ptr = ws_ptr + 3 * B + 1
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    src = _row_offsets(r, S, bP, bS, SINGLE_P)
    k = tl.load(bins_ptr + src, mask=r < N, other=-1).to(tl.int64)
    valid = (r < N) & (k >= 0) & (k < B)
    k = tl.where(valid, k, 0)
    pos = tl.atomic_add(cursor_ptr + k, tl.full([BLOCK], 1, tl.int64), mask=valid, sem="relaxed")
    tl.store(perm_ptr + pos, r, mask=valid)


@triton.jit(do_not_specialize=["N", "B", "S", "n_search", "CHUNK"])
def _csr_kernel(x_ptr, perm_ptr, ws_ptr, sums_ptr, sums_off, slots_ptr,
                N, B, D, S, sP, sC, sS, n_search, CHUNK,
                DETERMINISTIC: tl.constexpr, ACC: tl.constexpr, SINGLE_P: tl.constexpr,
                CP: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr):
    """CP chunks (each <= CHUNK grouped rows of one bin) x BLOCK_C features -> one (S1, S2)
    partial per chunk and feature, accumulated over [CP, R, BLOCK_C] tiles in registers.
    CP is 1 on a GPU, where a program loops over its chunk R rows at a time."""
    rep_ptr = ws_ptr + B
    off_ptr = ws_ptr + 2 * B
    chunk_off_ptr = ws_ptr + 4 * B + 1
    slot_off_ptr = ws_ptr + 5 * B + 2
    sums_ptr += sums_off
    chunk = tl.program_id(0).to(tl.int64) * CP + tl.arange(0, CP)
    # Each chunk's bin: the last b with chunk_off[b] <= chunk (binary search over B + 1
    # entries); b == B for the chunks past the last one, which do nothing.
    lo = chunk * 0
    hi = lo + B
    for _ in range(n_search):
        mid = (lo + hi + 1) // 2
        go = tl.load(chunk_off_ptr + mid) <= chunk
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    live = lo < B
    b = tl.minimum(lo, B - 1)
    k = chunk - tl.load(chunk_off_ptr + b)
    start = tl.load(off_ptr + b)
    first = start + k * CHUNK
    last = tl.where(live, tl.minimum(first + CHUNK, tl.load(off_ptr + b + 1)), first)

    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_m = (c < D)[None, :]
    # the shift: the bin's first grouped row
    r0 = tl.load(perm_ptr + start, mask=live, other=0)
    row0 = _row_offsets(r0, S, sP, sS, SINGLE_P)
    m_shift = live[:, None] & cols_m
    shift = tl.load(x_ptr + row0[:, None] + (c * sC)[None, :], mask=m_shift, other=0.0).to(ACC)

    acc1 = tl.zeros([CP, R, BLOCK_C], dtype=ACC)
    acc2 = tl.zeros([CP, R, BLOCK_C], dtype=ACC)
    for q0 in range(0, tl.max(last - first, 0), R):
        q = first[:, None] + q0 + tl.arange(0, R)[None, :]
        rows_m = q < last[:, None]
        r = tl.load(perm_ptr + q, mask=rows_m, other=0)
        row = _row_offsets(r, S, sP, sS, SINGLE_P)
        m = rows_m[:, :, None] & cols_m[None, :, :]
        v = tl.load(x_ptr + row[:, :, None] + (c * sC)[None, None, :], mask=m, other=0.0)
        dev = tl.where(m, v.to(ACC) - shift[:, None, :], 0.0)
        acc1 += dev
        acc2 += dev * dev
    s1 = tl.sum(acc1, 1)
    s2 = tl.sum(acc2, 1)

    dst = (b * 2 * D)[:, None] + c[None, :]
    if DETERMINISTIC:
        n_chunks = tl.load(chunk_off_ptr + b + 1) - tl.load(chunk_off_ptr + b)
        own = m_shift & (n_chunks == 1)[:, None]
        tl.store(sums_ptr + dst, s1, mask=own)
        tl.store(sums_ptr + dst + D, s2, mask=own)
        slot = ((tl.load(slot_off_ptr + b) + k) * 2 * D)[:, None] + c[None, :]
        shared = m_shift & (n_chunks > 1)[:, None]
        tl.store(slots_ptr + slot, s1, mask=shared)
        tl.store(slots_ptr + slot + D, s2, mask=shared)
    else:
        tl.atomic_add(sums_ptr + dst, s1, mask=m_shift, sem="relaxed")
        tl.atomic_add(sums_ptr + dst + D, s2, mask=m_shift, sem="relaxed")
    tl.store(rep_ptr + b, N - r0, mask=live & (k == 0) & (tl.program_id(1) == 0))


@triton.jit(do_not_specialize=["N", "B", "tiles_per_p"])
def _direct_kernel(x_ptr, bins_ptr, ws_ptr, sums_ptr, sums_off, N, B, D, S, sP, sC, sS, bP, bS, tiles_per_p,
                   ACC: tl.constexpr, SINGLE_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """BLOCK_S consecutive rows (pixels) x BLOCK_C features, each added to its bin atomically."""
    rep_ptr = ws_ptr + B
    sums_ptr += sums_off
    pid = tl.program_id(0).to(tl.int64)
    p = pid // tiles_per_p
    s = (pid - p * tiles_per_p) * BLOCK_S + tl.arange(0, BLOCK_S)
    k = tl.load(bins_ptr + p * bP + s * bS, mask=s < S, other=-1).to(tl.int64)
    valid = (s < S) & (k >= 0) & (k < B)
    k = tl.where(valid, k, 0)
    r0 = N - tl.load(rep_ptr + k, mask=valid, other=0)  # the bin's first row: the shift
    row0 = _row_offsets(r0, S, sP, sS, SINGLE_P)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = valid[:, None] & (c < D)[None, :]
    v = tl.load(x_ptr + (p * sP + s * sS)[:, None] + (c * sC)[None, :], mask=m, other=0.0)
    shift = tl.load(x_ptr + row0[:, None] + (c * sC)[None, :], mask=m, other=0.0)
    dev = tl.where(m, v.to(ACC) - shift.to(ACC), 0.0)
    dst = sums_ptr + (k * 2 * D)[:, None] + c[None, :]
    tl.atomic_add(dst, dev, mask=m, sem="relaxed")
    tl.atomic_add(dst + D, dev * dev, mask=m, sem="relaxed")


@triton.jit(do_not_specialize=["N", "B", "S"])
def _finalize_kernel(x_ptr, ws_ptr, sums_ptr, sums_off, slots_ptr,
                     count_out_ptr, mean_ptr, var_ptr, N, B, D, S, sP, sC, sS,
                     DETERMINISTIC: tl.constexpr, ACC: tl.constexpr, SINGLE_P: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean = K + S1 / n, var = (S2 - S1^2 / n) / (n - 1) for BLOCK_B bins x BLOCK_C features
    (and the counts, copied out of the workspace)."""
    count_ptr = ws_ptr
    rep_ptr = ws_ptr + B
    chunk_off_ptr = ws_ptr + 4 * B + 1
    slot_off_ptr = ws_ptr + 5 * B + 2
    sums_ptr += sums_off
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins_m = b < B
    m = bins_m[:, None] & (c < D)[None, :]
    n = tl.load(count_ptr + b, mask=bins_m, other=0)
    tl.store(count_out_ptr + b, n, mask=bins_m & (tl.program_id(1) == 0))
    r0 = N - tl.load(rep_ptr + b, mask=bins_m, other=0)
    row0 = _row_offsets(r0, S, sP, sS, SINGLE_P)
    has = m & (n > 0)[:, None]
    shift = tl.load(x_ptr + row0[:, None] + (c * sC)[None, :], mask=has, other=0.0).to(ACC)
    src = (b * 2 * D)[:, None] + c[None, :]
    if DETERMINISTIC:
        n_chunks = (tl.load(chunk_off_ptr + b + 1, mask=bins_m, other=0)
                    - tl.load(chunk_off_ptr + b, mask=bins_m, other=0))
        own = m & (n_chunks == 1)[:, None]
        s1 = tl.load(sums_ptr + src, mask=own, other=0.0)
        s2 = tl.load(sums_ptr + src + D, mask=own, other=0.0)
        first = tl.load(slot_off_ptr + b, mask=bins_m, other=0)
        n_slots = tl.where(n_chunks > 1, n_chunks, 0)
        for t0 in range(0, tl.max(n_slots, 0), BLOCK_T):  # a fixed order: bitwise reproducible
            t = t0 + tl.arange(0, BLOCK_T)
            mt = m[:, None, :] & (t[None, :] < n_slots[:, None])[:, :, None]
            at = (((first[:, None] + t[None, :]) * 2 * D)[:, :, None] + c[None, None, :])
            s1 += tl.sum(tl.load(slots_ptr + at, mask=mt, other=0.0), 1)
            s2 += tl.sum(tl.load(slots_ptr + at + D, mask=mt, other=0.0), 1)
    else:
        s1 = tl.load(sums_ptr + src, mask=m, other=0.0)
        s2 = tl.load(sums_ptr + src + D, mask=m, other=0.0)
    nf = n.to(ACC)[:, None]
    n1 = tl.maximum(nf, 1.0)
    n2 = tl.maximum(nf - 1.0, 1.0)
    # S1 * (S1 / n), not S1^2 / n: S1 ~ n (mean - shift) can square beyond ACC where the variance does not
    if ACC == tl.float32:  # correctly rounded (plain float32 `/` is approximate on NVIDIA GPUs)
        q = tl.div_rn(s1, n1)
        mean = shift + q
        var = tl.div_rn(s2 - s1 * q, n2)
    else:
        q = s1 / n1
        mean = shift + q
        var = (s2 - s1 * q) / n2
    var = tl.where((s2 == float("inf")) & (tl.abs(s1) < float("inf")), s2, var)  # a spread beyond ACC: inf
    # A feature not finite: a NaN mean, whichever row holds it (an infinite row after the shift
    # leaves K + S1 / n infinite, and the variance NaN)
    mean = tl.where((var == var) & (shift - shift == 0.0), mean, float("nan"))
    mean = tl.where(nf > 0, mean, 0.0)
    var = tl.where(nf > 1, tl.where(var < 0.0, 0.0, var), 0.0)  # a NaN stays (tl.maximum may drop it on a GPU)
    out = (b * D)[:, None] + c[None, :]
    tl.store(mean_ptr + out, mean, mask=m)
    tl.store(var_ptr + out, var, mask=m)


# ----------------------------------------------------------------------------------- launch
@functools.lru_cache(maxsize=256)
def _sizes(num_bins: int, dim: int, chunk_rows: int | None, interpret: bool) -> dict:
    """Tile sizes: on a GPU a chunk is up to CHUNK rows read R rows x BLOCK_C features at a time
    (4K-element tiles); under the interpreter, few large programs (it pays per program and per
    operation, not per element)."""
    hb = _common.next_pow2(num_bins + 1)
    if interpret:
        block_c = min(_common.next_pow2(dim), 64)
        chunk = chunk_rows or 32
        return dict(CP=16, CHUNK=chunk, R=min(chunk, 32), BLOCK_C=block_c, BLOCK_S=256, BLOCK_N=1024,
                    HB=hb if hb <= 1024 else 0, FIN_B=min(_common.next_pow2(num_bins), max(1, 2048 // block_c)),
                    FIN_T=4, SCAN_B=min(_common.next_pow2(num_bins), 16384), warps=1)
    block_c = min(_common.next_pow2(dim), 128)
    chunk = chunk_rows or 512
    r = min(chunk, max(8, min(64, 2048 // block_c)))
    return dict(CP=1, CHUNK=chunk, R=r, BLOCK_C=block_c, BLOCK_S=max(16, 8192 // block_c), BLOCK_N=1024,
                HB=hb if hb <= 256 else 0, FIN_B=1, FIN_T=16, SCAN_B=min(_common.next_pow2(num_bins), 1024),
                warps=4)


def _strategy(rows: _common.Rows, num_bins: int) -> str:
    if rows.sS == 1 and rows.sC != 1 and rows.S > 1:
        return "direct"  # pixels are the contiguous axis: keep the reads in place
    if rows.rows < 64 * num_bins:
        return "direct"  # bins of a few rows: chunks would be mostly empty
    return "csr"


def bin_stats(x: torch.Tensor, bin_idx: torch.Tensor, num_bins: int, deterministic: bool = False, *,
              strategy: str | None = None, chunk_rows: int | None = None):
    """:func:`dirfast.ops.bin_stats` in Triton kernels; ``deterministic`` sums without float
    atomics (always ``"csr"``). Tests name a ``strategy`` (``"csr"`` or ``"direct"``; None: chosen
    from the layout) and a ``"csr"`` chunk size (a power of two; None: per device) to reach
    every path."""
    _common.check_device(x, "bin_stats")
    B, D = num_bins, x.shape[1]
    acc = _common.acc_dtype(x.dtype)
    rows = _common.rows_of(x, bin_idx)
    N = rows.rows
    if N == 0:
        return (torch.zeros(B, dtype=torch.int64, device=x.device),
                torch.zeros((B, D), dtype=acc, device=x.device), torch.zeros((B, D), dtype=acc, device=x.device))
    if deterministic:
        strategy = "csr"
    elif strategy is None:
        strategy = _strategy(rows, B)
    elif strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    z = _sizes(B, D, chunk_rows, _common.INTERPRET)
    xv, bins, chunk = rows.x, rows.bins, z["CHUNK"]
    single_p = rows.P == 1
    tl_acc = _common.tl_acc(x.dtype)
    col_blocks = _common.cdiv(max(D, 1), z["BLOCK_C"])
    count_out = torch.empty(B, dtype=torch.int64, device=x.device)
    mean = torch.empty((B, D), dtype=acc, device=x.device)
    var = torch.empty((B, D), dtype=acc, device=x.device)
    # One zeroed allocation (one memset), passed whole to the kernels: count[B], rep[B], off[B+1],
    # cursor[B], chunk_off[B+1], slot_off[B+1] as int64, then (padded to 16) the (S1, S2) sums
    # [B, 2, D] when they are added atomically.
    n_int = _common.cdiv(6 * B + 3, 16) * 16
    per_int = 8 // acc.itemsize
    n_sums = 0 if deterministic else _common.cdiv(2 * B * D, per_int)
    ws = torch.zeros(n_int + n_sums, dtype=torch.int64, device=x.device)
    if deterministic:
        sums, sums_off = torch.empty((B, 2, D), dtype=acc, device=x.device), 0
    else:
        sums, sums_off = ws.view(acc), n_int * per_int
    slots = sums

    with _common.device_guard(x):
        _hist_kernel[(_common.cdiv(N, z["BLOCK_N"]),)](
            bins, ws, N, rows.S, rows.bP, rows.bS, B,
            WITH_REP=strategy == "direct", HB=z["HB"], SINGLE_P=single_p, BLOCK=z["BLOCK_N"],
            num_warps=4)
        if D == 0:
            return ws[:B].clone(), mean, var
        if strategy == "direct":
            tiles = _common.cdiv(rows.S, z["BLOCK_S"])
            _direct_kernel[(rows.P * tiles, col_blocks)](
                xv, bins, ws, sums, sums_off, N, B, D, rows.S, rows.sP, rows.sC, rows.sS, rows.bP, rows.bS,
                tiles, ACC=tl_acc, SINGLE_P=single_p, BLOCK_S=z["BLOCK_S"], BLOCK_C=z["BLOCK_C"], num_warps=8)
        else:
            _scan_kernel[(1,)](ws, B, chunk, BLOCK_B=z["SCAN_B"], num_warps=4)
            if deterministic:  # rows grouped by bin in a reproducible order
                keys = bins.reshape(-1)
                keys = torch.where((keys >= 0) & (keys < B), keys, B)
                perm = torch.sort(keys, stable=True).indices
                slots = torch.empty((2 * _common.cdiv(N, chunk) + 1, 2, D), dtype=acc, device=x.device)
            else:
                perm = torch.empty(N, dtype=torch.int64, device=x.device)
                _scatter_kernel[(_common.cdiv(N, z["BLOCK_N"]),)](
                    bins, ws, perm, N, rows.S, rows.bP, rows.bS, B,
                    SINGLE_P=single_p, BLOCK=z["BLOCK_N"], num_warps=4)
            max_chunks = _common.cdiv(N, chunk) + min(B, N)  # an upper bound: no host synchronisation
            _csr_kernel[(_common.cdiv(max_chunks, z["CP"]), col_blocks)](
                xv, perm, ws, sums, sums_off, slots,
                N, B, D, rows.S, rows.sP, rows.sC, rows.sS, B.bit_length() + 1, chunk,
                DETERMINISTIC=deterministic, ACC=tl_acc, SINGLE_P=single_p, CP=z["CP"], R=z["R"],
                BLOCK_C=z["BLOCK_C"], num_warps=z["warps"])
        _finalize_kernel[(_common.cdiv(B, z["FIN_B"]), col_blocks)](
            xv, ws, sums, sums_off, slots, count_out, mean, var,
            N, B, D, rows.S, rows.sP, rows.sC, rows.sS,
            DETERMINISTIC=deterministic and strategy == "csr", ACC=tl_acc, SINGLE_P=single_p,
            BLOCK_B=z["FIN_B"], BLOCK_T=z["FIN_T"], BLOCK_C=z["BLOCK_C"], num_warps=4)
    return count_out, mean, var
