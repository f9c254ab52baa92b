"""The float64 loop oracles of the ops: bin_stats, smooth_bins, calibrate and mixture_logpdf,
deliberately plain (Python loops, float64), the definition of correctness for the op tests.
Nothing here imports dirfast. The published code (windows, PublishedFDS, binning, LDS, losses,
metrics) is transcribed once, in ``benchmarks/published.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# calibrate_mean_var is the published one; test_fds and test_ops reach the other three as oracle.X
from benchmarks.published import fds_window, fill_empty, lds_window, published_calibrate_mean_var  # noqa: F401


def _rows(x: torch.Tensor, bin_idx: torch.Tensor):
    """``[N, D]`` rows and ``[N]`` indices; dense ``[B, C, *S]`` becomes ``[B * prod(S), C]``."""
    if x.dim() == 2:
        return x, bin_idx.reshape(-1)
    return x.movedim(1, -1).reshape(-1, x.shape[1]), bin_idx.reshape(-1)


def bin_stats(x: torch.Tensor, bin_idx: torch.Tensor, num_bins: int):
    """Per-bin count, mean and unbiased variance (0 if count <= 1), in float64, bin by bin.
    Rows whose index is outside [0, num_bins) belong to no bin."""
    rows, idx = _rows(x.detach().cpu().double(), bin_idx.detach().cpu().long())
    d = rows.shape[1]
    count = torch.zeros(num_bins, dtype=torch.int64)
    mean = torch.zeros(num_bins, d, dtype=torch.float64)
    var = torch.zeros(num_bins, d, dtype=torch.float64)
    for b in range(num_bins):
        members = rows[idx == b]
        n = members.shape[0]
        count[b] = n
        if n >= 1:
            mean[b] = members.sum(0) / n
        if n >= 2:
            var[b] = ((members - mean[b]) ** 2).sum(0) / (n - 1)
    return count, mean, var


def reflect_index(j: int, num_bins: int) -> int:
    """torch F.pad ``reflect`` (edge not repeated), applied again and again if needed."""
    if num_bins == 1:
        return 0
    while j < 0 or j >= num_bins:
        if j < 0:
            j = -j
        if j >= num_bins:
            j = 2 * (num_bins - 1) - j
    return j


def _window_values(window) -> list:
    if isinstance(window, torch.Tensor):
        return window.detach().cpu().double().tolist()
    return [float(v) for v in np.asarray(window, dtype=np.float64)]


def smooth_bins(stats: torch.Tensor, window, padding: str = "reflect") -> torch.Tensor:
    """``out[b] = sum_k window[k] * stats[b + k - h]`` with the four paddings, in float64."""
    s = stats.detach().cpu().double()
    w = _window_values(window)
    squeeze = s.dim() == 1
    if squeeze:
        s = s.unsqueeze(1)
    num_bins, ks = s.shape[0], len(w)
    h = (ks - 1) // 2
    out = torch.zeros_like(s)
    for b in range(num_bins):
        for k in range(ks):
            j = b + k - h
            if 0 <= j < num_bins:
                src = j
            elif padding == "constant":
                continue
            elif padding == "replicate":
                src = min(max(j, 0), num_bins - 1)
            elif padding == "reflect":
                src = reflect_index(j, num_bins)
            elif padding == "symmetric":  # scipy.ndimage "reflect": d c b a | a b c d | d c b a
                src = j % (2 * num_bins)
                src = src if src < num_bins else 2 * num_bins - 1 - src
            else:
                raise ValueError(padding)
            out[b] += w[k] * s[src]
    return out.squeeze(1) if squeeze else out


def fds_smooth_conv1d(stats: torch.Tensor, window) -> torch.Tensor:
    """The published smoothing of ``[K, D]`` running stats: F.pad reflect + conv1d (needs
    h < K, like the published code)."""
    w = torch.tensor(_window_values(window), dtype=torch.float64)
    h = (w.numel() - 1) // 2
    s = stats.detach().cpu().double()
    return F.conv1d(F.pad(s.unsqueeze(1).permute(2, 1, 0), pad=(h, h), mode="reflect"),
                    weight=w.view(1, 1, -1), padding=0).permute(2, 1, 0).squeeze(1)


def calibrate_mean_var(matrix, m1, v1, m2, v2, clip_min=0.1, clip_max=10):
    """The published ``calibrate_mean_var`` (on a copy, so the caller's tensor is untouched)."""
    return published_calibrate_mean_var(matrix.clone(), m1, v1, m2, v2, clip_min, clip_max)


def calibrate(x, bin_idx, m1, v1, m2, v2, clip_min=0.1, clip_max=10.0) -> torch.Tensor:
    """Bin by bin in float64, as the published smooth loop: the rows of bin ``b`` go through
    calibrate_mean_var with that bin's statistics; rows outside [0, B) stay unchanged.
    Returns float64 in x's layout."""
    xd = x.detach().cpu().double()
    m1, v1, m2, v2 = (t.detach().cpu().double() for t in (m1, v1, m2, v2))
    num_bins = m1.shape[0]
    rows, idx = _rows(xd, bin_idx.detach().cpu().long())
    out = rows.clone()
    for b in range(num_bins):
        members = idx == b
        if members.any():
            out[members] = calibrate_mean_var(rows[members], m1[b], v1[b], m2[b], v2[b], clip_min, clip_max)
    if x.dim() == 2:
        return out
    shape = (x.shape[0],) + tuple(x.shape[2:]) + (x.shape[1],)
    return out.reshape(shape).movedim(-1, 1)


def calibrate_scale(bin_idx, v1, v2, d, clip_min=0.1, clip_max=10.0) -> torch.Tensor:
    """d(calibrate)/dx per row and dim: sqrt(clamp(v2/v1)) where calibrated, 1 where unchanged."""
    v1, v2 = v1.detach().cpu().double(), v2.detach().cpu().double()
    idx = bin_idx.reshape(-1).cpu().long()
    out = torch.ones(idx.numel(), d, dtype=torch.float64)
    for i in range(idx.numel()):
        b = int(idx[i])
        if b < 0 or b >= v1.shape[0] or v1[b].sum() < 1e-10:
            continue
        for j in range(d):
            if v1[b, j] != 0:
                out[i, j] = math.sqrt(min(max(float(v2[b, j] / v1[b, j]), clip_min), clip_max))
    return out



def mixture_logpdf(x, means, variances, log_weights):
    """``log sum_k exp(lw_k) exp(-(x - m_k)^2 / (2 v_k)) / sqrt(v_k)`` and its gradients in x, m,
    v and lw, element by element in Python floats (max-shifted), as float64 tensors."""
    xs, ms, vs, lws = (t.detach().double().cpu().reshape(-1).tolist() for t in (x, means, variances, log_weights))
    out, gx = [], []
    gm, gv, gw = [0.0] * len(ms), [0.0] * len(ms), [0.0] * len(ms)
    for xi in xs:
        terms = [lw - 0.5 * math.log(v) - (xi - m) ** 2 / (2 * v) for m, v, lw in zip(ms, vs, lws)]
        top = max(terms)
        if top == -math.inf:
            out.append(-math.inf)
            gx.append(0.0)
            continue
        value = top + math.log(math.fsum(math.exp(t - top) for t in terms))
        out.append(value)
        g = 0.0
        for k, (m, v, t) in enumerate(zip(ms, vs, terms)):
            r = math.exp(t - value)
            d = (xi - m) / v
            g -= r * d
            gm[k] += r * d
            gv[k] += r * (0.5 * d * d - 0.5 / v)
            gw[k] += r
        gx.append(g)
    as_t = lambda values, like: torch.tensor(values, dtype=torch.float64).reshape(like.shape)  # noqa: E731
    return as_t(out, x), (as_t(gx, x), as_t(gm, means), as_t(gv, variances), as_t(gw, log_weights))
