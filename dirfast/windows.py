"""Kernel windows of LDS and FDS, exactly as the published code builds them.

The published code uses ``scipy.ndimage.gaussian_filter1d`` and ``scipy.signal.windows.triang``;
both are reproduced here in NumPy (same formulas, same order of operations) so that scipy is
not a runtime dependency. The tests check them against scipy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["KERNELS", "get_lds_kernel_window", "kernel_window"]

KERNELS = ("gaussian", "triang", "laplace")


def _check(kernel, ks, sigma) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(ks, bool) or not isinstance(ks, (int, np.integer)) or ks < 1 or ks % 2 == 0:
        raise ValueError(f"ks must be a positive odd int, got {ks!r}")
    if kernel != "triang" and not (isinstance(sigma, (int, float, np.number)) and sigma > 0
                                   and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")


def _gaussian_filter1d_of_delta(ks: int, sigma: float, dtype) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d(delta, sigma)`` for a centred delta of length ``ks``.

    scipy's defaults: radius ``int(4 * sigma + 0.5)``, weights ``exp(-x**2 / (2 sigma**2))``
    normalised to sum 1, and mode "reflect" (the edge repeated: d c b a | a b c d | d c b a),
    so a radius wider than the window folds the tails back in. The output has the input's dtype.
    """
    half = (ks - 1) // 2
    radius = int(4.0 * float(sigma) + 0.5)
    taps = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * taps ** 2)
    phi = phi / phi.sum()

    def reflected(j: int) -> float:  # the delta, extended by repeated half-sample reflection
        j %= 2 * ks
        return 1.0 if min(j, 2 * ks - 1 - j) == half else 0.0

    # scipy's correlate1d for a symmetric filter: centre tap first, then the mirrored pairs
    # from the outside in, each pair summed before it is weighted (the same bits as scipy).
    out = np.zeros(ks, dtype=np.float64)
    for i in range(ks):
        acc = reflected(i) * phi[radius]
        for j in range(radius, 0, -1):
            acc += (reflected(i - j) + reflected(i + j)) * phi[radius - j]
        out[i] = acc
    return out.astype(dtype)


def _triang(ks: int) -> np.ndarray:
    """``scipy.signal.windows.triang(ks)`` for odd ``ks``."""
    n = np.arange(1, (ks + 1) // 2 + 1)
    w = 2 * n / (ks + 1.0)
    return np.r_[w, w[-2::-1]]


def _laplace(ks: int, sigma: float) -> np.ndarray:
    half = (ks - 1) // 2
    return np.array([np.exp(-abs(k) / sigma) / (2.0 * sigma) for k in np.arange(-half, half + 1)])


def get_lds_kernel_window(kernel: str, ks: int, sigma: float) -> np.ndarray:
    """The LDS window of the published code: a NumPy array whose peak is 1.

    ``gaussian`` is ``gaussian_filter1d`` of a delta divided by its maximum (with ks=5, sigma=2
    the tails fold back: 0.858, 0.946, 1, 0.946, 0.858); ``triang`` is ``triang(ks)``;
    ``laplace`` is ``exp(-|k| / sigma) / (2 sigma)`` divided by its maximum.
    """
    _check(kernel, ks, sigma)
    if kernel == "gaussian":
        window = _gaussian_filter1d_of_delta(ks, sigma, np.float64)
        return window / max(window)
    if kernel == "triang":
        return _triang(ks)
    window = _laplace(ks, sigma)
    return window / max(window)


def _fds_window(kernel: str, ks: int, sigma: float) -> np.ndarray:
    """The published FDS window (sum 1), computed as ``FDS._get_kernel_window`` does."""
    if kernel == "gaussian":  # the published FDS filters a float32 delta
        window = _gaussian_filter1d_of_delta(ks, sigma, np.float32)
        return window / sum(window)
    if kernel == "triang":
        return _triang(ks) / sum(_triang(ks))
    window = _laplace(ks, sigma)
    return window / sum(window)


def kernel_window(kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                  normalize: str = "max") -> torch.Tensor:
    """A kernel window as a float64 tensor.

    ``normalize="max"`` gives the LDS window (:func:`get_lds_kernel_window`); ``"sum"`` gives
    the FDS window, normalised to sum 1 as the published FDS module does.

    Raises ValueError for an unknown kernel, an even or non-positive ``ks``, a non-positive
    ``sigma``, or an unknown ``normalize``.
    """
    if normalize not in ("max", "sum"):
        raise ValueError(f"normalize must be 'max' or 'sum', got {normalize!r}")
    _check(kernel, ks, sigma)
    window = get_lds_kernel_window(kernel, ks, sigma) if normalize == "max" else _fds_window(kernel, ks, sigma)
    return torch.as_tensor(np.asarray(window, dtype=np.float64))
