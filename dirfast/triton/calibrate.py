"""The Triton kernels of ``dirfast::calibrate`` (and ``calibrate_``): FDS re-colouring in one pass.

Two kernels: ``_tables_kernel`` builds the per-bin scale/shift tables
``s = sqrt(clamp(dst_var / src_var, clip_min, clip_max))``, ``t = dst_mean - src_mean * s`` with
the published zero-variance rules (one program per block of bins), and ``_apply_kernel`` reads
tiles of ``x`` in place through its strides -- rows coalesced along the features, dense maps
along the pixels, channels-last as rows -- and writes ``y = x * s[b] + t[b]`` laid out like
``x`` (or into ``x``). Rows whose bin is outside ``[0, B)`` are copied. Differentiable in ``x``
(the op's autograd); no host synchronisation, so CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from . import _common


@functools.lru_cache(maxsize=64)
def _split(value: float):
    """``value`` as two float32 numbers whose sum is ``value`` to ~1e-15 (float scalars reach a
    Triton kernel as float32; float64 statistics need the clip bounds to float64 precision)."""
    def f32(v: float) -> float:
        if not math.isfinite(v) or abs(v) > 3.4028234663852886e38:
            return math.copysign(math.inf, v) if not math.isnan(v) else v
        return struct.unpack("f", struct.pack("f", v))[0]

    hi = f32(value)
    lo = f32(value - hi) if math.isfinite(hi) else 0.0
    return hi, lo


@triton.jit(do_not_specialize=["B"])
def _tables_kernel(src_mean_ptr, src_var_ptr, dst_mean_ptr, dst_var_ptr, s_ptr, t_ptr, B, D,
                   sm_b, sm_d, sv_b, sv_d, dm_b, dm_d, dv_b, dv_d, t_b, t_d,
                   lo_hi, lo_lo, up_hi, up_lo,
                   ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """s, t for BLOCK_B bins: the row sums of src_var first (the bin rule), then the tables."""
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bins_m = (b < B)[:, None]
    total = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)  # times a feature stride (B when transposed): past int32
        m = bins_m & (d < D)[None, :]
        total += tl.load(src_var_ptr + (b * sv_b)[:, None] + (d * sv_d)[None, :], mask=m, other=0.0).to(ACC)
    # the threshold in the arithmetic dtype (a plain literal is a float32 constant)
    keep_bin = (tl.sum(total, 1) < tl.full([BLOCK_B], 1e-10, ACC))[:, None]
    clip_lo = tl.cast(lo_hi, ACC) + tl.cast(lo_lo, ACC)
    clip_up = tl.cast(up_hi, ACC) + tl.cast(up_lo, ACC)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m = bins_m & (d < D)[None, :]
        src_mean = tl.load(src_mean_ptr + (b * sm_b)[:, None] + (d * sm_d)[None, :], mask=m, other=0.0).to(ACC)
        src_var = tl.load(src_var_ptr + (b * sv_b)[:, None] + (d * sv_d)[None, :], mask=m, other=1.0).to(ACC)
        dst_mean = tl.load(dst_mean_ptr + (b * dm_b)[:, None] + (d * dm_d)[None, :], mask=m, other=0.0).to(ACC)
        dst_var = tl.load(dst_var_ptr + (b * dv_b)[:, None] + (d * dv_d)[None, :], mask=m, other=1.0).to(ACC)
        keep = keep_bin | (src_var == 0)
        if ACC == tl.float32:  # correctly rounded, as torch (plain float32 / and sqrt are approximate)
            ratio = tl.div_rn(dst_var, tl.where(keep, 1.0, src_var))
        else:
            ratio = dst_var / tl.where(keep, 1.0, src_var)
        ratio = tl.minimum(tl.maximum(ratio, clip_lo, propagate_nan=tl.PropagateNan.ALL), clip_up,
                           propagate_nan=tl.PropagateNan.ALL)
        if ACC == tl.float32:
            scale = tl.sqrt_rn(ratio)
        else:
            scale = tl.sqrt(ratio)
        scale = tl.where(keep, 1.0, scale)
        # -0.0 where kept: x * 1 - 0.0 is x, a -0.0 too. Made by a product: Triton turns a -0.0
        # literal into +0.0.
        shift = tl.where(keep, tl.zeros_like(scale) * -1.0, dst_mean - src_mean * scale)
        dst = (b * t_b)[:, None] + (d * t_d)[None, :]
        tl.store(s_ptr + dst, scale, mask=m)
        tl.store(t_ptr + dst, shift, mask=m)


@triton.jit(do_not_specialize=["B", "tiles_per_p"])
def _apply_kernel(x_ptr, bins_ptr, s_ptr, t_ptr, out_ptr, B, D, S, sP, sC, sS, bP, bS, oP, oC, oS,
                  t_b, t_d, tiles_per_p,
                  ACC: tl.constexpr, NARROW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    p = pid // tiles_per_p
    s = (pid - p * tiles_per_p) * BLOCK_S + tl.arange(0, BLOCK_S)
    rows_m = s < S
    k = tl.load(bins_ptr + p * bP + s * bS, mask=rows_m, other=-1).to(tl.int64)
    valid = rows_m & (k >= 0) & (k < B)
    k = tl.where(valid, k, 0)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_m = (c < D)[None, :]
    m = rows_m[:, None] & cols_m
    mv = valid[:, None] & cols_m
    v = tl.load(x_ptr + (p * sP + s * sS)[:, None] + (c * sC)[None, :], mask=m, other=0.0)
    table = (k * t_b)[:, None] + (c * t_d)[None, :]
    scale = tl.load(s_ptr + table, mask=mv, other=1.0)
    shift = tl.load(t_ptr + table, mask=mv, other=0.0)
    y = v.to(ACC) * scale + shift
    if NARROW:  # float64 to a 16-bit type through float32, as torch (c10) converts
        y = y.to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    y = tl.where(mv, y, v)
    tl.store(out_ptr + (p * oP + s * oS)[:, None] + (c * oC)[None, :], y, mask=m)


def _apply_sizes(rows: _common.Rows):
    """(BLOCK_S, BLOCK_C, warps): about 8K elements per program, wide along the contiguous axis."""
    if _common.INTERPRET:
        return min(_common.next_pow2(rows.S), 256), min(_common.next_pow2(rows.C), 64), 1
    if rows.sS == 1 and rows.sC != 1:  # pixels contiguous
        block_s = min(_common.next_pow2(rows.S), 512)
        return block_s, max(1, min(_common.next_pow2(rows.C), 8192 // block_s)), 8
    block_c = min(_common.next_pow2(rows.C), 512)
    return max(1, min(_common.next_pow2(rows.S), 8192 // block_c)), block_c, 8


def tables(src_mean, src_var, dst_mean, dst_var, clip_min: float, clip_max: float, acc: torch.dtype,
           transpose: bool = False):
    """The ``(s, t)`` tables as ``[B, D]`` tensors (``[D, B]`` storage when ``transpose``)."""
    B, D = src_mean.shape
    shape = (D, B) if transpose else (B, D)
    s = torch.empty(shape, dtype=acc, device=src_mean.device)
    t = torch.empty(shape, dtype=acc, device=src_mean.device)
    if transpose:
        s, t = s.t(), t.t()
    if s.numel() == 0:
        return s, t
    lo, up = _split(clip_min), _split(clip_max)
    if _common.INTERPRET:
        block_b, block_d = min(_common.next_pow2(B), 64), min(_common.next_pow2(D), 64)
    else:
        block_d = min(_common.next_pow2(D), 512)
        block_b = max(1, min(_common.next_pow2(B), 2048 // block_d))
    _tables_kernel[(_common.cdiv(B, block_b),)](
        src_mean, src_var, dst_mean, dst_var, s, t, B, D, src_mean.stride(0), src_mean.stride(1),
        src_var.stride(0), src_var.stride(1), dst_mean.stride(0), dst_mean.stride(1), dst_var.stride(0),
        dst_var.stride(1), s.stride(0), s.stride(1),
        lo[0], lo[1], up[0], up[1], ACC=_common.tl_acc(acc), BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
    return s, t


def _launch(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float, clip_max: float, out) -> bool:
    """Calibrate ``x`` into ``out`` (a tensor shaped like ``x``, or ``x`` itself); False, with
    nothing written, when ``out``'s strides cannot follow the view of ``x``."""
    if x.numel() == 0:
        return True
    rows = _common.rows_of(x, bin_idx)
    strides = _common.out_strides(out, rows)
    if strides is None:  # the output keeps images apart that x's view folded: don't fold
        rows = _common.rows_of(x, bin_idx, fold=False)
        strides = _common.out_strides(out, rows)
    if strides is None:
        return False
    acc = _common.acc_dtype(x.dtype, src_mean.dtype)
    pixels_fast = rows.sS == 1 and rows.sC != 1
    B = src_mean.shape[0]
    with _common.device_guard(x):
        s, t = tables(src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, acc, transpose=pixels_fast)
        block_s, block_c, warps = _apply_sizes(rows)
        tiles = _common.cdiv(rows.S, block_s)
        # In place, each element is loaded and stored by the same program: no other reads it.
        _apply_kernel[(rows.P * tiles, _common.cdiv(rows.C, block_c))](
            rows.x, rows.bins, s, t, out, B, rows.C, rows.S, rows.sP, rows.sC, rows.sS, rows.bP, rows.bS,
            strides[0], strides[1], strides[2], s.stride(0), s.stride(1), tiles,
            ACC=_common.tl_acc(acc), NARROW=acc == torch.float64 and x.element_size() == 2,
            BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return True


def calibrate(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1,
              clip_max: float = 10.0) -> torch.Tensor:
    """:func:`dirfast.ops.calibrate` as two Triton kernels (see the module docstring)."""
    _common.check_device(x, "calibrate")
    out = torch.empty_like(x)
    if not _launch(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, out):
        raise RuntimeError(f"dirfast calibrate (Triton): unsupported output strides {out.stride()}")
    return out


def calibrate_(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min: float = 0.1,
               clip_max: float = 10.0) -> None:
    """:func:`dirfast.ops.calibrate_`: calibrate written into ``x`` in the same single pass
    (through a temporary only when ``x``'s strides cannot be followed in place)."""
    _common.check_device(x, "calibrate_")
    if torch._debug_has_internal_overlap(x) == 1:
        raise RuntimeError("dirfast calibrate_: x has elements that share memory (an expanded "
                           "tensor); calibrate it out of place")
    if not _launch(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max, x):
        x.copy_(calibrate(x, bin_idx, src_mean, src_var, dst_mean, dst_var, clip_min, clip_max))
