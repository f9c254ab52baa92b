"""What the tests share: the lists (devices, dtypes, backends), tolerances, the one generator of
feature layouts, the one check of bin statistics, and a pairwise selection of cases.

A new backend is picked up by every parametrised test through :func:`backend_device_params`
without edits. Nothing here touches CUDA at import beyond ``torch.cuda.is_available()``; the GPU
checks at the end run only when a GPU test calls them.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import torch

import dirfast
import dirfast.ops
import dirfast.reference
import oracle

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


def check_bin_stats(result, x, idx, num_bins, *, against="oracle"):
    """The one check of ``bin_stats`` output: dtypes, shapes and device, the counts exactly, the
    mean and variance within the dtype's tolerance of the float64 loop oracle (or, for inputs
    too large for it, ``against="reference"``), empty bins 0, single-row bins variance 0."""
    count, mean, var = result
    sd = stats_dtype(x.dtype)
    assert count.dtype == torch.int64 and count.shape == (num_bins,)
    assert mean.dtype == sd and var.dtype == sd, (mean.dtype, var.dtype)
    assert mean.shape == (num_bins, x.shape[1]) and var.shape == (num_bins, x.shape[1])
    assert count.device == x.device and mean.device == x.device and var.device == x.device
    if against == "oracle":
        e_count, e_mean, e_var = oracle.bin_stats(x, idx, num_bins)
    else:
        e_count, e_mean, e_var = (t.cpu().double() for t in dirfast.reference.bin_stats(x.cpu().double(), idx.cpu(),
                                                                                       num_bins))
    count, mean, var = count.cpu(), mean.cpu(), var.cpu()
    torch.testing.assert_close(count, e_count.long(), rtol=0, atol=0)
    t = stats_tol(x.dtype)
    torch.testing.assert_close(mean.double(), e_mean, **t)
    torch.testing.assert_close(var.double(), e_var, **t)
    assert torch.all(mean[count == 0] == 0) and torch.all(var[count <= 1] == 0) and torch.all(var >= 0)


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
