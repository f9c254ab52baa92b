"""Plain vectorised PyTorch: the "torch" provider of the benchmarks, and under
``torch.compile`` (inductor) its "compiled" provider.

What a PyTorch user writes without a custom kernel: no Python loop over buckets, but several
passes over the features and gathered [N, D] temporaries (``table[bin_idx]``), and a permuted
copy for dense [B, C, *spatial] inputs.  Same semantics as the dirfast ops (their references, dirfast/ops/<op>.py).
"""

import torch

from .published import PublishedFDS

__all__ = ["torch_bin_stats", "torch_bin_stats_moments", "torch_calibrate", "torch_calibrate_", "torch_mixture_logpdf",
           "torch_bins", "torch_integer_bins", "torch_fds_accumulate", "TorchFDS"]


def _rows(x, bin_idx):
    if x.dim() == 2:
        return x, bin_idx.reshape(-1)
    return x.movedim(1, -1).reshape(-1, x.shape[1]), bin_idx.reshape(-1)


def _bins_with_overflow(idx, num_bins):
    """Bin indices with every out-of-range value sent to an extra bin ``num_bins``."""
    idx = idx.long()
    return torch.where((idx >= 0) & (idx < num_bins), idx, torch.full_like(idx, num_bins))


def torch_bins(labels, edges):
    """The bin of each label against increasing ``edges`` as ``np.histogram`` places it (the
    first edge above it, minus 1; the last edge in the last bin), clamped into range, -1 where a
    label is NaN or infinite: ``torch.bucketize``, a binary search per label."""
    bins = (torch.bucketize(labels, edges, right=True) - 1).clamp_(0, edges.numel() - 2)
    return torch.where(torch.isfinite(labels), bins, -1)


def torch_integer_bins(labels, num_bins: int, scale: float = 1.0):
    """``int(label * scale)`` clamped into ``[0, num_bins)``, -1 where a label is NaN or infinite."""
    bins = (labels * scale).clamp(0, num_bins - 1).trunc().nan_to_num(0.0).long()
    return torch.where(torch.isfinite(labels), bins, -1)


def torch_bin_stats(x, bin_idx, num_bins):
    """(count [B], mean [B, D], var [B, D]) by two index_add_ passes (sum, then squared
    deviations from the bin mean: numerically sound)."""
    rows, idx = _rows(x, bin_idx)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = rows.to(acc)
    idx = _bins_with_overflow(idx, num_bins)
    d = rows.shape[1]
    count = torch.zeros(num_bins + 1, dtype=torch.int64, device=x.device)
    count.index_add_(0, idx, torch.ones_like(idx))
    total = torch.zeros(num_bins + 1, d, dtype=acc, device=x.device).index_add_(0, idx, rows)
    mean = total / count.clamp(min=1).unsqueeze(1).to(acc)
    dev = rows - mean[idx]
    m2 = torch.zeros(num_bins + 1, d, dtype=acc, device=x.device).index_add_(0, idx, dev * dev)
    var = torch.where((count > 1).unsqueeze(1), m2 / (count - 1).clamp(min=1).unsqueeze(1).to(acc),
                      torch.zeros((), dtype=acc, device=x.device))
    return count[:num_bins], mean[:num_bins], var[:num_bins]


def torch_bin_stats_moments(x, bin_idx, num_bins):
    """:func:`torch_bin_stats` from per-bin sums of the rows and of their squares: one pass over
    the features, which torch.compile fuses into one loop (its fastest formulation; the variance
    ``(sum x^2 - n mean^2) / (n - 1)`` loses precision where a bin's |mean| >> its spread)."""
    rows, idx = _rows(x, bin_idx)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = rows.to(acc)
    idx = _bins_with_overflow(idx, num_bins)
    d = rows.shape[1]
    count = torch.zeros(num_bins + 1, dtype=torch.int64, device=x.device).index_add_(0, idx, torch.ones_like(idx))
    total = torch.zeros(num_bins + 1, d, dtype=acc, device=x.device).index_add_(0, idx, rows)
    squares = torch.zeros(num_bins + 1, d, dtype=acc, device=x.device).index_add_(0, idx, rows * rows)
    n = count.unsqueeze(1).to(acc)
    mean = total / n.clamp(min=1)
    var = torch.where(n > 1, (squares - n * mean * mean) / (n - 1).clamp(min=1), torch.zeros((), dtype=acc,
                                                                                              device=x.device))
    return count[:num_bins], mean[:num_bins], var[:num_bins]


def torch_fds_accumulate(count, mean, m2, x, labels):
    """``FDS(D, bucket_num=K, bucket_start=0).accumulate(x, labels)`` on float32 rows [N, D] as a
    user writes it: buckets ``int(label)`` clamped into range, the batch's count, sums and squared
    deviations per bucket by ``index_add_`` over all K buckets, and Chan's merge into the running
    tables (``count`` float64 [K], ``mean`` and ``m2`` float32 [K, D]) in place. No rule for
    non-finite values: a NaN feature makes its bucket NaN."""
    num_bins, d = mean.shape
    idx = labels.long().clamp(0, num_bins - 1)
    n_b = torch.zeros(num_bins, dtype=torch.float64, device=x.device).index_add_(
        0, idx, torch.ones(idx.shape[0], dtype=torch.float64, device=x.device))
    total = torch.zeros(num_bins, d, dtype=x.dtype, device=x.device).index_add_(0, idx, x)
    mean_b = total / n_b.clamp(min=1).to(x.dtype).unsqueeze(1)
    dev = x - mean_b[idx]
    m2_b = torch.zeros(num_bins, d, dtype=x.dtype, device=x.device).index_add_(0, idx, dev * dev)
    n = count + n_b
    delta = mean_b - mean
    share = (n_b / n.clamp(min=1)).to(x.dtype).unsqueeze(1)
    cross = (count * n_b / n.clamp(min=1)).to(x.dtype).unsqueeze(1)
    mean.add_(delta * share)
    m2.add_(m2_b + delta * delta * cross)
    count.copy_(n)


def scale_shift(m1, v1, m2, v2, clip_min=0.1, clip_max=10.0):
    """Per-bin scale s and shift t (x' = x * s + t), identity where the published rules leave a
    value unchanged (bin with sum(v1) < 1e-10, dimension with v1 == 0)."""
    s = torch.sqrt(torch.clamp(v2 / v1, clip_min, clip_max))
    t = m2 - m1 * s
    keep = (v1.sum(1, keepdim=True) < 1e-10) | (v1 == 0)
    return torch.where(keep, torch.ones_like(s), s), torch.where(keep, torch.zeros_like(t), t)


def torch_calibrate(x, bin_idx, m1, v1, m2, v2, clip_min=0.1, clip_max=10.0):
    """x * s[bin] + t[bin] with gathered [N, D] tables; rows outside [0, B) unchanged."""
    rows, idx = _rows(x, bin_idx)
    s, t = scale_shift(m1.float(), v1.float(), m2.float(), v2.float(), clip_min, clip_max)
    s = torch.cat([s, torch.ones_like(s[:1])])
    t = torch.cat([t, torch.zeros_like(t[:1])])
    idx = _bins_with_overflow(idx, m1.shape[0])
    out = (rows.float() * s[idx] + t[idx]).to(x.dtype)
    if x.dim() == 2:
        return out
    return out.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)


def torch_calibrate_(x, bin_idx, m1, v1, m2, v2, clip_min=0.1, clip_max=10.0):
    """:func:`torch_calibrate` written into ``x`` (float32 features), which is returned: the
    gathered tables multiplied and added in place (dense: through a channels-last view)."""
    s, t = scale_shift(m1.float(), v1.float(), m2.float(), v2.float(), clip_min, clip_max)
    s = torch.cat([s, torch.ones_like(s[:1])])
    t = torch.cat([t, torch.zeros_like(t[:1])])
    idx = _bins_with_overflow(bin_idx, m1.shape[0])
    rows = x if x.dim() == 2 else x.movedim(1, -1)  # [..., D], a view of x
    rows.mul_(s[idx]).add_(t[idx])
    return x


def torch_mixture_logpdf(x, means, variances, log_weights, chunk=None):
    """``log sum_k w_k N(x; m_k, v_k) + log(2 pi) / 2`` of every element by ``torch.logsumexp``
    over an [elements, K] matrix (``chunk`` elements at a time, or all at once), float32 for
    float32 inputs; an invalid component (mean not finite, variance not positive and finite,
    log-weight NaN or +inf) makes every output NaN, as in dirfast.ops.mixture_logpdf."""
    acc = torch.promote_types(torch.promote_types(x.dtype, means.dtype),
                              torch.promote_types(variances.dtype, log_weights.dtype))
    m, v, lw = means.to(acc), variances.to(acc), log_weights.to(acc)
    root = torch.sqrt(v)
    valid = torch.isfinite(m) & (v > 0) & torch.isfinite(v) & ~torch.isnan(lw) & (lw != torch.inf)
    inv, c = 1.0 / root, torch.where(valid, lw - torch.log(root), torch.nan)
    flat = x.reshape(-1).to(acc)

    def part(xs):
        z = (xs.unsqueeze(1) - m) * inv
        return torch.logsumexp(c - 0.5 * z * z, dim=1)

    out = part(flat) if chunk is None or flat.numel() <= chunk else torch.cat([part(p) for p in flat.split(chunk)])
    return out.reshape(x.shape)


class TorchFDS(PublishedFDS):
    """FDS in plain vectorised PyTorch, with the published semantics (labels clamped into the
    bucket range, the snapshot aliasing, reflect-padded window smoothing), for the epoch
    benchmark: the published module's buffers and epoch snapshot, with the per-bucket loops of
    ``update_running_stats`` and ``smooth`` replaced by scatter/gather over all buckets.
    Features [N, D] with labels [N] / [N, 1], or dense [B, C, *spatial] with labels
    [B, 1, *spatial]."""

    def _buckets(self, labels, like):
        """Bucket of each row of ``like`` (features), as int64 [N] (dense: [B, *spatial])."""
        labels = labels.reshape(like.shape[0], *like.shape[2:]) if like.dim() > 2 else labels.reshape(-1)
        b = labels.long().clamp(self.bucket_start, self.bucket_num - 1)
        return b - self.bucket_start

    def update_running_stats(self, features, labels, epoch):
        if epoch < self.epoch:
            return
        k = self.bucket_num - self.bucket_start
        count, mean, var = torch_bin_stats(features, self._buckets(labels, features), k)
        present = count > 0
        self.num_samples_tracked += count.to(self.num_samples_tracked.dtype)
        if epoch == self.start_update:
            factor = torch.zeros_like(self.num_samples_tracked)
        elif self.momentum is not None:
            factor = torch.full_like(self.num_samples_tracked, self.momentum)
        else:
            factor = 1 - count.to(self.num_samples_tracked.dtype) / self.num_samples_tracked.clamp(min=1)
        factor = factor.unsqueeze(1)
        new_mean = (1 - factor) * mean + factor * self.running_mean
        new_var = (1 - factor) * var + factor * self.running_var
        self.running_mean.copy_(torch.where(present.unsqueeze(1), new_mean, self.running_mean))
        self.running_var.copy_(torch.where(present.unsqueeze(1), new_var, self.running_var))

    def smooth(self, features, labels, epoch):
        if epoch < self.start_smooth:
            return features
        out = torch_calibrate(features, self._buckets(labels, features), self.running_mean_last_epoch,
                              self.running_var_last_epoch, self.smoothed_mean_last_epoch,
                              self.smoothed_var_last_epoch)
        return features.copy_(out)  # in place, like the published smooth
