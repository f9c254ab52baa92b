"""The GPU goals of the kernel issues, measured in one run: ``python -m benchmarks.gpu [--json PATH]``.

For each dirfast backend available on the GPU (and the reference), against the published-style
loop and a device-to-device copy of the same bytes:

* ``calibrate`` on 2^26 float32 elements (131,072 x 512): achieved bandwidth, bytes read plus
  written, as a fraction of the copy's;
* ``bin_stats`` on the same tensor: read bandwidth (bytes of ``x`` once) over the copy's;
* ``FDS.smooth`` of a [256, 2048] batch over 100 buckets: speed-up over the published loop;
* a full FDS epoch update (``update_running_stats`` + ``update_last_epoch_stats``) of 200,000 x
  2,048 features: speed-up over the published loop;
* ``smooth_bins`` of a [100, 2048] table (no goal: it decides the CUDA-vs-Triton order);
* no goal either: calibrate and bin_stats on dense [8, 64, 120, 160] features (depth maps), and
  bin_stats with deterministic algorithms on.

At the end, per op, CUDA C++ and Triton in the order of their measured speed (the faster first):
on a GPU the dispatcher runs the CUDA C++ kernel where it is built, which this line checks.

Times come from :mod:`benchmarks.timing`: each case's contenders side by side, medians of
interleaved rounds of CUDA-event-timed blocks.  The "<backend> graph" rows time the same call
replayed from a CUDA graph (GPU time alone, without the per-call host overhead).
``--device cpu --scale 512 --quick`` runs this script on the CPU backends at 1/512 of the rows:
a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import traceback
import dataclasses
from dataclasses import dataclass

import torch

import dirfast

from . import cases, timing
from .published import PublishedFDS

GOALS = {  # from the Triton and CUDA kernel issues
    "calibrate_bandwidth": 0.70,
    "bin_stats_bandwidth": 0.60,
    "smooth_speedup": 50.0,
    "epoch_speedup": 8.0,
}

# GPU time is scarce: about half a second of measurement per contender (--quick: timing.QUICK).
RULES = timing.Rules(repeats=11, min_block_s=0.005, budget_s=0.5)
BACKEND_ORDER = ("cuda", "triton", "cpp", "reference")


@dataclass(frozen=True)
class Where:
    """The device, the factor the row counts are divided by (1 on a GPU) and how long to measure."""

    device: str = "cuda"
    scale: int = 1
    rules: timing.Rules = RULES

    def rows(self, n: int) -> int:
        return max(2, n // self.scale)

    def pixels(self, n: int) -> int:
        return max(2, n // math.isqrt(self.scale))

    def backends(self) -> list:
        """The dirfast backends that run on this device, fastest kind first."""
        runs = [name for name, reason in cases.dirfast_backends(self.device).items() if not reason]
        return sorted(runs, key=lambda name: BACKEND_ORDER.index(name) if name in BACKEND_ORDER else len(BACKEND_ORDER))

    def graph_backends(self) -> list:
        return [name for name in self.backends() if name != "reference"] if self.device == "cuda" else []

    @property
    def bandwidth_case(self) -> str:
        return f"{self.rows(131072)}x512"

    @property
    def smooth_case(self) -> str:
        return f"{self.rows(256)}x2048"


def _on(backend: str, fn):
    """``fn()`` under ``dirfast.use_backend(backend)``."""
    def call():
        with dirfast.use_backend(backend):
            return fn()
    return call


def _deterministic(fn):
    """``fn()`` under ``torch.use_deterministic_algorithms(True)``, then as it was."""
    def call():
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return fn()
        finally:
            torch.use_deterministic_algorithms(previous)
    return call


def _graph(fn):
    """The replay of one call of ``fn`` captured in a CUDA graph: the GPU time of its kernels
    without the host's per-call overhead (argument checks, allocations, launches)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(calls: dict, where: Where) -> dict:
    """Name -> median ms of each call, all timed side by side; a failure is raised."""
    contenders = {name: timing.Contender(fn, device=where.device) for name, fn in calls.items()}
    out = {}
    for name, timed in timing.compare(contenders, where.rules).items():
        if isinstance(timed, Exception):
            raise RuntimeError(f"{name} failed") from timed
        out[name] = timed.median_ms
    return out


def _labels(n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Integer labels 0..99 (buckets 3..99 with bucket_start=3), skewed like ages."""
    ages = torch.randn(n, generator=gen) * 12 + 35
    return ages.round().clamp(0, 99).float().to(device)


def _stats(bins: int, d: int, device: str):
    """Calibration tables (m1, v1, m2, v2), variances at least 0.1."""
    return [torch.randn(bins, d).to(device), torch.rand(bins, d).to(device) + 0.1,
            torch.randn(bins, d).to(device), torch.rand(bins, d).to(device) + 0.1]


def bandwidth_inputs(where: Where, seed: int = 0):
    """(x, idx, bins, stats): 2^26 float32 features (131,072 x 512) over 97 buckets, and
    calibration tables (m1, v1, m2, v2) for them."""
    gen = torch.Generator().manual_seed(seed)
    n, d, bins = where.rows(131072), 512, 97
    x = torch.randn(n, d, generator=gen).to(where.device)
    idx = torch.randint(0, bins, (n,), generator=gen).to(where.device)
    return x, idx, bins, _stats(bins, d, where.device)


def _op_calls(x, idx, bins, stats, backends, wrap=lambda fn: fn, suffix=""):
    """{(op, provider): call} of calibrate and bin_stats on each backend."""
    calls = {}
    for backend in backends:
        calls[("calibrate", backend + suffix)] = wrap(_on(backend, lambda: dirfast.ops.calibrate(x, idx, *stats)))
        calls[("bin_stats", backend + suffix)] = wrap(_on(backend, lambda: dirfast.ops.bin_stats(x, idx, bins)))
    return calls


def bandwidth_cases(results: list, where: Where) -> None:
    x, idx, bins, stats = bandwidth_inputs(where)
    nbytes = x.numel() * x.element_size()
    calls = {("copy", "clone"): lambda: x.clone()}
    calls.update(_op_calls(x, idx, bins, stats, where.backends()))
    calls.update(_op_calls(x, idx, bins, stats, where.graph_backends(), _graph, " graph"))  # GPU time alone
    ms = time_ms(calls, where)
    copy_ms = ms.pop(("copy", "clone"))
    case = where.bandwidth_case
    results.append({"case": f"copy {case}", "provider": "clone", "ms": copy_ms, "GB/s": 2 * nbytes / copy_ms / 1e6})
    for (op, provider), t in ms.items():
        moved = 2 * nbytes if op == "calibrate" else nbytes  # calibrate reads and writes, bin_stats reads
        row = {"case": f"{op} {case}", "provider": provider, "ms": t, "GB/s": moved / t / 1e6,
               "x copy bandwidth": (moved / t) / (2 * nbytes / copy_ms)}
        if not provider.endswith(" graph"):
            row["goal"] = GOALS[f"{op}_bandwidth"]
        results.append(row)


def depth_inputs(where: Where, seed: int = 0):
    """(x, idx, bins, stats) for dense features: [8, 64, 120, 160] float32 (the CPU benchmark's
    depth-map case) over 100 buckets of a smooth depth field (deeper up the image, varying along
    the rows) with a little noise: neighbouring pixels mostly share a bucket, as in depth maps."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w, bins = 8, 64, where.pixels(120), where.pixels(160), 100
    x = torch.randn(b, c, h, w, generator=gen).to(where.device)
    rows = torch.linspace(0, 70, h).view(1, h, 1)
    cols = 3 * torch.sin(torch.linspace(0, 3.1416, w)).view(1, 1, w)
    tilt = torch.rand(b, 1, 1, generator=gen) * 15
    # about 2.2 buckets per 32 neighbouring pixels; 15% of them in a single bucket
    depth = rows + cols + tilt + torch.randn(b, h, w, generator=gen) * 0.05
    idx = depth.round().clamp(0, bins - 1).long().to(where.device)
    return x, idx, bins, _stats(bins, c, where.device)


def layout_cases(results: list, where: Where) -> None:
    """No goal: dense [B, C, H, W] features (planes of pixels: direct atomics in bin_stats), and
    bin_stats under torch.use_deterministic_algorithms(True), against the same copy."""
    x, idx, bins, stats = depth_inputs(where)
    case = "x".join(str(n) for n in x.shape)
    calls = {("copy", "clone"): lambda: x.clone()}
    calls.update(_op_calls(x, idx, bins, stats, where.backends()))
    ms = time_ms(calls, where)
    copy_ms = ms.pop(("copy", "clone"))
    results.append({"case": f"copy {case}", "provider": "clone", "ms": copy_ms})
    for (op, provider), t in ms.items():
        ratio = copy_ms / t if op == "calibrate" else copy_ms / (2 * t)
        results.append({"case": f"{op} {case}", "provider": provider, "ms": t, "x copy bandwidth": ratio})
    x, idx, bins, _ = bandwidth_inputs(where)
    calls = {"clone": lambda: x.clone()}
    for backend in where.backends():
        calls[backend] = _deterministic(_on(backend, lambda: dirfast.ops.bin_stats(x, idx, bins)))
    ms = time_ms(calls, where)
    copy_ms = ms.pop("clone")
    for provider, t in ms.items():
        results.append({"case": f"bin_stats {where.bandwidth_case} determ.", "provider": provider, "ms": t,
                        "x copy bandwidth": copy_ms / (2 * t)})


def _fitted_pair(d: int, n_fit: int, gen: torch.Generator, device: str):
    """A published and a dirfast FDS with the same statistics (one epoch of updates)."""
    feats = torch.randn(n_fit, d, generator=gen).to(device)
    labels = _labels(n_fit, gen, device)
    published = PublishedFDS(d, device=device)
    ours = dirfast.FDS(d).to(device)
    for fds in (published, ours):
        fds.update_running_stats(feats, labels, 0)
        fds.update_last_epoch_stats(1)
    return published, ours


def _speedups(results: list, case: str, ms: dict, goal: float) -> None:
    base = ms.pop("published")
    results.append({"case": case, "provider": "published", "ms": base})
    for provider, t in ms.items():
        results.append({"case": case, "provider": provider, "ms": t, "x faster than published": base / t,
                        "goal": goal})


def smooth_cases(results: list, where: Where) -> None:
    gen = torch.Generator().manual_seed(1)
    d = 2048
    published, ours = _fitted_pair(d, where.rows(20000), gen, where.device)
    batch = torch.randn(where.rows(256), d, generator=gen).to(where.device)
    labels = _labels(batch.shape[0], gen, where.device).unsqueeze(1)
    work = batch.clone()
    calls = {"published": lambda: published.smooth(work.copy_(batch), labels, 1)}
    for backend in where.backends():
        calls[backend] = _on(backend, lambda: ours.smooth(work.copy_(batch), labels, 1))
    _speedups(results, f"FDS.smooth {where.smooth_case}", time_ms(calls, where), GOALS["smooth_speedup"])


def epoch_cases(results: list, where: Where) -> None:
    gen = torch.Generator().manual_seed(2)
    n, d = where.rows(200000), 2048
    feats = torch.randn(n, d, generator=gen).to(where.device)
    labels = _labels(n, gen, where.device)
    published, ours = PublishedFDS(d, device=where.device), dirfast.FDS(d).to(where.device)

    def epoch(fds):
        def run():
            fds.epoch.fill_(0)
            fds.update_running_stats(feats, labels, 0)
            fds.update_last_epoch_stats(1)
        return run

    calls = {"published": epoch(published)}
    calls.update({backend: _on(backend, epoch(ours)) for backend in where.backends()})
    _speedups(results, f"FDS epoch update {n}x{d}", time_ms(calls, where), GOALS["epoch_speedup"])


def smooth_bins_cases(results: list, where: Where) -> None:
    gen = torch.Generator().manual_seed(3)
    stats = torch.randn(100, 2048, generator=gen).to(where.device)
    window = dirfast.kernel_window("gaussian", 5, 2.0).float().to(where.device)
    calls = {backend: _on(backend, lambda: dirfast.ops.smooth_bins(stats, window)) for backend in where.backends()}
    for provider, t in time_ms(calls, where).items():
        results.append({"case": "smooth_bins 100x2048", "provider": provider, "ms": t})


def deciding_cases(where: Where) -> dict:
    """The case that decides each op's order of GPU backends."""
    return {"bin_stats": f"bin_stats {where.bandwidth_case}", "calibrate": f"calibrate {where.bandwidth_case}",
            "calibrate_": f"FDS.smooth {where.smooth_case}", "smooth_bins": "smooth_bins 100x2048"}


def preference(rows: list, where: Where = Where()) -> dict:
    """Per op, ("cuda", "triton") ordered by the measured median time of its deciding case."""
    order = {}
    for op, case in deciding_cases(where).items():
        times = {row["provider"]: row["ms"] for row in rows if row["case"] == case}
        measured = [name for name in ("cuda", "triton") if name in times]
        ranked = sorted(measured, key=lambda name: times[name])
        order[op] = tuple(ranked + [name for name in ("cuda", "triton") if name not in ranked])
    return order


def kernel_profile(where: Where, top: int = 12) -> str:
    """Per-kernel GPU time of one bin_stats and one calibrate call (131,072 x 512) on each GPU
    backend, from torch.profiler: where the time of an op goes, launch by launch."""
    from torch.profiler import ProfilerActivity, profile

    x, idx, bins, stats = bandwidth_inputs(where, seed=4)
    depth_x, depth_idx, depth_bins, _ = depth_inputs(where)
    jobs = []  # (heading, backend, call)
    for backend in where.graph_backends():
        jobs.append((f"bin_stats on {backend}", backend, lambda: dirfast.ops.bin_stats(x, idx, bins)))
        jobs.append((f"calibrate on {backend}", backend, lambda: dirfast.ops.calibrate(x, idx, *stats)))
        jobs.append((f"bin_stats {tuple(depth_x.shape)} on {backend}", backend,
                     lambda: dirfast.ops.bin_stats(depth_x, depth_idx, depth_bins)))
    sections = []
    for heading, backend, call in jobs:
        with dirfast.use_backend(backend):
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    call()
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top)
        sections.append(f"--- {heading} (5 calls)\n{table}")
    return "\n".join(sections)


def format_rows(rows: list) -> str:
    lines = [f"{'case':<30} {'provider':<19} {'median ms':>10} {'ratio':>8} {'goal':>6}"]
    for row in rows:
        ratio = row.get("x copy bandwidth", row.get("x faster than published"))
        lines.append(f"{row['case']:<30} {row['provider']:<19} {row['ms']:>10.3f} "
                     f"{'' if ratio is None else format(ratio, '.2f'):>8} {row.get('goal', ''):>6}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON (a folder: named after the GPU)")
    parser.add_argument("--profile", metavar="PATH",
                        help="also write the per-kernel GPU times of bin_stats and calibrate to PATH")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only to smoke-test this script (with --scale)")
    parser.add_argument("--scale", type=int, default=1, help="divide the row counts by this (default 1)")
    parser.add_argument("--quick", action="store_true", help="shorter measurements (benchmarks.timing.QUICK)")
    args = parser.parse_args(argv)
    where = Where(args.device, max(1, args.scale), timing.QUICK if args.quick else RULES)
    if where.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU")
    if args.profile and where.device != "cuda":
        raise SystemExit("benchmarks.gpu: --profile needs the GPU")
    load_before, busy = timing.load_report(where.device)
    info = timing.machine_info(where.device, busy)
    name = info["gpu"] or f"{info['cpu']} (smoke test, rows / {where.scale})"
    print(f"{'GPU' if info['gpu'] else 'CPU'}: {name}; torch {torch.__version__}; backends: {where.backends()}",
          flush=True)
    print(load_before, flush=True)
    rows: list = []
    failed = []
    for step in (bandwidth_cases, smooth_cases, smooth_bins_cases, epoch_cases, layout_cases):
        print(f"running {step.__name__} ...", flush=True)
        try:
            step(rows, where)
        except Exception:  # noqa: BLE001 - GPU time is scarce: keep the other steps' rows
            traceback.print_exc()
            failed.append(step.__name__)
    load_after, busy_after = timing.load_report(where.device, running=True)
    table = format_rows(rows)
    if args.json:
        path = args.json
        if os.path.isdir(path):
            slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
            path = os.path.join(path, f"gpu-goals-{slug}.json")
        info.update(load_average_after=timing.load_average(), busy_after=busy_after)
        with open(path, "w") as handle:
            json.dump({"gpu": name, "torch": torch.__version__, "machine": info, "rules": dataclasses.asdict(where.rules),
                       "rows": rows, "failed_steps": failed, "cuda_preference": preference(rows, where)},
                      handle, indent=1)
        print(f"wrote {timing.shown_path(path)}")
    if args.profile:
        try:
            text = kernel_profile(where)
        except Exception as exc:  # noqa: BLE001 - the goals above stand without the profile
            text = f"profiling failed: {type(exc).__name__}: {exc}"
        with open(args.profile, "w") as handle:
            handle.write(text + "\n")
        print(f"wrote {timing.shown_path(args.profile)}")
    print(table)
    print(load_before)
    print(load_after)
    print(f"GPU backends by speed on {name}: {preference(rows, where)}")
    if failed:
        raise SystemExit(f"benchmarks.gpu: {', '.join(failed)} failed (traceback above)")


if __name__ == "__main__":
    main()
