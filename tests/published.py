"""Published-style Deep Imbalanced Regression code (the YyzHarry/imbalanced-regression modules, MIT).

This module reproduces what the published DIR code (Yang et al., ICML 2021) computes, in the way
it computes it: a Python loop over buckets, boolean-mask gathers and scatters, and its quirks
(the edge-bucket rules, the snapshot aliasing, the zero-variance rules of the calibration).
It serves two purposes:

* the oracle of the test suite (``PublishedFDS``, ``published_calibrate_mean_var``), and
* the "published" provider of the benchmarks (what users run today), which import it from here.

Keep it faithful: do not "fix" or vectorise anything here.  The only departures from the
published module are that it takes a ``device`` argument instead of hard-coding ``.cuda()``,
and the clip of ``calibrate_mean_var`` (which each dataset's utils.py sets) as arguments, that
the kernel window follows the statistics' device, and that it logs nothing.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d
from scipy.signal.windows import triang

__all__ = [
    "PublishedFDS",
    "published_calibrate_mean_var",
    "published_bin_stats",
    "published_calibrate",
]


def published_calibrate_mean_var(matrix, m1, v1, m2, v2, clip_min=0.1, clip_max=10):
    """Whiten ``matrix`` [n, D] with (m1, v1) and re-colour it with (m2, v2), as published.

    * ``sum(v1) < 1e-10``: the matrix is returned unchanged (the same object).
    * some ``v1 == 0``: only the dimensions with ``v1 != 0`` are calibrated, in place in
      ``matrix``, which is returned.
    * otherwise a new tensor ``(matrix - m1) * sqrt(clamp(v2 / v1, clip_min, clip_max)) + m2``.
    """
    if torch.sum(v1) < 1e-10:
        return matrix
    if (v1 == 0.0).any():
        valid = v1 != 0.0
        factor = torch.clamp(v2[valid] / v1[valid], clip_min, clip_max)
        matrix[:, valid] = (matrix[:, valid] - m1[valid]) * torch.sqrt(factor) + m2[valid]
        return matrix

    factor = torch.clamp(v2 / v1, clip_min, clip_max)
    return (matrix - m1) * torch.sqrt(factor) + m2


class PublishedFDS(nn.Module):
    """Feature Distribution Smoothing as the published (AgeDB-DIR / IMDB-WIKI-DIR) module.

    Features are [N, D]; ``update_running_stats`` takes labels [N], ``smooth`` takes labels
    [N, 1].  Labels are (integer-valued) floats; a label ``l`` belongs to bucket
    ``l - bucket_start``.  Out-of-range labels join an edge bucket only when some label sits
    exactly on that edge; otherwise they are skipped (SPEC.md, FDS).
    """

    def __init__(self, feature_dim, bucket_num=100, bucket_start=3, start_update=0, start_smooth=1,
                 kernel="gaussian", ks=5, sigma=2, momentum=0.9, device="cpu", clip_min=0.1, clip_max=10):
        super().__init__()
        self.clips = (clip_min, clip_max)
        self.feature_dim = feature_dim
        self.bucket_num = bucket_num
        self.bucket_start = bucket_start
        self.kernel_window = self._get_kernel_window(kernel, ks, sigma).to(device)
        self.half_ks = (ks - 1) // 2
        self.momentum = momentum
        self.start_update = start_update
        self.start_smooth = start_smooth

        k = bucket_num - bucket_start
        self.register_buffer("epoch", torch.zeros(1, device=device).fill_(start_update))
        self.register_buffer("running_mean", torch.zeros(k, feature_dim, device=device))
        self.register_buffer("running_var", torch.ones(k, feature_dim, device=device))
        self.register_buffer("running_mean_last_epoch", torch.zeros(k, feature_dim, device=device))
        self.register_buffer("running_var_last_epoch", torch.ones(k, feature_dim, device=device))
        self.register_buffer("smoothed_mean_last_epoch", torch.zeros(k, feature_dim, device=device))
        self.register_buffer("smoothed_var_last_epoch", torch.ones(k, feature_dim, device=device))
        self.register_buffer("num_samples_tracked", torch.zeros(k, device=device))

    @staticmethod
    def _get_kernel_window(kernel, ks, sigma):
        """The FDS window, normalised by its sum, as a float32 tensor (on the CPU)."""
        assert kernel in ["gaussian", "triang", "laplace"]
        half_ks = (ks - 1) // 2
        if kernel == "gaussian":
            # a float32 delta: gaussian_filter1d returns float32, and the Python sum of its
            # float32 elements is a float32 scalar, so the division happens in float32.
            base_kernel = np.array([0.0] * half_ks + [1.0] + [0.0] * half_ks, dtype=np.float32)
            kernel_window = gaussian_filter1d(base_kernel, sigma=sigma) / sum(
                gaussian_filter1d(base_kernel, sigma=sigma))
        elif kernel == "triang":
            kernel_window = triang(ks) / sum(triang(ks))
        else:
            def laplace(x):
                return np.exp(-abs(x) / sigma) / (2.0 * sigma)
            values = np.array([laplace(x) for x in np.arange(-half_ks, half_ks + 1)])
            kernel_window = values / sum(laplace(x) for x in np.arange(-half_ks, half_ks + 1))
        return torch.tensor(kernel_window, dtype=torch.float32)

    def _smooth_along_buckets(self, stats):
        window = self.kernel_window.to(stats.device)
        return F.conv1d(
            input=F.pad(stats.unsqueeze(1).permute(2, 1, 0), pad=(self.half_ks, self.half_ks), mode="reflect"),
            weight=window.view(1, 1, -1), padding=0,
        ).permute(2, 1, 0).squeeze(1)

    def _update_last_epoch_stats(self):
        # QUIRK (SPEC.md): no copy; the "last epoch" buffers become the running tensors and
        # follow every later in-place running update.
        self.running_mean_last_epoch = self.running_mean
        self.running_var_last_epoch = self.running_var

        self.smoothed_mean_last_epoch = self._smooth_along_buckets(self.running_mean_last_epoch)
        self.smoothed_var_last_epoch = self._smooth_along_buckets(self.running_var_last_epoch)

    def reset(self):
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.running_mean_last_epoch.zero_()
        self.running_var_last_epoch.fill_(1)
        self.smoothed_mean_last_epoch.zero_()
        self.smoothed_var_last_epoch.fill_(1)
        self.num_samples_tracked.zero_()

    def update_last_epoch_stats(self, epoch):
        if epoch == self.epoch + 1:
            self.epoch += 1
            self._update_last_epoch_stats()

    def _bucket_mask(self, labels, label):
        if label == self.bucket_start:
            return labels <= label
        if label == self.bucket_num - 1:
            return labels >= label
        return labels == label

    def update_running_stats(self, features, labels, epoch):
        if epoch < self.epoch:
            return

        assert self.feature_dim == features.size(1), "Input feature dimension is not aligned!"
        assert features.size(0) == labels.size(0), "Dimensions of features and labels are not aligned!"

        for label in torch.unique(labels):
            if label > self.bucket_num - 1 or label < self.bucket_start:
                continue
            curr_feats = features[self._bucket_mask(labels, label)]
            curr_num_sample = curr_feats.size(0)
            curr_mean = torch.mean(curr_feats, 0)
            curr_var = torch.var(curr_feats, 0, unbiased=True if curr_feats.size(0) != 1 else False)

            k = int(label - self.bucket_start)
            self.num_samples_tracked[k] += curr_num_sample
            factor = self.momentum if self.momentum is not None else \
                (1 - curr_num_sample / float(self.num_samples_tracked[k]))
            factor = 0 if epoch == self.start_update else factor
            self.running_mean[k] = (1 - factor) * curr_mean + factor * self.running_mean[k]
            self.running_var[k] = (1 - factor) * curr_var + factor * self.running_var[k]

    def smooth(self, features, labels, epoch):
        if epoch < self.start_smooth:
            return features

        labels = labels.squeeze(1)
        for label in torch.unique(labels):
            if label > self.bucket_num - 1 or label < self.bucket_start:
                continue
            k = int(label - self.bucket_start)
            # the published code builds the mask twice (once per side of the assignment)
            features[self._bucket_mask(labels, label)] = published_calibrate_mean_var(
                features[self._bucket_mask(labels, label)],
                self.running_mean_last_epoch[k],
                self.running_var_last_epoch[k],
                self.smoothed_mean_last_epoch[k],
                self.smoothed_var_last_epoch[k], *self.clips)
        return features


# ---------------------------------------------------------------------------------------------
# Published-style providers for the op benchmarks: the same per-bucket loops, on bin indices.
# Dense inputs [B, C, *spatial] are handled as the published NYUD2-DIR code does: a permuted
# contiguous copy [N, C], the loop, and a permuted view back.


def _rows(x, bin_idx):
    """[N, D] rows and [N] bin indices; dense inputs are permuted to channels-last (a copy)."""
    if x.dim() == 2:
        return x, bin_idx.reshape(-1)
    perm = (0,) + tuple(range(2, x.dim())) + (1,)
    return x.permute(*perm).contiguous().view(-1, x.shape[1]), bin_idx.reshape(-1)


def published_bin_stats(x, labels, num_bins):
    """Per-bucket (count, mean, var) by a Python loop over the bins present.

    ``labels`` are bin indices (int); values outside [0, num_bins) are ignored.  Variance is
    unbiased, 0 for a bin with one row; bins without rows keep count 0, mean 0, var 0.
    Statistics are float64 for float64 ``x``, float32 otherwise.
    """
    rows, idx = _rows(x, labels)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = rows.shape[1]
    count = torch.zeros(num_bins, dtype=torch.int64, device=x.device)
    mean = torch.zeros(num_bins, d, dtype=stat_dtype, device=x.device)
    var = torch.zeros(num_bins, d, dtype=stat_dtype, device=x.device)
    for label in torch.unique(idx):
        if label < 0 or label >= num_bins:
            continue
        curr_feats = rows[idx == label].to(stat_dtype)
        k = int(label)
        count[k] = curr_feats.size(0)
        mean[k] = torch.mean(curr_feats, 0)
        var[k] = torch.var(curr_feats, 0, unbiased=True if curr_feats.size(0) != 1 else False)
    return count, mean, var


def published_calibrate(x, bin_idx, m1, v1, m2, v2, clip_min=0.1, clip_max=10.0):
    """The published smooth loop on bin indices: a new tensor with the values of ``x`` calibrated
    per bin by ``published_calibrate_mean_var``; rows with a bin outside [0, B) unchanged."""
    rows, idx = _rows(x, bin_idx)
    out = rows.clone() if x.dim() == 2 else rows  # the dense path already made a copy
    num_bins = m1.shape[0]
    for label in torch.unique(idx):
        if label < 0 or label >= num_bins:
            continue
        mask = idx == label
        k = int(label)
        out[mask] = published_calibrate_mean_var(out[mask], m1[k], v1[k], m2[k], v2[k], clip_min, clip_max)
    if x.dim() == 2:
        return out
    spatial = x.shape[2:]
    inv = (0, x.dim() - 1) + tuple(range(1, x.dim() - 1))
    return out.view(x.shape[0], *spatial, x.shape[1]).permute(*inv)
