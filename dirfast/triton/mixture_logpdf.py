"""The Triton kernels of ``dirfast::mixture_logpdf``: the Gaussian-mixture log density of every
element (with its per-element gradients: ``mixture_logpdf_with_grads``), and its backward.

A program takes BLOCK elements and walks the K components BLOCK_K at a time with a running
maximum (an online log-sum-exp), so nothing of size N x K exists. The components come in the
arithmetic dtype as ``dirfast.ops.mixture_logpdf.components`` gives them (``m``,
``s = 1 / sqrt(v)``, ``c``, NaN for an invalid one), so every backend has the same non-finite
rules. The backward recomputes each element's responsibilities as the softmax of its terms (a
first pass over the components for their max and sum; the saved output says only where the
density is 0); the components' gradients are summed per program into a [programs, 3, K] buffer
that a final sum reduces in a fixed order (no float atomics: the same bits on every run). No host
synchronisation: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _terms(x, m_ptr, s_ptr, c_ptr, k0, K, BLOCK_K: tl.constexpr):
    """Components k0 .. k0 + BLOCK_K: the [BLOCK, BLOCK_K] terms c - z^2 / 2, z = (x - m) s, the
    scales s, and which components exist (a missing one has the term -inf)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    live = kk < K
    m = tl.load(m_ptr + kk, mask=live, other=0.0)
    s = tl.load(s_ptr + kk, mask=live, other=0.0)
    c = tl.load(c_ptr + kk, mask=live, other=float("-inf"))
    z = (x[:, None] - m[None, :]) * s[None, :]
    t = tl.where(live[None, :], c[None, :] - 0.5 * z * z, float("-inf"))  # no NaN from a padding lane
    return t, z, s, kk, live


@triton.jit
def _forward_kernel(x_ptr, m_ptr, s_ptr, c_ptr, out_ptr, grad_x_ptr, grad_shift_ptr, N, K, ACC: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, WITH_GRADS: tl.constexpr):
    """The log density; WITH_GRADS also its gradients in x and in a variance added to every
    component, whose sums over the components are rescaled with the running maximum as the sum
    of exponentials is."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(ACC)
    top = tl.full([BLOCK], float("-inf"), ACC)
    total = tl.zeros([BLOCK], ACC)
    along_x = tl.zeros([BLOCK], ACC)
    along_v = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK_K):
        t, z, s, kk, live = _terms(x, m_ptr, s_ptr, c_ptr, k0, K, BLOCK_K)
        new_top = tl.maximum(top, tl.max(t, 1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # no -inf - -inf
        rescale = tl.exp(top - safe)
        e = tl.exp(t - safe[:, None])
        total = total * rescale + tl.sum(e, 1)
        if WITH_GRADS:
            zero = e == 0.0  # adds nothing, also where z is infinite
            along_x = along_x * rescale + tl.sum(tl.where(zero, 0.0, e * z * s[None, :]), 1)
            half_s2 = 0.5 * s[None, :] * s[None, :]
            along_v = along_v * rescale + tl.sum(tl.where(zero, 0.0, e * (z * z - 1.0) * half_s2), 1)
        top = new_top
    # log 0 = -inf (density 0); a NaN term has made total NaN
    out = tl.where(top == float("-inf"), 0.0, top) + tl.log(total)
    tl.store(out_ptr + offs, out, mask=offs < N)
    if WITH_GRADS:
        empty = out == float("-inf")  # zero gradients
        tl.store(grad_x_ptr + offs, tl.where(empty, 0.0, -along_x / total), mask=offs < N)
        tl.store(grad_shift_ptr + offs, tl.where(empty, 0.0, along_v / total), mask=offs < N)


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, out_ptr, m_ptr, s_ptr, c_ptr, grad_x_ptr, part_ptr, N, K,
                     ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    rows = offs < N
    x = tl.load(x_ptr + offs, mask=rows, other=0.0).to(ACC)
    out = tl.load(out_ptr + offs, mask=rows, other=0.0).to(ACC)
    g = tl.load(grad_ptr + offs, mask=rows, other=0.0).to(ACC)  # 0 past the end: adds nothing
    g = tl.where(out == float("-inf"), 0.0, g)  # density 0: no responsibilities, zero gradients
    # r_k = g exp(t_k - top) / sum_j exp(t_j - top), the softmax of the terms recomputed (the
    # forward's online log-sum-exp, kept in two parts): exp(t_k - out) took out's rounding, 2^-5
    # in float32 at 1,000 standard deviations
    top = tl.full([BLOCK], float("-inf"), ACC)
    total = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK_K):
        t, z, s, kk, live = _terms(x, m_ptr, s_ptr, c_ptr, k0, K, BLOCK_K)
        new_top = tl.maximum(top, tl.max(t, 1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # no -inf - -inf
        total = total * tl.exp(top - safe) + tl.sum(tl.exp(t - safe[:, None]), 1)
        top = new_top
    top = tl.where(top == float("-inf"), 0.0, top)
    scale = tl.where(total == 0.0, 0.0, g / total)  # a NaN term has made total NaN
    grad_x = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK_K):
        t, z, s, kk, live = _terms(x, m_ptr, s_ptr, c_ptr, k0, K, BLOCK_K)
        r = scale[:, None] * tl.exp(t - top[:, None])
        r = tl.where(live[None, :] & rows[:, None], r, 0.0)
        zero = r == 0.0  # a zero responsibility adds nothing, also where z is infinite
        rz = tl.where(zero, 0.0, r * z * s[None, :])
        grad_x -= tl.sum(rz, 1)
        base = part_ptr + pid * 3 * K + kk
        tl.store(base, tl.sum(rz, 0), mask=live)
        gv = tl.where(zero, 0.0, 0.5 * r * (z * z - 1.0) * (s[None, :] * s[None, :]))
        tl.store(base + K, tl.sum(gv, 0), mask=live)
        tl.store(base + 2 * K, tl.sum(r, 0), mask=live)
    OUT: tl.constexpr = grad_x_ptr.dtype.element_ty
    if OUT == tl.float16 or OUT == tl.bfloat16:  # float64 to 16 bits through float32, as torch (c10) converts
        grad_x = grad_x.to(tl.float32)
    tl.store(grad_x_ptr + offs, grad_x.to(OUT), mask=rows)


def _sizes(k: int, acc: torch.dtype):
    """(BLOCK elements, BLOCK_K components, warps): tiles of 2,048 terms (1,024 in float64), which
    compile for sm_90 without register spills (tests/triton_compile.py checks it)."""
    if _common.INTERPRET:
        return 1024, min(_common.next_pow2(k), 128), 1
    return (256 if acc == torch.float32 else 128), min(_common.next_pow2(k), 8), 4


def _forward(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, c: torch.Tensor, with_grads: bool) -> list:
    """[out] or [out, grad_x, grad_shift], each shaped like x in the arithmetic dtype."""
    acc = m.dtype
    outs = [torch.empty(x.shape, dtype=acc, device=x.device) for _ in range(3 if with_grads else 1)]
    n = x.numel()
    if n == 0:
        return outs
    m, s, c = m.contiguous(), s.contiguous(), c.contiguous()
    block, block_k, warps = _sizes(m.numel(), acc)
    pointers = (outs * 3)[:3]  # without gradients all three are the output: the others are never written
    with _common.device_guard(x):
        _forward_kernel[(_common.cdiv(n, block),)](x.contiguous(), m, s, c, *pointers, n, m.numel(),
                                                   ACC=_common.tl_acc(acc), BLOCK=block, BLOCK_K=block_k,
                                                   WITH_GRADS=with_grads, num_warps=warps)
    return outs


def mixture_logpdf(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """:func:`dirfast.ops.mixture_logpdf` in one Triton kernel, from the components ``m``, ``s``,
    ``c`` in the arithmetic dtype (see the module docstring)."""
    _common.check_device(x, "mixture_logpdf")
    return _forward(x, m, s, c, False)[0]


def mixture_logpdf_with_grads(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, c: torch.Tensor):
    """``dirfast::mixture_logpdf_with_grads`` in one Triton kernel: the log density and its
    per-element gradients in x and in a variance added to every component."""
    _common.check_device(x, "mixture_logpdf_with_grads")
    return tuple(_forward(x, m, s, c, True))


def mixture_logpdf_backward(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, m: torch.Tensor,
                            s: torch.Tensor, c: torch.Tensor):
    """The gradients of :func:`mixture_logpdf` in x (its dtype) and in the means, variances and
    log-weights (the arithmetic dtype)."""
    _common.check_device(x, "mixture_logpdf_backward")
    acc = out.dtype
    k, n = m.numel(), x.numel()
    m, s, c = m.contiguous(), s.contiguous(), c.contiguous()
    block, block_k, warps = _sizes(k, acc)
    programs = _common.cdiv(n, block)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    parts = torch.zeros((max(programs, 1), 3, k), dtype=acc, device=x.device)
    if n:
        with _common.device_guard(x):
            _backward_kernel[(programs,)](grad.to(acc).contiguous(), x.contiguous(), out.contiguous(), m, s, c,
                                          grad_x, parts, n, k, ACC=_common.tl_acc(acc), BLOCK=block, BLOCK_K=block_k,
                                          num_warps=warps)
    totals = parts.sum(0)  # separate copies: an op's outputs may not alias one another
    return grad_x, totals[0].clone(), totals[1].clone(), totals[2].clone()
