"""What dirfast's modules share about their state: statistics held in their own precision
(moved with the module, never cast), and a strict load that refuses before it copies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys  # what nn.Module.load_state_dict returns


def move_only(fn):
    """``fn`` (what ``nn.Module._apply`` passes for ``.to()``, ``.cuda()``, ``.half()``, ...) as it
    applies to such statistics: a move moves them, a dtype cast leaves their dtype (``.half()``
    would turn float64 counters or histogram weights into float16 ones)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        return fn(t) if target.dtype == t.dtype else t.to(device=target.device)

    return move


class CheckedLoad(nn.Module):
    """A module whose strict ``load_state_dict`` refuses keys it does not have before copying any
    entry: ``nn.Module`` copies every entry, then raises for them, and a failed load would have
    changed the module. Each module checks its own entries (keys, shapes, values) in its
    ``_load_from_state_dict``."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        """``nn.Module.load_state_dict``, with every entry checked before any is copied."""
        if strict and isinstance(state_dict, Mapping):
            own = self.state_dict(keep_vars=True)
            unexpected = ", ".join(f'"{key}"' for key in state_dict if key not in own)
            if unexpected:  # in nn.Module's words
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\tUnexpected "
                                   f"key(s) in state_dict: {unexpected}. ")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
