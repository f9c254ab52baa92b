"""dirfast on one thread against more, in one process: ``python -m benchmarks.threads
[--threads 1,2] [--cpu-threads free|all] [--quick] [--ops ...] [--sizes ...] [--bins ...] [--K ...]
[--labels ...] [--json PATH]``.

Two runs of ``benchmarks.run --threads N`` are two processes, and on a shared VM each process can
run at a speed of its own: a 2-thread run slower than a 1-thread one may be the host, not the
kernel. Here each case's dirfast op (the ``cpp`` backend; ``DenseWeight.fit`` and its weights for
density) is timed at every thread count side by side, by :func:`benchmarks.timing.compare` with the
thread count set before each block, so that a change of the machine's speed hits every count
alike. Prints each case's median per thread count and its speed-up over the fewest threads, then
names the cases where more threads took longer. ``--cpu-threads`` is the policy of
``dirfast.set_cpu_threads`` for the run (left out: dirfast's default, ``"free"``). CPU only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time

import torch

from . import cases as C
from . import timing

DEFAULT_OPS = ("bin_stats", "calibrate", "calibrate_", "fds_smooth", "mixture_logpdf", "density")
SIZES = ("256x512", "65536x512")  # a training batch, and the sizes of benchmarks.run


def provider(op: str) -> str:
    """The dirfast provider of an op's cases on the CPU."""
    return "dirfast" if op == "density" else "cpp"


def measure_case(case: C.Case, threads: list, rules: timing.Rules) -> list:
    """Rows of ``case`` at each thread count, timed side by side (one contender, its inputs
    built once)."""
    contender = C.runner(case, provider(case.op))
    timed = timing.compare({n: dataclasses.replace(contender, threads=n) for n in threads}, rules)
    rows = []
    for n, result in timed.items():
        if isinstance(result, Exception):
            raise RuntimeError(f"{case.name} on {n} threads failed") from result
        rows.append({"case": case.name, "op": case.op, "size": case.size, "bins": case.bins, "k": case.k,
                     "provider": provider(case.op), "threads": n, "median_ms": result.median_ms,
                     "rounds": len(result.samples), "calls_per_round": result.inner})
    fewest = rows[0]["median_ms"]
    for row in rows:
        row["speedup"] = fewest / row["median_ms"]
    return rows


def format_table(rows, fewest: int) -> str:
    width = max([4] + [len(r["case"]) for r in rows])
    head = f"{'case':<{width}} {'threads':>7} {'median ms':>10} {f'x faster than {fewest}':>16}"
    lines, previous = [head, "-" * len(head)], None
    for r in rows:
        if previous is not None and r["case"] != previous:
            lines.append("")
        previous = r["case"]
        ms = r["median_ms"]
        lines.append(f"{r['case']:<{width}} {r['threads']:>7} {ms:>10.3f} {r['speedup']:>16.2f}")
    slower = [f"{r['case']} on {r['threads']} threads ({r['speedup']:.2f})" for r in rows if r["speedup"] < 1]
    lines += ["", f"slower than on {fewest} thread{'s' if fewest > 1 else ''}: " + (", ".join(slower) or "none")]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated, fewest first (default 1,2)")
    p.add_argument("--cpu-threads", choices=("free", "all"),  # dirfast.ops.CPU_THREADS (imported by the cases)
                   help="dirfast.set_cpu_threads for the run (default: dirfast's, free)")
    p.add_argument("--quick", action="store_true", help="shorter measurements (benchmarks.timing.QUICK)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--ops", default=",".join(DEFAULT_OPS), help=f"comma-separated ops among {','.join(C.ALL_OPS)} "
                   "but fds_epoch (default: %(default)s)")
    C.add_sweep_arguments(p, sizes=SIZES)
    args = p.parse_args(argv)
    try:  # bad options fail before anything runs
        args.threads = C.parse_counts(args.threads, "--threads")
        args.sweep = C.sweep(args)
    except ValueError as exc:
        p.error(str(exc))
    if args.threads != sorted(set(args.threads)) or len(args.threads) < 2:
        p.error(f"--threads must be two or more counts, fewest first, each once; got {args.threads}")
    args.ops = [op for op in args.ops.split(",") if op]
    bad = [op for op in args.ops if op not in C.ALL_OPS or op == "fds_epoch"]
    if bad:
        p.error(f"unknown ops for this command: {', '.join(bad)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    quick = args.quick or C.quick_mode()
    rules = timing.rules(quick)
    torch.set_num_threads(args.threads[-1])  # the load report's cores in use: the most a case takes
    dirfast, _ = C._dirfast()  # None where it cannot be imported: every case is then skipped
    if dirfast is not None and args.cpu_threads is not None:
        dirfast.set_cpu_threads(args.cpu_threads)
    policy = dirfast.get_cpu_threads() if dirfast is not None else "-"
    load_before, busy = timing.load_report("cpu")
    info = timing.machine_info("cpu", busy)
    jobs = C.cases(args.ops, devs=["cpu"], **args.sweep)
    print(f"dirfast on {', '.join(map(str, args.threads))} threads side by side, on cpu ({info['cpu']}, "
          f"{info['cpu_id']}, {info['cpu_count']} cores), cpu threads {policy}, "
          f"{'quick' if quick else 'full'} mode: {len(jobs)} cases, median of {rules.repeats} rounds", flush=True)
    print(load_before, flush=True)
    rows, started = [], time.perf_counter()
    for i, case in enumerate(jobs, 1):
        try:
            case_rows = measure_case(case, args.threads, rules)
        except C.Unavailable as exc:  # dirfast not built or not importable here: say so, go on
            print(f"[{i}/{len(jobs)}] {case.name}: skipped: {exc}", flush=True)
            continue
        print(f"[{i}/{len(jobs)}] {case.name}: " + ", ".join(
            f"{r['median_ms']:.3f} ms on {r['threads']}" for r in case_rows), flush=True)
        rows += case_rows
        gc.collect()
    load_after, busy_after = timing.load_report("cpu", running=True)
    print()
    print(format_table(rows, args.threads[0]))
    print(load_before)
    print(load_after)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        info.update(load_average_after=timing.load_average(), busy_after=busy_after)
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "threads": args.threads, "cpu_threads": policy,
                       "quick": quick, "rules": dataclasses.asdict(rules), "rows": rows}, handle, indent=1)
        print(f"wrote {timing.shown_path(args.json)}")


if __name__ == "__main__":
    main()
