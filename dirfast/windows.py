"""Kernel windows of LDS and FDS, exactly as the published code builds them.

The published code uses ``scipy.ndimage.gaussian_filter1d`` and ``scipy.signal.windows.triang``;
both are reproduced here in NumPy (same formulas, same order of operations) so that scipy is
not a runtime dependency. The tests check them against scipy.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _validate as validate

__all__ = ["KERNELS", "get_lds_kernel_window", "kernel_window"]

KERNELS = ("gaussian", "triang", "laplace")

MAX_KS = 1 << 20
MAX_SIGMA = 1e6  # a Gaussian of radius 4e6 taps (scipy's truncate=4): 64 MB of weights


def _check(kernel, ks, sigma) -> None:
    validate.choice("kernel", kernel, KERNELS)
    if validate.integer("ks", ks, 1, MAX_KS) % 2 == 0:
        raise ValueError(f"ks must be odd, got {ks!r}")
    validate.real("sigma", sigma, 0.0, MAX_SIGMA, above=True)  # triang ignores it, as published, but a bad one is a bug


def _gaussian_filter1d_of_delta(ks: int, sigma: float, dtype) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d(delta, sigma)`` for a centred delta of length ``ks``.

    scipy's defaults: radius ``int(4 * sigma + 0.5)``, weights ``exp(-0.5 / sigma**2 * x**2)``
    normalised to sum 1, and mode "reflect" (the edge repeated: d c b a | a b c d | d c b a), so
    a radius wider than the window folds the tails back in: the reflected delta is 1 exactly at
    the taps congruent to the centre modulo ``ks``. scipy sums a symmetric filter centre first,
    then the mirrored pairs from the outside in, each pair added before it is weighted; that
    order is kept, so the bits are scipy's. The output has the input's dtype.
    """
    half = (ks - 1) // 2
    sigma = float(sigma)
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:  # a filter of one tap: the delta itself (scipy divides 0 by 0 when sigma**2 underflows)
        phi = np.ones(1)
    else:
        taps = np.arange(-radius, radius + 1)
        phi = np.exp(-0.5 / (sigma * sigma) * taps ** 2)
        phi = phi / phi.sum()
    # Every tap j = radius..1 (the order scipy adds them) meets the delta at two outputs,
    # (half + j) % ks and (half - j) % ks, the same one (the centre, weight doubled) when j is a
    # multiple of ks. np.add.at adds in index order, so each output sums its taps in scipy's
    # order: O(ks + radius), where a [ks, radius] table is far too slow for wide filters
    # (benchmarks/results/cpu/design-constants.md).
    j = np.arange(radius, 0, -1)
    weight = phi[radius - j]
    left, right = (half + j) % ks, (half - j) % ks
    same = left == right
    outputs = np.stack([left, right], 1).reshape(-1)
    terms = np.stack([np.where(same, 2.0 * weight, weight), weight], 1).reshape(-1)
    keep = np.stack([np.ones_like(same), ~same], 1).reshape(-1)
    out = np.zeros(ks, dtype=np.float64)
    out[half] = phi[radius]
    np.add.at(out, outputs[keep], terms[keep])
    return out.astype(dtype)


def _triang(ks: int) -> np.ndarray:
    """``scipy.signal.windows.triang(ks)`` for odd ``ks``."""
    n = np.arange(1, (ks + 1) // 2 + 1)
    w = 2 * n / (ks + 1.0)
    return np.r_[w, w[-2::-1]]


def _laplace(ks: int, sigma: float) -> np.ndarray:
    """``exp(-|k| / sigma) / (2 sigma)`` for ``k = -h..h``, as published; for a sigma so small
    that ``1 / (2 sigma)`` overflows, the same shape without the constant (normalised away)."""
    half = (ks - 1) // 2
    k = np.abs(np.arange(-half, half + 1))
    with np.errstate(over="ignore"):
        window = np.exp(-k / sigma) / (2.0 * sigma)
        return window if np.all(np.isfinite(window)) else np.exp(-k / sigma)


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
    validate.choice("normalize", normalize, ("max", "sum"))
    _check(kernel, ks, sigma)
    window = get_lds_kernel_window(kernel, ks, sigma) if normalize == "max" else _fds_window(kernel, ks, sigma)
    return torch.as_tensor(np.asarray(window, dtype=np.float64))
