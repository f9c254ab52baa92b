"""Shot-region evaluation of the published DIR code (many-, medium- and few-shot errors), and
bin-uniform ("balanced") errors."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from . import _validate as validate
from ._types import ArrayLike
from .binning import Binning, GridBinning, check_binning

__all__ = ["REGIONS", "shot_metrics", "balanced_mae", "balanced_mse"]


def _values(name: str, values) -> np.ndarray:
    """``values`` as a float64 array of their own shape, refused when not all finite."""
    tensor = validate.readable(name, validate.real_tensor(name, values))
    array = tensor.detach().cpu().to(torch.float64).numpy()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite: found NaN or infinite values")
    return array


def _rows(name: str, values: np.ndarray, dim: int) -> np.ndarray:
    """``values`` as the ``[N, dim]`` rows of a GridBinning's labels (``[N]`` too when dim is 1)."""
    if values.ndim == 2 and values.shape[1] == dim:
        return values
    if values.ndim == 1 and dim == 1:
        return values[:, None]
    raise ValueError(f"{name} must be [N, {dim}] for a grid of {dim} dimensions, got shape {values.shape}")


def _samples(preds, labels, binning) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(preds, labels, errors)`` of one set of samples, checked: the predictions and labels as
    ``[N, d]`` rows for a GridBinning (flat otherwise), and one error per sample (``pred - label``
    on one dimension, the Euclidean distance over a grid of several); no samples at all is an
    error."""
    preds, labels = _values("preds", preds), _values("labels", labels)
    if not isinstance(binning, GridBinning):
        preds, labels = preds.reshape(-1), labels.reshape(-1)
        if preds.shape != labels.shape:
            raise ValueError(f"preds and labels must have the same number of values, got {preds.size} and "
                             f"{labels.size}")
        if labels.size == 0:
            raise ValueError("preds and labels must not be empty")
        return preds, labels, preds - labels
    preds, labels = _rows("preds", preds, binning.ndim), _rows("labels", labels, binning.ndim)
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels must have the same shape, got {preds.shape} and {labels.shape}")
    if labels.shape[0] == 0:
        raise ValueError("preds and labels must not be empty")
    errors = preds - labels
    return preds, labels, errors[:, 0] if binning.ndim == 1 else np.sqrt(np.sum(errors ** 2, axis=1))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r of two float64 vectors, NaN with fewer than two values or a constant one (as
    scipy.stats.pearsonr, which warns there)."""
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):  # on the values: a centred constant may not be 0
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    a, b = a / np.abs(a).max(), b / np.abs(b).max()  # norms near float64's limits neither overflow nor underflow
    return float(np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """The ranks 1..N of ``values``, tied values given the mean of their ranks (as
    scipy.stats.rankdata's default, what spearmanr ranks by)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    ends = np.append(starts[1:], values.size)
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def _region(errors: np.ndarray, exact_error: float, pairs=None) -> dict:
    """One region's errors; with ``pairs`` (its flat predictions and labels), their correlations."""
    if errors.size == 0:
        result = {"mse": float("nan"), "l1": float("nan"), "gmean": float("nan")}
    else:
        absolute = np.abs(errors)
        with np.errstate(divide="ignore"):  # with exact_error 0, an exact prediction makes the geometric mean 0
            gmean = float(np.exp(np.mean(np.log(np.where(absolute == 0, exact_error, absolute)))))
        result = {"mse": float(np.mean(errors ** 2)), "l1": float(np.mean(absolute)), "gmean": gmean}
    if pairs is not None:
        preds, labels = pairs
        result["pearson"] = _pearson(preds, labels)
        result["spearman"] = _pearson(_average_ranks(preds), _average_ranks(labels))
    return result


REGIONS = ("many", "median", "low")


def _region_of_bins(regions, num_bins: int) -> np.ndarray:
    """Region index (0 many, 1 median, 2 low) of each bin from ``{"many": bins, ...}``; bins
    that no region lists are few-shot, as in the published STS-B-DIR evaluator."""
    if not isinstance(regions, dict):
        raise TypeError(f"regions must be a dict of bin lists, got {type(regions).__name__}")
    if not set(regions) <= set(REGIONS):
        raise ValueError(f"regions must have keys among {REGIONS}, got {list(regions)!r}")
    of_bin = np.full(num_bins, 2)
    listed = set()
    for index, name in enumerate(REGIONS):
        bins = regions.get(name, ())
        if isinstance(bins, (str, bytes, dict)) or not isinstance(bins, Iterable) or (
                isinstance(bins, (np.ndarray, torch.Tensor)) and bins.ndim == 0):
            raise TypeError(f"regions[{name!r}] must be a list of bins, got {type(bins).__name__}")
        if isinstance(bins, (np.ndarray, torch.Tensor)) and bins.ndim != 1:
            raise ValueError(f"regions[{name!r}] must be a 1-D list of bins, got {bins.ndim} dimensions")
        if isinstance(bins, torch.Tensor):  # its elements as Python numbers (a 0-d tensor is not an int)
            bins = validate.readable(f"regions[{name!r}]", bins).tolist()
        for b in bins:
            b = validate.integer(f"regions[{name!r}]", b, 0, num_bins - 1)
            if b in listed:
                raise ValueError(f"regions list bin {b} in more than one region")
            listed.add(b)
            of_bin[b] = index
    return of_bin


def shot_metrics(preds: ArrayLike, labels: ArrayLike, train_labels: ArrayLike | None = None,
                 many_shot_thr: float = 100, low_shot_thr: float = 20, binning: Binning | GridBinning | None = None, *,
                 regions: dict[str, Iterable[int]] | None = None, exact_error: float = 0.0,
                 correlations: bool = False) -> dict[str, dict[str, float]]:
    """MSE, L1 and geometric-mean error over the many-, medium- and few-shot test labels.

    As the published code: each distinct test label is many-shot when the training set holds
    more than ``many_shot_thr`` samples of it (training labels cast to int), few-shot
    (``"low"``) below ``low_shot_thr``, medium-shot (``"median"``) otherwise. Each region's
    errors are averaged over its test samples; ``"overall"`` is over all of them. A region with
    no test sample gives NaN; no test samples at all is a ValueError.

    With ``binning`` (a :class:`~dirfast.Binning`), labels are grouped by bin instead of by
    exact value, which is what continuous labels need; they are binned as the published
    evaluators do (``precision="float32"``). ``regions`` (with ``binning``) gives the regions
    as bin lists instead, ``{"many": [...], "median": [...], "low": [...]}`` (unlisted bins are
    few-shot), as the published STS-B-DIR and NYUD2-DIR evaluators fix them; ``train_labels``
    is then not needed.

    With a :class:`~dirfast.GridBinning` (labels with ``d`` dimensions), ``preds``, ``labels``
    and ``train_labels`` are ``[N, d]``, the regions are grid bins, and each sample's error is
    its Euclidean distance to the label (``"mse"`` is the mean squared distance); on one
    dimension this is the 1-D result.

    ``exact_error`` is what the zero error of an exact prediction counts as in the geometric
    mean: 0 makes its region's ``"gmean"`` 0, as scipy's ``gmean`` in the AgeDB-DIR and
    IMDB-WIKI-DIR evaluators; the STS-B-DIR evaluator counts it as 1e-10 (``STS_B_DIR`` does).
    MSE and L1 are not affected.

    ``correlations=True`` adds each region's Pearson's r (``"pearson"``) and Spearman's rho
    (``"spearman"``, tied values ranked by their mean rank) of the predictions against the labels,
    as the STS-B-DIR evaluator reports them (scipy's ``pearsonr`` and ``spearmanr``); NaN for a
    region of fewer than two samples or with constant predictions or labels (the published
    evaluator gives 0 for a region of one sample or none). Labels of one dimension only.

    Returns ``{"many" | "median" | "low" | "overall": {"mse", "l1", "gmean"}}`` of floats (and
    ``"pearson"``, ``"spearman"`` with ``correlations``).
    """
    check_binning("binning", binning, optional=True)
    exact_error = validate.real("exact_error", exact_error, 0)
    correlations = validate.boolean("correlations", correlations)
    if correlations and isinstance(binning, GridBinning) and binning.ndim > 1:
        raise ValueError(f"correlations are of labels of one dimension: the grid has {binning.ndim}")
    many, low = validate.real("many_shot_thr", many_shot_thr), validate.real("low_shot_thr", low_shot_thr)
    if low > many:
        raise ValueError(f"low_shot_thr ({low_shot_thr}) must not exceed many_shot_thr ({many_shot_thr}): "
                         "the regions would overlap")
    preds, labels, errors = _samples(preds, labels, binning)
    # checked whenever given (with regions they are not needed)
    train = None if train_labels is None else _values("train_labels", train_labels)
    if regions is not None:
        if binning is None:
            raise ValueError("regions are bin lists: pass the binning they refer to")
        region = _region_of_bins(regions, binning.num_bins)[binning(labels, precision="float32").numpy()]
    else:
        if train is None:
            raise TypeError("shot_metrics() needs train_labels (or regions)")
        train = _rows("train_labels", train, binning.ndim) if isinstance(binning, GridBinning) else train.reshape(-1)
        if binning is None:
            if train.size and not np.abs(train).max() < 2.0 ** 63:  # astype(int) would wrap silently
                raise ValueError("train_labels must be within int64's range without a binning (their keys are "
                                 f"int(label), as published), got {np.abs(train).max():g}")
            test_keys, train_keys = labels, train.astype(int)
        else:
            test_keys = binning(labels, precision="float32").numpy()
            train_keys = binning(train, precision="float32").numpy()
        keys, inverse = np.unique(test_keys, return_inverse=True)
        # training count of each distinct test key (exact matches, as the published comparison)
        sorted_train = np.sort(train_keys)
        train_count = np.searchsorted(sorted_train, keys, side="right") - np.searchsorted(sorted_train, keys, side="left")
        count = train_count[inverse.reshape(-1)]
        region = np.where(count > many, 0, np.where(count < low, 2, 1))
    pairs = (preds.reshape(-1), labels.reshape(-1)) if correlations else None
    result = {}
    for index, name in enumerate(REGIONS):
        inside = region == index
        result[name] = _region(errors[inside], exact_error,
                               None if pairs is None else (pairs[0][inside], pairs[1][inside]))
    result["overall"] = _region(errors, exact_error, pairs)
    return result


def _balanced_error(preds, labels, binning, power: int) -> float:
    """The mean over the bins holding test labels of each bin's mean ``error ** power``."""
    check_binning("binning", binning)
    _, labels, errors = _samples(preds, labels, binning)
    # the labels are finite (_samples), so each has a bin: no -1, which bincount refuses
    bins = binning(labels, precision="float32").numpy()
    total = np.bincount(bins, weights=np.abs(errors) ** power, minlength=binning.num_bins)
    count = np.bincount(bins, minlength=binning.num_bins)
    seen = count > 0
    return float(np.mean(total[seen] / count[seen]))


def balanced_mae(preds: ArrayLike, labels: ArrayLike, binning: Binning | GridBinning) -> float:
    """Bin-uniform ("balanced") mean absolute error: every bin that holds test ``labels`` weighs
    the same, whatever its number of samples, as on a test set with uniform labels.

    The mean over those bins of each bin's mean ``|pred - label|``. Labels are binned as in
    :func:`shot_metrics` (``precision="float32"``); with a :class:`~dirfast.GridBinning`,
    ``preds`` and ``labels`` are ``[N, d]`` and the error is the Euclidean distance. NaN or
    infinite values, differing sizes and no values at all raise ValueError.
    """
    return _balanced_error(preds, labels, binning, 1)


def balanced_mse(preds: ArrayLike, labels: ArrayLike, binning: Binning | GridBinning) -> float:
    """Bin-uniform ("balanced") mean squared error: :func:`balanced_mae` with each bin's mean
    squared error."""
    return _balanced_error(preds, labels, binning, 2)
