"""The backends of the ops, and what every op shares through them: the ``backends()`` report, the
selection (``set_backend`` / ``use_backend``), torch's dispatcher picking the compiled kernels,
dirfast without its extension or without Triton, opcheck of every registered implementation,
the ops inside autocast, torch.compile through the dispatcher (a batch size kept dynamic), the
backend a backward runs on, the same bits for any number of CPU threads, the direction of
imports, the Triton kernels compiled for sm_90, the CPU sources built for a newer baseline
(clones above it only), the mixture's vector code, the CUDA build, and (on a GPU) a CUDA-graph
replay.

What each op computes, on every backend, is in tests/test_<op>.py.
"""

from __future__ import annotations

import ast
import concurrent.futures
import glob
import importlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import dirfast
from dirfast import _ext
from dirfast.ops import PADDINGS, _dispatch
from dirfast.ops._common import OPS
from test_calibrate import calibration_stats
from test_conr_loss import conr_inputs
from test_mixture_logpdf import mixture_inputs
from testing import (BACKEND_NAMES, DEVICES, GPU, backend_device_params, backend_params, gen, on, runs,
                     rand_bins, rand_features, same_bits_for_threads)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
PUBLIC_OPS = ("bin_stats", "accumulate_bin_stats_", "integer_bins", "smooth_bins", "calibrate", "calibrate_",
              "mixture_logpdf", "rnc_loss", "conr_loss", "ranksim_loss")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def backend_available(name: str) -> bool:
    return dirfast.backends()[name]["available"]


def _run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (dirfast and the test helpers importable, no Triton
    interpreter switch unless set here) and return the JSON it prints last."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, TESTS, os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# =========================================================================== the report and the selection
def test_public_api_names():
    """The names users and the kernels' registrations rely on exist."""
    for name in ["get_lds_kernel_window", "kernel_window", "Binning", "lds_weights", "LDS", "FDS", "losses", "metrics",
                 "ops", "backends", "set_backend", "get_backend", "use_backend"]:
        assert hasattr(dirfast, name), name
    for name in PUBLIC_OPS:
        assert callable(getattr(dirfast.ops, name)), name
        assert hasattr(torch.ops.dirfast, name), name
        assert OPS[name].reference is not None and OPS[name].overload is getattr(torch.ops.dirfast, name).default
    assert set(_dispatch.BACKENDS) == set(BACKEND_NAMES)


def test_backends_report():
    """Every backend says whether it is available and, when not, why; the reference always is;
    each lists the ops it runs; cuda says whether its kernels were compiled."""
    report = dirfast.backends()
    assert list(report) == list(_dispatch.BACKENDS)
    for name, info in report.items():
        assert isinstance(info["available"], bool) and isinstance(info["reason"], str), name
        assert bool(info["reason"].strip()) != info["available"], f"{name}: {info}"
        assert set(info["ops"]) <= set(PUBLIC_OPS), name
    assert report["reference"]["available"] and set(report["reference"]["ops"]) == set(PUBLIC_OPS)
    assert set(report["cpp"]["ops"]) == set(report["triton"]["ops"]) == set(PUBLIC_OPS)
    assert "mixture_logpdf" not in report["cuda"]["ops"]  # on a GPU the dispatcher runs it on Triton
    # "cuda" runs the ops composed of others too, so FDS (its bins, its accumulated statistics) runs whole
    assert set(report["cuda"]["ops"]) == set(_dispatch.CUDA_OPS) | {"integer_bins", "accumulate_bin_stats_"}
    assert {name for name, op in OPS.items() if op.triton is op.reference} == set(_dispatch.COMPOSED_OPS)
    assert report["cuda"]["compiled"] == (_ext.CUDA is not None)
    assert report["cpp"]["available"] == (_ext.CPU is not None)
    if not GPU:
        assert not report["cuda"]["available"]
    if report["cuda"]["available"]:
        assert report["cuda"]["compiled"]


@pytest.mark.parametrize("name", list(backend_params()))
def test_set_backend(name):
    """An available backend can be selected, and "auto" selected back."""
    dirfast.set_backend(name)
    assert dirfast.get_backend() == name
    dirfast.set_backend("auto")
    assert dirfast.get_backend() == "auto"


def test_use_backend_nests_and_restores():
    """use_backend restores the selection it found, also when its block raises, and nests."""
    assert dirfast.get_backend() == "auto"
    with dirfast.use_backend("reference") as selected:
        assert selected == "reference" and dirfast.get_backend() == "reference"
        with dirfast.use_backend("auto"):
            assert dirfast.get_backend() == "auto"
        assert dirfast.get_backend() == "reference"
    assert dirfast.get_backend() == "auto"
    with pytest.raises(KeyError):
        with dirfast.use_backend("reference"):
            raise KeyError("boom")
    assert dirfast.get_backend() == "auto", "restored after an exception"
    dirfast.set_backend("reference")
    with dirfast.use_backend("auto"):
        pass
    assert dirfast.get_backend() == "reference", "restores the previous selection, not the default"


def test_selection_is_local_to_the_thread():
    """A selection in one thread does not switch the ops of another, and a new thread starts at
    "auto" whatever the thread that started it selected."""
    seen, inside, release = {}, threading.Event(), threading.Event()

    def worker():
        seen["worker start"] = dirfast.get_backend()
        with dirfast.use_backend("reference"):
            inside.set()
            release.wait(10)
            seen["worker"] = dirfast.get_backend()

    thread = threading.Thread(target=worker)
    dirfast.set_backend("reference")
    thread.start()
    inside.wait(10)
    dirfast.set_backend("auto")
    seen["main"] = dirfast.get_backend()
    release.set()
    thread.join()
    assert seen == {"worker start": "auto", "main": "auto", "worker": "reference"}


def _op_calls():
    """One call of each public op on small CPU inputs (calibrate_ on a copy)."""
    x, idx = rand_features(12, 3, seed=1), rand_bins(12, 4, seed=2)
    stats = calibration_stats(4, 3, torch.float32)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum")
    mixture = mixture_inputs((7,), 3, torch.float32, "cpu", seed=3)
    labels = rand_features(12, 1, seed=4)
    running = (torch.zeros(4, dtype=torch.float64), torch.zeros(4, 3), torch.zeros(4, 3))
    return {"bin_stats": lambda: dirfast.ops.bin_stats(x, idx, 4),
            "accumulate_bin_stats_": lambda: dirfast.ops.accumulate_bin_stats_(*running, x, idx),
            "integer_bins": lambda: dirfast.ops.integer_bins(labels[:, 0] * 10, 4, 0.5, 1),
            "smooth_bins": lambda: dirfast.ops.smooth_bins(stats[0], w),
            "calibrate": lambda: dirfast.ops.calibrate(x, idx, *stats),
            "calibrate_": lambda: dirfast.ops.calibrate_(x.clone(), idx, *stats),
            "mixture_logpdf": lambda: dirfast.ops.mixture_logpdf(*mixture),
            "rnc_loss": lambda: dirfast.ops.rnc_loss(x, idx[:, None].float(), 2.0, 3, 6),
            "conr_loss": lambda: dirfast.ops.conr_loss(*conr_inputs(6, 3, 1, torch.float32, seed=4)),
            "ranksim_loss": lambda: dirfast.ops.ranksim_loss(x, labels, idx >= 0, 2.0, 1, 8)}


@pytest.fixture
def spies(monkeypatch):
    """Replace every op's reference and Triton entry (what the "reference" and "triton" backends
    call) by a recording wrapper; returns the record of (backend, op) calls."""
    calls = []

    def spy(backend, name, fn):
        def recorded(*args, **kwargs):
            calls.append((backend, name))
            return fn(*args, **kwargs)
        return recorded

    for name, op in list(OPS.items()):
        triton = spy("triton", name, op.triton) if op.triton is not None else None
        monkeypatch.setitem(OPS, name, op._replace(reference=spy("reference", name, op.reference), triton=triton))
    return calls


@pytest.mark.parametrize("backend, device", [p for p in backend_device_params() if p.values[1] == "cpu"])
def test_each_backend_runs_its_own_kernels(backend, device, spies):
    """"reference" and "triton" call the op's own function (and nothing else but the ops it is
    composed of, on the same backend); "auto" and "cpp" go through torch's dispatcher (the
    kernels registered with it), calling neither."""
    composed_of = {"accumulate_bin_stats_": ["bin_stats"]}
    for name, call in _op_calls().items():
        spies.clear()
        on(backend, call)
        expected = [(backend, op) for op in [name] + composed_of.get(name, [])]
        assert spies == (expected if backend in ("reference", "triton") else []), name


@pytest.mark.skipif(not backend_available("cuda"), reason=f"cuda: {dirfast.backends()['cuda']['reason']}")
def test_cuda_backend_checks_device_and_op():
    """The compiled-kernel overrides run only on their device, and "cuda" only the ops it has (and
    those composed of others)."""
    x = torch.randn(3, device="cuda")
    with pytest.raises(RuntimeError, match="no kernel for mixture_logpdf"):
        on("cuda", dirfast.ops.mixture_logpdf, x, x, x.abs() + 1, x)
    ages = torch.tensor([3.0, 7.5, 40.0], device="cuda")
    assert on("cuda", dirfast.ops.integer_bins, ages, 10).tolist() == [3, 7, 9]
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        on("cuda", dirfast.ops.smooth_bins, x.cpu(), x.cpu())


@pytest.mark.skipif(not backend_available("cpp"), reason=f"cpp: {dirfast.backends()['cpp']['reason']}")
def test_cpp_backend_runs_on_cpu_tensors_only():
    """The "cpp" override refuses tensors of another device instead of running another kernel."""
    x = torch.ones(3, 2, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors"):
        on("cpp", dirfast.ops.smooth_bins, x, torch.ones(3, device="meta"))


def _registered_at(op, key: str) -> str:
    """Where torch's dispatcher has ``op``'s kernel for ``key`` from ("" when it has none)."""
    for line in torch._C._dispatch_dump(op.qualname).splitlines():
        if line.startswith(f"{key}: registered at "):
            return line
    return ""


def test_the_dispatcher_runs_the_compiled_kernels():
    """torch.library is the one dispatcher: every op's reference is its composite kernel; on CPU
    the C++ kernels are registered for every op when dirfast._C is built; on CUDA every op has a
    kernel: the compiled one where dirfast._C_cuda has it, else the op's Triton entry."""
    for name, op in OPS.items():
        assert op.has_kernel("CompositeExplicitAutograd"), name
        assert op.has_kernel("CPU") == (_ext.CPU is not None), name
        if _ext.CPU is not None:
            assert "csrc" in _registered_at(op, "CPU"), _registered_at(op, "CPU")
        assert op.has_kernel("CUDA") and op.triton is not None, name
        from_triton = os.path.join("dirfast", "ops", "_common.py") in _registered_at(op, "CUDA")
        assert from_triton == (_ext.CUDA is None or name not in _dispatch.CUDA_OPS), _registered_at(op, "CUDA")


# =========================================================================== without optional parts
def test_import_without_the_extension():
    """A dirfast._C that cannot be imported (never built): dirfast imports, cpp and cuda say why
    they are unavailable, the ops run on the reference (registered for every device, with no
    CPU kernel), torch.library.opcheck passes on each, and CUDA is never initialised."""
    result = _run_python("""
        import sys, json
        sys.modules["dirfast._C"] = None  # 'import dirfast._C' now fails
        import torch, dirfast
        from dirfast.ops._common import OPS
        result = {"backends": dirfast.backends(), "cpu": [n for n, op in OPS.items() if op.has_kernel("CPU")]}
        x = torch.arange(12.0).reshape(6, 2)
        idx = torch.tensor([0, 0, 1, 2, -1, 2])
        count, mean, var = dirfast.ops.bin_stats(x, idx, 3)
        result["count"], result["mean"] = count.tolist(), mean.tolist()
        import test_backends
        test_backends.opcheck_every_op("cpu")
        result["cuda_initialized"] = torch.cuda.is_initialized()
        print(json.dumps(result))
    """)
    for name in ("cpp", "cuda"):
        assert not result["backends"][name]["available"] and result["backends"][name]["reason"], name
    assert "dirfast._C is not built" in result["backends"]["cpp"]["reason"]
    assert result["backends"]["reference"]["available"] and result["cpu"] == []
    assert result["count"] == [2, 1, 2] and result["mean"] == [[1.0, 2.0], [4.0, 5.0], [8.0, 9.0]]
    assert not result["cuda_initialized"]


def test_import_without_triton():
    """Triton missing: dirfast imports, the triton backend says why, the ops run; a Triton older
    than dirfast needs is reported as such."""
    result = _run_python("""
        import sys, json, types
        sys.modules["triton"] = None  # 'import triton' now fails
        import torch, dirfast
        result = {"backends": dirfast.backends()}
        _, mean, _ = dirfast.ops.bin_stats(torch.ones(4, 2), torch.zeros(4, dtype=torch.long), 1)
        result["mean"] = mean.tolist()
        sys.modules["triton"] = types.SimpleNamespace(__version__="3.5.1")
        import dirfast.triton
        result["old"] = dirfast.triton.unavailable_reason()
        print(json.dumps(result))
    """)
    triton = result["backends"]["triton"]
    assert not triton["available"] and "triton is not importable" in triton["reason"]
    assert result["backends"]["reference"]["available"] and result["mean"] == [[1.0, 1.0]]
    from dirfast.triton import MIN_TRITON

    assert "3.5.1 is too old" in result["old"] and MIN_TRITON in result["old"]


# =========================================================================== second derivatives
def differentiable_op_calls(device, seed):
    """Each differentiable op as a function of one float64 input, with that input: op -> (f, x)."""
    g = gen(seed)
    z = torch.randn(12, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 4, (12, 1), generator=g).double().to(device)
    x, m, v, lw = mixture_inputs((7,), 3, torch.float64, device, seed=seed + 1)
    stats = calibration_stats(4, 4, torch.float64, device)
    rows = torch.randint(0, 4, (12,), generator=g).to(device)
    return {"rnc_loss": (lambda t: dirfast.ops.rnc_loss(t, y), z),
            "conr_loss": (lambda t: dirfast.ops.conr_loss(t, y, y + 0.5, torch.ones_like(y[:, 0])), z),
            "ranksim_loss": (lambda t: dirfast.ops.ranksim_loss(t, y), z),
            "mixture_logpdf": (lambda t: dirfast.ops.mixture_logpdf(t, m, v, lw), x),
            "calibrate": (lambda t: dirfast.ops.calibrate(t, rows, *stats), z),
            "calibrate_": (lambda t: dirfast.ops.calibrate_(t * 1, rows, *stats), z),
            "bin_stats": (lambda t: dirfast.ops.bin_stats(t, rows, 4)[2], z),
            "smooth_bins": (lambda t: dirfast.ops.smooth_bins(t, torch.full((3,), 0.3, dtype=t.dtype)), z)}


# "cuda" runs none of the ops below (on a GPU "auto" and "triton" run them)
@pytest.mark.parametrize("backend, device", [p for p in backend_device_params() if p.values[0] != "cuda"])
def test_double_backward_raises_without_second_derivatives(backend, device):
    """A backward that builds its own graph (create_graph=True: a gradient penalty, a Hessian)
    through an op whose backward kernels have no derivative raises NotImplementedError naming
    the op, on every backend (torch counted their derivative as 0: a Hessian of 0, silently).
    calibrate's backward is calibrate itself: through the dispatcher's ops its second derivatives
    are right (gradgradcheck); a selected backend's own kernels have none, and it raises."""
    calls = differentiable_op_calls(device, 86)
    with dirfast.use_backend(backend):
        for op in ("rnc_loss", "conr_loss", "ranksim_loss", "mixture_logpdf", "bin_stats", "smooth_bins"):
            f, primal = calls[op]
            inputs = primal.clone().requires_grad_()
            (first,) = torch.autograd.grad(f(inputs).sum(), inputs)  # first derivatives as ever
            assert torch.isfinite(first).all()
            with pytest.raises(NotImplementedError, match=f"dirfast.ops.{op} gives first derivatives only"):
                torch.autograd.grad(f(inputs).sum(), inputs, create_graph=True)
        f, primal = calls["calibrate"]
        z = primal.clone().requires_grad_()
        if backend in ("auto", "cpp", "cuda"):
            assert torch.autograd.gradgradcheck(lambda t: f(t).pow(2), (z,))
        else:
            with pytest.raises(NotImplementedError, match="dirfast.ops.calibrate gives first derivatives only"):
                torch.autograd.grad(f(z).pow(2).sum(), z, create_graph=True)


@pytest.mark.parametrize("backend, device", list(backend_device_params()))
def test_arguments_without_derivative_are_refused(backend, device):
    """A tensor that requires grad where the op has a derivative it does not compute (calibrate's
    statistics, ConR's weights) raises NotImplementedError naming it, before anything is written
    (torch left its gradient None, silently); under torch.no_grad the op runs."""
    g = gen(93)
    z = torch.randn(12, 4, generator=g, dtype=torch.float64).to(device)
    rows = torch.randint(0, 4, (12,), generator=g).to(device)
    stats = calibration_stats(4, 4, torch.float64, device)
    y = torch.randint(0, 4, (12, 1), generator=g).double().to(device)
    with dirfast.use_backend(backend):
        for i, name in enumerate(("src_mean", "src_var", "dst_mean", "dst_var")):
            asking = [t.clone().requires_grad_(j == i) for j, t in enumerate(stats)]
            for op in ("calibrate", "calibrate_"):
                if not runs(backend, op):
                    continue
                x = z.clone()
                with pytest.raises(NotImplementedError, match=f"dirfast.ops.{op} has no derivative in {name}, "):
                    getattr(dirfast.ops, op)(x, rows, *asking)
                assert torch.equal(x, z)
                with torch.no_grad():
                    getattr(dirfast.ops, op)(x, rows, *asking)
        if runs(backend, "conr_loss"):
            weights = torch.ones(12, dtype=torch.float64, device=device, requires_grad=True)
            with pytest.raises(NotImplementedError, match="dirfast.ops.conr_loss has no derivative in weights, "):
                dirfast.ops.conr_loss(z.clone().requires_grad_(), y, y + 0.5, weights)
            dirfast.ops.conr_loss(z.clone().requires_grad_(), y, y + 0.5, weights.detach()).sum().backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func.jvp's own
@pytest.mark.parametrize("backend, device", list(backend_device_params()))
def test_forward_mode_raises(backend, device):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) through a differentiable op,
    calibrate_ in place included, raises NotImplementedError naming the op: the ops have no
    forward-mode derivative, and torch gave a tangent of 0 (or none), silently."""
    with dirfast.use_backend(backend):
        for op, (f, primal) in differentiable_op_calls(device, 91).items():
            if not runs(backend, op):
                continue
            with pytest.raises(NotImplementedError, match=f"dirfast.ops.{op} has no forward-mode derivative"):
                torch.func.jvp(f, (primal,), (torch.ones_like(primal),))
            with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match=f"ops.{op} has no"):
                f(torch.autograd.forward_ad.make_dual(primal, torch.ones_like(primal)))
            f(primal)  # without a tangent, as ever


@pytest.mark.parametrize("backend, device", list(backend_device_params()))
def test_torch_func_gradients_raise(backend, device):
    """torch.func's gradient transforms (grad, vjp, jacrev) through a differentiable op raise
    NotImplementedError naming the op and the way that works (torch's own error spoke of an
    autograd.Function's setup_context)."""
    with dirfast.use_backend(backend):
        for op, (f, primal) in differentiable_op_calls(device, 92).items():
            for transform in (torch.func.grad, torch.func.jacrev):
                with pytest.raises(NotImplementedError, match=f"dirfast.ops.{op} cannot be differentiated by torch.func"):
                    transform(lambda t: f(t).sum())(primal.clone())
            with pytest.raises(NotImplementedError, match=f"dirfast.ops.{op} cannot be"):
                torch.func.vjp(f, primal.clone())


# =========================================================================== opcheck, compile
def opcheck_every_op(device: str) -> None:
    """torch.library.opcheck (schema, fake kernel, autograd registration, aliasing) of every
    ``dirfast::`` op as registered for ``device``, on rows, dense float64 and channels-last inputs,
    int64 and int32 indices, both bin_stats modes, every padding, and 16-bit predictions."""
    ops = torch.ops.dirfast
    g = gen(40)
    cases = [(torch.randn(23, 3, generator=g), torch.randint(-1, 5, (23,), generator=g)),
             (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), torch.randint(-1, 5, (2, 4, 5), generator=g)),
             (torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
              torch.randint(-1, 5, (2, 4, 5), generator=g, dtype=torch.int32))]
    for i, (x, idx) in enumerate(cases):
        x, idx = x.to(device), idx.to(device)
        for det in (False, True) if i == 0 else (False,):
            torch.library.opcheck(ops.bin_stats.default, (x, idx, 5, det))
        for bins, held in ((5, torch.float32), (40, torch.float64)) if i == 0 else ((5, torch.float32),):
            running = (torch.randint(0, 4, (bins,), generator=g).double(), torch.randn(bins, 3, generator=g).to(held),
                       torch.rand(bins, 3, generator=g).to(held))
            torch.library.opcheck(ops.accumulate_bin_stats_.default, (*(t.to(device) for t in running), x, idx))
        stats = calibration_stats(5, 3, torch.float64 if x.dtype == torch.float64 else torch.float32, device)
        for requires_grad in (False, True):
            torch.library.opcheck(ops.calibrate.default, (x.clone().requires_grad_(requires_grad), idx, *stats, 0.1, 10.0))
        torch.library.opcheck(ops.calibrate_.default, (x.clone(), idx, *stats, 0.1, 10.0))
    for labels, scale, first in ((torch.randn(23, generator=g) * 5, 1.0, 0), (torch.randn(2, 1, 4, 5, generator=g,
                                  dtype=torch.float64).abs() * 9, 2.5, 2), (torch.randn(7, 3, generator=g).t(), 0.5, 0)):
        torch.library.opcheck(ops.integer_bins.default, (labels.to(device), 5, scale, first))
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(device)
    for stats in (torch.randn(7, 3, device=device), torch.randn(9, dtype=torch.float64, device=device)):
        for padding in PADDINGS if stats.dim() == 2 else PADDINGS[:1]:
            torch.library.opcheck(ops.smooth_bins.default, (stats, w.to(stats.dtype), padding))
    for shape, dtype in (((11,), torch.float32), ((2, 1, 3, 4), torch.float64), ((5, 3), torch.float16)):
        x, m, v, lw = mixture_inputs(shape, 6, dtype, device, seed=43)
        torch.library.opcheck(ops.mixture_logpdf.default, (x.requires_grad_(), m, v, lw))
        out = ops.mixture_logpdf(x.detach(), m, v, lw)
        torch.library.opcheck(ops.mixture_logpdf_backward.default, (torch.ones_like(out), x.detach(), out, m, v, lw))
        torch.library.opcheck(ops.mixture_logpdf_with_grads.default, (x.detach(), m, v, lw))
    for (m, d, L), dtype in (((9, 4, 1), torch.float32), ((7, 3, 2), torch.float64), ((6, 5, 1), torch.bfloat16)):
        z = torch.randn(m, d, generator=g).to(device, dtype)
        y = torch.randint(0, 3, (m, L), generator=g).to(device, dtype)
        for offset, count in ((0, m), (2, 3)):
            torch.library.opcheck(ops.rnc_loss.default, (z.clone().requires_grad_(), y, 1.5, offset, count))
            grad = torch.rand(count, generator=g).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
            torch.library.opcheck(ops.rnc_loss_backward.default, (grad, z, y, 1.5, offset, count))
    for dtype in (torch.float32, torch.float64):
        x, y, keep = torch.randn(9, 4, generator=g).to(device, dtype), torch.randn(9, 2, generator=g).to(device), \
            (torch.rand(9, generator=g) < 0.7).to(device)
        torch.library.opcheck(ops.ranksim_loss.default, (x.requires_grad_(), y, keep, 2.0, 2, 6))
        torch.library.opcheck(ops.ranksim_loss_backward.default, (torch.ones(6, device=device), x.detach(), y, keep, 2.0, 2, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Every op as the dispatcher runs it on this device (the C++ or CUDA kernels, or Triton on
    a GPU without them); the composite reference is checked in test_import_without_the_extension,
    and the Triton functions against the reference in each op's tests."""
    opcheck_every_op(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ops_step_out_of_autocast(device, compiled):
    """Inside torch.autocast an op computes as outside it, to the bit, and so does its backward
    (run inside too): a kernel that calls an ATen GEMM (the pairwise ops) gets the product in its
    own dtype, where the C++ ConR kernel had read autocast's bfloat16 product as float32 and raised."""
    features, labels, preds, weights = conr_inputs(24, 8, 1, torch.float32, device, seed=3)
    idx = rand_bins(24, 5, device=device, seed=3)
    stats = calibration_stats(5, 8, torch.float32, device)
    calls = {"conr_loss": lambda z: dirfast.ops.conr_loss(z, labels, preds, weights),
             "rnc_loss": lambda z: dirfast.ops.rnc_loss(z, labels),
             "ranksim_loss": lambda z: dirfast.ops.ranksim_loss(z, labels),
             "calibrate": lambda z: dirfast.ops.calibrate(z, idx, *stats)}
    low = torch.bfloat16 if device == "cpu" else torch.float16
    for name, call in calls.items():
        run = torch.compile(call, backend="aot_eager", fullgraph=True) if compiled else call
        results = []
        for enabled in (False, True):
            leaf = features.clone().requires_grad_()
            with torch.autocast(torch.device(device).type, dtype=low, enabled=enabled):
                out = run(leaf)
                out.sum().backward()
            results.append((out.detach(), leaf.grad))
        for plain, autocast in zip(*results):
            assert plain.dtype == autocast.dtype == torch.float32 and torch.equal(plain, autocast), name


@pytest.mark.parametrize("op", ["rnc_loss", "conr_loss", "ranksim_loss"])
def test_compiled_pairwise_ops_keep_the_batch_size_dynamic(op):
    """The anchors' offset and count are SymInts in the pairwise ops' schemas, so a batch size
    (and a count derived from it) stays symbolic: twelve batch sizes compile two graphs (the
    first, then a dynamic one), not one each until torch's recompile limit fails a fullgraph
    compile; every value is eager's."""
    calls = {"rnc_loss": lambda z, y: dirfast.ops.rnc_loss(z, y, 2.0, 1, z.shape[0] - 1),
             "conr_loss": lambda z, y: dirfast.ops.conr_loss(z, y, y + 0.1, torch.ones(z.shape[0]), offset=1,
                                                             count=z.shape[0] - 1),
             "ranksim_loss": lambda z, y: dirfast.ops.ranksim_loss(z, y, None, 2.0, 1, z.shape[0] - 1)}
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(calls[op], backend=counting, fullgraph=True)
    g = gen(8)
    for m in range(4, 16):
        z, y = torch.randn(m, 4, generator=g), torch.randint(0, 3, (m, 1), generator=g).float()
        torch.testing.assert_close(compiled(z, y), calls[op](z, y), rtol=0, atol=0)
    assert len(graphs) == 2


COMPILE_CASES = [p for p in backend_device_params() if p.values[0] in ("auto", "cpp", "cuda")]


@pytest.mark.parametrize("backend, device", COMPILE_CASES)
def test_compile_fullgraph_fds_step(backend, device):
    """The fake kernels let torch.compile(fullgraph=True) trace a whole FDS step through the
    dispatcher, in-place calibration, the running tables' update and the backward included, with
    the results of eager."""
    x = rand_features(20, 3, seed=41, device=device)
    idx = rand_bins(20, 5, seed=42, device=device)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").float().to(device)

    def step(x, idx, running):
        count, mean, var = dirfast.ops.bin_stats(x.detach(), idx, 5)
        m2, v2 = dirfast.ops.smooth_bins(mean, w), dirfast.ops.smooth_bins(var, w)
        y = x * 2.0
        dirfast.ops.calibrate_(y, idx, mean, var, m2, v2)
        skipped = dirfast.ops.accumulate_bin_stats_(*running, x, idx)
        return count, dirfast.ops.calibrate(x, idx, mean, var, m2, v2), y, skipped

    results = []
    with dirfast.use_backend(backend):
        for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
            leaf = x.clone().requires_grad_()
            running = (torch.ones(5, dtype=torch.float64, device=device), torch.zeros(5, 3, device=device),
                       torch.ones(5, 3, device=device))
            count, out, y, skipped = fn(leaf, idx, running)
            (out * out).sum().backward(retain_graph=True)
            (y * y).sum().backward()
            results.append((count, out.detach(), y.detach(), leaf.grad, skipped, *running))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend, device", [p for p in COMPILE_CASES if p.values[0] != "cuda"])
def test_compile_fullgraph_mixture_term(backend, device):
    """Balanced MSE's balancing term, forward and backward, traced whole by torch.compile through
    the dispatcher, with the loss and gradients of eager."""
    x, m, v, lw = mixture_inputs((2, 1, 4, 5), 8, torch.float32, device, seed=44)
    noise = torch.tensor(0.5, device=device)

    def step(x, noise):
        return dirfast.ops.mixture_logpdf(x, m, v + noise, lw).mean()

    results = []
    with dirfast.use_backend(backend):
        for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
            xs, ns = x.clone().requires_grad_(), noise.clone().requires_grad_()
            loss = fn(xs, ns)
            loss.backward()
            results.append((loss.detach(), xs.grad, ns.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@needs_gpu
def test_compile_inductor_on_gpu():
    """torch.compile's default compiler on a GPU, the dirfast op between two of its kernels."""
    x = torch.randn(512, 64, device="cuda")
    idx = torch.randint(0, 10, (512,), device="cuda")
    stats = calibration_stats(10, 64, torch.float32, "cuda")

    def step(x):
        return torch.relu(dirfast.ops.calibrate(x * 2, idx, *stats))

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


# =========================================================================== backward on the forward's backend
BACKWARD_OPS = {"calibrate": "calibrate", "calibrate_": "calibrate", "mixture_logpdf": "mixture_logpdf_backward",
                "rnc_loss": "rnc_loss_backward",
                "conr_loss": "conr_loss_backward",
                "ranksim_loss": "ranksim_loss_backward"}


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] in ("reference", "triton")])
@pytest.mark.parametrize("op", list(BACKWARD_OPS))
def test_backward_runs_on_the_forward_backend(op, backend, spies):
    """A differentiable op's backward (calibrate_'s in-place one included) runs on the backend of
    its forward, whatever is selected by then, with the gradient of the dispatcher's path; and a
    forward through the dispatcher keeps its backward there."""
    device = "cuda" if backend == "triton" and GPU else "cpu"
    if op == "mixture_logpdf":
        x, *tables = mixture_inputs((9,), 4, torch.float32, device, seed=45)
    elif op == "rnc_loss":
        x, tables = rand_features(9, 3, seed=45, device=device), (rand_bins((9, 1), 4, seed=46, device=device).float(),)
    elif op == "conr_loss":
        x, *tables = conr_inputs(9, 3, 1, torch.float32, device, seed=45)
    elif op == "ranksim_loss":
        x, tables = rand_features(9, 3, seed=45, device=device), (rand_features(9, 1, seed=46, device=device),
                                                                   torch.ones(9, dtype=torch.bool, device=device))
    else:
        x, tables = rand_features(9, 3, seed=45, device=device), (rand_bins(9, 4, seed=46, device=device),
                                                                   *calibration_stats(4, 3, torch.float32, device))

    def forward(leaf):
        return getattr(dirfast.ops, op)(leaf * 1.0 if op == "calibrate_" else leaf, *tables)

    grads = []
    for selected in (backend, "auto"):
        leaf = x.clone().requires_grad_()
        with dirfast.use_backend(selected):
            out = forward(leaf)
        spies.clear()
        with dirfast.use_backend("reference" if selected == "auto" else "auto"):
            out.sum().backward()
        assert spies == ([(backend, BACKWARD_OPS[op])] if selected == backend else []), selected
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


# =========================================================================== the CPU kernels' bits
@pytest.mark.skipif(not backend_available("cpp"), reason=f"cpp: {dirfast.backends()['cpp']['reason']}")
def test_cpu_kernels_give_the_same_bits_for_any_thread_count():
    """bin_stats, accumulate_bin_stats_, integer_bins, smooth_bins, calibrate and mixture_logpdf
    (forward, backward, and with gradients) on rows, dense maps and float16 give the same bits with 1, 2 or 3 threads: chunks merge in a fixed order, and
    the pieces threads take (more of them, cut elsewhere, for each thread count) change nothing."""
    g = gen(12)
    rows = torch.randn(70001, 24, generator=g) * 3 + 100
    rows_idx = torch.randint(-1, 98, (70001,), generator=g)
    dense = torch.randn(3, 16, 97, 101, generator=g)
    dense_idx = torch.randint(-1, 98, (3, 97, 101), generator=g)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum")
    ops = torch.ops.dirfast

    def run():
        out = []
        for x, idx in ((rows, rows_idx), (dense, dense_idx), (rows.half(), rows_idx.int())):
            count, mean, var = ops.bin_stats(x, idx, 97)
            m2, v2 = ops.smooth_bins(mean, w, "reflect"), ops.smooth_bins(var, w, "reflect")
            out += [count, mean, var, m2, v2, ops.calibrate(x, idx, mean, var, m2, v2, 0.1, 10.0)]
            # merged into running tables; most rows in one bin (its rows reduced in several segments)
            running = (count.double() + 3, mean - 1, var * 5)
            out += [ops.accumulate_bin_stats_(*running, x, idx.clamp(max=3)), *running]
        out.append(ops.smooth_bins(torch.randn(3001, 64, generator=gen(13)), w, "reflect"))  # several pieces
        out.append(ops.integer_bins(rows.reshape(-1) * 3, 97, 0.5, 2))  # several pieces
        long_rows = torch.randn(20001, 64, generator=gen(14)) + 10  # rows grouped by bin, one bin in several pieces
        running = (torch.ones(4, dtype=torch.float64), torch.zeros(4, 64), torch.ones(4, 64))
        out += [ops.accumulate_bin_stats_(*running, long_rows, rows_idx[:20001].clamp(max=3)), *running]
        y, tables = rows[:, 0] / 30, (mean[:, 0] / 30, var[:, 0] / 900 + 0.1, torch.zeros(97))
        density = ops.mixture_logpdf(y, *tables)
        return out + [density, *ops.mixture_logpdf_backward(torch.ones_like(y), y, density, *tables),
                      *ops.mixture_logpdf_with_grads(y, *tables)]

    same_bits_for_threads(run, (1, 2, 3, 2))


# =========================================================================== imports
def _dirfast_imports() -> dict:
    """{module: {(imported module, imported name or None)}} from the source of every module of
    the package, module-level and deferred imports alike."""
    root = pathlib.Path(dirfast.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {(alias.name, None) for alias in node.names if alias.name.startswith("dirfast")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
                if base.startswith("dirfast"):
                    edges |= {(base, alias.name) for alias in node.names}
            elif isinstance(node, ast.Attribute) and node.attr == "import_module":
                edges.add(("importlib", "import_module"))
        modules[name] = edges
    return modules


# The layers, from the top: the public API, the ops (and the loader of their compiled kernels),
# the kernels. What every op and kernel shares (the accumulation-dtype rule) is dirfast.ops._common.
SHARED = "dirfast.ops._common"


def _layer(module: str) -> int:
    if module.startswith(("dirfast.triton", "dirfast._C")):
        return 2
    return 1 if module.startswith("dirfast.ops") or module == "dirfast._ext" else 0


def test_imports_point_one_way():
    """Public API -> ops -> kernels: no module imports from a layer above its own (the kernels
    may use the ops' shared dirfast.ops._common), none imports a private module or name of
    another package, only the loader of the compiled kernels (dirfast._ext) imports by name, and
    there is no import cycle, deferred imports included."""
    modules = _dirfast_imports()
    root = pathlib.Path(dirfast.__file__).parent  # read from the files: no module is imported (nor Triton)
    packages = {".".join(path.parent.relative_to(root.parent).parts) for path in root.rglob("__init__.py")}

    def target(base, name):
        """The module an import binds: base.name when that is a module, else base."""
        return f"{base}.{name}" if name and f"{base}.{name}" in modules else base

    graph, problems = {}, []
    for module, edges in sorted(modules.items()):
        package = module if module in packages else module.rsplit(".", 1)[0]
        graph[module] = set()
        for base, name in sorted(edges, key=str):
            if base == "importlib":
                if module != "dirfast._ext":
                    problems.append(f"{module} imports a module by name")
                continue
            imported = target(base, name)
            graph[module].add(imported)
            if _layer(imported) < _layer(module) and not (imported == SHARED and _layer(module) == 2):
                problems.append(f"{module} (layer {_layer(module)}) imports {imported} (layer {_layer(imported)})")
            parts = imported.split(".")
            for i, part in enumerate(parts):  # a private module belongs to the package above it
                owner = ".".join(parts[:i])
                if part.startswith("_") and not (module == owner or module.startswith(owner + ".")) \
                        and imported != SHARED:
                    problems.append(f"{module} imports {imported}, private to {owner}")
            if name and name.startswith("_") and imported == base and base.rsplit(".", 1)[0] != package:
                problems.append(f"{module} imports the private {name} of {base}")
    visiting, done = [], set()

    def visit(module):
        if module in done or module not in graph:
            return
        if module in visiting:
            problems.append("import cycle: " + " -> ".join(visiting[visiting.index(module):] + [module]))
            return
        visiting.append(module)
        for other in sorted(graph[module] - {module}):
            visit(other)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not problems, "\n".join(problems)


# =========================================================================== Triton compiled for a GPU
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm90_within_its_limits(tmp_path):
    """tests/triton_compile.py: every Triton kernel, at the launch sizes the ops choose on a GPU
    (which the interpreter runs never use), compiled -- not run -- for sm_90 by the installed
    Triton, in every dtype and strategy: it must compile, fit one H100/H200 block (227 KiB of
    shared memory, 255 registers, no spills in the mixture kernels, whose tiles are sized not to
    spill), and take no approximate square root (``tl.sqrt`` is ``sqrt.approx.ftz`` in float32,
    which the interpreter's numpy never shows: RnC's distances had taken it)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    shards = 2  # processes side by side, half the cases each: compiling is most of this test's time
    runs = [subprocess.Popen([sys.executable, os.path.join(TESTS, "triton_compile.py"), "--shard", f"{i}/{shards}",
                              "--json", str(tmp_path / f"compiled-{i}.json")], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
    rows = [row for i in range(shards) for row in json.loads((tmp_path / f"compiled-{i}.json").read_text())["rows"]]
    assert {tag for row in rows for tag in ("float32", "float64", "bfloat16") if tag in row["case"]} == {
        "float32", "float64", "bfloat16"}
    compiled = {(row["case"].split()[0], row["kernel"]) for row in rows}
    expected = {("bin_stats", name) for name in ("_hist_kernel", "_scan_kernel", "_scatter_kernel", "_csr_kernel",
                                                 "_direct_kernel", "_finalize_kernel")}
    expected |= {("calibrate", "_tables_kernel"), ("calibrate", "_apply_kernel"), ("smooth_bins", "_smooth_kernel"),
                 ("mixture_logpdf", "_forward_kernel"), ("mixture_logpdf_backward", "_backward_kernel"),
                 ("mixture_logpdf_with_grads", "_forward_kernel"),
                 ("conr_loss", "_conr_kernel"), ("conr_loss_backward", "_conr_kernel")}
    expected |= {("ranksim_loss", name) for name in ("_rank_kernel", "_row_kernel")}
    expected |= {("ranksim_loss_backward", name) for name in ("_rank_kernel", "_row_kernel", "_surrogate_kernel")}
    expected |= {("rnc_loss", name) for name in ("_pairs_kernel", "_suffix_kernel", "_terms_kernel")}
    expected |= {("rnc_loss_backward", name) for name in ("_pairs_kernel", "_suffix_kernel", "_weights_kernel")}
    assert compiled == expected
    for row in rows:
        assert row["shared_bytes"] <= 227 * 1024 and row["approximate_sqrt"] == 0, row
        if row.get("registers") is not None:  # ptxas comes with Triton's NVIDIA backend
            assert row["registers"] <= 255, row
            if row["case"].startswith("mixture_logpdf"):
                assert row["spill_bytes"] == 0, row


# =========================================================================== the CPU build
CXX = shutil.which(os.environ.get("CXX", "c++"))  # the compiler torch's build uses


def _gcc_on_x86_64_linux() -> bool:
    if not (CXX and sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        return False
    return "Free Software Foundation" in subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout


X86_64_GXX = _gcc_on_x86_64_linux()
CPU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))) + glob.glob(
    os.path.join(ROOT, "csrc", "module.cpp"))


def _compile(source: str, march: str, *extra: str) -> subprocess.CompletedProcess:
    """g++ on one source with setup.py's defines, includes and release flags and ``-march=march``
    (as ``CFLAGS=-march=...`` adds it to a build), ``extra`` after them."""
    import sysconfig

    from torch.utils import cpp_extension

    includes = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "src"), sysconfig.get_paths()["include"]]
    includes += cpp_extension.include_paths()
    command = [CXX, f"-march={march}", "-std=c++20", "-fPIC", "-O3", "-g0", "-fvisibility=hidden", "-Wno-psabi",
               "-w", "-DTORCH_TARGET_VERSION=0x020a000000000000", "-DPy_LIMITED_API=0x030A0000",
               *(f"-I{path}" for path in includes), *extra, source]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _compile_every_cpu_source(out_dir, march: str, mode: str, suffix: str) -> None:
    """Each CPU source compiled (``mode``: ``-S`` or ``-c``) into out_dir/<name><suffix>, in parallel;
    fails with the compiler's messages of any that did not compile."""
    def compile_one(source):
        return _compile(source, march, mode, "-o", str(out_dir / (os.path.basename(source) + suffix)))

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = dict(zip(CPU_SOURCES, pool.map(compile_one, CPU_SOURCES)))
    failed = {os.path.basename(source): run.stderr[-2000:] for source, run in runs.items() if run.returncode != 0}
    assert not failed, failed


@pytest.mark.skipif(not X86_64_GXX, reason="the clones are g++ on x86-64 Linux only")
@pytest.mark.parametrize("march,v3,v4", [("x86-64", "arch=x86-64-v3", "arch=x86-64-v4"),
                                         ("x86-64-v3", None, "arch=x86-64-v4"), ("x86-64-v4", None, None)])
def test_only_instruction_sets_above_the_baseline_are_cloned(march, v3, v4):
    """src/macros.h clones a hot loop for x86-64-v3 and v4 only where the build's baseline (what
    ``-march`` the compiler was given) is below them: lower clones could never run."""
    probe = '#include "macros.h"\nV3 DIRFAST_V3_CLONES\nV4 DIRFAST_V4_CLONES\n'
    done = subprocess.run([CXX, f"-march={march}", "-I", os.path.join(ROOT, "src"), "-E", "-P", "-x", "c++", "-"],
                          input=probe, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line for line in done.stdout.splitlines() if line[:2] in ("V3", "V4")}
    for level, clone in (("V3", v3), ("V4", v4)):
        if clone is None:
            assert "target_clones" not in lines[level], lines[level]
        else:
            assert f'"{clone}"' in lines[level] and '"default"' in lines[level], lines[level]
    assert ('"arch=x86-64-v3"' in lines["V4"]) == (v3 is not None), lines["V4"]


def _fused_multiply_adds(code: str) -> list:
    """The x86 fused multiply-add mnemonics (vfmadd*, vfmsub*, vfnm*) in assembly or a disassembly."""
    return sorted({word for word in code.split() if word.startswith(("vfmadd", "vfmsub", "vfnm"))})


# The kernels that give the same bits on every CPU and fuse no multiply-add of their own.
UNFUSED_SOURCES = ("accumulate_bin_stats.cpp", "bin_stats.cpp", "calibrate.cpp", "smooth_bins.cpp")


@pytest.mark.skipif(not (X86_64_GXX and CPU_SOURCES), reason="needs g++ on x86-64 Linux and the C++ sources")
def test_cpu_sources_compile_for_an_avx512_baseline(tmp_path):
    """``CFLAGS=-march=native pip install .`` on an AVX-512 machine: every CPU source compiles
    with ``-march=x86-64-v4`` (g++ 12 stopped with an internal compiler error on the x86-64-v3
    clone of rnc_loss' exp while src/macros.h cloned levels below the baseline), and the kernels
    that promise the same bits everywhere have no fused multiply-add in them (g++ fused their
    headers' and smooth_bins' a * b + c under an FMA baseline until fp-contract=off came first)."""
    _compile_every_cpu_source(tmp_path, "x86-64-v4", "-S", ".s")
    for name in UNFUSED_SOURCES:
        fused = _fused_multiply_adds((tmp_path / (name + ".s")).read_text())
        assert not fused, (name, fused)


CLONE_SUFFIXES = (".arch_x86_64_v3", ".arch_x86_64_v4", ".default")  # g++'s names for a target_clones clone


@pytest.mark.skipif(not (X86_64_GXX and CPU_SOURCES and shutil.which("nm") and shutil.which("objdump")),
                    reason="needs g++ and binutils on x86-64 Linux and the C++ sources")
def test_every_clone_holds_its_own_body(tmp_path):
    """At the default baseline the hot loops are cloned for x86-64-v3 and v4 (src/macros.h), and
    each clone holds a body compiled for its level: left to g++, some clones were stubs of a jump
    (14 bytes) into one copy built for the baseline (reduce_list's, in some files), so their AVX2
    and AVX-512 code never ran. The kernels that promise the same bits fuse no multiply-add in any
    clone either."""
    _compile_every_cpu_source(tmp_path, "x86-64", "-c", ".o")
    clones = {}
    for source in CPU_SOURCES:
        obj = str(tmp_path / (os.path.basename(source) + ".o"))
        listing = subprocess.run(["nm", "-S", "--defined-only", obj], capture_output=True, text=True, check=True)
        for line in listing.stdout.splitlines():
            fields = line.split()
            if len(fields) == 4 and fields[3].endswith(CLONE_SUFFIXES):
                clones[(os.path.basename(source), fields[3])] = int(fields[1], 16)
    cloned = {name for name, _ in clones}
    assert {"accumulate_bin_stats.cpp", "bin_stats.cpp", "calibrate.cpp", "rnc_loss.cpp"} <= cloned, cloned
    stubs = {clone: size for clone, size in clones.items() if size < 32}
    assert not stubs, stubs
    for name in UNFUSED_SOURCES:
        code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / (name + ".o"))],
                              capture_output=True, text=True, check=True).stdout
        fused = _fused_multiply_adds(code)
        assert not fused, (name, fused)


@pytest.mark.skipif(not (X86_64_GXX and shutil.which("objdump")), reason="needs g++ and binutils on x86-64 Linux")
def test_mixture_vector_code_takes_no_lane_alone(tmp_path):
    """mixture_logpdf's float32 AVX-512 and AVX2 code does no step lane by lane: g++ 12 compiled
    its masks (density 0, a term of -inf) as 16 scalar compares, lane extracts and a branch per lane,
    most of a forward's time at K = 10 (vexp.h's masks by integer arithmetic replaced them), and
    vexp.h's fused multiply-adds as scalar ones in some functions (the one-pass code, in
    intrinsics since, and the two passes over 16-bit x, converted to float32 first since)."""
    obj = tmp_path / "mixture_logpdf.o"
    done = _compile(os.path.join(ROOT, "csrc", "cpu", "mixture_logpdf.cpp"), "x86-64", "-c", "-o", str(obj))
    assert done.returncode == 0, done.stderr[-2000:]
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    functions = re.findall(r"^[0-9a-f]+ <(.*?)>:\n(.*?)(?=\n\n|\Z)", code, flags=re.M | re.S)
    vector = {name: body for name, body in functions if re.search(r"_avx(512|2)\b", name)}
    assert len(vector) >= 4, sorted(vector)  # the forwards and backwards of both widths
    lane_steps = {name: re.findall(r"\b(v?u?comiss|vpextrd|vpinsrd|vfn?m(?:add|sub)\d+ss)\b", body)
                  for name, body in vector.items()}
    assert not any(lane_steps.values()), {name: len(found) for name, found in lane_steps.items() if found}


# =========================================================================== the CUDA build
def _nvcc_found() -> bool:
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes)


def test_cuda_kernels_built_when_torch_has_cuda():
    """A build with a compiler, for a torch with CUDA, on a machine with nvcc, has the CUDA
    kernels and loads them (on a CPU-only torch, a CPU-only build is right)."""
    if _ext.CPU is None or torch.version.cuda is None or not _nvcc_found():
        pytest.skip("a CPU-only build is right here (no compiled extension, a torch without CUDA, or no nvcc)")
    assert _ext.CUDA is not None, _ext.CUDA_REASON
    assert dirfast.backends()["cuda"]["compiled"]


def fatbinaries(path):
    """The device code linked into a shared library: one list of (kind, sm) per fat binary in
    it, kind "cubin" (machine code) or "ptx". Reads nvcc's fat-binary container directly (a
    16-byte header -- magic 0xBA55ED50, version, header size, payload size -- then entries of
    kind, header size and payload size, the architecture at byte 28), so no CUDA tool is needed."""
    data = open(path, "rb").read()
    magic = struct.pack("<I", 0xBA55ED50)
    binaries, position = [], data.find(magic)
    while position >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, position)
        entries, entry, end = [], position + header, position + header + size
        while entry < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            entries.append(({1: "ptx", 2: "cubin"}.get(kind, str(kind)), arch))
            entry += entry_header + entry_size
        binaries.append(entries)
        position = data.find(magic, max(end, position + 4))
    return binaries


@pytest.mark.skipif(_ext.CUDA is None, reason=f"dirfast._C_cuda: {_ext.CUDA_REASON}")
def test_cuda_extension_holds_sm80_sm90_and_ptx_of_every_source():
    """dirfast._C_cuda carries machine code for sm_80 and sm_90 and PTX for later GPUs, from
    every CUDA source."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST chose other architectures")
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if not sources:
        pytest.skip("no CUDA sources next to this dirfast (an installed wheel)")
    binaries = fatbinaries(_ext.CUDA.__file__)
    assert len(binaries) == len(sources), binaries
    for entries in binaries:
        assert {("cubin", 80), ("cubin", 90), ("ptx", 90)} <= set(entries), entries


@pytest.mark.skipif(GPU or _ext.CUDA is None, reason="checks the report of compiled CUDA kernels without a GPU")
def test_without_a_gpu_cuda_is_compiled_not_available():
    """Compiled CUDA kernels on a machine without a GPU: reported compiled, not available, and why."""
    report = dirfast.backends()["cuda"]
    assert report["compiled"] and not report["available"] and "GPU" in report["reason"]


# =========================================================================== CUDA graphs (GPU)
@needs_gpu
@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] in ("cuda", "triton")] + ["auto"])
def test_fds_step_replays_from_a_cuda_graph(backend):
    """bin_stats, smooth_bins and calibrate launch nothing that waits on the host: a whole
    FDS-style step (forward and backward) is captured in a CUDA graph, replayed, and gives the
    output and gradient of the same step run eagerly."""
    g = gen(51)
    x = torch.randn(256, 64, generator=g).cuda().requires_grad_(True)
    idx = torch.randint(0, 20, (256,), generator=g).cuda()
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").float().cuda()

    def step():
        count, mean, var = dirfast.ops.bin_stats(x.detach(), idx, 20)
        m2, v2 = dirfast.ops.smooth_bins(mean, w), dirfast.ops.smooth_bins(var, w)
        out = dirfast.ops.calibrate(x, idx, mean, var, m2, v2)
        out.sum().backward()
        return out

    with dirfast.use_backend(backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile / load the kernels before the capture
                x.grad = None
                step()
        torch.cuda.current_stream().wait_stream(stream)
        x.grad = None
        expected, expected_grad = step().detach().clone(), x.grad.clone()
        x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, expected_grad)
