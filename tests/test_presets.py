"""dirfast.presets: the published settings of each dataset, checked against the published code
(the transcriptions in benchmarks/published.py)."""

import warnings

import numpy as np
import pytest
import torch

import dirfast
from benchmarks import published
from benchmarks.published import PublishedFDS
from dirfast.presets import AGEDB_DIR, IMDB_WIKI_DIR, NYUD2_DIR, STS_B_DIR
from testing import gen


def test_lookup_by_name():
    assert dirfast.presets.get("agedb-dir") is AGEDB_DIR
    assert dirfast.presets.get("STS_B_DIR") is STS_B_DIR
    assert set(dirfast.presets.PRESETS) == {"AgeDB-DIR", "IMDB-WIKI-DIR", "STS-B-DIR", "NYUD2-DIR"}


@pytest.mark.parametrize("preset, bucket_num, bucket_start, clips, fill", [
    (AGEDB_DIR, 100, 3, (0.1, 10.0), False), (IMDB_WIKI_DIR, 100, 0, (0.1, 10.0), False),
    (STS_B_DIR, 50, 0, (0.5, 2.0), True), (NYUD2_DIR, 100, 7, (0.2, 5.0), False)])
def test_fds_settings(preset, bucket_num, bucket_start, clips, fill):
    """The published FDS arguments (train.py), clip (calibrate_mean_var in utils.py / util.py),
    fill of empty buckets (STS-B fds.py) and the README's window (gaussian, 5, 2)."""
    fds = preset.fds(feature_dim=8)
    assert (fds.bucket_num, fds.bucket_start) == (bucket_num, bucket_start)
    assert (fds.clip_min, fds.clip_max) == clips and fds.fill_empty is fill
    assert fds.momentum == 0.9 and (fds.start_update, fds.start_smooth) == (0, 1)
    np.testing.assert_allclose(fds.kernel_window.numpy(), published.fds_window("gaussian", 5, 2), rtol=1e-6)
    assert preset.fds(feature_dim=8, sigma=1).sigma == 1  # any setting can be overridden


def test_stsb_fds_is_the_published_module():
    """The STS-B preset's FDS through a training schedule, against the published loop on the
    published fds.py buckets (float32 edges, of float64 scores here) with util.py's clip of
    (0.5, 2) and the fill of empty buckets."""
    d = 4
    fds = STS_B_DIR.fds(feature_dim=d)
    pub = PublishedFDS(d, bucket_num=50, bucket_start=0, clip_min=0.5, clip_max=2.0)
    for epoch in range(3):
        scores = np.round(np.random.default_rng(epoch).random(150) * 5, 1)  # float64, on the edges
        buckets = torch.tensor([float(published.published_stsb_fds_bucket(s)) for s in scores])
        x = torch.randn(150, d, generator=gen(30 + epoch)) * 2 + 0.5
        if epoch >= 1:
            got = fds.smooth(x.clone(), torch.from_numpy(scores).unsqueeze(1), epoch)
            torch.testing.assert_close(got, pub.smooth(x.clone(), buckets.unsqueeze(1), epoch), rtol=2e-5, atol=2e-5)
        fds.update_last_epoch_stats(epoch)
        pub.update_last_epoch_stats(epoch)
        fds.update_running_stats(x, torch.from_numpy(scores), epoch)
        pub.update_running_stats(x, buckets, epoch)
        published.fill_empty(pub.running_mean, pub.running_var, buckets.long().tolist(), 0, 50)
        for name in ("running_mean", "running_var", "smoothed_mean_last_epoch", "smoothed_var_last_epoch",
                     "num_samples_tracked"):
            torch.testing.assert_close(getattr(fds, name), getattr(pub, name), rtol=2e-5, atol=2e-5)


def test_agedb_lds_weights():
    """AgeDB-DIR's LDS smooths all 121 age bins (datasets.py _prepare_weights): its LDS starts at
    bin 0, not at FDS's bucket_start of 3, so ages 0 to 2 keep bins of their own."""
    ages = np.concatenate([np.random.default_rng(9).integers(0, 101, 2000), [0, 1, 1, 2]]).astype(np.float32)
    expected = published.published_lds_weights_integer(ages, "sqrt_inv", lds=True)
    np.testing.assert_array_equal(AGEDB_DIR.lds_weights(ages), expected)


@pytest.mark.parametrize("name, value", [("sync", True), ("process_group", None)])
def test_lds_weights_takes_no_sync(name, value):
    """Preset.lds_weights fits the labels it is given alone: sync=True raised Python's
    duplicate-keyword TypeError; sync and process_group are refused by name."""
    with pytest.raises(TypeError, match=rf"Preset\.lds_weights\(\) takes no '{name}'"):
        AGEDB_DIR.lds_weights(np.arange(10.0), **{name: value})


def nyud2_depths(counts):
    """Depths with ``counts[b]`` pixels in each 0.1 m bucket b (at the bucket's centre)."""
    return torch.cat([torch.full((int(c),), (b + 0.5) / 10) for b, c in enumerate(counts) if c])


@pytest.mark.parametrize("reweight, lds", [("inverse", True), ("sqrt_inv", True), ("inverse", False), ("sqrt_inv", False)])
def test_nyud2_lds_weights(reweight, lds):
    """loaddata.py _get_bucket_weights: counts from bucket 7 on, smoothed with scipy's reflect
    mode, no clip, buckets below 7 weighted as 7; each pixel's weight is its bucket's, the same
    bits (scaled in float64, rounded once, as published)."""
    counts = np.concatenate([np.zeros(7, dtype=np.int64), np.random.default_rng(3).integers(1, 60, 93)])
    expected = published.published_nyud2_bucket_weights(counts, reweight, lds)
    est = NYUD2_DIR.lds(reweight=reweight, lds=lds).fit(nyud2_depths(counts))
    centres = (torch.arange(100, dtype=torch.float32) + 0.5) / 10
    np.testing.assert_array_equal(est.weights(centres).numpy(), expected)
    depth_map = torch.rand(2, 1, 8, 9, generator=gen(4)) * 11  # [B, 1, H, W]: weights of the same shape
    bins = [published.published_nyud2_bin(np.float32(v)) for v in depth_map.reshape(-1).tolist()]
    np.testing.assert_array_equal(est.weights(depth_map).reshape(-1).numpy(), np.array(expected)[bins])
    depths = nyud2_depths(counts)  # the one-call form scales from the counts too (lds_scale="counts")
    bins = [published.published_nyud2_bin(np.float32(v)) for v in depths.tolist()]
    np.testing.assert_array_equal(NYUD2_DIR.lds_weights(depths, reweight=reweight, lds=lds).numpy(),
                                  np.array(expected)[bins])


def test_nyud2_fds_buckets():
    """models/fds.py _get_bucket_idx: max(min(int(float32(depth) * float32(10)), 99), 7)."""
    depth = torch.rand(3000, generator=gen(5), dtype=torch.float64) * 11
    fds = NYUD2_DIR.fds(feature_dim=1)
    fds.update_running_stats(torch.zeros(3000, 1), depth, 0)
    buckets = [max(min(int(np.float32(v) * np.float32(10)), 99), 7) - 7 for v in depth.tolist()]
    np.testing.assert_array_equal(fds.num_samples_tracked.numpy(), np.bincount(buckets, minlength=93))


def test_nyud2_shot_regions():
    depth = torch.rand(4000, generator=gen(6)) * 10
    preds = depth + torch.randn(4000, generator=gen(7)) * 0.3
    got = NYUD2_DIR.shot_metrics(preds, depth)
    bins = np.array([published.published_nyud2_bin(np.float32(v)) for v in depth.tolist()])
    for region, key in (("many", "many"), ("median", "medium"), ("low", "few")):
        mask = np.isin(bins, published.NYUD2_SHOT_BINS[key])
        err = (preds - depth).double().numpy()[mask]
        assert got[region]["mse"] == pytest.approx(np.mean(err ** 2), rel=1e-9)


def test_fds_default_binning_warns_about_continuous_labels():
    """FDS(bucket_num=50) bins by int(label): 0-5 scores would fill 6 buckets. The call that
    reads the labels on the host says so, and names the binning to use."""
    scores = torch.rand(100, generator=gen(8)) * 5
    with pytest.warns(UserWarning, match="STS_B_DIR"):
        dirfast.FDS(4, bucket_num=50, bucket_start=0).update_running_stats(torch.randn(100, 4), scores, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        STS_B_DIR.fds(4).update_running_stats(torch.randn(100, 4), scores, 0)
        STS_B_DIR.lds().fit(scores)


def test_conr_settings_are_the_published_ones():
    """ConR per dataset (SPEC.md): AgeDB-DIR's function uses t = 0.07 whatever its t (0.2) says;
    NYUD2-DIR's is the per-image form, called by its train.py with t = 0.2 (the -t default);
    STS-B-DIR has none."""
    from dirfast.presets import AGEDB_DIR, IMDB_WIKI_DIR, NYUD2_DIR, STS_B_DIR

    for preset, expected in ((AGEDB_DIR, (1.0, 0.07, 0.01, "published")), (IMDB_WIKI_DIR, (1.0, 0.07, 0.01, "published")),
                             (NYUD2_DIR, (0.2, 0.2, 0.2, "nyud2"))):
        loss = preset.conr()
        assert (loss.w, loss.t, loss.e, loss.form) == expected, preset.name
    assert AGEDB_DIR.conr(w=2.0).w == 2.0
    with pytest.raises(ValueError, match="STS-B-DIR"):
        STS_B_DIR.conr()
