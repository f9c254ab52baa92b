"""Plots of what LDS and FDS do, drawn from their ``diagnostics()`` tables (needs matplotlib).

matplotlib is an optional dependency: ``import dirfast`` does not import this module, and this
module imports matplotlib only when a function is called. Each function draws into the Axes it
is given (or into a new figure) and returns them; none calls ``plt.show()``.

Example::

    import dirfast.plot
    ax, weight_ax = dirfast.plot.plot_label_distribution(lds)
    ax.figure.savefig("labels.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .binning import GridBinning
from .fds import FDS
from .lds import LDS

if TYPE_CHECKING:  # matplotlib is optional: imported when a function draws
    from matplotlib.axes import Axes

__all__ = ["plot_label_distribution", "plot_grid_distribution", "plot_fds_diagnostics", "FDS_PANELS", "GRID_PANELS"]

# The panels of plot_fds_diagnostics, top to bottom.
FDS_PANELS = ("count", "cosine", "distance", "scale")
# The panels of plot_grid_distribution, left to right: columns of LDS.diagnostics().
GRID_PANELS = ("empirical_density", "effective_density", "weight")


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("dirfast.plot needs matplotlib, an optional dependency: pip install matplotlib") from exc
    return plt


def _check_axes(name: str, value) -> None:
    from matplotlib.axes import Axes

    if not isinstance(value, Axes):
        raise TypeError(f"{name} must be a matplotlib Axes, got {type(value).__name__}")
    if value.name != "rectilinear":  # a 3-D or polar Axes took the bars, then failed at twinx or imshow
        raise ValueError(f"{name} must be a plain 2-D matplotlib Axes, got a {value.name!r} projection")


def plot_label_distribution(lds: LDS, ax: Axes | None = None) -> tuple[Axes, Axes]:
    """Draw a fitted LDS: bars of the empirical label density, a line of the effective
    (smoothed) density, and the per-bin weights on a second, logarithmic y axis (the weights of
    rare bins are orders of magnitude above the common ones').

    Draws into ``ax`` (a matplotlib Axes; default a new figure). Returns ``(ax, weight_ax)``,
    the Axes of the densities and the twin Axes of the weights. Raises RuntimeError before
    ``lds.fit``, and ValueError for an LDS over a GridBinning (see :func:`plot_grid_distribution`).
    """
    if not isinstance(lds, LDS):
        raise TypeError(f"lds must be a dirfast.LDS, got {type(lds).__name__}")
    if isinstance(lds.binning, GridBinning):
        raise ValueError("plot_label_distribution draws labels with one dimension, and this LDS is over a "
                         "GridBinning: plot_grid_distribution draws a grid of two dimensions")
    table = lds.diagnostics()
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    else:
        _check_axes("ax", ax)
    widths = lds.binning.edges[1:] - lds.binning.edges[:-1]
    centers = table["center"].numpy()
    ax.bar(centers, table["empirical_density"].numpy(), width=widths[lds.bucket_start:], color="tab:blue",
           alpha=0.5, label="empirical density")
    ax.plot(centers, table["effective_density"].numpy(), color="tab:orange", label="effective density (LDS)")
    ax.set_xlabel("label")
    ax.set_ylabel("density")
    weight_ax = ax.twinx()
    weight_ax.plot(centers, table["weight"].numpy(), color="tab:green", label="weight")
    weight_ax.set_yscale("log")
    weight_ax.set_ylabel("weight (log scale)")
    handles = ax.get_legend_handles_labels()[0] + weight_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")
    ax.set_title(f"LDS: label distribution and weights ({lds.reweight})")
    return ax, weight_ax


def _check_axes_list(value, count: int) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"axes must be None or a sequence of {count} matplotlib Axes, got {value!r}")
    for index, ax in enumerate(value):
        _check_axes(f"axes[{index}]", ax)
    if len(value) != count:
        raise ValueError(f"axes must hold {count} matplotlib Axes, got {len(value)}")
    return list(value)


def plot_grid_distribution(lds: LDS, axes: Sequence[Axes] | None = None) -> list[Axes]:
    """Draw a fitted LDS over a :class:`~dirfast.GridBinning` of two dimensions as three maps
    (:data:`GRID_PANELS`): the empirical label density, the effective density and the weights
    (logarithmic colours), dimension 0 across and dimension 1 up, over the bins' edges.

    Draws into ``axes`` (three matplotlib Axes; default a new figure). Returns the list of the
    three Axes. Raises ValueError for an LDS over a ``Binning`` or a grid of another dimension.
    """
    if not isinstance(lds, LDS):
        raise TypeError(f"lds must be a dirfast.LDS, got {type(lds).__name__}")
    if not isinstance(lds.binning, GridBinning) or lds.binning.ndim != 2:
        raise ValueError("plot_grid_distribution draws an LDS over a GridBinning of two dimensions, got "
                         f"{lds.binning!r} (plot_label_distribution draws one dimension)")
    table = lds.diagnostics()
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    if axes is None:
        _, axes = plt.subplots(1, len(GRID_PANELS), figsize=(13, 4), layout="constrained")
    axes = _check_axes_list(axes, len(GRID_PANELS))
    first, second = lds.binning.binnings
    extent = (first.edges[0], first.edges[-1], second.edges[0], second.edges[-1])
    for ax, name in zip(axes, GRID_PANELS):
        values = table[name].reshape(lds.binning.shape).numpy().T  # rows: dimension 1, drawn upwards
        norm = LogNorm() if name == "weight" else None
        image = ax.imshow(values, origin="lower", extent=extent, aspect="auto", norm=norm, interpolation="nearest")
        ax.figure.colorbar(image, ax=ax)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("dimension 0")
        ax.set_ylabel("dimension 1")
    return axes


def plot_fds_diagnostics(fds: FDS, axes: Sequence[Axes] | None = None) -> list[Axes]:
    """Draw :meth:`FDS.diagnostics` per bucket, in four panels (:data:`FDS_PANELS`): the samples
    tracked, the cosine similarity and the L2 distance between the running and smoothed mean
    and variance vectors, and the calibration's scale factor (its mean over the features, with
    the band from min to max).

    Draws into ``axes`` (four matplotlib Axes; default a new figure). Returns the list of the
    four Axes.
    """
    if not isinstance(fds, FDS):
        raise TypeError(f"fds must be a dirfast.FDS, got {type(fds).__name__}")
    table = {name: values.numpy() for name, values in fds.diagnostics().items()}
    plt = _pyplot()
    if axes is None:
        _, axes = plt.subplots(len(FDS_PANELS), 1, figsize=(9, 9), sharex=True, layout="constrained")
    count_ax, cosine_ax, distance_ax, scale_ax = axes = _check_axes_list(axes, len(FDS_PANELS))
    buckets = table["bucket"]
    count_ax.bar(buckets, table["count"], width=1.0, color="tab:blue", label="samples tracked")
    count_ax.set_ylabel("samples tracked")
    for ax, kind, ylabel in ((cosine_ax, "cosine", "cosine similarity"), (distance_ax, "distance", "L2 distance")):
        ax.plot(buckets, table[f"mean_{kind}"], color="tab:orange", label="mean vectors")
        ax.plot(buckets, table[f"var_{kind}"], color="tab:green", label="variance vectors")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best")
    cosine_ax.set_title("running vs smoothed statistics")
    scale_ax.fill_between(buckets, table["scale_min"], table["scale_max"], color="tab:purple", alpha=0.25,
                          label="min to max over features")
    scale_ax.plot(buckets, table["scale_mean"], color="tab:purple", label="mean over features")
    scale_ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8, label="1 (unchanged)")
    scale_ax.set_ylabel("scale factor")
    scale_ax.set_xlabel("bucket")
    scale_ax.legend(loc="best")
    count_ax.set_title("FDS diagnostics per bucket")
    return axes
