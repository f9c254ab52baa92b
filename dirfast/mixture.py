"""Gaussian mixtures of the training labels: the prior of Balanced MSE's GAI loss.

The published GAI code fits scikit-learn's ``GaussianMixture`` offline and loads it from a joblib
pickle. :func:`fit_gmm` fits one here, with EM: on one-dimensional labels it runs on the label
histogram (each bin's count, mean and spread from :func:`dirfast.ops.bin_stats`), so a fit over
millions of labels (a depth dataset's pixels) costs a few hundred bins per iteration; labels with
several dimensions are fitted sample by sample, with full covariances.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from . import ops
from .binning import Binning, as_label_tensor, finite_label_values

__all__ = ["GaussianMixture", "fit_gmm"]


class GaussianMixture:
    """A Gaussian mixture: ``weights [K]``, ``means [K, d]``, ``variances`` (covariances
    ``[K, d, d]``), float64 on the CPU. ``dim`` is ``d`` (1 for scalar labels).

    Build one with :func:`fit_gmm`, or from explicit parameters (:meth:`from_dict` also takes the
    dict the published ``preprocess_gmm.py`` dumps: scikit-learn's ``means_``, ``weights_`` and
    ``covariances_`` of any covariance type).
    """

    def __init__(self, means, variances, weights) -> None:
        def table(name, value):
            try:
                return torch.as_tensor(np.asarray(value, dtype=np.float64) if not isinstance(value, torch.Tensor)
                                       else value.detach().cpu(), dtype=torch.float64).clone()
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name} must be an array of real numbers ({exc})") from None

        means, variances, weights = table("means", means), table("variances", variances), table("weights", weights)
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError(f"weights must be 1-D with at least one component, got shape {tuple(weights.shape)}")
        k = weights.shape[0]
        if means.dim() == 1:
            means = means.unsqueeze(1)
        if means.dim() != 2 or means.shape[0] != k:
            raise ValueError(f"means must be [K] or [K, d] with K={k} (the length of weights), got shape "
                             f"{tuple(means.shape)}")
        d = means.shape[1]
        variances = _covariances(variances, k, d)
        if not (torch.isfinite(means).all() and torch.isfinite(variances).all() and torch.isfinite(weights).all()):
            raise ValueError("means, variances and weights must be finite")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be non-negative with a positive sum")
        try:
            torch.linalg.cholesky(variances)
        except RuntimeError:
            raise ValueError("variances must be positive (covariances positive definite)") from None
        self.means, self.variances, self.weights = means, variances, weights / weights.sum()

    @classmethod
    def from_dict(cls, gmm: Mapping) -> "GaussianMixture":
        """From a mapping with ``means``, ``variances`` and ``weights`` (the published pickle)."""
        if not isinstance(gmm, Mapping) or not {"means", "variances", "weights"} <= set(gmm):
            raise ValueError("gmm must be a GaussianMixture or a dict with 'means', 'variances' and 'weights'")
        return cls(gmm["means"], gmm["variances"], gmm["weights"])

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, x) -> torch.Tensor:
        """The mixture's log density at each row of ``x`` (``[N, d]``, or ``[N]`` when d = 1)."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, self.dim)
        return torch.logsumexp(log_component_densities(x, self.weights, self.means, self.variances), dim=1)

    def state_dict(self) -> dict:
        return {"means": self.means.clone(), "variances": self.variances.clone(), "weights": self.weights.clone()}

    def __repr__(self) -> str:
        return f"GaussianMixture({self.num_components} components, dim={self.dim})"


def _covariances(variances: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """``[K, d, d]`` covariances from scikit-learn's full ``[K, d, d]``, diagonal ``[K, d]``,
    spherical ``[K]`` or tied ``[d, d]`` layouts (d = 1: any of ``[K]``, ``[K, 1]``, ``[K, 1, 1]``)."""
    shape = tuple(variances.shape)
    if shape == (k, d, d):
        return variances
    if shape == (k, d):
        return torch.diag_embed(variances)
    if shape == (k,):
        return variances[:, None, None] * torch.eye(d, dtype=torch.float64)
    if shape == (d, d):
        return variances.expand(k, d, d).clone()
    raise ValueError(f"variances must be [K, d, d], [K, d], [K] or [d, d] with K={k}, d={d}, got shape {shape}")


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def fit_gmm(labels, num_components: int = 8, *, max_iter: int = 100, tol: float = 1e-3,
            reg_covar: float = 1e-6, num_bins: int = 4096) -> GaussianMixture:
    """Fit a Gaussian mixture to the training ``labels`` by EM (deterministic; no scikit-learn).

    Args:
        labels: ``[N]`` (or any shape) scalar labels, or ``[N, d]`` labels with d > 1 dimensions.
        num_components: K (the published GAI uses 8 for ages and 16 for depths).
        max_iter, tol, reg_covar: as scikit-learn's: stop when the mean log-likelihood gains less
            than ``tol``; ``reg_covar`` is added to the variances for stability.
        num_bins: scalar labels are binned into this many equal bins over their range, and EM runs
            on the bins (each bin's count, mean and variance, so labels with few distinct values,
            such as ages, are fitted exactly); Sheppard's correction is not needed for that reason.

    Starts from the label quantiles (means of K equal-count groups), so the same labels give the
    same mixture on every run.
    """
    num_components = _count("num_components", num_components, 1)
    max_iter = _count("max_iter", max_iter, 1)
    num_bins = _count("num_bins", num_bins, 1)
    for name, value in (("tol", tol), ("reg_covar", reg_covar)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    labels = as_label_tensor(labels)
    values = finite_label_values(labels)
    if labels.dim() == 2 and labels.shape[1] > 1:
        points = values.reshape(labels.shape).cpu()
        counts = torch.ones(points.shape[0], dtype=torch.float64)
        spread = None
    else:
        points, counts, spread = _histogram(values, num_bins)
    if counts.sum() < num_components:
        raise ValueError(f"fitting {num_components} components needs at least as many labels, got {int(counts.sum())}")
    return _em(points, counts, spread, num_components, max_iter, float(tol), float(reg_covar))


def _histogram(values: torch.Tensor, num_bins: int):
    """Occupied bins of scalar labels (flat, float64, finite): (mean [G, 1], count [G],
    within-bin variance [G, 1, 1])."""
    low, high = float(values.min()), float(values.max())
    if low == high:
        high = low + 1.0
    bins = Binning.uniform(low, high, num_bins)(values)
    count, mean, var = ops.bin_stats(values.reshape(-1, 1), bins, num_bins)
    count = count.to(torch.float64).cpu()
    occupied = count > 0
    within = torch.where(count > 1, var.reshape(-1) * (count - 1) / count.clamp(min=1), 0.0).cpu()
    return mean.cpu()[occupied], count[occupied], within[occupied].reshape(-1, 1, 1)


def _em(points, counts, spread, k, max_iter, tol, reg_covar) -> GaussianMixture:
    n, d = points.shape
    total = counts.sum()
    eye = torch.eye(d, dtype=torch.float64)
    # Initial responsibilities: K groups of equal count along the first principal direction.
    centered = points - (counts[:, None] * points).sum(0) / total
    direction = torch.linalg.eigh((counts[:, None, None] * (centered[:, :, None] * centered[:, None, :])).sum(0))[1][:, -1]
    order = torch.argsort(centered @ direction, stable=True)
    cumulative = torch.cumsum(counts[order], 0) - counts[order] / 2
    group = torch.clamp((cumulative / total * k).long(), max=k - 1)
    resp = torch.zeros(n, k, dtype=torch.float64)
    resp[order, group] = 1.0
    previous = -math.inf
    for _ in range(max_iter):
        weights, means, covs = _m_step(points, counts, spread, resp, reg_covar, eye)
        log_terms = log_component_densities(points, weights, means, covs)
        log_norm = torch.logsumexp(log_terms, dim=1)
        resp = torch.exp(log_terms - log_norm[:, None])
        current = float((counts * log_norm).sum() / total)
        if abs(current - previous) < tol:
            break
        previous = current
    weights, means, covs = _m_step(points, counts, spread, resp, reg_covar, eye)
    return GaussianMixture(means, covs, weights)


def _m_step(points, counts, spread, resp, reg_covar, eye):
    mass = counts[:, None] * resp  # [G, K]
    nk = mass.sum(0) + 10 * torch.finfo(torch.float64).eps
    means = (mass.T @ points) / nk[:, None]
    diff = points[:, None, :] - means[None]  # [G, K, d]
    outer = diff[..., :, None] * diff[..., None, :]
    if spread is not None:
        outer = outer + spread[:, None]
    covs = (mass[..., None, None] * outer).sum(0) / nk[:, None, None] + reg_covar * eye
    return nk / counts.sum(), means, covs


def log_component_densities(points, weights, means, covs):
    """``log w_k + log N(point; mean_k, cov_k)`` for every point ``[G, d]`` and component: ``[G, K]``
    (differentiable; in the dtype of its inputs). EM's E-step, the mixture's density and GAI's
    balancing term in d dimensions."""
    chol = torch.linalg.cholesky(covs)
    diff = (points[:, None, :] - means[None]).unsqueeze(-1)
    z = torch.linalg.solve_triangular(chol.expand(points.shape[0], -1, -1, -1), diff, upper=False)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    d = points.shape[1]
    return torch.log(weights) - 0.5 * (log_det + (z ** 2).sum((-2, -1)) + d * math.log(2 * math.pi))
