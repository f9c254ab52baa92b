"""Helpers shared by the Triton kernels: the canonical strided view, launch sizes, device guards.

Every op sees its features as ``x[P, C, S]`` with strides ``(sP, sC, sS)`` and ``bin_idx[P, S]``:
``[N, D]`` rows are ``P = 1, S = N``; dense ``[B, C, *spatial]`` is ``P = B, S = prod(spatial)``;
a channels-last tensor folds ``P`` into ``S`` and becomes rows. Triton specialises integer
arguments equal to 1, so whichever stride is 1 becomes the contiguous, vectorised axis of the
tiles without a second kernel; spatial dims that cannot merge into one stride (a sliced dense
tensor) are the one layout that is copied.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton.language as tl

from ..ops._common import acc_dtype, centred_rows


def interpret() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The kernels are compiled or interpreted as decided when they were defined (at import).
INTERPRET = interpret()


def check_device(t: torch.Tensor, op: str) -> None:
    """A Triton op runs on CUDA tensors, or on any tensor under the interpreter."""
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"dirfast {op} (Triton) runs on CUDA tensors (or any tensor with TRITON_INTERPRET=1 set "
            f"before Triton is imported), got a tensor on {t.device}"
        )


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device and stream)."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tl_acc(*dtypes: torch.dtype):
    """The Triton dtype of the ops' accumulation rule (a constexpr argument of the kernels)."""
    return tl.float64 if acc_dtype(*dtypes) == torch.float64 else tl.float32


def _merge(sizes, strides):
    """One (size, stride) for dims that form a single arithmetic progression, or None."""
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    total = 1
    for n, _ in dims:
        total *= n
    if not dims:
        return total, 1
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    return total, dims[-1][1]


class Rows(NamedTuple):
    """``x`` as ``[P, C, S]`` and ``bin_idx`` as ``[P, S]`` (see the module docstring)."""

    x: torch.Tensor  # the tensor the strides refer to (x itself unless it had to be copied)
    bins: torch.Tensor
    P: int
    C: int
    S: int
    sP: int
    sC: int
    sS: int
    bP: int
    bS: int

    @property
    def rows(self) -> int:
        return self.P * self.S


def _dense_view(t: torch.Tensor, lead: int):
    """(P, S, sP, sS) of a tensor ``[P, (C,) *spatial]`` whose spatial dims start at ``lead``,
    or None when its spatial dims do not merge."""
    merged = _merge(t.shape[lead:], t.stride()[lead:])
    if merged is None:
        return None
    S, sS = merged
    return t.shape[0], S, t.stride(0), sS


def rows_of(x: torch.Tensor, bin_idx: torch.Tensor, fold: bool = True) -> Rows:
    """The canonical view of ``x`` ([N, D] or [B, C, *spatial]) and its ``bin_idx``; ``fold``
    allows merging the images of a channels-last tensor into one row axis."""
    C = x.shape[1]
    if x.dim() == 2:
        N = x.shape[0]
        return Rows(x, bin_idx, 1, C, N, 0, x.stride(1), x.stride(0), 0, bin_idx.stride(0))
    view = _dense_view(x, 2)
    if view is None:  # sliced spatial dims: the one layout that is copied
        x = x.contiguous()
        view = _dense_view(x, 2)
    bview = _dense_view(bin_idx, 1)
    if bview is None:
        bin_idx = bin_idx.contiguous()
        bview = _dense_view(bin_idx, 1)
    P, S, sP, sS = view
    _, _, bP, bS = bview
    sC = x.stride(1)
    # Channels-last (and any layout where images follow each other with the row stride): one
    # long row axis, so tiles are not cut at image boundaries.
    if fold and P > 1 and sP == S * sS:
        if bP != S * bS:
            bin_idx = bin_idx.contiguous()
            bP, bS = S, 1
        return Rows(x, bin_idx, 1, C, P * S, 0, sC, sS, 0, bS)
    return Rows(x, bin_idx, P, C, S, sP, sC, sS, bP, bS)


def out_strides(out: torch.Tensor, rows: Rows):
    """(oP, oC, oS) of an output shaped like ``x`` in the view ``rows``, or None when the
    output cannot follow it (``rows`` folded images that the output keeps apart)."""
    if out.dim() == 2:
        return 0, out.stride(1), out.stride(0)
    view = _dense_view(out, 2)
    if view is None:
        return None
    P, S, oP, oS = view
    if rows.P == 1 and P > 1:  # x's images were folded into one row axis
        if oP != S * oS:
            return None
        return 0, out.stride(1), oS
    return oP, out.stride(1), oS

