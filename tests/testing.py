"""What the tests share: the lists (devices, dtypes, backends), tolerances, the generators of
features and statistics (one for every memory layout), a pairwise selection of cases, and the
switches (backend, deterministic mode) a test runs under.

A new backend is picked up by every parametrised test through :func:`backend_device_params`
without edits. Nothing here touches CUDA beyond ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import pkgutil

import pytest
import torch

import dirfast

# ----------------------------------------------------------------------------- lists
GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if GPU else [])

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Every backend dirfast knows of, in a fixed order; later issues only make more of them available.
BACKEND_NAMES = list(dirfast.ops.BACKENDS)


def public_modules() -> list:
    """dirfast and each of its modules with an ``__all__`` and no leading underscore in its name
    (the Triton kernels are a backend, not an API: they have none)."""
    modules = [dirfast]
    for info in pkgutil.walk_packages(dirfast.__path__, "dirfast."):
        private = any(part.startswith("_") for part in info.name.split("."))
        if not private and not info.name.startswith("dirfast.triton"):
            module = importlib.import_module(info.name)
            if hasattr(module, "__all__"):
                modules.append(module)
    return modules


def _skip_reason(name: str):
    """Why backend ``name`` cannot run here (dirfast's own reason), or None."""
    info = dirfast.backends().get(name)
    if info is None:
        return f"backend {name!r} not reported by dirfast.backends()"
    if not info["available"]:
        return f"backend {name!r} unavailable: {info['reason']}"
    return None


def backend_params():
    """One ``pytest.param`` per backend name; an unavailable one is skipped with the reason
    dirfast gives, so a missing backend shows up as a skip, never silently disappears."""
    for name in BACKEND_NAMES:
        reason = _skip_reason(name)
        yield pytest.param(name, id=name, marks=[pytest.mark.skip(reason=reason)] if reason else [])


def backend_devices(name: str) -> list:
    """The devices of this machine a backend runs on (Triton: the GPU, else the CPU under its
    interpreter, which conftest.py switches on)."""
    return {"cpp": ["cpu"], "cuda": ["cuda"], "triton": ["cuda" if GPU else "cpu"]}.get(name, DEVICES)


def runs(backend: str, op: str) -> bool:
    """Whether ``backend`` runs ``op`` ("auto" runs every op; "cuda" has no kernel for some: on a
    GPU "auto" and "triton" run them)."""
    return backend == "auto" or op in dirfast.backends()[backend]["ops"]


def backend_device_params(include_auto=True, op=None):
    """``(backend, device)`` pairs: every backend on every device of this machine it supports;
    unavailable backends appear once, skipped with their reason. ``"auto"`` (the default
    selection: torch's dispatcher) is included on every device. ``op``: only the backends that
    run it."""
    if include_auto:
        for device in DEVICES:
            yield pytest.param("auto", device, id=f"auto-{device}")
    for name in BACKEND_NAMES:
        if op is not None and not runs(name, op):
            continue
        reason = _skip_reason(name)
        if reason:
            yield pytest.param(name, "cpu", id=f"{name}-na", marks=[pytest.mark.skip(reason=reason)])
            continue
        for device in backend_devices(name):
            yield pytest.param(name, device, id=f"{name}-{device}")


def dtype_params(dtypes=None):
    for dt in dtypes or FLOAT_DTYPES:
        yield pytest.param(dt, id=str(dt).replace("torch.", ""))


def interpreted(backend: str, device) -> bool:
    """Whether ``backend`` on ``device`` runs Triton under its (slow) CPU interpreter: such cases
    keep their sizes small."""
    return backend == "triton" and torch.device(device).type == "cpu"


def on(backend: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``backend`` selected."""
    with dirfast.use_backend(backend):
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- tolerances
# DESIGN rule 9: per dtype. Statistics of float16/bfloat16 inputs are float32 (the inputs are
# exact in float32), so their tolerance is the accumulation dtype's; outputs written back in a
# low precision dtype get that dtype's tolerance.
_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return dict(_TOL[dtype])


def stats_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the ops compute and return statistics in: float64 when an input is float64,
    else float32 (dirfast.ops._common.acc_dtype, restated here so a change to it is caught)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values, dtypes and shapes, the sign of zeros (and NaN positions) included."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.cpu(), b.cpu()
    assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    if a.is_floating_point():
        assert torch.equal(torch.signbit(a), torch.signbit(b))


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


# ----------------------------------------------------------------------------- layouts
# Every memory layout a kernel may meet: read in place (rows, column-major rows, padded rows,
# dense planes of 1-3 spatial dims, channels-last, batch-major planes) or copied first (a feature
# stride, a sliced spatial axis). Dense layouts hold 2 x 3 x 5 = 30 pixels per channel image.
LAYOUTS = ["rows", "rows_column_major", "rows_padded", "rows_strided", "dense", "dense_channels_last",
           "dense_3d", "dense_5d", "dense_batch_major", "dense_sliced"]


def features(layout: str, dtype=torch.float32, device="cpu", *, num_bins=5, n=37, d=3, seed=0, shift=0.0,
             low=-1, high=None):
    """``(x, bin_idx)`` in ``layout`` with indices uniform in ``[low, high)`` (default
    ``[-1, num_bins + 1)``: rows with -1 and num_bins select no bin). Rows layouts have ``n``
    rows; dense ones ``2 x 15`` pixels, except dense_3d (3 x 10) and dense_5d (2 x 2 x 3 x 5)."""
    high = num_bins + 1 if high is None else high
    g = gen(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) + shift

    if layout == "rows":
        x = rand(n, d)
    elif layout == "rows_column_major":  # read in place as [1, D, N]
        x = rand(d, n).t()
    elif layout == "rows_padded":  # row stride > D: read in place
        x = rand(n, d + 2)[:, 1:-1]
    elif layout == "rows_strided":  # every other row, feature stride 2: copied
        x = rand(2 * n, 2 * d)[::2, ::2]
    elif layout == "dense":
        x = rand(2, d, 3, 5)
    elif layout == "dense_channels_last":  # the rows layout of dense features: read in place
        x = rand(2, d, 3, 5).contiguous(memory_format=torch.channels_last)
    elif layout == "dense_3d":
        x = rand(3, d, 10)
    elif layout == "dense_5d":
        x = rand(2, d, 2, 3, 5)
    elif layout == "dense_batch_major":  # [C, B, HW] in memory: planes with their own strides
        x = rand(d, 2, 3, 5).transpose(0, 1)
    elif layout == "dense_sliced":  # spatial stride 2: copied
        x = rand(2, d, 3, 10)[..., ::2]
    else:
        raise ValueError(layout)
    shape = (x.shape[0],) + tuple(x.shape[2:])
    idx = torch.randint(low, high, shape, generator=g)
    if layout == "rows_strided":
        idx = torch.randint(low, high, (2 * n,), generator=g)[::2]  # a strided bin_idx too
    return x.to(dtype=dtype, device=device), idx.to(device)


def pairwise(*factors):
    """Cases covering every pair of values of any two factors (a greedy all-pairs design): the
    full product adds nothing when the factors act on separate parts of a kernel."""
    factors = [list(f) for f in factors]
    if len(factors) < 2:
        return [tuple(c) for c in itertools.product(*factors)]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(factors)), 2)
                 for a in range(len(factors[i])) for b in range(len(factors[j]))}
    cases = []
    while uncovered:
        best, best_gain = None, -1
        for combo in itertools.product(*(range(len(f)) for f in factors)):
            gain = sum((i, combo[i], j, combo[j]) in uncovered for i, j in itertools.combinations(range(len(factors)), 2))
            if gain > best_gain:
                best, best_gain = combo, gain
        cases.append(tuple(factors[i][k] for i, k in enumerate(best)))
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(factors)), 2)}
    return cases


# ----------------------------------------------------------------------------- modes
@contextlib.contextmanager
def _setting(get, set_, value):
    """``set_(value)`` for the enclosed code, then back to what ``get()`` said before."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def deterministic(on: bool = True):
    """torch.use_deterministic_algorithms(on) for the enclosed code, then as it was."""
    return _setting(torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms, on)


def num_threads(n: int):
    """torch.set_num_threads(n) for the enclosed code, then as it was."""
    return _setting(torch.get_num_threads, torch.set_num_threads, n)


def same_bits_for_threads(run, threads=(1, 2)) -> None:
    """``run()`` (a list of tensors) gives the same bits under each thread count of ``threads``."""
    results = []
    for n in threads:
        with num_threads(n):
            results.append(list(run()))
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, b in zip(results[0], other):
            same_bits(a, b)
