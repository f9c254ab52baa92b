"""LDS: dirfast.lds_weights and dirfast.LDS against the published _prepare_weights."""

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d

import dirfast
from benchmarks import published
from testing import DEVICES, gen, skewed_int_labels

KERNEL_SETTINGS = [("gaussian", 5, 2), ("triang", 5, 2), ("laplace", 5, 2), ("gaussian", 3, 1), ("laplace", 7, 3),
                   ("triang", 9, 1)]
RTOL = 1e-6  # float32 weights; the published scaling sums float32 values in numpy
# The age labels include fractional ones on purpose (int(label), as published): their warning
# is tested in test_binning.py.
pytestmark = pytest.mark.filterwarnings("ignore:Binning.integer")


def age_labels(n=3000, seed=3):
    """Imbalanced integer ages in [0, 120] plus some fractional and out-of-range (> 120) ones."""
    y = skewed_int_labels(n, 0, 120, seed=seed, dtype=torch.float64)
    extra = torch.tensor([0.0, 0.5, 30.7, 64.99, 120.0, 120.5, 125.0, 140.0], dtype=torch.float64)
    return torch.cat([y, extra]).float()


def stsb_scores(n=1500, seed=4):
    """STS-B-like float32 scores in [0, 5] with 3 decimals (so many sit on 0.1 multiples),
    skewed, with both ends present."""
    g = gen(seed)
    raw = torch.rand(n, generator=g, dtype=torch.float64)
    raw = raw**0.7 * 5
    scores = np.round(raw.numpy(), 3)
    scores = np.concatenate([scores, [0.0, 5.0, 3.8, 0.1, 4.6]])
    return scores.astype(np.float32)


# =========================================================================== lds_weights, ages
def settings(kernels):
    """(reweight, lds, kernel, ks, sigma): every window with LDS, one setting without."""
    out = []
    for reweight in ("sqrt_inv", "inverse"):
        out += [(reweight, True) + k for k in kernels]
        out.append((reweight, False) + kernels[0])
    return out


@pytest.mark.parametrize("reweight, lds, kernel, ks, sigma", settings(KERNEL_SETTINGS))
def test_lds_weights_integer_matches_published(reweight, lds, kernel, ks, sigma):
    labels = age_labels()
    got = dirfast.lds_weights(labels, dirfast.Binning.integer(121), reweight=reweight, lds=lds, kernel=kernel,
                              ks=ks, sigma=sigma)
    expected = published.published_lds_weights_integer(labels.numpy(), reweight, 121, lds, kernel, ks, sigma)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == labels.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=0)
    assert float(got.double().mean()) == pytest.approx(1.0, rel=1e-5)


def test_lds_weights_defaults_are_published_defaults():
    """Defaults: sqrt_inv, LDS on, gaussian ks=5 sigma=2, clip (5, 1000)."""
    labels = age_labels(seed=5)
    got = dirfast.lds_weights(labels, dirfast.Binning.integer(121))
    expected = published.published_lds_weights_integer(labels.numpy(), "sqrt_inv", 121, True, "gaussian", 5, 2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=0)


def test_lds_weights_integer_dtype_labels_and_numpy():
    ages = skewed_int_labels(800, 0, 120, seed=6, dtype=torch.int64)
    expected = published.published_lds_weights_integer(ages.numpy(), "inverse", 121, True)
    got = dirfast.lds_weights(ages, dirfast.Binning.integer(121), reweight="inverse")
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=0)
    got_np = dirfast.lds_weights(ages.numpy(), dirfast.Binning.integer(121), reweight="inverse")
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
    np.testing.assert_allclose(got_np, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_lds_weights_device_and_shape(device):
    labels = age_labels(500, seed=7).to(device)
    got = dirfast.lds_weights(labels.reshape(-1, 1), dirfast.Binning.integer(121))
    assert got.device == labels.device and got.shape == (labels.numel(), 1) and got.dtype == torch.float32
    expected = published.published_lds_weights_integer(labels.cpu().numpy(), "sqrt_inv", 121, True)
    np.testing.assert_allclose(got.cpu().numpy().reshape(-1), expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("name, value", [("sync", True), ("sync", False), ("process_group", None)])
def test_lds_weights_takes_no_sync(name, value):
    """lds_weights fits the labels it is given alone (their weights average 1): sync=True raised
    Python's duplicate-keyword TypeError; sync and process_group are refused by name."""
    with pytest.raises(TypeError, match=rf"lds_weights\(\) takes no '{name}'"):
        dirfast.lds_weights([1.0, 2.0], dirfast.Binning.integer(10), **{name: value})


def test_lds_inverse_truncation_quirk():
    """Published quirk: with 'inverse' the smoothed base is an int64 array, so scipy truncates each
    smoothed value toward zero; the published weights depend on it."""
    labels = np.array([3] * 10 + [4] * 7 + [6] * 20 + [8] * 3, dtype=np.float32)
    num_bins = 10
    prep = published.published_prepare_integer(labels, "inverse", num_bins, lds=True)
    # the same without truncation, to make sure this case discriminates
    base = np.clip(np.bincount(labels.astype(int), minlength=num_bins), 5, 1000).astype(np.float64)
    smooth = convolve1d(base, published.lds_window("gaussian", 5, 2), mode="constant")
    assert not np.array_equal(np.trunc(smooth), smooth)
    untruncated = np.float32(1 / smooth[labels.astype(int)])
    untruncated = untruncated * (len(labels) / untruncated.sum())
    assert np.max(np.abs(untruncated / prep["weights"] - 1)) > 1e-3
    np.testing.assert_array_equal(prep["effective"], np.trunc(smooth))

    got = dirfast.lds_weights(torch.tensor(labels), dirfast.Binning.integer(num_bins), reweight="inverse")
    np.testing.assert_allclose(got.numpy(), prep["weights"], rtol=RTOL, atol=0)
    lds = dirfast.LDS(dirfast.Binning.integer(num_bins), reweight="inverse").fit(torch.tensor(labels))
    np.testing.assert_array_equal(lds.effective.numpy(), np.trunc(smooth))


def test_lds_sqrt_inv_not_truncated():
    labels = np.array([3] * 10 + [4] * 7 + [6] * 20 + [8] * 3, dtype=np.float32)
    prep = published.published_prepare_integer(labels, "sqrt_inv", 10, lds=True)
    assert not np.array_equal(np.trunc(prep["effective"]), prep["effective"])
    lds = dirfast.LDS(dirfast.Binning.integer(10)).fit(torch.tensor(labels))
    np.testing.assert_allclose(lds.effective.numpy(), prep["effective"], rtol=1e-12)


def test_lds_weights_reweight_none():
    labels = age_labels(300)
    w = dirfast.lds_weights(labels, dirfast.Binning.integer(121), reweight="none", lds=False)
    # the published code returns no weights (None): every sample counts the same
    assert w is None or (w.dtype == torch.float32 and torch.all(w == 1))


# =========================================================================== STS-B
@pytest.mark.parametrize("reweight, lds, kernel, ks, sigma", settings(KERNEL_SETTINGS[:3]))
def test_lds_weights_stsb_matches_published(reweight, lds, kernel, ks, sigma):
    scores = stsb_scores()
    prep = published.published_prepare_stsb(scores, reweight, lds, kernel, ks, sigma)
    got = dirfast.lds_weights(torch.tensor(scores), dirfast.Binning.uniform(0, 5, 50), reweight=reweight, lds=lds,
                              kernel=kernel, ks=ks, sigma=sigma, inverse_clip=None)
    np.testing.assert_allclose(got.numpy(), prep["weights"], rtol=RTOL, atol=0)
    lds_obj = dirfast.LDS(dirfast.Binning.uniform(0, 5, 50), reweight=reweight, lds=lds, kernel=kernel, ks=ks,
                          sigma=sigma, inverse_clip=None).fit(torch.tensor(scores))
    np.testing.assert_array_equal(lds_obj.empirical.numpy(), prep["counts"])
    np.testing.assert_allclose(lds_obj.effective.numpy(), prep["effective"], rtol=1e-12)


# =========================================================================== the LDS class
@pytest.mark.parametrize("reweight", ["sqrt_inv", "inverse"])
@pytest.mark.parametrize("lds_on", [True, False])
def test_lds_fit_distributions_and_weights(reweight, lds_on):
    labels = age_labels(2000, seed=8)
    prep = published.published_prepare_integer(labels.numpy(), reweight, 121, lds_on)
    est = dirfast.LDS(dirfast.Binning.integer(121), reweight=reweight, lds=lds_on)
    assert est.fit(labels) is est
    assert est.empirical.dtype == torch.float64 and est.empirical.shape == (121,)
    assert est.effective.dtype == torch.float64 and est.effective.shape == (121,)
    np.testing.assert_array_equal(est.empirical.numpy(), prep["counts"])
    np.testing.assert_allclose(est.effective.numpy(), prep["effective"], rtol=1e-12)
    w = est.weights(labels)
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), prep["weights"], rtol=RTOL, atol=0)
    torch.testing.assert_close(w, dirfast.lds_weights(labels, dirfast.Binning.integer(121), reweight=reweight,
                                                      lds=lds_on), rtol=RTOL, atol=0)
    # any batch: the training scale, so a sub-batch gets the same weights as in the full set
    pick = torch.randperm(labels.numel(), generator=gen(9))[:64]
    np.testing.assert_allclose(est.weights(labels[pick]).numpy(), prep["weights"][pick.numpy()], rtol=RTOL, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_lds_weights_any_device_and_shape(device):
    labels = age_labels(600, seed=10)
    est = dirfast.LDS(dirfast.Binning.integer(121)).fit(labels)
    batch = labels[:24].reshape(4, 6).to(device)
    w = est.weights(batch)
    assert w.device == batch.device and w.shape == (4, 6) and w.dtype == torch.float32
    torch.testing.assert_close(w.cpu().reshape(-1), est.weights(labels[:24]))


def test_lds_update_accumulates():
    labels = age_labels(1500, seed=11)
    parts = [labels[:400], labels[400:401], labels[401:]]
    streamed = dirfast.LDS(dirfast.Binning.integer(121))
    for p in parts:
        assert streamed.update(p) is streamed
    fitted = dirfast.LDS(dirfast.Binning.integer(121)).fit(labels)
    torch.testing.assert_close(streamed.empirical, fitted.empirical, rtol=0, atol=0)
    torch.testing.assert_close(streamed.effective, fitted.effective)
    torch.testing.assert_close(streamed.weights(labels), fitted.weights(labels))
    # fit starts again from scratch
    refit = dirfast.LDS(dirfast.Binning.integer(121)).fit(labels[:10]).fit(labels)
    torch.testing.assert_close(refit.empirical, fitted.empirical, rtol=0, atol=0)


@pytest.mark.parametrize("reweight", ["sqrt_inv", "inverse"])
def test_lds_state_dict_round_trip(reweight, tmp_path):
    """Through torch.save and torch.load (weights_only=True, its default), with the settings given
    as NumPy values: the state holds them as Python values, which that load takes."""
    labels = age_labels(900, seed=12)
    settings = dict(reweight=np.str_(reweight), kernel=np.str_("laplace"), ks=np.int64(7), sigma=np.float64(3.0),
                    inverse_clip=np.array([5, 1000]), padding=np.str_("constant"))
    est = dirfast.LDS(dirfast.Binning.integer(121), **settings).fit(labels)
    path = tmp_path / "lds.pt"
    torch.save(est.state_dict(), path)
    other = dirfast.LDS(dirfast.Binning.integer(121), reweight=reweight, kernel="laplace", ks=7, sigma=3)
    other.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(other.empirical, est.empirical, rtol=0, atol=0)
    torch.testing.assert_close(other.effective, est.effective, rtol=0, atol=0)
    torch.testing.assert_close(other.weights(labels), est.weights(labels), rtol=0, atol=0)
    # the state is a copy: more updates on one do not change the other
    est.update(labels[:100])
    assert not torch.equal(other.empirical, est.empirical)


def test_bins_the_fit_never_saw_weigh_as_the_sparsest_bin():
    """Without smoothing, a bin with no training label has effective value 0: its labels get the
    weight of the sparsest non-empty bin (not an infinite one, nor the densest bin's)."""
    labels = torch.tensor([1.0] * 9 + [2.0] * 4 + [3.0])
    for reweight in ("sqrt_inv", "inverse"):
        est = dirfast.LDS(dirfast.Binning.integer(10), reweight=reweight, lds=False, inverse_clip=None).fit(labels)
        weights = est.weights(torch.tensor([7.0, 3.0, 1.0]))
        assert weights[0] == weights[1] and weights[1] > weights[2], reweight


@pytest.mark.parametrize("labels, sigma", [([0.0, 0, 1, 1, 1, 5, 5, 9], 0.01),
                                           ([0.0] * 10000 + [5.0], 0.011)])
def test_bins_whose_weight_overflows_weigh_as_the_sparsest_bin(labels, sigma):
    """A narrow Laplace window leaves an empty bin beside a full one an effective value of 1e-40
    or less: its inverse overflowed float32 to inf, the scale went NaN and then 1 (the fitted
    weights averaged 0.695), and with 10000 labels in the full bin the scaled weight of a bin
    whose inverse is finite overflowed too. The fitted weights average 1, and every such bin
    weighs as the sparsest bin whose weight is finite (the fitted bin 9, then 5)."""
    labels = torch.tensor(labels)
    est = dirfast.LDS(dirfast.Binning.integer(10), kernel="laplace", sigma=sigma).fit(labels)
    unseen = [b for b in range(10) if b not in labels.tolist()]
    assert (est.effective[unseen] < 1e-37).all() and (est.effective[unseen] > 0).any()
    assert float(est.weights(labels).double().mean()) == pytest.approx(1.0, rel=1e-6)
    weights = est.weights(torch.tensor(unseen + [labels.max()], dtype=torch.float32))
    assert torch.equal(weights, weights[-1].expand(len(weights)))
    assert torch.equal(est.diagnostics()["weight"].float()[unseen], weights[:-1])


def test_state_dict_keeps_the_settings_of_the_fit():
    """A state carries every setting its counts were smoothed with: a symmetric-padded LDS's
    state does not load into a constant-padded one (its weights differ at the edges)."""
    labels = age_labels(500, seed=13)
    symmetric = dirfast.LDS(dirfast.Binning.integer(121), padding="symmetric").fit(labels)
    state = symmetric.state_dict()
    for key, value in (("padding", "symmetric"), ("bucket_start", 0), ("sigma", 2.0), ("reweight", "sqrt_inv")):
        assert state[key] == value
    constant = dirfast.LDS(dirfast.Binning.integer(121))
    with pytest.raises(ValueError, match="padding"):
        constant.load_state_dict(state)
    with pytest.raises(RuntimeError, match="fit"):  # still unfitted
        constant.weights(labels)


def test_load_takes_a_json_round_trip_and_numpy_scalars():
    """A JSON (or YAML) round trip turns the inverse_clip tuple into a list, and a state built
    with NumPy holds np.bool_ and NumPy numbers: both were refused as differing settings; equal
    values load, different ones are still refused."""
    def make():
        return dirfast.LDS(dirfast.Binning.integer(121), reweight="inverse")

    labels = age_labels(400, seed=15)
    est = make().fit(labels)
    state = est.state_dict()
    loaded = json.loads(json.dumps({key: value.tolist() if isinstance(value, torch.Tensor) else value
                                    for key, value in state.items()}))
    assert loaded["inverse_clip"] == [5, 1000]
    numpy_state = dict(state, fitted=np.bool_(True), lds=np.bool_(True), ks=np.int64(5), sigma=np.float64(2))
    for saved in (loaded, numpy_state):
        other = make()
        other.load_state_dict(saved)
        assert torch.equal(other.weights(labels), est.weights(labels))
    for key, value in (("inverse_clip", [5, 999]), ("inverse_clip", [5, 1000, 1]), ("fitted", np.bool_(False))):
        with pytest.raises(ValueError, match=key if key == "inverse_clip" else "'fitted' is False"):
            make().load_state_dict(dict(loaded, **{key: value}))


def test_load_refuses_a_state_fitted_on_nothing():
    """All-zero counts marked fitted made diagnostics() NaN: such a state is refused, and the
    LDS keeps its fit."""
    est = dirfast.LDS(dirfast.Binning.integer(121)).fit(age_labels(300, seed=14))
    before = est.state_dict()
    with pytest.raises(ValueError, match="are all 0"):
        est.load_state_dict(dict(before, counts=torch.zeros(121, dtype=torch.float64)))
    assert torch.equal(est.empirical, before["counts"])
    assert all(torch.isfinite(column).all() for column in est.diagnostics().values())


def test_load_refuses_counts_that_sum_beyond_float32():
    """Counts each within float32 but summing beyond it: the fitted bins' weights overflowed, were
    floored, and no longer averaged 1. Refused, the LDS keeps its fit."""
    est = dirfast.LDS(dirfast.Binning.integer(121), reweight="inverse", inverse_clip=None).fit(age_labels(300, seed=14))
    before = est.state_dict()
    counts = torch.zeros(121, dtype=torch.float64)
    counts[10:20], counts[100] = 3.4e38, 1.0
    with pytest.raises(ValueError, match="'counts' must sum to at most"):
        est.load_state_dict(dict(before, counts=counts))
    assert torch.equal(est.empirical, before["counts"])
