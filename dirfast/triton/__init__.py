"""Triton kernels of the dirfast ops, one module per op (imported on first use; Triton is
optional).

Each module's launch functions are the ops' Triton entries (``dirfast.ops.<op>``): the CUDA
kernels of the ops where no compiled CUDA kernel is built, and the ``"triton"`` backend. They
run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before Triton is imported), and never synchronise with the host, so a training step that calls
them can be captured in a CUDA graph.
"""

from __future__ import annotations

MIN_TRITON = "3.6"


def unavailable_reason() -> str:
    """Why the Triton kernels cannot run here ("" when they can)."""
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken installation
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    import torch
    from torch.torch_version import TorchVersion

    version = getattr(triton, "__version__", "0")
    if TorchVersion(version) < MIN_TRITON:
        return f"triton {version} is too old: dirfast needs triton >= {MIN_TRITON}"
    try:
        from . import (_common, bin_stats, calibrate, conr_loss, mixture_logpdf, ranksim_loss,  # noqa: F401
                       rnc_loss, smooth_bins)
    except Exception as exc:  # noqa: BLE001 - dirfast must import whatever Triton does
        return f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available() and not _common.INTERPRET:
        return "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"
    return ""
