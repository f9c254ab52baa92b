"""Per-bin moments: unbiased variances and sums of squared deviations (M2) of bin counts."""

from __future__ import annotations

import torch


def m2_from_var(count: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-bin sums of squared deviations ``M2`` from the unbiased ``var`` of ``count`` rows."""
    return var * (count.to(var.dtype) - 1).clamp(min=0).unsqueeze(1)


def var_from_m2(count: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """The unbiased variance ``M2 / (n - 1)`` of each bin, 0 where it holds fewer than two rows."""
    n = count.to(m2.dtype).unsqueeze(1)
    return torch.where(n > 1, m2 / (n - 1).clamp(min=1), torch.zeros_like(m2))
