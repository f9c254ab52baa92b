"""``dirfast::smooth_bins``: convolution of per-bin statistics with a window along the bins."""

from __future__ import annotations

import torch

from ..contract import PADDINGS
from . import _checks, _dispatch

OP = "smooth_bins"


def smooth_bins(stats: torch.Tensor, window: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
    """Smooth ``stats`` (``[B]`` or ``[B, D]``) along the bin axis with ``window``.

    ``out[b] = sum_k window[k] * stats[b + k - h]`` with ``h = (len(window) - 1) // 2``.
    ``padding`` says what lies beyond the bins: ``"reflect"`` mirrors without repeating the edge
    bin, as ``torch.nn.functional.pad`` (FDS), and keeps mirroring when the window is wider
    than the bins; ``"constant"`` is zero, as ``scipy.ndimage.convolve1d(mode="constant")``
    (LDS); ``"symmetric"`` mirrors repeating the edge bin, as scipy.ndimage's ``"reflect"``
    (the NYUD2-DIR LDS); ``"replicate"`` repeats the edge bin. The result has the dtype of
    ``stats``.
    """
    _checks.floating("stats", stats)
    _checks.floating("window", window)
    if stats.dim() not in (1, 2) or stats.shape[0] == 0:
        raise ValueError(f"stats must be [B] or [B, D] with B >= 1, got shape {tuple(stats.shape)}")
    if window.dim() != 1 or window.shape[0] % 2 == 0:
        raise ValueError(f"window must be 1-D with an odd length, got shape {tuple(window.shape)}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return _dispatch.kernel(OP, stats.device)(stats, window.to(stats.device), padding)
