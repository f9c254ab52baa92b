"""Regression losses for imbalanced targets: the weighted losses of the published DIR code
(element loss x weight, then the mean), Balanced MSE (:mod:`dirfast.balanced_mse`) and the
pairwise regularisers Rank-N-Contrast, ConR and RankSim (:mod:`dirfast.pairwise`).

Unlike the published functions, predictions and targets must have the same shape: ``[N, 1]``
predictions against ``[N]`` targets would broadcast to ``[N, N]`` and average the wrong thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate as validate
from .balanced_mse import BMCLoss, BNILoss, GAILoss, bmc_loss, bni_loss, gai_loss
from .pairwise import ConRLoss, RankSimLoss, RnCLoss, conr_loss, ranksim_loss, rnc_loss

__all__ = ["weighted_mse_loss", "weighted_l1_loss", "weighted_focal_mse_loss",
           "weighted_focal_l1_loss", "weighted_huber_loss",
           "bmc_loss", "bni_loss", "gai_loss", "BMCLoss", "BNILoss", "GAILoss",
           "rnc_loss", "conr_loss", "ranksim_loss", "RnCLoss", "ConRLoss", "RankSimLoss"]


def _reduce(loss: torch.Tensor, weights) -> torch.Tensor:
    if weights is not None:
        loss = loss * validate.weights_for("weights", weights, loss)
    return torch.mean(loss)


def _focal(diff: torch.Tensor, activate: str, beta: float, gamma: float) -> torch.Tensor:
    beta, gamma = validate.positive("beta", beta), validate.real("gamma", gamma, 0.0)
    validate.choice("activate", activate, ("sigmoid", "tanh"))
    scaled = beta * torch.abs(diff)
    base = torch.tanh(scaled) if activate == "tanh" else 2 * torch.sigmoid(scaled) - 1
    if 0 < gamma < 1:
        # base ** gamma has an infinite slope at base 0 (an exact prediction), and autograd's
        # inf * 0 there is NaN; the loss's gradient is 0 there. Same values, a finite slope.
        zero = base == 0
        return torch.where(zero, 0.0, torch.where(zero, 1.0, base) ** gamma)
    return base ** gamma


def weighted_mse_loss(inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``weights * (inputs - targets) ** 2`` (weights broadcast to the loss)."""
    validate.prediction_pair("inputs", inputs, "targets", targets)
    return _reduce((inputs - targets) ** 2, weights)


def weighted_l1_loss(inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``weights * |inputs - targets|``."""
    validate.prediction_pair("inputs", inputs, "targets", targets)
    return _reduce(F.l1_loss(inputs, targets, reduction="none"), weights)


def weighted_focal_mse_loss(inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                            activate: str = "sigmoid", beta: float = 0.2, gamma: float = 1) -> torch.Tensor:
    """Focal MSE: the squared error times ``(2 sigmoid(beta |d|) - 1) ** gamma`` (or
    ``tanh(beta |d|) ** gamma`` with ``activate="tanh"``), weighted, then the mean.
    ``beta > 0`` and ``gamma >= 0``."""
    validate.prediction_pair("inputs", inputs, "targets", targets)
    diff = inputs - targets
    return _reduce(diff ** 2 * _focal(diff, activate, beta, gamma), weights)


def weighted_focal_l1_loss(inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                           activate: str = "sigmoid", beta: float = 0.2, gamma: float = 1) -> torch.Tensor:
    """Focal L1: the absolute error times the focal factor of :func:`weighted_focal_mse_loss`."""
    validate.prediction_pair("inputs", inputs, "targets", targets)
    diff = inputs - targets
    return _reduce(F.l1_loss(inputs, targets, reduction="none") * _focal(diff, activate, beta, gamma), weights)


def weighted_huber_loss(inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                        beta: float = 1.0) -> torch.Tensor:
    """Huber: ``0.5 d**2 / beta`` where ``d = |inputs - targets| < beta``, else ``d - 0.5 beta``.

    ``beta=0`` (or a ``beta`` that rounds to 0 in the inputs' dtype) is the L1 loss (as
    ``torch.nn.functional.smooth_l1_loss``; the published formula would divide by zero in the
    backward pass); a negative ``beta`` raises ValueError.
    """
    validate.prediction_pair("inputs", inputs, "targets", targets)
    beta = validate.real("beta", beta, 0.0)
    l1 = torch.abs(inputs - targets)
    info = torch.finfo(l1.dtype)
    if beta <= info.tiny * info.eps / 2:  # 0 in the loss's dtype (half its smallest subnormal): 0/0 gradients
        return _reduce(l1, weights)
    loss = torch.where(l1 < beta, 0.5 * l1 ** 2 / beta, l1 - 0.5 * beta)
    return _reduce(loss, weights)
