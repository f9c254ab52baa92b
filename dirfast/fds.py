"""FDS: feature distribution smoothing, a drop-in for the published ``FDS`` module."""

from __future__ import annotations

import math

import torch

from . import _validate as validate
from . import distributed, ops
from ._autograd import in_place_refusal, recomputing_in_backward
from ._state import CheckedLoad, move_only
from ._types import ProcessGroup
from .ops.accumulate_bin_stats import accumulate_bin_stats_unchecked_, var_from_m2
from .ops.calibrate import calibrate_unchecked, calibrate_unchecked_, scale_shift
from .binning import MAX_BINS, Binning, GridBinning, check_binning
from .windows import kernel_window

__all__ = ["FDS"]

# The epoch counter is a float32 buffer (as published): it holds every whole epoch in this range exactly.
EPOCH_LIMIT = 1 << 24
# Elements of each [K, D] statistic: a bound that keeps the buffers allocatable and their sizes in range.
MAX_TABLE = 1 << 31

_BUFFERS = ("running_mean", "running_var", "running_mean_last_epoch", "running_var_last_epoch",
            "smoothed_mean_last_epoch", "smoothed_var_last_epoch")
# The statistics the published snapshot sharing ties (copy_snapshot=False), and the state_dict
# metadata entry that says whether they follow (a dirfast checkpoint's tensors never share).
_SHARED = (("running_mean_last_epoch", "running_mean"), ("running_var_last_epoch", "running_var"))
_FOLLOWS = "snapshot_follows"
# accumulate's tables, made (and loaded, by copy) together: the first stands for them all
_STREAMED = ("accumulated_count",)
_COUNTS = ("num_samples_tracked", "accumulated_count")  # whole numbers of samples
# Where a fractional epoch or count comes from in practice, and what to do.
_AVERAGED = (" A weight average of checkpoints (EMA, SWA with use_buffers=True) averages these too: load this FDS's "
             "entries from the trained model's state_dict instead.")
# Checkpoint entries that are variances, sums of squared deviations or counts: never negative.
_NON_NEGATIVE = ("running_var", "running_var_last_epoch", "smoothed_var_last_epoch", "num_samples_tracked",
                 "accumulated_count", "accumulated_m2")


def _own(saved: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint's tensor to assign as a statistic: as it is, or a copy in ``dtype``, detached,
    contiguous, not an inference tensor (every update writes it in place)."""
    if saved.dtype == dtype and saved.is_contiguous() and not saved.requires_grad and not saved.is_inference():
        return saved
    return saved.detach().to(dtype, copy=True).contiguous()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same values in memory (as the published shared tensors are)."""
    return (not (a.is_meta or b.is_meta) and a.data_ptr() != 0 and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


class FDS(distributed.SharesProcessGroup, CheckedLoad):
    """Feature distribution smoothing (Yang et al., ICML 2021), vectorised over buckets.

    Keeps a running mean and variance of the features in each of the buckets
    ``bucket_start .. bucket_num - 1``, smooths them across neighbouring buckets once per epoch,
    and during training whitens each sample's features with its bucket's statistics and
    re-colours them with the smoothed ones. Buffers, methods and results are those of the
    published module (its snapshot aliasing included, see ``copy_snapshot``); the statistics
    are computed by the fused :mod:`dirfast.ops` kernels with no Python loop over buckets.

    Args:
        feature_dim: the feature size ``D`` (dim 1 of the features).
        bucket_num, bucket_start: statistics are kept for buckets ``bucket_start .. bucket_num - 1``
            (``K = bucket_num - bucket_start`` rows); labels outside join the edge buckets.
            ``bucket_num`` is at most ``2**24`` (as a :class:`~dirfast.Binning`'s bins) and
            ``feature_dim * K`` at most ``2**31`` (the elements of each statistic).
        start_update, start_smooth: the first epoch that updates, and that smooths. Epochs, these
            and those passed to the methods, are ints in ``[-2**24, 2**24]``: the epoch counter is
            a float32 buffer (as published), exact over that range.
        kernel, ks, sigma: the smoothing window, normalised to sum 1.
        momentum: running-average momentum; ``None`` averages over all epochs.
        binning: maps labels to buckets (default ``Binning.integer(bucket_num)``: ``int(label)``);
            a :class:`~dirfast.GridBinning` keeps buckets over a grid of labels ``[N, d]`` with
            several dimensions (``bucket_num=grid.num_bins, bucket_start=0``; features ``[N, D]``),
            smoothed along each grid axis in turn.
        fill_empty: after each update, fill buckets that got no sample as the STS-B-DIR code
            does (the first from bucket 1, the last from the one before it, others with the mean
            of their two neighbours, in increasing order) -- but only a bucket with a neighbour
            that got samples in this update or was just filled: an update without data changes
            nothing, and of a run of empty buckets before the first one with data, only the one
            next to it is filled (the mean of its two neighbours, the one below unchanged).
        copy_snapshot: ``False`` (published behaviour): from each epoch snapshot on,
            ``running_*_last_epoch`` follow every later update of ``running_*`` (the published
            module makes them the same tensors; here they stay buffers of their own that take the
            same values, so weight averaging and DDP, which pair buffers by position, see a fixed
            set). ``True`` takes a real copy. Through ``load_state_dict`` it goes as the published
            sharing does: a module that follows keeps following (the checkpoint's last-epoch values
            in both); one that does not, does not, unless loaded with ``assign=True`` from a
            checkpoint taken while following (its metadata, or a published one's shared tensors).
        clip_min, clip_max: the clamp of the variance ratio in the calibration.
        sync, process_group: when ``torch.distributed`` runs more than one process, every update
            combines the statistics of all ranks (in ``process_group``, default the world), so
            each rank holds those of the whole training set, and :meth:`update_running_stats` is
            a collective (call it on every rank, with the same epoch); ``sync=False`` keeps them
            per rank (inside a ``DistributedDataParallel`` model, give it
            ``forward_sync_buffers=False``, before torch 2.13 ``broadcast_buffers=False``: by
            default it copies rank 0's buffers, these statistics among them, to every rank at
            each forward).

    Features are ``[N, D]`` with labels ``[N]`` or ``[N, 1]``, or dense ``[B, D, *spatial]`` with
    labels ``[B, 1, *spatial]`` or ``[B, *spatial]``; float32, float64, float16 or bfloat16
    (statistics are float32). Works on any device the module is moved to.

    Built under ``with torch.device("meta")`` (deferred init), it holds shapes only, and the calls
    that read its statistics on the host raise ValueError. ``to_empty(device=...)`` then
    ``load_state_dict`` (or a load with ``assign=True``) materialise it: the load also rebuilds
    the kernel window (not in the state_dict, as published), restarts ``num_samples_skipped`` and
    clears the accumulators a checkpoint lacks; ``reset`` rebuilds the window too. Without a
    checkpoint, ``reset_parameters`` gives it its state at construction (FSDP calls it when it
    materialises a module from the meta device).
    """

    # The buffers __init__ registers, declared for type checkers (as torch declares its modules' own).
    kernel_window: torch.Tensor
    epoch: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    running_mean_last_epoch: torch.Tensor
    running_var_last_epoch: torch.Tensor
    smoothed_mean_last_epoch: torch.Tensor
    smoothed_var_last_epoch: torch.Tensor
    num_samples_tracked: torch.Tensor

    def __init__(self, feature_dim: int, bucket_num: int = 100, bucket_start: int = 3,
                 start_update: int = 0, start_smooth: int = 1, kernel: str = "gaussian", ks: int = 5,
                 sigma: float = 2, momentum: float | None = 0.9, *, binning: Binning | GridBinning | None = None,
                 fill_empty: bool = False, copy_snapshot: bool = False, clip_min: float = 0.1,
                 clip_max: float = 10.0, sync: bool = True, process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        feature_dim = validate.integer("feature_dim", feature_dim, 1, MAX_TABLE)
        bucket_num = validate.integer("bucket_num", bucket_num, 1, MAX_BINS)
        bucket_start = validate.integer("bucket_start", bucket_start, 0)
        start_update, start_smooth = (validate.integer(name, value, -EPOCH_LIMIT, EPOCH_LIMIT) for name, value
                                      in (("start_update", start_update), ("start_smooth", start_smooth)))
        if bucket_start >= bucket_num:
            raise ValueError(f"bucket_start ({bucket_start}) must be below bucket_num ({bucket_num})")
        if feature_dim * (bucket_num - bucket_start) > MAX_TABLE:
            raise ValueError(f"feature_dim * (bucket_num - bucket_start) must be at most {MAX_TABLE} (the elements "
                             f"of each statistic), got feature_dim={feature_dim} with "
                             f"{bucket_num - bucket_start} buckets")
        if momentum is not None:
            validate.real("momentum", momentum, 0.0, 1.0)
        clip_min = validate.real("clip_min", clip_min, 0.0, validate.FLOAT32_MAX)
        clip_max = validate.real("clip_max", clip_max, finite=False)
        if not clip_min <= clip_max:
            raise ValueError(f"clip_min and clip_max must satisfy clip_min <= clip_max, got {clip_min} and {clip_max}")
        if validate.FLOAT32_MAX < clip_max < math.inf:
            raise ValueError(f"clip_max must be at most {validate.FLOAT32_MAX:.4g} (float32) or inf, got {clip_max!r}")
        fill_empty, copy_snapshot = validate.boolean("fill_empty", fill_empty), \
            validate.boolean("copy_snapshot", copy_snapshot)
        sync = validate.boolean("sync", sync)
        validate.process_group("process_group", process_group)
        binning = Binning.integer(bucket_num) if binning is None else binning
        check_binning("binning", binning)
        if binning.num_bins != bucket_num:
            raise ValueError(f"binning must have bucket_num={bucket_num} bins, got {binning!r}"
                             + (f" (pass bucket_num={binning.num_bins})" if isinstance(binning, GridBinning) else ""))
        if isinstance(binning, GridBinning) and (bucket_start or fill_empty):
            raise ValueError("a GridBinning needs bucket_start=0 and fill_empty=False (both are rules for one "
                             "label dimension)")
        # The published module keeps the window outside its state_dict: so does this one.
        window = kernel_window(kernel, ks, sigma, normalize="sum").float()

        self.feature_dim, self.bucket_num, self.bucket_start = feature_dim, bucket_num, bucket_start
        self.start_update, self.start_smooth, self.momentum = start_update, start_smooth, momentum
        self.kernel, self.ks, self.sigma, self.half_ks = kernel, ks, sigma, (ks - 1) // 2
        self.binning, self.fill_empty, self.copy_snapshot = binning, fill_empty, copy_snapshot
        # Whether running_*_last_epoch follow the running statistics (the published snapshot
        # sharing, copy_snapshot=False): set by each snapshot, ended by a load.
        self._snapshot_follows = False
        self.register_state_dict_post_hook(FDS._save_follows)
        self.clip_min, self.clip_max = clip_min, clip_max
        self.sync, self.process_group = sync, process_group

        buckets = bucket_num - bucket_start
        self.register_buffer("kernel_window", window, persistent=False)
        self.register_buffer("epoch", torch.zeros(1).fill_(start_update))
        for name in _BUFFERS:
            fill = 1.0 if "var" in name else 0.0
            self.register_buffer(name, torch.full((buckets, feature_dim), fill))
        self.register_buffer("num_samples_tracked", torch.zeros(buckets))
        # Streaming accumulators of accumulate(): per-bucket count, mean and M2 (sum of squared
        # deviations) of the features seen since the last update, merged with Chan's formula.
        # Not buffers: DistributedDataParallel broadcasts buffers from rank 0 at every forward,
        # which would overwrite each rank's own batches. They are saved in the state_dict and
        # moved by .to() all the same (see _ACCUMULATORS below).
        self.accumulated_count = torch.zeros(buckets, dtype=torch.float64)
        self.accumulated_mean = torch.zeros(buckets, feature_dim)
        self.accumulated_m2 = torch.zeros(buckets, feature_dim)
        # Rows accumulate() left out (a NaN or infinite label, or a bucket whose batch statistics
        # were not finite): counted on the device, never in the state_dict. Written through a 1-D
        # view: under torch.compile (aot_eager, inductor; torch 2.13) an in-place update of a 0-dim
        # tensor attribute is dropped, one of a view of it is kept.
        self.num_samples_skipped = torch.zeros((), dtype=torch.float64)

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, bucket_num={self.bucket_num}, "
                f"bucket_start={self.bucket_start}, kernel={self.kernel!r}, ks={self.ks}, "
                f"sigma={self.sigma}, momentum={self.momentum}")

    # -- helpers -------------------------------------------------------------------------------
    def _buckets(self, features: torch.Tensor, labels, check: bool) -> torch.Tensor:
        """Validate ``features``/``labels``; return each row's bucket in ``[0, K)``, or -1 for a
        NaN or infinite label (``check=False``; with ``check`` such labels raise)."""
        return self._bin(self._check_batch(features, labels), check)

    def _bin(self, labels: torch.Tensor, check: bool) -> torch.Tensor:
        # as the published FDS modules: labels in float32, buckets below bucket_start joined to it
        return self.binning._bins_from(labels, "float32", check, self.bucket_start)

    def _check_batch(self, features: torch.Tensor, labels) -> torch.Tensor:
        """The type, shape and device checks of a batch (metadata only: no host sync); returns the
        labels without their singleton dim 1."""
        validate.floating("features", features)
        if features.dim() < 2:
            raise ValueError(f"features must be a [N, D] or [B, D, *spatial] tensor, got shape {tuple(features.shape)}")
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"features has {features.shape[1]} features along dim 1, "
                             f"this FDS was built with feature_dim={self.feature_dim}")
        validate.real_tensor("labels", validate.tensor("labels", labels))  # a tensor of real numbers
        if isinstance(self.binning, GridBinning):
            expected: tuple[int, ...] = (features.shape[0], self.binning.ndim)
            if features.dim() != 2 or tuple(labels.shape) != expected:
                raise ValueError(f"with a GridBinning, features must be [N, D] and labels [N, {self.binning.ndim}]; "
                                 f"got features {tuple(features.shape)} and labels {tuple(labels.shape)}")
        elif labels.dim() == features.dim() and labels.shape[1] == 1:
            labels = labels.squeeze(1)  # [N, 1] or [B, 1, *spatial]
        expected = (features.shape[0],) + tuple(features.shape[2:])
        if not isinstance(self.binning, GridBinning) and tuple(labels.shape) != expected:
            raise ValueError(f"labels must have shape {expected} (or with a singleton dim 1) "
                             f"to match features of shape {tuple(features.shape)}, got {tuple(labels.shape)}")
        if labels.device != features.device or self.running_mean.device != features.device:
            raise ValueError(f"features ({features.device}), labels ({labels.device}) and the FDS "
                             f"buffers ({self.running_mean.device}) must be on one device: call fds.to(device)")
        return labels

    def _epoch(self) -> int:
        self._check_readable()
        return int(self.epoch.item())

    def _check_readable(self) -> None:
        """Refuse a call that reads the statistics on the host while the module holds none."""
        if any(buffer.is_meta for buffer in self.buffers(recurse=False)):
            raise ValueError("this FDS is on the meta device, which holds no values to read: materialise it first "
                             "(fds.to_empty(device=...), then fds.load_state_dict(checkpoint))")

    def _made_in_inference(self, names: tuple | None = None) -> str | None:
        """The first of the tensors ``names`` (default: every buffer) made under
        torch.inference_mode, which torch forbids updating outside it (and says so after the first
        write); None when there is none, or inside inference mode or a trace, where they may be."""
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return None
        names = tuple(name for name, _ in self.named_buffers(recurse=False)) if names is None else names
        return next((name for name in names if getattr(self, name).is_inference()), None)

    def _check_writable(self, names: tuple | None = None) -> None:
        """Refuse, before anything is written, an update of state made under torch.inference_mode:
        the buffers ``names``, or all of them (:meth:`_made_in_inference`)."""
        name = self._made_in_inference(names)
        if name is not None:
            raise RuntimeError(f"this FDS's {name} was made under torch.inference_mode, which torch forbids "
                               "updating outside it: build the FDS outside inference mode (and load its "
                               "state_dict into that one)")

    def _window(self, device) -> torch.Tensor:
        """The smoothing window built on ``device``, whatever torch's default device (a load under
        ``with torch.device("meta")`` must not give a window without values)."""
        with torch.device(device):
            return kernel_window(self.kernel, self.ks, self.sigma, normalize="sum").float()

    @staticmethod
    def _check_epoch(epoch) -> int:
        return validate.integer("epoch", epoch, -EPOCH_LIMIT, EPOCH_LIMIT)

    # -- the published methods -----------------------------------------------------------------
    def reset(self) -> None:
        """Statistics back to their initial values, streaming accumulators cleared, the kernel
        window rebuilt (after ``to_empty`` it holds no window); the epoch counter is kept, as
        published."""
        self._check_writable()
        self.kernel_window.copy_(self._window(self.kernel_window.device))
        for name in _BUFFERS:
            getattr(self, name).fill_(1.0 if "var" in name else 0.0)
        self.num_samples_tracked.zero_()
        self.clear_accumulated()

    def reset_parameters(self) -> None:
        """The whole state as at construction: :meth:`reset`, the epoch counter back to
        ``start_update``, and the published snapshot sharing ended. torch's name for initialising a
        module's state: FSDP calls it on a module it materialises from the meta device, as do init
        loops over ``model.modules()``."""
        self.reset()  # refuses first what it cannot write
        self._snapshot_follows = False
        self.epoch.fill_(self.start_update)

    def update_last_epoch_stats(self, epoch: int) -> None:
        """At the first call of each new epoch (``epoch == self.epoch + 1``), snapshot the running
        statistics and smooth them across buckets (reflect padding, sum-normalised window).

        Once per epoch, outside the compiled step: it reads the epoch on the host, which
        ``torch.compile(fullgraph=True)`` refuses (compiled with graph breaks, it works)."""
        epoch = self._check_epoch(epoch)
        if epoch != self._epoch() + 1:
            return
        self._check_writable()
        self.epoch += 1
        self._snapshot_follows = not self.copy_snapshot  # published: they share the running tensors
        self._copy_running_to_last_epoch()
        self.smoothed_mean_last_epoch.copy_(self._smooth(self.running_mean))
        self.smoothed_var_last_epoch.copy_(self._smooth(self.running_var))

    def _smooth(self, stats: torch.Tensor) -> torch.Tensor:
        """``[K, D]`` statistics smoothed along the buckets (reflect padding), or along each axis
        of a grid in turn (on one axis, the very call of the 1-D case)."""
        if not isinstance(self.binning, GridBinning):
            return ops.smooth_bins(stats, self.kernel_window, "reflect")
        return self.binning.along_each_axis(stats, lambda rows: ops.smooth_bins(rows, self.kernel_window, "reflect"))

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a training batch to this epoch's statistics, without gradient or host sync.

        Call it in the training forward pass on the features :meth:`smooth` returns (the
        published recipe's extra pass runs the model in training mode, so its statistics are of
        calibrated features once smoothing starts); then, once per epoch,
        ``update_running_stats(epoch=epoch)`` with no features applies what was accumulated
        (exactly as one call on all the batches' features, up to float rounding) and clears it.
        This replaces that extra pass over the training set; the difference is that each
        batch's features come from the weights of that moment of the epoch, not from the
        weights at its end.

        Nothing is read on the host, so bad values are not raised here: a row with a NaN or
        infinite label is left out, and so is a bucket's whole batch when its statistics are not
        finite (a NaN or infinite feature); ``num_samples_skipped`` counts those rows. A call in a
        backward pass adds nothing: that is activation checkpointing (``torch.utils.checkpoint``)
        running the forward again, which would count each batch twice. (A block compiled with
        torch.compile inside an eager checkpoint replays its graph, accumulate included: put the
        checkpoint inside the compiled region, or accumulate outside the checkpoint.)
        """
        if recomputing_in_backward():
            return
        self._check_writable(_STREAMED)
        buckets = self._buckets(features, labels, check=False)
        skipped = accumulate_bin_stats_unchecked_(self.accumulated_count, self.accumulated_mean,
                                                  self.accumulated_m2, features, buckets)
        self.num_samples_skipped.view(1).add_(skipped)  # through a view: see __init__

    def clear_accumulated(self) -> None:
        """Drop what :meth:`accumulate` gathered since the last update."""
        self._check_writable(_STREAMED)
        self.accumulated_count.zero_()
        self.accumulated_mean.zero_()
        self.accumulated_m2.zero_()
        self.num_samples_skipped.view(1).zero_()

    @torch.no_grad()
    def update_running_stats(self, features: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                             epoch: int | None = None) -> None:
        """Fold this epoch's features into the running statistics of their buckets.

        ``update_running_stats(features, labels, epoch)`` as published (the whole training set's
        features), or ``update_running_stats(epoch=epoch)`` to apply what :meth:`accumulate`
        gathered during the epoch (then cleared). Ignored when ``epoch < self.epoch`` (what was
        accumulated is cleared then too). For each bucket with ``n`` samples: mean and variance
        (unbiased, 0 when ``n == 1``), ``running = (1 - f) * batch + f * running`` with
        ``f = momentum`` (or ``1 - n / tracked`` when momentum is None; 0 at ``start_update``).
        Buckets without samples keep their values (or are filled, with ``fill_empty``).

        With features (the published call, which reads them on the host anyway), NaN or
        infinite features or labels, and statistics that overflow, raise ValueError and change
        nothing; integer binning warns about fractional labels.
        """
        def arguments() -> int:
            if epoch is None:
                raise TypeError("update_running_stats() needs epoch")
            checked = self._check_epoch(epoch)
            self._check_writable()
            if (features is None) != (labels is None):
                raise ValueError("pass both features and labels, or neither (to apply what accumulate() gathered)")
            return checked

        # Refused on one rank, they are refused on every rank (the others would wait in the vote below).
        if self._syncing():
            epoch = distributed._checked_on_every_rank(arguments, self.process_group, self.running_mean.device)
        else:
            epoch = arguments()
        current = self._epoch()
        ignored = epoch < current
        if self._syncing():  # one rank ignoring the epoch would leave the others in the collectives below
            ignored = distributed._agreed_on_every_rank(
                ignored, f"update_running_stats(epoch={epoch}) is ignored (an epoch behind the module's: call "
                "it with the same epoch on every rank, whose modules must hold the same epoch)", self.process_group,
                self.running_mean.device)
        if features is not None:
            if self._syncing():  # a batch refused on one rank raises on every rank
                count, mean, var = distributed._checked_on_every_rank(lambda: self._batch_stats(features, labels),
                                                                      self.process_group, self.running_mean.device)
            else:
                count, mean, var = self._batch_stats(features, labels)
        if ignored:
            if features is None:
                self.clear_accumulated()  # the ignored epoch's batches must not join the next one's
            return
        if features is None:
            count = self.accumulated_count.round().long()
            mean = self.accumulated_mean.clone()
            var = var_from_m2(count, self.accumulated_m2)
        stats = self._synced(count, mean, var)
        if features is None:
            self.clear_accumulated()
        self._apply_epoch_stats(*stats, epoch)

    def _batch_stats(self, features, labels):
        """Count, mean and variance of each bucket's rows of a batch; ValueError for a label or
        feature that is NaN or infinite, or statistics beyond float32."""
        buckets = self._buckets(features, labels, check=True)  # every row in a bucket, or an error
        count, mean, var = ops.bin_stats(features.detach(), buckets, self.running_mean.shape[0])
        # A NaN or infinite feature makes its bucket's statistics non-finite (as does one beyond
        # what the running statistics' float32 holds): the features themselves are read again
        # only to say which of the two errors it is.
        held = self.running_mean.dtype
        if not bool(torch.isfinite(mean.to(held)).all() & torch.isfinite(var.to(held)).all()):
            if not bool(torch.isfinite(features).all()):
                raise ValueError("features must be finite: found NaN or infinite values (nothing was updated)")
            raise ValueError("the features' statistics overflow float32 (features of magnitude near "
                             "1e19 or more); nothing was updated")
        return count, mean, var

    def _apply_epoch_stats(self, count, mean, var, epoch: int) -> None:
        n = count.to(self.num_samples_tracked.dtype)
        seen = (count > 0).unsqueeze(1)
        tracked = self.num_samples_tracked + n
        if epoch == self.start_update:
            factor = torch.zeros_like(tracked)
        elif self.momentum is None:
            factor = 1 - n / tracked.clamp(min=1)
        else:
            factor = torch.full_like(tracked, self.momentum)
        factor = factor.unsqueeze(1)
        self.num_samples_tracked.copy_(tracked)
        for running, batch in ((self.running_mean, mean), (self.running_var, var)):
            updated = (1 - factor) * batch.to(running.dtype) + factor * running
            running.copy_(torch.where(seen, updated, running))
        if self.fill_empty:
            self._fill_empty_buckets(count)
        if self._snapshot_follows:  # the published sharing, see copy_snapshot
            self._copy_running_to_last_epoch()

    def _copy_running_to_last_epoch(self) -> None:
        """``running_*_last_epoch`` take the running statistics' values: at a snapshot, and after
        each update while they follow."""
        for alias, name in _SHARED:
            getattr(self, alias).copy_(getattr(self, name))

    _ACCUMULATORS = ("accumulated_count", "accumulated_mean", "accumulated_m2")

    # -- module state: moves, checkpoints ------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Moves apply to every statistic; dtype casts do not (``.half()`` must not turn float64
        counters into float16 ones): the statistics keep their own precision, as BatchNorm's
        counter does."""
        move = move_only(fn)
        super()._apply(move, recurse)
        for name in self._ACCUMULATORS + ("num_samples_skipped",):
            setattr(self, name, move(getattr(self, name)))
        return self

    @staticmethod
    def _save_follows(module, state_dict, prefix, local_metadata) -> None:
        """state_dict post-hook: the snapshot sharing goes into the checkpoint's metadata."""
        local_metadata[_FOLLOWS] = module._snapshot_follows

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._ACCUMULATORS:
            value = getattr(self, name)
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Every key, shape and value is checked before anything is copied (a checkpoint of the
        # published module has no accumulators: that is fine). nn.Module.load_state_dict passes
        # strict=True here whatever its own strict: missing keys go to missing_keys, as BatchNorm's
        # do, and it raises for them (strict=True) or returns them (strict=False). A load that is
        # missing a key or has a bad entry changes nothing of this module: no partial statistics.
        names = ("epoch",) + _BUFFERS + ("num_samples_tracked",) + self._ACCUMULATORS
        current = {name: getattr(self, name) for name in names}
        missing = [prefix + name for name in names if name not in self._ACCUMULATORS and prefix + name not in state_dict]
        errors = validate.checkpoint_errors(state_dict, prefix, current, False, "FDS")
        errors = errors or self._value_errors(state_dict, prefix, current)  # of entries of the right kind
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        if not (errors or assign):  # copied in place: torch would copy some, then refuse the others
            errors = self._inference_errors(prefix)
        if missing or errors:
            missing_keys.extend(missing)
            error_msgs.extend(errors)
            unexpected_keys.extend(key for key in state_dict  # what super() would report, had it run
                                   if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in current)
            return
        # The published sharing through a load: copied into a module that shares, the statistics
        # still share (the checkpoint's last-epoch values, copied last, in both); assigned
        # (assign=True), they share as the checkpoint's tensors do (a published checkpoint's
        # share storage; dirfast's say so in their metadata) -- here as buffers of their own.
        if not assign:
            follows = self._snapshot_follows
        elif _FOLLOWS in local_metadata:
            follows = bool(local_metadata[_FOLLOWS]) and not self.copy_snapshot
        else:
            follows = not self.copy_snapshot and all(_same_tensor(state_dict[prefix + alias], state_dict[prefix + name])
                                                     for alias, name in _SHARED)
        if assign:  # assigned, the statistics keep this module's dtypes, and memory of their own
            state_dict = {**state_dict, **{prefix + name: _own(state_dict[prefix + name], mine.dtype)
                                           for name, mine in current.items() if prefix + name in state_dict}}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for alias, name in _SHARED:
            if _same_tensor(getattr(self, alias), getattr(self, name)):
                setattr(self, alias, getattr(self, alias).clone())  # assigned one storage: a buffer each
            if follows and not assign:
                getattr(self, name).copy_(getattr(self, alias))
        self._snapshot_follows = follows
        # What the state_dict does not hold is written here: after to_empty (deferred init on the
        # meta device) it is uninitialised memory, and a load with assign=True leaves it on meta
        # (then it gets new tensors on the statistics' device; else it is written in place, as DDP
        # keeps the buffers it broadcasts). The window is rebuilt, the count of skipped rows
        # restarts, and accumulators a checkpoint lacks (a published one) are cleared.
        device = self.running_mean.device
        for name in ("kernel_window", "num_samples_skipped") + self._ACCUMULATORS:
            old = getattr(self, name)  # also one made under inference mode, which an assigned load replaces
            if old.device != device or (old.is_inference() and not torch.is_inference_mode_enabled()):
                setattr(self, name, torch.empty_like(old, device=device))
        with torch.no_grad():
            self.kernel_window.copy_(self._window(device))
            self.num_samples_skipped.zero_()
            for name in self._ACCUMULATORS:
                key = prefix + name
                if key in unexpected_keys:  # nn.Module only knows parameters and buffers
                    unexpected_keys.remove(key)
                if key in state_dict:
                    getattr(self, name).copy_(state_dict[key])
                else:
                    getattr(self, name).zero_()

    def _inference_errors(self, prefix: str) -> list:
        """The statistics a load would copy into in place (every buffer, the accumulators and the
        skip count) that were made under torch.inference_mode (:meth:`_made_in_inference`)."""
        buffers = tuple(name for name, _ in self.named_buffers(recurse=False))
        name = self._made_in_inference(buffers + self._ACCUMULATORS + ("num_samples_skipped",))
        return [] if name is None else [
            f"{prefix}{name}: this FDS's {name} was made under torch.inference_mode, which torch forbids updating "
            "outside it: build the FDS outside inference mode and load into that one (or load with assign=True)."]

    @staticmethod
    def _value_errors(state_dict, prefix: str, current: dict) -> list:
        """What checkpoint_errors does not check: values beyond the range of this module's dtype
        (a float64 1e39 is inf once copied), negative variances or counts, counts or an epoch that
        are not whole numbers (the epoch in ``[-2**24, 2**24]``). Entries it reports (or missing)
        are skipped."""
        errors = []
        for name, mine in current.items():
            key = prefix + name
            saved = state_dict.get(key)
            if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(mine.shape) or saved.is_meta \
                    or saved.is_complex() or saved.dtype == torch.bool or not bool(torch.isfinite(saved).all()):
                continue
            value = saved.detach().to(mine.dtype)
            if not bool(torch.isfinite(value).all()):
                errors.append(f"{key}: the checkpoint holds values beyond the range of {mine.dtype}.")
            elif name in _NON_NEGATIVE and bool((value < 0).any()):
                errors.append(f"{key}: the checkpoint holds negative values (a variance or count is never negative).")
            elif name in _COUNTS and not bool((value == value.round()).all()):
                errors.append(f"{key}: the checkpoint holds counts that are not whole numbers.{_AVERAGED}")
            elif name == "epoch" and not bool(((value == value.round()) & (value.abs() <= EPOCH_LIMIT)).all()):
                errors.append(f"{key}: the checkpoint's epoch must be a whole number in [-{EPOCH_LIMIT}, {EPOCH_LIMIT}], "
                              f"got {saved.tolist()}.{_AVERAGED if bool((value.abs() <= EPOCH_LIMIT).all()) else ''}")
        return errors

    def _syncing(self) -> bool:
        """Whether updates combine the ranks' statistics (``sync``, running distributed)."""
        return self.sync and distributed.is_distributed(self.process_group)

    def _synced(self, count, mean, var) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The statistics of all ranks' rows, when :meth:`_syncing`."""
        if self._syncing():
            return distributed.all_reduce_bin_stats(count, mean, var, self.process_group)
        return count, mean, var

    def _fill_empty_buckets(self, count: torch.Tensor) -> None:
        # Each fill reads the previous bucket as it is at that moment: an ordered recurrence, run
        # once per epoch over the empty buckets only. A bucket is filled only when a neighbour
        # got rows in this update or was just filled from one: an epoch with no data leaves every
        # bucket as it was.
        last = self.running_mean.shape[0] - 1
        seen = (count > 0).tolist()
        for k in [k for k, has in enumerate(seen) if not has]:
            if last == 0:
                break  # a single bucket has no neighbour to fill from
            if not ((k > 0 and seen[k - 1]) or (k < last and seen[k + 1])):
                continue
            seen[k] = True
            for running in (self.running_mean, self.running_var):
                if k == 0:
                    running[0] = running[1]
                elif k == last:
                    running[k] = running[k - 1]
                else:
                    running[k] = (running[k - 1] + running[k + 1]) / 2.0

    def smooth(self, features: torch.Tensor, labels: torch.Tensor, epoch: int, *,
               inplace: bool | None = None) -> torch.Tensor:
        """Calibrate ``features`` with last epoch's statistics: in place and return them
        (``inplace=True``), or into a new tensor (``inplace=False``). The default does as the
        published module for these features: ``[N, D]`` rows in place (the AgeDB-DIR, IMDB-WIKI-DIR
        and STS-B-DIR modules write into them), dense ``[B, D, *spatial]`` maps into a new tensor
        (the NYUD2-DIR module calibrates a copy, and its model returns the features it smoothed,
        unchanged, for the next statistics).

        Returns ``features`` untouched before ``start_smooth`` (their type, shape and device, and
        the labels', are checked at every epoch). Otherwise each row becomes
        ``(x - m1) * sqrt(clamp(v2 / v1, clip_min, clip_max)) + m2`` with its bucket's last-epoch
        running (``m1, v1``) and smoothed (``m2, v2``) statistics, the published zero-variance
        rules included. Gradients flow to the features. In place, they must not be a tensor
        autograd saved for its backward -- the output of a ReLU, sigmoid or tanh is one, and is
        refused with a RuntimeError before anything is written -- nor a leaf that requires grad,
        nor an expanded tensor (rows sharing memory); ``inplace=False`` takes any features.
        Labels are not checked on the host here (that would wait on the GPU every step): a row
        with a NaN or infinite label is returned unchanged.
        """
        if inplace is not None:
            validate.boolean("inplace", inplace)
        epoch = self._check_epoch(epoch)
        labels = self._check_batch(features, labels)  # at every epoch: a mistake shows before start_smooth
        if epoch < self.start_smooth:
            return features
        if inplace is None:
            inplace = features.dim() == 2
        buckets = self._bin(labels, check=False)
        stats = (self.running_mean_last_epoch, self.running_var_last_epoch, self.smoothed_mean_last_epoch,
                 self.smoothed_var_last_epoch, self.clip_min, self.clip_max)
        if not inplace:
            return calibrate_unchecked(features, buckets, *stats)
        refusal = in_place_refusal("features", features)
        if refusal is not None:
            raise RuntimeError(f"FDS.smooth cannot calibrate features in place: {refusal}. Call smooth(features, "
                               f"labels, epoch, inplace=False) to calibrate into a new tensor, or, for an "
                               f"activation's output, smooth before that activation")
        return calibrate_unchecked_(features, buckets, *stats)

    # -- diagnostics ---------------------------------------------------------------------------
    @torch.no_grad()
    def diagnostics(self) -> dict:
        """What :meth:`smooth` does to each bucket now: a table of 1-D CPU tensors, one row per
        bucket ``bucket_start .. bucket_num - 1``.

        ``"bucket"`` (int64) and ``"count"`` (``num_samples_tracked``: the samples of every update
        so far); then, between the last-epoch running statistics ``m1, v1`` and the smoothed ones
        ``m2, v2`` that :meth:`smooth` uses: ``"mean_distance"`` ``||m1 - m2||``, ``"mean_cosine"``
        their cosine similarity, ``"var_distance"`` and ``"var_cosine"`` the same for the variance
        vectors (the paper's analysis of FDS, Sec. 3.2; a cosine is NaN where a vector is zero),
        and ``"scale_mean"``, ``"scale_min"``, ``"scale_max"``: the per-feature factor
        ``sqrt(clamp(v2 / v1, clip_min, clip_max))`` that :meth:`smooth` multiplies by (1 where the
        zero-variance rules leave a feature alone), summarised over the features. Values are
        float64. Large distances and factors far from 1 show the buckets that smoothing moves.
        """
        self._check_readable()
        running_mean, running_var = self.running_mean_last_epoch, self.running_var_last_epoch
        smoothed_mean, smoothed_var = self.smoothed_mean_last_epoch, self.smoothed_var_last_epoch
        scale, _ = scale_shift(running_mean, running_var, smoothed_mean, smoothed_var, self.clip_min, self.clip_max)
        scale = scale.double().cpu()
        table = {"bucket": torch.arange(self.bucket_start, self.bucket_num, device="cpu"),
                 "count": self.num_samples_tracked.double().cpu()}
        for name, running, smoothed in (("mean", running_mean, smoothed_mean), ("var", running_var, smoothed_var)):
            running, smoothed = running.double().cpu(), smoothed.double().cpu()
            table[f"{name}_distance"] = (running - smoothed).norm(dim=1)
            norms = running.norm(dim=1) * smoothed.norm(dim=1)  # 0 / 0 is NaN: no direction to compare
            table[f"{name}_cosine"] = ((running * smoothed).sum(dim=1) / norms).clamp(-1.0, 1.0)
        table.update(scale_mean=scale.mean(dim=1), scale_min=scale.amin(dim=1), scale_max=scale.amax(dim=1))
        return table
