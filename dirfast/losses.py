"""Weighted regression losses of the published DIR code (element loss x weight, then the mean)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["weighted_mse_loss", "weighted_l1_loss", "weighted_focal_mse_loss",
           "weighted_focal_l1_loss", "weighted_huber_loss"]


def _reduce(loss: torch.Tensor, weights) -> torch.Tensor:
    if weights is not None:
        loss = loss * weights.expand_as(loss)
    return torch.mean(loss)


def _focal(diff: torch.Tensor, activate: str, beta: float, gamma: float) -> torch.Tensor:
    if activate == "tanh":
        return torch.tanh(beta * torch.abs(diff)) ** gamma
    if activate == "sigmoid":
        return (2 * torch.sigmoid(beta * torch.abs(diff)) - 1) ** gamma
    raise ValueError(f"activate must be 'sigmoid' or 'tanh', got {activate!r}")


def weighted_mse_loss(inputs, targets, weights=None):
    """Mean of ``weights * (inputs - targets) ** 2`` (weights broadcast to the loss)."""
    return _reduce((inputs - targets) ** 2, weights)


def weighted_l1_loss(inputs, targets, weights=None):
    """Mean of ``weights * |inputs - targets|``."""
    return _reduce(F.l1_loss(inputs, targets, reduction="none"), weights)


def weighted_focal_mse_loss(inputs, targets, weights=None, activate="sigmoid", beta=0.2, gamma=1):
    """Focal MSE: the squared error times ``(2 sigmoid(beta |d|) - 1) ** gamma`` (or
    ``tanh(beta |d|) ** gamma`` with ``activate="tanh"``), weighted, then the mean."""
    diff = inputs - targets
    return _reduce(diff ** 2 * _focal(diff, activate, beta, gamma), weights)


def weighted_focal_l1_loss(inputs, targets, weights=None, activate="sigmoid", beta=0.2, gamma=1):
    """Focal L1: the absolute error times the focal factor of :func:`weighted_focal_mse_loss`."""
    diff = inputs - targets
    return _reduce(F.l1_loss(inputs, targets, reduction="none") * _focal(diff, activate, beta, gamma), weights)


def weighted_huber_loss(inputs, targets, weights=None, beta=1.0):
    """Huber: ``0.5 d**2 / beta`` where ``d = |inputs - targets| < beta``, else ``d - 0.5 beta``."""
    l1 = torch.abs(inputs - targets)
    loss = torch.where(l1 < beta, 0.5 * l1 ** 2 / beta, l1 - 0.5 * beta)
    return _reduce(loss, weights)
