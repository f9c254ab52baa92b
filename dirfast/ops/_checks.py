"""Argument checks shared by the ops: each error names the argument at fault.

They look only at shapes, dtypes and devices, never at values, so they cost no host
synchronisation and run unchanged under ``torch.compile``.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def features_and_bins(x, bin_idx) -> int:
    """Check ``x`` ([N, D] or [B, C, *spatial]) against ``bin_idx``; return D."""
    floating("x", x)
    tensor("bin_idx", bin_idx)
    if x.dim() < 2:
        raise ValueError(f"x must be [N, D] or [B, C, *spatial], got shape {tuple(x.shape)}")
    if bin_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"bin_idx must be int64 or int32, got {bin_idx.dtype}")
    expected = (x.shape[0],) + tuple(x.shape[2:])
    if tuple(bin_idx.shape) != expected:
        raise ValueError(
            f"bin_idx must have shape {expected} to match x of shape {tuple(x.shape)} "
            f"(one index per row, features along dim 1), got {tuple(bin_idx.shape)}"
        )
    if bin_idx.device != x.device:
        raise ValueError(f"bin_idx is on {bin_idx.device} but x is on {x.device}")
    return x.shape[1]


def num_bins(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"num_bins must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"num_bins must be at least 1, got {value}")
    return value


def bin_table(name: str, value, shape, device) -> torch.Tensor:
    floating(name, value)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}")
    return value
