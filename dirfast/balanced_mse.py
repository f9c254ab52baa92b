"""Balanced MSE (Ren et al., "Balanced MSE for Imbalanced Visual Regression", CVPR 2022).

Adapted from the published code (github.com/jiawei-ren/BalancedMSE, MIT licence, Copyright (c)
2022 Jiawei Ren): the same losses and gradients, on any device, for targets of any dimension,
without the N x K matrix of BNI and GAI nor BMC's N x N on scalar targets
(:func:`dirfast.ops.mixture_logpdf` is fused), with an optional all-gather of BMC's prior over
the ranks of ``torch.distributed``. Each loss is one autograd node whose forward also forms the
gradients (the loss is a mean: one scalar upstream gradient), so its backward only scales them.

Each loss is the negative log-likelihood of the target under the balanced predictive
distribution: the MSE term ``|pred - target|^2 / (2 noise_var)`` plus a balancing term, the log
of the training-label prior convolved with the noise, evaluated at the prediction; the sum is
scaled by ``2 noise_var`` (detached) so that its gradient in ``pred`` has the scale of MSE's. The
prior is the batch's targets (BMC), a label histogram (BNI) or a Gaussian mixture (GAI).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize

from . import _validate as validate
from . import distributed, ops
from ._state import CheckedLoad, move_only
from ._types import ArrayLike, ProcessGroup
from .binning import GridBinning
from .lds import LDS
from .mixture import GaussianMixture, fit_gmm, whiten
from .ops.mixture_logpdf import mixture_logpdf_unchecked, mixture_logpdf_with_grads_unchecked

__all__ = ["bmc_loss", "bni_loss", "gai_loss", "BMCLoss", "BNILoss", "GAILoss"]


# -- checks ------------------------------------------------------------------------------------
def _acc(pred: torch.Tensor) -> torch.dtype:
    """The dtype the balancing terms are computed in: the ops' rule for the predictions' dtype."""
    return ops.acc_dtype(pred.dtype)


def _variance_range(dtype: torch.dtype) -> tuple:
    """The noise variances ``dtype`` computes a loss with: from sqrt(tiny) to sqrt(max), so that
    the variance, its square and its products with errors of the dtype's range stay finite."""
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny), math.sqrt(info.max)


# BMC in d > 1 dimensions: the rows of a block against the whole prior hold about this many distances
_BLOCK_ELEMENTS = 1 << 20


def _noise_var(noise_var, pred: torch.Tensor) -> torch.Tensor:
    """A positive number within :func:`_variance_range` of the dtype the loss of ``pred`` is
    computed in, or a one-element floating tensor (a learnable ``noise_sigma ** 2``), whose value
    is not read on the host, so not checked."""
    if isinstance(noise_var, torch.Tensor):
        validate.floating("noise_var", noise_var)
        if noise_var.numel() != 1:
            raise ValueError(f"noise_var must be a number or a one-element tensor, got shape {tuple(noise_var.shape)}")
        if noise_var.device != pred.device:
            raise ValueError(f"noise_var is on {noise_var.device} but pred is on {pred.device} (move the loss "
                             f"module with .to(device))")
        return noise_var.reshape(())
    acc = _acc(pred)
    value = validate.real("noise_var", noise_var)
    low, high = _variance_range(acc)
    if not low <= value <= high:
        raise ValueError(f"noise_var must be in [{low:.3g}, {high:.3g}] for {pred.dtype} predictions (the loss is "
                         f"computed in {acc}, which must hold it and its square), got {value!r}")
    return torch.tensor(value, dtype=acc, device=pred.device)


def _noise_sigma(name: str, value, dtype: torch.dtype) -> float:
    """A noise scale whose square, the noise variance, is within :func:`_variance_range` of ``dtype``."""
    value = validate.real(name, value)
    low, high = _variance_range(dtype)
    if not math.sqrt(low) <= value <= math.sqrt(high):
        raise ValueError(f"{name} must be in [{math.sqrt(low):.3g}, {math.sqrt(high):.3g}]: its square, the noise "
                         f"variance, must be in [{low:.3g}, {high:.3g}] for {dtype}; got {value!r}")
    return value


def _rows(name: str, pred: torch.Tensor) -> torch.Tensor:
    """``pred`` as ``[N, d]``: ``[N]`` is one dimension."""
    if pred.dim() == 1:
        return pred.unsqueeze(1)
    if pred.dim() != 2:
        raise ValueError(f"{name} must be [N] or [N, d] (one row per sample), got shape {tuple(pred.shape)}")
    return pred


def _vector(name: str, value) -> torch.Tensor:
    value = validate.readable(name, validate.real_tensor(name, value)).detach()
    if value.dim() != 1 or value.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of real numbers, got shape {tuple(value.shape)}")
    return value


def _histogram(bucket_centers, bucket_weights):
    """BNI's prior, checked (read on the host): finite ``bucket_centers``, and ``bucket_weights``
    of the same length, finite, non-negative and not all 0."""
    centers, weights = _vector("bucket_centers", bucket_centers), _vector("bucket_weights", bucket_weights)
    if weights.shape != centers.shape:
        raise ValueError(f"bucket_weights must have the shape of bucket_centers {tuple(centers.shape)}, "
                         f"got {tuple(weights.shape)}")
    if not bool(torch.isfinite(centers).all()):
        raise ValueError("bucket_centers must be finite")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError("bucket_weights must be finite, non-negative and not all 0")
    return centers, weights


def _mixture(gmm) -> GaussianMixture:
    """GAI's prior: a GaussianMixture, or one from the published pickle's dict."""
    if isinstance(gmm, (str, bytes)):
        raise TypeError("gmm must be a GaussianMixture or a dict, not a path: load the published pickle "
                        "with joblib.load(path), or fit one with dirfast.mixture.fit_gmm(train_labels)")
    return gmm if isinstance(gmm, GaussianMixture) else GaussianMixture.from_dict(gmm)


def _magnitude(*tables: torch.Tensor) -> float:
    """The largest absolute value of host tables (CPU float64): what the loss's dtype must hold."""
    return max(float(t.abs().max()) for t in tables)


def _check_fits(what: str, magnitude: float, acc: torch.dtype) -> None:
    """Refuse a prior whose values (up to ``magnitude``) overflow ``acc``, the loss's dtype."""
    if acc != torch.float64 and magnitude > validate.FLOAT32_MAX:
        raise ValueError(f"{what} must fit in {acc}, the dtype the loss of these predictions is computed in; "
                         f"got a value of magnitude {magnitude:.3g} (use float64 predictions or rescale the labels)")


class _BalancedMSENode(torch.autograd.Function):
    """The backward shared by the loss nodes below. Their loss is ``2 v' (mean(|d|^2) / (2 v) +
    dims log(v) / 2 + mean(b))``, ``v = noise_var``, ``v'`` its detached value, ``d = pred -
    target`` and ``b`` a row's balancing term; it is a mean, so its upstream gradient is one
    scalar, and the forward, where a gradient is wanted, saves the gradients for an upstream 1
    (``pred_direction``, the one in pred over ``2 / n``, and ``noise_direction``, the one in v):
    the backward only scales them."""

    @staticmethod
    def _save(ctx, pred, target, noise_var, diff, pred_direction, noise_direction):
        ctx.save_for_backward(diff, pred_direction, noise_direction)
        ctx.shape, ctx.dtypes = pred.shape, (pred.dtype, target.dtype, noise_var.dtype)

    @staticmethod
    def _directions(ctx, diff, square_sum, v, grad_x, grad_shift, dims):
        """(pred_direction, noise_direction) from each row's ``db/dpred`` (``grad_x``) and the sum
        over rows of ``db/dv`` (``grad_shift``): ``d + v grad_x``, and ``dims - |d|^2 / (n v) +
        (2 / n) v grad_shift`` where the noise wants a gradient."""
        noise = None
        if ctx.needs_input_grad[2]:
            noise = torch.addcmul(dims - square_sum / (diff.shape[0] * v), v, grad_shift, value=2 / diff.shape[0])
        return torch.addcmul(diff, grad_x, v), noise

    @staticmethod
    def _loss(densities, square_sum, v, n, dims):
        """``v (dims log(v) + 2 mean(densities)) + |d|^2 / n`` for ``n`` rows, in few operations: on a
        small batch each costs about as much as its kernel (Python numbers as alpha, not tensors)."""
        return torch.add(torch.add(torch.log(v), densities.sum(), alpha=2 / (n * dims)).mul_(dims * v), square_sum,
                         alpha=1 / n)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise NotImplementedError(
                "the Balanced MSE losses give first derivatives only: a backward with create_graph=True (a "
                "gradient penalty, a Hessian, double backward) would need their second derivatives")
        diff, pred_direction, noise_direction = ctx.saved_tensors
        unit = grad * (2 / diff.shape[0])
        pred_dtype, target_dtype, noise_dtype = ctx.dtypes
        grad_pred = grad_target = grad_noise = None
        if ctx.needs_input_grad[0]:
            grad_pred = (pred_direction * unit).reshape(ctx.shape).to(pred_dtype)
        if ctx.needs_input_grad[1]:
            grad_target = (diff * -unit).reshape(ctx.shape).to(target_dtype)
        if ctx.needs_input_grad[2]:
            grad_noise = (noise_direction * grad).to(noise_dtype)
        return (grad_pred, grad_target, grad_noise, *[None] * (len(ctx.needs_input_grad) - 3))


class _ScalarBalancedMSE(_BalancedMSENode):
    """The 1-D losses in one autograd node, the balancing term ``mixture_logpdf(pred; means,
    variances + v, log_weights)``: BNI (variances None: 0, the histogram), GAI (the mixture's)
    and BMC (variances None, the batch's targets at weight 1) are this loss, as the published
    terms rearranged. One node instead of a dozen small ones (on a small batch, autograd's per-op
    costs would be most of the step: benchmarks/results/cpu/design-constants.md); the fused op
    gives each element's gradients in the forward's pass over the components. The tables get no
    gradient; pred any shape.
    """

    @staticmethod
    def forward(ctx, pred, target, noise_var, means, variances, log_weights):
        acc = _acc(pred)
        flat = pred.reshape(-1).to(acc)
        diff = flat - target.reshape(-1).to(acc)  # in acc: float16 would round it
        v = noise_var.to(acc)
        # variances None: each component's is the noise's (BNI's bins, BMC's targets)
        components = (means, v.expand(means.shape[0]) if variances is None else variances + v, log_weights)
        square_sum = torch.dot(diff, diff)
        if any(ctx.needs_input_grad[:3]):
            densities, grad_x, grad_shift = mixture_logpdf_with_grads_unchecked(flat, *components)
            directions = _BalancedMSENode._directions(ctx, diff, square_sum, v, grad_x, grad_shift.sum(), 1)
            _BalancedMSENode._save(ctx, pred, target, noise_var, diff, *directions)
        else:
            densities = mixture_logpdf_unchecked(flat, *components)
        return _BalancedMSENode._loss(densities, square_sum, v, diff.numel(), 1)


class _MixtureBalancedMSE(_BalancedMSENode):
    """GAI in d > 1 dimensions in one autograd node: with the components' covariances ``S_k + v I
    = L_k L_k^T`` and ``z_k = L_k^-1 (pred - mean_k)``, the balancing term is ``log sum_k w_k
    |L_k|^-1 exp(-|z_k|^2 / 2)`` (the published one, which omits 2 pi); its gradients, from ``y_k
    = L_k^-T z_k`` and the responsibilities ``r``: ``-sum_k r_k y_k`` in pred, ``sum_k r_k
    (|y_k|^2 - tr((S_k + v I)^-1)) / 2`` in v (``z`` and ``L_k^-1`` from
    :func:`dirfast.mixture.whiten`). The mixture gets no gradient; pred and target ``[N, d]`` in
    the accumulation dtype.
    """

    @staticmethod
    def forward(ctx, pred, target, noise_var, means, covariances, log_weights):
        n, dims = pred.shape
        diff = pred - target
        v = noise_var.to(pred.dtype)
        eye = torch.eye(dims, dtype=pred.dtype, device=pred.device)
        z, inverse, log_det = whiten(pred, means, covariances + v * eye)  # [K, d, N], [K, d, d], [K]
        terms = (log_weights - 0.5 * log_det)[:, None] - 0.5 * (z * z).sum(1)  # [K, N]
        densities = torch.logsumexp(terms, 0)
        square_sum = (diff * diff).sum()
        if any(ctx.needs_input_grad[:3]):
            r = torch.exp(terms - densities)  # [K, N]
            y = torch.bmm(inverse.transpose(1, 2), z)  # L_k^-T z_k = (S_k + v I)^-1 (pred - mean_k)
            grad_x = -(y * r[:, None]).sum(0).T
            trace = inverse.square().sum((1, 2))  # tr((S_k + v I)^-1)
            grad_shift = 0.5 * (r * ((y * y).sum(1) - trace[:, None])).sum()
            directions = _BalancedMSENode._directions(ctx, diff, square_sum, v, grad_x, grad_shift, dims)
            _BalancedMSENode._save(ctx, pred, target, noise_var, diff, *directions)
        return _BalancedMSENode._loss(densities, square_sum, v, n, dims)


class _BatchBalancedMSE(_BalancedMSENode):
    """BMC on targets of d > 1 dimensions in one autograd node, a block of rows at a time against
    the whole prior (``[rows, M]`` in memory, not the matrix form's ``[N, M, d]``; under
    torch.compile all N rows in one block, so one graph serves every batch size): with ``D_ij =
    |pred_i - prior_j|^2``, the published cross-entropy over the logits ``-D_ij / (2 v)`` (row
    i's own target its class) is this loss with the balancing term ``log sum_j exp(-D_ij / (2 v))
    - d log(v) / 2``. From each row's softmax ``r``, the gradients for an upstream 1 are formed
    directly, without the cancellations of the general form: ``(2 / n) (sum_j r_ij prior_j -
    target_i)`` in pred and ``sum_i (sum_j r_ij D_ij - D_ii) / (n v)`` in v. The prior gets no
    gradient.
    """

    @staticmethod
    def forward(ctx, pred, target, noise_var, prior):
        n, dims = pred.shape
        diff = pred - target
        v = noise_var.to(pred.dtype)
        wanted = any(ctx.needs_input_grad[:3])
        if torch.compiler.is_compiling():  # one block: a loop over the rows would fix n, and recompile for each batch
            blocks = [slice(None)]
        else:
            rows = max(1, _BLOCK_ELEMENTS // (prior.shape[0] * dims))
            blocks = [slice(start, start + rows) for start in range(0, n, rows)]
        lse, pred_direction, weighted = [], [], 0
        if wanted:  # the float64 operands of the pred gradient below
            prior64, pred64 = prior.double(), pred.double()
            diff64 = pred64 - target.double()
        for part in blocks:
            distance = (pred[part, None] - prior[None]).square_().sum(-1)  # [rows, M]
            logits = distance / (-2 * v)
            lse.append(torch.logsumexp(logits, 1))
            if wanted:
                r = torch.exp(logits - lse[-1][:, None])
                # sum_j r_ij (prior_j - pred_i) + pred_i - target_i, in float64 and without using
                # sum_j r_ij = 1: each r_ij's rounding then weighs a difference, as in the published
                # gradient, not a label (float32 here is far less accurate than the published
                # gradient: benchmarks/results/cpu/design-constants.md)
                r64 = r.double()
                pred_direction.append((r64 @ prior64 - pred64[part] * r64.sum(1, keepdim=True) + diff64[part])
                                      .to(pred.dtype))
                weighted = weighted + (r * distance).sum()
        densities = torch.cat(lse) - 0.5 * dims * torch.log(v)
        square_sum = (diff * diff).sum()
        if wanted:
            noise_direction = (weighted - square_sum) / (n * v) if ctx.needs_input_grad[2] else None
            _BalancedMSENode._save(ctx, pred, target, noise_var, diff, torch.cat(pred_direction), noise_direction)
        return _BalancedMSENode._loss(densities, square_sum, v, n, dims)


# -- functional --------------------------------------------------------------------------------
def bmc_loss(pred: torch.Tensor, target: torch.Tensor, noise_var: torch.Tensor | float, *, all_ranks: bool = False,
             process_group: ProcessGroup | None = None) -> torch.Tensor:
    """Batch-based Monte-Carlo Balanced MSE: the batch's targets are the label prior.

    Args:
        pred, target: ``[N]``, ``[N, 1]`` or ``[N, d]`` (targets of d dimensions, with an isotropic
            noise covariance ``noise_var * I``, as the published multi-dimensional form).
        noise_var: the noise variance, a positive number or a one-element tensor (learnable).
        all_ranks: with ``torch.distributed`` running, the prior is the targets of every rank
            (an all-gather; the gradient flows through this rank's predictions only). Off by
            default, as the published code; it helps when per-rank batches are small.
        process_group: the group to gather over (default: the whole world).

    Scalar targets run in :func:`dirfast.ops.mixture_logpdf` (no matrix, O(N * N * ranks)
    work); targets of d > 1 dimensions a block of rows of the ``[N, N * ranks]`` matrix at a
    time. Either way it is for batches of samples, not every pixel of a depth map (use
    :func:`bni_loss` or :func:`gai_loss`).
    """
    validate.prediction_pair("pred", pred, "target", target)
    validate.boolean("all_ranks", all_ranks)
    validate.process_group("process_group", process_group)
    pred_rows, target_rows = _rows("pred", pred), _rows("target", target)
    noise_var = _noise_var(noise_var, pred)
    ops.refuse_unsupported_derivatives("bmc_loss", (pred, target, noise_var), name="dirfast.losses.bmc_loss")
    acc = _acc(pred)
    pred_rows, target_rows = pred_rows.to(acc), target_rows.to(acc)  # float16 would overflow
    prior = target_rows.detach()
    if all_ranks and distributed.is_distributed(process_group):
        prior, _ = distributed.all_gather_rows(prior, process_group)  # this rank's rows among them
    if pred_rows.shape[1] == 1:
        # The published 1-D form, cross-entropy over the [N, M] logits -(pred_i - prior_j)^2 / (2
        # noise_var), without the matrix: its log-sum-exp is a mixture of M equal-weight components
        # at the prior (as BNI's at its bucket centres), and the target gets no gradient.
        means = prior.reshape(-1)
        log_weights = torch.zeros_like(means)
        return _ScalarBalancedMSE.apply(pred_rows, target_rows.detach(), noise_var, means, None, log_weights)
    return _BatchBalancedMSE.apply(pred_rows, target_rows.detach(), noise_var, prior)


def bni_loss(pred: torch.Tensor, target: torch.Tensor, noise_var: torch.Tensor | float, bucket_centers: ArrayLike,
             bucket_weights: ArrayLike) -> torch.Tensor:
    """Bin-based numerical integration Balanced MSE: a label histogram is the prior.

    Args:
        pred, target: scalar predictions and labels of any one shape (a depth map
            ``[B, 1, H, W]`` goes in as it is; every element is a sample).
        noise_var: the noise variance, a positive number or a one-element tensor (learnable).
        bucket_centers, bucket_weights: the histogram, ``[K]`` each (weights need not sum to 1:
            that only shifts the loss by a constant; a weight of 0 drops its bin). Checked on the
            host, as :class:`BNILoss` checks them once; finite centres, non-negative weights.
            Constants: a tensor that requires grad is refused (NotImplementedError).

    The balancing term runs in :func:`dirfast.ops.mixture_logpdf`, without an N x K matrix.
    """
    validate.prediction_pair("pred", pred, "target", target)
    for name, value in (("bucket_centers", bucket_centers), ("bucket_weights", bucket_weights)):
        validate.constant(name, value, "dirfast.losses.bni_loss")
    noise_var = _noise_var(noise_var, pred)
    centers, weights = _histogram(bucket_centers, bucket_weights)
    _check_fits("bucket_centers", _magnitude(centers.to(torch.float64)), _acc(pred))
    return _bni(pred, target, noise_var, centers, weights)


def _bni(pred, target, noise_var, centers, weights) -> torch.Tensor:
    """bni_loss with a checked histogram (computed in the accumulation dtype; the weights' log
    is taken in the wider of theirs and that one, so float64 weights beyond float32's range are
    exact and narrow weights lose nothing)."""
    ops.refuse_unsupported_derivatives("bni_loss", (pred, target, noise_var), name="dirfast.losses.bni_loss")
    acc = _acc(pred)
    log_weights = torch.log(weights.to(pred.device, torch.promote_types(weights.dtype, acc))).to(acc)
    centers = centers.to(pred.device, acc)
    return _ScalarBalancedMSE.apply(pred, target, noise_var, centers, None, log_weights)


def gai_loss(pred: torch.Tensor, target: torch.Tensor, gmm: GaussianMixture | Mapping[str, Any],
             noise_var: torch.Tensor | float) -> torch.Tensor:
    """Gaussian-mixture analytic integration Balanced MSE: a Gaussian mixture is the prior.

    Args:
        pred, target: for a mixture of scalar labels, any one shape (every element a sample);
            for a mixture in d > 1 dimensions, ``[N, d]``.
        gmm: a :class:`dirfast.mixture.GaussianMixture` (:func:`dirfast.mixture.fit_gmm`), or a
            dict with ``means``, ``variances`` and ``weights`` (the published pickle's contents):
            constants, a tensor that requires grad is refused (NotImplementedError).
        noise_var: the noise variance, a positive number or a one-element tensor (learnable).

    Scalar labels use :func:`dirfast.ops.mixture_logpdf` (no N x K matrix); in d dimensions the
    mixture's covariances plus ``noise_var * I`` are factorised once per call.
    """
    validate.prediction_pair("pred", pred, "target", target)
    if isinstance(gmm, Mapping):
        for key, value in gmm.items():
            validate.constant(f"gmm[{key!r}]", value, "dirfast.losses.gai_loss")
    gmm = _mixture(gmm)
    _check_fits("gmm means and variances", _magnitude(gmm.means, gmm.variances), _acc(pred))
    tables = (gmm.means.to(pred.device), gmm.variances.to(pred.device), gmm.weights.to(pred.device))
    return _gai(pred, target, *tables, _noise_var(noise_var, pred))


def _gai(pred, target, means, covariances, weights, noise_var) -> torch.Tensor:
    """gai_loss with the mixture as tensors on pred's device: means [K, d], covariances [K, d, d]
    (computed in the accumulation dtype)."""
    ops.refuse_unsupported_derivatives("gai_loss", (pred, target, noise_var), name="dirfast.losses.gai_loss")
    acc = _acc(pred)
    pred, target = pred.to(acc), target.to(acc)
    log_weights = torch.log(weights).to(acc)
    d = means.shape[1]
    if d == 1:
        return _ScalarBalancedMSE.apply(pred, target, noise_var, means.reshape(-1).to(acc),
                                        covariances.reshape(-1).to(acc), log_weights)
    if pred.dim() != 2 or pred.shape[1] != d:
        raise ValueError(f"pred must be [N, {d}] for a mixture in {d} dimensions, got shape {tuple(pred.shape)}")
    return _MixtureBalancedMSE.apply(pred, target, noise_var, means.to(acc), covariances.to(acc), log_weights)


# -- modules -----------------------------------------------------------------------------------
class _BalancedMSE(CheckedLoad):
    """A learnable noise scale ``noise_sigma`` (a 0-dim float32 parameter, as published)."""

    # A Parameter, or the parametrized value (a tensor) when a parametrization is registered on it.
    noise_sigma: torch.Tensor
    _initial_prior: dict[str, torch.Tensor]  # buffer name -> its value as built

    def __init__(self, init_noise_sigma: float, learn_noise: bool) -> None:
        super().__init__()
        init_noise_sigma = _noise_sigma("init_noise_sigma", init_noise_sigma, torch.float32)
        learn_noise = validate.boolean("learn_noise", learn_noise)
        self.noise_sigma = torch.nn.Parameter(torch.tensor(init_noise_sigma), requires_grad=learn_noise)
        # What reset_parameters restores: the initial noise scale, and the prior as built (CPU
        # float64 copies, by buffer name; the subclasses register their buffers with _prior).
        self._initial_noise_sigma, self._initial_prior = init_noise_sigma, {}

    def _prior(self, name: str, value: torch.Tensor) -> None:
        """Register ``value`` (CPU float64) as the buffer ``name`` of the prior, and keep a copy."""
        self.register_buffer(name, value)
        self._initial_prior[name] = value.clone()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``noise_sigma`` back to ``init_noise_sigma`` and the prior to the one the loss was built
        with. torch's name for initialising a module's state: FSDP calls it on a module it
        materialises from the meta device, as do init loops over ``model.modules()``."""
        if parametrize.is_parametrized(self, "noise_sigma"):  # set through its parametrization's inverse
            self.noise_sigma = torch.full_like(self.noise_sigma, self._initial_noise_sigma)
        else:
            self.noise_sigma.fill_(self._initial_noise_sigma)
        for name, value in self._initial_prior.items():
            getattr(self, name).copy_(value)
        self._loaded(self._initial_prior)

    @property
    def noise_var(self) -> torch.Tensor:
        return self.noise_sigma ** 2

    def extra_repr(self) -> str:
        return f"noise_sigma={float(self.noise_sigma.detach()):.4g}, learn_noise={self.noise_sigma.requires_grad}"

    def _apply(self, fn, recurse=True):
        """Moves apply to the prior's buffers (BNI's histogram, GAI's mixture), dtype casts do not
        (``.half()`` would flush small histogram weights to 0, a -inf loss, and round the centres):
        they stay float64, as FDS's statistics keep their dtype, and the loss is computed in the
        predictions' accumulation dtype whatever theirs. ``noise_sigma`` follows both."""
        buffers, move = {id(t) for t in self._buffers.values() if t is not None}, move_only(fn)
        return super()._apply(lambda t: move(t) if id(t) in buffers else fn(t), recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Every entry is checked, values too, before any is copied: a failed load changes nothing.
        Missing keys go to ``missing_keys`` (nn.Module raises for them only with ``strict=True``),
        and then nothing is loaded: the loss's entries go together."""
        current = {name: value for name, value in {**self._parameters, **self._buffers}.items() if value is not None}
        errors = validate.checkpoint_errors(state_dict, prefix, current, False, type(self).__name__)
        missing = [prefix + name for name in current if prefix + name not in state_dict]
        if not errors and not missing:
            values = {name: state_dict[prefix + name].detach().cpu().double() for name in current}
            errors = self._value_errors(values, prefix)
        if not errors and not missing and not local_metadata.get("assign_to_params_buffers", False) and not (
                torch.compiler.is_compiling() or torch.is_inference_mode_enabled()):
            # copied in place: torch would copy some entries, then refuse the others
            errors = [f"{prefix}{name}: this loss's {name} was made under torch.inference_mode, which torch forbids "
                      "updating outside it: build the loss outside inference mode and load into that one (or load "
                      "with assign=True)." for name, value in current.items() if value.is_inference()][:1]
        if errors:
            error_msgs.extend(errors)
            return
        if missing:  # load none of this module's entries; report unexpected keys as nn.Module does
            own = {prefix + name for name in current}
            others = {key: value for key, value in state_dict.items() if key not in own}
            super()._load_from_state_dict(others, prefix, local_metadata, strict, [], unexpected_keys, error_msgs)
            missing_keys.extend(missing)
            return
        failed = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == failed:
            self._loaded(values)

    def _loaded(self, values: dict) -> None:
        """Called after a load with the loaded values (float64 CPU copies, by name)."""

    def _value_errors(self, values: dict, prefix: str) -> list:
        """What is wrong with the values a load would give (float64 CPU copies, by name). A
        parametrized noise_sigma (torch.nn.utils.parametrize) is its parametrization's to load."""
        if "noise_sigma" not in values:
            return []
        try:
            _noise_sigma(prefix + "noise_sigma", float(values["noise_sigma"]), self.noise_sigma.dtype)
        except ValueError as exc:
            return [str(exc)]
        return []


class BMCLoss(distributed.SharesProcessGroup, _BalancedMSE):
    """:func:`bmc_loss` with a learnable noise scale. The published training gives
    ``noise_sigma`` its own learning rate: ``optimizer.add_param_group({"params":
    [criterion.noise_sigma], "lr": 1e-2})``; ``learn_noise=False`` keeps it fixed."""

    def __init__(self, init_noise_sigma: float = 1.0, *, learn_noise: bool = True, all_ranks: bool = False,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__(init_noise_sigma, learn_noise)
        validate.boolean("all_ranks", all_ranks)
        validate.process_group("process_group", process_group)
        self.all_ranks, self.process_group = all_ranks, process_group

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bmc_loss(pred, target, self.noise_var, all_ranks=self.all_ranks, process_group=self.process_group)


class BNILoss(_BalancedMSE):
    """:func:`bni_loss` with a learnable noise scale; the histogram is kept as buffers (they move
    with ``.to(device)``). :meth:`from_lds` takes it from a fitted :class:`~dirfast.LDS`."""

    # The buffers __init__ registers (with _prior), declared for type checkers.
    bucket_centers: torch.Tensor
    bucket_weights: torch.Tensor

    def __init__(self, init_noise_sigma: float, bucket_centers: ArrayLike, bucket_weights: ArrayLike, *,
                 learn_noise: bool = True) -> None:
        centers, weights = (t.to("cpu", torch.float64, copy=True) for t in _histogram(bucket_centers, bucket_weights))
        super().__init__(init_noise_sigma, learn_noise)
        self._prior("bucket_centers", centers)
        self._prior("bucket_weights", weights)
        self._loaded({"bucket_centers": centers})

    @classmethod
    def from_lds(cls, lds: LDS, init_noise_sigma: float = 1.0, *, smoothed: bool = False,
                 learn_noise: bool = True) -> "BNILoss":
        """The prior of a fitted LDS, as the published ``get_bucket_info``: its label counts
        (the published default), or with ``smoothed=True`` its effective distribution (with
        ``reweight="inverse", inverse_clip=None``, the truncated smoothed counts of the published
        ``--lds``; the presets' LDS clip or take square roots), normalised, without empty bins.
        The published IMDB-WIKI-DIR script counts ages 0 to 199 (``max_target=200``, older ones
        left out): fit the LDS over ``Binning.integer(200)`` for its prior (``Binning.integer(121)``
        merges ages from 120 on into one bin).

        The centres are the bins' integers for ``Binning.integer(n)`` (ages, as the IMDB-WIKI-DIR
        code) and the bin midpoints otherwise (0.05, 0.15, ... for NYUD2-DIR depths). Bins below
        the LDS's ``bucket_start`` get the first smoothed bin's weight, as the NYUD2-DIR code."""
        if not isinstance(lds, LDS):
            raise TypeError(f"lds must be a dirfast.LDS, got {type(lds).__name__}")
        validate.boolean("smoothed", smoothed)
        if isinstance(lds.binning, GridBinning):
            raise ValueError("lds must be over a Binning: BNI's histogram has one dimension, and this LDS is over a "
                             "GridBinning (GAILoss.from_labels fits a prior in several dimensions)")
        if lds._fit is None:
            raise RuntimeError("BNILoss.from_lds needs a fitted LDS: call lds.fit(train_labels) first")
        binning = lds.binning
        unit = binning.is_integer and np.array_equal(binning.edges, np.arange(binning.num_bins + 1))
        centers = torch.as_tensor(binning.edges[:-1] if unit else binning.centers, device="cpu")  # as the LDS's counts
        weights = lds.effective if smoothed else lds.empirical
        weights = torch.cat([weights[:1].expand(lds.bucket_start), weights])
        keep = weights > 0
        if not bool(keep.any()):
            raise ValueError("the LDS distribution is 0 in every bin")
        return cls(init_noise_sigma, centers[keep], weights[keep] / weights[keep].sum(), learn_noise=learn_noise)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        validate.prediction_pair("pred", pred, "target", target)
        _check_fits("bucket_centers", self._largest, _acc(pred))
        return _bni(pred, target, _noise_var(self.noise_var, pred), self.bucket_centers, self.bucket_weights)

    def extra_repr(self) -> str:
        return f"{self.bucket_centers.numel()} buckets, " + super().extra_repr()

    def _value_errors(self, values: dict, prefix: str) -> list:
        try:
            _histogram(values["bucket_centers"], values["bucket_weights"])
        except ValueError as exc:
            return [f"{prefix}{exc}"]
        return super()._value_errors(values, prefix)

    def _loaded(self, values: dict) -> None:
        self._largest = _magnitude(values["bucket_centers"])  # read once here, not in forward


class GAILoss(_BalancedMSE):
    """:func:`gai_loss` with a learnable noise scale. ``gmm`` is a
    :class:`~dirfast.mixture.GaussianMixture` or the published pickle's dict (load it with
    ``joblib.load``); :meth:`from_labels` fits one from the training labels."""

    # The buffers __init__ registers (with _prior), declared for type checkers.
    gmm_means: torch.Tensor
    gmm_variances: torch.Tensor
    gmm_weights: torch.Tensor

    def __init__(self, init_noise_sigma: float, gmm: GaussianMixture | Mapping[str, Any], *,
                 learn_noise: bool = True) -> None:
        super().__init__(init_noise_sigma, learn_noise)
        gmm = _mixture(gmm)
        self._prior("gmm_means", gmm.means.clone())
        self._prior("gmm_variances", gmm.variances.clone())
        self._prior("gmm_weights", gmm.weights.clone())
        self._loaded({"gmm_means": gmm.means, "gmm_variances": gmm.variances})

    @property
    def gmm(self) -> GaussianMixture:
        """The mixture (a CPU float64 copy of the buffers)."""
        return GaussianMixture(self.gmm_means, self.gmm_variances, self.gmm_weights)

    @classmethod
    def from_labels(cls, labels: ArrayLike, num_components: int = 8, init_noise_sigma: float = 1.0, *,
                    learn_noise: bool = True, **fit_options: Any) -> "GAILoss":
        """Fit the mixture with :func:`dirfast.mixture.fit_gmm` (K = 8 as the published age code)."""
        return cls(init_noise_sigma, fit_gmm(labels, num_components, **fit_options), learn_noise=learn_noise)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        validate.prediction_pair("pred", pred, "target", target)
        noise_var = _noise_var(self.noise_var, pred)
        _check_fits("gmm means and variances", self._largest, _acc(pred))
        return _gai(pred, target, self.gmm_means, self.gmm_variances, self.gmm_weights, noise_var)

    def extra_repr(self) -> str:
        return f"{self.gmm_weights.numel()} components in {self.gmm_means.shape[1]} dimensions, " + super().extra_repr()

    def _value_errors(self, values: dict, prefix: str) -> list:
        try:
            GaussianMixture(values["gmm_means"], values["gmm_variances"], values["gmm_weights"])
        except ValueError as exc:
            return [f"{prefix}gmm_*: {exc}"]
        return super()._value_errors(values, prefix)

    def _loaded(self, values: dict) -> None:
        self._largest = _magnitude(values["gmm_means"], values["gmm_variances"])  # read once, not in forward
