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

import torch

from . import _validate as validate
from . import ops
from ._types import ArrayLike
from .binning import MAX_BINS, Binning

__all__ = ["GaussianMixture", "fit_gmm", "COVARIANCE_TYPES"]

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")  # scikit-learn's layouts of covariances_


class GaussianMixture:
    """A Gaussian mixture: ``weights [K]``, ``means [K, d]``, ``variances`` (covariances
    ``[K, d, d]``), float64 on the CPU. ``dim`` is ``d`` (1 for scalar labels).

    Build one with :func:`fit_gmm`, or from explicit parameters (:meth:`from_dict` also takes the
    dict the published ``preprocess_gmm.py`` dumps: scikit-learn's ``means_``, ``weights_`` and
    ``covariances_`` of any covariance type).
    """

    def __init__(self, means: ArrayLike, variances: ArrayLike, weights: ArrayLike, *,
                 covariance_type: str | None = None) -> None:
        def table(name: str, value: ArrayLike) -> torch.Tensor:
            value = validate.readable(name, validate.real_tensor(name, value))
            return value.detach().cpu().to(torch.float64).clone()

        means, variances, weights = table("means", means), table("variances", variances), table("weights", weights)
        if covariance_type is not None:
            validate.choice("covariance_type", covariance_type, COVARIANCE_TYPES)
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError(f"weights must be 1-D with at least one component, got shape {tuple(weights.shape)}")
        k = weights.shape[0]
        if means.dim() == 1:
            means = means.unsqueeze(1)
        if means.dim() != 2 or means.shape[0] != k or means.shape[1] == 0:
            raise ValueError(f"means must be [K] or [K, d] with K={k} (the length of weights), got shape "
                             f"{tuple(means.shape)}")
        d = means.shape[1]
        variances = _covariances(variances, k, d, covariance_type)
        for name, value in (("means", means), ("variances", variances), ("weights", weights)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be non-negative with a positive sum")
        # Symmetric up to rounding (scikit-learn's covariances_ differ in the last bits): the lower
        # triangle, which the Cholesky factor reads, is kept and mirrored.
        scale = torch.diagonal(variances, dim1=-2, dim2=-1).abs().sqrt()
        tolerance = 1e-4 * scale[:, :, None] * scale[:, None, :]
        if bool(((variances - variances.transpose(-2, -1)).abs() > tolerance).any()):
            raise ValueError("variances must be symmetric (covariance matrices)")
        variances = variances.tril() + variances.tril(-1).transpose(-2, -1)
        try:
            torch.linalg.cholesky(variances)
        except RuntimeError:
            raise ValueError("variances must be positive (covariances positive definite)") from None
        if not math.isfinite(float(weights.sum())):  # the sum overflows float64: scale by the largest first
            weights = weights / weights.max()
        self.means, self.variances, self.weights = means, variances, weights / weights.sum()

    @classmethod
    def from_dict(cls, gmm: Mapping, *, covariance_type: str | None = None) -> "GaussianMixture":
        """From a mapping with ``means``, ``variances`` and ``weights`` (the published pickle).
        ``covariance_type`` (scikit-learn's: ``"full"``, ``"diag"``, ``"spherical"``, ``"tied"``)
        says how ``variances`` is laid out; it is needed only when the shape does not tell."""
        if not isinstance(gmm, Mapping):
            raise TypeError(f"gmm must be a GaussianMixture or a dict with 'means', 'variances' and 'weights', "
                            f"got {type(gmm).__name__}")
        missing = [key for key in ("means", "variances", "weights") if key not in gmm]
        if missing:
            raise ValueError(f"gmm must hold 'means', 'variances' and 'weights'; it has no {missing[0]!r}")
        if covariance_type is not None:
            validate.choice("covariance_type", covariance_type, COVARIANCE_TYPES)
        try:
            return cls(gmm["means"], gmm["variances"], gmm["weights"], covariance_type=covariance_type)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"gmm: {exc}") from None

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, x: ArrayLike) -> torch.Tensor:
        """The mixture's log density (float64, CPU) at each row of ``x``: ``[N, d]``; for d = 1
        any shape, every element a point."""
        x = validate.readable("x", validate.real_tensor("x", x)).detach().cpu().to(torch.float64)
        if self.dim > 1 and (x.dim() != 2 or x.shape[1] != self.dim):
            raise ValueError(f"x must be [N, {self.dim}] for a mixture in {self.dim} dimensions, got shape "
                             f"{tuple(x.shape)}")
        x = x.reshape(-1, self.dim)
        return torch.logsumexp(log_component_densities(x, self.weights, self.means, self.variances), dim=1)

    def state_dict(self) -> dict:
        return {"means": self.means.clone(), "variances": self.variances.clone(), "weights": self.weights.clone()}

    def __repr__(self) -> str:
        return f"GaussianMixture({self.num_components} components, dim={self.dim})"


def _covariances(variances: torch.Tensor, k: int, d: int, covariance_type: str | None) -> torch.Tensor:
    """``[K, d, d]`` covariances from scikit-learn's full ``[K, d, d]``, diagonal ``[K, d]``,
    spherical ``[K]`` or tied ``[d, d]`` layouts (d = 1: any of ``[K]``, ``[K, 1]``, ``[K, 1, 1]``).
    With K == d > 1 a ``[d, d]`` table is diagonal or tied: ``covariance_type`` must say which."""
    layouts = {"full": (k, d, d), "diag": (k, d), "spherical": (k,), "tied": (d, d)}
    shape = tuple(variances.shape)
    if covariance_type is None:
        fits = [name for name, layout in layouts.items() if layout == shape]
        if not fits:
            raise ValueError(f"variances must be [K, d, d], [K, d], [K] or [d, d] with K={k}, d={d}, got shape {shape}")
        if d > 1 and len(fits) > 1:
            raise ValueError(f"variances of shape {shape} are either {' or '.join(fits)} covariances (K = d = {d}): "
                             f"pass covariance_type={fits[0]!r} or {fits[1]!r}")
        covariance_type = fits[0]
    elif shape != layouts[covariance_type]:
        raise ValueError(f"variances of shape {shape} are not covariance_type={covariance_type!r}, whose shape is "
                         f"{layouts[covariance_type]}")
    if covariance_type == "diag":
        return torch.diag_embed(variances)
    if covariance_type == "spherical":
        return variances[:, None, None] * torch.eye(d, dtype=torch.float64, device=variances.device)
    if covariance_type == "tied":
        return variances.expand(k, d, d).clone()
    return variances


def fit_gmm(labels: ArrayLike, num_components: int = 8, *, max_iter: int = 100, tol: float = 1e-3,
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
    same mixture on every run. Under ``torch.distributed`` it fits the labels given only: pass the
    whole training set's labels on every rank.
    """
    num_components = validate.integer("num_components", num_components, 1, MAX_BINS)
    max_iter = validate.integer("max_iter", max_iter, 1)
    num_bins = validate.integer("num_bins", num_bins, 1, MAX_BINS)
    tol, reg_covar = validate.real("tol", tol, 0.0), validate.real("reg_covar", reg_covar, 0.0)
    labels = validate.real_tensor("labels", labels)
    values = validate.finite_values("labels", labels)
    if float(values.abs().max()) > _LARGEST_LABEL:
        raise ValueError(f"labels must lie within +-{_LARGEST_LABEL:g}, got {float(values.abs().max()):g}: EM squares "
                         "them, which would overflow float64; rescale them")
    with torch.device("cpu"):  # EM is host work, under a meta default device (deferred init) too
        if labels.dim() == 2 and labels.shape[1] > 1:
            points = values.reshape(labels.shape).cpu()
            counts = torch.ones(points.shape[0], dtype=torch.float64)
            spread = None
        else:
            points, counts, spread = _histogram(values, num_bins)
        if counts.sum() < num_components:
            raise ValueError(f"num_components ({num_components}) must not exceed the number of labels "
                             f"({int(counts.sum())})")
        try:
            return _em(points, counts, spread, num_components, max_iter, tol, reg_covar)
        except torch.linalg.LinAlgError:
            shape = "are all equal" if points.shape[1] == 1 else "are all equal or lie on a line or plane"
            raise ValueError(f"a component's covariance is singular (the labels it holds {shape}) and "
                             f"reg_covar={reg_covar:g} does not lift it: pass reg_covar > 0 (scikit-learn's "
                             f"default is 1e-6)") from None


_LARGEST_LABEL = 1e150  # squared, and summed over many labels, still finite in float64


def _histogram(values: torch.Tensor, num_bins: int):
    """Occupied bins of scalar labels (flat, float64, finite): (mean [G, 1], count [G],
    within-bin variance [G, 1, 1])."""
    low, high = float(values.min()), float(values.max())
    if low == high:  # one occupied bin, whatever the magnitude of the labels
        return values[:1].reshape(1, 1).cpu(), torch.tensor([float(values.numel())], dtype=torch.float64), \
            torch.zeros(1, 1, 1, dtype=torch.float64)
    # a span of a few ulps holds fewer distinct edges than num_bins: as many bins as it can
    num_bins = max(1, min(num_bins, int((high - low) / (4 * math.ulp(max(abs(low), abs(high)))))))
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


def whiten(points, means, covs):
    """Each point ``[G, d]`` against each component's Gaussian: ``(z, inverse, log_det)`` with
    ``covs[k] = L_k L_k^T``, ``inverse = L_k^-1`` ``[K, d, d]``, ``z = L_k^-1 (point - mean_k)``
    ``[K, d, G]`` and ``log_det = log |covs[k]|`` ``[K]`` (differentiable). ``L_k^-1`` once, then
    one product per component with every point a column: faster than a triangular solve over
    the points (benchmarks/results/cpu/design-constants.md)."""
    chol = torch.linalg.cholesky(covs)
    eye = torch.eye(points.shape[1], dtype=points.dtype, device=points.device)
    inverse = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    z = torch.bmm(inverse, points.T[None] - means[:, :, None])
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return z, inverse, log_det


def log_component_densities(points, weights, means, covs):
    """``log w_k + log N(point; mean_k, cov_k)`` for every point ``[G, d]`` and component: ``[G, K]``
    (differentiable; in the dtype of its inputs): EM's E-step and the mixture's density."""
    z, _, log_det = whiten(points, means, covs)
    return torch.log(weights) - 0.5 * (log_det + (z * z).sum(1).T + points.shape[1] * math.log(2 * math.pi))
