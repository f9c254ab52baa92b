"""Rules of thumb for a kernel bandwidth or a bin width, computed from 1-D labels.

:class:`dirfast.DenseWeight` takes its default bandwidth from here and
:meth:`dirfast.Binning.auto` its bin width; both import this module, which imports neither.
Each public function takes labels of any shape (a tensor, a NumPy array or a sequence of numbers),
checks them as those estimators do (finite, not empty), and returns a 0-D float64 tensor on their
device; the estimators, whose labels are checked already, call :func:`rule_width_unchecked`.
"""

from __future__ import annotations

import torch

from . import _validate as validate
from ._types import ArrayLike
from ._validate import chunks

__all__ = ["BANDWIDTH_RULES", "BIN_WIDTH_RULES", "silverman", "scott", "freedman_diaconis", "rule_width"]

BANDWIDTH_RULES = ("silverman", "scott")
BIN_WIDTH_RULES = ("fd",) + BANDWIDTH_RULES


def _std(values: torch.Tensor, correction: int) -> torch.Tensor:
    """``values.std(correction=...)`` in two passes over its :func:`chunks
    <dirfast._validate.chunks>` (the mean, then the squared deviations from it): the same bits for
    any thread count, which torch's std, split between threads from 32768 values on, is not.
    Labels whose sum or squared deviations pass float64's range (beyond about 1e154) are summed
    again, divided by their count or by the largest deviation, so the result stays finite."""
    parts, n = chunks(values), values.numel()
    mean = sum(part.sum() for part in parts) / n
    if not bool(torch.isfinite(mean)):
        mean = sum((part / n).sum() for part in parts)
    m2 = sum((part - mean).square_().sum() for part in parts)
    if bool(torch.isfinite(m2)):
        return (m2 / (n - correction)).sqrt()
    scale = max(float((part - mean).abs().max()) for part in parts)
    m2 = sum(((part - mean) / scale).square_().sum() for part in parts)
    return (m2 / (n - correction)).sqrt() * scale


def silverman(values: ArrayLike) -> torch.Tensor:
    """``1.06 * std * n^(-1/5)`` with the population standard deviation: Silverman's
    normal-reference rule (1986, eq. 3.28), the bandwidth the denseweight package uses by default."""
    return _silverman(validate.finite_values("values", values))


def scott(values: ArrayLike) -> torch.Tensor:
    """``std * n^(-1/5)`` with the sample standard deviation: Scott's rule as
    ``scipy.stats.gaussian_kde(bw_method="scott")`` applies it (0 for a single label)."""
    return _scott(validate.finite_values("values", values))


def freedman_diaconis(values: ArrayLike) -> torch.Tensor:
    """``2 * IQR * n^(-1/3)``: the Freedman–Diaconis bin width, as ``numpy.histogram_bin_edges(bins="fd")``."""
    return _freedman_diaconis(validate.finite_values("values", values))


def rule_width(values: ArrayLike, rule: str) -> torch.Tensor:
    """The width ``rule`` (one of :data:`BIN_WIDTH_RULES`) gives for ``values``."""
    validate.choice("rule", rule, BIN_WIDTH_RULES)
    return rule_width_unchecked(validate.finite_values("values", values), rule)


def rule_width_unchecked(values: torch.Tensor, rule: str) -> torch.Tensor:
    """:func:`rule_width` of a non-empty 1-D float64 tensor of finite values and a known rule."""
    return _RULES[rule](values)


def _silverman(values: torch.Tensor) -> torch.Tensor:
    return 1.06 * _std(values, 0) * values.numel() ** -0.2


def _scott(values: torch.Tensor) -> torch.Tensor:
    if values.numel() < 2:
        return values.new_zeros(())
    return _std(values, 1) * values.numel() ** -0.2


def _quantile(ordered: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of sorted values, interpolated linearly as ``numpy.percentile`` does."""
    position = q * (ordered.numel() - 1)
    below = int(position)
    above = min(below + 1, ordered.numel() - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _freedman_diaconis(values: torch.Tensor) -> torch.Tensor:
    ordered = values.sort().values
    return 2.0 * (_quantile(ordered, 0.75) - _quantile(ordered, 0.25)) * values.numel() ** (-1.0 / 3.0)


_RULES = {"silverman": _silverman, "scott": _scott, "fd": _freedman_diaconis}
