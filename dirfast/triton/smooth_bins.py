"""The Triton kernel of ``dirfast::smooth_bins``: the window convolution along the bins, in one kernel.

Each program computes a ``[BLOCK_B, BLOCK_D]`` tile of the output; tap ``k`` of bin ``b`` reads
bin ``b + k - h`` of the same column, sent back into range by the padding rule (reflect as
often as needed, clamp, or zero). The statistics are tiny (``[B, D]``), so the kernel is one
launch reading each value ``ks`` times from L1/L2.

The taps are summed in the order of :func:`dirfast.ops.smooth_bins.reference` (scipy's: centre
first, then mirrored pairs from the outside in, a symmetric pair added before it is weighted)
with fused multiply-adds disabled, so float32 and float64 results equal the reference's bit for
bit (LDS relies on scipy's rounding). float16/bfloat16 statistics are computed in float32 and
rounded to their dtype after every operation, as the reference's arithmetic in that dtype is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import PADDINGS
from . import _common

# The padding numbers of the kernel (constexpr: Triton kernels read module globals only as such).
REFLECT = tl.constexpr(PADDINGS.index("reflect"))
CONSTANT = tl.constexpr(PADDINGS.index("constant"))
SYMMETRIC = tl.constexpr(PADDINGS.index("symmetric"))


@triton.jit
def _source(j, B, PADDING: tl.constexpr):
    """Bin read by the (possibly out-of-range) index ``j`` under the padding rule."""
    if PADDING == REFLECT:  # without repeating the edge, period 2(B - 1); B == 1 -> 0
        period = tl.maximum(2 * (B - 1), 1)
        j = ((j % period) + period) % period  # a non-negative remainder whatever % rounds to
        j = tl.where(j >= B, period - j, j)
    elif PADDING == SYMMETRIC:  # repeating the edge, period 2B
        period = 2 * B
        j = ((j % period) + period) % period
        j = tl.where(j >= B, period - 1 - j, j)
    else:  # replicate, and constant (whose outside taps are masked to zero by the caller)
        j = tl.minimum(tl.maximum(j, 0), B - 1)
    return j


@triton.jit
def _rounded(x, DT: tl.constexpr):
    """``x`` (in ACC) rounded to the statistics' dtype DT when that is float16 or bfloat16, to
    nearest even as torch rounds. bfloat16 by the bits of the float32 (Triton's interpreter
    truncates in ``.to(tl.bfloat16)``); a NaN stays NaN."""
    if DT == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    elif DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def _tap(stats_ptr, b, d, mask, B, s_b, s_d, j_off, PADDING: tl.constexpr, ACC: tl.constexpr):
    j = b + j_off
    src = _source(j, B, PADDING)
    m = mask
    if PADDING == CONSTANT:
        m = m & ((j >= 0) & (j < B))[:, None]
    v = tl.load(stats_ptr + src[:, None] * s_b + d[None, :] * s_d, mask=m, other=0.0)
    return v.to(ACC)


@triton.jit(do_not_specialize=["B", "h"])
def _smooth_kernel(stats_ptr, w_ptr, out_ptr, B, D, s_b, s_d, s_w, o_b, o_d, h,
                   PADDING: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (b < B)[:, None] & (d < D)[None, :]

    DT: tl.constexpr = stats_ptr.dtype.element_ty
    w_h = _rounded(tl.load(w_ptr + h * s_w).to(ACC), DT)  # the window in the statistics' dtype, as the reference
    out = _rounded(_tap(stats_ptr, b, d, mask, B, s_b, s_d, 0, PADDING, ACC) * w_h, DT)
    for i in range(0, h):
        j = h - i  # from the outermost pair inwards, as scipy.ndimage.correlate1d
        w_left = tl.load(w_ptr + (h - j) * s_w)
        w_right = tl.load(w_ptr + (h + j) * s_w)
        # scipy treats a pair as symmetric when its weights differ by at most DBL_EPSILON
        symmetric = tl.abs(w_left.to(tl.float64) - w_right.to(tl.float64)) <= 2.220446049250313e-16
        left = _tap(stats_ptr, b, d, mask, B, s_b, s_d, -j, PADDING, ACC)
        right = _tap(stats_ptr, b, d, mask, B, s_b, s_d, j, PADDING, ACC)
        wl = _rounded(w_left.to(ACC), DT)
        wr = _rounded(w_right.to(ACC), DT)
        paired = _rounded(_rounded(left + right, DT) * wr, DT)
        separate = _rounded(_rounded(left * wl, DT) + _rounded(right * wr, DT), DT)
        out = _rounded(out + tl.where(symmetric, paired, separate), DT)
    # out is in the statistics' dtype already (rounded), so the store's conversion is exact
    tl.store(out_ptr + b[:, None] * o_b + d[None, :] * o_d, out.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(num_bins: int, dim: int):
    if _common.INTERPRET:  # one or a few programs: the interpreter pays per program
        return min(_common.next_pow2(num_bins), 256), min(_common.next_pow2(dim), 128), 4
    block_d = min(_common.next_pow2(dim), 128)
    block_b = max(1, min(_common.next_pow2(num_bins), 4096 // block_d))
    return block_b, block_d, 4


def smooth_bins(stats: torch.Tensor, window: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
    """:func:`dirfast.ops.smooth_bins` as one Triton kernel (any strides, no copies)."""
    _common.check_device(stats, "smooth_bins")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    out = torch.empty_like(stats)
    num_bins = stats.shape[0]
    ks = window.shape[0]
    dim = stats.shape[1] if stats.dim() == 2 else 1
    if out.numel() == 0:
        return out
    window = window.to(stats.device)
    s_d = stats.stride(1) if stats.dim() == 2 else 0
    o_d = out.stride(1) if out.dim() == 2 else 0
    block_b, block_d, warps = _blocks(num_bins, dim)
    grid = (_common.cdiv(num_bins, block_b), _common.cdiv(dim, block_d))
    with _common.device_guard(stats):
        _smooth_kernel[grid](
            stats, window, out, num_bins, dim, stats.stride(0), s_d, window.stride(0), out.stride(0), o_d,
            (ks - 1) // 2, PADDING=PADDINGS.index(padding), ACC=_common.tl_acc(stats.dtype),
            BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=False,
        )
    return out

