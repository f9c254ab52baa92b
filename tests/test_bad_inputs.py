"""Bad input across the whole public API, generated from one table.

Every public callable (each ``__all__`` of dirfast and of its public modules) and every method of
a public class has an entry in ``API``: how to call it with good arguments, and the kind of each
argument. Each kind has a table of bad values. The test calls each entry with one argument
replaced by each bad value of its kind and asserts what dirfast._validate's one rule gives --
TypeError for a wrong type, ValueError for a wrong value or shape, the message naming the
argument -- or the documented result where the value is not an error (a NaN label on the
training path, a non-contiguous tensor, float16 where it is valid). After an error, the object
whose method failed is bitwise as it was. A public name without an entry fails
``test_every_public_name_is_listed``, so the next API is covered the day it lands.

README.md, "Numerics and bad input", states the policies tested here.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import dirfast
import dirfast.plot
from dirfast import ops
from dirfast.losses import BMCLoss, BNILoss, GAILoss
from dirfast.mixture import GaussianMixture
from dirfast.presets import AGEDB_DIR, NYUD2_DIR, STS_B_DIR
from testing import BACKEND_NAMES, gen, public_modules

try:  # optional (requirements-dev.txt): without it the plot entries skip, every other entry runs
    import matplotlib
except ImportError:
    plt = None
else:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

NAN, INF = float("nan"), float("inf")
AVAILABLE = [name for name in BACKEND_NAMES if dirfast.backends()[name]["available"]]
UNAVAILABLE = [name for name in BACKEND_NAMES if name not in AVAILABLE]


# =========================================================================== outcomes
class Outcome:
    """A documented result: ``check(got, good)`` with ``good`` the result of the good call."""

    def __init__(self, name: str, check: Callable) -> None:
        self.name, self.check = name, check

    def __repr__(self) -> str:
        return self.name


def plain(value):
    """A value as plain data to compare: tensors, arrays, numbers, and the state of objects."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, (dirfast.Binning, dirfast.GridBinning)):
        return plain(value.centers)
    if isinstance(value, nn.Module):
        state = {key: plain(v) for key, v in value.state_dict().items()}
        state.update({f"buffer {key}": plain(v) for key, v in value.named_buffers()})
        if isinstance(value, dirfast.FDS):
            state["snapshot follows"] = value._snapshot_follows
            state.update({name: plain(getattr(value, name)) for name in ("accumulated_count", "num_samples_skipped")})
        return state
    if hasattr(value, "state_dict"):
        return plain(value.state_dict())
    if isinstance(value, dict):
        return {key: plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def assert_same(got, expected, *, rtol: float = 0.0, path: str = "result") -> None:
    got, expected = plain(got), plain(expected)
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got).__name__} instead of a tensor"
        assert got.shape == expected.shape, f"{path}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        if expected.is_floating_point() or got.is_floating_point():
            torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=rtol, equal_nan=True,
                                       msg=path)
        else:
            assert torch.equal(got, expected), path
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), f"{path}: keys differ"
        for key in expected:
            assert_same(got[key], expected[key], rtol=rtol, path=f"{path}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{path}: lengths differ"
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, rtol=rtol, path=f"{path}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=rtol, abs=rtol, nan_ok=True), path
    else:
        assert got == expected, path


def _tensors(value) -> list:
    value = plain(value)
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list):
        return [t for v in value for t in _tensors(v)]
    return [torch.tensor(float(value))] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _finite(got, good) -> None:
    assert all(bool(torch.isfinite(t.double()).all()) for t in _tensors(got) if t.is_floating_point())


def _meta(got, good) -> None:
    assert got.is_meta and got.shape == plain(good).shape


def _has_nan(got, good) -> None:
    assert any(bool(torch.isnan(t.double()).any()) for t in _tensors(got) if t.is_floating_point())


SAME = Outcome("the good result", lambda got, good: assert_same(got, good))
CLOSE = Outcome("the good result, to float16 precision", lambda got, good: assert_same(got, good, rtol=1e-2))
FINITE = Outcome("a finite result", _finite)
META = Outcome("a meta tensor of the good shape (shapes only, no values)", _meta)
NAN_OUT = Outcome("NaN in the result (values are not read on the host)", _has_nan)
ZERO_WEIGHT = Outcome("weight 0 for the bad label, the others as good",
                      lambda got, good: (assert_same(got.reshape(-1)[1:], good.reshape(-1)[1:]),
                                         assert_same(got.reshape(-1)[:1], torch.zeros(1))))
NAN_DENSITY = Outcome("density NaN at the bad label, the others as good",
                      lambda got, good: (assert_same(got.reshape(-1)[1:], good.reshape(-1)[1:]),
                                         assert_same(got.reshape(-1)[:1], torch.full((1,), NAN))))
OTHERS_SAME = Outcome("the other elements as good", lambda got, good: assert_same(got.reshape(-1)[1:], good.reshape(-1)[1:]))
EMPTY = Outcome("an empty result", lambda got, good: [assert_same(t.numel(), 0) for t in _tensors(got)])


# =========================================================================== bad values by kind
@dataclass(frozen=True)
class Bad:
    name: str
    make: Callable[[Any], Any]  # the good value -> the bad one
    expect: Any                 # an exception type, or an Outcome

    def __repr__(self) -> str:
        return self.name


def _set_first(value, number):
    """``value`` as a floating tensor (its own dtype, else float64) with ``number`` first."""
    bad = torch.as_tensor(value).clone()
    bad = bad if bad.is_floating_point() else bad.double()
    bad.view(-1)[0] = number
    return bad


def _negative_strides(value):
    """The same values as a NumPy array with a negative stride (as ``a[::-1]`` or ``np.flip``)."""
    array = np.ascontiguousarray(torch.as_tensor(value).numpy()[::-1])[::-1]
    assert array.strides[0] < 0
    return array


def _strided(value):
    """The same values, not contiguous."""
    value = torch.as_tensor(value)
    out = torch.stack([value, torch.zeros_like(value)], dim=-1)[..., 0]
    assert not out.is_contiguous() or value.numel() <= 1
    return out


def _inference_copy(v: torch.Tensor) -> torch.Tensor:
    """A copy of ``v`` made under torch.inference_mode (torch forbids writing it outside)."""
    with torch.inference_mode():
        return v.clone()


def scalars(good_type: type, **extra) -> tuple:
    """Wrong types of a number; ``extra`` adds the kind's wrong values."""
    wrong = [Bad("str", lambda v: str(v), TypeError), Bad("None", lambda v: None, TypeError),
             Bad("bool", lambda v: True, TypeError), Bad("tensor", lambda v: torch.tensor(v), TypeError)]
    if good_type is int:
        wrong += [Bad("float", lambda v: float(v) + 0.5, TypeError), Bad("numpy int", lambda v: np.int64(v), SAME)]
    else:
        wrong += [Bad("numpy float", lambda v: np.float64(v), SAME),
                  Bad("numpy float32", lambda v: np.float32(v), CLOSE),
                  Bad("int beyond float64", lambda v: 10 ** 400, ValueError)]
    return tuple(wrong) + tuple(Bad(name, (lambda v, bad=bad: bad), error) for name, (bad, error) in extra.items())


COUNT = scalars(int, zero=(0, ValueError), negative=(-1, ValueError))
BIN_COUNT = COUNT + (Bad("2^40", lambda v: 2 ** 40, ValueError),)
NON_NEGATIVE_INT = scalars(int, negative=(-1, ValueError))
EPOCH = scalars(int, **{"2^24 + 1 (float32 epochs are exact to 2^24)": (2 ** 24 + 1, ValueError),
                         "-2^24 - 1": (-2 ** 24 - 1, ValueError)})
REAL = scalars(float, NaN=(NAN, ValueError), inf=(INF, ValueError), minus_inf=(-INF, ValueError))
POSITIVE = REAL + (Bad("0", lambda v: 0.0, ValueError), Bad("negative", lambda v: -1.0, ValueError))
NON_NEGATIVE = REAL + (Bad("negative", lambda v: -1.0, ValueError),)
PROBABILITY = REAL + (Bad("-0.1", lambda v: -0.1, ValueError), Bad("1.5", lambda v: 1.5, ValueError))
BOOL = (Bad("int 1", lambda v: 1, TypeError), Bad("str", lambda v: "yes", TypeError),
        Bad("None", lambda v: None, TypeError), Bad("numpy bool", lambda v: np.bool_(v), SAME))
CHOICE = (Bad("unknown", lambda v: "bogus", ValueError), Bad("None", lambda v: None, ValueError),
          Bad("int", lambda v: 3, ValueError), Bad("upper case", lambda v: v.upper(), ValueError))
BINNING = (Bad("int", lambda v: 121, TypeError), Bad("str", lambda v: "integer", TypeError),
           Bad("edges list", lambda v: [0.0, 1.0, 2.0], TypeError))
PAIR = (Bad("scalar", lambda v: 5, TypeError), Bad("one value", lambda v: (5,), ValueError),
        Bad("three values", lambda v: (*v, v[1]), ValueError), Bad("0-d array", lambda v: np.array(5.0), TypeError),
        Bad("2-D array", lambda v: np.array([v, v]), ValueError),
        Bad("str", lambda v: "ab", TypeError), Bad("reversed", lambda v: (v[1], v[0]), ValueError),
        Bad("negative", lambda v: (-1, v[1]), ValueError), Bad("NaN", lambda v: (NAN, v[1]), ValueError),
        Bad("None inside", lambda v: (None, v[1]), TypeError))
SPARSE = Bad("sparse", lambda v: torch.as_tensor(v).to_sparse(), TypeError)
NOT_A_TENSOR = (Bad("list", lambda v: torch.as_tensor(v).tolist(), TypeError), Bad("None", lambda v: None, TypeError),
                Bad("str", lambda v: "abc", TypeError), SPARSE)
# A floating dtype that torch barely computes in: refused as a wrong type, as integers are.
FLOAT8 = Bad("float8", lambda v: torch.as_tensor(v).to(torch.float8_e4m3fn), TypeError)
WRONG_DTYPE = (Bad("int64", lambda v: torch.as_tensor(v).long(), TypeError),
               Bad("complex", lambda v: torch.as_tensor(v).to(torch.complex64), TypeError),
               Bad("bool", lambda v: torch.as_tensor(v) != 0, TypeError), FLOAT8)
NOT_REAL = (Bad("str", lambda v: "abc", TypeError), Bad("None", lambda v: None, TypeError),
            Bad("ragged", lambda v: [[1.0], [1.0, 2.0]], TypeError),
            Bad("complex", lambda v: torch.as_tensor(v).to(torch.complex64), TypeError),
            Bad("bool", lambda v: torch.as_tensor(v) != 0, TypeError), FLOAT8, SPARSE)
NON_FINITE = (Bad("NaN", lambda v: _set_first(v, NAN), ValueError), Bad("inf", lambda v: _set_first(v, INF), ValueError),
              Bad("-inf", lambda v: _set_first(v, -INF), ValueError))
LOW_PRECISION = (Bad("float16", lambda v: torch.as_tensor(v).half(), SAME),
                 Bad("bfloat16", lambda v: torch.as_tensor(v).bfloat16(), SAME))
LAYOUTS = (Bad("non-contiguous", _strided, SAME), Bad("numpy", lambda v: torch.as_tensor(v).numpy(), SAME),
           Bad("numpy, negative strides", _negative_strides, SAME))

# Labels read on the host (a fit over the whole training set): NaN, inf and no labels are errors.
FIT_LABELS = NOT_REAL + NON_FINITE + LOW_PRECISION + LAYOUTS + (
    Bad("empty", lambda v: torch.as_tensor(v)[:0], ValueError),
    Bad("integers beyond 64 bits", lambda v: [2 ** 70, 3], ValueError),
    Bad("meta", lambda v: torch.as_tensor(v).to("meta"), ValueError))
# Labels of a batch on the training path: nothing is read on the host, a NaN label has no bin.
BATCH_LABELS = NOT_REAL + LOW_PRECISION + LAYOUTS + (
    Bad("NaN", lambda v: _set_first(v, NAN), ZERO_WEIGHT), Bad("inf", lambda v: _set_first(v, INF), ZERO_WEIGHT),
    Bad("empty", lambda v: torch.as_tensor(v)[:0], EMPTY), Bad("meta", lambda v: torch.as_tensor(v).to("meta"), META))
# Arrays of an evaluation (metrics), read on the host.
EVAL_VALUES = NOT_REAL + NON_FINITE + LAYOUTS + (
    Bad("float16", lambda v: torch.as_tensor(v).half(), CLOSE), Bad("meta", lambda v: torch.as_tensor(v).to("meta"), ValueError))
# Arrays over a grid of d dimensions: [N, d] only.
GRID_VALUES = EVAL_VALUES + (Bad("transposed [d, N]", lambda v: v.T, ValueError),
                             Bad("[N, 2 d]", lambda v: v.reshape(-1, 4), ValueError))
# A floating tensor of a loss or an op: values are not read (no host sync); NaN goes through.
FLOAT_TENSOR = NOT_A_TENSOR + WRONG_DTYPE + (
    Bad("NaN", lambda v: _set_first(v, NAN), NAN_OUT), Bad("non-contiguous", _strided, SAME),
    Bad("float16", lambda v: v.half(), FINITE), Bad("bfloat16", lambda v: v.bfloat16(), FINITE),
    Bad("0-d", lambda v: v.reshape(-1)[0], ValueError), Bad("extra dim", lambda v: v.unsqueeze(0), ValueError),
    Bad("meta", lambda v: v.to("meta"), ValueError))
# Features of FDS ([N, D]): the published once-per-epoch call reads them.
FEATURES = NOT_A_TENSOR + WRONG_DTYPE + (
    Bad("NaN", lambda v: _set_first(v, NAN), ValueError), Bad("non-contiguous", _strided, SAME),
    Bad("float16", lambda v: v.half(), CLOSE), Bad("1-D", lambda v: v[:, 0], ValueError),
    Bad("other D", lambda v: torch.cat([v, v], 1), ValueError), Bad("fewer rows", lambda v: v[:-1], ValueError),
    Bad("meta", lambda v: v.to("meta"), ValueError))
FDS_LABELS = (Bad("list", lambda v: v.tolist(), TypeError), Bad("None", lambda v: None, TypeError),
              Bad("complex", lambda v: v.to(torch.complex64), TypeError), Bad("fewer", lambda v: v[:-1], ValueError),
              Bad("[N, 2]", lambda v: torch.stack([v, v], 1), ValueError), Bad("non-contiguous", _strided, SAME),
              Bad("meta", lambda v: v.to("meta"), ValueError), Bad("NaN", lambda v: _set_first(v, NAN), ValueError),
              FLOAT8)
INDEX_TENSOR = NOT_A_TENSOR + (
    Bad("float", lambda v: v.float(), TypeError), Bad("fewer", lambda v: v[:-1], ValueError),
    Bad("[N, 1]", lambda v: v[:, None], ValueError), Bad("non-contiguous", _strided, SAME),
    Bad("int32", lambda v: v.int(), SAME), Bad("meta", lambda v: v.to("meta"), ValueError),
    Bad("out of range", lambda v: torch.full_like(v, 10 ** 6), FINITE))
BIN_TABLE = NOT_A_TENSOR + WRONG_DTYPE + (
    Bad("fewer bins", lambda v: v[:-1], ValueError), Bad("1-D", lambda v: v[:, 0], ValueError),
    Bad("meta", lambda v: v.to("meta"), ValueError), Bad("non-contiguous", _strided, SAME))
# What torch forbids writing in place: a leaf that requires grad, also a view made to require grad
# (of a base that does not), and an inference tensor outside inference mode.
LEAVES = (Bad("a leaf requiring grad", lambda v: v.clone().requires_grad_(), RuntimeError),
          Bad("a view made to require grad", lambda v: v.clone()[:].requires_grad_(), RuntimeError),
          Bad("an inference tensor", lambda v: _inference_copy(v), RuntimeError))
# The running tables of accumulate_bin_stats_, written in place.
TABLE_IN_PLACE = (
    Bad("fewer bins", lambda v: v[:-1], ValueError), Bad("meta", lambda v: v.to("meta"), ValueError),
    Bad("non-contiguous", _strided, SAME), Bad("expanded", lambda v: v[:1].expand_as(v), RuntimeError)) + LEAVES
RUNNING_TABLE = NOT_A_TENSOR + WRONG_DTYPE + (Bad("float16", lambda v: v.half(), TypeError),) + TABLE_IN_PLACE
COMPONENTS = NOT_A_TENSOR + WRONG_DTYPE + (
    Bad("fewer", lambda v: v[:-1], ValueError), Bad("2-D", lambda v: v[:, None], ValueError),
    Bad("meta", lambda v: v.to("meta"), ValueError), Bad("non-contiguous", _strided, SAME))
WINDOW = NOT_A_TENSOR + WRONG_DTYPE + (
    Bad("even", lambda v: v[:-1], ValueError), Bad("2-D", lambda v: v[:, None], ValueError),
    Bad("empty", lambda v: v[:0], ValueError))
WEIGHTS = (Bad("numpy", lambda v: v.numpy(), TypeError), Bad("list", lambda v: v.tolist(), TypeError),
           Bad("too long", lambda v: torch.cat([v, v]), ValueError), Bad("[N, N]", lambda v: torch.ones(8, 8), ValueError),
           Bad("[N]", lambda v: v.reshape(-1), ValueError), Bad("NaN", lambda v: _set_first(v, NAN), NAN_OUT))
# A tensor a loss takes as a constant (no derivative computed): refused where it requires grad.
CONSTANT_REQUIRING_GRAD = Bad("requiring grad", lambda v: torch.as_tensor(v).clone().requires_grad_(),
                              NotImplementedError)
HISTOGRAM = NOT_REAL + NON_FINITE + (
    Bad("2-D", lambda v: torch.as_tensor(v)[:, None], ValueError), Bad("empty", lambda v: torch.as_tensor(v)[:0], ValueError),
    Bad("fewer", lambda v: torch.as_tensor(v)[:-1], ValueError), Bad("meta", lambda v: torch.as_tensor(v).to("meta"), ValueError),
    Bad("numpy", lambda v: torch.as_tensor(v).numpy(), SAME), Bad("numpy, negative strides", _negative_strides, SAME))
HISTOGRAM_WEIGHTS = HISTOGRAM + (Bad("negative", lambda v: _set_first(v, -1.0), ValueError),
                                 Bad("all 0", lambda v: torch.zeros_like(torch.as_tensor(v)), ValueError))
NOISE_VAR = REAL[:3] + REAL[4:] + (Bad("0", lambda v: 0.0, ValueError), Bad("negative", lambda v: -1.0, ValueError),
                    Bad("1e39 (overflows float32)", lambda v: 1e39, ValueError),
                    Bad("1e-50 (underflows float32)", lambda v: 1e-50, ValueError),
                    Bad("tensor [2]", lambda v: torch.ones(2), ValueError),
                    Bad("tensor (learnable)", lambda v: torch.tensor(v), SAME),
                    Bad("int tensor", lambda v: torch.tensor(1), TypeError), FLOAT8)
NOISE_SIGMA = POSITIVE + (Bad("1e20 (its square overflows float32)", lambda v: 1e20, ValueError),
                          Bad("1e-25 (its square underflows float32)", lambda v: 1e-25, ValueError))
GMM = (Bad("path", lambda v: "gmm.pkl", TypeError), Bad("list", lambda v: [1.0], TypeError),
       Bad("no weights", lambda v: {k: x for k, x in v.items() if k != "weights"}, ValueError),
       Bad("negative variance", lambda v: dict(v, variances=-v["variances"]), ValueError),
       Bad("NaN mean", lambda v: dict(v, means=_set_first(v["means"], NAN)), ValueError),
       Bad("weights of another K", lambda v: dict(v, weights=torch.ones(5)), ValueError),
       Bad("all weights 0", lambda v: dict(v, weights=torch.zeros(2)), ValueError))
# A state dict for load_state_dict: not a mapping is a TypeError; a wrong entry, a ValueError
# (LDS, DenseWeight) or nn.Module's RuntimeError (modules). Each entry is corrupted in turn.
STATE = (Bad("not a dict", lambda v: "state", TypeError), Bad("empty", lambda v: {}, None),
         Bad("each entry missing", lambda v: v, "missing"), Bad("each entry NaN", lambda v: v, "nan"),
         Bad("each entry of another shape", lambda v: v, "shape"), Bad("each entry on meta", lambda v: v, "meta"),
         Bad("each entry float8", lambda v: v, "float8"), Bad("each entry complex", lambda v: v, "complex"))
AXES = (Bad("str", lambda v: "ax", TypeError), Bad("int", lambda v: 1, TypeError))
# Rows whose strides overlap (not an expanded tensor: torch cannot tell), written in place.
OVERLAPPING_ROWS = Bad("rows with overlapping strides", lambda v: v.clone().reshape(-1).as_strided(v.shape, (2, 1)),
                       RuntimeError)
# A scale whose inverse is beyond float32 (float32 rounds it to 0 or a subnormal: every label in bin 0).
TINY_SCALE = Bad("1e-320 (1 / scale beyond float32)", lambda v: 1e-320, ValueError)
# DenseWeight's floor whose inverse, the largest weight scale, is beyond float32: infinite weights.
TINY_EPS = Bad("1e-320 (1 / eps beyond float32)", lambda v: 1e-320, ValueError)
# A module's strict load: a key it does not have is refused before any entry is copied.
EXTRA_KEY = Bad("an extra key", lambda v: dict(v, bogus=torch.ones(1)), RuntimeError)


# =========================================================================== good values
AGES = torch.randint(0, 100, (300,), generator=gen(2)).float()
BATCH = torch.tensor([3.0, 50.0, 20.0, 99.0])
INT121, INT100, U10 = dirfast.Binning.integer(121), dirfast.Binning.integer(100), dirfast.Binning.uniform(0, 10, 10)
GRID = dirfast.GridBinning(U10, dirfast.Binning.integer(4))
GRID_Y = torch.stack([torch.rand(16, generator=gen(40)) * 10, torch.randint(0, 4, (16,), generator=gen(41)).float()], 1)
X8, Y8 = torch.randn(8, 4, generator=gen(7)), torch.randint(0, 22, (8,), generator=gen(8)).float()
KEEP8 = torch.tensor([True, True, False, True, True, True, True, False])
IDX = torch.tensor([0, 1, 2, -1, 5, 0, 1, 2])
STAT = torch.zeros(3, 4), torch.ones(3, 4), torch.zeros(3, 4), torch.full((3, 4), 2.0)
EXACT_LABELS = torch.tensor([0.5, 3.25, 7.5, 12.0, 15.75, 2.0, 9.5, 1.0])  # exact in float16 and bfloat16
RUNNING = torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64), torch.randn(3, 4, generator=gen(17)), torch.rand(3, 4, generator=gen(18))


def accumulate_bin_stats_(count, mean, m2, x, bin_idx):
    """ops.accumulate_bin_stats_, returning the tables it writes with the rows it left out; a call
    that fails must leave every table it was given as it was."""
    tables = [t for t in (count, mean, m2) if isinstance(t, torch.Tensor) and not t.is_meta and not t.is_sparse]
    before = [t.detach().clone() for t in tables]
    try:
        return ops.accumulate_bin_stats_(count, mean, m2, x, bin_idx), count, mean, m2
    except Exception:
        for table, old in zip(tables, before):
            assert torch.equal(table.detach(), old), "a failed accumulate_bin_stats_ changed a table"
        raise
PRED, TARGET = torch.randn(8, 1, generator=gen(12)), torch.randn(8, 1, generator=gen(13))
CENTERS, COUNTS = torch.linspace(-3, 3, 10), torch.rand(10, generator=gen(14)) + 0.1
GMM2 = {"means": torch.tensor([[-1.0], [1.0]]), "variances": torch.ones(2, 1, 1), "weights": torch.tensor([0.5, 0.5])}
TRAIN, TEST = np.arange(300) % 50 + 0.0, np.arange(60) % 50 + 0.0


def fitted_lds():
    return dirfast.LDS(INT121).fit(AGES)


def fitted_dense():
    return dirfast.DenseWeight(alpha=0.5).fit(AGES)


def trained_fds(seed: int = 3):
    fds = dirfast.FDS(4, bucket_num=20, bucket_start=2)
    labels = torch.randint(0, 22, (64,), generator=gen(seed)).float()
    fds.update_running_stats(torch.randn(64, 4, generator=gen(seed + 1)), labels, 0)
    fds.update_last_epoch_stats(1)
    fds.update_running_stats(torch.randn(64, 4, generator=gen(seed + 2)), labels, 1)
    fds.accumulate(torch.randn(64, 4, generator=gen(seed + 3)), labels)
    return fds


def grid_lds():
    return dirfast.LDS(GRID).fit(GRID_Y)


# =========================================================================== the public API
@dataclass
class Entry:
    """How to call one public callable: ``call(obj, **args)`` for a method of a fresh ``obj()``,
    ``call(**args)`` otherwise; ``args``: name -> (kind, good value); ``expect``: (argument, bad
    value name) -> what this callable documents instead of the kind's default."""

    call: Callable
    args: dict = field(default_factory=dict)
    obj: Callable | None = None
    expect: dict = field(default_factory=dict)
    named_as: dict = field(default_factory=dict)  # argument -> "word|word": what its messages call it
    optional: tuple = ()  # state dict keys a load does without


def method(name: str, obj: Callable, args=None, expect=None, **options) -> Entry:
    return Entry(lambda o, **kw: getattr(o, name)(**kw), args or {}, obj, expect or {}, **options)


def loss_module_methods() -> dict:
    """forward, extra_repr, load_state_dict and reset_parameters of each Balanced MSE module."""
    modules = {BMCLoss: lambda: BMCLoss(0.8), BNILoss: lambda: BNILoss(0.8, CENTERS, COUNTS),
               GAILoss: lambda: GAILoss(0.8, GMM2)}
    bad_values = {
        BMCLoss: (),
        BNILoss: (Bad("negative bucket weight", lambda v: dict(v, bucket_weights=_set_first(v["bucket_weights"], -1.0)),
                      RuntimeError),
                  Bad("fewer bins", lambda v: dict(v, bucket_centers=v["bucket_centers"][:-1],
                                                   bucket_weights=v["bucket_weights"][:-1]), RuntimeError)),
        GAILoss: (Bad("negative variances", lambda v: dict(v, gmm_variances=-v["gmm_variances"]), RuntimeError),
                  Bad("other K", lambda v: GAILoss(1.0, dict(means=torch.zeros(3, 1), variances=torch.ones(3, 1, 1),
                                                             weights=torch.ones(3))).state_dict(), RuntimeError)),
    }
    # A good state differs from the module's in every entry: a load that fails half way shows.
    other_state = {BMCLoss: BMCLoss(1.3).state_dict(), BNILoss: BNILoss(1.3, CENTERS + 1, COUNTS * 2).state_dict(),
                   GAILoss: GAILoss(1.3, dict(GMM2, means=GMM2["means"] * 2, variances=GMM2["variances"] * 3,
                                              weights=torch.tensor([0.2, 0.8]))).state_dict()}
    noise = (EXTRA_KEY, Bad("noise_sigma 0", lambda v: dict(v, noise_sigma=torch.tensor(0.0)), RuntimeError),
             Bad("noise_sigma 1e20", lambda v: dict(v, noise_sigma=torch.tensor(1e20)), RuntimeError))
    pair = {"pred": (FLOAT_TENSOR[:-3] + (Bad("[N] against [N, 1]", lambda v: v[:, 0], ValueError),), PRED),
            "target": (FLOAT_TENSOR[:-3], TARGET)}
    entries = {}
    for cls, make in modules.items():
        path = f"dirfast.losses.{cls.__name__}"
        entries[f"{path}.forward"] = method("forward", make, pair)
        entries[f"{path}.extra_repr"] = method("extra_repr", make)
        entries[f"{path}.reset_parameters"] = method("reset_parameters", make)
        entries[f"{path}.load_state_dict"] = method("load_state_dict", make, {
            "state_dict": (STATE + noise + bad_values[cls], other_state[cls])})
    return entries


def pairwise_module_methods() -> dict:
    """forward, extra_repr and load_state_dict of the pairwise regularisers' modules (no state)."""
    views, labels = torch.randn(4, 2, 3, generator=gen(17)), torch.tensor([[1.0], [2.0], [2.0], [5.0]])
    rows = views.reshape(8, 3)
    modules = {"RnCLoss": (lambda: dirfast.losses.RnCLoss(), {"features": (FLOAT_TENSOR + PAIRWISE_FEATURES, views),
                                                              "labels": (PAIRWISE_LABELS, labels)}),
               "ConRLoss": (lambda: dirfast.losses.ConRLoss(), {"features": (FLOAT_TENSOR + PAIRWISE_FEATURES, rows),
                                                                "targets": (PAIRWISE_LABELS, CONR_LABELS),
                                                                "preds": (PAIRWISE_LABELS, CONR_LABELS * 0.3)}),
               "RankSimLoss": (lambda: dirfast.losses.RankSimLoss(), {"features": (FLOAT_TENSOR + PAIRWISE_FEATURES, rows),
                                                                      "targets": (PAIRWISE_LABELS, CONR_LABELS)})}
    entries = {}
    for name, (make, args) in modules.items():
        path = f"dirfast.losses.{name}"
        entries[f"{path}.forward"] = method("forward", make, args, expect=CONR_EXPECT if name == "ConRLoss" else PAIRWISE_EXPECT)
        entries[f"{path}.extra_repr"] = method("extra_repr", make)
        entries[f"{path}.load_state_dict"] = method("load_state_dict", make, {"state_dict": (
            (STATE[0], Bad("empty", lambda v: {}, SAME), Bad("a key", lambda v: {"w": torch.ones(1)}, RuntimeError)), {})})
    return entries


CONSTANT = Entry(lambda: None)  # data, not a callable: nothing to check
CONR_LABELS = torch.tensor([[0.0], [0.5], [3.0], [3.2], [6.0], [0.2], [3.1], [6.5]])  # anchor 0 has pairs of both kinds
NO_PAIRS = Outcome("a NaN label or prediction: its row in no (negative) pair, anchor 0 at 0, all finite",
                   lambda got, good: (assert_same(got[:1], torch.zeros(1)), _finite(got, good)))

# The pairwise regularisers: features of a batch (NaN gives NaN, low precision is computed in
# float32) and its labels (integer labels are numbers too).
PAIRWISE_FEATURES = (Bad("no samples", lambda v: v[:0], ValueError),)
PAIRWISE_LABELS = NOT_A_TENSOR + (
    Bad("int64", lambda v: v.long(), FINITE), Bad("complex", lambda v: v.to(torch.complex64), TypeError),
    Bad("bool", lambda v: v != 0, TypeError), FLOAT8, Bad("NaN", lambda v: _set_first(v, NAN), FINITE),
    Bad("non-contiguous", _strided, SAME), Bad("fewer", lambda v: v[:-1], ValueError),
    Bad("0-d", lambda v: v.reshape(-1)[0], ValueError), Bad("3-D", lambda v: v[None], ValueError),
    Bad("meta", lambda v: v.to("meta"), ValueError))
PAIRWISE_EXPECT = {("features", "extra dim"): ValueError, ("labels", "NaN"): NAN_OUT, ("targets", "NaN"): NAN_OUT}
# ConR: a NaN label or prediction puts its row in no pair (the others' losses stay finite)
CONR_EXPECT = {**PAIRWISE_EXPECT, ("targets", "NaN"): FINITE, ("preds", "NaN"): FINITE}
CONR_WEIGHTS = (Bad("str", lambda v: "w", TypeError), Bad("None", lambda v: None, TypeError),
                Bad("bool", lambda v: True, TypeError), Bad("NaN", lambda v: NAN, ValueError),
                Bad("int tensor", lambda v: torch.ones(8, dtype=torch.long), TypeError),
                Bad("float8 tensor", lambda v: torch.ones(8).to(torch.float8_e4m3fn), TypeError),
                Bad("[N, 2]", lambda v: torch.ones(8, 2), ValueError), Bad("fewer", lambda v: torch.ones(7), ValueError),
                Bad("tensor [N]", lambda v: torch.rand(8, generator=gen(18)) + 0.5, FINITE))
GENERATOR = (Bad("int", lambda v: 3, TypeError), Bad("str", lambda v: "seed", TypeError))
# The group of a module or a loss; a rank outside a group (new_group's NON_GROUP_MEMBER) stays local.
PROCESS_GROUP = (Bad("str", lambda v: "world", TypeError), Bad("int", lambda v: 0, TypeError),
                 Bad("this rank outside it", lambda v: torch.distributed.GroupMember.NON_GROUP_MEMBER, SAME))
# The group of a collective, which runs on the group's ranks only.
MEMBER_GROUP = PROCESS_GROUP[:2] + (
    Bad("this rank outside it", lambda v: torch.distributed.GroupMember.NON_GROUP_MEMBER, ValueError),)
A_CALLABLE = (Bad("int", lambda v: 1, TypeError), Bad("None", lambda v: None, TypeError))
# A tensor of a collective: dtypes a torch.distributed backend refuses (gloo: int16, uint16, float8).
COLLECTED = NOT_A_TENSOR + (Bad("meta", lambda v: v.to("meta"), ValueError), Bad("non-contiguous", _strided, SAME),
                            Bad("int16", lambda v: v.to(torch.int16), TypeError),
                            Bad("uint16", lambda v: v.to(torch.uint16), TypeError), FLOAT8)
SUMMED = COLLECTED + LEAVES + (Bad("expanded", lambda v: v[:1].expand_as(v), RuntimeError),)  # summed in place
ROWS = COLLECTED + (Bad("0-d", lambda v: v.reshape(-1)[0], ValueError),)
BUCKET_COUNTS = NOT_A_TENSOR + (Bad("complex", lambda v: v.to(torch.complex64), TypeError),
                                Bad("bool", lambda v: v != 0, TypeError), Bad("fewer", lambda v: v[:-1], ValueError),
                                Bad("2-D", lambda v: v[:, None], ValueError),
                                Bad("meta", lambda v: v.to("meta"), ValueError),
                                Bad("float64", lambda v: v.double(), SAME))


def in_one_process_group(function: Callable) -> Callable:
    """``function`` called in a torch.distributed group of this process alone (gloo), which the
    collectives need; the group is taken down after the call."""
    def call(**kwargs):
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        try:
            return function(**kwargs)
        finally:
            torch.distributed.destroy_process_group()
    return call


API = {
    # ----------------------------------------------------------------------- binning, windows
    "dirfast.Binning": Entry(dirfast.Binning, {"edges": (NOT_REAL + NON_FINITE + LAYOUTS + (
        Bad("decreasing", lambda v: v.flip(0), ValueError), Bad("repeated", lambda v: torch.zeros(3), ValueError),
        Bad("one edge", lambda v: v[:1], ValueError), Bad("0-d", lambda v: v[0], ValueError),
        Bad("2-D", lambda v: v[None], ValueError), Bad("meta", lambda v: v.to("meta"), ValueError)),
        torch.tensor([0.0, 1.0, 2.5]))}),
    "dirfast.Binning.integer": Entry(dirfast.Binning.integer, {"num_bins": (BIN_COUNT, 121), "scale": (POSITIVE + (
        Bad("beyond float32", lambda v: 1e39, ValueError), TINY_SCALE), 10.0)}),
    "dirfast.Binning.uniform": Entry(dirfast.Binning.uniform, {
        "low": (REAL + (Bad("above high", lambda v: 6.0, ValueError), Bad("equal to high", lambda v: 5.0, ValueError),
                        Bad("too close to high for float64", lambda v: 5.0 - 1e-15, ValueError)), 0.0),
        "high": (REAL + (Bad("below low", lambda v: -1.0, ValueError),), 5.0),
        "num_bins": (BIN_COUNT, 50)}),
    "dirfast.Binning.auto": Entry(dirfast.Binning.auto, {
        "labels": (FIT_LABELS + (Bad("spanning +-1e308", lambda v: torch.tensor([-1e308, 0.0, 1e308], dtype=torch.float64),
                                     ValueError),
                                 Bad("all float64's largest", lambda v: torch.full((3,), 1.7976931348623157e308,
                                                                                    dtype=torch.float64), ValueError)),
                   AGES),
        "rule": (CHOICE, "fd"), "max_bins": (BIN_COUNT, 1000)}),
    "dirfast.Binning.__call__": method("__call__", lambda: INT121, {
        "labels": (NOT_REAL + NON_FINITE + LOW_PRECISION + LAYOUTS + (
            Bad("empty", lambda v: v[:0], EMPTY), Bad("meta", lambda v: v.to("meta"), ValueError)), BATCH),
        "precision": (CHOICE, "labels"), "check": (BOOL, True)}),
    "dirfast.Binning.warn_if_fractional": method("warn_if_fractional", lambda: INT121, {
        "labels": (NOT_REAL + LAYOUTS + (Bad("meta", lambda v: v.to("meta"), ValueError),), BATCH)}),
    "dirfast.GridBinning": Entry(lambda binnings: dirfast.GridBinning(*binnings), {"binnings": ((
        Bad("an edges list", lambda v: [v[0], [0, 1, 2]], TypeError), Bad("none", lambda v: [], ValueError),
        Bad("too many bins", lambda v: [dirfast.Binning.integer(4096)] * 3, ValueError)), [U10, INT100])}),
    "dirfast.GridBinning.__call__": method("__call__", lambda: GRID, {
        "labels": (NOT_REAL + NON_FINITE + LAYOUTS + (
            Bad("[N]", lambda v: v[:, 0], ValueError), Bad("[N, 3]", lambda v: torch.cat([v, v[:, :1]], 1), ValueError),
            Bad("0-d", lambda v: v[0, 0], ValueError), Bad("meta", lambda v: v.to("meta"), ValueError)), GRID_Y),
        "precision": (CHOICE, "float32"), "check": (BOOL, True)}),
    "dirfast.GridBinning.unravel": method("unravel", lambda: GRID, {"index": (NOT_A_TENSOR + (
        Bad("float", lambda v: v.float(), TypeError), Bad("bool", lambda v: v > 0, TypeError),
        Bad("non-contiguous", _strided, SAME)), torch.tensor([0, 5, 39]))}),
    "dirfast.GridBinning.along_each_axis": method("along_each_axis", lambda: GRID, {
        "table": (NOT_A_TENSOR + (Bad("fewer rows", lambda v: v[:-1], ValueError), Bad("0-d", lambda v: v[0], ValueError)),
                  torch.arange(40.0)),
        "smooth": ((Bad("not callable", lambda v: 3, TypeError),
                    Bad("returns None", lambda v: lambda rows: None, TypeError),
                    Bad("returns another shape", lambda v: lambda rows: rows[:-1], ValueError)),
                   lambda rows: rows * 2)}),
    "dirfast.get_lds_kernel_window": Entry(dirfast.get_lds_kernel_window, {
        "kernel": (CHOICE, "gaussian"), "ks": (COUNT + (Bad("even", lambda v: 4, ValueError),
                                                        Bad("2^40", lambda v: 2 ** 40 + 1, ValueError)), 5),
        "sigma": (POSITIVE + (Bad("5e6", lambda v: 5e6, ValueError),), 2.0)}),
    "dirfast.kernel_window": Entry(dirfast.kernel_window, {
        "kernel": (CHOICE, "laplace"), "ks": (COUNT + (Bad("even", lambda v: 4, ValueError),), 5),
        "sigma": (POSITIVE, 2.0), "normalize": (CHOICE, "sum")}),
    # ----------------------------------------------------------------------- LDS
    "dirfast.LDS": Entry(dirfast.LDS, {
        "binning": (BINNING + (Bad("None", lambda v: None, TypeError),), INT121), "reweight": (CHOICE, "sqrt_inv"),
        "lds": (BOOL, True), "kernel": (CHOICE, "gaussian"), "ks": (COUNT + (Bad("even", lambda v: 4, ValueError),), 5),
        "sigma": (POSITIVE, 2.0), "inverse_clip": (PAIR + (
            Bad("dict", lambda v: {v[0]: "a", v[1]: "b"}, TypeError), Bad("set", lambda v: set(v), TypeError),
            Bad("beyond float32", lambda v: (1e308, 1e308), ValueError)), (5, 1000)),
        "padding": (CHOICE, "constant"),
        "bucket_start": (NON_NEGATIVE_INT + (Bad("past the bins", lambda v: 121, ValueError),), 3),
        "sync": (BOOL, True),
        "process_group": (PROCESS_GROUP, None)}),
    "dirfast.LDS.fit": method("fit", lambda: dirfast.LDS(INT121), {"labels": (FIT_LABELS, AGES)}),
    "dirfast.LDS.update": method("update", fitted_lds, {"labels": (FIT_LABELS, AGES)}),
    "dirfast.LDS.weights": method("weights", fitted_lds, {"labels": (BATCH_LABELS, BATCH)}),
    "dirfast.LDS.diagnostics": method("diagnostics", fitted_lds),
    "dirfast.LDS.state_dict": method("state_dict", fitted_lds),
    "dirfast.LDS.load_state_dict": method("load_state_dict", fitted_lds, {
        "state": (STATE + (Bad("all counts 0", lambda v: dict(v, counts=torch.zeros(121, dtype=torch.float64)),
                               ValueError),
                           Bad("negative counts", lambda v: dict(v, counts=-v["counts"]), ValueError),
                           Bad("counts beyond float32", lambda v: dict(v, counts=v["counts"] * 1e307), ValueError),
                           Bad("fitted not a bool", lambda v: dict(v, fitted="yes"), ValueError),
                           Bad("other padding", lambda v: dict(v, padding="symmetric"), ValueError),
                           Bad("other edges", lambda v: dict(v, edges=torch.arange(5.0)), ValueError)),
                  dirfast.LDS(INT121).fit(AGES[:100]).state_dict())}, optional=("edges",)),
    "dirfast.lds_weights": Entry(dirfast.lds_weights, {
        "labels": (FIT_LABELS, AGES), "binning": (BINNING + (Bad("None", lambda v: None, TypeError),), INT121),
        "reweight": (CHOICE, "inverse"), "lds": (BOOL, True), "kernel": (CHOICE, "laplace"),
        "ks": (COUNT + (Bad("even", lambda v: 4, ValueError),), 5), "sigma": (POSITIVE, 2.0),
        "inverse_clip": (PAIR, (5, 1000))}),
    # ----------------------------------------------------------------------- DenseWeight
    "dirfast.DenseWeight": Entry(dirfast.DenseWeight, {
        "alpha": (NON_NEGATIVE, 1.0), "eps": (POSITIVE + (Bad("above 1", lambda v: 2.0, ValueError), TINY_EPS), 1e-6),
        "bandwidth": (POSITIVE + (Bad("unknown rule", lambda v: "isj", ValueError), Bad("list", lambda v: [1.0], TypeError)),
                      0.5),
        "grid_size": (COUNT + (Bad("below 16", lambda v: 8, ValueError), Bad("above 2^16", lambda v: 1 << 20, ValueError)),
                      4096)}, expect={("bandwidth", "str"): ValueError}),
    "dirfast.DenseWeight.fit": method("fit", fitted_dense, {"labels": (FIT_LABELS + (
        Bad("all equal (rule bandwidth 0)", lambda v: torch.full((5,), 3.0), ValueError),
        Bad("spread overflowing the grid", lambda v: torch.tensor([0.0, 1e308], dtype=torch.float64), ValueError)),
        AGES)}),
    "dirfast.DenseWeight.weights": method("weights", fitted_dense, {"labels": (BATCH_LABELS, BATCH)}),
    "dirfast.DenseWeight.density": method("density", fitted_dense, {"labels": (BATCH_LABELS, BATCH)}, expect={
        ("labels", "NaN"): NAN_DENSITY, ("labels", "inf"): NAN_DENSITY}),
    "dirfast.DenseWeight.state_dict": method("state_dict", fitted_dense),
    "dirfast.DenseWeight.load_state_dict": method("load_state_dict", fitted_dense, {
        "state": (STATE + (Bad("density above 1", lambda v: dict(v, density=v["density"] + 1), ValueError),
                           Bad("negative step", lambda v: dict(v, step=-1.0), ValueError),
                           Bad("step a str", lambda v: dict(v, step="x"), ValueError),
                           Bad("low of two values", lambda v: dict(v, low=torch.zeros(2)), ValueError),
                           Bad("scale beyond float32", lambda v: dict(v, scale=1e300), ValueError),
                           Bad("infinite low", lambda v: dict(v, low=INF), ValueError),
                           Bad("grid beyond float64", lambda v: dict(v, step=1e307), ValueError),
                           Bad("other alpha", lambda v: dict(v, alpha=1.0), ValueError),
                           Bad("fitted not a bool", lambda v: dict(v, fitted=1), ValueError)),
                  dirfast.DenseWeight(alpha=0.5).fit(AGES[:100]).state_dict())}),
    "dirfast.density_weights": Entry(dirfast.density_weights, {
        "labels": (FIT_LABELS, AGES), "alpha": (NON_NEGATIVE, 0.5), "eps": (POSITIVE + (TINY_EPS,), 0.1),
        "bandwidth": (CHOICE[:1] + (Bad("zero", lambda v: 0.0, ValueError), Bad("None", lambda v: None, TypeError)),
                      "scott"),
        "grid_size": (COUNT + (Bad("below 16", lambda v: 8, ValueError),), 1024)}),
    # ----------------------------------------------------------------------- FDS
    "dirfast.FDS": Entry(dirfast.FDS, {
        "feature_dim": (COUNT + (Bad("2^62", lambda v: 2 ** 62, ValueError),
                                 Bad("2^31 by 18 buckets (over 2^31 elements)", lambda v: 2 ** 31, ValueError)), 4),
        "bucket_num": (BIN_COUNT, 20),
        "bucket_start": (NON_NEGATIVE_INT + (Bad("at bucket_num", lambda v: 20, ValueError),), 2),
        "start_update": (EPOCH, 0), "start_smooth": (EPOCH, 1), "kernel": (CHOICE, "gaussian"),
        "ks": (COUNT + (Bad("even", lambda v: 4, ValueError),), 5), "sigma": (POSITIVE, 2.0),
        "momentum": (PROBABILITY, 0.9),
        "binning": (BINNING + (Bad("other number of bins", lambda v: dirfast.Binning.integer(40), ValueError),),
                    dirfast.Binning.integer(20)),
        "fill_empty": (BOOL, False), "copy_snapshot": (BOOL, False),
        "clip_min": (NON_NEGATIVE + (Bad("above clip_max", lambda v: 20.0, ValueError),
                                     Bad("beyond float32", lambda v: 1e39, ValueError)), 0.1),
        "clip_max": (NON_NEGATIVE[:-3] + (Bad("NaN", lambda v: NAN, ValueError), Bad("below clip_min", lambda v: 0.01,
                                                                                      ValueError),
                                          Bad("beyond float32", lambda v: 1e39, ValueError),
                                          Bad("inf (no upper clamp)", lambda v: INF, FINITE)), 10.0),
        "sync": (BOOL, True),
        "process_group": (PROCESS_GROUP, None)}, expect={("momentum", "None"): FINITE}),
    "dirfast.FDS.update_running_stats": method("update_running_stats", trained_fds, {
        "features": (FEATURES + (Bad("overflowing float32 statistics", lambda v: v * 1e30, ValueError),
                                 Bad("float64, statistics beyond float32", lambda v: v.double() * 1e30, ValueError)), X8),
        "labels": (FDS_LABELS, Y8), "epoch": (EPOCH, 2)},
        expect={("features", "None"): ValueError, ("labels", "None"): ValueError}),
    "dirfast.FDS.accumulate": method("accumulate", trained_fds, {
        "features": (FEATURES, X8), "labels": (FDS_LABELS, Y8)}, expect={
        ("features", "NaN"): Outcome("the bucket's batch left out and counted",
                                     lambda got, good: None), ("labels", "NaN"): FINITE}),
    "dirfast.FDS.smooth": method("smooth", trained_fds, {
        "features": (FEATURES + LEAVES + (
            Bad("expanded (written in place)", lambda v: v[:1].expand_as(v), RuntimeError), OVERLAPPING_ROWS), X8),
        "labels": (FDS_LABELS, Y8), "epoch": (EPOCH, 2), "inplace": (BOOL, True)}, expect={
        ("features", "NaN"): NAN_OUT, ("labels", "NaN"): FINITE,
        ("inplace", "None"): SAME}),  # None: as published for the features' layout, in place for rows
    # Before start_smooth the features come back untouched, their type and shape checked all the same.
    "dirfast.FDS.smooth over an epoch before start_smooth": method("smooth", trained_fds, {
        "features": (FEATURES, X8), "labels": (FDS_LABELS, Y8), "epoch": (EPOCH, 0), "inplace": (BOOL, True)},
        expect={("features", "NaN"): NAN_OUT, ("labels", "NaN"): SAME, ("inplace", "None"): SAME}),
    "dirfast.FDS.update_last_epoch_stats": method("update_last_epoch_stats", trained_fds, {"epoch": (EPOCH, 2)}),
    "dirfast.FDS.reset": method("reset", trained_fds),
    "dirfast.FDS.reset_parameters": method("reset_parameters", trained_fds),
    "dirfast.FDS.clear_accumulated": method("clear_accumulated", trained_fds),
    "dirfast.FDS.diagnostics": method("diagnostics", trained_fds),
    "dirfast.FDS.extra_repr": method("extra_repr", trained_fds),
    "dirfast.FDS.load_state_dict": method("load_state_dict", trained_fds, {
        "state_dict": (STATE + (EXTRA_KEY,
            Bad("float64 beyond float32", lambda v: dict(v, running_mean=_set_first(v["running_mean"].double(), 1e39)),
                RuntimeError),
            Bad("negative running_var", lambda v: dict(v, running_var=_set_first(v["running_var"], -1.0)), RuntimeError),
            Bad("negative num_samples_tracked", lambda v: dict(v, num_samples_tracked=_set_first(
                v["num_samples_tracked"], -1.0)), RuntimeError),
            Bad("negative accumulated_count", lambda v: dict(v, accumulated_count=_set_first(
                v["accumulated_count"], -1.0)), RuntimeError),
            Bad("fractional num_samples_tracked", lambda v: dict(v, num_samples_tracked=_set_first(
                v["num_samples_tracked"], 0.5)), RuntimeError),
            Bad("fractional accumulated_count", lambda v: dict(v, accumulated_count=_set_first(
                v["accumulated_count"], 0.5)), RuntimeError),
            Bad("fractional epoch", lambda v: dict(v, epoch=v["epoch"] + 0.5), RuntimeError),
            Bad("epoch beyond 2^24", lambda v: dict(v, epoch=torch.full((1,), 2.0 ** 25)), RuntimeError)),
            trained_fds(seed=20).state_dict())},
        optional=("accumulated_count", "accumulated_mean", "accumulated_m2")),
    # ----------------------------------------------------------------------- backends
    "dirfast.backends": Entry(dirfast.backends),
    "dirfast.get_backend": Entry(dirfast.get_backend),
    "dirfast.set_backend": Entry(dirfast.set_backend, {"name": (CHOICE + tuple(
        Bad(f"{name} (unavailable)", lambda v, name=name: name, RuntimeError) for name in UNAVAILABLE) + (
        Bad("numpy array", lambda v: np.array([v]), ValueError),), "reference")},
        named_as={"name": "backend"}),
    "dirfast.get_cpu_threads": Entry(dirfast.get_cpu_threads),
    "dirfast.set_cpu_threads": Entry(dirfast.set_cpu_threads, {"policy": (CHOICE, "all")}),
    # ----------------------------------------------------------------------- options, beside their modules
    **{f"dirfast.{path}": CONSTANT for path in ("bandwidth.BANDWIDTH_RULES", "bandwidth.BIN_WIDTH_RULES",
                                                "binning.PRECISIONS", "lds.REWEIGHTS", "lds.LDS_SCALES",
                                                "pairwise.CONR_FORMS", "windows.KERNELS")},
    # ----------------------------------------------------------------------- width rules
    **{f"dirfast.bandwidth.{name}": Entry(getattr(dirfast.bandwidth, name), {"values": (FIT_LABELS, AGES)})
       for name in ("silverman", "scott", "freedman_diaconis")},
    "dirfast.bandwidth.rule_width": Entry(dirfast.bandwidth.rule_width, {
        "values": (FIT_LABELS, AGES), "rule": (CHOICE, "fd")}),
    # ----------------------------------------------------------------------- collectives (a group of one process)
    "dirfast.distributed.is_distributed": Entry(dirfast.distributed.is_distributed, {
        "process_group": (PROCESS_GROUP, None)}),
    "dirfast.distributed.checked_on_every_rank": Entry(in_one_process_group(
        dirfast.distributed.checked_on_every_rank), {
        "check": (A_CALLABLE, lambda: 1), "process_group": (MEMBER_GROUP, None)}),
    "dirfast.distributed.all_reduce_sum": Entry(in_one_process_group(dirfast.distributed.all_reduce_sum), {
        "tensor": (SUMMED, torch.arange(3.0)), "process_group": (MEMBER_GROUP, None)}),
    "dirfast.distributed.all_reduce_bin_stats": Entry(in_one_process_group(dirfast.distributed.all_reduce_bin_stats), {
        "count": (BUCKET_COUNTS, torch.tensor([2, 0, 3])), "mean": (BIN_TABLE, RUNNING[1]),
        "var": (BIN_TABLE, RUNNING[2]),
        "process_group": (MEMBER_GROUP, None)}),
    "dirfast.distributed.all_gather_rows": Entry(in_one_process_group(dirfast.distributed.all_gather_rows), {
        "tensor": (ROWS, X8), "process_group": (MEMBER_GROUP, None)}),
    "dirfast.use_backend": Entry(lambda name: dirfast.use_backend(name).__enter__(), {"name": (CHOICE + (
        Bad("numpy array of two", lambda v: np.array([v, "x"]), ValueError),), "reference")},
                                 named_as={"name": "backend"}),
    # ----------------------------------------------------------------------- ops
    "dirfast.ops.bin_stats": Entry(ops.bin_stats, {
        "x": (FLOAT_TENSOR, X8), "bin_idx": (INDEX_TENSOR, IDX), "num_bins": (COUNT + (
            Bad("2^40", lambda v: 2 ** 40, ValueError),), 3)}, expect={
        ("num_bins", "numpy int"): TypeError, ("x", "0-d"): ValueError, ("x", "extra dim"): ValueError}),
    "dirfast.ops.accumulate_bin_stats_": Entry(accumulate_bin_stats_, {
        "count": (NOT_A_TENSOR + WRONG_DTYPE + (Bad("float32", lambda v: v.float(), TypeError),
                                                Bad("2-D", lambda v: v[:, None], ValueError)) + TABLE_IN_PLACE, RUNNING[0]),
        "mean": (RUNNING_TABLE + (Bad("other D", lambda v: v[:, :2], ValueError),), RUNNING[1]),
        "m2": (RUNNING_TABLE + (Bad("float64 (mean is float32)", lambda v: v.double(), TypeError),), RUNNING[2]),
        "x": (FLOAT_TENSOR, X8), "bin_idx": (INDEX_TENSOR, IDX)},
        expect={("x", "NaN"): FINITE}),
    "dirfast.ops.integer_bins": Entry(ops.integer_bins, {
        "labels": (NOT_A_TENSOR + WRONG_DTYPE + (
            Bad("NaN", lambda v: _set_first(v, NAN), OTHERS_SAME), Bad("inf", lambda v: _set_first(v, INF), OTHERS_SAME),
            Bad("non-contiguous", _strided, SAME), Bad("float16", lambda v: v.half(), SAME),
            Bad("bfloat16", lambda v: v.bfloat16(), SAME), Bad("meta", lambda v: v.to("meta"), META)), EXACT_LABELS),
        "num_bins": (COUNT + (Bad("2^24 + 1", lambda v: 2 ** 24 + 1, ValueError),), 12),
        "scale": (POSITIVE + (Bad("beyond float32", lambda v: 1e39, ValueError), TINY_SCALE), 0.5),
        "first": (NON_NEGATIVE_INT + (Bad("num_bins", lambda v: 12, ValueError),), 2)}),
    "dirfast.ops.smooth_bins": Entry(ops.smooth_bins, {
        "stats": (FLOAT_TENSOR, STAT[1]),
        "window": (WINDOW + (Bad("meta", lambda v: v.to("meta"), ValueError),), torch.ones(3) / 3),
        "padding": (CHOICE + (Bad("numpy array", lambda v: np.array([v, "x"]), ValueError),), "reflect")},
        expect={("stats", "meta"): META}),
    "dirfast.ops.calibrate": Entry(ops.calibrate, {
        "x": (FLOAT_TENSOR, X8), "bin_idx": (INDEX_TENSOR, IDX), "src_mean": (BIN_TABLE, STAT[0]),
        "src_var": (BIN_TABLE, STAT[1]), "dst_mean": (BIN_TABLE, STAT[2]), "dst_var": (BIN_TABLE, STAT[3]),
        "clip_min": (NON_NEGATIVE[:4] + NON_NEGATIVE[5:7] + (Bad("above clip_max", lambda v: 20.0, ValueError),), 0.1),
        "clip_max": (NON_NEGATIVE[:4] + (Bad("NaN", lambda v: NAN, ValueError),
                                         Bad("beyond float32", lambda v: 1e39, ValueError)), 10.0)},
        named_as={name: "src_mean|src_var" for name in ("src_mean", "src_var")}),
    "dirfast.ops.calibrate_": Entry(ops.calibrate_, {
        "x": (FLOAT_TENSOR[:-1] + (Bad("expanded", lambda v: v[:1].expand_as(v), RuntimeError), OVERLAPPING_ROWS)
              + LEAVES, X8),
        "bin_idx": (INDEX_TENSOR, IDX), "src_mean": (BIN_TABLE, STAT[0]), "src_var": (BIN_TABLE, STAT[1]),
        "dst_mean": (BIN_TABLE, STAT[2]), "dst_var": (BIN_TABLE, STAT[3])},
        named_as={name: "src_mean|src_var" for name in ("src_mean", "src_var")}),
    "dirfast.ops.mixture_logpdf": Entry(ops.mixture_logpdf, {
        "x": (FLOAT_TENSOR[:-3] + (Bad("0-d", lambda v: v.reshape(-1)[0], FINITE), Bad("extra dim", lambda v: v[None], FINITE),
                                   Bad("meta", lambda v: v.to("meta"), ValueError)), PRED),
        "means": (COMPONENTS, CENTERS), "variances": (COMPONENTS, COUNTS), "log_weights": (COMPONENTS, COUNTS.log())},
        expect={("x", "NaN"): OTHERS_SAME}, named_as={"means": "means|variances"}),
    "dirfast.ops.rnc_loss": Entry(ops.rnc_loss, {
        "features": (FLOAT_TENSOR + (Bad("fewer rows", lambda v: v[:-1], ValueError),), X8),
        "labels": (FLOAT_TENSOR + (Bad("[m]", lambda v: v[:, 0], ValueError),
                                   Bad("[m, 0]", lambda v: v[:, :0], ValueError),
                                   Bad("two labels", lambda v: torch.cat([v, v], 1), FINITE)), Y8[:, None]),
        "temperature": (POSITIVE + (Bad("1/t overflows float32", lambda v: 1e-39, ValueError),
                                    Bad("subnormal in float32", lambda v: 5e-39, ValueError)), 2.0),
        "offset": (NON_NEGATIVE_INT + (Bad("beyond m", lambda v: 9, ValueError), Bad("m", lambda v: 8, ValueError)), 2),
        "count": (NON_NEGATIVE_INT + (Bad("past the rows", lambda v: 7, ValueError), Bad("0", lambda v: 0, EMPTY)), 6)},
        expect={("count", "None"): SAME}),
    "dirfast.ops.conr_loss": Entry(ops.conr_loss, {
        "features": (FLOAT_TENSOR, X8), "labels": (FLOAT_TENSOR, CONR_LABELS), "preds": (FLOAT_TENSOR, CONR_LABELS * 0.3),
        "weights": (FLOAT_TENSOR, torch.rand(8, generator=gen(16)) + 0.5), "w": (NON_NEGATIVE, 1.0),
        "tau": (POSITIVE + (Bad("1/tau overflows float32", lambda v: 1e-40, ValueError),
                            Bad("subnormal in float32", lambda v: 5e-39, ValueError)), 0.07),
        "e": (REAL + (Bad("beyond float32", lambda v: 1e300, ValueError),), 0.01), "push": (CHOICE, "exp"),
        "exp0_terms": (BOOL, True), "anchor_in_divisor": (BOOL, False),
        "offset": (NON_NEGATIVE_INT + (Bad("past the rows", lambda v: 9, ValueError),), 0),
        "count": (NON_NEGATIVE_INT + (Bad("past the rows", lambda v: 9, ValueError),), 8)},
        expect={("labels", "NaN"): NO_PAIRS, ("preds", "NaN"): NO_PAIRS, ("count", "None"): SAME}),
    "dirfast.ops.ranksim_loss": Entry(ops.ranksim_loss, {
        "features": (FLOAT_TENSOR + (Bad("fewer rows", lambda v: v[:-1], ValueError),), X8),
        "labels": (FLOAT_TENSOR + (Bad("[m]", lambda v: v[:, 0], ValueError), Bad("fewer rows", lambda v: v[:-1], ValueError)),
                   Y8[:, None]),
        "keep": (NOT_A_TENSOR + (
            Bad("float", lambda v: v.float(), TypeError), Bad("int64", lambda v: v.long(), TypeError),
            Bad("fewer", lambda v: v[:-1], ValueError), Bad("[m, 1]", lambda v: v[:, None], ValueError),
            Bad("meta", lambda v: v.to("meta"), ValueError), Bad("non-contiguous", _strided, SAME)), KEEP8),
        "lambda_val": (POSITIVE + (Bad("beyond float32", lambda v: 1e300, ValueError),), 2.0),
        "offset": (NON_NEGATIVE_INT + (Bad("beyond m", lambda v: 9, ValueError),), 1),
        "count": (NON_NEGATIVE_INT + (Bad("beyond m - offset", lambda v: 8, ValueError),), 6)},
        expect={("keep", "None"): FINITE, ("count", "None"): FINITE}),
    # ----------------------------------------------------------------------- losses
    **{f"dirfast.losses.{name}": Entry(getattr(dirfast.losses, name), dict(
        {"inputs": (FLOAT_TENSOR[:-3] + (Bad("empty", lambda v: v[:0], ValueError),
                                         Bad("[N] against [N, 1]", lambda v: v[:, 0], ValueError),
                                         Bad("meta", lambda v: v.to("meta"), ValueError)), PRED),
         "targets": (FLOAT_TENSOR[:-3] + (Bad("[N] against [N, 1]", lambda v: v[:, 0], ValueError),), TARGET),
         "weights": (WEIGHTS + WRONG_DTYPE + (Bad("meta", lambda v: v.to("meta"), ValueError),),
                     torch.rand(8, 1, generator=gen(9)))},
        **({"beta": (NON_NEGATIVE + (Bad("1e-320 (0 in float32: L1)", lambda v: 1e-320, FINITE),), 1.0)}
           if name == "weighted_huber_loss" else {}),
        **({"activate": (CHOICE, "tanh"), "beta": (POSITIVE, 0.2), "gamma": (NON_NEGATIVE, 1.0)}
           if "focal" in name else {})),
        expect={("targets", "NaN"): NAN_OUT})
       for name in dirfast.losses.__all__ if name.startswith("weighted_")},
    "dirfast.losses.bmc_loss": Entry(dirfast.losses.bmc_loss, {
        "pred": (FLOAT_TENSOR + (Bad("[N] against [N, 1]", lambda v: v[:, 0], ValueError),
                                 Bad("empty", lambda v: v[:0], ValueError)), PRED),
        "target": (FLOAT_TENSOR, TARGET), "noise_var": (NOISE_VAR, 0.7), "all_ranks": (BOOL, False),
        "process_group": (PROCESS_GROUP, None)},
        expect={("pred", "0-d"): ValueError}),
    "dirfast.losses.bni_loss": Entry(dirfast.losses.bni_loss, {
        "pred": (FLOAT_TENSOR[:-3] + (Bad("[N] against [N, 1]", lambda v: v[:, 0], ValueError),
                                      Bad("meta", lambda v: v.to("meta"), ValueError)), PRED),
        "target": (FLOAT_TENSOR[:-3], TARGET), "noise_var": (NOISE_VAR, 0.7),
        "bucket_centers": (HISTOGRAM + (Bad("float64 1e39 (beyond float32)", lambda v: _set_first(v.double(), 1e39),
                                            ValueError), CONSTANT_REQUIRING_GRAD), CENTERS),
        "bucket_weights": (HISTOGRAM_WEIGHTS + (Bad("float64 1e39 (its log fits)", lambda v: _set_first(v.double(), 1e39),
                                                    FINITE), CONSTANT_REQUIRING_GRAD), COUNTS)}),
    "dirfast.losses.gai_loss": Entry(dirfast.losses.gai_loss, {
        "pred": (FLOAT_TENSOR[:-3] + (Bad("[N] against [N, 1]", lambda v: v[:, 0], ValueError),), PRED),
        "target": (FLOAT_TENSOR[:-3], TARGET), "noise_var": (NOISE_VAR, 0.7),
        "gmm": (GMM + (Bad("float64 variance 1e39 (beyond float32)",
                           lambda v: dict(v, variances=_set_first(v["variances"].double(), 1e39)),
                           ValueError),
                       Bad("means requiring grad", lambda v: dict(v, means=v["means"].clone().requires_grad_()),
                           NotImplementedError)), GMM2)}),
    "dirfast.losses.BMCLoss": Entry(BMCLoss, {
        "init_noise_sigma": (NOISE_SIGMA, 1.0), "learn_noise": (BOOL, True), "all_ranks": (BOOL, False),
        "process_group": (PROCESS_GROUP, None)}),
    "dirfast.losses.BNILoss": Entry(BNILoss, {
        "init_noise_sigma": (NOISE_SIGMA, 1.0), "bucket_centers": (HISTOGRAM, CENTERS),
        "bucket_weights": (HISTOGRAM_WEIGHTS, COUNTS), "learn_noise": (BOOL, True)}),
    "dirfast.losses.GAILoss": Entry(GAILoss, {
        "init_noise_sigma": (NOISE_SIGMA, 1.0), "gmm": (GMM, GMM2), "learn_noise": (BOOL, True)}),
    "dirfast.losses.BNILoss.from_lds": Entry(BNILoss.from_lds, {
        "lds": ((Bad("not an LDS", lambda v: [1, 2], TypeError), Bad("unfitted", lambda v: dirfast.LDS(INT121), RuntimeError),
                 Bad("over a GridBinning", lambda v: grid_lds(), ValueError)), fitted_lds()),
        "init_noise_sigma": (NOISE_SIGMA, 1.0), "smoothed": (BOOL, True), "learn_noise": (BOOL, True)}),
    "dirfast.losses.GAILoss.from_labels": Entry(GAILoss.from_labels, {
        "labels": (FIT_LABELS, AGES), "num_components": (COUNT + (Bad("above the labels", lambda v: 400, ValueError),), 2),
        "init_noise_sigma": (NOISE_SIGMA, 1.0), "learn_noise": (BOOL, True)}),
    **loss_module_methods(),
    # ----------------------------------------------------------------------- metrics
    "dirfast.metrics.shot_metrics": Entry(dirfast.metrics.shot_metrics, {
        "preds": (EVAL_VALUES + (Bad("fewer", lambda v: v[:-1], ValueError),), TEST + 0.5),
        "labels": (EVAL_VALUES + (Bad("longdouble", lambda v: np.asarray(v, dtype=np.longdouble), TypeError),), TEST),
        "train_labels": (EVAL_VALUES, TRAIN),
        "many_shot_thr": (REAL + (Bad("below low_shot_thr", lambda v: 10, ValueError),), 100),
        "low_shot_thr": (REAL, 20), "binning": (BINNING, INT100),
        "regions": ((Bad("a list", lambda v: [1, 2], TypeError), Bad("unknown name", lambda v: {"few": [1]}, ValueError),
                     Bad("bin past the bins", lambda v: {"many": [100]}, ValueError),
                     Bad("bin a float", lambda v: {"many": [1.5]}, TypeError),
                     Bad("a bin, not a list", lambda v: {"many": 5}, TypeError),
                     Bad("bin in two regions", lambda v: {"many": [1], "low": [1]}, ValueError),
                     Bad("a 0-d array of bins", lambda v: {"many": np.array(3)}, TypeError),
                     Bad("a 2-D array of bins", lambda v: {"many": np.array([[1, 2]])}, ValueError)), None),
        "exact_error": (NON_NEGATIVE, 0.0), "correlations": (BOOL, True)}),
    # With regions the training labels and thresholds are not needed, but checked when given.
    "dirfast.metrics.shot_metrics over regions": Entry(dirfast.metrics.shot_metrics, {
        "preds": (EVAL_VALUES[:1], TEST + 0.5), "labels": (EVAL_VALUES[:1], TEST), "train_labels": (NOT_REAL, TRAIN),
        "many_shot_thr": (REAL + (Bad("below low_shot_thr", lambda v: 10, ValueError),), 100),
        "low_shot_thr": (REAL, 20), "binning": (BINNING, INT100), "regions": ((
            Bad("1-D tensors of bins", lambda v: {key: torch.tensor(bins) for key, bins in v.items()}, SAME),
            Bad("a float tensor of bins", lambda v: dict(v, many=torch.tensor([1.0, 2.0])), TypeError)),
            {"many": [1, 2], "low": [3]})},
        expect={("train_labels", "None"): SAME}),
    "dirfast.metrics.shot_metrics over a grid": Entry(dirfast.metrics.shot_metrics, {
        "preds": (GRID_VALUES, GRID_Y + 0.1), "labels": (GRID_VALUES, GRID_Y),
        "train_labels": (GRID_VALUES + (Bad("[N, 3]", lambda v: torch.cat([v, v[:, :1]], 1), ValueError),), GRID_Y),
        "binning": (BINNING, GRID),
        "correlations": ((Bad("over two dimensions", lambda v: True, ValueError),), False)}),
    **{f"dirfast.metrics.{name}": Entry(getattr(dirfast.metrics, name), {
        "preds": (EVAL_VALUES + (Bad("fewer", lambda v: v[:-1], ValueError),), TEST + 0.5),
        "labels": (EVAL_VALUES + (Bad("empty", lambda v: torch.as_tensor(v)[:0], ValueError),), TEST),
        "binning": (BINNING + (Bad("None", lambda v: None, TypeError),), INT100)})
       for name in ("balanced_mae", "balanced_mse")},
    **{f"dirfast.metrics.{name} over a grid": Entry(getattr(dirfast.metrics, name), {
        "preds": (GRID_VALUES, GRID_Y + 0.1), "labels": (GRID_VALUES, GRID_Y), "binning": (BINNING, GRID)})
       for name in ("balanced_mae", "balanced_mse")},
    "dirfast.metrics.REGIONS": CONSTANT,
    # ----------------------------------------------------------------------- mixtures
    "dirfast.mixture.GaussianMixture": Entry(GaussianMixture, {
        "means": (NOT_REAL + NON_FINITE + (Bad("other K", lambda v: v[:-1], ValueError),
                                           Bad("meta", lambda v: v.to("meta"), ValueError)), GMM2["means"]),
        "variances": (NOT_REAL + NON_FINITE + (Bad("negative", lambda v: -v, ValueError),
                                               Bad("other K", lambda v: v[:-1], ValueError)), GMM2["variances"]),
        "weights": (NOT_REAL + NON_FINITE + (Bad("negative", lambda v: -v, ValueError), Bad("0-d", lambda v: v[0], ValueError),
                                             Bad("all 0", lambda v: v * 0, ValueError),
                                             Bad("sum beyond float64", lambda v: torch.full((2,), 1e308, dtype=torch.float64),
                                                 Outcome("normalised", lambda got, good: assert_same(got.weights, good.weights)))),
                      GMM2["weights"]),
        "covariance_type": (CHOICE[:3] + (Bad("not the shape's", lambda v: "diag", ValueError),), "full")},
        expect={("covariance_type", "None"): SAME}),
    "dirfast.mixture.GaussianMixture.from_dict": Entry(GaussianMixture.from_dict, {
        "gmm": (GMM + (Bad("[d, d] with K == d", lambda v: {"means": torch.zeros(2, 2), "variances": torch.eye(2),
                                                            "weights": torch.ones(2)}, ValueError),
                       Bad("asymmetric covariance", lambda v: {"means": torch.zeros(1, 2), "weights": torch.ones(1),
                                                               "variances": torch.tensor([[[1.0, 5.0], [0.0, 1.0]]])},
                           ValueError)), GMM2),
        "covariance_type": ((CHOICE[0], CHOICE[2]), None)}),
    "dirfast.mixture.GaussianMixture.log_prob": method("log_prob", lambda: GaussianMixture(
        torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2), covariance_type="diag"), {"x": (NOT_REAL + LAYOUTS + (
            Bad("[N, 3]", lambda v: torch.cat([v, v[:, :1]], 1), ValueError), Bad("[N]", lambda v: v[:, 0], ValueError),
            Bad("meta", lambda v: v.to("meta"), ValueError)), torch.randn(4, 2, generator=gen(15)))}),
    "dirfast.mixture.GaussianMixture.state_dict": method("state_dict", lambda: GaussianMixture(**GMM2)),
    "dirfast.mixture.fit_gmm": Entry(dirfast.mixture.fit_gmm, {
        "labels": (FIT_LABELS + (Bad("spanning +-1e308", lambda v: torch.tensor([-1e308, 1e308], dtype=torch.float64),
                                     ValueError),
                                 Bad("squares overflow", lambda v: torch.tensor([1e200, 2e200, 3e200], dtype=torch.float64),
                                     ValueError)), AGES),
        "num_components": (COUNT + (Bad("above the labels", lambda v: 400, ValueError),), 2),
        "max_iter": (COUNT, 20), "tol": (NON_NEGATIVE, 1e-3), "reg_covar": (NON_NEGATIVE, 1e-6),
        "num_bins": (BIN_COUNT, 512)}),
    "dirfast.mixture.COVARIANCE_TYPES": CONSTANT,
    # ----------------------------------------------------------------------- pairwise regularisers
    "dirfast.losses.rnc_loss": Entry(dirfast.losses.rnc_loss, {
        "features": (FLOAT_TENSOR + PAIRWISE_FEATURES + (Bad("[N, D]", lambda v: v[:, 0], ValueError),
                                                         Bad("no views", lambda v: v[:, :0], ValueError)),
                     torch.randn(4, 2, 3, generator=gen(17))),
        "labels": (PAIRWISE_LABELS, torch.tensor([[1.0], [2.0], [2.0], [5.0]])),
        "temperature": (POSITIVE + (Bad("1e-39 (1/temperature beyond float32)", lambda v: 1e-39, ValueError),
                                    Bad("5e-39 (subnormal in float32)", lambda v: 5e-39, ValueError)), 2.0),
        "all_ranks": (BOOL, False),
        "process_group": (PROCESS_GROUP, None)}, expect=PAIRWISE_EXPECT),
    "dirfast.losses.conr_loss": Entry(dirfast.losses.conr_loss, {
        "features": (FLOAT_TENSOR + PAIRWISE_FEATURES, X8), "targets": (PAIRWISE_LABELS, CONR_LABELS),
        "preds": (PAIRWISE_LABELS + (Bad("[N, 2]", lambda v: torch.cat([v, v], 1), ValueError),), CONR_LABELS * 0.3),
        "w": (NON_NEGATIVE, 1.0),
        "weights": (CONR_WEIGHTS + (Bad("negative", lambda v: -1.0, ValueError),
                                    Bad("1e300 (beyond float32)", lambda v: 1e300, ValueError)), 1.0),
        "t": (POSITIVE + (Bad("1e-40 (1/t beyond float32)", lambda v: 1e-40, ValueError),
                          Bad("5e-39 (subnormal in float32)", lambda v: 5e-39, ValueError)), 0.07),
        "e": (REAL + (Bad("1e300 (beyond float32)", lambda v: 1e300, ValueError),), 0.01),
        "form": (CHOICE, "published"), "all_ranks": (BOOL, False),
        "process_group": (PROCESS_GROUP, None)},
        expect=CONR_EXPECT),
    "dirfast.losses.ranksim_loss": Entry(dirfast.losses.ranksim_loss, {
        "features": (FLOAT_TENSOR + PAIRWISE_FEATURES, X8), "targets": (PAIRWISE_LABELS, CONR_LABELS),
        "lambda_val": (POSITIVE + (Bad("1e300 (beyond float32)", lambda v: 1e300, ValueError),), 2.0),
        "generator": (GENERATOR, None), "all_ranks": (BOOL, False),
        "process_group": (PROCESS_GROUP, None)},
        expect=PAIRWISE_EXPECT),
    "dirfast.losses.RnCLoss": Entry(dirfast.losses.RnCLoss, {
        "temperature": (POSITIVE + (Bad("1e-320 (1/temperature beyond float64)", lambda v: 1e-320, ValueError),), 2.0), "label_diff": (CHOICE, "l1"), "feature_sim": (CHOICE, "l2"),
        "all_ranks": (BOOL, False),
        "process_group": (PROCESS_GROUP, None)}),
    "dirfast.losses.ConRLoss": Entry(dirfast.losses.ConRLoss, {
        "w": (NON_NEGATIVE, 1.0), "t": (POSITIVE + (Bad("1e-320 (1/t beyond float64)", lambda v: 1e-320, ValueError),), 0.07),
        "e": (REAL, 0.01), "form": (CHOICE, "paper"),
        "all_ranks": (BOOL, False),
        "process_group": (PROCESS_GROUP, None)}),
    "dirfast.losses.RankSimLoss": Entry(dirfast.losses.RankSimLoss, {"lambda_val": (POSITIVE, 2.0),
                                                                     "all_ranks": (BOOL, False),
                                                                     "process_group": (PROCESS_GROUP, None)}),
    **pairwise_module_methods(),
    # ----------------------------------------------------------------------- presets
    "dirfast.presets.Preset": Entry(lambda **kw: dataclasses.replace(AGEDB_DIR, **kw).lds(), {
        "lds_binning": (BINNING, INT121), "reweight": (CHOICE, "sqrt_inv"), "lds_ks": (COUNT, 5),
        "lds_padding": (CHOICE, "constant"), "lds_bucket_start": (NON_NEGATIVE_INT, 0),
        "lds_scale": (CHOICE, "samples"), "name": ((Bad("int", lambda v: 3, TypeError),), "AgeDB-DIR"),
        "bin_shots": (BOOL, False), "correlations": (BOOL, False), "fill_empty": (BOOL, False),
        "conr_setting": ((Bad("a dict", lambda v: dataclasses.asdict(v), TypeError),
                          Bad("a tuple", lambda v: dataclasses.astuple(v), TypeError)), AGEDB_DIR.conr_setting)},
        named_as={"lds_binning": "binning", "lds_ks": "ks", "lds_padding": "padding", "lds_bucket_start": "bucket_start"}),
    "dirfast.presets.Preset.lds": method("lds", lambda: AGEDB_DIR, {"overrides": ((
        Bad("unknown setting", lambda v: {"bogus": 1}, TypeError), Bad("bad ks", lambda v: {"ks": 4}, ValueError)), {})}),
    "dirfast.presets.Preset.lds_weights": method("lds_weights", lambda: AGEDB_DIR, {"labels": (FIT_LABELS, AGES)}),
    "dirfast.presets.Preset.fds": method("fds", lambda: STS_B_DIR, {"feature_dim": (COUNT, 4)}),
    "dirfast.presets.Preset.shot_metrics": method("shot_metrics", lambda: STS_B_DIR, {
        "preds": (EVAL_VALUES, TEST / 10), "labels": (EVAL_VALUES, TEST / 10), "train_labels": (EVAL_VALUES, TRAIN / 10)}),
    # Regions fixed by the preset: the training labels are not needed, but checked when given (as
    # shot_metrics).
    "dirfast.presets.Preset.shot_metrics over regions": method("shot_metrics", lambda: NYUD2_DIR, {
        "preds": (EVAL_VALUES[:1], TEST / 10), "labels": (EVAL_VALUES[:1], TEST / 10),
        "train_labels": (EVAL_VALUES, TRAIN / 10)}, expect={("train_labels", "None"): SAME}),
    "dirfast.presets.Preset.conr": method("conr", lambda: AGEDB_DIR, {"overrides": ((
        Bad("unknown setting", lambda v: {"bogus": 1}, TypeError), Bad("t 0", lambda v: {"t": 0.0}, ValueError)), {})},
        named_as={"overrides": "bogus|t"}),
    "dirfast.presets.ConRSetting": Entry(dirfast.presets.ConRSetting, {
        "w": (NON_NEGATIVE, 1.0), "t": (POSITIVE, 0.07), "e": (REAL, 0.01), "form": (CHOICE, "published")}),
    "dirfast.presets.get": Entry(dirfast.presets.get, {"name": (CHOICE[:3], "AgeDB-DIR")}),
    **{f"dirfast.presets.{name}": CONSTANT for name in ("AGEDB_DIR", "IMDB_WIKI_DIR", "STS_B_DIR", "NYUD2_DIR", "PRESETS")},
    **{f"dirfast.ops.{name}": CONSTANT for name in ("BACKENDS", "CPU_THREADS", "PADDINGS")},
    "dirfast.ops.acc_dtype": Entry(lambda dtypes: dirfast.ops.acc_dtype(*dtypes), {"dtypes": ((
        Bad("a string", lambda v: ("float32",), TypeError), Bad("a tensor", lambda v: (torch.zeros(1),), TypeError),
        Bad("None", lambda v: (None,), TypeError), Bad("int64", lambda v: (torch.float32, torch.int64), TypeError),
        Bad("complex", lambda v: (torch.complex64,), TypeError),
        Bad("float8", lambda v: (torch.float8_e4m3fn,), TypeError)),
        (torch.float16, torch.float64))}),
    # ----------------------------------------------------------------------- plots
    "dirfast.plot.plot_label_distribution": Entry(dirfast.plot.plot_label_distribution, {
        "lds": ((Bad("not an LDS", lambda v: "lds", TypeError), Bad("unfitted", lambda v: dirfast.LDS(INT121), RuntimeError),
                 Bad("over a grid", lambda v: grid_lds(), ValueError)), fitted_lds()),
        "ax": (AXES + (Bad("a 3-D Axes", lambda v: plt.figure().add_subplot(projection="3d"), ValueError),), None)},
        named_as={"lds": "lds|LDS"}),
    "dirfast.plot.plot_grid_distribution": Entry(dirfast.plot.plot_grid_distribution, {
        "lds": ((Bad("not an LDS", lambda v: 3, TypeError), Bad("over a Binning", lambda v: fitted_lds(), ValueError)),
                grid_lds()), "axes": (AXES + (Bad("two Axes", lambda v: [1, 2], TypeError),
                                              Bad("polar Axes", lambda v: list(plt.subplots(1, 3, subplot_kw={
                                                  "projection": "polar"})[1]), ValueError)), None)},
        named_as={"lds": "lds|LDS"}),
    "dirfast.plot.plot_fds_diagnostics": Entry(dirfast.plot.plot_fds_diagnostics, {
        "fds": ((Bad("not an FDS", lambda v: fitted_lds(), TypeError),), trained_fds()),
        "axes": (AXES + (Bad("three Axes for four panels", lambda v: list(plt.subplots(1, 3)[1]), ValueError),), None)}),
    **{f"dirfast.plot.{name}": CONSTANT for name in ("FDS_PANELS", "GRID_PANELS")},
}

# The words a message names an argument with, where they are not the argument's own name.
NAMED_AS = {"overrides": "ks|bogus", "state_dict": "state_dict"}
# Calls that take **overrides or *binnings: the argument is spread.
SPREAD = {"overrides"}


# =========================================================================== discovery
def public_names() -> dict:
    """Every public callable and method: {first public path: object}, each object once."""
    # the modules dirfast names first (their paths are the ones listed), then the others
    first = [dirfast] + [getattr(dirfast, name) for name in dirfast.__all__ if inspect.ismodule(getattr(dirfast, name))]
    modules = first + [dirfast.plot] + [m for m in public_modules() if m not in first and m is not dirfast.plot]
    found, seen = {}, set()
    for module in modules:
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.ismodule(value) or id(value) in seen:
                continue
            seen.add(id(value))
            path = f"{module.__name__}.{name}"
            found[path] = value
            if inspect.isclass(value):
                for attr in dir(value):
                    owner = next((c for c in value.__mro__ if attr in vars(c)), None)
                    if owner is None or not owner.__module__.startswith("dirfast"):
                        continue
                    member = vars(owner)[attr]
                    public = not attr.startswith("_") or attr == "__call__"
                    if public and isinstance(member, (classmethod, staticmethod)) or inspect.isfunction(member) and public:
                        found[f"{path}.{attr}"] = member
                if issubclass(value, nn.Module):
                    found[f"{path}.load_state_dict"] = value.load_state_dict
    return found


def test_every_public_name_is_listed():
    """A public callable or method with no entry in API fails here: list its arguments' kinds."""
    missing = sorted(set(public_names()) - set(API))
    assert not missing, f"public names with no entry in tests/test_bad_inputs.py API: {missing}"
    listed = {name.split(" over ")[0] for name in API}
    assert listed <= set(public_names()), f"entries for names that are not public: {sorted(listed - set(public_names()))}"


# =========================================================================== the generated test
def _cases():
    no_plots = [pytest.mark.skip(reason="matplotlib (requirements-dev.txt) is not installed")] if plt is None else []
    for entry_name, entry in API.items():
        marks = no_plots if entry_name.startswith("dirfast.plot.") else []
        for argument in entry.args:
            yield pytest.param(entry_name, argument, id=f"{entry_name}({argument})", marks=marks)


def _corrupted_states(state, how, optional=()):
    """``state`` with each of its tensor entries corrupted in turn (``how``); a load may do
    without the ``optional`` ones."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or (how in ("nan", "float8") and not value.is_floating_point()):
            continue
        if how == "missing" and key in optional:
            continue
        bad = dict(state)
        if how == "missing":
            del bad[key]
        elif how == "nan":
            bad[key] = torch.full_like(value, NAN)
        elif how == "shape":
            bad[key] = torch.cat([value.reshape(-1), value.reshape(-1)[:1]])
        elif how in ("float8", "complex"):
            bad[key] = value.to(torch.float8_e4m3fn if how == "float8" else torch.complex128)
        else:
            bad[key] = value.to("meta")
        yield key, bad


def _call(entry, obj, kwargs):
    spread = {k: v for k, v in kwargs.items() if k not in SPREAD}
    for name in SPREAD & kwargs.keys():
        spread.update(kwargs[name])
    return entry.call(obj, **spread) if entry.obj else entry.call(**spread)


def _fresh(entry, argument=None, value=None):
    obj = entry.obj() if entry.obj else None
    kwargs = {name: copy.deepcopy(good) for name, (_, good) in entry.args.items()}
    if argument is not None:
        kwargs[argument] = value
    return obj, kwargs


def _expect_error(entry, argument, error, obj, kwargs, label):
    before = plain(obj) if obj is not None else None
    with pytest.raises(error) as info:
        _call(entry, obj, kwargs)
    words = entry.named_as.get(argument, NAMED_AS.get(argument, argument)).split("|")
    assert any(word in str(info.value) for word in words), f"{label}: the message does not name {argument}: {info.value}"
    if obj is not None:
        assert_same(plain(obj), before, path=f"{label}: the object after the failed call")


def _check_bad_value(entry, argument, good_value, good, bad, label) -> None:
    expect = entry.expect.get((argument, bad.name), bad.expect)
    if isinstance(expect, str):  # a state dict, each entry corrupted in turn
        for key, state in _corrupted_states(good_value, expect, entry.optional):
            obj, kwargs = _fresh(entry, argument, state)
            error = RuntimeError if isinstance(obj, nn.Module) else ValueError
            _expect_error(entry, argument, error, obj, kwargs, f"{label}: {key}")
        return
    obj, kwargs = _fresh(entry, argument, bad.make(copy.deepcopy(good_value)))
    if expect is None:  # an empty state: a module reports its missing keys
        expect = RuntimeError if isinstance(obj, nn.Module) else ValueError
    if isinstance(expect, type):
        _expect_error(entry, argument, expect, obj, kwargs, label)
    else:
        expect.check(_call(entry, obj, kwargs), good)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("entry_name, argument", list(_cases()))
def test_bad_argument(entry_name, argument):
    """Each bad value of the argument's kind: its error, naming the argument, with the object
    unchanged; or the documented result."""
    entry = API[entry_name]
    kind, good_value = entry.args[argument]
    obj, kwargs = _fresh(entry)
    good = _call(entry, obj, kwargs)
    problems = []
    for bad in kind:
        label = f"{entry_name}({argument}={bad.name})"
        try:
            _check_bad_value(entry, argument, good_value, good, bad, label)
        except (Exception, pytest.fail.Exception) as exc:  # every bad value is tried, then all that failed are listed
            problems.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        finally:
            if plt is not None:
                plt.close("all")
    assert not problems, "\n".join(problems)


# =========================================================================== behaviours behind bad input
OPS = torch.ops.dirfast
X, M1, V1, M2, V2, W = X8[:, :3], *(t[:, :3] for t in STAT), torch.ones(3)
DISPATCHER_CASES = [  # torch.ops.dirfast called directly: the C++ kernels check their arguments themselves
    ("x int", lambda: OPS.bin_stats(X.long(), IDX, 3), "x must be float"),
    ("bin_idx float", lambda: OPS.bin_stats(X, IDX.float(), 3), "bin_idx"),
    ("bin_idx short", lambda: OPS.bin_stats(X, IDX[:5], 3), "bin_idx"),
    ("num_bins 0", lambda: OPS.bin_stats(X, IDX, 0), "num_bins"),
    # [2^31 - 2, 2^20] float32 tables (8 PiB) fit no address space, whatever the overcommit policy
    ("num_bins beyond memory", lambda: OPS.bin_stats(torch.zeros(1, 2**20), torch.zeros(1, dtype=torch.long), 2**31 - 2),
     r"num_bins = 2147483646 is too many for memory: could not allocate a \[2147483646, 1048576\] torch.float32"),
    ("count float32", lambda: OPS.accumulate_bin_stats_(RUNNING[0].float(), *RUNNING[1:], X8, IDX), "count must be"),
    ("mean D", lambda: OPS.accumulate_bin_stats_(RUNNING[0], RUNNING[1][:, :3], RUNNING[2], X8, IDX), "mean must be"),
    ("m2 float64", lambda: OPS.accumulate_bin_stats_(*RUNNING[:2], RUNNING[2].double(), X8, IDX), "m2 must"),
    ("m2 expanded", lambda: OPS.accumulate_bin_stats_(*RUNNING[:2], RUNNING[2][:1].expand(3, 4), X8, IDX), "m2 has"),
    ("mean and m2 one tensor", lambda: OPS.accumulate_bin_stats_(*RUNNING[:2], RUNNING[1], X8, IDX), "share memory"),
    ("integer_bins labels int", lambda: OPS.integer_bins(IDX, 12, 1.0, 0), "labels must be float"),
    ("integer_bins num_bins 0", lambda: OPS.integer_bins(Y8, 0, 1.0, 0), "num_bins"),
    ("integer_bins first past num_bins", lambda: OPS.integer_bins(Y8, 12, 1.0, 12), "first"),
    ("integer_bins scale 0", lambda: OPS.integer_bins(Y8, 12, 0.0, 0), "scale"),
    ("m1 D", lambda: OPS.calibrate(X, IDX, M1[:, :2], V1, M2, V2), "src_mean"),
    ("v2 bins", lambda: OPS.calibrate(X, IDX, M1, V1, M2, V2[:2]), "dst_var"),
    ("clips reversed", lambda: OPS.calibrate(X, IDX, M1, V1, M2, V2, 2.0, 1.0), "clip_min"),
    ("clip_min infinite", lambda: OPS.calibrate(X, IDX, M1, V1, M2, V2, INF, INF), "float32"),
    ("clip_max beyond float32", lambda: OPS.calibrate(X, IDX, M1, V1, M2, V2, 0.1, 1e39), "float32"),
    ("window even", lambda: OPS.smooth_bins(M1, torch.ones(4), "reflect"), "window"),
    ("padding unknown", lambda: OPS.smooth_bins(M1, W, "circular"), "padding"),
    ("stats 3-D", lambda: OPS.smooth_bins(torch.ones(2, 2, 2), W, "reflect"), "stats"),
    ("calibrate_ expanded x", lambda: OPS.calibrate_(torch.zeros(1, 3).expand(8, 3), IDX, M1, V1, M2, V2), "share memory"),
    ("mixture x int", lambda: OPS.mixture_logpdf(IDX, W, W, W), "x must be float"),
    ("mixture means 2-D", lambda: OPS.mixture_logpdf(X, W[:, None], W, W), "means"),
    ("mixture variances short", lambda: OPS.mixture_logpdf(X, W, W[:2], W), "variances"),
    ("mixture backward grad shape", lambda: OPS.mixture_logpdf_backward(X[:2], X, X, W, W, W), "grad"),
    ("mixture with grads x int", lambda: OPS.mixture_logpdf_with_grads(IDX, W, W, W), "x must be float"),
    ("mixture with grads log_weights short", lambda: OPS.mixture_logpdf_with_grads(X, W, W, W[:2]), "log_weights"),
    ("rnc features 1-D", lambda: OPS.rnc_loss(X[:, 0], X[:, :1], 2.0, 0, 8), "features"),
    ("rnc labels rows", lambda: OPS.rnc_loss(X, X[:5, :1], 2.0, 0, 8), "labels"),
    ("rnc labels int", lambda: OPS.rnc_loss(X, IDX[:, None], 2.0, 0, 8), "labels must be float"),
    ("rnc temperature 0", lambda: OPS.rnc_loss(X, X[:, :1], 0.0, 0, 8), "temperature"),
    ("rnc temperature below float32's", lambda: OPS.rnc_loss(X, X[:, :1], 1e-39, 0, 8), "temperature must be in"),
    ("rnc temperature subnormal in float32", lambda: OPS.rnc_loss(X, X[:, :1], 5e-39, 0, 8), "temperature must be in"),
    ("rnc backward temperature above float32's",
     lambda: OPS.rnc_loss_backward(torch.ones(8), X, X[:, :1], 1e39, 0, 8), "temperature must be in"),
    ("rnc offset negative", lambda: OPS.rnc_loss(X, X[:, :1], 2.0, -1, 8), "offset"),
    ("rnc count past the rows", lambda: OPS.rnc_loss(X, X[:, :1], 2.0, 3, 6), "count"),
    ("rnc backward grad shape", lambda: OPS.rnc_loss_backward(X[:3, 0], X, X[:, :1], 2.0, 0, 8), "grad"),
    ("conr labels short", lambda: OPS.conr_loss(X, X[:5, :1], X[:5, :1], X[:, 0], 1.0, 0.07, 0.01, "exp", True, False, 0, 8),
     "labels"),
    ("conr weights [m, 1]", lambda: OPS.conr_loss(X, X[:, :1], X[:, :1], X[:, :1], 1.0, 0.07, 0.01, "exp", True, False, 0, 8),
     "weights"),
    ("conr push unknown", lambda: OPS.conr_loss(X, X[:, :1], X[:, :1], X[:, 0], 1.0, 0.07, 0.01, "cos", True, False, 0, 8),
     "push"),
    ("conr tau 0", lambda: OPS.conr_loss(X, X[:, :1], X[:, :1], X[:, 0], 1.0, 0.0, 0.01, "exp", True, False, 0, 8), "tau"),
    ("conr tau subnormal in float32",
     lambda: OPS.conr_loss(X, X[:, :1], X[:, :1], X[:, 0], 1.0, 5e-39, 0.01, "exp", True, False, 0, 8),
     "tau must be in"),
    ("conr count past the rows", lambda: OPS.conr_loss(X, X[:, :1], X[:, :1], X[:, 0], 1.0, 0.07, 0.01, "exp", True, False,
                                                        2, 7), "count"),
    ("conr backward grad shape", lambda: OPS.conr_loss_backward(X[:, 0], X, X[:, :1], X[:, :1], X[:, 0], 1.0, 0.07, 0.01,
                                                                "exp", True, False, 0, 5), "grad"),
    ("ranksim keep float", lambda: OPS.ranksim_loss(X, Y8[:, None], KEEP8.float(), 2.0, 0, 8), "keep must be a bool"),
    ("ranksim labels rows", lambda: OPS.ranksim_loss(X, Y8[:5, None], KEEP8, 2.0, 0, 8), "labels must be"),
    ("ranksim count", lambda: OPS.ranksim_loss(X, Y8[:, None], KEEP8, 2.0, 3, 6), "count must be"),
    ("ranksim lambda 0", lambda: OPS.ranksim_loss(X, Y8[:, None], KEEP8, 0.0, 0, 8), "lambda_val"),
    ("ranksim backward grad shape",
     lambda: OPS.ranksim_loss_backward(torch.ones(3), X, Y8[:, None], KEEP8, 2.0, 0, 8), "grad must have"),
]


@pytest.mark.skipif("cpp" not in AVAILABLE, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("name, call, match", DISPATCHER_CASES, ids=[c[0] for c in DISPATCHER_CASES])
def test_dispatcher_rejects(name, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize("backend", AVAILABLE)
def test_ops_fail_alike_on_every_backend(backend):
    """The front end checks before any backend runs: each backend rejects the same inputs."""
    for entry_name in ("dirfast.ops.bin_stats", "dirfast.ops.accumulate_bin_stats_", "dirfast.ops.integer_bins",
                       "dirfast.ops.calibrate",
                       "dirfast.ops.mixture_logpdf", "dirfast.ops.rnc_loss", "dirfast.ops.conr_loss", "dirfast.ops.ranksim_loss"):
        entry = API[entry_name]
        for argument, (kind, good) in entry.args.items():
            for bad in kind:
                expect = entry.expect.get((argument, bad.name), bad.expect)
                if isinstance(expect, type):
                    _, kwargs = _fresh(entry, argument, bad.make(copy.deepcopy(good)))
                    with dirfast.use_backend(backend), pytest.raises(expect):
                        _call(entry, None, kwargs)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_ops_behaviour_on_bad_values(backend):
    """Values are not checked (no host sync): an index outside [0, B) selects no bin (ignored by
    bin_stats, left unchanged by calibrate), and NaN features give NaN statistics, as torch ops."""
    with dirfast.use_backend(backend):
        idx = torch.tensor([0, 5, -1, 2 ** 40, 1, 0, 1, 2])
        count, mean, _ = ops.bin_stats(X, idx, 3)
        assert count.tolist() == [2, 2, 1]
        out = ops.calibrate(X, idx, M1, V1, M2, V2)
        assert torch.equal(out[1:4], X[1:4])
        x = X.clone()
        x[0, 0] = NAN
        _, mean, _ = ops.bin_stats(x, torch.zeros(8, dtype=torch.long), 3)
        assert torch.isnan(mean[0, 0]) and torch.isfinite(mean[0, 1:]).all()


def test_host_values_under_the_meta_device():
    """Under ``with torch.device("meta")`` (a large model's deferred init), lists and arrays are
    read on the CPU, not made meta tensors without values: the constructors that take them work
    (they refused "edges"/"bucket_centers" the caller never passed), with the values built
    outside."""
    gmm = {name: value.numpy() for name, value in GMM2.items()}
    with torch.device("meta"):
        binnings = [dirfast.Binning.integer(121), dirfast.Binning.uniform(0, 10, 10), dirfast.Binning([0.0, 1.0, 2.5])]
        fds, lds = dirfast.FDS(4, bucket_num=20, bucket_start=2), dirfast.LDS(dirfast.Binning.integer(121))
        bni, gai = BNILoss(0.8, CENTERS.numpy(), COUNTS.numpy()), GAILoss(0.8, gmm)
    for got, expected in zip(binnings, [INT121, U10, dirfast.Binning([0.0, 1.0, 2.5])]):
        assert_same(got, expected)
    assert fds.running_mean.is_meta and lds.binning.num_bins == 121
    labels = torch.cat([torch.arange(100.0), torch.arange(30.0)])
    built_outside = dirfast.LDS(dirfast.Binning.integer(121)).fit(labels)
    assert torch.equal(lds.fit(labels).weights(labels), built_outside.weights(labels))
    for module, built in ((bni, BNILoss(0.8, CENTERS.numpy(), COUNTS.numpy())), (gai, GAILoss(0.8, gmm))):
        for name, value in built.named_buffers():
            assert_same(getattr(module, name), value, path=name)
    # What the estimators make themselves is on the CPU too: spherical ([K]) variances were multiplied
    # by a meta identity (RuntimeError), an unfitted LDS's zero counts were meta (update() raised
    # RuntimeError, a state_dict held no values) and the diagnostics' bin column was meta.
    spherical = {"means": [-1.0, 1.0], "variances": [1.0, 2.0], "weights": [0.5, 0.5]}
    trained = trained_fds()
    with torch.device("meta"):
        mixture, spherical_gai = GaussianMixture(**spherical), GAILoss(0.8, spherical)
        streamed = dirfast.LDS(dirfast.Binning.integer(121))
        unfitted_state = streamed.state_dict()
        streamed.update(labels)
        tables = {"LDS": built_outside.diagnostics(), "FDS": trained.diagnostics()}
    assert_same(mixture.variances, GaussianMixture(**spherical).variances)
    assert_same(spherical_gai.gmm_variances, GAILoss(0.8, spherical).gmm_variances)
    assert not unfitted_state["counts"].is_meta and torch.equal(streamed.weights(labels), built_outside.weights(labels))
    for owner, table in tables.items():
        assert all(value.device.type == "cpu" for value in table.values()), owner


def test_integers_of_64_bits_in_a_list():
    """A list of integers up to 2^64 - 1 is taken as a uint64 array of them is (NumPy makes it a
    ulonglong, which torch.from_numpy refused by that name); beyond 64 bits is a ValueError."""
    big = [2 ** 64 - 1, 2 ** 63]
    assert torch.equal(dirfast.bandwidth.silverman(big), dirfast.bandwidth.silverman(np.array(big, dtype=np.uint64)))
    with pytest.raises(ValueError, match="values holds integers too large for 64 bits"):
        dirfast.bandwidth.silverman([2 ** 64, 1])
    with pytest.raises(TypeError, match="values must be real numbers, got an array of object"):  # not too large
        dirfast.bandwidth.silverman(np.array([1.5, 2.5], dtype=object))


@pytest.mark.parametrize("make", [fitted_lds, fitted_dense], ids=["LDS", "DenseWeight"])
def test_a_loaded_state_that_requires_grad_leaves_no_graph(make):
    """A state dict whose tensors require grad (built by hand from parameters, say) loads as
    values: the weights are constants of the loss, as after a fit. Its graph was kept: the
    weights required grad, the first backward freed the graph of the cached weight table and
    the second step raised "Trying to backward through the graph a second time"."""
    state = {key: value.clone().requires_grad_() if isinstance(value, torch.Tensor) and value.is_floating_point()
             else value for key, value in make().state_dict().items()}
    estimator = make()
    estimator.load_state_dict(state)
    assert not any(value.requires_grad for value in estimator.state_dict().values() if isinstance(value, torch.Tensor))
    pred = torch.zeros(4, requires_grad=True)
    for _ in range(2):  # two training steps
        weights = estimator.weights(BATCH)
        assert not weights.requires_grad
        (weights * (pred - BATCH) ** 2).mean().backward()


def test_failed_calibrate_inplace_writes_nothing():
    for make in (lambda: X.clone().requires_grad_(), lambda: torch.zeros(1, 3).expand(8, 3)):
        x = make()
        before = x.detach().clone()
        with pytest.raises(RuntimeError):
            ops.calibrate_(x, IDX, M1, V1, M2, V2)
        assert torch.equal(x.detach(), before)


def test_window_edge_cases_are_finite_and_fast():
    """A sigma so small that scipy divides 0 by 0 gives the delta; a very wide Gaussian (its
    radius 4 sigma far beyond the window) has its taps folded onto the window."""
    for kernel in ("gaussian", "laplace"):
        assert dirfast.kernel_window(kernel, 5, 1e-300).tolist() == [0, 0, 1, 0, 0]
        assert dirfast.kernel_window(kernel, 5, 1e-300, normalize="sum").tolist() == [0, 0, 1, 0, 0]
    wide = dirfast.kernel_window("gaussian", 5, 9e5)
    assert torch.isfinite(wide).all() and float(wide.min()) > 0.999999


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fds_keeps_statistics_finite_on_the_training_path(dtype):
    """accumulate() reads nothing on the host: a row with a NaN label and a bucket whose batch
    holds a NaN or overflowing feature (in float32, the statistics' dtype, whatever the
    features') are left out (and counted), the rest goes in."""
    fds = trained_fds()
    fds.clear_accumulated()
    y = torch.tensor([5.0, 5.0, 6.0, 6.0, NAN, 7.0, 7.0, 8.0])
    x = torch.randn(8, 4, generator=gen(10), dtype=dtype)
    x[0, 1] = NAN              # bucket of label 5: left out
    x[5] = 3e38                # bucket of label 7: its statistics overflow, left out
    fds.accumulate(x, y)
    counts = fds.accumulated_count
    assert counts[6 - 2] == 2 and counts[8 - 2] == 1 and counts[5 - 2] == 0 and counts[7 - 2] == 0
    assert int(fds.num_samples_skipped) == 5
    fds.update_running_stats(epoch=2)
    assert all(torch.isfinite(t).all() for t in fds.state_dict().values())
    out = fds.smooth(x.clone(), y, 2)  # smooth leaves the NaN-label row as it is
    assert torch.equal(out[4], x[4])


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_fds_statistics_keep_their_dtype(cast):
    """Casting the module (model.half()) moves the statistics but keeps their precision, as
    BatchNorm's counter: a bucket of 160,000 pixels does not overflow float16."""
    fds = trained_fds()
    getattr(fds, cast)()
    assert fds.running_mean.dtype == torch.float32 and fds.accumulated_count.dtype == torch.float64
    assert fds._snapshot_follows  # the published snapshot sharing survives
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[cast]
    fds.accumulate(torch.randn(160000, 4, generator=gen(11)).to(dtype), torch.full((160000,), 5.0))
    fds.update_running_stats(epoch=2)
    assert int(fds.num_samples_tracked[3]) > 160000
    assert all(torch.isfinite(t).all() for t in fds.state_dict().values())


def test_huber_beta_zero_is_l1_with_finite_gradients():
    pred = torch.tensor([[0.0], [1.0], [-2.0]], requires_grad=True)
    target = torch.tensor([[0.0], [0.5], [1.0]])
    loss = dirfast.losses.weighted_huber_loss(pred, target, beta=0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(dirfast.losses.weighted_l1_loss(pred, target).detach()))
    assert torch.isfinite(pred.grad).all()


def test_equal_thresholds_split_without_overlap():
    got = dirfast.metrics.shot_metrics(TEST + 0.5, TEST, TRAIN, many_shot_thr=6, low_shot_thr=6)
    assert got["median"]["mse"] == pytest.approx(0.25) and math.isnan(got["many"]["mse"]) and math.isnan(got["low"]["mse"])
