"""dirfast.metrics.shot_metrics against the published agedb-dir shot_metrics (benchmarks/published.py)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import gmean

import dirfast
from benchmarks import published
from testing import gen, skewed_int_labels

REGIONS = ["many", "median", "low", "overall"]
METRICS = ["mse", "l1", "gmean"]


def assert_same_metrics(got, expected, rtol=1e-6):
    assert set(got) == set(REGIONS)
    for region in REGIONS:
        assert set(got[region]) == set(METRICS), region
        for m in METRICS:
            g, e = got[region][m], expected[region][m]
            assert isinstance(g, float), (region, m, type(g))
            if math.isnan(e):
                assert math.isnan(g), (region, m, g)
            else:
                assert g == pytest.approx(e, rel=rtol, abs=1e-12), (region, m)


def age_data(seed=0):
    train = skewed_int_labels(4000, 0, 120, seed=seed, dtype=torch.float64)
    test = skewed_int_labels(600, 0, 120, seed=seed + 1, dtype=torch.float64)
    preds = test + torch.randn(600, generator=gen(seed + 2), dtype=torch.float64) * 5
    return preds, test, train


def test_age_data_has_all_regions():
    _, test, train = age_data()
    counts = [int((train.long() == int(l)).sum()) for l in test.unique()]
    assert max(counts) > 100 and min(counts) < 20 and any(20 <= c <= 100 for c in counts)


@pytest.mark.parametrize("kind", ["torch", "numpy", "torch_column", "float32"])
def test_shot_metrics_matches_published(kind):
    preds, test, train = age_data()
    expected = published.shot_metrics(preds.numpy(), test.numpy(), train.numpy())
    if kind == "numpy":
        args = preds.numpy(), test.numpy(), train.numpy()
    elif kind == "torch_column":
        args = preds.unsqueeze(1), test.unsqueeze(1), train
    elif kind == "float32":
        args = preds.float(), test.float(), train.float()
        expected = published.shot_metrics(preds.float().numpy(), test.float().numpy(), train.numpy())
    else:
        args = preds, test, train
    got = dirfast.metrics.shot_metrics(*args)
    assert_same_metrics(got, expected, rtol=1e-6 if kind != "float32" else 1e-5)


@pytest.mark.parametrize("many, low", [(100, 20), (50, 5), (200, 100), (30, 30)])
def test_shot_metrics_thresholds(many, low):
    preds, test, train = age_data(seed=3)
    got = dirfast.metrics.shot_metrics(preds, test, train, many_shot_thr=many, low_shot_thr=low)
    assert_same_metrics(got, published.shot_metrics(preds.numpy(), test.numpy(), train.numpy(), many, low))


def test_shot_metrics_train_labels_cast_to_int():
    """Training labels are cast to int before counting (30.7 counts for label 30)."""
    train = np.array([30.7] * 150 + [40.2] * 30 + [50.0] * 3)
    test = np.array([30.0, 30.0, 40.0, 50.0])
    preds = np.array([31.0, 28.5, 41.0, 47.0])
    got = dirfast.metrics.shot_metrics(preds, test, train)
    expected = published.shot_metrics(preds, test, train)
    assert_same_metrics(got, expected)
    assert got["many"]["mse"] == pytest.approx((1 + 1.5**2) / 2)
    assert got["median"]["l1"] == pytest.approx(1.0)
    assert got["low"]["gmean"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="train_labels must be within int64's range"):  # int() would wrap
        dirfast.metrics.shot_metrics(preds, test, np.append(train, 1e20))


def test_shot_metrics_empty_region_is_nan():
    train = np.array([10.0] * 150 + [11.0] * 150)
    test = np.array([10.0, 11.0, 11.0])
    preds = np.array([12.0, 10.5, 13.0])
    got = dirfast.metrics.shot_metrics(preds, test, train)
    for m in METRICS:
        assert math.isnan(got["median"][m]) and math.isnan(got["low"][m])
    assert_same_metrics(got, published.shot_metrics(preds, test, train))
    assert got["overall"]["gmean"] == pytest.approx(gmean([2.0, 0.5, 2.0]))


def test_no_samples_at_all_is_an_error():
    """An empty region gives NaN, but no test samples at all is a ValueError, in every metric."""
    empty, grid = np.array([]), dirfast.GridBinning(dirfast.Binning.integer(4), dirfast.Binning.integer(4))
    calls = [lambda: dirfast.metrics.shot_metrics(empty, empty, np.arange(5.0)),
             lambda: dirfast.metrics.shot_metrics(empty, empty, binning=dirfast.Binning.integer(5),
                                                  regions={"many": [1]}),
             lambda: dirfast.metrics.balanced_mae(empty, empty, dirfast.Binning.integer(5)),
             lambda: dirfast.metrics.balanced_mse(np.zeros((0, 2)), np.zeros((0, 2)), grid)]
    for call in calls:
        with pytest.raises(ValueError, match="preds and labels must not be empty"):
            call()


def test_shot_metrics_binning_for_continuous_labels():
    """binning=: test and training labels grouped by bin (STS-B-DIR), errors on the values."""
    rng = np.random.default_rng(5)
    train = np.round(rng.random(2000) ** 3 * 5, 3).astype(np.float32)
    test = np.round(rng.random(400) * 5, 3).astype(np.float32)
    preds = (test + rng.normal(0, 0.5, 400)).astype(np.float32)
    binning = dirfast.Binning.uniform(0, 5, 50)
    got = dirfast.metrics.shot_metrics(torch.tensor(preds), torch.tensor(test), torch.tensor(train), binning=binning)

    edges = published.histogram_edges(0.0, 5.0, 50, dtype=np.float32)
    test_bins = np.array([published.edges_bin(v, edges) for v in test])
    train_bins = np.array([published.edges_bin(v, edges) for v in train])
    errors = {"many": [], "median": [], "low": []}
    for i in range(len(test)):
        n = int(np.sum(train_bins == test_bins[i]))
        region = "many" if n > 100 else ("low" if n < 20 else "median")
        errors[region].append(float(preds[i]) - float(test[i]))
    errors["overall"] = [float(p) - float(t) for p, t in zip(preds, test)]
    assert all(len(v) for v in errors.values())
    for region, e in errors.items():
        e = np.array(e)
        assert got[region]["mse"] == pytest.approx(np.mean(e**2), rel=1e-6)
        assert got[region]["l1"] == pytest.approx(np.mean(np.abs(e)), rel=1e-6)
        assert got[region]["gmean"] == pytest.approx(gmean(np.abs(e)), rel=1e-6)


def test_shot_metrics_unlisted_bins_are_few_shot():
    """With fixed regions (regions=), a bin no region lists is few-shot, as the published
    STS-B-DIR evaluator counts it: not medium-shot."""
    binning = dirfast.Binning.integer(10)
    labels = np.array([1.0, 2.0, 5.0, 7.0])
    preds = labels + np.array([1.0, 2.0, 3.0, 4.0])
    got = dirfast.metrics.shot_metrics(preds, labels, binning=binning, regions={"many": [1], "median": [2]})
    assert got["many"]["l1"] == 1.0 and got["median"]["l1"] == 2.0
    assert got["low"]["l1"] == pytest.approx(3.5)  # bins 5 and 7, unlisted


def test_labels_beyond_float32_join_the_edge_bins():
    """Finite float64 labels beyond float32's range are binned (in float32, as the published
    evaluators) into the edge bins: they raised numpy's bincount error in the balanced errors
    (bin -1) and took the last bin's region in shot_metrics."""
    binning = dirfast.Binning.integer(10)
    labels = np.array([1e39, 9.0, 5.0, -1e39])
    preds = labels + np.array([0.0, 3.0, 2.0, 0.0])
    # bins 9 (errors 0 and 3), 5 (2) and 0 (0), each weighing the same
    assert dirfast.metrics.balanced_mae(preds, labels, binning) == pytest.approx((1.5 + 2.0 + 0.0) / 3)
    assert dirfast.metrics.balanced_mse(preds, labels, binning) == pytest.approx((4.5 + 4.0 + 0.0) / 3)
    grid = dirfast.GridBinning(binning)
    assert dirfast.metrics.balanced_mae(preds[:, None], labels[:, None], grid) == pytest.approx(3.5 / 3)
    got = dirfast.metrics.shot_metrics(preds, labels, binning=binning, regions={"many": [9], "median": [5]})
    assert got["many"]["l1"] == 1.5 and got["median"]["l1"] == 2.0 and got["low"]["l1"] == 0.0
    train = np.array([9.0] * 3 + [0.0] * 200)
    got = dirfast.metrics.shot_metrics(preds, labels, train, binning=binning)
    assert got["many"]["l1"] == 0.0 and got["low"]["l1"] == pytest.approx(5.0 / 3)


def test_shot_metrics_exact_error():
    """exact_error replaces the zero errors of exact predictions in the geometric mean only."""
    train = np.array([10.0] * 150 + [11.0] * 50)
    test = np.array([10.0, 10.0, 11.0, 11.0])
    preds = np.array([10.0, 12.0, 11.5, 11.0])
    got = dirfast.metrics.shot_metrics(preds, test, train, exact_error=1e-3)
    plain = dirfast.metrics.shot_metrics(preds, test, train)
    assert got["many"]["gmean"] == pytest.approx(math.sqrt(1e-3 * 2.0), rel=1e-12)
    assert got["median"]["gmean"] == pytest.approx(math.sqrt(1e-3 * 0.5), rel=1e-12)
    assert got["overall"]["gmean"] == pytest.approx((1e-3 * 2.0 * 0.5 * 1e-3) ** 0.25, rel=1e-12)
    for region in got:  # "low" is empty: NaN in both
        np.testing.assert_equal((got[region]["mse"], got[region]["l1"]), (plain[region]["mse"], plain[region]["l1"]))


def test_shot_metrics_exact_prediction_gmean_zero():
    """An exact prediction makes the region's geometric mean 0 (scipy's gmean), not an error."""
    train = np.array([10.0] * 150 + [11.0] * 50)
    test = np.array([10.0, 10.0, 11.0])
    preds = np.array([10.0, 12.0, 11.5])
    got = dirfast.metrics.shot_metrics(preds, test, train)
    assert got["many"]["gmean"] == 0.0 and got["overall"]["gmean"] == 0.0
    with np.errstate(divide="ignore"):
        expected = published.shot_metrics(preds, test, train)
    assert_same_metrics(got, expected)


def test_shot_metrics_correlations_match_scipy():
    """correlations=True: each region's Pearson's r and Spearman's rho (tied values at their mean
    rank) are scipy's pearsonr and spearmanr of the region's samples, NaN where those are
    undefined (one sample, constant predictions); the errors are those without it."""
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(7)
    train = np.repeat(np.arange(10.0), [150] * 4 + [50] * 3 + [5] * 3)  # many 0-3, median 4-6, low 7-9
    test = rng.integers(0, 10, 3000).astype(np.float64)
    preds = np.round(test + rng.normal(0, 2, test.size), 1)  # ties in the ranks of both sides
    got = dirfast.metrics.shot_metrics(preds, test, train, correlations=True)
    plain = dirfast.metrics.shot_metrics(preds, test, train)
    masks = {"many": test <= 3, "median": (test >= 4) & (test <= 6), "low": test >= 7,
             "overall": np.ones(test.size, bool)}
    for region, mask in masks.items():
        assert set(got[region]) == set(METRICS) | {"pearson", "spearman"}
        assert got[region]["pearson"] == pytest.approx(pearsonr(preds[mask], test[mask])[0], rel=1e-12)
        assert got[region]["spearman"] == pytest.approx(spearmanr(preds[mask], test[mask])[0], rel=1e-12)
        assert {k: got[region][k] for k in METRICS} == plain[region]

    # by bin with fixed regions, and a one-dimensional grid: the same
    binning = dirfast.Binning.integer(10)
    regions = {"many": [0, 1, 2, 3], "median": [4, 5, 6]}
    by_bin = dirfast.metrics.shot_metrics(preds, test, binning=binning, regions=regions, correlations=True)
    assert by_bin == got
    grid = dirfast.GridBinning(binning)
    assert dirfast.metrics.shot_metrics(preds[:, None], test[:, None], binning=grid, regions=regions,
                                        correlations=True) == got
    # predictions whose squares are below float64's range: the same correlations
    tiny = dirfast.metrics.shot_metrics(preds * 1e-170, test, binning=binning, regions=regions, correlations=True)
    assert tiny["overall"]["pearson"] == pytest.approx(got["overall"]["pearson"], rel=1e-12)

    # undefined: a region of one sample (many), constant predictions (median), no sample (low)
    few = dirfast.metrics.shot_metrics([1.0, 2.0, 2.0, 5.0], [1.0, 4.0, 5.0, 6.0], binning=binning,
                                       regions={"many": [1], "median": [4, 5], "low": [9]}, correlations=True)
    for region in ("many", "median", "low"):
        assert math.isnan(few[region]["pearson"]) and math.isnan(few[region]["spearman"]), region
    # constant labels whose float64 mean is not exactly their value (3 x 0.1): still undefined
    constant = dirfast.metrics.shot_metrics([0.3, 0.2, 0.5], [0.1, 0.1, 0.1], binning=dirfast.Binning.uniform(0, 1, 10),
                                            regions={"many": [1]}, correlations=True)
    assert math.isnan(constant["many"]["pearson"]) and math.isnan(constant["overall"]["spearman"])
    assert few["overall"]["pearson"] == pytest.approx(pearsonr([1.0, 2.0, 2.0, 5.0], [1.0, 4.0, 5.0, 6.0])[0])
