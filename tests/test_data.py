"""LDS weights and shot metrics on the real AgeDB-DIR and STS-B-DIR labels.

The label files live in ../shared/data (team machines only); every test here skips cleanly
when they are absent, as on a user's machine.
"""

import csv
import os

import numpy as np
import pytest
import torch

import dirfast
import oracle
from testing import gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
AGEDB = os.path.join(DATA, "agedb-dir-labels.csv")
STSB_TRAIN = os.path.join(DATA, "sts-b-dir", "train_new.tsv")


def agedb(split):
    if not os.path.isfile(AGEDB):
        pytest.skip(f"AgeDB-DIR labels not found at {AGEDB}")
    with open(AGEDB, newline="") as fh:
        ages = [int(row["age"]) for row in csv.DictReader(fh) if row["split"] == split]
    return np.array(ages, dtype=np.int64)


def stsb_train_scores():
    """As the published loader: skip the header, split on tabs, column `score` as np.float32,
    rows without a score skipped."""
    if not os.path.isfile(STSB_TRAIN):
        pytest.skip(f"STS-B-DIR data not found at {STSB_TRAIN}")
    with open(STSB_TRAIN, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        col = header.index("score")
        scores = []
        for line in fh:
            row = line.strip().split("\t")
            if len(row) > col and row[col]:
                scores.append(np.float32(row[col]))
    return np.array(scores, dtype=np.float32)


CASES = [("sqrt_inv", True, "gaussian"), ("sqrt_inv", True, "triang"), ("sqrt_inv", True, "laplace"),
         ("inverse", True, "gaussian"), ("inverse", True, "triang"), ("inverse", True, "laplace"),
         ("sqrt_inv", False, "gaussian"), ("inverse", False, "gaussian")]


@pytest.mark.parametrize("reweight, lds, kernel", CASES)
def test_agedb_lds_weights(reweight, lds, kernel):
    ages = agedb("train")
    assert len(ages) > 10000
    expected = oracle.published_lds_weights_integer(ages, reweight, 121, lds, kernel, 5, 2)
    got = dirfast.lds_weights(torch.tensor(ages), dirfast.Binning.integer(121), reweight=reweight, lds=lds,
                              kernel=kernel)
    assert got.dtype == torch.float32 and got.shape == (len(ages),)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=0)
    # and through the estimator, fitted once and applied to the float targets of a batch
    est = dirfast.LDS(dirfast.Binning.integer(121), reweight=reweight, lds=lds, kernel=kernel).fit(
        torch.tensor(ages, dtype=torch.float32))
    pick = torch.randperm(len(ages), generator=gen(0))[:256]
    np.testing.assert_allclose(est.weights(torch.tensor(ages[pick.numpy()], dtype=torch.float32)).numpy(),
                               expected[pick.numpy()], rtol=1e-6, atol=0)


def test_agedb_inverse_truncation_matters():
    """On the real ages the truncation quirk changes the published inverse-LDS weights."""
    ages = agedb("train")
    prep = oracle.published_prepare_integer(ages, "inverse", 121, lds=True)
    base = np.clip(np.bincount(ages, minlength=121), 5, 1000).astype(np.float64)
    from scipy.ndimage import convolve1d

    smooth = convolve1d(base, oracle.lds_window("gaussian", 5, 2), mode="constant")
    assert not np.array_equal(prep["effective"], smooth)
    est = dirfast.LDS(dirfast.Binning.integer(121), reweight="inverse").fit(torch.tensor(ages))
    np.testing.assert_array_equal(est.effective.numpy(), prep["effective"])


def test_agedb_shot_metrics():
    train, test = agedb("train"), agedb("test")
    preds = test + np.random.default_rng(0).normal(0, 7, len(test))
    got = dirfast.metrics.shot_metrics(torch.tensor(preds), torch.tensor(test, dtype=torch.float64),
                                       torch.tensor(train))
    expected = oracle.shot_metrics(preds, test, train)
    for region in ("many", "median", "low", "overall"):
        for m in ("mse", "l1", "gmean"):
            assert got[region][m] == pytest.approx(expected[region][m], rel=1e-9), (region, m)


@pytest.mark.parametrize("reweight, lds, kernel", CASES)
def test_stsb_lds_weights(reweight, lds, kernel):
    scores = stsb_train_scores()
    assert len(scores) > 5000 and scores.min() >= 0 and scores.max() <= 5
    prep = oracle.published_prepare_stsb(scores, reweight, lds, kernel, 5, 2)
    got = dirfast.lds_weights(torch.tensor(scores), dirfast.Binning.uniform(0, 5, 50), reweight=reweight, lds=lds,
                              kernel=kernel, inverse_clip=None)
    np.testing.assert_allclose(got.numpy(), prep["weights"], rtol=1e-6, atol=0)


def test_stsb_bins():
    """The published float32 edges put every 0.1-multiple score in the bin above the edge."""
    scores = stsb_train_scores()
    prep = oracle.published_prepare_stsb(scores, "sqrt_inv", False)
    got = dirfast.Binning.uniform(0, 5, 50)(torch.tensor(scores))
    np.testing.assert_array_equal(got.numpy(), prep["bin_idx"])
    est = dirfast.LDS(dirfast.Binning.uniform(0, 5, 50), inverse_clip=None).fit(torch.tensor(scores))
    np.testing.assert_array_equal(est.empirical.numpy(), prep["counts"])
