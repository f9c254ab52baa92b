"""LDS: label distribution smoothing and the per-sample loss weights it gives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast, overload

import numpy as np
import torch

from . import _validate as validate
from . import distributed, ops
from ._estimator import FittedEstimator
from ._types import ArrayLike, NotTensor, ProcessGroup
from .binning import Binning, GridBinning, check_binning
from .ops.smooth_bins import reference as smooth_reference
from .windows import kernel_window

__all__ = ["LDS", "lds_weights", "REWEIGHTS", "LDS_SCALES"]

REWEIGHTS = ("none", "inverse", "sqrt_inv")


class LDS(distributed.SharesProcessGroup, FittedEstimator):
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
            shard of the labels; they are collectives: call them on every rank);
            ``sync=False`` when every rank passes the whole label set, as the published scripts do.

    As the published code, with ``"inverse"`` the smoothed base is truncated toward zero (the
    code convolves an integer array); ``"sqrt_inv"`` is not truncated. Weights are
    ``1 / effective[bin]`` in float32, scaled so that they average 1 over the fitted labels.
    A bin whose weight would be infinite (possible only for labels the fit never saw: effective
    value 0, or one so small that its weight overflows float32, as next to a full bin under a
    narrow Laplace window) gets the weight of the sparsest bin whose weight is finite. Labels
    are binned with ``precision="labels"``, as the published ``np.histogram`` calls do.

    Example::

        lds = LDS(Binning.integer(121)).fit(train_ages)
        loss = weighted_mse_loss(pred, target, lds.weights(target))
    """

    def __init__(self, binning: Binning | GridBinning, reweight: str = "sqrt_inv", lds: bool = True,
                 kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                 inverse_clip: Sequence[float] | np.ndarray | None = (5, 1000), *, padding: str = "constant",
                 bucket_start: int = 0, sync: bool = True, process_group: ProcessGroup | None = None) -> None:
        check_binning("binning", binning)
        reweight = validate.choice("reweight", reweight, REWEIGHTS)
        lds = validate.boolean("lds", lds)
        if lds and reweight == "none":
            raise ValueError("reweight='none' cannot be combined with lds=True (there is no base to smooth)")
        padding = validate.choice("padding", padding, ops.PADDINGS)
        bucket_start = validate.integer("bucket_start", bucket_start, 0, binning.num_bins - 1)
        if isinstance(binning, GridBinning) and bucket_start:
            raise ValueError("bucket_start must be 0 with a GridBinning (there is no first bin to merge into)")
        with torch.device("cpu"):  # the counts' device, whatever the default (meta holds no values)
            window = kernel_window(kernel, ks, sigma, normalize="max")  # checks the settings, also unused ones
        super().__init__()
        self.window = window if lds else None
        self.binning = binning
        self.sync = validate.boolean("sync", sync)
        self.process_group = validate.process_group("process_group", process_group)
        self.reweight = reweight
        self.lds = lds
        self.inverse_clip = None if inverse_clip is None else validate.pair("inverse_clip", inverse_clip)
        if self.inverse_clip is not None:  # beyond float32 the smoothed counts overflow and every weight is 0
            validate.in_dtype("inverse_clip", self.inverse_clip[1], torch.float32)
        # Python values (kernel_window checked them): a NumPy scalar or string in the state dict would
        # not load under torch.load's default weights_only=True
        self.kernel, self.ks, self.sigma = str(kernel), int(ks), float(sigma)
        self.padding, self.bucket_start = padding, bucket_start
        self._derived = None  # (effective, float32 weight per bin), derived from the counts

    # -- fitting -------------------------------------------------------------------------------
    def _bins(self, labels, check: bool) -> torch.Tensor:
        """Each label's row of the tables (-1 for a NaN or infinite label when not checked)."""
        return self.binning._bins_from(labels, "labels", check, self.bucket_start).reshape(-1)

    def update(self, labels: ArrayLike) -> "LDS":
        """Add ``labels`` to the counts (for label streams); returns ``self``."""
        self._set_fit(self._counts + self._fit_labels(labels))
        return self

    def _fit_labels(self, labels) -> torch.Tensor:
        """The count of ``labels`` in each row of the tables (of every rank's, with ``sync``);
        ValueError for NaN, infinite or no labels (on any rank: then on every rank)."""
        if not (self.sync and distributed.is_distributed(self.process_group)):
            return self._count_labels(labels).cpu()
        device = labels.device if isinstance(labels, torch.Tensor) else None  # of the counts, and the vote
        count = distributed._checked_on_every_rank(lambda: self._count_labels(labels), self.process_group, device)
        # NCCL reduces CUDA tensors only: the counts of labels given on the host (NumPy, as published) go there
        count = count.to(distributed._vote_device(self.process_group, count.device))
        return distributed.all_reduce_sum(count, self.process_group).cpu()

    def _count_labels(self, labels) -> torch.Tensor:
        """This rank's count of ``labels`` in each row of the tables (float64, on their device)."""
        labels = validate.real_tensor("labels", labels)
        if labels.numel() == 0:
            raise ValueError("labels must not be empty")
        bins = self._bins(labels, check=True)
        # bin_stats counts the rows of each bin on the labels' device, with the fused kernels.
        ones = torch.ones(bins.shape[0], 1, dtype=torch.float32, device=bins.device)
        count, _, _ = ops.bin_stats(ones, bins, self._num_rows)
        return count.to(torch.float64)

    def _set_fit(self, counts) -> None:
        super()._set_fit(counts)
        self._derived = None

    @property
    def _num_rows(self) -> int:
        return self.binning.num_bins - self.bucket_start

    @property
    def _counts(self) -> torch.Tensor:
        """The label count of each row (0 before a fit)."""
        return self._fit if self._fit is not None else torch.zeros(self._num_rows, dtype=torch.float64, device="cpu")

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
        if self._derived is None:
            effective = self._base()
            if self.lds:
                # A small float64 table: smoothed by the reference definition, which sums in
                # scipy's order (the truncation below depends on those bits).
                effective = self._smooth(effective)
                if self.reweight == "inverse":
                    effective = effective.trunc()  # the published integer-array quirk
            # Written without data-dependent branches, so that it also traces under torch.compile.
            # In float64, rounded once, as the published NYUD2-DIR code: scale / effective with
            # scale = N / sum(counts / effective). The floor rule twice: a bin whose inverse does
            # not fit float32 (effective 0 or tiny) takes the sparsest fitting bin's effective,
            # so that every fitted bin counts in the scale and an unseen one adds 0 to it, not
            # 0 * inf; then on the weights, which can overflow.
            fits = 1.0 / effective <= validate.FLOAT32_MAX
            sparsest = torch.where(fits, effective, torch.inf).amin()
            base = torch.where(fits, effective, torch.where(torch.isinf(sparsest), 1.0, sparsest))
            total = (self._counts / base).sum()
            scale = torch.where(total > 0, self._counts.sum() / total, torch.ones_like(total))
            self._derived = (effective, _floored((scale / base).float()))
        return self._derived

    def _smooth(self, table: torch.Tensor) -> torch.Tensor:
        """The window along the bins, or along each axis of a grid in turn (on one axis, the
        very call of the 1-D case)."""
        window = cast(torch.Tensor, self.window)  # not None: called only with lds on
        if not isinstance(self.binning, GridBinning):
            return smooth_reference(table, window, self.padding)
        return self.binning.along_each_axis(table, lambda rows: smooth_reference(rows, window, self.padding))

    def _bin_weights(self) -> torch.Tensor:
        """The float32 weight of a label in each bin (CPU), with the fitted scale."""
        weights = self._tables()[1]
        return torch.ones_like(weights) if self.reweight == "none" else weights

    def _label_shape(self, labels: torch.Tensor) -> tuple:
        """The shape of the weights of ``labels``: theirs, less the coordinates of a grid."""
        return tuple(labels.shape[:-1]) if isinstance(self.binning, GridBinning) else tuple(labels.shape)

    # -- weights -------------------------------------------------------------------------------
    def weights(self, labels: ArrayLike) -> torch.Tensor:
        """Float32 weight of each label (same shape, same device), with the fitted scale.

        The weights of the fitted labels average 1 and equal :func:`lds_weights` to a few float32
        ulps (it scales as the published scripts, in the labels' order). Nothing is
        read on the host (call it in the training step): a NaN or infinite label gets weight 0.
        Raises RuntimeError before :meth:`fit`.
        """
        self._require_fit("weights")
        labels = validate.real_tensor("labels", labels)
        table = self._table_on(labels.device)
        bins = self._bins(labels, check=False)
        return table[bins].reshape(self._label_shape(labels))  # bin -1: the table's last row

    def _fitted_weights(self, labels: torch.Tensor, scale: str = "samples") -> torch.Tensor:
        """The weights of the labels just fitted (the one-call functions), scaled as the published
        scripts scale theirs (``scale``, one of :data:`LDS_SCALES`): ``"samples"`` (AgeDB-DIR,
        IMDB-WIKI-DIR, STS-B-DIR) is their
        ``len(w) / np.sum(w)`` times each ``w``, with ``w`` each label's float32 ``1 / effective``
        in the labels' order, computed by the installed NumPy as they compute it (in float32 under
        NumPy 2, in float64 rounded once under NumPy 1); ``"counts"`` (NYUD2-DIR) is
        :meth:`weights`, scaled from the counts. :meth:`weights` cannot keep the labels' order: the
        two are a few float32 ulps apart (the rounding of the float32 sum, which grows with the
        number of labels). Where the sample scale would not be finite, :meth:`weights`."""
        if scale == "samples" and self.reweight != "none":
            unscaled = _floored((1.0 / self._tables()[0]).float())[self._bins(labels.cpu(), check=False)].numpy()
            with np.errstate(all="ignore"):
                factor = unscaled.size / unscaled.sum()  # an int over a np.float32, as published
                product = (factor * unscaled[0]).dtype  # the published scalar products' dtype (NumPy's promotion)
                scaled = (np.asarray(factor, product) * unscaled.astype(product)).astype(np.float32)
            if np.isfinite(scaled).all() and factor > 0:  # else weights(), which floors what is not finite
                return torch.from_numpy(scaled).reshape(self._label_shape(labels)).to(labels.device)
        return self.weights(labels)

    def _table(self) -> torch.Tensor:
        """The weight of each row, then 0 (the weight of a NaN or infinite label)."""
        weights = self._bin_weights()
        return torch.cat([weights, weights.new_zeros(1)])

    # -- checkpoints ---------------------------------------------------------------------------
    _SETTINGS = ("reweight", "lds", "kernel", "ks", "sigma", "inverse_clip", "padding", "bucket_start")

    def _fit_state(self) -> dict:
        return {"counts": self._counts.clone(), "edges": self._edges()}

    def _fit_from_state(self, state, fitted: bool):
        if "counts" not in state:
            raise ValueError("state must be a dict from LDS.state_dict() (it has no 'counts')")
        counts = validate.state_values("counts", state["counts"])
        if counts.shape != (self._num_rows,):
            raise ValueError(f"state_dict 'counts' has shape {tuple(counts.shape)}, this LDS expects "
                             f"({self._num_rows},)")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("state_dict 'counts' must be finite and non-negative")
        if bool(counts.sum() > validate.FLOAT32_MAX):  # as inverse_clip: smoothed, they would overflow
            raise ValueError(f"state_dict 'counts' must sum to at most {validate.FLOAT32_MAX:.4g} (float32)")
        if fitted != bool(counts.sum() > 0):
            raise ValueError("state_dict 'counts' are all 0 but 'fitted' is True: nothing was fitted" if fitted
                             else "state_dict 'fitted' is False but 'counts' are not all 0")
        if "edges" in state and not _same_edges(state["edges"], self._edges()):
            raise ValueError("state_dict 'edges' differ from this LDS's binning")
        return counts.clone() if fitted else None

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
        return {"bin": torch.arange(self.bucket_start, self.binning.num_bins, device="cpu"),
                "center": torch.from_numpy(self.binning.centers[self.bucket_start:]),
                "count": counts, "empirical_density": counts / counts.sum(),
                "effective_density": effective / effective.sum(), "weight": self._bin_weights().double()}


# How the published scripts scale their per-sample weights to average 1 (LDS._fitted_weights).
LDS_SCALES = ("samples", "counts")


def _floored(values: torch.Tensor) -> torch.Tensor:
    """``values`` with each one that is not finite replaced by the largest finite one (1 when
    none is): the inverse or weight of the sparsest bin that has a finite one."""
    finite = torch.isfinite(values)
    top = torch.where(finite, values, -torch.inf).amax()
    return torch.where(finite, values, torch.where(torch.isinf(top), torch.ones_like(top), top))


def refuse_sync(caller: str, options) -> None:
    """TypeError for ``sync`` or ``process_group`` among ``options``: ``caller`` fits the labels
    it is given alone, so that their weights average 1 (LDS's ``sync=True`` would add the
    counts of other ranks)."""
    for name in ("sync", "process_group"):
        if name in options:
            raise TypeError(f"{caller}() takes no {name!r}: it fits the labels it is given, the whole training "
                            "set, on this rank alone; to sum the counts of every rank's shard, use "
                            "LDS(binning, ...).fit(labels).weights(labels)")


def _same_edges(saved, edges) -> bool:
    """Whether saved edges (real numbers: complex ones are not edges) are ``edges``."""
    if isinstance(edges, list):
        return (isinstance(saved, (list, tuple)) and len(saved) == len(edges)
                and all(_same_edges(a, b) for a, b in zip(saved, edges)))
    try:
        saved = np.asarray(saved.detach().cpu() if isinstance(saved, torch.Tensor) else saved)  # one requiring grad too
        return saved.dtype.kind in "iuf" and np.array_equal(saved, edges.numpy())
    except (TypeError, ValueError, RuntimeError):
        return False


@overload
def lds_weights(labels: torch.Tensor, binning: Binning | GridBinning, reweight: str = ..., lds: bool = ...,
                kernel: str = ..., ks: int = ..., sigma: float = ...,
                inverse_clip: Sequence[float] | np.ndarray | None = ..., **options: Any) -> torch.Tensor: ...
@overload
def lds_weights(labels: NotTensor, binning: Binning | GridBinning, reweight: str = ..., lds: bool = ...,
                kernel: str = ..., ks: int = ..., sigma: float = ...,
                inverse_clip: Sequence[float] | np.ndarray | None = ..., **options: Any) -> np.ndarray: ...
def lds_weights(labels: ArrayLike, binning: Binning | GridBinning, reweight: str = "sqrt_inv", lds: bool = True,
                kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                inverse_clip: Sequence[float] | np.ndarray | None = (5, 1000),
                **options: Any) -> torch.Tensor | np.ndarray:
    """Per-sample LDS loss weights of the training ``labels``, as the published code computes.

    Returns float32 weights averaging 1, one per label: a tensor on the labels' device, or a
    NumPy array when ``labels`` is not a tensor (usable as scikit-learn's ``sample_weight``);
    scaled as the AgeDB-DIR and STS-B-DIR scripts scale them (their NumPy arithmetic over the
    labels in order, float32 under NumPy 2 and float64 under NumPy 1), so their weights come out
    bit for bit (``NYUD2_DIR.lds_weights`` scales from the counts, as NYUD2-DIR does).
    With the defaults and ``Binning.integer(121)`` this reproduces the AgeDB-DIR /
    IMDB-WIKI-DIR weights; ``Binning.uniform(0, 5, 50)`` with ``inverse_clip=None`` reproduces
    STS-B-DIR for labels of the same dtype as the published run's. See :class:`LDS` for the
    arguments (``padding``, ``bucket_start`` are keyword options; ``sync`` and ``process_group``
    are not, as the labels are the whole set).
    """
    refuse_sync("lds_weights", options)
    estimator = LDS(binning, reweight=reweight, lds=lds, kernel=kernel, ks=ks, sigma=sigma,
                    inverse_clip=inverse_clip, sync=False, **options)  # it is given the whole label set
    return estimator._fit_weights(labels)
