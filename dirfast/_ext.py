"""Loading of the compiled extension ``dirfast._C``, which may be absent.

dirfast must import on any machine: without a compiler, with ``DIRFAST_NO_EXT=1``, or with an
extension built against another torch. Whatever goes wrong here is kept as a reason string for
:func:`dirfast.backends` instead of being raised.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["EXTENSION", "EXTENSION_REASON", "cuda_compiled"]


def _load():
    if os.environ.get("DIRFAST_NO_EXT", "0") not in ("", "0"):
        return None, "the compiled extension is disabled by DIRFAST_NO_EXT"
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, "dirfast._C is not built (no compiler at install time, or DIRFAST_NO_EXT=1 then)"
    try:
        from . import _C  # registers the dirfast:: schemas and compiled kernels
    except ImportError as exc:
        return None, f"dirfast._C failed to import ({exc}); rebuild dirfast"
    except Exception as exc:  # e.g. an undefined symbol: built against another torch
        return None, f"dirfast._C failed to load ({type(exc).__name__}: {exc}); rebuild dirfast"
    return _C, ""


EXTENSION, EXTENSION_REASON = _load()


def cuda_compiled() -> bool:
    """Whether CUDA C++ kernels were compiled into the extension."""
    return bool(getattr(EXTENSION, "cuda_compiled", False))
