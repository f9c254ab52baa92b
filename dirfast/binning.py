"""Mapping labels to bins, as the published DIR code does in each of its paths.

The published code bins a label differently depending on where it is binned: the STS-B-DIR LDS
weights (``tasks.py``) use ``np.histogram`` on the labels in their own dtype (float64 labels
against float64 edges), while its FDS module (``fds.py``) and evaluator (``util.py``) cast every
label to float32 and compare it with float32 edges; for float64 scores the two disagree on some
(0.6 is bin 5 for the weights and bin 6 for FDS). ``tasks.py`` itself reads its scores as
float32 (``targ_fn=np.float32``), where the two agree. :class:`Binning` reproduces both:
``precision="labels"`` (the default, used by LDS) and ``precision="float32"`` (used by FDS and
the shot metrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch

from . import _validate as validate
from ._types import ArrayLike
from .bandwidth import BIN_WIDTH_RULES, rule_width_unchecked
# MAX_BINS: bins are computed in float32, exact up to there
from .ops import FLOAT_DTYPES
from .ops.integer_bins import MAX_BINS, integer_bins_unchecked

__all__ = ["Binning", "GridBinning", "PRECISIONS"]

PRECISIONS = ("labels", "float32")

_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
# Labels from which a CPU binning guesses bins by arithmetic (_arithmetic_guess): its dozen torch
# ops cost more than the search on few labels and pay on many; this is about where the two cross
# (benchmarks/results/cpu/binning-ops.txt, design-constants.md). On a GPU the search stays (not
# measured).
_GUESS_FROM = 4096


def _uniform_edges(low: float, high: float, num_bins: int, dtype=np.float64) -> np.ndarray:
    """numpy's histogram edges of ``num_bins`` equal bins over ``[low, high]`` for data of
    ``dtype``; ValueError when that dtype cannot hold them (a range too narrow or too wide)."""
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            edges = np.histogram_bin_edges(np.array([], dtype=dtype), bins=num_bins, range=(low, high))
        except ValueError:  # numpy: "Too many bins for data range"
            edges = None
    if edges is None or not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0)):
        raise ValueError(f"low={low:g} and high={high:g} give {num_bins} equal bins no {np.dtype(dtype).name} edges "
                         f"that strictly increase (the range is too narrow or too wide for that precision): widen "
                         f"or rescale the range, or use fewer bins")
    return edges


def _checked_edges(edges) -> np.ndarray:
    """``edges`` as a float64 NumPy array, or ValueError naming what is wrong with them."""
    edges = validate.readable("edges", validate.real_tensor("edges", edges)).detach().cpu()
    edges = edges.to(torch.float64).numpy().copy()
    if edges.ndim != 1 or not 2 <= edges.size <= MAX_BINS + 1:
        raise ValueError(f"edges must be 1-D with 2 to {MAX_BINS + 1} values, got shape {edges.shape}")
    if not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        raise ValueError("edges must be finite and strictly increasing")
    return edges


def _arithmetic_guess(edges: np.ndarray):
    """``(origin, per_unit)`` when ``floor((label - origin) * per_unit)``, computed in the edges'
    dtype (float32 or float64), is within one bin of every such label's bin, else None (edges
    too uneven: the caller searches them).

    The guess and the bin both grow with the label, so over a bin [e_i, e_(i+1)) their largest
    gap is at its two ends, e_i and the float just below e_(i+1): checking those 2n values in
    the same arithmetic as torch's (IEEE, no fused multiply-add) proves the bound for every
    label. Labels out of range are clamped to the first or last bin either way."""
    kind = edges.dtype.type
    n = edges.size - 1
    origin = edges[0]
    bins = np.arange(n)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        per_unit = kind(n / (float(edges[-1]) - float(origin)))
        at_start = np.floor((edges[:-1] - origin) * per_unit)
        at_end = np.floor((np.nextafter(edges[1:], kind(-np.inf)) - origin) * per_unit)
    # the guess grows with the label, so at_start <= at_end: these two bound the gap both ways (NaN fails them)
    within_one = np.isfinite(per_unit) and per_unit > 0 and np.all(at_start >= bins - 1) and np.all(at_end <= bins + 1)
    return (float(origin), float(per_unit)) if within_one else None


def _number(value) -> str:
    """A float as short as it reads (5, not 5.0) where that is exact, else all its digits: a repr
    must give back the same bins (1e8 + 0.5 is not 1e+08)."""
    short = f"{float(value):g}"
    return short if float(short) == float(value) else repr(float(value))


class Binning:
    """Maps labels to int64 bin indices in ``[0, num_bins - 1]``.

    Build one with :meth:`integer` (ages: ``int(label)``; depths: ``int(10 * label)``),
    :meth:`uniform` (equal-width bins with numpy's histogram edges, as STS-B-DIR), or
    ``Binning(edges)`` for any increasing edges. Calling it on labels (a tensor, array or list,
    any shape) returns int64 indices on the labels' device, clamped into range: labels below the
    first bin join it, labels above the last join it.

    ``precision`` says how a label is compared with the edges, as the published code does in
    each path: ``"labels"`` compares it in its own dtype, as ``np.histogram`` does (the
    uniform edges are computed in that dtype: float64 edges for float64 and integer labels,
    float32 edges for float32 labels); ``"float32"`` first rounds the label to float32 and
    compares it with float32 edges, as the published FDS modules and evaluators do. LDS uses
    ``"labels"``; FDS and :func:`dirfast.metrics.shot_metrics` use ``"float32"``. They differ
    only for labels that float32 cannot hold exactly (float64 scores: 0.2 and 0.6 among them).

    Example::

        >>> Binning.integer(121)(torch.tensor([0.0, 30.7, 200.0]))
        tensor([  0,  30, 120])
    """

    def __init__(self, edges: ArrayLike) -> None:
        self._setup(_checked_edges(edges), "edges")

    def _setup(self, edges: np.ndarray, kind: str, scale: float = 1.0,
               range_: tuple[float, float] | None = None) -> None:
        self._edges, self._kind, self._scale, self._range = edges, kind, scale, range_
        # The edges each label dtype is compared with, built here: built inside torch.compile's
        # tracing, they would break the graph. Then one copy per device, so binning never copies
        # from the host again.
        dtypes = () if kind == "integer" else FLOAT_DTYPES if kind == "uniform" else (torch.float32, torch.float64)
        self._host_tables = {dtype: self._host_table(dtype) for dtype in dtypes}
        self._tables: dict[tuple[Any, torch.dtype], tuple] = {}  # (device, dtype) -> (edges there, arithmetic guess)

    @classmethod
    def integer(cls, num_bins: int, scale: float = 1.0) -> "Binning":
        """Bins ``0 .. num_bins - 1`` of ``int(label * scale)`` (truncated toward zero), clamped
        into range: ``Binning.integer(121)`` is the published age binning, and
        ``Binning.integer(100, scale=10)`` the NYUD2-DIR depth buckets of 0.1 m. ``scale`` must be
        finite in float32, where labels are scaled (as :func:`dirfast.ops.integer_bins`)."""
        num_bins = validate.integer("num_bins", num_bins, 1, MAX_BINS)
        # beyond float32, label * scale is inf or NaN there, and the bins depend on the backend
        scale = validate.in_dtype("scale", validate.positive("scale", scale), torch.float32, reciprocal=True)
        binning = cls.__new__(cls)
        binning._setup(_checked_edges(np.arange(num_bins + 1, dtype=np.float64) / scale), "integer", scale=scale)
        return binning

    @classmethod
    def uniform(cls, low: float, high: float, num_bins: int) -> "Binning":
        """``num_bins`` equal bins over ``[low, high]`` with numpy's histogram edges.

        As ``np.histogram``, a label falls in the bin whose right edge is the first strictly
        above it, and ``high`` itself goes to the last bin. ``Binning.uniform(0, 5, 50)`` is the
        STS-B-DIR binning.
        """
        num_bins = validate.integer("num_bins", num_bins, 1, MAX_BINS)
        low, high = validate.real("low", low), validate.real("high", high)
        if not low < high:
            raise ValueError(f"low must be below high, got low={low} and high={high}")
        binning = cls.__new__(cls)
        binning._setup(_checked_edges(_uniform_edges(low, high, num_bins)), "uniform", range_=(low, high))
        return binning

    @property
    def num_bins(self) -> int:
        return self._edges.size - 1

    @property
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges (float64 NumPy array)."""
        return self._edges.copy()

    @property
    def centers(self) -> np.ndarray:
        """The midpoint of each bin (float64 NumPy array of ``num_bins`` values)."""
        return self._edges[:-1] / 2 + self._edges[1:] / 2  # halves first: the sum of two large edges overflows

    @property
    def is_integer(self) -> bool:
        """Whether labels are binned by truncation (:meth:`integer`)."""
        return self._kind == "integer"

    def __repr__(self) -> str:
        if self._kind == "integer":
            scale = "" if self._scale == 1.0 else f", scale={_number(self._scale)}"
            return f"Binning.integer({self.num_bins}{scale})"
        if self._kind == "uniform":
            low, high = cast("tuple[float, float]", self._range)  # set by uniform()
            return f"Binning.uniform({_number(low)}, {_number(high)}, {self.num_bins})"
        return f"Binning(edges of {self.num_bins} bins over [{_number(self._edges[0])}, {_number(self._edges[-1])}])"

    def __eq__(self, other) -> bool:
        return (isinstance(other, Binning) and self._kind == other._kind and self._scale == other._scale
                and np.array_equal(self._edges, other._edges))

    def __hash__(self) -> int:  # equal binnings hash alike: -0.0 edges as 0.0 (immutable: edges is a copy)
        return hash((self._kind, self._scale, (self._edges + 0.0).tobytes()))

    # -- binning -------------------------------------------------------------------------------
    def _host_table(self, dtype: torch.dtype):
        """``(edges, guess)``: the edges labels of ``dtype`` are compared with (CPU) and the
        arithmetic guess of their bins (:func:`_arithmetic_guess`; None where searching is
        needed); or, where that dtype cannot hold the edges, the message to raise."""
        if self._kind == "uniform" and dtype in (torch.float16, torch.float32):  # np.histogram's edges for such
            try:  # data (float64's are the binning's own)
                low, high = cast("tuple[float, float]", self._range)  # set by uniform()
                table = torch.from_numpy(_uniform_edges(low, high, self.num_bins, _NUMPY_OF[dtype]))
            except ValueError:
                table = None
        else:
            table = torch.from_numpy(self._edges).to(dtype)
        if table is None or (dtype != torch.float64 and not bool((table[1:] > table[:-1]).all())):
            return (f"{self!r} cannot bin labels in {dtype}: its edges are not strictly increasing in that "
                    f"precision (the range is too narrow); bin float64 labels with precision='labels', or widen "
                    f"the range")
        return table, _arithmetic_guess(table.numpy()) if dtype in (torch.float32, torch.float64) else None

    def _edges_tensor(self, dtype: torch.dtype, device) -> tuple:
        """``(edges, guess)`` of :meth:`_host_table`, the edges on ``device``."""
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is None:
            host = self._host_tables[dtype]
            if isinstance(host, str):
                raise ValueError(host)
            cached = self._tables[key] = (host[0].to(device), host[1])
        return cached

    def _compare_dtype(self, dtype: torch.dtype, precision: str) -> torch.dtype:
        """The dtype a label of ``dtype`` is compared (or scaled) in."""
        if precision == "float32":
            return torch.float32
        if not dtype.is_floating_point:
            return torch.float64  # as np.histogram: integers against float64 edges
        if self._kind == "uniform":
            return dtype  # np.histogram computes the edges in the labels' dtype
        if self._kind == "integer":
            return torch.float64 if dtype == torch.float64 else torch.float32
        return torch.float64  # explicit float64 edges: np.histogram promotes the labels

    def __call__(self, labels: ArrayLike, *, precision: str = "labels", check: bool = True) -> torch.Tensor:
        """Bin indices (int64, on the labels' device, the labels' shape) of ``labels``.

        With ``check`` (the default) NaN or infinite labels raise ValueError, and fractional
        labels given to an integer binning warn; both read the labels on the host, so the
        training-path callers inside dirfast pass ``check=False``, where a NaN or infinite label
        gets index -1 (no bin: the ops ignore it) and costs no synchronisation.
        """
        return self._bins_from(labels, precision, check, 0)

    def _bins_from(self, labels, precision: str, check: bool, first: int) -> torch.Tensor:
        """``__call__`` with the bins below ``first`` joined to it and counted from it (FDS's
        ``bucket_start``): bin ``b`` becomes ``max(b, first) - first``, -1 stays -1."""
        bins = self._bins(self._checked(labels, precision, check), precision, first)
        return bins.nan_to_num_(nan=-1.0).long() if bins.is_floating_point() else bins

    def _checked(self, labels, precision: str, check: bool) -> torch.Tensor:
        """``labels`` as a tensor, the arguments validated; with ``check``, NaN or infinite labels
        raise and fractional ones given to an integer binning warn (reading them on the host)."""
        validate.choice("precision", precision, PRECISIONS)
        validate.boolean("check", check)
        labels = validate.real_tensor("labels", labels)
        if check and labels.is_floating_point() and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(validate.readable("labels", labels)).all()):
                raise ValueError("labels must be finite: found NaN or infinite values")
            self.warn_if_fractional(labels)
        return labels

    def _bins(self, labels: torch.Tensor, precision: str, first: int) -> torch.Tensor:
        """The bins of ``labels`` counted from ``first``: for an integer binning or where the edges
        are searched, int64 with -1 where a label is NaN or infinite; where uniform bins are
        guessed, whole numbers in a float tensor (float32 or float64: exact, bins are below 2**24)
        with NaN there, for the caller's one conversion.

        Floating point where it pays: torch's int64 clamps, comparisons and selects would be most of
        FDS.smooth's binning, and its binary search costs more a label than the arithmetic guess;
        on few labels the search's fewer ops win (benchmarks/results/cpu/binning-ops.txt,
        design-constants.md)."""
        cmp = self._compare_dtype(labels.dtype, precision)
        values = labels
        if self._kind == "integer" and labels.dtype == torch.float64 and cmp == torch.float32:
            # finite labels beyond float32 would become inf there (no bin): clamped first, they join
            # the edge bins as with the searched edges; NaN and inf stay as they are
            values = torch.where(labels.isinf(), labels, labels.clamp(-validate.FLOAT32_MAX, validate.FLOAT32_MAX))
        values = values if values.dtype == cmp else values.to(cmp)  # (a no-op .to still costs a call)
        last = self.num_bins - 1
        if self._kind == "integer":  # int(label * scale): one pass (the integer_bins op)
            return integer_bins_unchecked(values, self.num_bins, self._scale, first)
        edges, guess = self._edges_tensor(cmp, labels.device)
        if guess is None or labels.numel() < _GUESS_FROM or labels.device.type != "cpu":
            bins = (torch.searchsorted(edges, values.contiguous(), right=True) - 1).clamp_(first, last)
            if first:
                bins.sub_(first)
            return torch.where(torch.isfinite(labels), bins, -1) if labels.is_floating_point() else bins
        origin, per_unit = guess  # within one bin of the label's bin (proved for these edges): one step fixes it
        bins = (values - origin).mul_(per_unit).floor_().clamp_(0.0, float(last)).nan_to_num_(0.0)
        at = bins.long()
        step = torch.take(edges[1:], at).le_(values)  # 1 where the label is past the guessed bin
        bins.add_(step).sub_(torch.take(edges, at, out=step).gt_(values))  # -1 where before it
        bins.clamp_(float(first), float(last))
        if first:
            bins.sub_(first)
        if labels.is_floating_point():  # + labels * 0: NaN exactly where a label is NaN or infinite, else 0
            bins.add_(labels, alpha=0)
        return bins

    def warn_if_fractional(self, labels: ArrayLike) -> None:
        """Warn when an integer binning (``scale=1``) is given labels with fractional parts:
        it truncates them, which is rarely what continuous labels (scores in [0, 5]) need.
        Reads the labels on the host."""
        if self._kind != "integer" or self._scale != 1.0:
            return
        labels = validate.readable("labels", validate.real_tensor("labels", labels))
        if not labels.is_floating_point():
            return
        finite = labels[torch.isfinite(labels)]
        fractional = finite != finite.trunc()
        if bool(fractional.any()):
            example = float(finite[fractional][0])
            validate.warn(
                f"{self!r} truncates labels to integers, but some have fractional parts (e.g. {example:g}): "
                "continuous labels need Binning.uniform(low, high, num_bins) or a preset of dirfast.presets "
                "(dirfast.presets.STS_B_DIR for scores in [0, 5])")

    @classmethod
    def auto(cls, labels: ArrayLike, rule: str = "fd", max_bins: int = 1000) -> "Binning":
        """Equal bins over ``[min, max]`` of ``labels``, as many as the width from ``rule`` needs.

        ``rule``: ``"fd"`` (Freedman–Diaconis, ``2 IQR n^(-1/3)``, as
        ``numpy.histogram_bin_edges(labels, bins="fd")``), or ``"silverman"`` / ``"scott"`` (the
        bandwidths of :class:`dirfast.DenseWeight` as the width). The count is
        ``ceil((max - min) / width)``, at most ``max_bins``. A width of 0 (an IQR of 0, or all
        labels equal) gives one bin, as numpy does; all labels equal to ``v`` give
        ``Binning.uniform(v - 0.5, v + 0.5, 1)`` (wider where ``v`` is so large that 0.5 would
        round away). Raises ValueError for no, NaN or infinite labels.
        """
        validate.choice("rule", rule, BIN_WIDTH_RULES)
        max_bins = validate.integer("max_bins", max_bins, 1, MAX_BINS)
        values, low, high = validate.finite_values_and_span("labels", labels)
        if low == high:
            pad = max(0.5, 4 * math.ulp(low))
            if not math.isfinite(low - pad) or not math.isfinite(high + pad):
                raise ValueError(f"labels are all {low!r}: a bin around them would reach beyond float64")
            return cls.uniform(low - pad, high + pad, 1)
        width = float(rule_width_unchecked(values, rule))
        if not width > 0:
            return cls.uniform(low, high, 1)
        bins_needed = (high - low) / width  # inf for a subnormal width
        return cls.uniform(low, high, max_bins if bins_needed >= max_bins else math.ceil(bins_needed))


class GridBinning:
    """Labels with several dimensions to bins of a product grid: one :class:`Binning` per
    dimension, the bins numbered row-major (the last dimension varies fastest), as
    ``numpy.ravel_multi_index`` does.

    Calling it on labels ``[..., d]`` returns int64 indices ``[...]`` in ``[0, num_bins)`` on the
    labels' device (-1 where a coordinate is NaN or infinite, with ``check=False``). LDS, FDS and
    :func:`dirfast.metrics.shot_metrics` take one in place of a ``Binning``; on one dimension
    they give the results of that dimension's ``Binning``, bit for bit.

    Example::

        >>> grid = GridBinning(Binning.uniform(0, 1, 4), Binning.integer(3))
        >>> grid(torch.tensor([[0.1, 2.0], [0.9, 0.0]]))
        tensor([ 2, 9])
    """

    def __init__(self, *binnings: Binning) -> None:
        if len(binnings) == 1 and isinstance(binnings[0], (list, tuple)):
            binnings = tuple(binnings[0])
        if not binnings:
            raise ValueError("binnings must hold at least one Binning (one per label dimension)")
        for index, binning in enumerate(binnings):
            if not isinstance(binning, Binning):
                raise TypeError(f"binnings[{index}] must be a dirfast.Binning, got {type(binning).__name__}")
        shape = tuple(b.num_bins for b in binnings)
        if math.prod(shape) > MAX_BINS:
            raise ValueError(f"binnings make a grid of {math.prod(shape)} bins ({' x '.join(map(str, shape))}), "
                             f"more than {MAX_BINS}")
        self.binnings = tuple(binnings)
        self.shape = shape
        self._strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))

    @property
    def ndim(self) -> int:
        """The number of label dimensions ``d``."""
        return len(self.binnings)

    @property
    def num_bins(self) -> int:
        return math.prod(self.shape)

    @property
    def centers(self) -> np.ndarray:
        """The centre of each grid bin, ``[num_bins, d]`` (float64), in bin order."""
        axes = np.meshgrid(*(b.centers for b in self.binnings), indexing="ij")
        return np.stack([a.reshape(-1) for a in axes], axis=1)

    def __repr__(self) -> str:
        return f"GridBinning({', '.join(repr(b) for b in self.binnings)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, GridBinning) and self.binnings == other.binnings

    def __hash__(self) -> int:
        return hash(self.binnings)

    def __call__(self, labels: ArrayLike, *, precision: str = "labels", check: bool = True) -> torch.Tensor:
        """Row-major grid indices of ``labels`` ``[..., d]``, each coordinate binned by its
        dimension's ``Binning`` (same ``precision`` and ``check`` rules)."""
        labels = validate.real_tensor("labels", labels)
        if labels.dim() == 0 or labels.shape[-1] != self.ndim:
            raise ValueError(f"labels must be [..., {self.ndim}] (one coordinate per grid dimension), "
                             f"got shape {tuple(labels.shape)}")
        index = None  # in floating point (exact: below 2**24), NaN where any coordinate has no bin
        for axis, (binning, stride) in enumerate(zip(self.binnings, self._strides)):
            bins = binning._bins(binning._checked(labels[..., axis], precision, check), precision, 0)
            if not bins.is_floating_point():  # searched: -1 for no bin
                bins = bins.to(torch.float32).masked_fill_(bins < 0, float("nan"))
            if stride != 1:
                bins.mul_(stride)
            index = bins if index is None else index + bins
        return cast(torch.Tensor, index).nan_to_num_(nan=-1.0).long()  # set: a grid has at least one axis

    def _bins_from(self, labels, precision: str, check: bool, first: int) -> torch.Tensor:
        """``__call__``, for FDS and LDS as Binning._bins_from: with a grid their ``bucket_start``,
        ``first``, is 0 (both refuse any other at construction)."""
        return self(labels, precision=precision, check=check)

    def unravel(self, index: torch.Tensor) -> torch.Tensor:
        """The per-dimension bin numbers ``[..., d]`` (int64) of grid indices ``index`` (an integer
        tensor); an index outside ``[0, num_bins)``, such as the -1 of a label with no bin, gets -1
        in every dimension rather than wrapping into a real bin."""
        validate.tensor("index", index)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got {index.dtype}")
        index = index.long()  # int64 as every bin number: an unsigned dtype cannot hold -1
        outside = ((index < 0) | (index >= self.num_bins)).unsqueeze(-1)
        bins = torch.stack([(index // stride) % n for stride, n in zip(self._strides, self.shape)], dim=-1)
        return bins.masked_fill_(outside, -1)

    def along_each_axis(self, table: torch.Tensor, smooth: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``table`` (``[num_bins, ...]``, one row per grid bin) with ``smooth`` (a 1-D smoothing
        along dim 0 of ``[n, M]``) applied along each grid axis in turn: the separable smoothing
        LDS and FDS use over a grid."""
        validate.tensor("table", table)
        if table.dim() == 0 or table.shape[0] != self.num_bins:
            raise ValueError(f"table must have one row per grid bin, [{self.num_bins}, ...], got shape "
                             f"{tuple(table.shape)}")
        if not callable(smooth):
            raise TypeError(f"smooth must be a function of [n, M] tables, got {type(smooth).__name__}")
        grid = table.reshape(self.shape + tuple(table.shape[1:]))
        for axis, length in enumerate(self.shape):
            moved = grid.movedim(axis, 0)
            rows = moved.reshape(length, -1)
            smoothed = smooth(rows)
            if not isinstance(smoothed, torch.Tensor):
                raise TypeError(f"smooth must return a tensor (the smoothed [n, M] table), got "
                                f"{type(smoothed).__name__}")
            if smoothed.shape != rows.shape:
                raise ValueError(f"smooth must return a table of the shape it is given, {tuple(rows.shape)}, "
                                 f"got {tuple(smoothed.shape)}")
            grid = smoothed.reshape(moved.shape).movedim(0, axis)
        return grid.reshape(table.shape)


def check_binning(name: str, value, optional: bool = False):
    """``value`` when it is a :class:`Binning` or :class:`GridBinning` (or None, where ``optional``);
    TypeError naming ``name`` otherwise."""
    if not (isinstance(value, (Binning, GridBinning)) or (optional and value is None)):
        kinds = "None or a dirfast.Binning or GridBinning" if optional else "a dirfast.Binning or GridBinning"
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
    return value
