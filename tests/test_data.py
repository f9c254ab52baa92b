"""The published outputs on the real AgeDB-DIR and STS-B-DIR labels, in float64 and float32.

The label files live in ../shared/data (team machines only); every test here skips cleanly
when they are absent, as on a user's machine. The published functions are transcribed in
benchmarks/published.py; the STS-B-DIR scores are read as the published loader reads them (np.float32) and
as NumPy or pandas would (float64), since the published bins depend on that.
"""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

import dirfast
from benchmarks import published
from benchmarks import real_labels
from dirfast.presets import AGEDB_DIR, STS_B_DIR
from testing import gen

SCORE_DTYPES = [np.float64, np.float32]


def agedb(split):
    ages = real_labels.agedb_ages(split)
    if ages is None:
        pytest.skip(f"AgeDB-DIR labels not found at {real_labels.AGEDB}")
    return ages


def stsb_scores(split="train", dtype=np.float32):
    """The published loader's reading (:func:`real_labels.stsb_scores`), or a skip."""
    scores = real_labels.stsb_scores(split, dtype)
    if scores is None:
        pytest.skip(f"STS-B-DIR data not found at {real_labels.stsb_path(split)}")
    return scores


CASES = [("sqrt_inv", True, "gaussian"), ("sqrt_inv", True, "triang"), ("sqrt_inv", True, "laplace"),
         ("inverse", True, "gaussian"), ("inverse", True, "triang"), ("inverse", True, "laplace"),
         ("sqrt_inv", False, "gaussian"), ("inverse", False, "gaussian")]


# =========================================================================== AgeDB-DIR
@pytest.mark.parametrize("reweight, lds, kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float32], ids=str)
def test_agedb_lds_weights(reweight, lds, kernel, dtype):
    ages = agedb("train")
    assert len(ages) > 10000
    expected = published.published_lds_weights_integer(ages, reweight, 121, lds, kernel, 5, 2)
    got = dirfast.lds_weights(torch.tensor(ages, dtype=dtype), dirfast.Binning.integer(121), reweight=reweight,
                              lds=lds, kernel=kernel)
    assert got.dtype == torch.float32 and got.shape == (len(ages),)
    np.testing.assert_array_equal(got.numpy(), expected)  # the same bits
    # and through the estimator, fitted once and applied to the float targets of a batch: scaled
    # by a sum of the counts, not of the weights in sample order, to float32 rounding
    est = AGEDB_DIR.lds(reweight=reweight, lds=lds, kernel=kernel).fit(ages)
    pick = torch.randperm(len(ages), generator=gen(0))[:256].numpy()
    np.testing.assert_allclose(est.weights(torch.tensor(ages[pick], dtype=torch.float32)).numpy(),
                               expected[pick], rtol=1e-6, atol=0)


def test_agedb_inverse_truncation_matters():
    """On the real ages the truncation quirk changes the published inverse-LDS weights."""
    ages = agedb("train")
    prep = published.published_prepare_integer(ages, "inverse", 121, lds=True)
    base = np.clip(np.bincount(ages, minlength=121), 5, 1000).astype(np.float64)
    from scipy.ndimage import convolve1d

    smooth = convolve1d(base, published.lds_window("gaussian", 5, 2), mode="constant")
    assert not np.array_equal(prep["effective"], smooth)
    est = dirfast.LDS(dirfast.Binning.integer(121), reweight="inverse").fit(torch.tensor(ages))
    np.testing.assert_array_equal(est.effective.numpy(), prep["effective"])


def test_agedb_shot_metrics():
    train, test = agedb("train"), agedb("test")
    preds = test + np.random.default_rng(0).normal(0, 7, len(test))
    got = AGEDB_DIR.shot_metrics(torch.tensor(preds), torch.tensor(test, dtype=torch.float64), torch.tensor(train))
    expected = published.shot_metrics(preds, test, train)
    for region in ("many", "median", "low", "overall"):
        for m in ("mse", "l1", "gmean"):
            assert got[region][m] == pytest.approx(expected[region][m], rel=1e-9), (region, m)


# =========================================================================== STS-B-DIR
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_stsb_bins_of_every_path(dtype, split):
    """Every score of every split: the LDS weights' bins (tasks.py, the scores' own dtype), the
    FDS buckets (fds.py, float32) and the evaluator's bins (util.py, float32)."""
    scores = stsb_scores(split, dtype)
    binning = STS_B_DIR.lds_binning
    np.testing.assert_array_equal(binning(scores).numpy(), published.published_stsb_weight_bins(scores))
    fds_buckets = [published.published_stsb_fds_bucket(s) for s in scores]
    np.testing.assert_array_equal(binning(scores, precision="float32").numpy(), fds_buckets)
    np.testing.assert_array_equal(binning(torch.from_numpy(scores), precision="float32").numpy(),
                                  [published.published_stsb_eval_bin(s) for s in torch.from_numpy(scores).float().tolist()])


def test_stsb_float64_scores_move_bins():
    """Read as float64, a quarter of the training scores sit in another bin for the published
    LDS weights than for the published FDS (0.6 does, 0.2 does not): the paths must stay apart."""
    scores = stsb_scores("train", np.float64)
    binning = STS_B_DIR.lds_binning
    moved = binning(scores).numpy() != binning(scores, precision="float32").numpy()
    assert 0.2 < moved.mean() < 0.3


@pytest.mark.parametrize("reweight, lds, kernel", CASES)
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=lambda d: d.__name__)
def test_stsb_lds_weights(reweight, lds, kernel, dtype):
    scores = stsb_scores("train", dtype)
    assert len(scores) > 5000 and scores.min() >= 0 and scores.max() <= 5
    prep = published.published_prepare_stsb(scores, reweight, lds, kernel, 5, 2)
    got = dirfast.lds_weights(scores, dirfast.Binning.uniform(0, 5, 50), reweight=reweight, lds=lds,
                              kernel=kernel, inverse_clip=None)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, prep["weights"])  # the same bits
    if (reweight, lds, kernel) == ("inverse", True, "gaussian"):  # the preset: the README's LDS command
        np.testing.assert_array_equal(STS_B_DIR.lds_weights(scores), prep["weights"])
        est = STS_B_DIR.lds().fit(torch.from_numpy(scores))
        np.testing.assert_array_equal(est.empirical.numpy(), prep["counts"])


@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=lambda d: d.__name__)
def test_stsb_fds_buckets(dtype):
    """FDS counts every training score in the bucket of the published fds.py, whatever dtype
    the scores come in."""
    scores = stsb_scores("train", dtype)
    fds = STS_B_DIR.fds(feature_dim=2)
    fds.update_running_stats(torch.randn(len(scores), 2, generator=gen(1)), torch.from_numpy(scores), 0)
    expected = np.bincount([published.published_stsb_fds_bucket(s) for s in scores], minlength=50)
    np.testing.assert_array_equal(fds.num_samples_tracked.numpy(), expected)


def test_stsb_shot_regions_are_the_published_lists():
    """Bins with more than 100 / fewer than 30 training scores (float32 binning) are exactly
    the many / few lists of the published STSShotAverage, so the evaluation regions agree, and
    STS_B_DIR.shot_metrics gives its metrics in each (Pearson and Spearman included)."""
    train, test = stsb_scores("train"), stsb_scores("test")
    counts = np.bincount(STS_B_DIR.fds_binning(train, precision="float32").numpy(), minlength=50)
    assert [b for b in range(50) if counts[b] > 100] == published.STSB_SHOT_BINS["many"]
    assert [b for b in range(50) if counts[b] < 30] == published.STSB_SHOT_BINS["few"]
    preds = test + np.random.default_rng(1).normal(0, 0.8, len(test)).astype(np.float32)
    preds = np.clip(preds, 0, 5)  # as published runs score: some predictions exact (0 and 5)
    assert np.any(preds == test)
    got = STS_B_DIR.shot_metrics(preds, test, train)
    test_bins = np.array([published.published_stsb_eval_bin(v) for v in test.tolist()])
    for region, key in (("many", "many"), ("median", "medium"), ("low", "few"), ("overall", None)):
        mask = np.isin(test_bins, published.STSB_SHOT_BINS[key]) if key else np.ones(len(test), bool)
        p, t = preds[mask].astype(np.float64), test[mask].astype(np.float64)
        assert got[region]["mse"] == pytest.approx(np.mean((p - t) ** 2), rel=1e-9)
        assert got[region]["l1"] == pytest.approx(np.mean(np.abs(p - t)), rel=1e-9)
        assert got[region]["gmean"] == pytest.approx(published.published_stsb_gmean(p, t), rel=1e-9)
        # the evaluator's pearsonr and spearmanr (scipy's), in every region of the real scores
        assert got[region]["pearson"] == pytest.approx(pearsonr(p, t)[0], rel=1e-9)
        assert got[region]["spearman"] == pytest.approx(spearmanr(p, t)[0], rel=1e-9)
