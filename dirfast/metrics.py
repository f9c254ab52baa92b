"""Shot-region evaluation of the published DIR code: many-, medium- and few-shot errors."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["shot_metrics"]


def _numpy(name: str, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite: found NaN or infinite values")
    return array


def _region(errors: np.ndarray) -> dict:
    if errors.size == 0:
        return {"mse": float("nan"), "l1": float("nan"), "gmean": float("nan")}
    absolute = np.abs(errors)
    with np.errstate(divide="ignore"):  # an exact prediction makes the geometric mean 0
        gmean = float(np.exp(np.mean(np.log(absolute))))
    return {"mse": float(np.mean(errors ** 2)), "l1": float(np.mean(absolute)), "gmean": gmean}


def shot_metrics(preds, labels, train_labels, many_shot_thr: int = 100, low_shot_thr: int = 20,
                 binning=None) -> dict:
    """MSE, L1 and geometric-mean error over the many-, medium- and few-shot test labels.

    As the published code: each distinct test label is many-shot when the training set holds
    more than ``many_shot_thr`` samples of it (training labels cast to int), few-shot
    (``"low"``) below ``low_shot_thr``, medium-shot (``"median"``) otherwise. Each region's
    errors are averaged over its test samples; ``"overall"`` is over all of them. A region with
    no test sample gives NaN.

    With ``binning`` (a :class:`~dirfast.Binning`), labels are grouped by bin instead of by
    exact value, which is what continuous labels need.

    Returns ``{"many" | "median" | "low" | "overall": {"mse", "l1", "gmean"}}`` of floats.
    """
    preds, labels = _numpy("preds", preds), _numpy("labels", labels)
    train = _numpy("train_labels", train_labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels must have the same number of values, got {preds.size} and {labels.size}")
    if binning is None:
        test_keys, train_keys = labels, train.astype(int)
    else:
        test_keys, train_keys = binning(labels).numpy(), binning(train).numpy()
    keys, inverse = np.unique(test_keys, return_inverse=True)
    # training count of each distinct test key (exact matches, as the published comparison)
    sorted_train = np.sort(train_keys)
    train_count = np.searchsorted(sorted_train, keys, side="right") - np.searchsorted(sorted_train, keys, side="left")
    count_of_sample = train_count[inverse]
    errors = preds - labels
    regions = {
        "many": count_of_sample > many_shot_thr,
        "median": (count_of_sample <= many_shot_thr) & (count_of_sample >= low_shot_thr),
        "low": count_of_sample < low_shot_thr,
    }
    result = {name: _region(errors[mask]) for name, mask in regions.items()}
    result["overall"] = _region(errors)
    return result
