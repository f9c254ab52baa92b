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

At the end, the per-op order of CUDA C++ and Triton that ``dirfast.ops._dispatch.CUDA_PREFERENCE``
should hold on this GPU (the faster first).

Times are medians of CUDA-event-timed calls after a warm-up; the "<backend> graph" rows time the
same call replayed from a CUDA graph (GPU time alone, without the per-call host overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import traceback

import torch

import dirfast

from benchmarks.published import PublishedFDS

GOALS = {  # from the Triton and CUDA kernel issues
    "calibrate_bandwidth": 0.70,
    "bin_stats_bandwidth": 0.60,
    "smooth_speedup": 50.0,
    "epoch_speedup": 8.0,
}


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms(True) for the enclosed code, then as it was."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def time_ms(fn, warmup: int = 3, repeat: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn) -> float:
    """Median milliseconds of one call captured in a CUDA graph and replayed: the GPU time of
    its kernels without the host's per-call overhead (argument checks, allocations, launches)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay)


def _labels(n: int, gen: torch.Generator) -> torch.Tensor:
    """Integer labels 0..99 (buckets 3..99 with bucket_start=3), skewed like ages."""
    ages = torch.randn(n, generator=gen) * 12 + 35
    return ages.round().clamp(0, 99).float().cuda()


def _backends() -> list:
    report = dirfast.backends()
    return [name for name in ("cuda", "triton", "reference") if report[name]["available"]]


def bandwidth_inputs(seed: int = 0):
    """(x, idx, bins, stats): 2^26 float32 features (131,072 x 512) over 97 buckets, and
    calibration tables (m1, v1, m2, v2) for them."""
    gen = torch.Generator().manual_seed(seed)
    n, d, bins = 131072, 512, 97
    x = torch.randn(n, d, generator=gen).cuda()
    idx = torch.randint(0, bins, (n,), generator=gen).cuda()
    stats = [torch.randn(bins, d).cuda(), torch.rand(bins, d).cuda() + 0.1,
             torch.randn(bins, d).cuda(), torch.rand(bins, d).cuda() + 0.1]
    return x, idx, bins, stats


def bandwidth_cases(results: list) -> None:
    x, idx, bins, stats = bandwidth_inputs()
    nbytes = x.numel() * x.element_size()
    copy_ms = time_ms(lambda: x.clone())
    copy_bw = 2 * nbytes / copy_ms / 1e6  # GB/s, read + write
    results.append({"case": "copy 131072x512", "provider": "clone", "ms": copy_ms, "GB/s": copy_bw})
    for backend in _backends():
        with dirfast.use_backend(backend):
            ms = time_ms(lambda: dirfast.ops.calibrate(x, idx, *stats))
            results.append({"case": "calibrate 131072x512", "provider": backend, "ms": ms,
                            "GB/s": 2 * nbytes / ms / 1e6, "x copy bandwidth": (2 * nbytes / ms) / (2 * nbytes / copy_ms),
                            "goal": GOALS["calibrate_bandwidth"]})
            ms = time_ms(lambda: dirfast.ops.bin_stats(x, idx, bins))
            results.append({"case": "bin_stats 131072x512", "provider": backend, "ms": ms,
                            "GB/s": nbytes / ms / 1e6, "x copy bandwidth": (nbytes / ms) / (2 * nbytes / copy_ms),
                            "goal": GOALS["bin_stats_bandwidth"]})
    for backend in [name for name in _backends() if name != "reference"]:  # GPU time alone
        with dirfast.use_backend(backend):
            ms = graph_ms(lambda: dirfast.ops.calibrate(x, idx, *stats))
            results.append({"case": "calibrate 131072x512", "provider": backend + " graph", "ms": ms,
                            "GB/s": 2 * nbytes / ms / 1e6, "x copy bandwidth": (2 * nbytes / ms) / (2 * nbytes / copy_ms)})
            ms = graph_ms(lambda: dirfast.ops.bin_stats(x, idx, bins))
            results.append({"case": "bin_stats 131072x512", "provider": backend + " graph", "ms": ms,
                            "GB/s": nbytes / ms / 1e6, "x copy bandwidth": (nbytes / ms) / (2 * nbytes / copy_ms)})


def depth_inputs(seed: int = 0):
    """(x, idx, bins, stats) for dense features: [8, 64, 120, 160] float32 (the CPU benchmark's
    depth-map case) over 100 buckets of a smooth depth field (deeper up the image, varying along
    the rows) with a little noise: neighbouring pixels mostly share a bucket, as in depth maps."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w, bins = 8, 64, 120, 160, 100
    x = torch.randn(b, c, h, w, generator=gen).cuda()
    rows = torch.linspace(0, 70, h).view(1, h, 1)
    cols = 3 * torch.sin(torch.linspace(0, 3.1416, w)).view(1, 1, w)
    tilt = torch.rand(b, 1, 1, generator=gen) * 15
    # about 2.2 buckets per 32 neighbouring pixels; 15% of them in a single bucket
    depth = rows + cols + tilt + torch.randn(b, h, w, generator=gen) * 0.05
    idx = depth.round().clamp(0, bins - 1).long().cuda()
    stats = [torch.randn(bins, c).cuda(), torch.rand(bins, c).cuda() + 0.1,
             torch.randn(bins, c).cuda(), torch.rand(bins, c).cuda() + 0.1]
    return x, idx, bins, stats


def layout_cases(results: list) -> None:
    """No goal: dense [B, C, H, W] features (planes of pixels: direct atomics in bin_stats), and
    bin_stats under torch.use_deterministic_algorithms(True), against the same copy."""
    x, idx, bins, stats = depth_inputs()
    copy_ms = time_ms(lambda: x.clone())
    case = "x".join(str(n) for n in x.shape)
    results.append({"case": f"copy {case}", "provider": "clone", "ms": copy_ms})
    for backend in _backends():
        with dirfast.use_backend(backend):
            ms = time_ms(lambda: dirfast.ops.calibrate(x, idx, *stats))
            results.append({"case": f"calibrate {case}", "provider": backend, "ms": ms,
                            "x copy bandwidth": copy_ms / ms})
            ms = time_ms(lambda: dirfast.ops.bin_stats(x, idx, bins))
            results.append({"case": f"bin_stats {case}", "provider": backend, "ms": ms,
                            "x copy bandwidth": copy_ms / (2 * ms)})
    x, idx, bins, _ = bandwidth_inputs()
    copy_ms = time_ms(lambda: x.clone())
    for backend in _backends():
        with dirfast.use_backend(backend), deterministic():
            ms = time_ms(lambda: dirfast.ops.bin_stats(x, idx, bins))
            results.append({"case": "bin_stats 131072x512 determ.", "provider": backend, "ms": ms,
                            "x copy bandwidth": copy_ms / (2 * ms)})


def _fitted_pair(d: int, n_fit: int, gen: torch.Generator):
    """A published and a dirfast FDS with the same statistics (one epoch of updates)."""
    feats = torch.randn(n_fit, d, generator=gen).cuda()
    labels = _labels(n_fit, gen)
    published = PublishedFDS(d, device="cuda")
    ours = dirfast.FDS(d).cuda()
    for fds in (published, ours):
        fds.update_running_stats(feats, labels, 0)
        fds.update_last_epoch_stats(1)
    return published, ours


def smooth_cases(results: list) -> None:
    gen = torch.Generator().manual_seed(1)
    d = 2048
    published, ours = _fitted_pair(d, 20000, gen)
    batch = torch.randn(256, d, generator=gen).cuda()
    labels = _labels(256, gen).unsqueeze(1)
    work = batch.clone()
    base = time_ms(lambda: published.smooth(work.copy_(batch), labels, 1))
    results.append({"case": "FDS.smooth 256x2048", "provider": "published", "ms": base})
    for backend in _backends():
        with dirfast.use_backend(backend):
            ms = time_ms(lambda: ours.smooth(work.copy_(batch), labels, 1))
        results.append({"case": "FDS.smooth 256x2048", "provider": backend, "ms": ms,
                        "x faster than published": base / ms, "goal": GOALS["smooth_speedup"]})


def epoch_cases(results: list) -> None:
    gen = torch.Generator().manual_seed(2)
    n, d = 200000, 2048
    feats = torch.randn(n, d, generator=gen).cuda()
    labels = _labels(n, gen)
    published, ours = PublishedFDS(d, device="cuda"), dirfast.FDS(d).cuda()

    def epoch(fds):
        def run():
            fds.epoch.fill_(0)
            fds.update_running_stats(feats, labels, 0)
            fds.update_last_epoch_stats(1)
        return run

    base = time_ms(epoch(published), warmup=1, repeat=5)
    results.append({"case": "FDS epoch update 200000x2048", "provider": "published", "ms": base})
    for backend in _backends():
        with dirfast.use_backend(backend):
            ms = time_ms(epoch(ours), warmup=1, repeat=5)
        results.append({"case": "FDS epoch update 200000x2048", "provider": backend, "ms": ms,
                        "x faster than published": base / ms, "goal": GOALS["epoch_speedup"]})


def smooth_bins_cases(results: list) -> None:
    gen = torch.Generator().manual_seed(3)
    stats = torch.randn(100, 2048, generator=gen).cuda()
    window = dirfast.kernel_window("gaussian", 5, 2.0).float().cuda()
    for backend in _backends():
        with dirfast.use_backend(backend):
            ms = time_ms(lambda: dirfast.ops.smooth_bins(stats, window))
        results.append({"case": "smooth_bins 100x2048", "provider": backend, "ms": ms})


# The case that decides each op's order in CUDA_PREFERENCE.
DECIDING_CASE = {"bin_stats": "bin_stats 131072x512", "calibrate": "calibrate 131072x512",
                 "calibrate_": "FDS.smooth 256x2048", "smooth_bins": "smooth_bins 100x2048"}


def preference(rows: list) -> dict:
    """Per op, ("cuda", "triton") ordered by the measured median time of its deciding case."""
    order = {}
    for op, case in DECIDING_CASE.items():
        times = {row["provider"]: row["ms"] for row in rows if row["case"] == case}
        measured = [name for name in ("cuda", "triton") if name in times]
        ranked = sorted(measured, key=lambda name: times[name])
        order[op] = tuple(ranked + [name for name in ("cuda", "triton") if name not in ranked])
    return order


def kernel_profile(top: int = 12) -> str:
    """Per-kernel GPU time of one bin_stats and one calibrate call (131,072 x 512) on each GPU
    backend, from torch.profiler: where the time of an op goes, launch by launch."""
    from torch.profiler import ProfilerActivity, profile

    x, idx, bins, stats = bandwidth_inputs(seed=4)
    depth_x, depth_idx, depth_bins, _ = depth_inputs()
    jobs = []  # (heading, backend, call)
    for backend in [name for name in _backends() if name != "reference"]:
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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU")
    name = torch.cuda.get_device_name(0)
    print(f"GPU: {name}; torch {torch.__version__}; backends: {_backends()}", flush=True)
    rows: list = []
    failed = []
    for step in (bandwidth_cases, smooth_cases, smooth_bins_cases, epoch_cases, layout_cases):
        print(f"running {step.__name__} ...", flush=True)
        try:
            step(rows)
        except Exception:  # noqa: BLE001 - GPU time is scarce: keep the other steps' rows
            traceback.print_exc()
            failed.append(step.__name__)
    table = format_rows(rows)
    if args.json:
        path = args.json
        if os.path.isdir(path):
            slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
            path = os.path.join(path, f"gpu-goals-{slug}.json")
        with open(path, "w") as handle:
            json.dump({"gpu": name, "torch": torch.__version__, "rows": rows, "failed_steps": failed,
                       "cuda_preference": preference(rows)}, handle, indent=1)
        print(f"wrote {path}")
    if args.profile:
        try:
            text = kernel_profile()
        except Exception as exc:  # noqa: BLE001 - the goals above stand without the profile
            text = f"profiling failed: {type(exc).__name__}: {exc}"
        with open(args.profile, "w") as handle:
            handle.write(text + "\n")
        print(f"wrote {args.profile}")
    print(table)
    print(f"CUDA_PREFERENCE on {name}: {preference(rows)}")
    if failed:
        raise SystemExit(f"benchmarks.gpu: {', '.join(failed)} failed (traceback above)")


if __name__ == "__main__":
    main()
