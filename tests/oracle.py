"""An independent, deliberately plain implementation of what the published DIR code computes.

Written from the published code (YyzHarry/imbalanced-regression, MIT), with Python loops wherever a loop
reads more clearly than a vectorised expression: it is the definition of correctness for the
tests, not a fast path. Nothing here imports dirfast.

The published FDS module itself (update_running_stats / update_last_epoch_stats / smooth, with
the snapshot aliasing quirk) is not rewritten here: tests import ``PublishedFDS`` from
``published.py``. The loop oracles of the ops live in their tests (tests/test_<op>.py).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from scipy.ndimage import convolve1d, gaussian_filter1d
from scipy.signal.windows import triang
from scipy.stats import gmean


# ============================================================================ kernel windows
def lds_window(kernel: str, ks: int, sigma: float) -> np.ndarray:
    """The published LDS ``get_lds_kernel_window`` (max-normalised; triang as scipy gives it)."""
    assert kernel in ["gaussian", "triang", "laplace"]
    half_ks = (ks - 1) // 2
    if kernel == "gaussian":
        base_kernel = [0.0] * half_ks + [1.0] + [0.0] * half_ks
        kernel_window = gaussian_filter1d(base_kernel, sigma=sigma) / max(gaussian_filter1d(base_kernel, sigma=sigma))
    elif kernel == "triang":
        kernel_window = triang(ks)
    else:
        laplace = lambda x: np.exp(-abs(x) / sigma) / (2.0 * sigma)  # noqa: E731
        values = [laplace(k) for k in range(-half_ks, half_ks + 1)]
        kernel_window = np.array(values) / max(values)
    return np.asarray(kernel_window, dtype=np.float64)


def fds_window(kernel: str, ks: int, sigma: float) -> np.ndarray:
    """The published FDS window: the same three shapes, normalised by their sum (float64 here;
    the published module builds the gaussian from a float32 delta and stores float32)."""
    assert kernel in ["gaussian", "triang", "laplace"]
    half_ks = (ks - 1) // 2
    if kernel == "gaussian":
        base = np.array([0.0] * half_ks + [1.0] + [0.0] * half_ks)
        w = gaussian_filter1d(base, sigma=sigma)
    elif kernel == "triang":
        w = triang(ks)
    else:
        w = np.array([np.exp(-abs(k) / sigma) / (2.0 * sigma) for k in range(-half_ks, half_ks + 1)])
    return np.asarray(w, dtype=np.float64) / np.sum(w)


# ============================================================================ binning
def integer_bin(label, num_bins: int) -> int:
    """SPEC: ``b(y) = min(B - 1, int(y))``; dirfast additionally clamps below at 0."""
    return max(0, min(num_bins - 1, int(label)))


def histogram_edges(low: float, high: float, num_bins: int, dtype=np.float64) -> np.ndarray:
    """numpy's histogram edges for labels of ``dtype`` (float32 labels give float32 edges)."""
    return np.histogram(np.array([], dtype=dtype), bins=num_bins, range=(low, high))[1]


def edges_bin(label, edges: np.ndarray) -> int:
    """The published rule: the first edge strictly greater than ``y``, minus 1; ``y`` equal to
    the last edge goes to the last bin. Out-of-range labels are clamped (dirfast's choice)."""
    num_bins = len(edges) - 1
    if label == edges[-1]:
        return num_bins - 1
    greater = [i for i, e in enumerate(edges) if e > label]
    if not greater:
        return num_bins - 1
    return min(max(greater[0] - 1, 0), num_bins - 1)


# ------------------------------------------------------- the published binning functions
# Transcribed from YyzHarry/imbalanced-regression (MIT), with the label dtype left to the caller.
def published_stsb_weight_bins(targs, bins=50):
    """sts-b-dir/tasks.py ``load_tsv``: np.histogram of the labels as given, then get_bin_idx
    (float64 labels against float64 edges, float32 against float32)."""
    _, bins_edges = np.histogram(targs, bins=bins, range=(0.0, 5.0))

    def get_bin_idx(label):
        if label == 5.0:
            return bins - 1
        else:
            return np.where(bins_edges > label)[0][0] - 1

    return np.array([get_bin_idx(label) for label in targs])


def published_stsb_fds_bucket(label, bucket_num=50, bucket_start=0):
    """sts-b-dir/fds.py ``FDS._get_bucket_idx``: the label cast to float32, float32 edges."""
    label = np.float32(label)
    _, bins_edges = np.histogram(a=np.array([], dtype=np.float32), bins=bucket_num, range=(0.0, 5.0))
    if label == 5.0:
        return bucket_num - 1
    else:
        return max(np.where(bins_edges > label)[0][0] - 1, bucket_start)


def published_stsb_eval_bin(label, num_bins=50):
    """sts-b-dir/util.py ``STSShotAverage.get_bin_idx`` (labels arrive through ``tolist()``)."""
    _, bins_edges = np.histogram(a=np.array([], dtype=np.float32), bins=num_bins, range=(0.0, 5.0))
    if label == 5.0:
        return num_bins - 1
    else:
        return np.where(bins_edges > label)[0][0] - 1


# sts-b-dir/util.py STSShotAverage._shot_idx
STSB_SHOT_BINS = {
    "many": [0, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 49],
    "medium": [2, 4, 6, 8, 27, 35, 37],
    "few": [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 29, 31, 33, 39, 41, 43, 45, 47],
}


def published_nyud2_bin(x):
    """nyud2-dir/util.py and loaddata.py ``get_bin_idx``: ``min(int(x * np.float32(10)), 99)``."""
    return min(int(x * np.float32(10)), 99)


def published_nyud2_bucket_weights(train_bucket_num, reweight, lds, lds_kernel="gaussian", lds_ks=5, lds_sigma=2,
                                   bucket_start=7, bucket_num=100):
    """nyud2-dir/loaddata.py ``depthDataset._get_bucket_weights`` with the bucket counts given."""
    assert reweight in {"none", "inverse", "sqrt_inv"}
    if reweight == "none":
        return None
    TRAIN_BUCKET_NUM = list(train_bucket_num)
    if lds:
        value_lst = TRAIN_BUCKET_NUM[bucket_start:]
        lds_kernel_window = lds_window(lds_kernel, lds_ks, lds_sigma)
        if reweight == "sqrt_inv":
            value_lst = np.sqrt(value_lst)
        smoothed_value = convolve1d(np.asarray(value_lst), weights=lds_kernel_window, mode="reflect")
        smoothed_value = [smoothed_value[0]] * bucket_start + list(smoothed_value)
        scaling = np.sum(TRAIN_BUCKET_NUM) / np.sum(np.array(TRAIN_BUCKET_NUM) / np.array(smoothed_value))
        bucket_weights = [np.float32(scaling / smoothed_value[bucket]) for bucket in range(bucket_num)]
    else:
        value_lst = [TRAIN_BUCKET_NUM[bucket_start]] * bucket_start + TRAIN_BUCKET_NUM[bucket_start:]
        if reweight == "sqrt_inv":
            value_lst = np.sqrt(value_lst)
        scaling = np.sum(TRAIN_BUCKET_NUM) / np.sum(np.array(TRAIN_BUCKET_NUM) / np.array(value_lst))
        bucket_weights = [np.float32(scaling / value_lst[bucket]) for bucket in range(bucket_num)]
    return bucket_weights


# nyud2-dir/util.py Evaluator.shot_idx
NYUD2_SHOT_BINS = {
    "many": [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
             28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 47, 49],
    "medium": [7, 8, 46, 48, 50, 51, 52, 53, 54, 55, 56, 58, 60, 61, 63],
    "few": [0, 1, 2, 3, 4, 5, 6, 57, 59, 62, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77,
            78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99],
}


# ============================================================================ LDS (published)
def published_prepare_integer(labels, reweight, max_target=121, lds=False, lds_kernel="gaussian",
                              lds_ks=5, lds_sigma=2, clip=(5, 1000)):
    """The AgeDB-DIR / IMDB-WIKI-DIR ``_prepare_weights``, step by step.

    Returns a dict with ``counts`` (c), ``effective`` (e, the array the weights index) and
    ``weights`` (float32 array, or None for reweight="none").
    """
    assert reweight in {"none", "inverse", "sqrt_inv"}
    assert reweight != "none" if lds else True, "Set reweight to 'sqrt_inv' or 'inverse' when using LDS"

    value_dict = {x: 0 for x in range(max_target)}
    for label in labels:
        value_dict[min(max_target - 1, int(label))] += 1
    counts = np.array([value_dict[k] for k in range(max_target)], dtype=np.int64)
    if reweight == "sqrt_inv":
        value_dict = {k: np.sqrt(v) for k, v in value_dict.items()}
    elif reweight == "inverse":
        value_dict = {k: np.clip(v, clip[0], clip[1]) for k, v in value_dict.items()}
    num_per_label = [value_dict[min(max_target - 1, int(label))] for label in labels]
    effective = np.asarray([v for _, v in value_dict.items()])
    if not len(num_per_label) or reweight == "none":
        return dict(counts=counts, effective=effective, weights=None)

    if lds:
        window = lds_window(lds_kernel, lds_ks, lds_sigma)
        # int64 input -> int64 output: the truncation quirk of SPEC.md
        smoothed_value = convolve1d(np.asarray([v for _, v in value_dict.items()]), weights=window, mode="constant")
        num_per_label = [smoothed_value[min(max_target - 1, int(label))] for label in labels]
        effective = smoothed_value

    weights = [np.float32(1 / x) for x in num_per_label]
    scaling = len(weights) / np.sum(weights)
    weights = [scaling * x for x in weights]
    return dict(counts=counts, effective=effective, weights=np.asarray(weights).astype(np.float32))


def published_lds_weights_integer(labels, reweight="sqrt_inv", max_target=121, lds=False,
                                  lds_kernel="gaussian", lds_ks=5, lds_sigma=2):
    return published_prepare_integer(labels, reweight, max_target, lds, lds_kernel, lds_ks, lds_sigma)["weights"]


def published_prepare_stsb(targs, reweight, lds=False, lds_kernel="gaussian", lds_ks=5, lds_sigma=2, bins=50):
    """The STS-B-DIR ``load_tsv`` weights: np.histogram over [0, 5] with ``bins`` bins on the
    labels as given (the published loader makes them np.float32), no clip for inverse."""
    assert reweight in {"inverse", "sqrt_inv"}
    targs = list(targs)
    value_lst, bins_edges = np.histogram(targs, bins=bins, range=(0.0, 5.0))
    counts = np.asarray(value_lst, dtype=np.int64)

    def get_bin_idx(label):
        if label == 5.0:
            return bins - 1
        else:
            return np.where(bins_edges > label)[0][0] - 1

    if reweight == "sqrt_inv":
        value_lst = [np.sqrt(x) for x in value_lst]
    num_per_label = [value_lst[get_bin_idx(label)] for label in targs]
    effective = np.asarray(value_lst)

    if lds:
        window = lds_window(lds_kernel, lds_ks, lds_sigma)
        smoothed_value = convolve1d(value_lst, weights=window, mode="constant")
        num_per_label = [smoothed_value[get_bin_idx(label)] for label in targs]
        effective = smoothed_value

    weights = [np.float32(1 / x) for x in num_per_label]
    scaling = len(weights) / np.sum(weights)
    weights = [scaling * x for x in weights]
    return dict(counts=counts, effective=effective, weights=np.asarray(weights).astype(np.float32),
                bin_idx=np.array([get_bin_idx(t) for t in targs]))


# ============================================================================ FDS helpers
def fill_empty(running_mean: torch.Tensor, running_var: torch.Tensor, present_buckets, bucket_start, bucket_num):
    """The STS-B code's fill of buckets with no sample in this update, in increasing order,
    each from its neighbours as they are at that moment (in place, like the published code)."""
    present = set(int(b) for b in present_buckets)
    for bucket in range(bucket_start, bucket_num):
        if bucket in present:
            continue
        k = bucket - bucket_start
        if bucket == bucket_start:
            running_mean[0] = running_mean[1]
            running_var[0] = running_var[1]
        elif bucket == bucket_num - 1:
            running_mean[k] = running_mean[k - 1]
            running_var[k] = running_var[k - 1]
        else:
            running_mean[k] = (running_mean[k - 1] + running_mean[k + 1]) / 2.0
            running_var[k] = (running_var[k - 1] + running_var[k + 1]) / 2.0


# ============================================================================ losses
def _focal(diff_abs, activate, beta, gamma):
    if activate == "tanh":
        return torch.tanh(beta * diff_abs) ** gamma
    return (2 * torch.sigmoid(beta * diff_abs) - 1) ** gamma


def _reduce(loss, weights):
    if weights is not None:
        loss = loss * weights.expand_as(loss)
    return torch.mean(loss)


def weighted_mse_loss(inputs, targets, weights=None):
    return _reduce((inputs - targets) ** 2, weights)


def weighted_l1_loss(inputs, targets, weights=None):
    return _reduce(torch.abs(inputs - targets), weights)


def weighted_focal_mse_loss(inputs, targets, activate="sigmoid", beta=0.2, gamma=1, weights=None):
    d = torch.abs(inputs - targets)
    return _reduce(d**2 * _focal(d, activate, beta, gamma), weights)


def weighted_focal_l1_loss(inputs, targets, activate="sigmoid", beta=0.2, gamma=1, weights=None):
    d = torch.abs(inputs - targets)
    return _reduce(d * _focal(d, activate, beta, gamma), weights)


def weighted_huber_loss(inputs, targets, beta=1.0, weights=None):
    d = torch.abs(inputs - targets)
    loss = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)
    return _reduce(loss, weights)


# ============================================================================ shot metrics
def shot_metrics(preds, labels, train_labels, many_shot_thr=100, low_shot_thr=20):
    """The published agedb-dir ``shot_metrics`` (numpy), plus ``overall``; a region without a
    test sample gives NaN (where the published code divides 0 by 0 or fails in gmean)."""
    train_labels = np.array(train_labels).astype(int)
    preds = np.asarray(preds, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)

    train_class_count, test_class_count = [], []
    mse_per_class, l1_per_class, l1_all_per_class = [], [], []
    for l in np.unique(labels):
        train_class_count.append(len(train_labels[train_labels == l]))
        test_class_count.append(len(labels[labels == l]))
        mse_per_class.append(np.sum((preds[labels == l] - labels[labels == l]) ** 2))
        l1_per_class.append(np.sum(np.abs(preds[labels == l] - labels[labels == l])))
        l1_all_per_class.append(np.abs(preds[labels == l] - labels[labels == l]))

    region = {"many": defaultdict(list), "median": defaultdict(list), "low": defaultdict(list)}
    for i in range(len(train_class_count)):
        if train_class_count[i] > many_shot_thr:
            r = region["many"]
        elif train_class_count[i] < low_shot_thr:
            r = region["low"]
        else:
            r = region["median"]
        r["mse"].append(mse_per_class[i])
        r["l1"].append(l1_per_class[i])
        r["gmean"] += list(l1_all_per_class[i])
        r["cnt"].append(test_class_count[i])

    shot_dict = defaultdict(dict)
    for name, r in region.items():
        if np.sum(r["cnt"]) == 0:
            shot_dict[name] = {"mse": float("nan"), "l1": float("nan"), "gmean": float("nan")}
            continue
        shot_dict[name]["mse"] = float(np.sum(r["mse"]) / np.sum(r["cnt"]))
        shot_dict[name]["l1"] = float(np.sum(r["l1"]) / np.sum(r["cnt"]))
        shot_dict[name]["gmean"] = float(gmean(np.hstack(r["gmean"]), axis=None).astype(float))
    err = np.abs(preds - labels)
    shot_dict["overall"] = {"mse": float(np.mean(err**2)), "l1": float(np.mean(err)),
                            "gmean": float(gmean(err, axis=None))}
    return dict(shot_dict)
