"""DenseWeight: loss weights that fall with the density of the labels (Steininger et al., 2021).

The density ``p`` of the training labels is a Gaussian kernel density estimate on a fine uniform
grid, built from the existing ops: the labels are split between their two nearest grid points
(linear binning) and summed per point with :func:`dirfast.ops.bin_stats`, then convolved with
a Gaussian window by :func:`dirfast.ops.smooth_bins`. ``p`` is scaled to ``[0, 1]`` and a
label's weight is ``max(1 - alpha * p'(y), eps)``, divided by the mean over the training labels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from . import ops
from .bandwidth import BANDWIDTH_RULES, rule_width
from .binning import _real, as_label_tensor, finite_label_values

__all__ = ["DenseWeight", "density_weights", "BANDWIDTH_RULES"]

MIN_GRID, MAX_GRID = 16, 1 << 16
GRID_PAD = 5.0  # the grid extends this many bandwidths past the labels: beyond the window's 4-sigma reach
MIN_STEPS_PER_BANDWIDTH = 2.0  # below this the grid cannot follow the kernel: warn


def _bandwidth(value):
    """``"silverman"``, ``"scott"`` or a positive finite real number."""
    if isinstance(value, str):
        if value not in BANDWIDTH_RULES:
            raise ValueError(f"bandwidth must be one of {BANDWIDTH_RULES} or a positive number, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"bandwidth must be a str or a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"bandwidth must be positive and finite, got {value!r}")
    return float(value)


def _grid_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"grid_size must be an int, got {type(value).__name__}")
    if not MIN_GRID <= value <= MAX_GRID:
        raise ValueError(f"grid_size must be in [{MIN_GRID}, {MAX_GRID}], got {value}")
    return int(value)


def _gaussian_window(sigma: float, device) -> torch.Tensor:
    """scipy's ``gaussian_filter1d`` kernel in float64: ``exp(-k^2 / (2 sigma^2))`` for ``|k|`` up
    to ``int(4 sigma + 0.5)``, summing to 1. (``kernel_window`` filters a delta of the window's
    length, which gives these taps here, but in float32 and in time that grows as its length
    squared: 30 ms at the ~800 taps of a default fit.)"""
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    window = torch.exp(-0.5 * (taps / sigma) ** 2)
    return window / window.sum()


def _interpolate(table: torch.Tensor, low: float, step: float, labels: torch.Tensor) -> torch.Tensor:
    """``table`` (values at ``low + k * step``) interpolated linearly at ``labels`` (float64, any
    shape): 0 outside the grid, NaN at a NaN or infinite label. Reads nothing on the host."""
    last = table.shape[0] - 1
    position = (labels - low) / step
    inside = (position >= 0) & (position <= last)
    position = torch.nan_to_num(position, nan=0.0).clamp(0, last)
    left = position.floor().clamp(max=last - 1)
    fraction = position - left
    left = left.long()
    value = table[left] * (1 - fraction) + table[left + 1] * fraction
    value = torch.where(inside, value, 0.0)
    return torch.where(torch.isfinite(labels), value, torch.nan)


class DenseWeight:
    """DenseWeight (Steininger et al., Machine Learning 2021), fitted on the training labels.

    Args:
        alpha: how strongly dense labels are down-weighted (0: every weight 1).
        eps: the floor of ``1 - alpha * p'`` (positive), so that no weight is 0.
        bandwidth: ``"silverman"`` (``1.06 * std * n^(-1/5)``, the denseweight package's default),
            ``"scott"`` (``std * n^(-1/5)``, scipy's) or a positive number in label units.
        grid_size: points of the density grid, which spans the labels plus 5 bandwidths each side.

    ``p'`` is the kernel density scaled to ``[0, 1]`` by its minimum and maximum over the grid,
    as the denseweight package does (the grid minimum is 0: the grid reaches past the 4-sigma
    window); between grid points it is interpolated linearly. Weights are float32 and average 1
    over the fitted labels. Fitting reads the labels on the host; :meth:`weights` does not.

    Example::

        dense = DenseWeight(alpha=1.0).fit(train_ages)
        loss = weighted_mse_loss(pred, target, dense.weights(target))
    """

    def __init__(self, alpha: float = 1.0, eps: float = 1e-6, bandwidth="silverman", *, grid_size: int = 4096):
        alpha, eps = _real("alpha", alpha), _real("eps", eps)
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1], got {eps}")
        self.alpha, self.eps = alpha, eps
        self.bandwidth = _bandwidth(bandwidth)
        self.grid_size = _grid_size(grid_size)
        self._fit = None  # dict(low, step, density, scale, bandwidth) once fitted
        self._table_on = {}

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, labels) -> "DenseWeight":
        """Estimate the density of ``labels`` (the whole training set; any shape); returns ``self``.

        Raises ValueError for no, NaN or infinite labels, or when a rule gives bandwidth 0 (all
        labels equal), and leaves the fit as it was."""
        values = finite_label_values(labels)
        if isinstance(self.bandwidth, str):
            bandwidth = float(rule_width(values, self.bandwidth))
            if not bandwidth > 0:
                raise ValueError(f"labels are all equal, so the {self.bandwidth!r} bandwidth is 0: "
                                 "pass a positive bandwidth")
        else:
            bandwidth = self.bandwidth
        low = float(values.min()) - GRID_PAD * bandwidth
        step = (float(values.max()) + GRID_PAD * bandwidth - low) / (self.grid_size - 1)
        sigma = bandwidth / step  # in grid steps
        if not (math.isfinite(bandwidth) and math.isfinite(low) and math.isfinite(step) and step > 0
                and math.isfinite(sigma)):
            raise ValueError(f"labels span [{float(values.min()):g}, {float(values.max()):g}]: with bandwidth "
                             f"{bandwidth:g} the density grid overflows float64; rescale the labels")
        if sigma < MIN_STEPS_PER_BANDWIDTH:
            warnings.warn(f"the bandwidth {bandwidth:g} spans only {sigma:.2g} grid steps of {step:g}: the density "
                          "is coarse; raise grid_size or the bandwidth", UserWarning, stacklevel=2)
        density = self._kde(values, low, step, sigma)
        span = (density.max() - density.min()).clamp(min=torch.finfo(torch.float64).tiny)
        density = (density - density.min()) / span
        floor = (1 - self.alpha * _interpolate(density, low, step, values)).clamp(min=self.eps)
        self._fit = dict(low=low, step=step, density=density.cpu(), scale=1.0 / float(floor.mean()),
                         fitted_bandwidth=bandwidth)
        self._table_on = {}
        return self

    def _kde(self, values: torch.Tensor, low: float, step: float, sigma: float) -> torch.Tensor:
        """The unnormalised Gaussian KDE of ``values`` at the grid points (float64, on their device)."""
        position = (values - low) / step
        left = position.floor().clamp(0, self.grid_size - 2)
        right_share = position - left
        points = torch.cat([left, left + 1]).long()
        shares = torch.cat([1 - right_share, right_share])[:, None]
        count, mean, _ = ops.bin_stats(shares, points, self.grid_size)
        mass = count.to(torch.float64) * mean[:, 0]
        return ops.smooth_bins(mass, _gaussian_window(sigma, mass.device), padding="constant")

    # -- weights -------------------------------------------------------------------------------
    def _require_fit(self, what: str) -> dict:
        if self._fit is None:
            raise RuntimeError(f"DenseWeight.{what}() needs a fit: call fit(train_labels) first (or load_state_dict)")
        return self._fit

    def _scaled_density(self, labels, what: str) -> torch.Tensor:
        fit = self._require_fit(what)
        labels = as_label_tensor(labels).detach()  # weights are constants of the loss, as LDS's
        table = self._table_on.get(labels.device)
        if table is None:
            table = self._table_on[labels.device] = fit["density"].to(labels.device)
        return _interpolate(table, fit["low"], fit["step"], labels.to(torch.float64))

    def density(self, labels) -> torch.Tensor:
        """The scaled density ``p'`` in ``[0, 1]`` at each label (float32, same shape and device):
        0 outside the grid, NaN at a NaN or infinite label."""
        return self._scaled_density(labels, "density").float()

    def weights(self, labels) -> torch.Tensor:
        """Float32 weight of each label (same shape, same device), with the fitted scale.

        The weights of the fitted labels average 1 and equal :func:`density_weights`. Nothing is
        read on the host (call it in the training step): a NaN or infinite label gets weight 0.
        Raises RuntimeError before :meth:`fit`."""
        density = self._scaled_density(labels, "weights")
        weights = (1 - self.alpha * density).clamp(min=self.eps) * self._fit["scale"]
        return torch.where(torch.isnan(density), 0.0, weights).float()

    @property
    def fitted_bandwidth(self):
        """The bandwidth of the fit in label units (None before :meth:`fit`)."""
        return None if self._fit is None else self._fit["fitted_bandwidth"]

    # -- checkpoints ---------------------------------------------------------------------------
    _SETTINGS = ("alpha", "eps", "bandwidth", "grid_size")

    def state_dict(self) -> dict:
        """The fitted grid density and scale, and the settings they were fitted with."""
        state = {key: getattr(self, key) for key in self._SETTINGS}
        state["fitted"] = self._fit is not None
        if self._fit is not None:
            state.update({key: value for key, value in self._fit.items() if key != "density"})
            state["density"] = self._fit["density"].clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a fit saved by :meth:`state_dict`; the settings must match this object's.
        Everything is checked before anything changes."""
        if not isinstance(state, dict) or "fitted" not in state:
            raise ValueError("state must be a dict from DenseWeight.state_dict() (it has no 'fitted')")
        for key in self._SETTINGS:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict {key!r} is {state[key]!r}, this DenseWeight has {getattr(self, key)!r}")
        if not state["fitted"]:
            self._fit, self._table_on = None, {}
            return
        try:
            density = torch.as_tensor(state["density"], dtype=torch.float64).cpu()
            numbers = {key: float(state[key]) for key in ("low", "step", "scale", "fitted_bandwidth")}
        except KeyError as exc:
            raise ValueError(f"state_dict has no {exc.args[0]!r}") from None
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"state_dict holds a value that is not a number ({exc})") from None
        if density.shape != (self.grid_size,):
            raise ValueError(f"state_dict 'density' has shape {tuple(density.shape)}, "
                             f"this DenseWeight expects ({self.grid_size},)")
        if not bool(((density >= 0) & (density <= 1)).all()):
            raise ValueError("state_dict 'density' must lie in [0, 1]")
        if not all(math.isfinite(value) for value in numbers.values()) or min(
                numbers["step"], numbers["scale"], numbers["fitted_bandwidth"]) <= 0:
            raise ValueError("state_dict 'low' must be finite and 'step', 'scale', 'fitted_bandwidth' positive and finite")
        self._fit = dict(numbers, density=density.clone())
        self._table_on = {}

    def __repr__(self) -> str:
        fitted = "not fitted" if self._fit is None else f"fitted bandwidth {self._fit['fitted_bandwidth']:g}"
        return (f"DenseWeight(alpha={self.alpha:g}, eps={self.eps:g}, bandwidth={self.bandwidth!r}, "
                f"grid_size={self.grid_size}, {fitted})")


def density_weights(labels, alpha: float = 1.0, eps: float = 1e-6, bandwidth="silverman", *,
                    grid_size: int = 4096):
    """DenseWeight loss weights of the training ``labels`` (see :class:`DenseWeight`).

    Returns float32 weights averaging 1, one per label: a tensor on the labels' device, or a
    NumPy array when ``labels`` is not a tensor (usable as scikit-learn's ``sample_weight``).
    """
    estimator = DenseWeight(alpha, eps, bandwidth, grid_size=grid_size)
    tensor = as_label_tensor(labels)
    weights = estimator.fit(tensor).weights(tensor)
    return weights if isinstance(labels, torch.Tensor) else weights.numpy()
