"""The backends of the dirfast ops: what can run here, and the override tests and benchmarks use.

By default (``"auto"``) every op call goes through torch's dispatcher, which picks the kernel
registered for the device: the C++ kernels on CPU (the reference without them), the CUDA kernels
on a GPU (Triton without them). :func:`use_backend` / :func:`set_backend` override that for the
current thread, to run and compare one backend's kernels:

* ``"reference"`` -- the pure-PyTorch definition of each op, on any device;
* ``"cpp"`` -- the compiled CPU kernels (``dirfast._C``), CPU tensors;
* ``"cuda"`` -- the compiled CUDA kernels (``dirfast._C_cuda``), CUDA tensors;
* ``"triton"`` -- the Triton kernels: CUDA tensors, or any tensor under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before Triton is imported).

The compiled backends are the dispatcher's own kernels; the reference and Triton ones are called
directly, with the op's backward run on the same backend.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .. import _ext
from . import _checks
from ._common import OPS

BACKENDS = ("reference", "cpp", "triton", "cuda")
# The ops with a compiled CUDA kernel (on a GPU the others run on Triton).
CUDA_OPS = ("bin_stats", "smooth_bins", "calibrate", "calibrate_")
# The ops whose reference is their kernel on a GPU (torch ops, or other dirfast ops on the selected
# backend): the "cuda" backend runs them too, so that FDS runs whole on it.
COMPOSED_OPS = ("integer_bins", "accumulate_bin_stats_")


def _cuda_backend_ops() -> tuple:
    """What the "cuda" backend runs, in the ops' order."""
    return tuple(name for name in OPS if name in CUDA_OPS + COMPOSED_OPS)


# The selection belongs to the current thread: a use_backend() block in one thread never changes
# the ops of another, and new threads start at "auto". (A threading.local, which torch.compile
# traces and guards on.)
_selection = threading.local()


def _selected() -> str:
    return getattr(_selection, "name", "auto")


# The ops that are parts of a public one: its backward, and the forward with gradients that the
# Balanced MSE losses call.
_PART_SUFFIXES = ("_backward", "_with_grads")


def _public_ops() -> tuple:
    return tuple(name for name in OPS if not name.endswith(_PART_SUFFIXES))


def _triton_reason() -> str:
    from .. import triton as dirfast_triton  # lazy: Triton is optional

    return dirfast_triton.unavailable_reason()


def _cpp_reason() -> str:
    if _ext.CPU is None:
        return _ext.CPU_REASON
    missing = [op.name for op in OPS.values() if not op.has_kernel("CPU")]
    return f"dirfast._C has no CPU kernel for {', '.join(missing)}" if missing else ""


def _cuda_reason() -> str:
    if _ext.CUDA is None:
        return _ext.CUDA_REASON
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return ""


_REASONS: dict = {}  # availability cannot change within a process: worked out once


def _reason(name: str) -> str:
    """Why backend ``name`` cannot run here ("" when it can)."""
    if name not in _REASONS:
        finders = {"reference": lambda: "", "cpp": _cpp_reason, "cuda": _cuda_reason, "triton": _triton_reason}
        _REASONS[name] = finders[name]()
    return _REASONS[name]


def backends() -> dict:
    """What each backend can do on this machine.

    Returns a dict from backend name (``"reference"``, ``"cpp"``, ``"triton"``, ``"cuda"``) to a
    dict with ``available`` (usable now), ``reason`` (why not, ``""`` when available) and ``ops``
    (the ``dirfast.ops`` it runs); the ``"cuda"`` entry also has ``compiled`` (the CUDA
    kernels were built and load with this torch).
    """
    report = {}
    for name in BACKENDS:
        reason = _reason(name)
        report[name] = {"available": not reason, "reason": reason,
                        "ops": _cuda_backend_ops() if name == "cuda" else _public_ops()}
    report["cuda"]["compiled"] = _ext.CUDA is not None
    return report


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):  # any other type is an unknown name too
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


# How many threads the C++ CPU kernels take (set_cpu_threads): the kernels hold the setting, this
# mirrors it for get_cpu_threads.
CPU_THREADS = ("free", "all")
_cpu_threads = "free"


def set_cpu_threads(policy: str) -> None:
    """How many threads dirfast's C++ CPU kernels run on, for the whole process.

    ``"free"`` (the default): ``torch.get_num_threads()``, but no more than the cores that other
    processes leave free, read from ``/proc/stat`` at most every 100 ms (Linux). A parallel region
    waits for its slowest thread, and a thread on a core another process holds often waits for
    the scheduler's next tick, so with a core busy a training batch can run several times slower
    on 2 threads than on 1 (``benchmarks/results/cpu/threads-zen4.md``). ``"all"``:
    ``torch.get_num_threads()`` whatever the load.
    Results are the same bits either way; torch's own ops are not affected.
    """
    global _cpu_threads
    policy = _checks.choice("policy", policy, CPU_THREADS)
    if _ext.CPU is not None:
        _ext.CPU.set_free_cores_only(policy == "free")
    _cpu_threads = policy


def get_cpu_threads() -> str:
    """The policy of :func:`set_cpu_threads`."""
    return _cpu_threads


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run the enclosed code (in this thread) with backend ``name``, then
    restore the previous selection, also when the block raises."""
    previous, _selection.name = _selected(), _check_name(name)
    try:
        yield name
    finally:
        _selection.name = previous


def _allowed(name: str, op: str, device: torch.device) -> None:
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError(f"dirfast backend 'cpp' runs on CPU tensors, got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"dirfast backend 'cuda' runs on CUDA tensors, got a tensor on {device}")
    if name == "cuda" and op not in CUDA_OPS + COMPOSED_OPS:
        raise RuntimeError(f"dirfast backend 'cuda' has no kernel for {op} (on a GPU, the 'auto' and 'triton' "
                           "backends run it)")


# The selections that run the dispatcher's ops (its own autograd included).
_DISPATCHED = ("auto", "cpp", "cuda")


def kernels(device: torch.device, name: str | None = None):
    """A function from op name to the callable that runs it on ``device`` under backend ``name``
    (default: this thread's selection): the dispatcher's op, or a backend's own function."""
    name = _selected() if name is None else name

    def kernel(op: str):
        if name in _DISPATCHED:
            if name != "auto":
                _allowed(name, op, device)
            return OPS[op].overload
        if name == "reference":
            return OPS[op].reference
        return OPS[op].triton

    # Its ops carry their own autograd. (A function attribute, which mypy does not model; set on the
    # function directly: through typing.cast, torch.compile's fullgraph tracing cannot set it.)
    kernel.dispatched = name in _DISPATCHED  # type: ignore[attr-defined]
    return kernel


# -------------------------------------------------------------------------------- autograd
# An op's backward is written once, in terms of a function from op name to kernel (ctx.kernel):
# through the dispatcher it calls the dispatcher's ops; under a selected backend, that
# backend's own functions (_OnBackend), so a backward runs where its forward ran.
_AUTOGRAD: dict = {}  # op name -> (setup_context, backward)


def register_autograd(op: str, setup_context, backward, *, twice: bool = False) -> None:
    """Make ``dirfast::<op>`` differentiable: ``setup_context(ctx, inputs, output)`` saves what
    ``backward(ctx, *grads)`` needs; the backward calls kernels through ``ctx.kernel(name)``.
    ``twice``: the backward is made of the dispatcher's differentiable ops (see
    :func:`check_second_order`)."""

    def checked(ctx, *grads):
        check_second_order(op, ctx, twice)
        return backward(ctx, *grads)

    _AUTOGRAD[op] = (setup_context, checked)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.kernel = kernels(inputs[0].device, "auto")

    torch.library.register_autograd(OPS[op].qualname, checked, setup_context=setup)


def check_second_order(op: str, ctx, twice: bool = False) -> None:
    """Raise where a backward is asked to build its own graph (``create_graph=True``: a gradient
    penalty, a Hessian) and cannot: its kernels have no derivative, and torch would count theirs
    as 0, silently. Only a ``twice`` backward run by the dispatcher's ops (which carry their own
    autograd) has second derivatives."""
    if torch.is_grad_enabled() and not (twice and ctx.kernel.dispatched):
        raise NotImplementedError(
            f"dirfast.ops.{op} gives first derivatives only here: a backward with create_graph=True (a "
            f"gradient penalty, a Hessian, double backward) would need its second derivatives")


class _OnBackend(torch.autograd.Function):
    """A differentiable op run by a selected backend's own function, its backward on the same."""

    @staticmethod
    def forward(ctx, op, kernel, *args):
        output = kernel(op)(*args)
        _AUTOGRAD[op][0](ctx, args, output)
        ctx.kernel, ctx.op = kernel, op
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + tuple(_AUTOGRAD[ctx.op][1](ctx, *grads))


_WITHOUT_DERIVATIVE: dict = {}  # op name -> ((argument position, name), ...)


def without_derivative(op: str, *names: str) -> None:
    """Declare arguments of ``dirfast::<op>`` (by their schema names) whose derivative is not zero
    but not computed: :func:`refuse_unsupported_derivatives` refuses one that requires grad."""
    schema = [argument.name for argument in OPS[op].overload._schema.arguments]
    _WITHOUT_DERIVATIVE[op] = tuple((schema.index(name), name) for name in names)


def refuse_unsupported_derivatives(op: str, args, *, name: str | None = None) -> None:
    """Raise where an argument asks for a derivative the op does not give: a gradient (grad mode
    on) in an argument declared by :func:`without_derivative` (torch would leave it None,
    silently); a forward-mode tangent (``torch.func.jvp``, ``jacfwd``,
    ``torch.autograd.forward_ad``: the ops have none, and torch would give a tangent of 0, or none,
    silently); or a ``torch.func`` gradient transform (``grad``, ``vjp``, ``jacrev``, ``hessian``:
    the derivatives are registered with torch.autograd, and torch's own error there speaks of an
    autograd.Function's setup_context). ``name``: what the messages call the function (default
    ``dirfast.ops.<op>``)."""
    name = f"dirfast.ops.{op}" if name is None else name
    if torch.is_grad_enabled():
        for i, argument in _WITHOUT_DERIVATIVE.get(op, ()):
            if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                raise NotImplementedError(
                    f"{name} has no derivative in {argument}, which requires grad: pass {argument}.detach() (torch "
                    f"would leave its gradient None, silently)")
    if torch.autograd.forward_ad._current_level >= 0 and any(
            isinstance(a, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise NotImplementedError(f"{name} has no forward-mode derivative (torch.func.jvp, jacfwd, "
                                  f"torch.autograd.forward_ad): take gradients in reverse mode (backward, torch.autograd.grad)")
    if torch._C._functorch.maybe_current_level() is not None and any(
            isinstance(a, torch.Tensor) and torch._C._functorch.is_gradtrackingtensor(a) for a in args):
        raise NotImplementedError(f"{name} cannot be differentiated by torch.func's transforms (grad, vjp, "
                                  f"jacrev, hessian): take gradients with backward() or torch.autograd.grad")


def call(op: str, device: torch.device, *args):
    """Run ``op`` on ``args`` (on ``device``) with this thread's backend."""
    name = _selected()
    kernel = kernels(device, name)
    if op not in _AUTOGRAD:
        return kernel(op)(*args)
    refuse_unsupported_derivatives(op, args)
    needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if name not in _DISPATCHED:
        return _OnBackend.apply(op, kernel, *args) if needs_grad else kernel(op)(*args)
    if needs_grad or torch.compiler.is_compiling():
        return kernel(op)(*args)
    # The dispatcher's autograd kernel of a differentiable op is Python (torch.library's), a cost
    # on every call even where no gradient is needed (benchmarks/results/cpu/design-constants.md);
    # it then only runs the kernel below autograd, which is done here directly.
    with torch._C._AutoDispatchBelowAutograd():
        return kernel(op)(*args)
