"""dirfast.plot: each plot rendered to PNG with matplotlib's Agg backend, and what it drew
(bar heights, line data, axis scales) read back against the diagnostics tables it draws.

matplotlib is an optional dependency of dirfast and a test dependency (requirements-dev.txt):
without it these tests are skipped with that reason."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import dirfast

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib (requirements-dev.txt) is not installed")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import dirfast.plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def fitted_lds():
    ages = torch.from_numpy(np.clip(np.round(np.random.default_rng(0).gamma(4, 8, 3000)), 0, 99))
    return dirfast.LDS(dirfast.Binning.integer(100), bucket_start=2).fit(ages)


def trained_fds():
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(2000, generator=generator) ** 2 * 29).floor()
    fds = dirfast.FDS(5, 30, 3)
    for epoch in range(2):
        features = torch.cos(labels[:, None] / 4 + torch.arange(5)) + 0.3 * torch.randn(2000, 5, generator=generator)
        fds.update_last_epoch_stats(epoch)
        fds.update_running_stats(features, labels, epoch)
    fds.update_last_epoch_stats(2)
    return fds


def rendered(figure, tmp_path, name):
    path = tmp_path / name
    figure.savefig(path, format="png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, "a PNG with something drawn in it"
    return data


def test_label_distribution_draws_the_lds_table(tmp_path):
    lds = fitted_lds()
    table = lds.diagnostics()
    ax, weight_ax = dirfast.plot.plot_label_distribution(lds)
    rendered(ax.figure, tmp_path, "labels.png")
    bars = ax.patches
    assert len(bars) == len(table["bin"])
    np.testing.assert_allclose([bar.get_height() for bar in bars], table["empirical_density"].numpy())
    np.testing.assert_allclose([bar.get_x() + bar.get_width() / 2 for bar in bars], table["center"].numpy())
    (effective,) = ax.get_lines()
    np.testing.assert_allclose(effective.get_xydata(), np.column_stack([table["center"], table["effective_density"]]))
    (weights,) = weight_ax.get_lines()
    np.testing.assert_allclose(weights.get_ydata(), table["weight"].numpy())
    assert weight_ax.get_yscale() == "log" and weight_ax.get_shared_x_axes().joined(ax, weight_ax)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert sorted(legend) == ["effective density (LDS)", "empirical density", "weight"]


def test_label_distribution_draws_into_given_axes(tmp_path):
    figure, (left, right) = plt.subplots(1, 2)
    ax, _ = dirfast.plot.plot_label_distribution(fitted_lds(), ax=right)
    assert ax is right and not left.patches and len(right.patches) == 98
    rendered(figure, tmp_path, "given.png")


def test_fds_diagnostics_draw_the_fds_table(tmp_path):
    fds = trained_fds()
    table = {name: value.numpy() for name, value in fds.diagnostics().items()}
    axes = dirfast.plot.plot_fds_diagnostics(fds)
    assert len(axes) == len(dirfast.plot.FDS_PANELS) == 4
    rendered(axes[0].figure, tmp_path, "fds.png")
    count_ax, cosine_ax, distance_ax, scale_ax = axes
    np.testing.assert_array_equal([bar.get_height() for bar in count_ax.patches], table["count"])
    for ax, kind in ((cosine_ax, "cosine"), (distance_ax, "distance")):
        mean_line, var_line = ax.get_lines()
        np.testing.assert_array_equal(mean_line.get_xdata(), table["bucket"])
        np.testing.assert_allclose(mean_line.get_ydata(), table[f"mean_{kind}"], equal_nan=True)
        np.testing.assert_allclose(var_line.get_ydata(), table[f"var_{kind}"], equal_nan=True)
    scale_line, unchanged = scale_ax.get_lines()
    np.testing.assert_allclose(scale_line.get_ydata(), table["scale_mean"])
    assert list(unchanged.get_ydata()) == [1.0, 1.0]
    (band,) = scale_ax.collections
    vertices = band.get_paths()[0].vertices
    assert np.isclose(vertices[:, 1].min(), table["scale_min"].min()) and np.isclose(
        vertices[:, 1].max(), table["scale_max"].max())


def test_fds_diagnostics_draw_into_given_axes():
    figure, axes = plt.subplots(2, 2)
    drawn = dirfast.plot.plot_fds_diagnostics(trained_fds(), axes=axes.reshape(-1))
    assert [id(ax) for ax in drawn] == [id(ax) for ax in axes.reshape(-1)] and all(ax.has_data() for ax in drawn)


def fitted_grid_lds(reweight="sqrt_inv"):
    grid = dirfast.GridBinning(dirfast.Binning.uniform(0, 1, 5), dirfast.Binning.uniform(-1, 1, 3))
    points = torch.rand(800, 2, generator=torch.Generator().manual_seed(0)) ** 2 * torch.tensor([1.0, 2.0]) - \
        torch.tensor([0.0, 1.0])
    return dirfast.LDS(grid, reweight=reweight, lds=reweight != "none").fit(points)


def test_grid_distribution_draws_the_lds_table(tmp_path):
    lds = fitted_grid_lds()
    table = lds.diagnostics()
    axes = dirfast.plot.plot_grid_distribution(lds)
    rendered(axes[0].figure, tmp_path, "grid.png")
    assert len(axes) == len(dirfast.plot.GRID_PANELS) == 3
    for ax, name in zip(axes, dirfast.plot.GRID_PANELS):
        (image,) = ax.get_images()
        drawn = np.asarray(image.get_array())
        assert drawn.shape == (3, 5), "dimension 1 up, dimension 0 across"
        for i in range(5):
            for j in range(3):
                assert drawn[j, i] == table[name][i * 3 + j].item(), (name, i, j)
        assert image.get_extent() == [0.0, 1.0, -1.0, 1.0] and image.origin == "lower"
        assert type(image.norm).__name__ == ("LogNorm" if name == "weight" else "Normalize")
    flat = dirfast.plot.plot_grid_distribution(fitted_grid_lds("none"))  # equal weights: a flat map
    assert np.all(np.asarray(flat[2].get_images()[0].get_array()) == 1.0)


def test_the_plots_reject_a_grid_lds_and_wrong_axes():
    lds = fitted_grid_lds()
    with pytest.raises(ValueError, match="plot_grid_distribution"):
        dirfast.plot.plot_label_distribution(lds)
    with pytest.raises(ValueError, match="two dimensions"):
        dirfast.plot.plot_grid_distribution(fitted_lds())
    cube = dirfast.GridBinning(*[dirfast.Binning.integer(2)] * 3)
    with pytest.raises(ValueError, match="two dimensions"):
        dirfast.plot.plot_grid_distribution(dirfast.LDS(cube).fit(torch.zeros(4, 3)))
    # a wrong number of Axes is a wrong value (ValueError, the validators' rule), a wrong kind a TypeError
    with pytest.raises(ValueError, match="axes must hold 3 matplotlib Axes, got 2"):
        dirfast.plot.plot_grid_distribution(lds, axes=plt.subplots(1, 2)[1])
    with pytest.raises(ValueError, match="axes must hold 4"):
        dirfast.plot.plot_fds_diagnostics(trained_fds(), axes=plt.subplots(1, 3)[1])
    with pytest.raises(TypeError, match="axes"):
        dirfast.plot.plot_fds_diagnostics(trained_fds(), axes="axes")


@pytest.mark.parametrize("call, match", [
    (lambda: dirfast.plot.plot_label_distribution("lds"), "lds must be a dirfast.LDS"),
    (lambda: dirfast.plot.plot_label_distribution(trained_fds()), "lds must be a dirfast.LDS"),
    (lambda: dirfast.plot.plot_label_distribution(fitted_lds(), ax="left"), "ax must be a matplotlib Axes"),
    (lambda: dirfast.plot.plot_fds_diagnostics(fitted_lds()), "fds must be a dirfast.FDS"),
    (lambda: dirfast.plot.plot_grid_distribution(None), "lds must be a dirfast.LDS"),
    (lambda: dirfast.plot.plot_fds_diagnostics(trained_fds(), axes="abcd"), "axes must be None or a sequence"),
    (lambda: dirfast.plot.plot_fds_diagnostics(trained_fds(), axes=[1, 2, 3, 4]), r"axes\[0\] must be"),
], ids=["lds str", "lds an FDS", "ax str", "fds an LDS", "grid lds None", "axes str", "axes of ints"])
def test_the_plots_name_a_bad_argument(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_dirfast_does_not_import_matplotlib():
    code = "import sys, dirfast; assert 'matplotlib' not in sys.modules, 'imported'; import dirfast.plot; " \
           "assert 'matplotlib' not in sys.modules, 'imported by dirfast.plot'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_clear_error_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # import matplotlib.pyplot now raises
    with pytest.raises(ImportError, match="pip install matplotlib"):
        dirfast.plot.plot_label_distribution(fitted_lds())
