"""LDS: label distribution smoothing and the per-sample loss weights it gives."""

from __future__ import annotations

import numpy as np
import torch

from . import distributed, ops
from .binning import Binning
from .ops._dispatch import host_kernel
from .windows import kernel_window

__all__ = ["LDS", "lds_weights", "REWEIGHTS"]

REWEIGHTS = ("none", "inverse", "sqrt_inv")


def _as_labels(labels) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.reshape(-1)
    return torch.as_tensor(np.asarray(labels, dtype=np.float64)).reshape(-1)


class LDS:
    """Label distribution smoothing, fitted on the training labels, applied to any batch.

    Args:
        binning: a :class:`~dirfast.Binning` (``Binning.integer(121)`` for ages,
            ``Binning.uniform(0, 5, 50)`` for STS-B-DIR).
        reweight: ``"sqrt_inv"`` (base ``sqrt(count)``), ``"inverse"`` (base ``count``, clipped
            to ``inverse_clip``) or ``"none"`` (every weight 1).
        lds: smooth the base with the kernel window (the effective distribution); without it
            the base itself is used.
        kernel, ks, sigma: the LDS window (:func:`dirfast.get_lds_kernel_window`).
        inverse_clip: ``(low, high)`` clip of the counts with ``"inverse"``; the published age
            code uses ``(5, 1000)``, the STS-B code ``None`` (no clip).
        sync, process_group: when ``torch.distributed`` runs more than one process, the counts of
            :meth:`fit` and :meth:`update` are summed over the ranks (each rank passes its own
            shard of the labels); ``sync=False`` when every rank passes the whole label set.

    As the published code, with ``"inverse"`` the smoothed base is truncated toward zero (the
    code convolves an integer array); ``"sqrt_inv"`` is not truncated. Weights are
    ``1 / effective[bin]`` in float32, scaled so that they average 1 over the fitted labels.
    A bin whose effective value is 0 (possible only for labels the fit never saw) gets the
    weight of the sparsest non-empty bin rather than an infinite one.

    Example::

        lds = LDS(Binning.integer(121)).fit(train_ages)
        loss = weighted_mse_loss(pred, target, lds.weights(target))
    """

    def __init__(self, binning: Binning, reweight: str = "sqrt_inv", lds: bool = True,
                 kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0, inverse_clip=(5, 1000),
                 *, sync: bool = True, process_group=None):
        if not isinstance(binning, Binning):
            raise TypeError(f"binning must be a dirfast.Binning, got {type(binning).__name__}")
        if reweight not in REWEIGHTS:
            raise ValueError(f"reweight must be one of {REWEIGHTS}, got {reweight!r}")
        if lds and reweight == "none":
            raise ValueError("reweight='none' cannot be combined with lds=True (there is no base to smooth)")
        if inverse_clip is not None:
            if len(inverse_clip) != 2 or not inverse_clip[0] <= inverse_clip[1]:
                raise ValueError(f"inverse_clip must be None or (low, high) with low <= high, got {inverse_clip!r}")
        self.binning = binning
        self.sync, self.process_group = sync, process_group
        self.reweight = reweight
        self.lds = bool(lds)
        self.inverse_clip = None if inverse_clip is None else tuple(inverse_clip)
        self.kernel, self.ks, self.sigma = kernel, ks, sigma
        self.window = kernel_window(kernel, ks, sigma, normalize="max") if lds else None
        self._counts = torch.zeros(binning.num_bins, dtype=torch.float64)
        self._table = None  # (effective, float32 weight per bin, scale), derived from the counts
        self._table_on = {}

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, labels) -> "LDS":
        """Count ``labels`` (the whole training set) from scratch; returns ``self``."""
        bins = self.binning(_as_labels(labels))
        self._counts = self._count(bins)
        self._invalidate()
        return self

    def update(self, labels) -> "LDS":
        """Add ``labels`` to the counts (for label streams); returns ``self``."""
        bins = self.binning(_as_labels(labels))
        self._counts = self._counts + self._count(bins)
        self._invalidate()
        return self

    def _count(self, bins: torch.Tensor) -> torch.Tensor:
        # bin_stats counts the rows of each bin on the labels' device, with the fused kernels.
        ones = torch.ones(bins.shape[0], 1, dtype=torch.float32, device=bins.device)
        count, _, _ = ops.bin_stats(ones, bins, self.binning.num_bins)
        count = count.to(torch.float64)
        if self.sync and distributed.is_distributed(self.process_group):
            distributed.all_reduce_sum(count, self.process_group)
        return count.cpu()

    def _invalidate(self) -> None:
        self._table, self._table_on = None, {}

    # -- distributions -------------------------------------------------------------------------
    @property
    def empirical(self) -> torch.Tensor:
        """The label count of each bin (float64, ``[num_bins]``)."""
        return self._counts.clone()

    @property
    def effective(self) -> torch.Tensor:
        """The effective distribution (float64, ``[num_bins]``): the re-weighting base, smoothed
        with the window when ``lds`` is on (and truncated, for ``"inverse"``)."""
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
                # A small float64 CPU table: smoothed on the CPU whatever GPU backend is selected.
                effective = host_kernel("smooth_bins")(effective, self.window, "constant")
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

    # -- weights -------------------------------------------------------------------------------
    def weights(self, labels) -> torch.Tensor:
        """Float32 weight of each label (same shape, same device), with the fitted scale.

        The weights of the fitted labels average 1 and equal :func:`lds_weights`. NaN or
        infinite labels raise ValueError.
        """
        if self.reweight == "none":
            base = labels if isinstance(labels, torch.Tensor) else _as_labels(labels)
            return torch.ones(base.shape, dtype=torch.float32, device=base.device)
        shape = labels.shape if isinstance(labels, torch.Tensor) else np.shape(labels)
        labels = _as_labels(labels)
        device = labels.device
        if device not in self._table_on:
            _, per_bin, scale = self._tables()
            self._table_on[device] = (per_bin.double() * scale).float().to(device)
        return self._table_on[device][self.binning(labels)].reshape(shape)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The fitted counts and the settings they were fitted with."""
        return {"counts": self._counts.clone(), "edges": torch.as_tensor(self.binning.edges),
                "reweight": self.reweight, "lds": self.lds, "kernel": self.kernel, "ks": self.ks,
                "sigma": self.sigma, "inverse_clip": self.inverse_clip}

    def load_state_dict(self, state: dict) -> None:
        """Restore counts saved by :meth:`state_dict`; the settings must match this object's."""
        counts = torch.as_tensor(state["counts"], dtype=torch.float64)
        if counts.shape != self._counts.shape:
            raise ValueError(f"state_dict 'counts' has shape {tuple(counts.shape)}, "
                             f"this LDS expects {tuple(self._counts.shape)}")
        for key in ("reweight", "lds", "kernel", "ks", "sigma", "inverse_clip"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict {key!r} is {state[key]!r}, this LDS has {getattr(self, key)!r}")
        if "edges" in state and not np.array_equal(np.asarray(state["edges"]), self.binning.edges):
            raise ValueError("state_dict 'edges' differ from this LDS's binning")
        self._counts = counts.clone()
        self._invalidate()

    def __repr__(self) -> str:
        return (f"LDS({self.binning!r}, reweight={self.reweight!r}, lds={self.lds}, kernel={self.kernel!r}, "
                f"ks={self.ks}, sigma={self.sigma}, inverse_clip={self.inverse_clip}, "
                f"fitted on {int(self._counts.sum())} labels)")


def lds_weights(labels, binning: Binning, reweight: str = "sqrt_inv", lds: bool = True,
                kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0, inverse_clip=(5, 1000)):
    """Per-sample LDS loss weights of the training ``labels``, as the published code computes.

    Returns float32 weights averaging 1, one per label: a tensor on the labels' device, or a
    NumPy array when ``labels`` is one (usable as scikit-learn's ``sample_weight``). With the
    defaults and ``Binning.integer(121)`` this reproduces the AgeDB-DIR / IMDB-WIKI-DIR weights;
    ``Binning.uniform(0, 5, 50)`` with ``inverse_clip=None`` reproduces STS-B-DIR. See
    :class:`LDS` for the arguments.
    """
    estimator = LDS(binning, reweight=reweight, lds=lds, kernel=kernel, ks=ks, sigma=sigma,
                    inverse_clip=inverse_clip, sync=False)  # it is given the whole label set
    if isinstance(labels, torch.Tensor):
        return estimator.fit(labels).weights(labels)
    array = np.asarray(labels, dtype=np.float64)
    return estimator.fit(array).weights(array).numpy()
