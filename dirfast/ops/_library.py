"""The ``dirfast`` op namespace: schemas, and the reference as the kernel of last resort.

When ``dirfast._C`` is loaded its ``TORCH_LIBRARY(dirfast, ...)`` block has already defined
the schemas (generated from :mod:`dirfast._schema`); otherwise they are defined here from
the same strings. The pure-PyTorch reference is registered as the op's
``CompositeExplicitAutograd`` kernel: a kernel registered for a device key (the C++ CPU kernels,
the CUDA kernels) takes precedence over it, and any device without one still works.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._schema import NAMESPACE, SCHEMAS

LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")

if _ext.EXTENSION is None:
    for _schema in SCHEMAS.values():
        LIBRARY.define(_schema)


def qualname(op: str) -> str:
    return f"{NAMESPACE}::{op}"


def op_overload(op: str):
    """The ``torch.ops.dirfast.<op>.default`` overload."""
    return getattr(getattr(torch.ops, NAMESPACE), op).default


def has_device_kernel(op: str, dispatch_key: str) -> bool:
    """Whether a kernel is registered for ``dispatch_key`` itself (not only the composite)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), dispatch_key)


def register_fallback(op: str, fn) -> None:
    """Register ``fn`` (the reference) for every device without a kernel of its own."""
    LIBRARY.impl(op, fn, "CompositeExplicitAutograd")
