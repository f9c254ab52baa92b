"""The shared test lists (devices, dtypes, backends), tolerances and input generators.

Kernel issues add a backend to dirfast; every parametrised test here picks it up through
:func:`backend_params` without edits. Nothing here touches CUDA at import beyond
``torch.cuda.is_available()``; the GPU checks at the end run only when a GPU test calls them.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import dirfast
import dirfast.ops

# ----------------------------------------------------------------------------- lists
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Every backend dirfast knows of, in a fixed order; later issues only make more of them available.
BACKEND_NAMES = ["reference", "cpp", "triton", "cuda"]


def backend_info() -> dict:
    return dirfast.backends()


def _all_backend_names() -> list:
    names = list(BACKEND_NAMES)
    for name in backend_info():  # anything new that dirfast reports, too
        if name not in names:
            names.append(name)
    return names


BACKENDS = [name for name, info in backend_info().items() if info.get("available")]


def _backend_skip_reason(name: str):
    info = backend_info().get(name)
    if info is None:
        return f"backend {name!r} not reported by dirfast.backends()"
    if not info.get("available"):
        return f"backend {name!r} unavailable: {info.get('reason', '')}"
    return None


def backend_params():
    """One ``pytest.param`` per backend name; unavailable ones are skipped with the reason
    dirfast gives, so a missing backend shows up as a skip, never silently disappears."""
    for name in _all_backend_names():
        reason = _backend_skip_reason(name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(name, id=name, marks=marks)


def backend_devices(name: str) -> list:
    """The devices a backend runs on, from dirfast.backends() when it says so."""
    info = backend_info().get(name, {})
    if "devices" in info:
        return [d for d in info["devices"] if d in DEVICES or d == "cpu"]
    if name == "cpp":
        return ["cpu"]
    if name == "cuda":
        return ["cuda"]
    if name == "triton":
        if torch.cuda.is_available():
            return ["cuda"]
        return ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    return list(DEVICES)


def backend_device_params(include_auto=True):
    """``(backend, device)`` pairs: every backend on every device of this machine it supports;
    unavailable backends appear once, skipped with their reason. ``"auto"`` (the default
    selection: the ``torch.ops.dirfast`` dispatcher path) is included on every device."""
    if include_auto:
        for dev in DEVICES:
            yield pytest.param("auto", dev, id=f"auto-{dev}")
    for name in _all_backend_names():
        reason = _backend_skip_reason(name)
        if reason:
            yield pytest.param(name, "cpu", id=f"{name}-na", marks=[pytest.mark.skip(reason=reason)])
            continue
        devices = backend_devices(name)
        if not devices:
            yield pytest.param(name, "cpu", id=f"{name}-nodevice",
                               marks=[pytest.mark.skip(reason=f"{name}: no device here")])
        for dev in devices:
            yield pytest.param(name, dev, id=f"{name}-{dev}")


def dtype_params(dtypes=None):
    for dt in dtypes or FLOAT_DTYPES:
        yield pytest.param(dt, id=str(dt).replace("torch.", ""))


# ----------------------------------------------------------------------------- tolerances
# DESIGN rule 9: per dtype.  Statistics of float16/bfloat16 inputs are float32 (the inputs are
# exact in float32), so the *stats* tolerance only depends on the accumulation dtype; outputs
# written back in a low precision dtype get that dtype's tolerance.
_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return dict(_TOL[dtype])


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mean/var come back in (float64 for float64, float32 otherwise, as dirfast.reference.accumulate_dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_tol(dtype: torch.dtype) -> dict:
    return tol(stats_dtype(dtype))


# ----------------------------------------------------------------------------- generators
def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def rand_features(n, d, *, dtype=torch.float32, device="cpu", seed=0, scale=1.0, shift=0.0):
    """``[n, d]`` normal features, generated on the CPU (reproducible) and moved."""
    x = torch.randn(n, d, generator=gen(seed), dtype=torch.float64) * scale + shift
    return x.to(dtype=dtype, device=device)


def rand_bins(shape, num_bins, *, low=0, device="cpu", seed=1, dtype=torch.int64):
    """Bin indices uniformly in ``[low, num_bins)``, any shape."""
    if isinstance(shape, int):
        shape = (shape,)
    idx = torch.randint(low, num_bins, tuple(shape), generator=gen(seed))
    return idx.to(dtype=dtype, device=device)


def rand_int_labels(n, low, high, *, device="cpu", seed=2, dtype=torch.float32):
    """Integer-valued labels in ``[low, high]`` (inclusive), as float by default (targets)."""
    y = torch.randint(low, high + 1, (n,), generator=gen(seed))
    return y.to(dtype=dtype, device=device)


def skewed_int_labels(n, low, high, *, seed=3, dtype=torch.float32):
    """Imbalanced integer labels: many near ``low + (high-low)/3``, few in the tails."""
    g = gen(seed)
    mid = low + (high - low) / 3.0
    y = torch.randn(n, generator=g, dtype=torch.float64) * (high - low) / 6.0 + mid
    y = y.round().clamp(low, high)
    return y.to(dtype)


def rand_stats(num_bins, d, *, dtype=torch.float32, device="cpu", seed=4):
    """Random (m1, v1, m2, v2) with positive variances spread over a wide ratio range."""
    g = gen(seed)
    m1 = torch.randn(num_bins, d, generator=g, dtype=torch.float64)
    m2 = torch.randn(num_bins, d, generator=g, dtype=torch.float64)
    v1 = torch.rand(num_bins, d, generator=g, dtype=torch.float64) * 3 + 0.05
    v2 = torch.rand(num_bins, d, generator=g, dtype=torch.float64) * 3 + 0.05
    return tuple(t.to(dtype=dtype, device=device) for t in (m1, v1, m2, v2))


# ----------------------------------------------------------------------------- modes
@contextlib.contextmanager
def deterministic(on: bool = True):
    """torch.use_deterministic_algorithms(on) for the enclosed code, then as it was."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# ----------------------------------------------------------------------------- GPU checks
def check_fds_step_replays_from_a_cuda_graph(backend: str) -> None:
    """bin_stats, smooth_bins and calibrate launch nothing that waits on the host: a whole
    FDS-style step (forward and backward) on ``backend`` is captured in a CUDA graph, replayed,
    and gives the output and gradient of the same step run eagerly."""
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
