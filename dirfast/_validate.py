"""The argument checks of dirfast's API, with one rule for the error a mistake gets.

- **TypeError for a wrong type**: a str or None where a number belongs, a float or a bool where
  an int belongs, a list where a tensor belongs, a tensor or array whose dtype is of the wrong
  kind (integer, bool or complex where real floating values belong; a float8, which no
  computation here takes, where float16, bfloat16, float32 or float64 values belong).
- **ValueError for a wrong value or shape**: NaN or infinite, out of range, empty, the wrong
  number of dimensions or elements, a tensor on another device (or on the meta device where
  its values must be read), and an option that is not among those offered, whatever its type
  (``kernel=3`` is an unknown kernel, as ``kernel="box"``).
- A state dict that is not a mapping is a TypeError; a wrong entry in one (a missing key, a
  tensor of another shape, a NaN, a setting that differs) is a ValueError, or the RuntimeError
  of ``nn.Module.load_state_dict`` for a module.
- NotImplementedError for a derivative asked where none is computed: a tensor that requires grad
  where the function takes it as a constant (:func:`constant`), as the ops do (README, "First
  derivatives, or an error").
- RuntimeError only for a call the object's state does not allow yet (weights before a fit), and
  where torch itself refuses: an in-place write that autograd or the tensor's memory forbids (a
  leaf that requires grad, an expanded tensor), a tensor on a device the selected backend does
  not run on.

Every message names the argument and says what it must be. A check runs before anything
changes, so a failed call leaves every object as it was. An argument that is allowed but likely a
mistake gets a warning (:func:`warn`) at the user's line.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from .ops import FLOAT_DTYPES, as_float

REAL_TYPES = (int, float, np.integer, np.floating)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


# dirfast's files, and torch's, which call into dirfast (nn.Module.__call__, torch.no_grad's wrapper)
_NOT_THE_CALLER = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside dirfast and torch (as Python 3.12's
    ``skip_file_prefixes`` does), however deep in dirfast it is raised: the user's line."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_NOT_THE_CALLER):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _type_name(value) -> str:
    return type(value).__name__


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An int (a bool is not one) in ``[low, high]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {_type_name(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else \
            f">= {low}" if low is not None else f"<= {high}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def real(name: str, value, low: float | None = None, high: float | None = None, *,
         above: bool = False, finite: bool = True) -> float:
    """A real number (a bool is not one), not NaN, finite unless ``finite=False``, at least
    ``low`` (above it with ``above``) and at most ``high``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, REAL_TYPES):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    value = as_float(name, value)
    # NaN and inf by comparisons, not math.isnan / math.isinf, which torch.compile cannot take
    # where dynamic=True makes the number symbolic
    if value != value or (finite and abs(value) == math.inf):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if above else value < low):
        raise ValueError(f"{name} must be {'>' if above else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return value


def positive(name: str, value) -> float:
    """A finite real number above 0."""
    return real(name, value, 0.0, above=True)


def in_dtype(name: str, value: float, dtype: torch.dtype, *, reciprocal: bool = False) -> float:
    """``value`` (a float :func:`real` returned) finite in ``dtype``, the dtype a computation
    runs in, and with ``reciprocal`` a normal number there (``1 / value`` finite too; the subnormal
    ``1 / finfo.max`` rounds so that its reciprocal is inf, and is 0 where denormals are flushed):
    beyond them it would be inf there, and the result NaN."""
    big, tiny = float(torch.finfo(dtype).max), float(torch.finfo(dtype).tiny)
    if abs(value) > big or (reciprocal and abs(value) < tiny):
        bound = f"in [{tiny:.4g}, {big:.4g}] (a normal number in {dtype}, the dtype of the computation: it " \
            f"and 1/{name} finite there)" if reciprocal else \
            f"at most {big:.4g} in magnitude (it finite in {dtype}, the dtype of the computation)"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")
    return bool(value)


def choice(name: str, value, options) -> str:
    """One of ``options`` (str), as a str: anything else is an unknown option, a ValueError."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return str(value)  # a NumPy string as a str: a state dict holding one would not load with weights_only


def pair(name: str, value) -> tuple[float, float]:
    """``(low, high)`` as two floats: a tuple, list or 1-D array of two finite real numbers with
    ``0 <= low <= high`` (a dict or a set, which have no order of their own, is not one)."""
    if not (isinstance(value, (tuple, list)) or (isinstance(value, np.ndarray) and value.ndim > 0)):
        raise TypeError(f"{name} must be a pair (low, high): a tuple, list or array of two numbers, got {value!r}")
    if (isinstance(value, np.ndarray) and value.ndim != 1) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high) of two numbers, got {value!r}")
    low, high = (real(name, v) for v in value)
    if not 0 <= low <= high:
        raise ValueError(f"{name} must satisfy 0 <= low <= high, got {tuple(value)!r}")
    return low, high


def process_group(name: str, value, *, member: bool = False):
    """None (the default group, the world) or a ``torch.distributed`` ProcessGroup, or the value
    ``new_group`` gives a rank outside the group (``GroupMember.NON_GROUP_MEMBER``: a module's
    calls then stay local, as torch's collectives skip it). ``member``: a collective of
    dirfast.distributed, which runs on the group's ranks only, refuses that value (ValueError)."""
    outside = dist.is_available() and type(value) is int and value == dist.GroupMember.NON_GROUP_MEMBER
    if outside and member:
        raise ValueError(f"{name} is GroupMember.NON_GROUP_MEMBER (this rank is outside the group): call the "
                         "collective on the group's ranks only")
    if value is None or outside or (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        return value
    raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {_type_name(value)}")


def tensor(name: str, value) -> torch.Tensor:
    """A dense (strided) tensor: a sparse one would fail deep inside torch's ops."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(value)}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    return value


# The dtypes whose sums and gathers every torch.distributed backend takes (gloo has no int16, no
# unsigned type above uint8, no float8).
COLLECTIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8,
                     torch.int32, torch.int64)


def collective(name: str, value) -> torch.Tensor:
    """A tensor for a torch.distributed collective: dense, holding values (not meta), of a dtype
    every backend takes (:data:`COLLECTIVE_DTYPES`; gloo's own error names no argument)."""
    readable(name, tensor(name, value))
    if value.dtype not in COLLECTIVE_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32, float64, bool, uint8, int8, int32 or int64 "
                        f"tensor (what every torch.distributed backend sums and gathers), got {value.dtype}")
    return value


def floating(name: str, value) -> torch.Tensor:
    """A tensor of float16, bfloat16, float32 or float64 values, the floating dtypes dirfast
    computes in (a float8 tensor would fail deep inside an op)."""
    if tensor(name, value).dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {value.dtype}")
    return value


def prediction_pair(pred_name: str, pred, target_name: str, target) -> None:
    """Predictions and targets of a loss: floating, of one shape (broadcasting ``[N, 1]`` against
    ``[N]`` would average every pair), on one device, not empty (the mean would be NaN)."""
    floating(pred_name, pred)
    floating(target_name, target)
    if pred.shape != target.shape:
        raise ValueError(f"{pred_name} and {target_name} must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)} (reshape one: broadcasting them would average every pair)")
    if pred.device != target.device:
        raise ValueError(f"{pred_name} is on {pred.device} but {target_name} is on {target.device}")
    if pred.numel() == 0:
        raise ValueError(f"{pred_name} and {target_name} must not be empty (their mean would be NaN)")


def weights_for(name: str, weights, loss: torch.Tensor) -> torch.Tensor:
    """Floating ``weights`` on ``loss``'s device that broadcast to its shape without enlarging it
    (each of their trailing dimensions 1 or ``loss``'s); a shape check in Python, as
    ``torch.broadcast_shapes`` costs about as much as a small loss itself
    (benchmarks/results/cpu/losses-weights-check.txt, design-constants.md)."""
    floating(name, weights)
    if weights.device != loss.device:
        raise ValueError(f"{name} is on {weights.device} but inputs are on {loss.device}")
    shape, target = weights.shape, loss.shape
    if len(shape) > len(target) or any(w not in (1, t) for w, t in zip(reversed(shape), reversed(target))):
        raise ValueError(f"{name} of shape {tuple(shape)} must broadcast to the loss shape {tuple(target)} (that of "
                         f"inputs) without enlarging it")
    return weights


def constant(name: str, value, function: str) -> None:
    """Refuse a tensor ``value`` that requires grad (grad mode on) where ``function`` takes it as a
    constant: NotImplementedError, where torch would leave its gradient None, silently."""
    if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{function} has no derivative in {name}, which requires grad: pass "
                                  f"{name}.detach() (torch would leave its gradient None, silently)")


def readable(name: str, value: torch.Tensor) -> torch.Tensor:
    """A tensor whose values can be read (not on the meta device)."""
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds no values to read")
    return value


def real_tensor(name: str, value) -> torch.Tensor:
    """``value`` (a tensor, NumPy array or sequence of real numbers) as a real-valued tensor,
    keeping the dtype of a tensor or array (their precision decides the published bins); lists
    become float64 or int64. Host values become a CPU tensor whatever torch's default device
    (under ``with torch.device("meta")`` they would hold nothing); floating values must be
    float16, bfloat16, float32 or float64 (not float8, see :func:`floating`)."""
    if not isinstance(value, torch.Tensor):
        try:
            array = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be a tensor or an array of real numbers ({exc})") from None
        if array.dtype.kind == "O" and any(type(v) is int and not -2 ** 63 <= v < 2 ** 64 for v in array.flat):
            raise ValueError(f"{name} holds integers too large for 64 bits")  # numbers, out of range
        if array.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be real numbers, got an array of {array.dtype}")
        if array.dtype.kind == "f" and array.dtype.itemsize > 8:  # torch has no longdouble
            raise TypeError(f"{name} must be float16, float32 or float64 values, got an array of {array.dtype} "
                            "(convert it with .astype(np.float64))")
        # One copy, in native byte order and without the negative strides torch refuses (a[::-1]);
        # from_numpy keeps it on the CPU whatever the default device. The dtype goes by its kind
        # and size: NumPy's ulonglong (a list's integers beyond int64) is a uint64 torch knows not.
        value = torch.from_numpy(array.astype(np.dtype(array.dtype.str).newbyteorder("="), order="C", copy=True))
    tensor(name, value)  # dense
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got {value.dtype}")
    if value.is_floating_point() and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be integers or float16, bfloat16, float32 or float64 values, got {value.dtype}")
    return value


CHUNK = 32767  # elements a pass over labels on the CPU takes at a time (see chunks)


def chunks(values: torch.Tensor) -> tuple:
    """A 1-D tensor as consecutive views of at most :data:`CHUNK` elements on the CPU (whole
    elsewhere). Below torch's parallel grain (32768 elements) no op on a chunk starts threads:
    on a busy machine each parallel region waits for every core, and a reduction over chunks in
    a fixed order has the same bits for any thread count."""
    return values.split(CHUNK) if values.device.type == "cpu" else (values,)


def finite_values(name: str, value) -> torch.Tensor:
    """``value`` (any shape) as a flat float64 tensor, refused when empty, not all finite, or
    spread over more than float64 can subtract: what an estimator fitted on a whole training
    set takes."""
    return finite_values_and_span(name, value)[0]


def finite_values_and_span(name: str, value) -> tuple:
    """:func:`finite_values` with the smallest and largest value (Python floats) that its check
    has read: for the callers that need them, without another pass."""
    values = readable(name, real_tensor(name, value)).detach().reshape(-1)
    if values.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if values.dtype != torch.float64:
        wide = torch.empty(values.shape, dtype=torch.float64, device=values.device)
        for part, source in zip(chunks(wide), chunks(values)):
            part.copy_(source)
        values = wide
    # One pass: a NaN makes both ends NaN and an infinity is an end.
    ends = torch.stack([end for part in chunks(values) for end in torch.aminmax(part)])
    low, high = (float(v) for v in torch.aminmax(ends))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite: found NaN or infinite values")
    if not math.isfinite(high - low):
        raise ValueError(f"{name} span [{low:g}, {high:g}], a range float64 cannot hold: rescale them")
    return values, low, high


def state_mapping(value, owner: str) -> Mapping:
    """A state dict (any mapping) given to ``owner.load_state_dict``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"state must be a dict from {owner}.state_dict(), got {_type_name(value)}")
    return value


def state_values(key: str, value) -> torch.Tensor:
    """An estimator's state dict entry ``key`` (LDS, DenseWeight) as a float64 CPU tensor: a
    ValueError naming it unless it holds real numbers (complex parts, bools and float8 roundings
    would load silently)."""
    if isinstance(value, torch.Tensor):
        wrong = value.is_complex() or value.dtype == torch.bool or (
            value.is_floating_point() and value.dtype not in FLOAT_DTYPES)
        kind: str | np.dtype = str(value.dtype)
    else:
        try:
            kind = np.asarray(value).dtype
        except Exception:  # ragged lists and the like: refused below
            kind = np.dtype(object)
        wrong = kind.kind not in "iuf"
    if wrong:
        raise ValueError(f"state_dict {key!r} must hold real numbers, got {kind}")
    try:  # detached: a checkpoint's tensor that requires grad must not tie the estimator's weights to its graph
        return torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"state_dict {key!r} is not a tensor of numbers ({exc})") from None


def checkpoint_errors(state_dict: Mapping, prefix: str, current: Mapping, strict: bool, owner: str,
                      optional=()) -> list:
    """What is wrong with a module's entries of ``state_dict`` (``current``: name -> tensor),
    checked before anything is copied: missing keys (``strict``; never those of ``optional``),
    values that are not tensors of real numbers of the current shape, or not finite. Messages
    in the words of ``nn.Module.load_state_dict``."""
    errors = []
    for name, mine in current.items():
        key = prefix + name
        if key not in state_dict:
            if strict and name not in optional:
                errors.append(f'Missing key "{key}" in the {owner} state_dict.')
            continue
        saved = state_dict[key]
        if not isinstance(saved, torch.Tensor):
            errors.append(f'While copying the parameter named "{key}", expected torch.Tensor, '
                          f"received {_type_name(saved)}.")
        elif tuple(saved.shape) != tuple(mine.shape):
            errors.append(f"size mismatch for {key}: copying a tensor with shape {tuple(saved.shape)} from "
                          f"checkpoint, the shape in current model is {tuple(mine.shape)}.")
        elif saved.is_complex() or saved.dtype == torch.bool:
            errors.append(f"{key}: expected real numbers, got {saved.dtype}.")
        elif saved.is_floating_point() and saved.dtype not in FLOAT_DTYPES:  # a float8: no isfinite, and rounded
            errors.append(f"{key}: expected float16, bfloat16, float32 or float64 values, got {saved.dtype}.")
        elif saved.is_meta:
            errors.append(f"{key}: the checkpoint holds a meta tensor, without values.")
        elif saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
            errors.append(f"{key}: the checkpoint holds NaN or infinite values.")
    return errors
