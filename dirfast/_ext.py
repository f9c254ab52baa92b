"""Loading of the compiled kernels, which may be absent or unusable here.

``dirfast._C`` (CPU) and ``dirfast._C_cuda`` (CUDA) are built on torch's stable ABI for torch
>= 2.10. dirfast imports on any machine: whatever keeps a module from loading (not built, an
older torch, a torch without CUDA, a CUDA runtime that does not match) is kept as a reason for
:func:`dirfast.backends` instead of being raised.
"""

from __future__ import annotations

import importlib

import torch

MIN_TORCH = "2.10"

CPU = CUDA = None  # the loaded modules
CPU_REASON = CUDA_REASON = "not loaded yet"


def _import(name: str):
    """(module, "") or (None, why not)."""
    if torch.__version__ < MIN_TORCH:
        return None, f"dirfast's compiled kernels need torch >= {MIN_TORCH}, found {torch.__version__}"
    try:
        return importlib.import_module(f"{__package__}.{name}"), ""
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.{name}":
            return None, f"dirfast.{name} failed to import ({exc})"
        return None, f"dirfast.{name} is not built"
    except (ImportError, OSError) as exc:  # e.g. a CUDA runtime library that is not there
        return None, f"dirfast.{name} failed to load ({exc})"


def load() -> None:
    """Load the compiled kernels (once): they register for the ops dirfast.ops has defined."""
    global CPU, CPU_REASON, CUDA, CUDA_REASON
    if CPU_REASON != "not loaded yet":
        return
    CPU, CPU_REASON = _import("_C")
    if CPU is None and CPU_REASON.endswith("is not built"):
        CPU_REASON += (" (installed with DIRFAST_NO_EXT=1, or a source checkout not built yet): reinstall dirfast, or "
                       "run python setup.py build_ext --inplace in the checkout")
    if torch.version.cuda is None:
        CUDA, CUDA_REASON = None, "the installed torch has no CUDA"
    else:
        CUDA, CUDA_REASON = _import("_C_cuda")
        if CUDA is None and CUDA_REASON.endswith("is not built"):
            CUDA_REASON += (" (installed without nvcc, or without a GPU build; FORCE_CUDA=1 builds it): the Triton "
                            "kernels run on the GPU")
