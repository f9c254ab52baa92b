"""dirfast.FDS against the published module (benchmarks/published.py PublishedFDS) and its quirks."""

import copy

import pytest
import torch

import dirfast

from benchmarks import published
from benchmarks.published import PublishedFDS
from dirfast.presets import NYUD2_DIR
from test_bin_stats import loop_bin_stats
from test_calibrate import loop_calibrate, loop_calibrate_scale
from test_smooth_bins import fds_smooth_conv1d, loop_smooth_bins
from testing import DEVICES, LOW_PRECISION, backend_device_params, dtype_params, gen, rand_int_labels, tol

BUFFERS = ["epoch", "running_mean", "running_var", "running_mean_last_epoch", "running_var_last_epoch",
           "smoothed_mean_last_epoch", "smoothed_var_last_epoch", "num_samples_tracked"]
STATS_TOL = dict(rtol=2e-5, atol=2e-5)  # float32 statistics, different summation orders


def labels_with_edges(n, bucket_start, bucket_num, seed, low=None, high=None):
    """Integer-valued float labels over [low, high] (default: 2 beyond each end), with both
    edge buckets present (the published module then clamps outliers into them, as dirfast)."""
    low = bucket_start - 2 if low is None else low
    high = bucket_num + 1 if high is None else high
    y = rand_int_labels(n, max(low, 0), high, seed=seed)
    y[0], y[1] = bucket_start, bucket_num - 1
    return y


def features(n, d, seed, dtype=torch.float32, scale=1.0):
    x = torch.randn(n, d, generator=gen(seed), dtype=torch.float64) * scale + 0.5
    return x.to(dtype)


def assert_same_state(fds, pub, names=BUFFERS, **kw):
    t = dict(STATS_TOL)
    t.update(kw)
    for name in names:
        got, expected = getattr(fds, name), getattr(pub, name)
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got.cpu().double(), expected.cpu().double(), **t, msg=lambda m: f"{name}: {m}")


def run_schedule(fds, pub, epochs, n, d, bucket_start, bucket_num, *, dtype=torch.float32, device="cpu", seed=0,
                 label_shape="flat", start=0):
    """The published training loop: each epoch smooths a training batch (from start_smooth on),
    then snapshots (update_last_epoch_stats) and updates the running statistics. Compares
    states and smoothed outputs after every step."""
    labels = labels_with_edges(n, bucket_start, bucket_num, seed).to(device)
    for epoch in range(start, start + epochs):
        x = features(n, d, seed + 10 * epoch + 1, dtype).to(device)
        ref_in = x.float().clone()
        got = fds.smooth(x, labels.unsqueeze(1) if label_shape == "column" else labels, epoch)
        assert got is x, "smooth returns the tensor it was given"
        expected = pub.smooth(ref_in, labels.unsqueeze(1), epoch)
        torch.testing.assert_close(got.cpu().double(), expected.to(dtype).cpu().double(), **smooth_tol(dtype))

        fds.update_last_epoch_stats(epoch)
        pub.update_last_epoch_stats(epoch)
        assert_same_state(fds, pub)

        y = features(n, d, seed + 10 * epoch + 2, dtype).to(device)
        fds.update_running_stats(y, labels if label_shape == "flat" else labels.unsqueeze(1), epoch)
        pub.update_running_stats(y.float(), labels, epoch)
        assert_same_state(fds, pub)
    return labels


def smooth_tol(dtype):
    if dtype in LOW_PRECISION:
        return tol(dtype)
    return dict(rtol=2e-5, atol=5e-5)


# =========================================================================== parity
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 3, 8])
@pytest.mark.parametrize("label_shape", ["flat", "column"])
def test_fds_matches_published_defaults(device, d, label_shape):
    bucket_num, bucket_start = 14, 3
    fds = dirfast.FDS(d, bucket_num=bucket_num, bucket_start=bucket_start).to(device)
    pub = PublishedFDS(d, bucket_num=bucket_num, bucket_start=bucket_start, device=device)
    run_schedule(fds, pub, 4, 157, d, bucket_start, bucket_num, device=device, seed=d, label_shape=label_shape)


@pytest.mark.parametrize("backend, device", list(backend_device_params()))
def test_fds_matches_published_each_backend(backend, device):
    """The whole published loop with every backend doing the statistics and the calibration."""
    bucket_num, bucket_start, d = 12, 2, 5
    with dirfast.use_backend(backend):
        fds = dirfast.FDS(d, bucket_num=bucket_num, bucket_start=bucket_start).to(device)
        pub = PublishedFDS(d, bucket_num=bucket_num, bucket_start=bucket_start, device=device)
        run_schedule(fds, pub, 3, 97, d, bucket_start, bucket_num, device=device, seed=13)


@pytest.mark.parametrize("kernel, ks, sigma", [("gaussian", 5, 2), ("triang", 5, 2), ("laplace", 5, 2),
                                               ("gaussian", 3, 1), ("laplace", 7, 3), ("triang", 9, 1)])
@pytest.mark.parametrize("momentum", [0.9, 0.5, None])
def test_fds_matches_published_settings(kernel, ks, sigma, momentum):
    bucket_num, bucket_start = 13, 0
    kw = dict(bucket_num=bucket_num, bucket_start=bucket_start, kernel=kernel, ks=ks, sigma=sigma, momentum=momentum)
    fds, pub = dirfast.FDS(4, **kw), PublishedFDS(4, **kw)
    run_schedule(fds, pub, 4, 120, 4, bucket_start, bucket_num, seed=ks)


@pytest.mark.parametrize("start_update, start_smooth", [(2, 3), (1, 1), (0, 2)])
def test_fds_matches_published_start_epochs(start_update, start_smooth):
    kw = dict(bucket_num=10, bucket_start=2, start_update=start_update, start_smooth=start_smooth)
    fds, pub = dirfast.FDS(3, **kw), PublishedFDS(3, **kw)
    assert float(fds.epoch) == start_update
    run_schedule(fds, pub, 4, 90, 3, 2, 10, seed=4, start=start_update)


@pytest.mark.parametrize("dtype", list(dtype_params(LOW_PRECISION)))
def test_fds_low_precision_features(dtype):
    """float16/bfloat16 features: statistics kept in float32, equal to the published module run
    on the same values in float32; smooth writes the low-precision tensor in place."""
    fds, pub = dirfast.FDS(5, bucket_num=10, bucket_start=1), PublishedFDS(5, bucket_num=10, bucket_start=1)
    run_schedule(fds, pub, 3, 100, 5, 1, 10, dtype=dtype, seed=6)
    for name in BUFFERS[1:]:
        assert getattr(fds, name).dtype == torch.float32, name


def test_fds_momentum_none_is_running_average():
    """momentum=None: after epochs e0 < e1 < e2 a bucket's running mean is the sample-weighted
    average of the per-epoch batch means (from start_update on)."""
    fds = dirfast.FDS(2, bucket_num=4, bucket_start=0, momentum=None)
    labels = torch.tensor([0.0, 0, 1, 2, 3, 3, 3])
    batches = [features(7, 2, s) for s in (1, 2, 3)]
    for epoch, x in enumerate(batches):
        fds.update_last_epoch_stats(epoch)
        fds.update_running_stats(x, labels, epoch)
    everything = torch.cat(batches).double()
    all_labels = labels.repeat(3)
    for k in range(4):
        torch.testing.assert_close(fds.running_mean[k].double(), everything[all_labels == k].mean(0), **STATS_TOL)
    torch.testing.assert_close(fds.num_samples_tracked, torch.tensor([6.0, 3, 3, 9]))


# =========================================================================== published quirks
def test_fds_snapshot_aliasing_default():
    """Published quirk: running_*_last_epoch = running_* without a copy, so after the snapshot the
    last-epoch statistics follow every later running update; the smoothed ones do not."""
    fds = dirfast.FDS(3, bucket_num=8, bucket_start=0)
    labels = labels_with_edges(60, 0, 8, seed=1)
    fds.update_running_stats(features(60, 3, 1), labels, 0)
    fds.update_last_epoch_stats(1)
    snap_mean = fds.running_mean.clone()
    smoothed = fds.smoothed_mean_last_epoch.clone(), fds.smoothed_var_last_epoch.clone()
    fds.update_running_stats(features(60, 3, 2, scale=3.0), labels, 1)
    assert not torch.allclose(fds.running_mean, snap_mean)
    torch.testing.assert_close(fds.running_mean_last_epoch, fds.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(fds.running_var_last_epoch, fds.running_var, rtol=0, atol=0)
    torch.testing.assert_close(fds.smoothed_mean_last_epoch, smoothed[0], rtol=0, atol=0)
    torch.testing.assert_close(fds.smoothed_var_last_epoch, smoothed[1], rtol=0, atol=0)
    # and the published module does the same
    pub = PublishedFDS(3, bucket_num=8, bucket_start=0)
    pub.update_running_stats(features(60, 3, 1), labels, 0)
    pub.update_last_epoch_stats(1)
    pub.update_running_stats(features(60, 3, 2, scale=3.0), labels, 1)
    assert_same_state(fds, pub)


@pytest.mark.parametrize("route", ["into a new module", "into a module that shares", "assign, its own checkpoint",
                                   "assign, a published checkpoint"])
def test_loads_keep_the_published_sharing(route):
    """A load goes as the published module's shared tensors do, then an update before the next
    snapshot tells: copied into a new module, the statistics no longer share; copied into one
    that shares, they share on (a checkpoint's last-epoch values, copied last, in both); assigned,
    they share as the checkpoint's tensors do (a published checkpoint's share storage, a dirfast
    checkpoint's metadata says so). The FDS keeps its nine buffers throughout."""
    labels = labels_with_edges(60, 0, 8, seed=1)
    pub, fds = PublishedFDS(3, bucket_num=8, bucket_start=0), dirfast.FDS(3, bucket_num=8, bucket_start=0)
    checkpoints = []
    for module in (pub, fds):
        module.update_running_stats(features(60, 3, 1), labels, 0)
        module.update_last_epoch_stats(1)
        checkpoints.append(copy.deepcopy(module.state_dict()))  # as torch.save and torch.load leave it
        module.update_running_stats(features(60, 3, 2, scale=2.0), labels, 1)
    if route == "into a module that shares":  # a checkpoint whose running statistics differ
        for state in checkpoints:
            state["running_mean"] = state["running_mean"] + 1.0
    else:
        pub, fds = PublishedFDS(3, bucket_num=8, bucket_start=0), dirfast.FDS(3, bucket_num=8, bucket_start=0)
        if route == "assign, a published checkpoint":
            checkpoints[1] = copy.deepcopy(checkpoints[0])
    for module, state in zip((pub, fds), checkpoints):
        module.load_state_dict(state, assign=route.startswith("assign"))
    assert_same_state(fds, pub)
    for module in (pub, fds):
        module.update_running_stats(features(60, 3, 3, scale=3.0), labels, 1)
    assert_same_state(fds, pub)
    x, y = features(16, 3, 4), labels[:16].unsqueeze(1)
    torch.testing.assert_close(fds.smooth(x.clone(), y, 1), pub.smooth(x.clone(), y, 1))
    assert len(list(fds.buffers())) == 9


def _made_in_inference_mode(make):
    with torch.inference_mode():
        return make()


def test_state_made_in_inference_mode_is_refused_before_anything_is_written():
    """An FDS built under torch.inference_mode: every update outside it raises a RuntimeError
    saying so, with nothing written (torch refused after the first write, leaving the module
    half-updated); inside inference mode it works."""
    labels = labels_with_edges(60, 0, 8, seed=1)
    fds = _made_in_inference_mode(lambda: dirfast.FDS(3, bucket_num=8, bucket_start=0))
    before = {name: value.clone() for name, value in fds.state_dict().items()}
    calls = {"accumulate": lambda: fds.accumulate(features(60, 3, 1), labels),
             "update_running_stats": lambda: fds.update_running_stats(features(60, 3, 1), labels, 0),
             "update_running_stats(epoch)": lambda: fds.update_running_stats(epoch=0),
             "update_last_epoch_stats": lambda: fds.update_last_epoch_stats(1), "reset": fds.reset,
             "reset_parameters": fds.reset_parameters, "clear_accumulated": fds.clear_accumulated,
             # copied in place (torch copied the buffers, then the window raised: a half-made load)
             "load_state_dict": lambda: fds.load_state_dict(trained.state_dict())}
    trained = dirfast.FDS(3, bucket_num=8, bucket_start=0)
    trained.update_running_stats(features(60, 3, 1), labels, 0)
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="made under torch.inference_mode"):
            call()
        for key, value in fds.state_dict().items():
            assert torch.equal(value, before[key]), (name, key)
    with torch.inference_mode():
        fds.accumulate(features(60, 3, 1), labels)
        fds.update_running_stats(epoch=0)
    assert fds.num_samples_tracked.sum() == 60
    # assigned, the statistics are the checkpoint's (copies of their own), and the rest is rebuilt
    # outside it
    fds = _made_in_inference_mode(lambda: dirfast.FDS(3, bucket_num=8, bucket_start=0))
    fds.load_state_dict(trained.state_dict(), assign=True)
    fds.accumulate(features(60, 3, 2), labels)
    fds.update_running_stats(epoch=1)
    assert fds.num_samples_tracked.sum() == 120


def test_an_assigned_load_keeps_the_module_dtypes_and_memory_of_its_own():
    """assign=True with a checkpoint converted to float16, expanded, or requiring grad: the module
    keeps its dtypes (a float16 sample count saturated at 65504, and momentum=None then froze the
    statistics) and buffers it can update; the values are the checkpoint's."""
    labels = labels_with_edges(60, 0, 8, seed=1)
    source = dirfast.FDS(3, bucket_num=8, bucket_start=0, momentum=None)
    source.update_running_stats(features(60, 3, 1), labels, 0)
    dtypes = {name: value.dtype for name, value in source.state_dict().items()}
    changes = {"float16": lambda v: v.half(), "expanded": lambda v: v.reshape(-1)[:1].expand_as(v) if v.numel() else v,
               "requires grad": lambda v: v.clone().requires_grad_() if v.is_floating_point() else v,
               "inference": lambda v: _made_in_inference_mode(lambda: v.clone())}
    for how, change in changes.items():
        state = {name: change(value) for name, value in source.state_dict().items()}
        fds = dirfast.FDS(3, bucket_num=8, bucket_start=0, momentum=None)
        fds.load_state_dict(state, assign=True)
        for name, value in fds.state_dict().items():
            assert value.dtype == dtypes[name] and not value.requires_grad, (how, name)
            torch.testing.assert_close(value, state[name].detach().to(value.dtype), rtol=0, atol=0)
        tracked = fds.num_samples_tracked.clone()
        fds.update_running_stats(features(60, 3, 2), labels, 1)  # expanded or a grad leaf: the write raised
        assert fds.num_samples_tracked.sum() == tracked.sum() + 60, how


def test_an_assigned_load_follows_only_where_the_checkpoint_says():
    """An assign=True load follows only where the checkpoint's metadata says it was taken while
    following (views of one flat buffer are not shared statistics), and never with
    copy_snapshot=True, whose last-epoch statistics are a real copy."""
    labels = labels_with_edges(60, 0, 8, seed=1)
    source = dirfast.FDS(3, bucket_num=8, bucket_start=0)
    source.update_running_stats(features(60, 3, 1), labels, 0)
    source.update_last_epoch_stats(1)
    following = source.state_dict()
    flat = torch.cat([following[name].reshape(-1) for name in BUFFERS])  # one storage, as some loaders give
    views, start = {}, 0
    for name in BUFFERS:
        views[name] = flat[start:start + following[name].numel()].view_as(following[name])
        start += following[name].numel()
    in_views = type(following)(following, **views)  # an OrderedDict whose metadata says "not following"
    in_views._metadata = {"": dict(following._metadata[""], snapshot_follows=False)}
    cases = ((dirfast.FDS(3, bucket_num=8, bucket_start=0, copy_snapshot=True), following, False),
             (dirfast.FDS(3, bucket_num=8, bucket_start=0), in_views, False),
             (dirfast.FDS(3, bucket_num=8, bucket_start=0), following, True))
    for fds, state, follows in cases:
        fds.load_state_dict(copy.deepcopy(state), assign=True)  # assigned tensors become the module's
        before = fds.running_mean_last_epoch.clone()
        fds.update_running_stats(features(60, 3, 2, scale=2.0), labels, 1)
        assert fds._snapshot_follows == follows
        assert torch.equal(fds.running_mean_last_epoch, fds.running_mean if follows else before)


def test_fds_copy_snapshot():
    fds = dirfast.FDS(3, bucket_num=8, bucket_start=0, copy_snapshot=True)
    labels = labels_with_edges(60, 0, 8, seed=1)
    fds.update_running_stats(features(60, 3, 1), labels, 0)
    fds.update_last_epoch_stats(1)
    snap_mean, snap_var = fds.running_mean.clone(), fds.running_var.clone()
    fds.update_running_stats(features(60, 3, 2, scale=3.0), labels, 1)
    assert not torch.allclose(fds.running_mean, snap_mean)
    torch.testing.assert_close(fds.running_mean_last_epoch, snap_mean, rtol=0, atol=0)
    torch.testing.assert_close(fds.running_var_last_epoch, snap_var, rtol=0, atol=0)
    assert fds.running_mean_last_epoch.data_ptr() != fds.running_mean.data_ptr()
    # smooth then uses the real snapshot: compare with the oracle calibration
    x = features(60, 3, 3)
    expected = loop_calibrate(x, labels.long().clamp(0, 7), snap_mean, snap_var, fds.smoothed_mean_last_epoch,
                                fds.smoothed_var_last_epoch)
    got = fds.smooth(x, labels.unsqueeze(1), 1)
    torch.testing.assert_close(got.double(), expected, **smooth_tol(torch.float32))


def test_fds_smoothed_stats_are_reflect_convolution():
    fds = dirfast.FDS(4, bucket_num=11, bucket_start=1, kernel="laplace", ks=7, sigma=2)
    labels = labels_with_edges(200, 1, 11, seed=2)
    fds.update_running_stats(features(200, 4, 5), labels, 0)
    fds.update_last_epoch_stats(1)
    window = published.fds_window("laplace", 7, 2)
    torch.testing.assert_close(fds.smoothed_mean_last_epoch.double(),
                               fds_smooth_conv1d(fds.running_mean, window), **STATS_TOL)
    torch.testing.assert_close(fds.smoothed_var_last_epoch.double(),
                               fds_smooth_conv1d(fds.running_var, window), **STATS_TOL)


@pytest.mark.parametrize("bucket_num, bucket_start, ks", [(4, 1, 9), (5, 3, 5), (4, 3, 5), (3, 0, 7)])
def test_fds_window_wider_than_buckets(bucket_num, bucket_start, ks):
    """K <= h (the published F.pad reflect would fail): reflection applied repeatedly; K == 1
    smooths to the running value itself."""
    d = 3
    fds = dirfast.FDS(d, bucket_num=bucket_num, bucket_start=bucket_start, ks=ks)
    labels = labels_with_edges(50, bucket_start, bucket_num, seed=3)
    x = features(50, d, 7)
    fds.update_running_stats(x, labels, 0)
    buckets = labels.long().clamp(bucket_start, bucket_num - 1) - bucket_start
    _, mean, var = loop_bin_stats(x, buckets, bucket_num - bucket_start)
    torch.testing.assert_close(fds.running_mean.double(), mean, **STATS_TOL)
    torch.testing.assert_close(fds.running_var.double(), var, **STATS_TOL)
    fds.update_last_epoch_stats(1)
    window = published.fds_window("gaussian", ks, 2)
    torch.testing.assert_close(fds.smoothed_mean_last_epoch.double(), loop_smooth_bins(mean, window), **STATS_TOL)
    torch.testing.assert_close(fds.smoothed_var_last_epoch.double(), loop_smooth_bins(var, window), **STATS_TOL)
    y = features(50, d, 8)
    expected = loop_calibrate(y, buckets, fds.running_mean_last_epoch, fds.running_var_last_epoch,
                                fds.smoothed_mean_last_epoch, fds.smoothed_var_last_epoch)
    torch.testing.assert_close(fds.smooth(y, labels, 1).double(), expected, **smooth_tol(torch.float32))


def test_fds_smooth_returns_same_tensor_and_gradients_flow():
    d = 4
    fds = dirfast.FDS(d, bucket_num=9, bucket_start=2)
    pub = PublishedFDS(d, bucket_num=9, bucket_start=2)
    labels = labels_with_edges(80, 2, 9, seed=4)
    for m in (fds, pub):
        m.update_running_stats(features(80, d, 1, scale=2.0), labels, 0)
        m.update_last_epoch_stats(1)
    grads = []
    for m in (fds, pub):
        leaf = features(80, d, 2).requires_grad_(True)
        feats = leaf * 1.0  # a non-leaf, as an encoder's output
        out = m.smooth(feats, labels.unsqueeze(1), 1)
        assert out is feats
        (out * features(80, d, 3)).sum().backward()
        grads.append(leaf.grad)
    assert not torch.allclose(grads[0], features(80, d, 3))  # the calibration scales the gradient
    torch.testing.assert_close(grads[0], grads[1], **STATS_TOL)
    buckets = labels.long().clamp(2, 8) - 2
    expected = features(80, d, 3).double() * loop_calibrate_scale(buckets, fds.running_var_last_epoch,
                                                                    fds.smoothed_var_last_epoch, d)
    torch.testing.assert_close(grads[0].double(), expected, **STATS_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_fds_smooth_out_of_place_follows_a_relu(device):
    """inplace=False returns a new tensor with the in-place result and its gradients, leaves the
    features as they were, and works on a ReLU's output, which the in-place form refuses (with a
    hint naming inplace=False) before writing anything."""
    d = 4
    fds = dirfast.FDS(d, bucket_num=9, bucket_start=2).to(device)
    labels = labels_with_edges(80, 2, 9, seed=4).to(device)
    fds.update_running_stats(features(80, d, 1, scale=2.0).to(device), labels, 0)
    fds.update_last_epoch_stats(1)
    weight = torch.randn(d, d, generator=gen(6)).to(device)
    results = []
    for inplace, activation in ((True, lambda t: t * 1.0), (False, lambda t: t * 1.0), (False, torch.relu)):
        leaf = features(80, d, 2).to(device).requires_grad_(True)
        feats = activation(leaf @ weight)
        before = feats.detach().clone()
        out = fds.smooth(feats, labels, 1, inplace=inplace)
        assert (out is feats) == inplace
        if not inplace:
            torch.testing.assert_close(feats, before, rtol=0, atol=0)
        (out * features(80, d, 3).to(device)).sum().backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    relu_out = torch.relu(features(80, d, 2).to(device).requires_grad_(True) @ weight)
    torch.testing.assert_close(results[2][0], loop_calibrate(
        relu_out.detach().cpu(), labels.cpu().long().clamp(2, 8) - 2, *(t.cpu() for t in (
            fds.running_mean_last_epoch, fds.running_var_last_epoch, fds.smoothed_mean_last_epoch,
            fds.smoothed_var_last_epoch))).float().to(device), **STATS_TOL)
    before = relu_out.detach().clone()
    with pytest.raises(RuntimeError, match="inplace=False"):
        fds.smooth(relu_out, labels, 1)
    torch.testing.assert_close(relu_out.detach(), before, rtol=0, atol=0)
    with torch.no_grad():  # nothing to break without autograd: in place as published
        assert fds.smooth(relu_out.detach(), labels, 1) is not None


def test_fds_dense_smooth_takes_the_published_nyud2_model():
    """The published NYUD2-DIR model smooths a ReLU's output and returns that output, unchanged,
    for the next statistics (models/modules.py, R.forward): dirfast's default gives the
    calibrated maps as a new tensor, so the backward runs and the returned features are the
    ReLU's own. In place, the call is refused as for rows."""
    fds = NYUD2_DIR.fds(feature_dim=4)
    depth = torch.rand(2, 1, 6, 5, generator=gen(1)) * 10
    fds.update_running_stats(torch.randn(2, 4, 6, 5, generator=gen(2)), depth, 0)
    fds.update_last_epoch_stats(1)
    conv = torch.nn.Conv2d(3, 4, 1)
    x1 = torch.relu(conv(torch.randn(2, 3, 6, 5, generator=gen(3))))
    before = x1.detach().clone()
    x1_s = fds.smooth(x1, depth, 1)
    x1_s.square().sum().backward()
    assert torch.equal(x1.detach(), before) and not torch.equal(x1_s.detach(), before)
    assert conv.weight.grad is not None
    with pytest.raises(RuntimeError, match="inplace=False"):
        fds.smooth(torch.relu(conv(torch.randn(2, 3, 6, 5))), depth, 1, inplace=True)


def test_fds_smooth_before_start_smooth_is_identity():
    fds = dirfast.FDS(3, bucket_num=6, bucket_start=0, start_smooth=2)
    labels = labels_with_edges(30, 0, 6, seed=5)
    fds.update_running_stats(features(30, 3, 1, scale=4.0), labels, 0)
    fds.update_last_epoch_stats(1)
    x = features(30, 3, 2)
    before = x.clone()
    assert fds.smooth(x, labels, 1) is x
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    fds.smooth(x, labels, 2)
    assert not torch.allclose(x, before)


def test_fds_old_epoch_ignored():
    fds = dirfast.FDS(3, bucket_num=6, bucket_start=0)
    labels = labels_with_edges(30, 0, 6, seed=6)
    fds.update_running_stats(features(30, 3, 1), labels, 0)
    fds.update_last_epoch_stats(1)
    fds.update_running_stats(features(30, 3, 2), labels, 1)
    state = copy.deepcopy(fds.state_dict())
    fds.update_running_stats(features(30, 3, 3, scale=5.0), labels, 0)  # epoch < self.epoch
    for name, value in fds.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)


def test_fds_update_last_epoch_only_next_epoch():
    fds = dirfast.FDS(2, bucket_num=6, bucket_start=0)
    labels = labels_with_edges(30, 0, 6, seed=7)
    fds.update_running_stats(features(30, 2, 1, scale=3.0), labels, 0)
    for epoch in (0, 2, 5, -1):
        fds.update_last_epoch_stats(epoch)
        assert float(fds.epoch) == 0
        torch.testing.assert_close(fds.smoothed_var_last_epoch, torch.ones(6, 2), rtol=0, atol=0)
    fds.update_last_epoch_stats(1)
    assert float(fds.epoch) == 1
    assert not torch.allclose(fds.smoothed_var_last_epoch, torch.ones(6, 2))


def test_fds_first_update_replaces():
    """factor = 0 at start_update: the initial (0, 1) statistics are replaced, not blended."""
    fds = dirfast.FDS(2, bucket_num=4, bucket_start=0, start_update=0)
    labels = torch.tensor([0.0, 0, 0, 1, 2, 2, 3])
    x = features(7, 2, 9)
    fds.update_running_stats(x, labels, 0)
    _, mean, var = loop_bin_stats(x, labels.long(), 4)
    torch.testing.assert_close(fds.running_mean.double(), mean, **STATS_TOL)
    torch.testing.assert_close(fds.running_var.double(), var, **STATS_TOL)
    assert torch.all(fds.running_var[1] == 0), "one sample: variance 0"


def test_fds_empty_buckets_keep_values():
    fds = dirfast.FDS(2, bucket_num=8, bucket_start=0)
    pub = PublishedFDS(2, bucket_num=8, bucket_start=0)
    labels0 = torch.arange(8.0).repeat(5)
    labels1 = torch.tensor([0.0, 0, 3, 3, 3, 7, 7])  # buckets 1, 2, 4, 5, 6 empty this epoch
    for m in (fds, pub):
        m.update_running_stats(features(40, 2, 1), labels0, 0)
        m.update_last_epoch_stats(1)
    before = fds.running_mean.clone()
    for m in (fds, pub):
        m.update_running_stats(features(7, 2, 2), labels1, 1)
    assert_same_state(fds, pub)
    torch.testing.assert_close(fds.running_mean[[1, 2, 4, 5, 6]], before[[1, 2, 4, 5, 6]], rtol=0, atol=0)


# =========================================================================== fill_empty
def test_fds_fill_empty():
    """STS-B rule: after the update, each bucket with no sample is filled in increasing order,
    the first from bucket 1, the last from the one before, others with the mean of their two
    neighbours as they are at that moment (a just-filled left neighbour counts). Where every run
    of empty buckets follows a bucket with data, that is the published result."""
    bucket_num, d = 10, 3
    kw = dict(bucket_num=bucket_num, bucket_start=0)
    fds = dirfast.FDS(d, fill_empty=True, **kw)
    pub = PublishedFDS(d, **kw)
    epochs = [torch.arange(10.0).repeat(4), torch.tensor([0.0, 2, 3, 3, 3, 7, 7, 2])]  # 1,4,5,6,8,9 empty
    for epoch, labels in enumerate(epochs):
        x = features(labels.numel(), d, 20 + epoch, scale=1 + epoch)
        fds.update_last_epoch_stats(epoch)
        pub.update_last_epoch_stats(epoch)
        fds.update_running_stats(x, labels, epoch)
        pub.update_running_stats(x, labels, epoch)
        published.fill_empty(pub.running_mean, pub.running_var, labels.long().tolist(), 0, bucket_num)
        assert_same_state(fds, pub)
    rm = fds.running_mean
    torch.testing.assert_close(rm[9], rm[8], rtol=0, atol=0)
    torch.testing.assert_close(rm[1], (rm[0] + rm[2]) / 2)
    fds2 = dirfast.FDS(1, bucket_num=6, bucket_start=0, fill_empty=True, momentum=0.0)
    fds2.update_running_stats(torch.arange(6.0).reshape(6, 1) * 10, torch.arange(6.0), 0)
    fds2.update_running_stats(torch.tensor([[100.0], [200.0]]), torch.tensor([1.0, 5.0]), 1)
    # momentum 0: present buckets take the batch value; then 0 <- 1; 2 <- (1 + 3)/2; 3 <- (2 + 4)/2; 4 <- (3 + 5)/2
    expected = [100.0, 100.0, (100 + 30) / 2, ((100 + 30) / 2 + 40) / 2, (((100 + 30) / 2 + 40) / 2 + 200) / 2, 200.0]
    torch.testing.assert_close(fds2.running_mean[:, 0], torch.tensor(expected))
    # a run before the first bucket with data keeps its values (the published code fills it)
    fds3 = dirfast.FDS(1, bucket_num=4, bucket_start=0, fill_empty=True, momentum=0.0)
    fds3.update_running_stats(torch.arange(4.0).reshape(4, 1), torch.arange(4.0), 0)
    fds3.update_running_stats(torch.tensor([[9.0]]), torch.tensor([3.0]), 1)
    torch.testing.assert_close(fds3.running_mean[:, 0], torch.tensor([0.0, 1.0, (1.0 + 9.0) / 2, 9.0]))


def test_fds_fill_empty_needs_a_neighbour_with_data():
    """An update without data (nothing accumulated) fills nothing: every bucket keeps its value."""
    fds = dirfast.FDS(2, bucket_num=6, bucket_start=0, fill_empty=True)
    fds.update_running_stats(features(60, 2, 3), torch.arange(6.0).repeat(10), 0)
    before = fds.running_mean.clone(), fds.running_var.clone()
    fds.update_running_stats(epoch=1)
    torch.testing.assert_close(fds.running_mean, before[0], rtol=0, atol=0)
    torch.testing.assert_close(fds.running_var, before[1], rtol=0, atol=0)


def test_fds_fill_empty_off_by_default():
    fds = dirfast.FDS(2, bucket_num=5, bucket_start=0)
    fds.update_running_stats(features(3, 2, 1), torch.tensor([2.0, 2, 2]), 0)
    torch.testing.assert_close(fds.running_mean[[0, 1, 3, 4]], torch.zeros(4, 2), rtol=0, atol=0)


def test_fds_out_of_range_labels_clamped_without_edge():
    """dirfast clamps always, where it differs from the published code on purpose: labels below
    bucket_start join the first bucket even when no label sits on it (the published module would
    skip them)."""
    fds = dirfast.FDS(2, bucket_num=8, bucket_start=3)
    labels = torch.tensor([0.0, 1, 2, 5, 5, 6, 11, 20])
    x = features(8, 2, 3)
    fds.update_running_stats(x, labels, 0)
    buckets = labels.long().clamp(3, 7) - 3
    count, mean, var = loop_bin_stats(x, buckets, 5)
    torch.testing.assert_close(fds.num_samples_tracked.double(), count.double())
    torch.testing.assert_close(fds.running_mean.double()[count > 0], mean[count > 0], **STATS_TOL)
    torch.testing.assert_close(fds.running_var.double()[count > 0], var[count > 0], **STATS_TOL)


@pytest.mark.filterwarnings("ignore:Binning.integer")  # fractional labels on purpose (the warning: test_presets)
def test_fds_continuous_labels_integer_binning():
    """Default binning is int(label): fractional labels behave as their integer part."""
    fds = dirfast.FDS(3, bucket_num=9, bucket_start=2)
    pub = PublishedFDS(3, bucket_num=9, bucket_start=2)
    labels = labels_with_edges(70, 2, 9, seed=8) + torch.rand(70, generator=gen(1)) * 0.99
    for epoch in range(3):
        x = features(70, 3, epoch)
        if epoch:
            torch.testing.assert_close(fds.smooth(x.clone(), labels, epoch),
                                       pub.smooth(x.clone(), labels.floor().unsqueeze(1), epoch),
                                       **smooth_tol(torch.float32))
        for m in (fds, pub):
            m.update_last_epoch_stats(epoch)
        fds.update_running_stats(x, labels, epoch)
        pub.update_running_stats(x, labels.floor(), epoch)
        assert_same_state(fds, pub)


@pytest.mark.parametrize("label_layout", ["[B,1,H,W]", "[B,H,W]"])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_fds_dense(label_layout, memory):
    """Depth maps: features [B, C, H, W], labels [B, 1, H, W] or [B, H, W]; same statistics as
    the published module on the flattened pixels. smooth gives a new tensor and leaves the
    features as they were, as the published NYUD2-DIR module (it calibrates a copy); with
    inplace=True it writes the same values into them."""
    b, c, h, w = 2, 3, 5, 6
    kw = dict(bucket_num=9, bucket_start=2)
    fds, pub = dirfast.FDS(c, **kw), PublishedFDS(c, **kw)
    labels = torch.randint(0, 11, (b, h, w), generator=gen(4)).float()
    labels[0, 0, 0], labels[1, 4, 5] = 2, 8
    lab = labels.unsqueeze(1) if label_layout == "[B,1,H,W]" else labels
    flat_labels = labels.reshape(-1)

    def flat(x):
        return x.permute(0, 2, 3, 1).reshape(-1, c)

    for epoch in range(3):
        x = torch.randn(b, c, h, w, generator=gen(epoch + 10))
        if memory == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if epoch:
            expected = pub.smooth(flat(x).clone(), flat_labels.unsqueeze(1), epoch)
            before = x.clone()
            got = fds.smooth(x, lab, epoch)
            assert got is not x and got.shape == (b, c, h, w) and torch.equal(x, before)
            torch.testing.assert_close(flat(got), expected, **smooth_tol(torch.float32))
            assert fds.smooth(x, lab, epoch, inplace=True) is x and torch.equal(x, got)
        for m in (fds, pub):
            m.update_last_epoch_stats(epoch)
        y = torch.randn(b, c, h, w, generator=gen(epoch + 20))
        fds.update_running_stats(y, lab, epoch)
        pub.update_running_stats(flat(y), flat_labels, epoch)
        assert_same_state(fds, pub)


def test_fds_zero_variance_buckets():
    """Dead features (variance 0) and a bucket with a single sample (all variances 0, sum <
    1e-10): the published calibration leaves them unchanged; dirfast must agree."""
    d = 4
    kw = dict(bucket_num=6, bucket_start=0)
    fds, pub = dirfast.FDS(d, **kw), PublishedFDS(d, **kw)
    labels = torch.tensor([0.0, 0, 0, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5])  # bucket 1: one sample
    x = features(14, d, 40)
    x[:, 2] = 0.0  # a dead unit
    for m in (fds, pub):
        m.update_running_stats(x, labels, 0)
        m.update_last_epoch_stats(1)
    assert torch.all(fds.running_var_last_epoch[:, 2] == 0)
    assert float(fds.running_var_last_epoch[1].sum()) == 0
    y = features(14, d, 41)
    got = fds.smooth(y.clone(), labels.unsqueeze(1), 1)
    expected = pub.smooth(y.clone(), labels.unsqueeze(1), 1)
    torch.testing.assert_close(got, expected, **smooth_tol(torch.float32))
    assert torch.equal(got[3], y[3]) and torch.equal(got[:, 2], y[:, 2])


# =========================================================================== state
def test_fds_state_dict_matches_published():
    for kw in (dict(), dict(bucket_num=50, bucket_start=0), dict(bucket_num=12, bucket_start=7, start_update=2)):
        fds, pub = dirfast.FDS(16, **kw), PublishedFDS(16, **kw)
        ours, theirs = fds.state_dict(), pub.state_dict()
        # every published key, plus the streaming accumulators (a published checkpoint loads)
        assert set(ours) == set(theirs) | {"accumulated_count", "accumulated_mean", "accumulated_m2"}
        for name in theirs:
            assert ours[name].shape == theirs[name].shape, name
            torch.testing.assert_close(ours[name].double(), theirs[name].double(), rtol=0, atol=0, msg=name)


def test_fds_loads_published_checkpoint():
    kw = dict(bucket_num=10, bucket_start=1)
    pub = PublishedFDS(3, **kw)
    labels = labels_with_edges(60, 1, 10, seed=9)
    for epoch in range(3):
        pub.update_last_epoch_stats(epoch)
        pub.update_running_stats(features(60, 3, epoch), labels, epoch)
    fds = dirfast.FDS(3, **kw)
    fds.load_state_dict(pub.state_dict())
    assert_same_state(fds, pub, rtol=0, atol=0)
    x = features(60, 3, 50)
    torch.testing.assert_close(fds.smooth(x.clone(), labels, 3), pub.smooth(x.clone(), labels.unsqueeze(1), 3),
                               **smooth_tol(torch.float32))


class FDSNet(torch.nn.Module):
    """A model holding an FDS, as a training script does (``fds=False``: the same model without it)."""

    def __init__(self, fds: bool = True):
        super().__init__()
        self.enc = torch.nn.Linear(4, 8)
        if fds:
            self.fds = dirfast.FDS(8, bucket_num=20, bucket_start=0)


def fds_snapshot(fds):
    """Every statistic of ``fds`` (the accumulators too) and its snapshot sharing."""
    state = {name: value.clone() for name, value in fds.state_dict().items()}
    return state, fds._snapshot_follows


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("checkpoint", ["without FDS", "FDS without running_var"])
def test_fds_missing_keys_are_the_parents_to_report(strict, checkpoint):
    """As for BatchNorm: nn.Module.load_state_dict lists the FDS keys a checkpoint lacks -- in its
    RuntimeError with strict=True, in missing_keys with strict=False -- and the FDS keeps its whole
    state (none of the keys present is loaded into it)."""
    model = FDSNet()
    g = torch.Generator().manual_seed(64)
    model.fds.update_running_stats(torch.randn(50, 8, generator=g), torch.randint(0, 20, (50,), generator=g).float(), 0)
    model.fds.accumulate(torch.randn(10, 8, generator=g), torch.randint(0, 20, (10,), generator=g).float())
    before = fds_snapshot(model.fds)
    state = FDSNet(fds=checkpoint != "without FDS").state_dict()
    if checkpoint != "without FDS":
        del state["fds.running_var"]
        state["fds.bogus"] = torch.zeros(1)
        missing, unexpected = ["fds.running_var"], ["fds.bogus"]
    else:
        missing, unexpected = [f"fds.{name}" for name in BUFFERS], []
    if strict:
        with pytest.raises(RuntimeError) as info:
            model.load_state_dict(state)
        assert all(key in str(info.value) for key in missing + unexpected)
    else:
        result = model.load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == sorted(missing) and result.unexpected_keys == unexpected
        assert torch.equal(model.enc.weight, state["enc.weight"])  # the rest of the model loaded
    after = fds_snapshot(model.fds)
    assert after[1] == before[1] and after[0].keys() == before[0].keys()
    for name, value in before[0].items():
        assert torch.equal(after[0][name], value), name


def test_fds_loads_statistics_float32_holds():
    """A float64 checkpoint loads cast to float32 when its values fit, the largest float32 and
    zero variances and counts included; the epoch counter holds [-2**24, 2**24] exactly. (What
    is refused is in tests/test_bad_inputs.py.)"""
    source = dirfast.FDS(2, bucket_num=4, bucket_start=0)
    state = {name: value.double() for name, value in source.state_dict().items()}
    biggest = torch.finfo(torch.float32).max
    state["running_mean"] = torch.full((4, 2), float(biggest), dtype=torch.float64)
    state["running_var"] = torch.zeros(4, 2, dtype=torch.float64)
    state["epoch"] = torch.tensor([2.0 ** 24], dtype=torch.float64)
    fds = dirfast.FDS(2, bucket_num=4, bucket_start=0)
    fds.load_state_dict(state)
    assert fds.running_mean.dtype == torch.float32 and bool((fds.running_mean == biggest).all())
    assert not fds.running_var.any() and not fds.num_samples_tracked.any() and fds.epoch.item() == 2 ** 24
    for epoch in (-2 ** 24, 2 ** 24):
        assert dirfast.FDS(2, bucket_num=4, start_update=epoch).epoch.item() == epoch


def test_fds_reset():
    kw = dict(bucket_num=7, bucket_start=1)
    fds, pub = dirfast.FDS(2, **kw), PublishedFDS(2, **kw)
    run_schedule(fds, pub, 3, 40, 2, 1, 7, seed=11)
    fds.reset()
    pub.reset()
    assert_same_state(fds, pub, rtol=0, atol=0)
    fresh = dirfast.FDS(2, **kw)
    for name in BUFFERS[1:]:
        torch.testing.assert_close(getattr(fds, name), getattr(fresh, name), rtol=0, atol=0, msg=name)


# =========================================================================== deferred init (meta device)
@pytest.mark.parametrize("route", ["to_empty", "assign"])
@pytest.mark.parametrize("checkpoint", ["dirfast", "published (no accumulators)"])
def test_fds_deferred_init_on_meta(route, checkpoint):
    """Built under ``with torch.device("meta")`` (a large model's deferred init), then materialised
    by ``to_empty`` and ``load_state_dict`` (or by ``load_state_dict(assign=True)``), an FDS is
    the one its checkpoint was saved from: the window and the count of skipped rows (not in the
    state_dict) are rebuilt, and accumulators the checkpoint lacks are cleared, where to_empty
    leaves uninitialised memory (NaN here, so the test does not depend on what it held)."""
    g = torch.Generator().manual_seed(70)
    source = dirfast.FDS(4, bucket_num=20, bucket_start=2)
    source.update_running_stats(torch.randn(64, 4, generator=g), torch.randint(0, 22, (64,), generator=g).float(), 0)
    source.accumulate(torch.randn(16, 4, generator=g), torch.randint(0, 22, (16,), generator=g).float())
    state = {name: value for name, value in source.state_dict().items()
             if checkpoint == "dirfast" or not name.startswith("accumulated_")}
    expected = copy.deepcopy(source)
    if checkpoint != "dirfast":
        expected.clear_accumulated()
    with torch.device("meta"):
        fds = dirfast.FDS(4, bucket_num=20, bucket_start=2)
    assert fds.running_mean.is_meta and fds.kernel_window.is_meta
    if route == "to_empty":
        fds.to_empty(device="cpu")
        for name in ("kernel_window", "num_samples_skipped", "accumulated_count", "accumulated_mean", "accumulated_m2"):
            getattr(fds, name).fill_(float("nan"))
    fds.load_state_dict(state, assign=route == "assign")
    assert torch.equal(fds.kernel_window, source.kernel_window) and float(fds.num_samples_skipped) == 0
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 22, (32,), generator=g).float()
    for module in (fds, expected):
        module.update_last_epoch_stats(1)
        module.update_running_stats(epoch=1)
    for name, value in expected.state_dict().items():
        assert torch.equal(fds.state_dict()[name], value), name
    assert torch.equal(fds.smooth(x.clone(), y, 1), expected.smooth(x.clone(), y, 1))


def test_fds_reset_rebuilds_the_window():
    """reset() after to_empty: the window, kept out of the state_dict, is rebuilt too."""
    with torch.device("meta"):
        fds = dirfast.FDS(4, bucket_num=20, bucket_start=2, kernel="laplace", ks=7, sigma=1.5)
    fds.to_empty(device="cpu")
    fds.kernel_window.fill_(float("nan"))
    fds.reset()
    assert torch.equal(fds.kernel_window, dirfast.FDS(4, bucket_num=20, bucket_start=2, kernel="laplace", ks=7,
                                                      sigma=1.5).kernel_window)


def test_fds_reset_parameters_gives_the_state_at_construction():
    """reset_parameters(), which FSDP and init loops call, after training (the published snapshot
    sharing on, rows skipped) and after to_empty from the meta device (every value NaN): the
    state of a new FDS, the epoch counter included (reset() keeps it), the sharing ended, the
    window rebuilt; the next epochs then go as in a new one."""
    kw = dict(bucket_num=20, bucket_start=2, start_update=1, kernel="laplace", ks=7, sigma=1.5)
    g = torch.Generator().manual_seed(77)
    data = [(torch.randn(64, 4, generator=g), torch.randint(0, 22, (64,), generator=g).float()) for _ in range(2)]
    trained = dirfast.FDS(4, **kw)
    trained.update_running_stats(*data[0], 1)
    trained.update_last_epoch_stats(2)
    trained.accumulate(data[1][0], torch.where(torch.arange(64) == 5, float("nan"), data[1][1]))
    assert trained._snapshot_follows and float(trained.num_samples_skipped) == 1 and trained.epoch.item() == 2
    with torch.device("meta"):
        deferred = dirfast.FDS(4, **kw)
    deferred.to_empty(device="cpu")
    for name in ("kernel_window", "num_samples_skipped") + deferred._ACCUMULATORS:
        getattr(deferred, name).fill_(float("nan"))
    for buffer in deferred.buffers():
        buffer.fill_(float("nan"))
    fresh = dirfast.FDS(4, **kw)
    for fds in (trained, deferred):
        fds.reset_parameters()
        assert not fds._snapshot_follows and float(fds.num_samples_skipped) == 0
        assert torch.equal(fds.kernel_window, fresh.kernel_window)
        for name, value in fresh.state_dict().items():
            assert torch.equal(fds.state_dict()[name], value), name
    for fds in (trained, deferred, fresh):
        fds.update_running_stats(*data[0], 1)
        fds.update_last_epoch_stats(2)
        fds.update_running_stats(*data[1], 2)
    for fds in (trained, deferred):
        for name, value in fresh.state_dict().items():
            assert torch.equal(fds.state_dict()[name], value), name


@pytest.mark.parametrize("use_buffers", [False, True])
def test_weight_averaging_pairs_the_buffers(use_buffers):
    """torch.optim.swa_utils.AveragedModel (SWA; EMA with get_ema_multi_avg_fn) pairs the model's
    parameters and buffers with its average's by position. The published snapshot sharing, done
    by making running_*_last_epoch the running tensors, took two buffers out of the model's list
    at the first snapshot: an average taken before it met the wrong buffers (a shape error, or
    with as many features as buckets a silent mix-up). The FDS keeps a fixed set of buffers: the
    average is the EMA of each, by name, epoch after epoch."""
    torch.manual_seed(83)
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, 8),
                                 "fds": dirfast.FDS(8, bucket_num=8, bucket_start=0),
                                 "norm": torch.nn.BatchNorm1d(8)})
    average = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    tracked = dict(model.named_parameters(), **(dict(model.named_buffers()) if use_buffers else {}))
    tracked = {name: value for name, value in tracked.items() if value.is_floating_point()}  # torch's rule for the rest
    expected = {name: value.detach().clone() for name, value in tracked.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(84)
    for epoch in range(3):
        model["fds"].update_last_epoch_stats(epoch)
        for _ in range(2):
            x, y = torch.randn(32, 4, generator=g), torch.randint(0, 8, (32,), generator=g).float()
            features = model["fds"].smooth(model["encoder"](x), y, epoch, inplace=False)
            model["fds"].accumulate(features, y)
            optimizer.zero_grad()
            model["norm"](features).pow(2).mean().backward()
            optimizer.step()
            first = int(average.n_averaged) == 0  # the first update copies
            average.update_parameters(model)
            for name, value in tracked.items():
                if first:
                    expected[name].copy_(value)
                else:
                    expected[name].lerp_(value.detach(), 0.1)
        model["fds"].update_running_stats(epoch=epoch)
    averaged = dict(average.module.named_parameters(), **dict(average.module.named_buffers()))
    assert len(list(model["fds"].buffers())) == 9
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_an_averaged_checkpoint_is_refused_with_its_remedy():
    """An EMA of checkpoints averages the epoch and the counts as well (float32, as published):
    the load refuses the fractional ones, changes nothing, and says where they come from and
    what to load instead."""
    fds = dirfast.FDS(4, bucket_num=10, bucket_start=0)
    g = torch.Generator().manual_seed(90)
    fds.update_running_stats(torch.randn(40, 4, generator=g), torch.randint(0, 10, (40,), generator=g).float(), 0)
    before = {name: value.clone() for name, value in fds.state_dict().items()}
    later = copy.deepcopy(fds)
    later.update_last_epoch_stats(1)
    later.update_running_stats(torch.randn(40, 4, generator=g), torch.randint(0, 10, (40,), generator=g).float(), 1)
    ema = {name: torch.lerp(value.float(), later.state_dict()[name].float(), 0.1).to(value.dtype)
           for name, value in before.items()}
    with pytest.raises(RuntimeError, match="A weight average of checkpoints") as info:
        fds.load_state_dict(ema)
    assert "epoch" in str(info.value) and "num_samples_tracked" in str(info.value)
    for name, value in before.items():
        assert torch.equal(fds.state_dict()[name], value), name


def test_fds_on_meta_refuses_to_read_its_statistics():
    """A module on the meta device holds shapes only: the calls that read its statistics on the
    host raise ValueError saying so (not torch's error about .item()); smooth and accumulate,
    which read nothing on the host, go through with meta tensors."""
    fds = dirfast.FDS(4, bucket_num=20, bucket_start=2).to("meta")
    x, y = torch.randn(8, 4, device="meta"), torch.ones(8, device="meta")
    for call in (lambda: fds.update_last_epoch_stats(1), lambda: fds.update_running_stats(epoch=1),
                 lambda: fds.update_running_stats(x, y, 1), fds.diagnostics):
        with pytest.raises(ValueError, match="this FDS is on the meta device"):
            call()
    assert fds.smooth(x, y, 2, inplace=False).is_meta
    fds.accumulate(x, y)


# =========================================================================== streaming
@pytest.mark.parametrize("momentum", [0.9, None])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("start_update", [0, 2])
def test_accumulate_equals_one_call_on_all_features(momentum, dense, start_update):
    """accumulate() per batch, then update_running_stats(epoch=...), equals the published
    recipe's one call on the concatenated features (within float tolerance), epoch after epoch;
    an epoch before ``start_update`` is ignored, and so is what was accumulated in it."""
    g = torch.Generator().manual_seed(61)
    if dense:
        x = torch.randn(6, 4, 5, 3, generator=g) * 2 + 50
        labels = torch.randint(0, 12, (6, 1, 5, 3), generator=g).float()
        batches = [(x[i:i + 2], labels[i:i + 2]) for i in range(0, 6, 2)]
    else:
        x = torch.randn(300, 4, generator=g) * 2 + 50  # mean 25x the std: merges must be careful
        labels = torch.randint(0, 12, (300,), generator=g).float()
        batches = [(x[i:i + 37], labels[i:i + 37]) for i in range(0, 300, 37)]
    one, streamed = (dirfast.FDS(4, bucket_num=12, bucket_start=2, momentum=momentum, start_update=start_update)
                     for _ in range(2))
    for epoch in range(4):
        shift = 10 * epoch  # each epoch's features differ, so one leaking into the next shows
        one.update_running_stats(x + shift, labels, epoch)
        for xb, yb in batches:
            streamed.accumulate(xb + shift, yb)
        streamed.update_running_stats(epoch=epoch)
        assert float(streamed.accumulated_count.sum()) == 0  # cleared
        for m in (one, streamed):
            m.update_last_epoch_stats(epoch + 1)
        torch.testing.assert_close(streamed.num_samples_tracked, one.num_samples_tracked, rtol=0, atol=0)
        torch.testing.assert_close(streamed.running_mean, one.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(streamed.running_var, one.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_accumulate_counts_a_checkpointed_batch_once(use_reentrant):
    """Under activation checkpointing (torch.utils.checkpoint, both flavours) the backward pass
    runs the forward again; accumulate() there adds nothing, so the epoch's statistics and the
    gradients are those of the same steps without checkpointing (a batch had counted twice)."""
    g = torch.Generator().manual_seed(81)
    batches = [(torch.randn(40, 4, generator=g), torch.randint(0, 12, (40, 1), generator=g).float()) for _ in range(3)]
    torch.manual_seed(82)
    plain_encoder = torch.nn.Linear(4, 4)
    checkpointed_encoder = copy.deepcopy(plain_encoder)
    plain, checkpointed = (dirfast.FDS(4, bucket_num=12, bucket_start=2) for _ in range(2))
    for x, y in batches:
        for encoder, fds, wrap in ((plain_encoder, plain, False), (checkpointed_encoder, checkpointed, True)):
            def block(x, y, encoder=encoder, fds=fds):
                features = fds.smooth(encoder(x), y, 0, inplace=False)
                fds.accumulate(features, y)
                return features.relu()
            x = x.detach().requires_grad_()  # the reentrant flavour needs an input that requires grad
            out = torch.utils.checkpoint.checkpoint(block, x, y, use_reentrant=use_reentrant) if wrap else block(x, y)
            out.pow(2).mean().backward()
    assert float(checkpointed.accumulated_count.sum()) == 120
    for name in ("accumulated_count", "accumulated_mean", "accumulated_m2"):
        assert torch.equal(getattr(checkpointed, name), getattr(plain, name)), name
    for got, want in zip(checkpointed_encoder.parameters(), plain_encoder.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


def test_accumulating_smoothed_features_is_the_published_recipe():
    """The README loop (smooth each batch, then accumulate what it returns) gathers the statistics
    of the published end-of-epoch pass, which runs the model in training mode and so collects
    calibrated features once smoothing starts: with fixed features (a frozen encoder), epoch
    after epoch, the running statistics agree; accumulated before smooth, they do not."""
    g = torch.Generator().manual_seed(63)
    labels = torch.randint(3, 30, (400, 1), generator=g).float()
    x = torch.randn(30, 6, generator=g)[labels.long().squeeze(1)] * 3 + torch.randn(400, 6, generator=g) \
        * (0.5 + 0.05 * labels)
    kw = dict(bucket_num=30, bucket_start=3)
    pub, after, before = PublishedFDS(6, **kw), dirfast.FDS(6, **kw), dirfast.FDS(6, **kw)
    for epoch in range(4):
        for rows in torch.randperm(400, generator=g).split(64):
            features = after.smooth(x[rows].clone(), labels[rows], epoch)
            after.accumulate(features, labels[rows])
            features = x[rows].clone()
            before.accumulate(features, labels[rows])
            before.smooth(features, labels[rows], epoch)
        passed = torch.cat([x[rows].clone() if epoch < pub.start_smooth else pub.smooth(x[rows].clone(), labels[rows], epoch)
                            for rows in torch.arange(400).split(64)])
        pub.update_last_epoch_stats(epoch)
        pub.update_running_stats(passed, labels.squeeze(1), epoch)
        for fds in (after, before):
            fds.update_last_epoch_stats(epoch)
            fds.update_running_stats(epoch=epoch)
        torch.testing.assert_close(after.running_mean, pub.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after.running_var, pub.running_var, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before.running_mean, pub.running_mean, rtol=1e-3, atol=1e-3)


def test_accumulators_round_trip_in_state_dict():
    g = torch.Generator().manual_seed(62)
    fds = dirfast.FDS(3, bucket_num=8, bucket_start=1)
    fds.accumulate(torch.randn(40, 3, generator=g), torch.randint(0, 8, (40,), generator=g).float())
    restored = dirfast.FDS(3, bucket_num=8, bucket_start=1)
    restored.load_state_dict(fds.state_dict())
    for name in ("accumulated_count", "accumulated_mean", "accumulated_m2"):
        assert torch.equal(getattr(restored, name), getattr(fds, name)), name
    assert float(restored.accumulated_count.sum()) == 40
