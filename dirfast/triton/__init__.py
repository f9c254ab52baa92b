"""Triton kernels of the dirfast ops (imported lazily; Triton is optional).

Importing this package never fails. When Triton imports, it registers the ``torch.library``
custom ops ``dirfast::triton_bin_stats``, ``triton_smooth_bins``, ``triton_calibrate`` and
``triton_calibrate_`` with the signatures, fakes and autograd of the ``dirfast::`` ops
(:mod:`dirfast.contract`). They run on CUDA tensors, or on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), and never synchronise with
the host, so a training step that calls them can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

MIN_TRITON = "3.6"

_IMPORT_REASON = ""  # why the kernels could not be registered ("" when they were)


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = ""
        for ch in piece:  # leading digits only: "0rc1" -> 0
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # a pre-release tag ends the number
            break
    return tuple(parts)


def _version_ok(version: str) -> bool:
    try:
        from packaging.version import Version

        return Version(version) >= Version(MIN_TRITON)
    except ImportError:
        return _version_tuple(version) >= _version_tuple(MIN_TRITON)
    except Exception:  # an unparseable version: fall back to the plain tuple
        return _version_tuple(version) >= _version_tuple(MIN_TRITON)


def _triton_reason() -> str:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken installation
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "0")
    if not _version_ok(version):
        return f"triton {version} is too old: dirfast needs triton >= {MIN_TRITON}"
    return ""


def _register() -> None:
    """Import the kernel modules, which define the ``dirfast::triton_<op>`` custom ops."""
    reason = _triton_reason()
    if reason:
        raise RuntimeError(reason)
    from . import bin_stats, calibrate, mixture_logpdf, smooth_bins  # noqa: F401


try:
    _register()
except Exception as _exc:  # noqa: BLE001 - dirfast must import whatever Triton does
    _IMPORT_REASON = str(_exc) if isinstance(_exc, RuntimeError) else (
        f"the Triton kernels failed to load ({type(_exc).__name__}: {_exc})")


def unavailable_reason() -> str:
    """Why the Triton backend cannot run here ("" when it can)."""
    if _IMPORT_REASON:
        return _IMPORT_REASON
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        return f"torch.cuda is not usable ({type(exc).__name__}: {exc})"
    if not has_gpu and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"
    return ""
