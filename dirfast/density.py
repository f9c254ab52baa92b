"""DenseWeight: loss weights that fall with the density of the labels (Steininger et al., 2021).

The density ``p`` of the training labels is a Gaussian kernel density estimate on a fine uniform
grid: the labels are split between their two nearest grid points (linear binning, two
``bincount``), then convolved with a Gaussian window, through an FFT when the window is long and
by :func:`dirfast.ops.smooth_bins` when it is short. ``p`` is scaled to ``[0, 1]`` and a
label's weight is ``max(1 - alpha * p'(y), eps)``, divided by the mean over the training labels.
"""

from __future__ import annotations

import math
from typing import cast, overload

import numpy as np
import torch

from . import _validate as validate
from . import ops
from ._estimator import FittedEstimator
from ._types import ArrayLike, NotTensor
from .bandwidth import BANDWIDTH_RULES, rule_width_unchecked

__all__ = ["DenseWeight", "density_weights", "BANDWIDTH_RULES"]

MIN_GRID, MAX_GRID = 16, 1 << 16
GRID_PAD = 5.0  # the grid extends this many bandwidths past the labels: beyond the window's 4-sigma reach
MIN_STEPS_PER_BANDWIDTH = 2.0  # below this the grid cannot follow the kernel: warn


def _bandwidth(value):
    """``"silverman"``, ``"scott"`` or a positive finite real number."""
    if isinstance(value, str):
        return validate.choice("bandwidth", value, BANDWIDTH_RULES)
    if isinstance(value, bool) or not isinstance(value, validate.REAL_TYPES):
        raise TypeError(f"bandwidth must be one of {BANDWIDTH_RULES} or a real number, got {type(value).__name__}")
    return validate.positive("bandwidth", value)


def _gaussian_window(sigma: float, device) -> torch.Tensor:
    """scipy's ``gaussian_filter1d`` kernel in float64: ``exp(-k^2 / (2 sigma^2))`` for ``|k|`` up
    to ``int(4 sigma + 0.5)``, summing to 1. (``kernel_window`` gives these taps too, but in
    float32 and in time quadratic in the window's length.) Built in NumPy: torch's ``exp``
    starts threads even for a few hundred taps."""
    radius = int(4.0 * sigma + 0.5)
    window = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float64) / sigma) ** 2)
    return torch.from_numpy(window / window.sum()).to(device)


def _grid_position(labels: torch.Tensor, low: float, step: float) -> torch.Tensor:
    """Where ``labels`` lie on the grid ``low + k * step``, in steps: a new tensor, which callers
    overwrite."""
    return labels.sub(low).div_(step)


def _split(position: torch.Tensor, grid_size: int):
    """Grid positions of labels (float64, overwritten) as their cells (int64, the point at or
    below each, at most ``grid_size - 2``) and their shares of the point above (``position -
    cell``, float64). Truncation is the floor at ``position >= 0`` and clamped to 0 as it below."""
    cell = position.long().clamp_(0, grid_size - 2)
    return cell, position.sub_(cell)


def _interpolate(table: torch.Tensor, low: float, step: float, labels: torch.Tensor) -> torch.Tensor:
    """The values ``table[0]`` at ``low + k * step`` (``table[1]``: the step to the next one)
    interpolated linearly at ``labels`` (float64, any shape): 0 outside the grid, NaN at a NaN or
    infinite label. Reads nothing on the host."""
    last = table.shape[1] - 1
    position = _grid_position(labels, low, step)
    inside = (position >= 0) & (position <= last)
    index, fraction = _split(position.nan_to_num_(0.0).clamp_(0, last), last + 1)
    index, fraction = index.reshape(-1), fraction.reshape(-1)  # index_select: indexing and take start threads
    value = torch.addcmul(table[0].index_select(0, index), table[1].index_select(0, index), fraction)
    value = torch.where(inside, value.view(labels.shape), 0.0)
    return value.add_(labels - labels)  # + NaN at a NaN or infinite label, + 0 elsewhere (isfinite is 4 ops)


def _linear_binning(values: torch.Tensor, low: float, step: float, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell, the labels in it and the sum of their shares of the point above (float64,
    ``grid_size - 1`` each), a chunk of labels at a time (see :func:`~dirfast._validate.chunks`):
    nothing label-sized is kept."""
    counts, rights = [], []
    for part in validate.chunks(values):
        cell, share = _split(_grid_position(part, low, step), grid_size)
        counts.append(torch.bincount(cell, minlength=grid_size - 1))
        rights.append(torch.bincount(cell, weights=share, minlength=grid_size - 1))
    # sums of tensors (values are not empty: there is at least one chunk)
    return cast(torch.Tensor, sum(counts)).to(torch.float64), cast(torch.Tensor, sum(rights))


def _kde(count: torch.Tensor, right: torch.Tensor, sigma: float) -> torch.Tensor:
    """The unnormalised Gaussian KDE at the grid points of the labels binned by
    :func:`_linear_binning` (float64, on their device)."""
    mass = torch.zeros(count.shape[0] + 1, dtype=torch.float64, device=count.device)
    mass[:-1] = count - right
    mass[1:] += right
    return _convolve(mass, _gaussian_window(sigma, mass.device))


def _mean_floor(base: torch.Tensor, eps: float, values, low: float, step: float, count, right) -> float:
    """The mean over ``values`` binned by :func:`_linear_binning` (``count``, ``right``) of ``max(b(y),
    eps)``, ``b`` interpolated linearly between its values ``base`` at the grid points. Where
    ``b`` stays on one side of ``eps`` over a cell, the cell's sum follows from its count and
    shares. Where it crosses ``eps`` (a few cells, as a rule), the labels within a cell of the
    first and the last such cell are binned again, a chunk at a time, and add ``max(b - eps, 0)``,
    set to 0 in every other cell."""
    below, above = base[:-1], base[1:]
    over_below, over_above = below >= eps, above >= eps
    total = torch.where(over_below & over_above, (count - right) * below + right * above, eps * count).sum()
    crossing = over_below ^ over_above
    cells = crossing.nonzero().flatten()
    if cells.numel():
        start, rise = torch.where(crossing, below - eps, -1.0), torch.where(crossing, above - below, 0.0)
        first, last = int(cells[0]) - 1, int(cells[-1]) + 2
        for part in validate.chunks(values):
            position = _grid_position(part, low, step)
            near = (position >= first) & (position < last)
            if bool(near.any()):  # (a chunk without such labels adds nothing)
                cell, share = _split(position[near], base.shape[0])
                total = total + torch.addcmul(start.index_select(0, cell), rise.index_select(0, cell),
                                              share).clamp_(min=0).sum()
    return float(total) / values.numel()


FFT_MIN_TAPS = 64  # from this window length on, an FFT convolves a grid faster than smooth_bins


def _convolve(mass: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``mass`` (zero beyond the grid) convolved with the symmetric ``window``, output on the
    grid: ``smooth_bins(..., padding="constant")``, through an FFT when the window is long."""
    if window.shape[0] < FFT_MIN_TAPS:
        return ops.smooth_bins(mass, window, padding="constant")
    return _fft_convolve(mass, window)


def _fft_convolve(mass: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The convolution of :func:`_convolve` as a circular one of a power-of-two length: long
    enough that no mass wraps around onto the grid within the window's reach (the labels' zero
    margins count towards it, so a default grid of 4096 points needs no padding)."""
    size, radius = mass.shape[0], (window.shape[0] - 1) // 2
    occupied = torch.nonzero(mass).flatten()
    first, last = (int(v) for v in torch.aminmax(occupied)) if occupied.numel() else (0, 0)
    length = 1 << (max(size, last + radius + 1, size - first + radius) - 1).bit_length()
    taps = torch.zeros(length, dtype=window.dtype, device=window.device)
    taps[:radius + 1] = window[radius:]  # tap k sits at k mod length
    taps[length - radius:] = window[:radius]
    out = torch.fft.irfft(torch.fft.rfft(mass, length) * torch.fft.rfft(taps), length)
    return out[:size]


class DenseWeight(FittedEstimator):
    """DenseWeight (Steininger et al., Machine Learning 2021), fitted on the training labels.

    Args:
        alpha: how strongly dense labels are down-weighted (0: every weight 1).
        eps: the floor of ``1 - alpha * p'`` (in ``(0, 1]``), so that no weight is 0; at least
            1.18e-38 (float32's smallest normal number), as the weights, up to ``1 / eps``, are
            float32.
        bandwidth: ``"silverman"`` (``1.06 * std * n^(-1/5)``, the denseweight package's default),
            ``"scott"`` (``std * n^(-1/5)``, scipy's) or a positive number in label units.
        grid_size: points of the density grid, which spans the labels plus 5 bandwidths each side.

    ``p'`` is the kernel density scaled to ``[0, 1]`` by its minimum and maximum over the grid,
    as the denseweight package does (the grid minimum is 0: the grid reaches past the 4-sigma
    window); between grid points it is interpolated linearly. Weights are float32 and average 1
    over the fitted labels. The density is of one dimension: every element of the labels is a
    label (a depth map's pixels), so ``[N, d]`` targets would be pooled into one density; for
    those, use :class:`~dirfast.LDS` over a :class:`~dirfast.GridBinning`. Fitting reads the
    labels on the host; :meth:`weights` does not. Under ``torch.distributed`` a fit is of the
    labels given only (unlike LDS, which sums the ranks' counts): pass the whole training set's
    labels on every rank.

    Example::

        dense = DenseWeight(alpha=1.0).fit(train_ages)
        loss = weighted_mse_loss(pred, target, dense.weights(target))
    """

    def __init__(self, alpha: float = 1.0, eps: float = 1e-6, bandwidth: str | float = "silverman", *,
                 grid_size: int = 4096) -> None:
        alpha, eps = validate.real("alpha", alpha, 0.0), validate.real("eps", eps, 0.0, 1.0, above=True)
        # the weights' scale is at most 1 / eps: beyond float32 a weight would be inf
        validate.in_dtype("eps", eps, torch.float32, reciprocal=True)
        bandwidth = _bandwidth(bandwidth)
        grid_size = validate.integer("grid_size", grid_size, MIN_GRID, MAX_GRID)
        super().__init__()  # the fit: dict(low, step, density, scale, fitted_bandwidth)
        self.alpha, self.eps, self.bandwidth, self.grid_size = alpha, eps, bandwidth, grid_size

    # -- fitting -------------------------------------------------------------------------------
    def _fit_labels(self, labels) -> dict:
        """The density of ``labels``; ValueError for no, NaN or infinite labels, or when a rule
        gives bandwidth 0 (all labels equal)."""
        values, smallest, largest = validate.finite_values_and_span("labels", labels)
        if isinstance(self.bandwidth, str):
            bandwidth = float(rule_width_unchecked(values, self.bandwidth))
            if not bandwidth > 0:
                raise ValueError(f"labels are all equal, so the {self.bandwidth!r} bandwidth is 0: "
                                 "pass a positive bandwidth")
        else:
            bandwidth = self.bandwidth
        low = smallest - GRID_PAD * bandwidth
        step = (largest + GRID_PAD * bandwidth - low) / (self.grid_size - 1)
        sigma = bandwidth / step  # in grid steps
        if not (math.isfinite(bandwidth) and math.isfinite(low) and math.isfinite(step) and step > 0
                and math.isfinite(sigma)):
            raise ValueError(f"labels span [{smallest:g}, {largest:g}]: with bandwidth "
                             f"{bandwidth:g} the density grid overflows float64; rescale the labels")
        if sigma < MIN_STEPS_PER_BANDWIDTH:
            validate.warn(f"the bandwidth {bandwidth:g} spans only {sigma:.2g} grid steps of {step:g}: the density "
                          "is coarse; raise grid_size or the bandwidth")
        binned = _linear_binning(values, low, step, self.grid_size)
        density = _kde(*binned, sigma)
        bottom, top = torch.aminmax(density)
        density = (density - bottom) / (top - bottom).clamp(min=torch.finfo(torch.float64).tiny)
        scale = 1.0 / _mean_floor(1 - self.alpha * density, self.eps, values, low, step, *binned)
        return dict(low=low, step=step, density=density.cpu(), scale=scale, fitted_bandwidth=bandwidth)

    # -- weights -------------------------------------------------------------------------------
    def _table(self) -> torch.Tensor:
        """p' at the grid points and its step to the next point (0 after the last): [2, grid_size]."""
        density = self._fit["density"]
        return torch.stack([density, torch.cat([density[1:] - density[:-1], density.new_zeros(1)])])

    def _scaled_density(self, labels, what: str) -> torch.Tensor:
        fit = self._require_fit(what)
        labels = validate.real_tensor("labels", labels).detach()  # weights are constants of the loss, as LDS's
        return _interpolate(self._table_on(labels.device), fit["low"], fit["step"], labels.to(torch.float64))

    def density(self, labels: ArrayLike) -> torch.Tensor:
        """The scaled density ``p'`` in ``[0, 1]`` at each label (float32, same shape and device):
        0 outside the grid, NaN at a NaN or infinite label."""
        return self._scaled_density(labels, "density").float()

    def weights(self, labels: ArrayLike) -> torch.Tensor:
        """Float32 weight of each label (same shape, same device), with the fitted scale.

        The weights of the fitted labels average 1 and equal :func:`density_weights`. Nothing is
        read on the host (call it in the training step): a NaN or infinite label gets weight 0.
        Raises RuntimeError before :meth:`fit`."""
        weights = self._scaled_density(labels, "weights").mul_(-self.alpha).add_(1)  # 1 - alpha p', NaN kept
        return weights.clamp_(min=self.eps).mul_(self._fit["scale"]).nan_to_num_(nan=0.0).float()

    @property
    def fitted_bandwidth(self) -> float | None:
        """The bandwidth of the fit in label units (None before :meth:`fit`)."""
        return None if self._fit is None else self._fit["fitted_bandwidth"]

    # -- checkpoints ---------------------------------------------------------------------------
    _SETTINGS = ("alpha", "eps", "bandwidth", "grid_size")

    def _fit_state(self) -> dict:
        if self._fit is None:
            return {}
        state = {key: value for key, value in self._fit.items() if key != "density"}
        state["density"] = self._fit["density"].clone()
        return state

    def _fit_from_state(self, state, fitted: bool):
        if not fitted:
            return None
        missing = [key for key in ("density", "low", "step", "scale", "fitted_bandwidth") if key not in state]
        if missing:
            raise ValueError(f"state_dict has no {missing[0]!r}")
        density = validate.state_values("density", state["density"])
        numbers = {}
        for key in ("low", "step", "scale", "fitted_bandwidth"):
            value = validate.state_values(key, state[key])
            if value.numel() != 1:
                raise ValueError(f"state_dict {key!r} must be one number, got shape {tuple(value.shape)}")
            numbers[key] = float(value)
        if density.shape != (self.grid_size,):
            raise ValueError(f"state_dict 'density' has shape {tuple(density.shape)}, "
                             f"this DenseWeight expects ({self.grid_size},)")
        if not bool(((density >= 0) & (density <= 1)).all()):
            raise ValueError("state_dict 'density' must lie in [0, 1]")
        top = numbers["low"] + numbers["step"] * (self.grid_size - 1)
        if not (math.isfinite(top) and min(numbers["step"], numbers["scale"], numbers["fitted_bandwidth"]) > 0
                and all(math.isfinite(value) for value in numbers.values())):
            raise ValueError("state_dict 'low' must be finite and 'step', 'scale', 'fitted_bandwidth' positive and "
                             "finite, with a grid float64 holds")
        if numbers["scale"] > validate.FLOAT32_MAX:  # the largest weight is the scale, in float32
            raise ValueError(f"state_dict 'scale' must be finite in float32 (the weights' dtype), got {numbers['scale']!r}")
        return dict(numbers, density=density.clone())

    def __repr__(self) -> str:
        fitted = "not fitted" if self._fit is None else f"fitted bandwidth {self._fit['fitted_bandwidth']:g}"
        return (f"DenseWeight(alpha={self.alpha:g}, eps={self.eps:g}, bandwidth={self.bandwidth!r}, "
                f"grid_size={self.grid_size}, {fitted})")


@overload
def density_weights(labels: torch.Tensor, alpha: float = ..., eps: float = ..., bandwidth: str | float = ..., *,
                    grid_size: int = ...) -> torch.Tensor: ...
@overload
def density_weights(labels: NotTensor, alpha: float = ..., eps: float = ..., bandwidth: str | float = ..., *,
                    grid_size: int = ...) -> np.ndarray: ...
def density_weights(labels: ArrayLike, alpha: float = 1.0, eps: float = 1e-6, bandwidth: str | float = "silverman", *,
                    grid_size: int = 4096) -> torch.Tensor | np.ndarray:
    """DenseWeight loss weights of the training ``labels`` (see :class:`DenseWeight`).

    Returns float32 weights averaging 1, one per label: a tensor on the labels' device, or a
    NumPy array when ``labels`` is not a tensor (usable as scikit-learn's ``sample_weight``).
    """
    return DenseWeight(alpha, eps, bandwidth, grid_size=grid_size)._fit_weights(labels)
