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

from .binning import GridBinning
from .fds import FDS
from .lds import LDS

__all__ = ["plot_label_distribution", "plot_fds_diagnostics", "FDS_PANELS"]

# The panels of plot_fds_diagnostics, top to bottom.
FDS_PANELS = ("count", "cosine", "distance", "scale")


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


def plot_label_distribution(lds: LDS, ax=None):
    """Draw a fitted LDS: bars of the empirical label density, a line of the effective
    (smoothed) density, and the per-bin weights on a second, logarithmic y axis (the weights of
    rare bins are orders of magnitude above the common ones').

    Draws into ``ax`` (a matplotlib Axes; default a new figure). Returns ``(ax, weight_ax)``,
    the Axes of the densities and the twin Axes of the weights. Raises RuntimeError before
    ``lds.fit``, and ValueError for an LDS over a GridBinning (use ``lds.diagnostics()``, whose
    columns reshape to ``grid.shape``).
    """
    if not isinstance(lds, LDS):
        raise TypeError(f"lds must be a dirfast.LDS, got {type(lds).__name__}")
    if isinstance(lds.binning, GridBinning):
        raise ValueError("plot_label_distribution draws labels with one dimension, and this LDS is over a "
                         "GridBinning: plot the columns of lds.diagnostics() reshaped to lds.binning.shape")
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


def plot_fds_diagnostics(fds: FDS, axes=None):
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
    else:
        if isinstance(axes, (str, bytes)) or not hasattr(axes, "__len__") or len(axes) != len(FDS_PANELS):
            raise TypeError(f"axes must be None or a sequence of {len(FDS_PANELS)} matplotlib Axes, got {axes!r}")
        for index, ax in enumerate(axes):
            _check_axes(f"axes[{index}]", ax)
    count_ax, cosine_ax, distance_ax, scale_ax = axes = list(axes)
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
