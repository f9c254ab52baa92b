"""LDS: label distribution smoothing and the per-sample loss weights it gives."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import distributed, ops
from .ops.smooth_bins import reference as smooth_reference
from .binning import Binning, GridBinning, as_label_tensor
from .windows import kernel_window

__all__ = ["LDS", "lds_weights", "REWEIGHTS"]

REWEIGHTS = ("none", "inverse", "sqrt_inv")


def _clip(inverse_clip):
    """``None`` or a ``(low, high)`` pair of finite numbers with 0 <= low <= high."""
    if inverse_clip is None:
        return None
    if isinstance(inverse_clip, (str, bytes)) or not hasattr(inverse_clip, "__len__") or len(inverse_clip) != 2:
        raise TypeError(f"inverse_clip must be None or a pair (low, high), got {inverse_clip!r}")
    for value in inverse_clip:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"inverse_clip must hold two real numbers, got {inverse_clip!r}")
    low, high = float(inverse_clip[0]), float(inverse_clip[1])
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise ValueError(f"inverse_clip must satisfy 0 <= low <= high (finite), got {inverse_clip!r}")
    return tuple(inverse_clip)


class LDS:
    """Label distribution smoothing, fitted on the training labels, applied to any batch.

    Args:
        binning: a :class:`~dirfast.Binning` (``Binning.integer(121)`` for ages,
            ``Binning.uniform(0, 5, 50)`` for STS-B-DIR; see :mod:`dirfast.presets`), or a
            :class:`~dirfast.GridBinning` for labels ``[N, d]`` with several dimensions: the
            window then smooths along each grid axis in turn (separably).
        reweight: ``"sqrt_inv"`` (base ``sqrt(count)``), ``"inverse"`` (base ``count``, clipped
            to ``inverse_clip``) or ``"none"`` (every weight 1).
        lds: smooth the base with the kernel window (the effective distribution); without it
            the base itself is used.
        kernel, ks, sigma: the LDS window (:func:`dirfast.get_lds_kernel_window`).
        inverse_clip: ``(low, high)`` clip of the counts with ``"inverse"``; the published age
            code uses ``(5, 1000)``, the STS-B and NYUD2 code ``None`` (no clip).
        padding: what the window sees beyond the bins: ``"constant"`` (zero, as the published
            ``convolve1d(mode="constant")``) or ``"symmetric"`` (scipy's ``"reflect"``, as the
            NYUD2-DIR code); ``"reflect"`` and ``"replicate"`` also work.
        bucket_start: bins below it are merged into it (labels there count and weigh as
            ``bucket_start``) and smoothing starts there, as the NYUD2-DIR code does with 7.
        sync, process_group: when ``torch.distributed`` runs more than one process, the counts of
            :meth:`fit` and :meth:`update` are summed over the ranks (each rank passes its own
            shard of the labels); ``sync=False`` when every rank passes the whole label set.

    As the published code, with ``"inverse"`` the smoothed base is truncated toward zero (the
    code convolves an integer array); ``"sqrt_inv"`` is not truncated. Weights are
    ``1 / effective[bin]`` in float32, scaled so that they average 1 over the fitted labels.
    A bin whose effective value is 0 (possible only for labels the fit never saw) gets the
    weight of the sparsest non-empty bin rather than an infinite one. Labels are binned with
    ``precision="labels"``, as the published ``np.histogram`` calls do.

    Example::

        lds = LDS(Binning.integer(121)).fit(train_ages)
        loss = weighted_mse_loss(pred, target, lds.weights(target))
    """

    def __init__(self, binning: Binning, reweight: str = "sqrt_inv", lds: bool = True,
                 kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0, inverse_clip=(5, 1000),
                 *, padding: str = "constant", bucket_start: int = 0, sync: bool = True, process_group=None):
        if not isinstance(binning, (Binning, GridBinning)):
            raise TypeError(f"binning must be a dirfast.Binning or GridBinning, got {type(binning).__name__}")
        if not isinstance(reweight, str) or reweight not in REWEIGHTS:
            raise ValueError(f"reweight must be one of {REWEIGHTS}, got {reweight!r}")
        if not isinstance(lds, (bool, np.bool_)):
            raise TypeError(f"lds must be a bool, got {type(lds).__name__}")
        if lds and reweight == "none":
            raise ValueError("reweight='none' cannot be combined with lds=True (there is no base to smooth)")
        if not isinstance(padding, str) or padding not in ops.PADDINGS:
            raise ValueError(f"padding must be one of {ops.PADDINGS}, got {padding!r}")
        if (isinstance(bucket_start, bool) or not isinstance(bucket_start, (int, np.integer))
                or not 0 <= bucket_start < binning.num_bins):
            raise ValueError(f"bucket_start must be an int in [0, {binning.num_bins}), got {bucket_start!r}")
        if isinstance(binning, GridBinning) and bucket_start:
            raise ValueError("bucket_start must be 0 with a GridBinning (there is no first bin to merge into)")
        self.window = kernel_window(kernel, ks, sigma, normalize="max") if lds else None
        self.binning = binning
        self.sync, self.process_group = sync, process_group
        self.reweight = reweight
        self.lds = bool(lds)
        self.inverse_clip = _clip(inverse_clip)
        self.kernel, self.ks, self.sigma = kernel, ks, sigma
        self.padding, self.bucket_start = padding, int(bucket_start)
        self._counts = torch.zeros(binning.num_bins - self.bucket_start, dtype=torch.float64)
        self._fitted = False
        self._table = None  # (effective, float32 weight per bin, scale), derived from the counts
        self._table_on = {}

    # -- fitting -------------------------------------------------------------------------------
    def _bins(self, labels, check: bool) -> torch.Tensor:
        """Each label's row of the tables (-1 for a NaN or infinite label when not checked)."""
        bins = self.binning(labels, precision="labels", check=check).reshape(-1)
        return torch.where(bins >= 0, (bins - self.bucket_start).clamp(min=0), -1)

    def fit(self, labels) -> "LDS":
        """Count ``labels`` (the whole training set; any shape) from scratch; returns ``self``.

        Raises ValueError for NaN, infinite or no labels, and leaves the fit as it was."""
        counts = self._count(labels)
        self._counts, self._fitted = counts, True
        self._invalidate()
        return self

    def update(self, labels) -> "LDS":
        """Add ``labels`` to the counts (for label streams); returns ``self``."""
        counts = self._count(labels)
        self._counts, self._fitted = self._counts + counts, True
        self._invalidate()
        return self

    def _count(self, labels) -> torch.Tensor:
        labels = as_label_tensor(labels)
        if labels.numel() == 0:
            raise ValueError("labels must not be empty")
        bins = self._bins(labels, check=True)
        # bin_stats counts the rows of each bin on the labels' device, with the fused kernels.
        ones = torch.ones(bins.shape[0], 1, dtype=torch.float32, device=bins.device)
        count, _, _ = ops.bin_stats(ones, bins, self._counts.shape[0])
        count = count.to(torch.float64)
        if self.sync and distributed.is_distributed(self.process_group):
            distributed.all_reduce_sum(count, self.process_group)
        return count.cpu()

    def _invalidate(self) -> None:
        self._table, self._table_on = None, {}

    # -- distributions -------------------------------------------------------------------------
    @property
    def empirical(self) -> torch.Tensor:
        """The label count of each bin (float64, ``[num_bins - bucket_start]``)."""
        return self._counts.clone()

    @property
    def effective(self) -> torch.Tensor:
        """The effective distribution (float64, ``[num_bins - bucket_start]``): the re-weighting
        base, smoothed with the window when ``lds`` is on (and truncated, for ``"inverse"``)."""
        return self._tables()[0].clone()

    def _base(self) -> torch.Tensor:
        counts = self._counts
        if self.reweight == "sqrt_inv":
            return counts.sqrt()
        if self.reweight == "inverse" and self.inverse_clip is not None:
            return counts.clamp(*self.inverse_clip)
        return counts if self.reweight == "inverse" else torch.ones_like(counts)

    def _tables(self):
        if self._table is None:
            effective = self._base()
            if self.lds:
                # A small float64 table: smoothed by the reference definition, which sums in
                # scipy's order (the truncation below depends on those bits).
                effective = self._smooth(effective)
                if self.reweight == "inverse":
                    effective = effective.trunc()  # the published integer-array quirk
            # Written without data-dependent branches, so that it also traces under torch.compile.
            floor = torch.where(effective > 0, effective, torch.inf).amin()
            floor = torch.where(torch.isinf(floor), torch.ones_like(floor), floor)
            per_bin = (1.0 / torch.where(effective > 0, effective, floor)).float()
            total = (self._counts * per_bin.double()).sum()
            scale = torch.where(total > 0, self._counts.sum() / total, torch.ones_like(total))
            self._table = (effective, per_bin, scale)
        return self._table

    def _smooth(self, table: torch.Tensor) -> torch.Tensor:
        """The window along the bins, or along each axis of a grid in turn (on one axis, the
        very call of the 1-D case)."""
        if not isinstance(self.binning, GridBinning):
            return smooth_reference(table, self.window, self.padding)
        return self.binning.along_each_axis(table, lambda rows: smooth_reference(rows, self.window, self.padding))

    def _require_fit(self, what: str) -> None:
        if not self._fitted:
            raise RuntimeError(f"LDS.{what}() needs fitted counts: call fit(train_labels) first (or load_state_dict)")

    def _bin_weights(self) -> torch.Tensor:
        """The float32 weight of a label in each bin (CPU), with the fitted scale."""
        _, per_bin, scale = self._tables()
        weights = (per_bin.double() * scale).float()
        return torch.ones_like(weights) if self.reweight == "none" else weights

    def _label_shape(self, labels: torch.Tensor) -> tuple:
        """The shape of the weights of ``labels``: theirs, less the coordinates of a grid."""
        return tuple(labels.shape[:-1]) if isinstance(self.binning, GridBinning) else tuple(labels.shape)

    # -- weights -------------------------------------------------------------------------------
    def weights(self, labels) -> torch.Tensor:
        """Float32 weight of each label (same shape, same device), with the fitted scale.

        The weights of the fitted labels average 1 and equal :func:`lds_weights`. Nothing is
        read on the host (call it in the training step): a NaN or infinite label gets weight 0.
        Raises RuntimeError before :meth:`fit`.
        """
        self._require_fit("weights")
        labels = as_label_tensor(labels)
        device = labels.device
        table = self._table_on.get(device)
        if table is None:
            weights = self._bin_weights()
            table = self._table_on[device] = torch.cat([weights, weights.new_zeros(1)]).to(device)
        bins = self._bins(labels, check=False)
        return table[torch.where(bins >= 0, bins, table.shape[0] - 1)].reshape(self._label_shape(labels))

    # -- checkpoints ---------------------------------------------------------------------------
    _SETTINGS = ("reweight", "lds", "kernel", "ks", "sigma", "inverse_clip", "padding", "bucket_start")

    def state_dict(self) -> dict:
        """The fitted counts and the settings they were fitted with."""
        state = {"counts": self._counts.clone(), "edges": self._edges(), "fitted": self._fitted}
        state.update({key: getattr(self, key) for key in self._SETTINGS})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore counts saved by :meth:`state_dict`; the settings must match this object's.
        Everything is checked before anything changes."""
        if not isinstance(state, dict) or "counts" not in state:
            raise ValueError("state must be a dict from LDS.state_dict() (it has no 'counts')")
        try:
            counts = torch.as_tensor(state["counts"], dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"state_dict 'counts' is not a tensor of numbers ({exc})") from None
        if counts.shape != self._counts.shape:
            raise ValueError(f"state_dict 'counts' has shape {tuple(counts.shape)}, "
                             f"this LDS expects {tuple(self._counts.shape)}")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("state_dict 'counts' must be finite and non-negative")
        for key in self._SETTINGS:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict {key!r} is {state[key]!r}, this LDS has {getattr(self, key)!r}")
        if "edges" in state and not _same_edges(state["edges"], self._edges()):
            raise ValueError("state_dict 'edges' differ from this LDS's binning")
        self._counts = counts.clone()
        self._fitted = bool(state.get("fitted", True))
        self._invalidate()

    def _edges(self):
        """The bin edges: a tensor, or one per dimension of a grid."""
        if isinstance(self.binning, GridBinning):
            return [torch.as_tensor(b.edges) for b in self.binning.binnings]
        return torch.as_tensor(self.binning.edges)

    def __repr__(self) -> str:
        extra = "" if self.padding == "constant" else f", padding={self.padding!r}"
        extra += "" if self.bucket_start == 0 else f", bucket_start={self.bucket_start}"
        return (f"LDS({self.binning!r}, reweight={self.reweight!r}, lds={self.lds}, kernel={self.kernel!r}, "
                f"ks={self.ks}, sigma={self.sigma}, inverse_clip={self.inverse_clip}{extra}, "
                f"fitted on {int(self._counts.sum())} labels)")

    # -- diagnostics ---------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        """The fitted distributions and weights: a table of 1-D CPU tensors, one row per bin
        ``bucket_start .. num_bins - 1`` (the rows of :attr:`empirical`).

        ``"bin"`` (int64), ``"center"`` (the binning's centre of that bin), ``"count"`` (the
        label count, :attr:`empirical`), ``"empirical_density"`` (the counts over their sum),
        ``"effective_density"`` (:attr:`effective` over its sum: the distribution the weights
        invert) and ``"weight"`` (what :meth:`weights` gives a label of that bin). Float64
        values. Raises RuntimeError before :meth:`fit`, as :meth:`weights` does.
        """
        self._require_fit("diagnostics")
        effective = self._tables()[0]
        counts = self._counts.clone()
        return {"bin": torch.arange(self.bucket_start, self.binning.num_bins),
                "center": torch.from_numpy(self.binning.centers[self.bucket_start:]),
                "count": counts, "empirical_density": counts / counts.sum(),
                "effective_density": effective / effective.sum(), "weight": self._bin_weights().double()}


def _same_edges(saved, edges) -> bool:
    if isinstance(edges, list):
        return (isinstance(saved, (list, tuple)) and len(saved) == len(edges)
                and all(np.array_equal(np.asarray(a), b.numpy()) for a, b in zip(saved, edges)))
    try:
        return np.array_equal(np.asarray(saved), edges.numpy())
    except (TypeError, ValueError):
        return False


def lds_weights(labels, binning: Binning, reweight: str = "sqrt_inv", lds: bool = True,
                kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0, inverse_clip=(5, 1000), **options):
    """Per-sample LDS loss weights of the training ``labels``, as the published code computes.

    Returns float32 weights averaging 1, one per label: a tensor on the labels' device, or a
    NumPy array when ``labels`` is not a tensor (usable as scikit-learn's ``sample_weight``).
    With the defaults and ``Binning.integer(121)`` this reproduces the AgeDB-DIR /
    IMDB-WIKI-DIR weights; ``Binning.uniform(0, 5, 50)`` with ``inverse_clip=None`` reproduces
    STS-B-DIR for labels of the same dtype as the published run's. See :class:`LDS` for the
    arguments (``padding``, ``bucket_start`` are keyword options).
    """
    estimator = LDS(binning, reweight=reweight, lds=lds, kernel=kernel, ks=ks, sigma=sigma,
                    inverse_clip=inverse_clip, sync=False, **options)  # it is given the whole label set
    tensor = as_label_tensor(labels)
    weights = estimator.fit(tensor).weights(tensor)
    return weights if isinstance(labels, torch.Tensor) else weights.numpy()
