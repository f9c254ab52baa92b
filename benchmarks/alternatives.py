"""The strongest alternatives a user has without dirfast, and the yardsticks that bound them, for
:mod:`benchmarks.cases`:

* ``compiled(op)`` -- ``torch.compile(dynamic=False)`` (inductor) of a vectorised formulation
  of :mod:`benchmarks.vectorised` (:data:`FORMULATIONS`, and ``TorchFDS.smooth``);
* ``fftkde_weights`` -- KDEpy's ``FFTKDE`` used as a user would for DenseWeight: Silverman's
  bandwidth, ``FFTKDE(kernel="gaussian", bw).fit(labels).evaluate(4096)``, p' scaled to [0, 1],
  ``np.interp`` at the labels and the DenseWeight formula (KDEpy is GPL: it is only run here);
  ``fftkde_gap`` checks its density against dirfast's on dirfast's grid;
* ``denseweight_weights`` -- the published denseweight package (``DenseWeight(alpha).fit``);
* ``ExpLimit`` -- float32 ``torch.exp`` on one thread, the bound of a mixture log-density.

Each optional package is imported when used; a missing one raises :class:`Missing`.
"""

from __future__ import annotations

import numpy as np
import torch

from .vectorised import torch_bin_stats_moments, torch_calibrate, torch_calibrate_, torch_mixture_logpdf

# The formulation compiled for each op: the fastest under inductor (bin_stats: one pass of sums
# and sums of squares, faster compiled than torch_bin_stats's two passes).
FORMULATIONS = {"bin_stats": torch_bin_stats_moments, "calibrate": torch_calibrate, "calibrate_": torch_calibrate_,
                "mixture_logpdf": torch_mixture_logpdf}
GRID_POINTS = 4096  # dirfast's and the denseweight package's default grid
DENSITY_TOLERANCE = 5e-4  # p' of FFTKDE against dirfast's: kernels cut at different widths (tests/test_density.py)


class Missing(Exception):
    """An optional package is not installed (the message names it)."""


def compiled(op):
    """The vectorised formulation of ``op`` (its name in FORMULATIONS, or the function itself:
    FDS.smooth's is the method of a ``TorchFDS``) under ``torch.compile(dynamic=False)``.
    Dynamo's caches are emptied first: the recompile limit counts every shape a function was
    compiled for, and each case compiles its own."""
    torch._dynamo.reset()
    return torch.compile(FORMULATIONS[op] if isinstance(op, str) else op, dynamic=False)


def kdepy():
    """The KDEpy module, or :class:`Missing`."""
    try:
        import KDEpy
    except ImportError:
        raise Missing("KDEpy is not installed (pip install KDEpy)") from None
    return KDEpy


def denseweight():
    """The denseweight package's ``DenseWeight`` class, or :class:`Missing`."""
    try:
        from denseweight import DenseWeight
    except ImportError:
        raise Missing("the denseweight package is not installed (pip install denseweight)") from None
    return DenseWeight


def silverman(labels: np.ndarray) -> float:
    """``1.06 * std * n^(-1/5)``: the default bandwidth of dirfast and the denseweight package."""
    return 1.06 * float(np.std(labels)) * labels.size ** -0.2


def fftkde_weights(labels: np.ndarray, alpha: float = 1.0, eps: float = 1e-6) -> np.ndarray:
    """DenseWeight weights of ``labels`` (float64) through KDEpy's FFTKDE, as a user writes them."""
    grid, density = kdepy().FFTKDE(kernel="gaussian", bw=silverman(labels)).fit(labels).evaluate(GRID_POINTS)
    scaled = (density - density.min()) / (density.max() - density.min())
    floor = np.maximum(1 - alpha * np.interp(labels, grid, scaled), eps)
    return floor / floor.mean()


def fftkde_gap(labels: np.ndarray, fitted) -> float:
    """Largest difference of FFTKDE's p' from that of ``fitted`` (a dirfast DenseWeight fitted on
    ``labels``), both on dirfast's grid with dirfast's bandwidth."""
    fit = fitted.state_dict()
    grid = fit["low"] + fit["step"] * np.arange(fitted.grid_size)
    density = kdepy().FFTKDE(kernel="gaussian", bw=fitted.fitted_bandwidth).fit(labels).evaluate(grid)
    scaled = (density - density.min()) / (density.max() - density.min())
    return float(np.abs(scaled - fit["density"].numpy()).max())


def denseweight_weights(labels: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """The denseweight package's weights of ``labels`` (its defaults: Silverman, 4096 points)."""
    return denseweight()(alpha=alpha).fit(labels)


class ExpLimit:
    """The time float32 ``torch.exp`` takes over ``elements`` values on one thread, divided by
    the threads the benchmark runs on: what a mixture log-density of that many terms needs at
    least. Measured on a block of ``CHUNK`` values that stays in cache (a fused kernel never
    writes its terms), ``REPEATS`` times per call; :attr:`factor` scales a call's time to
    ``elements``."""

    CHUNK, REPEATS = 1 << 16, 16

    def __init__(self, elements: int, device: str = "cpu") -> None:
        self.src = torch.linspace(-30.0, 0.0, self.CHUNK, device=device)
        self.out = torch.empty_like(self.src)
        self.threads = torch.get_num_threads()
        self.factor = elements / (self.CHUNK * self.REPEATS) / self.threads

    def __call__(self):
        torch.set_num_threads(1)
        try:
            for _ in range(self.REPEATS):
                torch.exp(self.src, out=self.out)
        finally:
            torch.set_num_threads(self.threads)
        return self.out
