"""The one place that picks a backend for an op call.

Backends:

* ``"reference"`` -- :mod:`dirfast.reference`, pure PyTorch, called directly; runs anywhere.
* ``"cpp"`` -- the C++ CPU kernels registered for the ``CPU`` key of the ``dirfast::`` ops.
* ``"cuda"`` -- the CUDA C++ kernels registered for the ``CUDA`` key of the same ops.
* ``"triton"`` -- the ``dirfast::triton_<op>`` ops of :mod:`dirfast.triton` (CUDA tensors, or
  any tensor under ``TRITON_INTERPRET=1``), imported on first use.
* ``"auto"`` (the default) -- per device: on CPU the C++ kernels when built, on CUDA whichever
  of CUDA C++ and Triton :data:`CUDA_PREFERENCE` lists first among the available ones; else
  the ``dirfast::`` op itself, whose composite kernel is the reference.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from .. import _ext, reference
from ..contract import has_device_kernel, op_overload

BACKENDS = ("reference", "cpp", "triton", "cuda")
OPS = ("bin_stats", "smooth_bins", "calibrate", "calibrate_", "mixture_logpdf", "mixture_logpdf_backward")
# The CUDA C++ kernels cover the FDS ops; on a GPU mixture_logpdf runs on Triton (a CUDA C++
# kernel is worth adding only if measured faster).
CUDA_OPS = ("bin_stats", "smooth_bins", "calibrate", "calibrate_")

# On a CUDA tensor, "auto" takes, per op, the first available backend of its list: the faster
# one as measured by benchmarks/gpu_check.sh on the GPU below (benchmarks/results/h200/).
CUDA_PREFERENCE_MEASURED_ON = "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0 (2026-11-27)"
CUDA_PREFERENCE = {
    "bin_stats": ("cuda", "triton"),
    "smooth_bins": ("cuda", "triton"),
    "calibrate": ("cuda", "triton"),
    "calibrate_": ("cuda", "triton"),
    "mixture_logpdf": ("triton",),  # its only GPU kernel (the reference builds [N, K] per chunk)
}

# The selection belongs to the current thread: a use_backend() block in one thread never changes
# the ops of another, and new threads start at "auto". (A threading.local, which torch.compile
# traces and guards on, where it cannot trace a ContextVar.)
_selection = threading.local()


def _selected() -> str:
    return getattr(_selection, "name", "auto")


def _triton_reason() -> str:
    """Why the Triton backend cannot run here ("" when it can)."""
    from .. import triton as dirfast_triton  # lazy: Triton is optional

    return dirfast_triton.unavailable_reason()


def _cpp_reason() -> str:
    if _ext.EXTENSION is None:
        return _ext.EXTENSION_REASON
    missing = [op for op in OPS if not has_device_kernel(op, "CPU")]
    if missing:
        return f"dirfast._C has no C++ CPU kernel for {', '.join(missing)}"
    return ""


def _cuda_reason() -> str:
    if _ext.EXTENSION is None:
        return _ext.EXTENSION_REASON
    if not _ext.cuda_compiled():
        return ("dirfast._C was built without CUDA kernels (a torch without CUDA, or no nvcc, at build time; "
                "FORCE_CUDA=1 builds them)")
    missing = [op for op in CUDA_OPS if not has_device_kernel(op, "CUDA")]
    if missing:
        return f"dirfast._C has no CUDA kernel for {', '.join(missing)}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return ""


_REASONS: dict = {}  # availability cannot change within a process: work it out once


def _reason(name: str) -> str:
    """Why backend ``name`` cannot run here ("" when it can)."""
    if name not in _REASONS:
        finders = {"reference": lambda: "", "cpp": _cpp_reason, "cuda": _cuda_reason}
        _REASONS[name] = finders.get(name, _triton_reason)()
    return _REASONS[name]


def backends() -> dict:
    """What each backend can do on this machine.

    Returns a dict from backend name (``"reference"``, ``"cpp"``, ``"triton"``, ``"cuda"``) to a
    dict with ``available`` (usable now), ``reason`` (why not, ``""`` when available) and ``ops``
    (the ``dirfast.ops`` it has kernels for); the ``"cuda"`` entry also has ``compiled`` (CUDA
    kernels were built into the extension).
    """
    report = {}
    for name in BACKENDS:
        reason = _reason(name)
        ops = CUDA_OPS if name == "cuda" else tuple(op for op in OPS if not op.endswith("_backward"))
        report[name] = {"available": not reason, "reason": reason, "ops": ops}
    report["cuda"]["compiled"] = _ext.cuda_compiled()
    return report


def _check_name(name) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    if name != "auto":
        reason = _reason(name)
        if reason:
            raise RuntimeError(f"dirfast backend {name!r} is not available: {reason}")
    return name


def set_backend(name: str) -> None:
    """Select the backend of the dirfast ops called from now on in this thread (``"auto"`` by
    default, and in every new thread).

    Raises ValueError for an unknown name and RuntimeError, with the reason, for a backend that
    cannot run on this machine; the selection is then unchanged.
    """
    _selection.name = _check_name(name)


def get_backend() -> str:
    """The backend selected in this thread with :func:`set_backend` or :func:`use_backend`."""
    return _selected()


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed code (in this thread) with backend ``name``, then
    restore the previous selection, also when the block raises."""
    previous, _selection.name = _selected(), _check_name(name)
    try:
        yield name
    finally:
        _selection.name = previous


def _on_cpu_allowed_for_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel(op: str, device: torch.device, name: str | None = None):
    """The callable that runs ``op`` on ``device`` under backend ``name`` (default: the one
    selected in this thread)."""
    name = _selected() if name is None else name
    if name == "reference":
        return getattr(reference, op)
    if name == "auto":
        if device.type == "cuda":
            for candidate in CUDA_PREFERENCE[op]:
                if not _reason(candidate):
                    return kernel_of(candidate, op)
        return op_overload(op)  # C++ CPU kernel when built, else the reference composite
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError(f"dirfast backend 'cpp' runs on CPU tensors, got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"dirfast backend 'cuda' runs on CUDA tensors, got a tensor on {device}")
    if name == "cuda" and op not in CUDA_OPS:
        raise RuntimeError(f"dirfast backend 'cuda' has no kernel for {op} (the 'auto' and 'triton' backends run it "
                           "on the GPU)")
    if name == "triton" and device.type != "cuda" and not _on_cpu_allowed_for_triton():
        raise RuntimeError(
            f"dirfast backend 'triton' runs on CUDA tensors (or any tensor with TRITON_INTERPRET=1), "
            f"got a tensor on {device}"
        )
    return kernel_of(name, op)


def kernel_of(name: str, op: str):
    """The callable of backend ``name`` for ``op``, whatever the selection."""
    if name == "reference":
        return getattr(reference, op)
    if name == "triton":
        from .. import triton as dirfast_triton  # noqa: F401  (registers dirfast::triton_<op>)

        return op_overload("triton_" + op)
    return op_overload(op)
