"""DenseWeight and Binning.auto against independent oracles: the exact Gaussian KDE of
scipy.stats.gaussian_kde, the weight formula of the paper in NumPy, the bandwidth formulas and
numpy.histogram_bin_edges; and against the denseweight package on the real AgeDB-DIR and
STS-B-DIR labels (skipped with a reason when the package or the label files are absent).

Tolerance of p' against the exact KDE, 5e-4: the window stops at 4 sigma (as scipy's
gaussian_filter1d), which drops at most exp(-8) = 3.4e-4 of each label's kernel peak where it
is dropped; linear binning and linear interpolation each err by about (step / h)^2 / 8, 1.2e-4
at the coarsest case here (32 grid steps per bandwidth). Observed: at most 1.3e-4.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d
from scipy.stats import gaussian_kde

import dirfast
from benchmarks import real_labels
from dirfast import _validate as validate
from dirfast import bandwidth
from dirfast import density as density_module
from testing import DEVICES, same_bits_for_threads

DENSITY_ATOL = 5e-4


def label_sets():
    rng = np.random.default_rng(0)
    return {
        "normal": rng.normal(3, 2, 2000),
        "exponential-float32": rng.exponential(1.5, 3000).astype(np.float32),
        "integers": np.round(np.clip(rng.normal(35, 15, 4000), 0, 100)).astype(np.int64),
        "mixture-with-outlier": np.concatenate([rng.normal(0, 0.3, 1500), rng.normal(4, 1, 300), [25.0]]),
    }


LABELS = label_sets()


def exact_scaled_density(labels: np.ndarray, h: float, points: np.ndarray) -> np.ndarray:
    """The Gaussian KDE of bandwidth ``h`` at ``points``, scaled by its min and max over a fine grid
    of the labels' range plus 5 bandwidths (scipy, no binning, no cut-off)."""
    labels = labels.astype(np.float64)
    kde = gaussian_kde(labels, bw_method=h / labels.std(ddof=1))  # scipy's kernel sd: factor * std(ddof=1)
    grid = kde(np.linspace(labels.min() - 5 * h, labels.max() + 5 * h, 20001))
    return (kde(points) - grid.min()) / (grid.max() - grid.min())


def paper_weights(density: np.ndarray, alpha: float, eps: float) -> np.ndarray:
    """Steininger et al.: f_w = max(1 - alpha p', eps), divided by its mean over the training labels."""
    floor = np.maximum(1 - alpha * density, eps)
    return floor / floor.mean()


def queries(labels: np.ndarray, h: float) -> np.ndarray:
    """The labels, points between and around them, and points past the grid on both sides."""
    rng = np.random.default_rng(1)
    labels = labels.astype(np.float64)
    return np.concatenate([labels, rng.uniform(labels.min() - 7 * h, labels.max() + 7 * h, 500)])


# =========================================================================== the density
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["silverman", "scott", 0.7])
@pytest.mark.parametrize("name", list(LABELS))
def test_density_matches_the_exact_kde(name, rule, device):
    labels = LABELS[name]
    estimator = dirfast.DenseWeight(bandwidth=rule).fit(torch.from_numpy(labels).to(device))
    h = estimator.fitted_bandwidth
    points = queries(labels, h)
    got = estimator.density(torch.from_numpy(points).to(device))
    assert got.dtype == torch.float32 and got.device.type == device
    np.testing.assert_allclose(got.cpu().double().numpy(), exact_scaled_density(labels, h, points),
                               rtol=0, atol=DENSITY_ATOL)
    far = torch.tensor([labels.min() - 6 * h, labels.max() + 6 * h], dtype=torch.float64, device=device)
    assert estimator.density(far).tolist() == [0.0, 0.0], "no density past the grid"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha, eps", [(0.5, 1e-6), (1.0, 1e-6), (2.0, 1e-3), (1.0, 0.5)])
def test_weights_follow_the_paper(alpha, eps, device):
    labels = LABELS["mixture-with-outlier"]
    tensor = torch.from_numpy(labels).to(device)
    estimator = dirfast.DenseWeight(alpha=alpha, eps=eps).fit(tensor)
    expected = paper_weights(exact_scaled_density(labels, estimator.fitted_bandwidth, labels), alpha, eps)
    got = estimator.weights(tensor)
    assert got.dtype == torch.float32 and got.device.type == device and got.shape == tensor.shape
    got = got.cpu().double().numpy()
    # |d w| <= alpha |d p'| s (1 + w) for s = 1 / mean(max(1 - alpha p', eps)) (first order)
    scale = 1 / np.maximum(1 - alpha * exact_scaled_density(labels, estimator.fitted_bandwidth, labels), eps).mean()
    np.testing.assert_array_less(np.abs(got - expected), alpha * DENSITY_ATOL * scale * (1 + expected) + 1e-6)
    assert got.mean() == pytest.approx(1.0, abs=1e-6)
    floor = eps * scale
    assert got.min() >= floor * (1 - 1e-5), "eps floors every weight"
    assert got.argmax() == labels.size - 1, "the outlier weighs most"


def test_eps_floors_the_densest_labels():
    """With a large alpha most labels sit on the floor eps, and all of them weigh the same."""
    labels = torch.from_numpy(LABELS["normal"])
    estimator = dirfast.DenseWeight(alpha=10.0, eps=1e-2).fit(labels)
    density = estimator.density(labels).double()
    weights = estimator.weights(labels).double()
    floored = density >= (1 - 1e-2) / 10
    assert 0.5 < float(floored.double().mean()) < 1
    torch.testing.assert_close(weights[floored], torch.full_like(weights[floored], float(weights.min())))
    torch.testing.assert_close(weights[~floored], (1 - 10 * density[~floored]) / 1e-2 * float(weights.min()),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_zero_gives_ones(device):
    labels = torch.from_numpy(LABELS["integers"]).to(device)
    assert torch.equal(dirfast.DenseWeight(alpha=0).fit(labels).weights(labels), torch.ones(labels.shape, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_weights_keep_shape_device_and_need_no_fit_device(device):
    """Fitted on the CPU, weighed on ``device``: float32, the labels' shape; NaN and infinite
    labels weigh 0 and have density NaN; labels past the grid weigh as p' = 0."""
    labels = torch.from_numpy(LABELS["normal"])
    estimator = dirfast.DenseWeight().fit(labels)
    batch = labels[:12].reshape(3, 4).float().to(device)
    got = estimator.weights(batch)
    assert got.shape == (3, 4) and got.dtype == torch.float32 and got.device.type == device
    torch.testing.assert_close(got.cpu(), estimator.weights(labels[:12].float()).reshape(3, 4))
    odd = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e9, -1e9], device=device)
    weights, density = estimator.weights(odd).cpu(), estimator.density(odd).cpu()
    assert weights[:3].tolist() == [0.0, 0.0, 0.0] and bool(density[:3].isnan().all())
    assert density[3:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(weights[3:], estimator.weights(torch.tensor([1e9, -1e9])))
    assert not estimator.weights(batch.requires_grad_()).requires_grad, "weights are constants, as LDS's"


def test_weights_read_nothing_on_the_host():
    """weights() of meta labels (no data: any read on the host raises) gives meta weights."""
    estimator = dirfast.DenseWeight().fit(torch.from_numpy(LABELS["normal"]))
    got = estimator.weights(torch.empty(4, 5, device="meta"))
    assert got.shape == (4, 5) and got.device.type == "meta" and got.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA sync check needs a GPU")
def test_weights_do_not_synchronise_cuda():
    labels = torch.from_numpy(LABELS["normal"]).cuda()
    estimator = dirfast.DenseWeight().fit(labels)
    estimator.weights(labels)  # the table is copied to the GPU once, here
    torch.cuda.set_sync_debug_mode("error")
    try:
        estimator.weights(labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_density_weights_function():
    """density_weights: the fitted weights of the training labels, NumPy in and out or tensors."""
    labels = LABELS["integers"]
    got = dirfast.density_weights(labels, alpha=0.8)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    expected = dirfast.DenseWeight(alpha=0.8).fit(torch.from_numpy(labels)).weights(torch.from_numpy(labels))
    np.testing.assert_array_equal(got, expected.numpy())
    assert torch.equal(dirfast.density_weights(torch.from_numpy(labels), alpha=0.8), expected)
    np.testing.assert_array_equal(dirfast.density_weights(labels.tolist(), alpha=0.8), expected.numpy())


def test_all_equal_labels_with_a_bandwidth():
    """One value, a given bandwidth: p' = 1 at it, so every training weight is 1."""
    estimator = dirfast.DenseWeight(bandwidth=0.5).fit(torch.full((7,), 3.0))
    assert estimator.density(torch.tensor([3.0])).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(estimator.weights(torch.full((7,), 3.0)), torch.ones(7))
    near = estimator.density(torch.tensor([3.5, 4.0], dtype=torch.float64)).double()
    torch.testing.assert_close(near, torch.tensor([math.exp(-0.5), math.exp(-2)], dtype=torch.float64),
                               atol=DENSITY_ATOL, rtol=0)


def test_coarse_grid_warns():
    labels = torch.tensor([0.0, 1.0, 1000.0])
    for call in (lambda: dirfast.DenseWeight(bandwidth=0.5, grid_size=64).fit(labels),
                 lambda: dirfast.density_weights(labels, bandwidth=0.5, grid_size=64)):
        with pytest.warns(UserWarning, match="grid_size") as record:
            call()
        assert [w.filename for w in record] == [__file__]  # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dirfast.DenseWeight(bandwidth=0.5).fit(torch.tensor([0.0, 1.0, 10.0]))


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.6, 12.5, 40.0])
def test_gaussian_window_is_scipys(sigma):
    """The KDE's window (which binned_fit and the FFT test below take as given) is scipy's
    gaussian_filter1d kernel: its response to one unit of mass, radius int(4 sigma + 0.5)."""
    window = density_module._gaussian_window(sigma, "cpu")
    radius = int(4 * sigma + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    assert window.dtype == torch.float64 and window.numel() == 2 * radius + 1
    np.testing.assert_allclose(window.numpy(), gaussian_filter1d(impulse, sigma, mode="constant"), rtol=1e-13,
                               atol=1e-300)


def binned_fit(labels: torch.Tensor, estimator) -> tuple:
    """(p' on the grid, the scale) of a fitted ``estimator`` computed the direct way: linear binning
    by ``ops.bin_stats``, the window by ``ops.smooth_bins`` and p' interpolated at every label."""
    fit, size = estimator._fit, estimator.grid_size
    values = labels.reshape(-1).double()
    position = (values - fit["low"]) / fit["step"]
    left = position.floor().clamp(0, size - 2)
    right = position - left
    count, mean, _ = dirfast.ops.bin_stats(torch.cat([1 - right, right])[:, None], torch.cat([left, left + 1]).long(),
                                           size)
    window = density_module._gaussian_window(estimator.fitted_bandwidth / fit["step"], values.device)
    kde = dirfast.ops.smooth_bins(count.double() * mean[:, 0], window, padding="constant")
    scaled = (kde - kde.min()) / (kde.max() - kde.min())
    at_labels = scaled[left.long()] * (1 - right) + scaled[left.long() + 1] * right
    return scaled, 1 / float((1 - estimator.alpha * at_labels).clamp(min=estimator.eps).mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha, eps", [(0.5, 1e-6), (1.0, 1e-6), (1.5, 1e-3), (30.0, 1e-2)])
@pytest.mark.parametrize("name, grid_size", [("normal", 4096), ("integers", 4096), ("mixture-with-outlier", 1000),
                                             ("normal", 256), ("exponential-float32", 300)])
def test_fit_matches_the_direct_binning_and_convolution(name, grid_size, alpha, eps, device):
    """The fit (two bincounts, an FFT for a long window, smooth_bins for a short one, the mean
    weight from the cells' sums) against bin_stats, smooth_bins and _interpolate at every label:
    the same density and scale to rounding. Both convolutions are taken; 1 - alpha p' crosses
    eps in no cell (alpha 0.5), at the peak (1), and at both modes of a mixture (30)."""
    labels = torch.from_numpy(LABELS[name]).to(device)
    estimator = dirfast.DenseWeight(alpha=alpha, eps=eps, grid_size=grid_size).fit(labels)
    scaled, scale = binned_fit(labels, estimator)
    torch.testing.assert_close(estimator._fit["density"], scaled.cpu(), rtol=0, atol=1e-13)
    assert estimator._fit["scale"] == pytest.approx(scale, rel=1e-13)


def test_the_fits_above_take_every_path():
    """The fits of the test above include windows on both sides of FFT_MIN_TAPS, and cells where
    1 - alpha p' crosses eps: none, the two at one peak, more."""
    long_window, crossings = set(), set()
    for name, grid_size in [("normal", 4096), ("normal", 256), ("exponential-float32", 300)]:
        estimator = dirfast.DenseWeight(grid_size=grid_size).fit(torch.from_numpy(LABELS[name]))
        long_window.add(density_module._gaussian_window(estimator.fitted_bandwidth / estimator._fit["step"],
                                                        "cpu").numel() >= density_module.FFT_MIN_TAPS)
    for alpha, eps in [(0.5, 1e-6), (1.0, 1e-6), (30.0, 1e-2)]:
        estimator = dirfast.DenseWeight(alpha=alpha, eps=eps).fit(torch.from_numpy(LABELS["mixture-with-outlier"]))
        over = 1 - alpha * estimator._fit["density"] >= eps
        crossings.add(min(int((over[1:] ^ over[:-1]).sum()), 3))
    assert long_window == {True, False} and crossings == {0, 2, 3}


@pytest.mark.parametrize("size, taps", [(64, 65), (100, 99), (4096, 665), (4096, 8193), (1000, 101), (17, 65)])
@pytest.mark.parametrize("margin", [0, 3, 40])
def test_fft_convolution_is_smooth_bins(size, taps, margin):
    """The FFT convolution equals smooth_bins with zero padding, for mass up to the grid's ends
    (the FFT is padded) or with zero margins (it is not), windows shorter and longer than the grid."""
    g = torch.Generator().manual_seed(size + taps + margin)
    mass = torch.rand(size, dtype=torch.float64, generator=g) * 100
    mass[:min(margin, size)] = 0
    mass[size - min(margin, size):] = 0
    window = density_module._gaussian_window((taps - 1) / 8, "cpu")
    assert window.numel() == taps
    expected = dirfast.ops.smooth_bins(mass, window, padding="constant")
    torch.testing.assert_close(density_module._fft_convolve(mass, window), expected, rtol=0,
                               atol=1e-14 * float(expected.abs().max()) + 1e-300)
    chosen = expected if taps < density_module.FFT_MIN_TAPS else density_module._fft_convolve(mass, window)
    assert torch.equal(density_module._convolve(mass, window), chosen)


def test_fit_has_the_same_bits_for_any_thread_count():
    """Labels enough for torch to split a pass over them between threads (the fit takes them a
    chunk at a time, so none is split), float64 and float32, a given bandwidth and the rules
    (their std sums the chunks in a fixed order)."""
    labels = torch.from_numpy(np.random.default_rng(3).gamma(3.0, 10.0, 200_000))
    for grid_size, bandwidth_, dtype in [(4096, 1.6, torch.float64), (512, 1.6, torch.float64),  # the FFT, smooth_bins
                                         (4096, "silverman", torch.float32), (4096, "scott", torch.float64)]:

        def run():
            estimator = dirfast.DenseWeight(bandwidth=bandwidth_, grid_size=grid_size).fit(labels.to(dtype))
            return [estimator._fit["density"], torch.tensor([estimator._fit[key] for key in
                                                             ("scale", "low", "step", "fitted_bandwidth")]),
                    estimator.weights(labels)]

        same_bits_for_threads(run)


@pytest.mark.parametrize("name", list(LABELS))
def test_a_fit_in_chunks_is_the_fit_in_one(name, monkeypatch):
    """The labels a few hundred at a time (instead of 32767): the same rules, span, density and
    scale to rounding, also where 1 - alpha p' crosses eps in several cells (alpha 30)."""
    labels = torch.from_numpy(LABELS[name])
    fits = []
    for chunk in (validate.CHUNK, 333):
        monkeypatch.setattr(validate, "CHUNK", chunk)
        fits.append([dirfast.DenseWeight(alpha=alpha, eps=1e-2, bandwidth=rule).fit(labels)._fit
                     for alpha in (1.0, 30.0) for rule in ("silverman", "scott")])
        y = labels.double().numpy()
        assert float(bandwidth.silverman(labels.double())) == pytest.approx(1.06 * np.std(y) * y.size ** -0.2,
                                                                            rel=1e-12)
    for whole, chunked in zip(*fits):
        torch.testing.assert_close(chunked["density"], whole["density"], rtol=0, atol=1e-13)
        for key in ("scale", "low", "step", "fitted_bandwidth"):
            assert chunked[key] == pytest.approx(whole[key], rel=1e-13)


def test_refit_replaces_and_state_dict_round_trips():
    first, second = torch.from_numpy(LABELS["normal"]), torch.from_numpy(LABELS["integers"])
    estimator = dirfast.DenseWeight(alpha=np.float64(0.7), bandwidth=np.str_("scott")).fit(first)  # NumPy values
    fresh = dirfast.DenseWeight(alpha=0.7, bandwidth="scott").fit(second)
    estimator.fit(second)
    assert torch.equal(estimator.weights(second), fresh.weights(second)), "fit starts from scratch"
    restored = dirfast.DenseWeight(alpha=0.7, bandwidth="scott")
    restored.load_state_dict(torch.load(_saved(estimator.state_dict()), weights_only=True))
    assert torch.equal(restored.weights(second), estimator.weights(second))
    assert restored.fitted_bandwidth == estimator.fitted_bandwidth
    unfitted = dirfast.DenseWeight(alpha=0.7, bandwidth="scott")
    restored.load_state_dict(unfitted.state_dict())
    assert restored.fitted_bandwidth is None
    with pytest.raises(RuntimeError, match="fit"):
        restored.weights(second)


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_repr():
    estimator = dirfast.DenseWeight(alpha=2, bandwidth=0.25)
    assert repr(estimator) == "DenseWeight(alpha=2, eps=1e-06, bandwidth=0.25, grid_size=4096, not fitted)"
    assert "fitted bandwidth 0.25" in repr(estimator.fit([1.0, 2.0]))


# =========================================================================== the rules
@pytest.mark.parametrize("name", list(LABELS))
def test_rules_against_their_formulas(name):
    labels = LABELS[name]
    values = torch.from_numpy(labels).double()
    y, n = labels.astype(np.float64), labels.size
    assert float(bandwidth.silverman(values)) == pytest.approx(1.06 * np.std(y) * n ** -0.2, rel=1e-12)
    scott = gaussian_kde(y, bw_method="scott")
    assert float(bandwidth.scott(values)) == pytest.approx(np.sqrt(scott.covariance[0, 0]), rel=1e-12)  # kernel sd
    q75, q25 = np.percentile(y, [75, 25])
    assert float(bandwidth.freedman_diaconis(values)) == pytest.approx(2 * (q75 - q25) * n ** (-1 / 3), rel=1e-12)
    assert float(bandwidth.scott(values[:1])) == 0.0, "one label: no spread"


@pytest.mark.parametrize("scale", [1e160, 8e307])
def test_rules_of_labels_whose_squares_pass_float64(scale):
    """Labels whose squared deviations (1e160) or sum (8e307) pass float64's range keep finite
    rules (the formulas on the labels scaled down), and Binning.auto its bins."""
    y = np.array([0.0, 1.0, 2.0, 0.5])
    values = torch.from_numpy(y * scale)
    assert float(bandwidth.silverman(values)) == pytest.approx(1.06 * np.std(y) * 4 ** -0.2 * scale, rel=1e-12)
    assert float(bandwidth.scott(values)) == pytest.approx(np.std(y, ddof=1) * 4 ** -0.2 * scale, rel=1e-12)
    assert dirfast.Binning.auto(values, rule="scott").num_bins == math.ceil(2 / (np.std(y, ddof=1) * 4 ** -0.2))


@pytest.mark.parametrize("name", list(LABELS))
def test_auto_fd_is_numpys(name):
    labels = LABELS[name]
    binning = dirfast.Binning.auto(labels)
    expected = np.histogram_bin_edges(labels.astype(np.float64), bins="fd")
    assert binning.num_bins == expected.size - 1 and binning == dirfast.Binning.uniform(labels.min(), labels.max(),
                                                                                        binning.num_bins)
    np.testing.assert_allclose(binning.edges, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rule", ["silverman", "scott"])
def test_auto_bandwidth_rules(rule):
    labels = LABELS["normal"]
    width = dirfast.DenseWeight(bandwidth=rule).fit(torch.from_numpy(labels)).fitted_bandwidth
    binning = dirfast.Binning.auto(torch.from_numpy(labels), rule=rule)
    assert binning.num_bins == math.ceil(np.ptp(labels) / width)
    assert binning.edges[0] == labels.min() and binning.edges[-1] == labels.max()


def test_auto_edge_cases_follow_numpy():
    for labels in ([3.0, 3.0, 3.0], [7], [0, 0, 0, 0, 0, 1.0], [2.0, 5.0]):
        expected = np.histogram_bin_edges(np.asarray(labels, dtype=np.float64), bins="fd")
        np.testing.assert_array_equal(dirfast.Binning.auto(labels).edges, expected)
    assert dirfast.Binning.auto([3.0, 3.0], rule="silverman") == dirfast.Binning.uniform(2.5, 3.5, 1)
    huge = torch.tensor([1e16, 1e16], dtype=torch.float64)  # 1e16 +- 0.5 rounds to 1e16: a wider bin
    assert dirfast.Binning.auto(huge).num_bins == 1 and dirfast.Binning.auto(huge)(huge).tolist() == [0, 0]
    subnormal_width = [0.0] * 10 + [1e-308] * 10 + [1e10]  # IQR 1e-308: range / width overflows to inf
    assert dirfast.Binning.auto(subnormal_width, max_bins=7).num_bins == 7
    many = np.random.default_rng(2).normal(size=100000)
    assert dirfast.Binning.auto(many, max_bins=50).num_bins == 50, "capped"
    assert dirfast.Binning.auto(many, max_bins=10 ** 6).num_bins == np.histogram_bin_edges(many, "fd").size - 1


# =========================================================================== the denseweight package
def training_labels(which):
    """The real training labels in float64 (as NumPy or pandas read them), or a skip."""
    labels = real_labels.agedb_ages("train") if which == "agedb" else real_labels.stsb_scores("train", np.float64)
    if labels is None:
        pytest.skip(f"{which} labels not found under {real_labels.DATA}")
    return labels.astype(np.float64)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("which", ["agedb", "stsb"])
def test_matches_the_denseweight_package(which, alpha):
    """The package (defaults) against DenseWeight (defaults) on the real training labels.

    The package reads p' at the grid point at or below each label, so its p' lags by up to one of
    its grid steps times the slope of p'; dirfast's p' read at those same grid points matches the
    package's within DENSITY_ATOL. The weights then differ by at most alpha |d p'| s (1 + w)."""
    package = pytest.importorskip("denseweight", reason="the denseweight package (requirements-dev.txt) is not installed")
    labels = training_labels(which)
    theirs = package.DenseWeight(alpha=alpha)
    package_weights = theirs.fit(labels)
    ours = dirfast.DenseWeight(alpha=alpha).fit(torch.from_numpy(labels))
    assert ours.fitted_bandwidth == pytest.approx(theirs.bandwidth, rel=1e-12), "the same default bandwidth"
    # the package's grid (.x) and p' at the labels (.y_dens), as denseweight 0.1.2 keeps them
    lower = theirs.x[np.clip(np.searchsorted(theirs.x, labels, side="right") - 1, 0, theirs.x.size - 1)]
    at_lower = ours.density(torch.from_numpy(lower)).double().numpy()
    np.testing.assert_allclose(at_lower, theirs.y_dens, rtol=0, atol=DENSITY_ATOL)
    grid = ours.density(torch.from_numpy(theirs.x)).double().numpy()
    lag = np.max(np.abs(np.diff(grid))) + DENSITY_ATOL  # one package grid step times the largest slope
    density = ours.density(torch.from_numpy(labels)).double().numpy()
    assert np.abs(density - theirs.y_dens).max() <= lag
    weights = ours.weights(torch.from_numpy(labels)).double().numpy()
    scale = float(ours.weights(torch.tensor([1e12])))  # a label where p' = 0 weighs the scale itself
    np.testing.assert_array_less(np.abs(weights - package_weights), alpha * lag * scale * (1 + package_weights) + 1e-6)
    assert np.median(np.abs(weights - package_weights) / package_weights) < 2e-3
