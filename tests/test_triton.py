"""What is particular to the Triton backend: its availability report, its two bin_stats
strategies and their chunks, its deterministic mode, the float64 clip bounds it passes as two
float32 numbers, its kernels compiled for a GPU, and (with a GPU) larger sizes and CUDA graphs.
The op contract it shares with every backend is tested in test_ops.py.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import dirfast
import dirfast.reference as reference
from testing import (FLOAT_DTYPES, LAYOUTS, check_bin_stats, check_fds_step_replays_from_a_cuda_graph, deterministic,
                     features, gen, rand_stats)

pytestmark = pytest.mark.skipif(
    not dirfast.backends()["triton"]["available"],
    reason=f"triton backend unavailable: {dirfast.backends()['triton']['reason']}",
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def triton_bin_stats(x, idx, num_bins, **path):
    from dirfast.triton import bin_stats as module

    return module.bin_stats(x, idx, num_bins, **path)


def test_backend_reported_available():
    import dirfast.triton as dirfast_triton

    assert dirfast_triton.unavailable_reason() == ""
    for op in ("triton_bin_stats", "triton_smooth_bins", "triton_calibrate", "triton_calibrate_"):
        assert hasattr(torch.ops.dirfast, op)
    assert dirfast_triton._version_ok("3.6.0") and dirfast_triton._version_ok("3.7.1+git1234")
    assert dirfast_triton._version_ok("4.0.0") and not dirfast_triton._version_ok("3.5.1")
    assert dirfast_triton._version_tuple("3.6.0rc1") == (3, 6, 0)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_backend_runs_the_triton_ops():
    x, idx = features("rows", torch.float32, DEVICE, num_bins=6)
    stats = rand_stats(6, 3, device=DEVICE)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum").to(DEVICE)
    with dirfast.use_backend("triton"), _OpRecorder() as rec:
        _, mean, _ = dirfast.ops.bin_stats(x, idx, 6)
        dirfast.ops.smooth_bins(mean, w)
        dirfast.ops.calibrate(x, idx, *stats)
        dirfast.ops.calibrate_(x.clone(), idx, *stats)
    for op in ("triton_bin_stats", "triton_smooth_bins", "triton_calibrate", "triton_calibrate_"):
        assert f"dirfast.{op}.default" in rec.names, rec.names


# ----------------------------------------------------------------------------- bin_stats paths
@pytest.mark.parametrize("strategy", ["csr", "direct"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bin_stats_strategies(layout, strategy):
    """Both strategies on every layout, with chunks of 4 and 8 rows (bins cut in several)."""
    x, idx = features(layout, torch.float32, DEVICE, num_bins=6, seed=len(layout))
    for chunk_rows in (4, 8):
        check_bin_stats(triton_bin_stats(x, idx, 6, strategy=strategy, chunk_rows=chunk_rows), x, idx, 6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_bin_stats_dtypes_and_modes(dtype, det):
    """Every dtype in the atomic and deterministic modes, bins of one chunk and of several."""
    x, idx = features("rows", dtype, DEVICE, num_bins=6, n=70, d=5, seed=3)
    with deterministic(det):
        check_bin_stats(triton_bin_stats(x, idx, 6, chunk_rows=4), x, idx, 6)
        check_bin_stats(triton_bin_stats(x, idx, 6), x, idx, 6)


@pytest.mark.parametrize("layout", ["rows", "dense"])
@pytest.mark.parametrize("mode", ["csr", "direct", "deterministic"])
def test_bin_stats_accuracy_at_mean_1000_std(layout, mode):
    """float32 variance within 1e-4 (relative) of float64 when mean/std = 1000, on each path."""
    if layout == "rows":
        x = (torch.randn(1500, 4, generator=gen(11), dtype=torch.float64) + 1000.0).float().to(DEVICE)
        idx = torch.randint(0, 4, (1500,), generator=gen(12)).to(DEVICE)
    else:
        x = (torch.randn(2, 4, 24, 32, generator=gen(11), dtype=torch.float64) + 1000.0).float().to(DEVICE)
        idx = torch.randint(0, 4, (2, 24, 32), generator=gen(12)).to(DEVICE)
    path = {} if mode == "deterministic" else {"strategy": mode}
    with deterministic(mode == "deterministic"):
        _, mean, var = triton_bin_stats(x, idx, 4, chunk_rows=16, **path)
    _, e_mean, e_var = reference.bin_stats(x.double(), idx, 4)
    assert torch.all(e_var > 0.5)
    assert ((var.double() - e_var).abs() / e_var).max() < 1e-4
    torch.testing.assert_close(mean.double(), e_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_deterministic_is_bitwise_reproducible(layout):
    x, idx = features(layout, torch.float32, DEVICE, num_bins=6, n=200, d=5, seed=13)
    with deterministic():
        first = triton_bin_stats(x, idx, 6, chunk_rows=4)
        second = triton_bin_stats(x, idx, 6, chunk_rows=4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_bin_stats(first, x, idx, 6)


def test_bin_stats_rejects_an_unknown_strategy():
    x, idx = features("rows", torch.float32, DEVICE)
    with pytest.raises(ValueError, match="strategy"):
        triton_bin_stats(x, idx, 5, strategy="tiles")


# ----------------------------------------------------------------------------- calibrate
@pytest.mark.parametrize("clip_min, clip_max", [(0.1, 10.0), (0.5, 2.0), (0.0, float("inf")), (1.0 / 3.0, 3.0)])
def test_calibrate_float64_clip_bounds_exact(clip_min, clip_max):
    """Kernel arguments reach Triton as float32: a float64 clip bound travels as two float32
    numbers whose sum is the bound (to ~1e-15), so float64 statistics clip where the reference
    does."""
    x, idx = features("rows", torch.float64, DEVICE, num_bins=6, d=4, seed=22)
    stats = list(rand_stats(6, 4, dtype=torch.float64, device=DEVICE))
    at_bounds = [clip_min or 0.5, clip_max if clip_max < float("inf") else 1e6, 3.0, 1.0 / 3.0]  # ratios on the bounds
    stats[3] = stats[1] * torch.tensor(at_bounds, dtype=torch.float64, device=DEVICE)
    with dirfast.use_backend("triton"):
        got = dirfast.ops.calibrate(x, idx, *stats, clip_min, clip_max)
    torch.testing.assert_close(got, reference.calibrate(x, idx, *stats, clip_min, clip_max), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- compiled for a GPU
def test_every_kernel_compiles_for_sm90_within_its_limits(tmp_path):
    """tests/triton_compile.py: every Triton kernel, at the launch sizes the ops choose on a GPU
    (which the interpreter runs above never use), compiled -- not run -- for sm_90 by the
    installed Triton, in every dtype and strategy: it must compile, and fit one H100/H200 block
    (227 KiB of shared memory, 255 registers)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    done = subprocess.run([sys.executable, os.path.join(here, "triton_compile.py"), "--json", str(out)],
                          cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    compiled = {(row["case"].split()[0], row["kernel"]) for row in rows}
    expected = {("bin_stats", name) for name in ("_hist_kernel", "_scan_kernel", "_scatter_kernel", "_csr_kernel",
                                                 "_direct_kernel", "_finalize_kernel")}
    expected |= {("calibrate", "_tables_kernel"), ("calibrate", "_apply_kernel"), ("smooth_bins", "_smooth_kernel"),
                 ("mixture_logpdf", "_forward_kernel"), ("mixture_logpdf_backward", "_backward_kernel")}
    assert compiled == expected
    for row in rows:
        assert row["shared_bytes"] <= 227 * 1024, row
        if row.get("registers") is not None:  # ptxas comes with Triton's NVIDIA backend
            assert row["registers"] <= 255, row
            if row["case"].startswith("mixture_logpdf"):  # its tiles are sized not to spill
                assert row["spill_bytes"] == 0, row


# ----------------------------------------------------------------------------- GPU only
@needs_gpu
def test_gpu_larger_sizes():
    g = gen(50)
    x = torch.randn(20000, 300, generator=g).cuda()
    idx = torch.randint(-1, 101, (20000,), generator=g).cuda()
    for det in (False, True):
        with deterministic(det):
            check_bin_stats(triton_bin_stats(x, idx, 100), x, idx, 100, against="reference")
    xd = torch.randn(4, 32, 60, 80, generator=g).cuda()
    idxd = torch.randint(-1, 97, (4, 60, 80), generator=g).cuda()
    check_bin_stats(triton_bin_stats(xd, idxd, 97), xd, idxd, 97, against="reference")
    stats = rand_stats(97, 32, device="cuda")
    with dirfast.use_backend("triton"):
        got = dirfast.ops.calibrate(xd, idxd, *stats)
    torch.testing.assert_close(got, reference.calibrate(xd, idxd, *stats), rtol=2e-5, atol=2e-5)


@needs_gpu
def test_gpu_cuda_graph_capture_of_an_fds_step():
    check_fds_step_replays_from_a_cuda_graph("triton")


@needs_gpu
def test_gpu_compile_inductor_fullgraph():
    x = torch.randn(512, 64, device="cuda")
    idx = torch.randint(0, 10, (512,), device="cuda")
    stats = rand_stats(10, 64, device="cuda")

    def step(x):
        return torch.relu(dirfast.ops.calibrate(x * 2, idx, *stats))

    with dirfast.use_backend("triton"):
        torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))
