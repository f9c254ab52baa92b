"""Labels with several dimensions: GridBinning against numpy.ravel_multi_index, LDS over a grid
against scipy's separable convolve1d, FDS over a grid against the loop oracle smoothed axis by
axis, shot_metrics over a grid against a loop; and on one dimension, the 1-D results bit for bit."""

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d

import dirfast
from dirfast import Binning, GridBinning
from test_bin_stats import loop_bin_stats
from test_calibrate import loop_calibrate
from test_smooth_bins import fds_smooth_conv1d
from testing import DEVICES, gen

B0, B1, B2 = Binning.uniform(0, 10, 12), Binning.integer(7), Binning.uniform(-1, 1, 5)


def labels(n, seed, dims=3):
    g = gen(seed)
    y = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) * 11 - 0.5,
                     torch.randint(-1, 9, (n,), generator=g).double(),
                     torch.randn(n, generator=g, dtype=torch.float64) * 0.6], dim=1)
    return y[:, :dims]


def numpy_bins(y, binnings):
    """Each coordinate's bin, clamped into range, as np.histogram edges and int() say."""
    per_axis = []
    for axis, b in enumerate(binnings):
        v = y[:, axis].numpy()
        if b.is_integer:
            idx = np.clip(np.trunc(np.clip(v, -1, b.num_bins)), 0, b.num_bins - 1)
        else:
            idx = np.clip(np.searchsorted(b.edges, v, side="right") - 1, 0, b.num_bins - 1)
        per_axis.append(idx.astype(np.int64))
    return per_axis


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [500, 5000])  # below and above binning._GUESS_FROM: searched and guessed uniform bins
def test_grid_bins_are_row_major(device, n):
    y = labels(n, seed=1)
    grid = GridBinning(B0, B1, B2)
    expected = np.ravel_multi_index(numpy_bins(y, (B0, B1, B2)), grid.shape)
    got = grid(y.to(device))
    assert got.device.type == device and got.shape == (n,)
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
    np.testing.assert_array_equal(grid.unravel(got).cpu().numpy(), np.stack(numpy_bins(y, (B0, B1, B2)), 1))
    centers = grid.centers
    assert centers.shape == (grid.num_bins, 3)
    np.testing.assert_array_equal(centers[expected[7]], [B0.centers[numpy_bins(y, (B0,))[0][7]],
                                                        B1.centers[numpy_bins(y[:, 1:2], (B1,))[0][7]],
                                                        B2.centers[numpy_bins(y[:, 2:], (B2,))[0][7]]])
    batch = grid(y.reshape(5, n // 5, 3))  # any leading shape
    np.testing.assert_array_equal(batch.reshape(-1).numpy(), expected)
    nan = y.clone()
    nan[3, 1] = float("nan")
    assert grid(nan, check=False)[3] == -1
    with pytest.raises(ValueError, match="finite"):
        grid(nan)


def test_integer_axes_take_float64_labels_beyond_float32():
    """An integer axis binned in float32 puts finite float64 coordinates beyond float32's range in
    its edge bins, as the 1-D Binning does (cast first, they were inf: no grid bin); NaN and
    infinite coordinates still give -1."""
    grid = GridBinning(Binning.integer(4), Binning.uniform(0, 1, 3))
    y = torch.tensor([[1e39, 0.5], [-1e39, 0.5], [2.0, 0.5], [float("inf"), 0.5], [float("nan"), 0.5]],
                     dtype=torch.float64)
    want = [3 * 3 + 1, 1, 2 * 3 + 1, -1, -1]
    assert grid(y, precision="float32", check=False).tolist() == want
    assert grid(y, check=False).tolist() == want
    assert grid(y[:3], precision="float32").tolist() == want[:3]


def test_unravel_gives_minus_one_outside_the_grid():
    """-1 (a label of no bin) and indices past the last bin have no bin in any dimension: -1 in
    each, where they wrapped into real bins (-1 was the last bin, num_bins the first)."""
    grid = GridBinning(Binning.integer(4), Binning.integer(3))
    index = torch.tensor([[-1, 0, 5], [11, 12, -13]])
    want = [[[-1, -1], [0, 0], [1, 2]], [[3, 2], [-1, -1], [-1, -1]]]
    for dtype in (torch.int64, torch.int32, torch.int16):
        got = grid.unravel(index.to(dtype))
        assert got.dtype == torch.int64 and got.tolist() == want
    assert grid.unravel(torch.tensor([11, 200], dtype=torch.uint8)).tolist() == [[3, 2], [-1, -1]]
    nan = grid(torch.tensor([[float("nan"), 1.0], [2.0, 1.0]]), check=False)
    assert grid.unravel(nan).tolist() == [[-1, -1], [2, 1]]


def test_along_each_axis_checks_what_smooth_returns():
    """``smooth`` must return a tensor of the shape it is given: None or another shape is refused,
    naming ``smooth``, instead of failing on a reshape."""
    grid = GridBinning(Binning.integer(4), Binning.integer(3))
    table = torch.arange(24.0).reshape(12, 2)
    assert torch.equal(grid.along_each_axis(table, lambda rows: rows * 2), table * 4)
    for smooth, error in ((lambda rows: None, TypeError), (lambda rows: rows.tolist(), TypeError),
                          (lambda rows: rows[:-1], ValueError), (lambda rows: rows.reshape(-1), ValueError),
                          (lambda rows: rows.T, ValueError)):
        with pytest.raises(error, match="smooth must return"):
            grid.along_each_axis(table, smooth)


# -- LDS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reweight, lds, padding", [("sqrt_inv", True, "constant"), ("inverse", True, "symmetric"),
                                                    ("inverse", False, "constant"), ("none", False, "constant")])
def test_lds_grid_of_one_dimension_is_the_1d_lds(reweight, lds, padding):
    y = labels(2000, seed=2, dims=1)
    options = dict(reweight=reweight, lds=lds, inverse_clip=None, padding=padding, sigma=1.5)
    flat, grid = dirfast.LDS(B0, **options).fit(y[:, 0]), dirfast.LDS(GridBinning(B0), **options).fit(y)
    assert torch.equal(flat.effective, grid.effective)
    assert torch.equal(flat.weights(y[:, 0]), grid.weights(y))


@pytest.mark.parametrize("reweight, padding, mode", [("sqrt_inv", "constant", "constant"),
                                                     ("inverse", "constant", "constant"),
                                                     ("inverse", "symmetric", "reflect")])
def test_lds_grid_is_separable_convolution(reweight, padding, mode):
    y = labels(4000, seed=3, dims=2)
    grid = GridBinning(B0, B1)
    lds = dirfast.LDS(grid, reweight=reweight, inverse_clip=None, padding=padding).fit(y)
    counts = np.zeros(grid.shape)
    np.add.at(counts, tuple(numpy_bins(y, (B0, B1))), 1)
    base = np.sqrt(counts) if reweight == "sqrt_inv" else counts
    window = dirfast.get_lds_kernel_window("gaussian", 5, 2.0)
    effective = convolve1d(convolve1d(base, window, axis=0, mode=mode), window, axis=1, mode=mode)
    if reweight == "inverse":
        effective = np.trunc(effective)  # once, after both axes (the published integer-array quirk)
    np.testing.assert_allclose(lds.effective.numpy(), effective.reshape(-1), rtol=1e-12, atol=1e-9)
    weights = lds.weights(y)
    assert weights.shape == (4000,) and weights.dtype == torch.float32
    flat = np.ravel_multi_index(numpy_bins(y, (B0, B1)), grid.shape)
    expected = 1 / effective.reshape(-1)[flat]
    expected = expected * len(flat) / expected.sum()
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5)
    restored = dirfast.LDS(grid, reweight=reweight, inverse_clip=None, padding=padding)
    restored.load_state_dict(lds.state_dict())
    assert torch.equal(restored.weights(y), weights)


# -- FDS ---------------------------------------------------------------------------------------
def fed_fds(binning, y, x, bucket_num):
    fds = dirfast.FDS(x.shape[1], bucket_num=bucket_num, bucket_start=0, binning=binning, sigma=1.0)
    fds.update_running_stats(x, y, 0)
    fds.update_last_epoch_stats(1)
    return fds


def test_fds_grid_of_one_dimension_is_the_1d_fds():
    y, x = labels(1500, seed=4, dims=1).float(), torch.randn(1500, 6, generator=gen(5))
    flat, grid = fed_fds(B0, y[:, 0], x, 12), fed_fds(GridBinning(B0), y, x, 12)
    for name in ("running_mean", "running_var", "smoothed_mean_last_epoch", "smoothed_var_last_epoch",
                 "num_samples_tracked"):
        assert torch.equal(getattr(flat, name), getattr(grid, name)), name
    assert torch.equal(flat.smooth(x.clone(), y[:, 0], 1), grid.smooth(x.clone(), y, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_fds_grid_statistics_and_smoothing(device):
    y = labels(3000, seed=6, dims=2).float()
    x = torch.randn(3000, 4, generator=gen(7)) + y[:, :1] / 3
    grid = GridBinning(B0, B1)
    fds = fed_fds(grid, y.to(device), x.to(device), grid.num_bins)
    flat = torch.from_numpy(np.ravel_multi_index(numpy_bins(y.double(), (B0, B1)), grid.shape))
    count, mean, var = loop_bin_stats(x, flat, grid.num_bins)
    torch.testing.assert_close(fds.num_samples_tracked.cpu().double(), count.double())
    torch.testing.assert_close(fds.running_mean.cpu().double(), mean, rtol=1e-5, atol=1e-5)
    mean_var = torch.where((count > 0).unsqueeze(1), var, torch.ones_like(var))  # empty buckets keep var 1
    for stats, smoothed in ((mean, fds.smoothed_mean_last_epoch), (mean_var, fds.smoothed_var_last_epoch)):
        cube = stats.reshape(12, 7, 4)
        along0 = torch.stack([fds_smooth_conv1d(cube[:, j], fds.kernel_window) for j in range(7)], 1)
        both = torch.stack([fds_smooth_conv1d(along0[i], fds.kernel_window) for i in range(12)], 0)
        torch.testing.assert_close(smoothed.cpu().double(), both.reshape(-1, 4), rtol=1e-5, atol=1e-5)
    out = fds.smooth(x.to(device).clone(), y.to(device), 1)
    expected = loop_calibrate(x, flat, fds.running_mean_last_epoch.cpu(), fds.running_var_last_epoch.cpu(),
                                fds.smoothed_mean_last_epoch.cpu(), fds.smoothed_var_last_epoch.cpu())
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


# -- shot metrics ------------------------------------------------------------------------------
def test_shot_metrics_over_a_grid():
    g = gen(8)
    train, test = labels(4000, seed=9, dims=2), labels(600, seed=10, dims=2)
    preds = test + torch.randn(600, 2, generator=g, dtype=torch.float64)
    grid = GridBinning(B0, B1)
    got = dirfast.metrics.shot_metrics(preds, test, train, 60, 30, grid)
    train_bins = np.ravel_multi_index(numpy_bins(train, (B0, B1)), grid.shape)
    test_bins = np.ravel_multi_index(numpy_bins(test, (B0, B1)), grid.shape)
    distance = torch.linalg.vector_norm(preds - test, dim=1).numpy()
    regions = {"many": [], "median": [], "low": []}
    for i, b in enumerate(test_bins):
        n = int((train_bins == b).sum())
        regions["many" if n > 60 else "low" if n < 30 else "median"].append(distance[i])
    regions["overall"] = list(distance)
    for name, values in regions.items():
        values = np.array(values)
        assert got[name]["mse"] == pytest.approx(np.mean(values ** 2), rel=1e-12)
        assert got[name]["l1"] == pytest.approx(np.mean(values), rel=1e-12)
        assert got[name]["gmean"] == pytest.approx(np.exp(np.mean(np.log(values))), rel=1e-12)
    one = dirfast.metrics.shot_metrics(preds[:, :1], test[:, :1], train[:, :1], 400, 300, GridBinning(B0))
    assert one == dirfast.metrics.shot_metrics(preds[:, 0], test[:, 0], train[:, 0], 400, 300, B0)  # no empty region


def test_grid_metrics_check_shapes_before_flattening():
    """Over a grid of d dimensions every array is [N, d]: a transposed [d, N] prediction, training
    labels [N, 3] for a 2-D grid, or [N, 4] on a 2-D grid held the right number of values and
    gave numbers; they are refused, each naming its argument."""
    grid = GridBinning(B0, B1)
    test, train = labels(40, seed=11, dims=2), labels(300, seed=12, dims=2)
    preds = test + 0.1
    sm, bmae, bmse = dirfast.metrics.shot_metrics, dirfast.metrics.balanced_mae, dirfast.metrics.balanced_mse
    for call, name in ((lambda: sm(preds.T, test, train, binning=grid), "preds"),
                       (lambda: bmae(preds.T, test, grid), "preds"),
                       (lambda: sm(preds, test, torch.cat([train, train[:, :1]], 1), binning=grid), "train_labels"),
                       (lambda: bmse(preds.reshape(-1, 4), test.reshape(-1, 4), grid), "preds")):
        with pytest.raises(ValueError, match=fr"{name} must be \[N, 2\]"):
            call()
    one = GridBinning(B0)  # one dimension: [N] is [N, 1]
    assert bmae(preds[:, 0], test[:, 0], one) == bmae(preds[:, :1], test[:, :1], one)
