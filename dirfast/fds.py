"""FDS: feature distribution smoothing, a drop-in for the published ``FDS`` module."""

from __future__ import annotations

import torch
from torch import nn

from . import distributed, ops, reference
from .binning import Binning
from .windows import kernel_window

__all__ = ["FDS"]

_BUFFERS = ("running_mean", "running_var", "running_mean_last_epoch", "running_var_last_epoch",
            "smoothed_mean_last_epoch", "smoothed_var_last_epoch")


class FDS(nn.Module):
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
        start_update, start_smooth: the first epoch that updates, and that smooths.
        kernel, ks, sigma: the smoothing window, normalised to sum 1.
        momentum: running-average momentum; ``None`` averages over all epochs.
        binning: maps labels to buckets (default ``Binning.integer(bucket_num)``: ``int(label)``).
        fill_empty: after each update, fill buckets that got no sample as the STS-B-DIR code
            does (the first from bucket 1, the last from the one before it, others with the mean
            of their two neighbours, in increasing order).
        copy_snapshot: ``False`` (published behaviour) makes ``running_*_last_epoch`` the same
            tensors as ``running_*`` at each epoch snapshot, so they follow later updates;
            ``True`` takes a real copy.
        clip_min, clip_max: the clamp of the variance ratio in the calibration.
        sync, process_group: when ``torch.distributed`` runs more than one process, every update
            combines the statistics of all ranks (in ``process_group``, default the world), so
            each rank holds those of the whole training set; ``sync=False`` keeps them per rank.

    Features are ``[N, D]`` with labels ``[N]`` or ``[N, 1]``, or dense ``[B, D, *spatial]`` with
    labels ``[B, 1, *spatial]`` or ``[B, *spatial]``; float32, float16 or bfloat16 (statistics
    are float32). Works on any device the module is moved to.
    """

    def __init__(self, feature_dim: int, bucket_num: int = 100, bucket_start: int = 3,
                 start_update: int = 0, start_smooth: int = 1, kernel: str = "gaussian", ks: int = 5,
                 sigma: float = 2, momentum=0.9, *, binning: Binning | None = None,
                 fill_empty: bool = False, copy_snapshot: bool = False, clip_min: float = 0.1,
                 clip_max: float = 10.0, sync: bool = True, process_group=None):
        super().__init__()
        for name, value, low in (("feature_dim", feature_dim, 1), ("bucket_num", bucket_num, 1),
                                 ("bucket_start", bucket_start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if bucket_start >= bucket_num:
            raise ValueError(f"bucket_start ({bucket_start}) must be below bucket_num ({bucket_num})")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
        if not 0 <= clip_min <= clip_max:
            raise ValueError(f"clip_min and clip_max must satisfy 0 <= clip_min <= clip_max, got {clip_min}, {clip_max}")
        binning = Binning.integer(bucket_num) if binning is None else binning
        if not isinstance(binning, Binning) or binning.num_bins != bucket_num:
            raise ValueError(f"binning must be a dirfast.Binning with bucket_num={bucket_num} bins, got {binning!r}")

        self.feature_dim, self.bucket_num, self.bucket_start = feature_dim, bucket_num, bucket_start
        self.start_update, self.start_smooth, self.momentum = start_update, start_smooth, momentum
        self.kernel, self.ks, self.sigma, self.half_ks = kernel, ks, sigma, (ks - 1) // 2
        self.binning, self.fill_empty, self.copy_snapshot = binning, fill_empty, copy_snapshot
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.sync, self.process_group = sync, process_group

        buckets = bucket_num - bucket_start
        # The published module keeps the window outside its state_dict: so does this one.
        window = kernel_window(kernel, ks, sigma, normalize="sum").float()
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

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, bucket_num={self.bucket_num}, "
                f"bucket_start={self.bucket_start}, kernel={self.kernel!r}, ks={self.ks}, "
                f"sigma={self.sigma}, momentum={self.momentum}")

    # -- helpers -------------------------------------------------------------------------------
    def _buckets(self, features: torch.Tensor, labels, check: bool) -> torch.Tensor:
        """Validate ``features``/``labels``; return each row's bucket in ``[0, K)``."""
        if not isinstance(features, torch.Tensor) or features.dim() < 2:
            raise ValueError("features must be a [N, D] or [B, D, *spatial] tensor")
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"features has {features.shape[1]} features along dim 1, "
                             f"this FDS was built with feature_dim={self.feature_dim}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dim() == features.dim() and labels.shape[1] == 1:
            labels = labels.squeeze(1)  # [N, 1] or [B, 1, *spatial]
        expected = (features.shape[0],) + tuple(features.shape[2:])
        if tuple(labels.shape) != expected:
            raise ValueError(f"labels must have shape {expected} (or with a singleton dim 1) "
                             f"to match features of shape {tuple(features.shape)}, got {tuple(labels.shape)}")
        if labels.device != features.device or self.running_mean.device != features.device:
            raise ValueError(f"features ({features.device}), labels ({labels.device}) and the FDS "
                             f"buffers ({self.running_mean.device}) must be on one device: call fds.to(device)")
        bins = self.binning(labels, check=check)
        return bins.clamp(self.bucket_start, self.bucket_num - 1) - self.bucket_start

    def _epoch(self) -> int:
        return int(self.epoch.item())

    # -- the published methods -----------------------------------------------------------------
    def reset(self) -> None:
        """Statistics back to their initial values (the epoch counter is kept, as published)."""
        for name in _BUFFERS:
            getattr(self, name).fill_(1.0 if "var" in name else 0.0)
        self.num_samples_tracked.zero_()

    def update_last_epoch_stats(self, epoch: int) -> None:
        """At the first call of each new epoch (``epoch == self.epoch + 1``), snapshot the running
        statistics and smooth them across buckets (reflect padding, sum-normalised window)."""
        if epoch != self._epoch() + 1:
            return
        self.epoch += 1
        if self.copy_snapshot:
            self.running_mean_last_epoch.copy_(self.running_mean)
            self.running_var_last_epoch.copy_(self.running_var)
        else:  # published: the "last epoch" names now share the running tensors
            self.running_mean_last_epoch = self.running_mean
            self.running_var_last_epoch = self.running_var
        window = self.kernel_window
        self.smoothed_mean_last_epoch.copy_(ops.smooth_bins(self.running_mean, window, "reflect"))
        self.smoothed_var_last_epoch.copy_(ops.smooth_bins(self.running_var, window, "reflect"))

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a training batch to this epoch's statistics, without gradient or host sync.

        Call it in the training forward pass on the features FDS sees; then, once per epoch,
        ``update_running_stats(epoch=epoch)`` with no features applies what was accumulated
        (exactly as one call on all the batches' features, up to float rounding) and clears it.
        This replaces the published recipe's extra pass over the training set; the difference is
        that each batch's features come from the weights of that moment of the epoch, not from
        the weights at its end.
        """
        buckets = self._buckets(features, labels, check=False)
        count, mean, var = ops.bin_stats(features.detach(), buckets, self.running_mean.shape[0])
        n_b = count.to(torch.float64)
        m2_b = reference.m2_from_var(count, var)
        n_a = self.accumulated_count
        total = n_a + n_b
        weight_b = (n_b / total.clamp(min=1)).to(mean.dtype).unsqueeze(1)
        cross = (n_a * n_b / total.clamp(min=1)).to(mean.dtype).unsqueeze(1)
        delta = mean - self.accumulated_mean
        self.accumulated_mean.add_(delta * weight_b)
        self.accumulated_m2.add_(m2_b + delta * delta * cross)
        self.accumulated_count.copy_(total)

    def clear_accumulated(self) -> None:
        """Drop what :meth:`accumulate` gathered since the last update."""
        self.accumulated_count.zero_()
        self.accumulated_mean.zero_()
        self.accumulated_m2.zero_()

    @torch.no_grad()
    def update_running_stats(self, features: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                             epoch: int | None = None) -> None:
        """Fold this epoch's features into the running statistics of their buckets.

        ``update_running_stats(features, labels, epoch)`` as published (the whole training set's
        features), or ``update_running_stats(epoch=epoch)`` to apply what :meth:`accumulate`
        gathered during the epoch (then cleared). Ignored when ``epoch < self.epoch``. For each
        bucket with ``n`` samples: mean and variance (unbiased, 0 when ``n == 1``),
        ``running = (1 - f) * batch + f * running`` with ``f = momentum`` (or ``1 - n / tracked``
        when momentum is None; 0 at ``start_update``). Buckets without samples keep their values
        (or are filled, with ``fill_empty``).
        """
        if epoch is None:
            raise TypeError("update_running_stats() needs epoch")
        if (features is None) != (labels is None):
            raise ValueError("pass both features and labels, or neither (to apply what accumulate() gathered)")
        if epoch < self._epoch():
            return
        if features is None:
            count = self.accumulated_count.round().long()
            mean = self.accumulated_mean.clone()
            var = reference.var_from_m2(count, self.accumulated_m2)
            self.clear_accumulated()
        else:
            buckets = self._buckets(features, labels, check=True)
            count, mean, var = ops.bin_stats(features.detach(), buckets, self.running_mean.shape[0])
        self._apply_epoch_stats(*self._synced(count, mean, var), epoch)

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

    _ACCUMULATORS = ("accumulated_count", "accumulated_mean", "accumulated_m2")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self._ACCUMULATORS:
            setattr(self, name, fn(getattr(self, name)))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._ACCUMULATORS:
            value = getattr(self, name)
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # A checkpoint of the published module has no streaming accumulators: they stay empty.
        for name in self._ACCUMULATORS:
            key = prefix + name
            if key not in state_dict:
                continue
            if key in unexpected_keys:  # nn.Module only knows parameters and buffers
                unexpected_keys.remove(key)
            mine, saved = getattr(self, name), state_dict[key]
            if saved.shape != mine.shape:
                error_msgs.append(f"size mismatch for {key}: copying a tensor with shape "
                                  f"{tuple(saved.shape)} from checkpoint, the shape in current model is {tuple(mine.shape)}.")
                continue
            with torch.no_grad():
                mine.copy_(saved)

    def _synced(self, count, mean, var):
        """The statistics of all ranks' rows, when running distributed with ``sync``."""
        if self.sync and distributed.is_distributed(self.process_group):
            return distributed.all_reduce_bin_stats(count, mean, var, self.process_group)
        return count, mean, var

    def _fill_empty_buckets(self, count: torch.Tensor) -> None:
        # Each fill reads the previous bucket as it is at that moment: an ordered recurrence, run
        # once per epoch over the empty buckets only.
        last = self.running_mean.shape[0] - 1
        for k in torch.nonzero(count == 0).flatten().tolist():
            if last == 0:
                break  # a single bucket has no neighbour to fill from
            for running in (self.running_mean, self.running_var):
                if k == 0:
                    running[0] = running[1]
                elif k == last:
                    running[k] = running[k - 1]
                else:
                    running[k] = (running[k - 1] + running[k + 1]) / 2.0

    def smooth(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """Calibrate ``features`` in place with last epoch's statistics and return them.

        Returns ``features`` untouched before ``start_smooth``. Otherwise each row becomes
        ``(x - m1) * sqrt(clamp(v2 / v1, clip_min, clip_max)) + m2`` with its bucket's last-epoch
        running (``m1, v1``) and smoothed (``m2, v2``) statistics, the published zero-variance
        rules included. Gradients flow to the features; as with the published module, they must
        not be a tensor autograd saved for its backward (a ReLU's output, say), since they are
        overwritten. Labels are not checked for NaN here
        (that would wait on the GPU every step); they are in :meth:`update_running_stats`.
        """
        if epoch < self.start_smooth:
            return features
        buckets = self._buckets(features, labels, check=False)
        return ops.calibrate_(features, buckets, self.running_mean_last_epoch,
                              self.running_var_last_epoch, self.smoothed_mean_last_epoch,
                              self.smoothed_var_last_epoch, self.clip_min, self.clip_max)
