"""``dirfast::mixture_logpdf``: the log density of a 1-D Gaussian mixture at every element of a
tensor, without an [N, K] matrix (Balanced MSE's BNI and GAI terms on dense predictions)."""

from __future__ import annotations

import torch

from . import _checks, _dispatch

OP = "mixture_logpdf"


def mixture_logpdf(x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                   log_weights: torch.Tensor) -> torch.Tensor:
    """``log sum_k exp(log_weights[k]) N(x; means[k], variances[k]) + log(2 pi) / 2`` for every
    element of ``x``.

    Args:
        x: predictions of any shape (a depth map ``[B, 1, H, W]`` goes in as it is).
        means, variances, log_weights: the K components, 1-D tensors of one length on the
            device of ``x`` (variances positive; a weight of 0 is a log-weight of -inf).

    Returns:
        A tensor shaped like ``x``, float32 (float64 when an input is float64), differentiable
        in all four inputs. The log-sum-exp runs element by element over the K components, so
        memory is O(N + K) forward and backward; values are not checked (no host sync).
    """
    _checks.floating("x", x)
    _checks.tensor("means", means)
    if means.dim() != 1 or means.shape[0] == 0:
        raise ValueError(f"means must be 1-D with at least one component, got shape {tuple(means.shape)}")
    for name, value in (("means", means), ("variances", variances), ("log_weights", log_weights)):
        _checks.bin_table(name, value, means.shape, x.device)
    return _dispatch.kernel(OP, x.device)(x, means, variances, log_weights)
