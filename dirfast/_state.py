"""Statistics a module holds in their own precision: moved with the module, never cast."""

from __future__ import annotations

import torch


def move_only(fn):
    """``fn`` (what ``nn.Module._apply`` passes for ``.to()``, ``.cuda()``, ``.half()``, ...) as it
    applies to such statistics: a move moves them, a dtype cast leaves their dtype (``.half()``
    would turn float64 counters or histogram weights into float16 ones)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        return fn(t) if target.dtype == t.dtype else t.to(device=target.device)

    return move
