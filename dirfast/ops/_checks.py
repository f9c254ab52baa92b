"""Argument checks shared by the ops: each error names the argument at fault.

They look only at shapes, dtypes and devices, never at values, so they cost no host
synchronisation and run unchanged under ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch

MAX_BINS = (1 << 31) - 2  # bin numbers (and the identity bin B of calibrate) fit an int32
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(name: str, value) -> torch.Tensor:
    """A dense (strided) tensor: a sparse one would fail deep inside torch's ops."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    return value


def floating(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def choice(name: str, value, options) -> str:
    """One of ``options`` (str): anything else, of any type, is an unknown option, a ValueError."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def features_and_bins(x, bin_idx) -> int:
    """Check ``x`` ([N, D] or [B, C, *spatial]) against ``bin_idx``; return D."""
    floating("x", x)
    tensor("bin_idx", bin_idx)
    if x.dim() < 2:
        raise ValueError(f"x must be [N, D] or [B, C, *spatial], got shape {tuple(x.shape)}")
    if bin_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"bin_idx must be int64 or int32, got {bin_idx.dtype}")
    expected = (x.shape[0],) + tuple(x.shape[2:])
    if tuple(bin_idx.shape) != expected:
        raise ValueError(
            f"bin_idx must have shape {expected} to match x of shape {tuple(x.shape)} "
            f"(one index per row, features along dim 1), got {tuple(bin_idx.shape)}"
        )
    if bin_idx.device != x.device:
        raise ValueError(f"bin_idx is on {bin_idx.device} but x is on {x.device}")
    return x.shape[1]


def num_bins(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"num_bins must be an int, got {type(value).__name__}")
    if not 1 <= value <= MAX_BINS:
        raise ValueError(f"num_bins must be in [1, {MAX_BINS}], got {value}")
    return value


FLOAT32_MAX = 3.4028234663852886e38


def as_float(name: str, value) -> float:
    """``float(value)``; an int beyond float64's range is a ValueError naming the argument."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an int of {int(value).bit_length()} bits") from None


def clips(clip_min, clip_max) -> tuple:
    """The clamp bounds of calibrate's variance ratio, as floats with 0 <= clip_min <= clip_max;
    both within float32's range (the arithmetic's), clip_max possibly infinite (no upper clamp)."""
    for name, value in (("clip_min", clip_min), ("clip_max", clip_max)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    clip_min, clip_max = as_float("clip_min", clip_min), as_float("clip_max", clip_max)
    if clip_min != clip_min or clip_max != clip_max or not 0 <= clip_min <= clip_max:  # NaN: as in real()
        raise ValueError(f"clip_min and clip_max must satisfy 0 <= clip_min <= clip_max, "
                         f"got {clip_min} and {clip_max}")
    if clip_min > FLOAT32_MAX or (FLOAT32_MAX < clip_max < math.inf):
        raise ValueError(f"clip_min and clip_max must be at most {FLOAT32_MAX:.4g} (float32), clip_max may "
                         f"be inf; got {clip_min} and {clip_max}")
    return float(clip_min), float(clip_max)


def in_place_problem(name: str, value: torch.Tensor) -> str | None:
    """Why torch would reject writing ``value`` in place (None when it would not): an inference
    tensor outside inference mode, elements that share memory, or autograd's rule (a leaf that
    requires grad, or a view of a leaf, whether the view or its base asked for grad). Under
    torch.compile, torch makes these checks itself."""
    if torch.compiler.is_compiling():
        return None
    if value.is_inference() and not torch.is_inference_mode_enabled():
        return (f"{name} is an inference tensor (made under torch.inference_mode), which torch forbids writing "
                "outside it")
    if may_overlap(value):
        return f"{name} has elements that share memory (an expanded tensor, or strides that overlap)"
    if torch.is_grad_enabled() and value.requires_grad:
        base = cast(torch.Tensor, value._base) if value._is_view() else value  # a view has a base
        if base.is_leaf:
            what = "a view of a leaf tensor" if base is not value else "a leaf tensor"
            return f"{name} is {what} and requires grad: autograd forbids writing it in place"
    return None


def writable_in_place(name: str, value: torch.Tensor, alternative: str = "") -> None:
    """Refuse, before anything is written, an in-place update that torch would reject after;
    ``alternative``: what else the caller can do, for the message."""
    problem = in_place_problem(name, value)
    if problem is not None:
        raise RuntimeError(f"{problem}; pass a tensor of its own (a copy){alternative}")


def may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: torch's answer (an expanded tensor), and
    where torch cannot tell, the strides': False when each dimension (by increasing stride) steps
    past every element the smaller ones reach, as any layout a view of distinct elements makes
    (transposed, sliced, strided); True for rows given overlapping strides."""
    overlap = torch._debug_has_internal_overlap(t)  # 0: it does not; 1: it does; 2: torch cannot tell
    if overlap != 2:
        return overlap == 1
    reach = 0  # the largest offset the dimensions so far reach
    for stride, size in sorted((abs(s), n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _span(t: torch.Tensor) -> tuple:
    """The addresses from the first element of ``t`` to just past its last."""
    first = t.data_ptr()
    if t.is_contiguous():
        return first, first + t.numel() * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return first, first + (last + 1) * t.element_size()


def running_moments(count, mean, m2, x) -> None:
    """Running per-bin tables written in place: ``count`` float64 ``[B]``, ``mean`` and ``m2``
    ``[B, D]`` of one dtype, float32 or float64 (D = x.shape[1]), on the device of ``x``, each
    writable and apart from the others."""
    tensor("count", count)
    if count.dtype != torch.float64:
        raise TypeError(f"count must be torch.float64, got {count.dtype}")
    if count.dim() != 1 or not 1 <= count.shape[0] <= MAX_BINS:
        raise ValueError(f"count must be [B] with 1 <= B <= {MAX_BINS}, got shape {tuple(count.shape)}")
    shape = (count.shape[0], x.shape[1])
    for name, table in (("mean", mean), ("m2", m2)):
        tensor(name, table)
        if table.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be torch.float32 or torch.float64, got {table.dtype}")
        if tuple(table.shape) != shape:
            raise ValueError(f"{name} must be [B, D] = {list(shape)} (B from count, D = x.shape[1]), "
                             f"got shape {tuple(table.shape)}")
    if m2.dtype != mean.dtype:
        raise TypeError(f"m2 must have the dtype of mean ({mean.dtype}), got {m2.dtype}")
    tables = (("count", count), ("mean", mean), ("m2", m2))
    for name, table in tables:
        if table.device != x.device:
            raise ValueError(f"{name} is on {table.device} but x is on {x.device}")
        writable_in_place(name, table)
    if torch.compiler.is_compiling():
        return
    spans = [(name, _span(table)) for name, table in tables if table.numel()]
    for i, (name, (a0, a1)) in enumerate(spans):
        for other_name, (b0, b1) in spans[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{name} and {other_name} share memory: each must be a tensor of its own")


def bin_table(name: str, value, shape, device) -> torch.Tensor:
    floating(name, value)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}")
    return value


# ---------------------------------------------------------------------------- the pairwise ops
def real(name: str, value, low: float | None = None, above: bool = False, *, dtype: torch.dtype | None = None,
         reciprocal: bool = False) -> float:
    """A finite real number (a bool is not one), at least ``low`` (above it with ``above``); with
    ``dtype`` (the dtype the op computes in), finite there too, and with ``reciprocal`` a normal
    number there (at least its smallest normal, ``finfo.tiny``): beyond that range it would be inf
    in the kernel, and the loss NaN. (``1 / finfo.max`` itself is subnormal in float32: it rounds
    so that its reciprocal is inf, and it is 0 where denormals are flushed.)"""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = as_float(name, value)
    if value != value or abs(value) == math.inf:  # comparisons: torch.compile's symbolic floats take them
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if above else value < low):
        raise ValueError(f"{name} must be {'>' if above else '>='} {low}, got {value!r}")
    if dtype is not None:
        big, tiny = float(torch.finfo(dtype).max), float(torch.finfo(dtype).tiny)
        if abs(value) > big or (reciprocal and abs(value) < tiny):
            if reciprocal:
                raise ValueError(f"{name} must be in [{tiny:.4g}, {big:.4g}] (a normal number in {dtype}, the dtype "
                                 f"the op computes in: it and 1/{name} finite there), got {value!r}")
            raise ValueError(f"{name} must leave it finite in {dtype}, the dtype the op computes in, got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def integer(name: str, value) -> int:
    """An int or NumPy integer (a bool is not one)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def features_and_labels(features, labels) -> int:
    """``features`` [m, D] and ``labels`` [m, L] (L >= 1), floating, on one device; returns m."""
    floating("features", features)
    floating("labels", labels)
    if features.dim() != 2:
        raise ValueError(f"features must be [m, D], got shape {tuple(features.shape)}")
    m = features.shape[0]
    if labels.dim() != 2 or labels.shape[0] != m or labels.shape[1] < 1:
        raise ValueError(f"labels must be [m, L] with m = {m} (features.shape[0]) and L >= 1, got shape "
                         f"{tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels is on {labels.device} but features is on {features.device}")
    return m


def anchors(m: int, offset: int, count) -> int:
    """The anchor rows ``offset .. offset + count - 1`` of m rows (ints, type-checked by the
    caller): in range; returns count (None: every row from ``offset``)."""
    if not 0 <= offset <= m:
        raise ValueError(f"offset must be in [0, {m}] (features.shape[0]), got {offset}")
    count = m - offset if count is None else count
    if not 0 <= count <= m - offset:
        raise ValueError(f"count must be in [0, {m - offset}] (features.shape[0] - offset), got {count}")
    return count
