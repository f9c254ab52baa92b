"""Triton kernels of the dirfast ops (imported lazily; Triton is optional)."""

from __future__ import annotations


def unavailable_reason() -> str:
    """Why the Triton backend cannot run here ("" when it can)."""
    return "the Triton kernels are not part of this build yet"
