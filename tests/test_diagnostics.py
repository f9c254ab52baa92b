"""FDS.diagnostics, LDS.diagnostics and the balanced errors of dirfast.metrics against
independent oracles: per-bucket NumPy loops over the module's statistics, the scale factor
read back from what FDS.smooth does to two rows, SciPy's convolution for the effective density,
and a Python loop over the bins for the balanced errors."""

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d, gaussian_filter1d

import dirfast
from dirfast.metrics import balanced_mae, balanced_mse
from testing import DEVICES

FDS_COLUMNS = {"bucket", "count", "mean_distance", "mean_cosine", "var_distance", "var_cosine",
               "scale_mean", "scale_min", "scale_max"}


def trained_fds(device, *, binning=None, bucket_num=30, bucket_start=3, feature_dim=6, seed=0, clip=(0.1, 10.0)):
    """An FDS after two epochs of features whose mean and spread depend on the label, so that the
    running and the smoothed statistics differ; labels skewed, some buckets empty."""
    generator = torch.Generator().manual_seed(seed)
    if binning is None:
        labels = (torch.rand(3000, generator=generator) ** 2 * (bucket_num - 1)).floor()
        fds = dirfast.FDS(feature_dim, bucket_num, bucket_start, clip_min=clip[0], clip_max=clip[1])
    else:
        labels = torch.rand(3000, binning.ndim, generator=generator) ** 2 * 4
        fds = dirfast.FDS(feature_dim, binning.num_bins, 0, binning=binning, clip_min=clip[0], clip_max=clip[1])
    fds = fds.to(device)
    label_value = labels if labels.dim() == 1 else labels.sum(dim=1)
    for epoch in range(2):
        features = (torch.sin(label_value[:, None] / 5 + torch.arange(feature_dim))
                    + (0.2 + label_value[:, None] / 20) * torch.randn(len(labels), feature_dim, generator=generator))
        fds.update_last_epoch_stats(epoch)
        fds.update_running_stats(features.to(device), labels.to(device), epoch)
    fds.update_last_epoch_stats(2)
    return fds, labels


def numpy_scale(running_var, smoothed_var, clip_min, clip_max):
    """The published calibration factor per bucket and feature, in NumPy: sqrt(clamp(v2 / v1)),
    1 for a bucket whose variances sum below 1e-10 and for every feature with v1 == 0."""
    keep = (running_var.sum(axis=1, keepdims=True) < 1e-10) | (running_var == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.sqrt(np.clip(smoothed_var / running_var, clip_min, clip_max))
    return np.where(keep, 1.0, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_fds_diagnostics_match_per_bucket_loops(device):
    fds, _ = trained_fds(device)
    table = fds.diagnostics()
    assert set(table) == FDS_COLUMNS
    rows = fds.bucket_num - fds.bucket_start
    for name, column in table.items():
        assert column.shape == (rows,) and column.device.type == "cpu", name
        assert column.dtype == (torch.int64 if name == "bucket" else torch.float64), name
    assert table["bucket"].tolist() == list(range(fds.bucket_start, fds.bucket_num))
    np.testing.assert_array_equal(table["count"].numpy(), fds.num_samples_tracked.cpu().double().numpy())
    m1, v1 = fds.running_mean_last_epoch.cpu().double().numpy(), fds.running_var_last_epoch.cpu().double().numpy()
    m2, v2 = fds.smoothed_mean_last_epoch.cpu().double().numpy(), fds.smoothed_var_last_epoch.cpu().double().numpy()
    scale = numpy_scale(v1, v2, fds.clip_min, fds.clip_max)
    for row in range(rows):
        for name, a, b in (("mean", m1[row], m2[row]), ("var", v1[row], v2[row])):
            assert table[f"{name}_distance"][row].item() == pytest.approx(np.sqrt(np.sum((a - b) ** 2)), rel=1e-12)
            with np.errstate(invalid="ignore"):  # an empty bucket's zero mean vector: NaN on both sides
                cosine = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
            assert table[f"{name}_cosine"][row].item() == pytest.approx(cosine, rel=1e-12, abs=1e-15, nan_ok=True)
        assert table["scale_mean"][row].item() == pytest.approx(scale[row].mean(), rel=1e-6)
        assert table["scale_min"][row].item() == pytest.approx(scale[row].min(), rel=1e-6)
        assert table["scale_max"][row].item() == pytest.approx(scale[row].max(), rel=1e-6)
    assert (table["mean_distance"] > 0).any() and (table["scale_max"] > table["scale_min"]).any(), \
        "the fixture must give smoothing something to move"


@pytest.mark.parametrize("device", DEVICES)
def test_fds_scale_is_what_smooth_multiplies_by(device):
    """Two rows of the same bucket, one feature-wise 1 above the other: after smooth(), their
    difference is the per-feature factor; its min, mean and max are the table's."""
    fds, _ = trained_fds(device, clip=(0.5, 2.0))
    table = fds.diagnostics()
    feature_dim = fds.running_mean.shape[1]
    for row in range(0, fds.bucket_num - fds.bucket_start, 4):
        bucket = fds.bucket_start + row
        base = torch.randn(1, feature_dim, dtype=torch.float64)
        features = torch.cat([base, base + 1]).float().to(device)
        smoothed = fds.smooth(features, torch.full((2,), float(bucket), device=device), epoch=2)
        factor = (smoothed[1] - smoothed[0]).double().cpu()
        assert table["scale_min"][row].item() == pytest.approx(factor.min().item(), rel=1e-4)
        assert table["scale_mean"][row].item() == pytest.approx(factor.mean().item(), rel=1e-4)
        assert table["scale_max"][row].item() == pytest.approx(factor.max().item(), rel=1e-4)


def test_fds_diagnostics_of_empty_buckets():
    """Before any update every bucket is empty: counts 0, statistics equal (distance 0), the
    mean vectors zero (cosine NaN: no direction), every factor 1 (the zero-variance rule)."""
    table = dirfast.FDS(4, 10, 2).diagnostics()
    assert table["count"].tolist() == [0.0] * 8
    assert table["mean_distance"].tolist() == [0.0] * 8 and table["var_distance"].tolist() == [0.0] * 8
    assert bool(table["mean_cosine"].isnan().all())
    assert table["var_cosine"].tolist() == pytest.approx([1.0] * 8)  # running and smoothed var both ones
    for name in ("scale_mean", "scale_min", "scale_max"):
        assert table[name].tolist() == [1.0] * 8


def test_fds_diagnostics_change_nothing():
    fds, _ = trained_fds("cpu")
    before = {name: value.clone() for name, value in fds.state_dict().items()}
    fds.diagnostics()
    after = fds.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_fds_diagnostics_over_a_grid():
    """Buckets over a product grid: one row per grid bin, and on one dimension the 1-D table."""
    grid = dirfast.GridBinning(dirfast.Binning.uniform(0, 4, 5), dirfast.Binning.uniform(0, 4, 4))
    fds, _ = trained_fds("cpu", binning=grid)
    table = fds.diagnostics()
    assert table["bucket"].tolist() == list(range(grid.num_bins)) and table["count"].sum() > 0
    one = dirfast.GridBinning(dirfast.Binning.uniform(0, 4, 9))
    flat_fds, _ = trained_fds("cpu", binning=one)
    plain = dirfast.FDS(6, 9, 0, binning=one.binnings[0])
    plain.load_state_dict(flat_fds.state_dict())
    flat, expected = flat_fds.diagnostics(), plain.diagnostics()
    assert all(torch.equal(flat[name], expected[name], ) if name != "mean_cosine" else
               torch.allclose(flat[name], expected[name], equal_nan=True) for name in expected)


# =========================================================================== LDS
def effective_by_scipy(counts, reweight, lds, ks=5, sigma=2.0, clip=(5, 1000)):
    """The published effective distribution: the re-weighting base convolved with the LDS window
    (gaussian_filter1d of a delta, over its maximum), zero padding; truncated for "inverse"."""
    base = {"sqrt_inv": np.sqrt(counts), "inverse": np.clip(counts, *clip), "none": np.ones_like(counts)}[reweight]
    if not lds:
        return base
    delta = np.zeros(ks)
    delta[ks // 2] = 1
    window = gaussian_filter1d(delta, sigma=sigma)
    window = window / window.max()
    effective = convolve1d(base, weights=window, mode="constant")
    return np.trunc(effective) if reweight == "inverse" else effective


@pytest.mark.parametrize("reweight, smooth", [("sqrt_inv", True), ("inverse", True), ("inverse", False),
                                              ("none", False)])
def test_lds_diagnostics_match_numpy(reweight, smooth):
    rng = np.random.default_rng(3)
    ages = np.clip(np.round(rng.gamma(4, 8, 5000)), 0, 120)
    binning = dirfast.Binning.integer(121)
    lds = dirfast.LDS(binning, reweight=reweight, lds=smooth).fit(ages)
    table = lds.diagnostics()
    assert set(table) == {"bin", "center", "count", "empirical_density", "effective_density", "weight"}
    counts = np.bincount(ages.astype(int), minlength=121).astype(np.float64)
    assert table["bin"].tolist() == list(range(121))
    np.testing.assert_array_equal(table["center"].numpy(), binning.centers)
    np.testing.assert_array_equal(table["count"].numpy(), counts)
    np.testing.assert_allclose(table["empirical_density"].numpy(), counts / counts.sum(), rtol=1e-14)
    effective = effective_by_scipy(counts, reweight, smooth)
    np.testing.assert_allclose(table["effective_density"].numpy(), effective / effective.sum(), rtol=1e-12)
    weights_at_centers = lds.weights(torch.from_numpy(binning.centers)).double().numpy()
    np.testing.assert_array_equal(table["weight"].numpy(), weights_at_centers)
    if reweight != "none":  # the weight of a bin with labels is the inverse effective density, rescaled
        seen = counts > 0
        ratio = table["weight"].numpy()[seen] * effective[seen]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)


def test_lds_diagnostics_with_bucket_start_and_a_grid():
    labels = np.concatenate([np.arange(10.0), np.full(20, 8.0)])
    lds = dirfast.LDS(dirfast.Binning.integer(12), bucket_start=7).fit(labels)
    table = lds.diagnostics()
    assert table["bin"].tolist() == [7, 8, 9, 10, 11] and table["count"].tolist() == [8.0, 21.0, 1.0, 0.0, 0.0]
    grid = dirfast.GridBinning(dirfast.Binning.uniform(0, 1, 3), dirfast.Binning.uniform(0, 1, 4))
    points = torch.rand(500, 2, generator=torch.Generator().manual_seed(0)) ** 2
    lds = dirfast.LDS(grid).fit(points)
    table = lds.diagnostics()
    np.testing.assert_array_equal(table["center"].numpy(), grid.centers)
    np.testing.assert_array_equal(table["count"].numpy(), np.bincount(grid(points).numpy(), minlength=12))
    np.testing.assert_array_equal(table["weight"].numpy(), lds.weights(torch.from_numpy(grid.centers)).double().numpy())


def test_lds_diagnostics_need_a_fit():
    with pytest.raises(RuntimeError, match="fit"):
        dirfast.LDS(dirfast.Binning.integer(5)).diagnostics()


# =========================================================================== balanced errors
def balanced_by_loop(preds, labels, bins, power):
    per_bin = {}
    for pred, label, b in zip(preds, labels, bins):
        error = float(np.sqrt(np.sum((np.atleast_1d(pred) - np.atleast_1d(label)) ** 2)))
        per_bin.setdefault(int(b), []).append(error ** power)
    return sum(sum(errors) / len(errors) for errors in per_bin.values()) / len(per_bin)


@pytest.mark.parametrize("seed", range(3))
def test_balanced_errors_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    binning = dirfast.Binning.uniform(0, 5, 50)
    labels = np.clip(rng.normal(3.5, 0.8, 400), 0, 5)
    preds = labels + rng.normal(0, 0.3, 400) + (labels < 2)  # the rare labels predicted worse
    bins = [int(np.clip(np.searchsorted(binning.edges.astype(np.float32), np.float32(v), side="right") - 1, 0, 49))
            for v in labels]
    assert balanced_mae(preds, labels, binning) == pytest.approx(balanced_by_loop(preds, labels, bins, 1), rel=1e-12)
    assert balanced_mse(torch.from_numpy(preds), torch.from_numpy(labels), binning) == pytest.approx(
        balanced_by_loop(preds, labels, bins, 2), rel=1e-12)
    assert balanced_mae(preds, labels, binning) > np.mean(np.abs(preds - labels)), "rare bins weigh more"


def test_balanced_errors_over_a_grid():
    rng = np.random.default_rng(4)
    grid = dirfast.GridBinning(dirfast.Binning.uniform(0, 1, 4), dirfast.Binning.uniform(0, 1, 3))
    labels = rng.uniform(0, 1, (300, 2)) ** 2
    preds = labels + rng.normal(0, 0.1, (300, 2))
    bins = grid(labels).numpy()
    assert balanced_mse(preds, labels, grid) == pytest.approx(balanced_by_loop(preds, labels, bins, 2), rel=1e-12)
    one = dirfast.GridBinning(dirfast.Binning.uniform(0, 1, 4))
    assert balanced_mae(preds[:, :1], labels[:, :1], one) == balanced_mae(preds[:, 0], labels[:, 0], one.binnings[0])


def test_balanced_error_of_uniform_bins_is_the_plain_error():
    labels = np.repeat(np.arange(10.0), 7)
    preds = labels + np.tile(np.linspace(-1, 1, 7), 10)
    assert balanced_mse(preds, labels, dirfast.Binning.integer(10)) == pytest.approx(np.mean((preds - labels) ** 2))
