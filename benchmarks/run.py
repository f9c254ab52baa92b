"""One command for the whole benchmark: ``python -m benchmarks.run [--quick] [--device cpu|cuda]
[--threads N] [--json PATH] [--bins 97,1000,10000] [--K 10,100,1000] [--labels 12208,1000000]``.

Runs every case of :mod:`benchmarks.cases` -- bin_stats, calibrate and calibrate_ at 65,536 x 512
(over 97, 1,000 and 10,000 bins; fds_smooth too, by name) and dense 8 x 64 x 120 x 160, a full FDS
epoch, mixture_logpdf on a depth batch for K = 10, 100 and 1,000, and DenseWeight on 12,208 and
1,000,000 labels --
for every provider (the published-style loop, plain PyTorch, the same under torch.compile,
each dirfast backend available here, and the yardsticks), without pytest, timed side by side by
:mod:`benchmarks.timing`.  Compiled formulations (and FFTKDE's density) are checked against the
reference before they are timed.  Prints each case as it runs, then the machine, the load
average before and after (with a warning when the machine was busy) and a table: median time,
time relative to the clone of the same features (the memory-bandwidth yardstick) and to the
op's own yardstick, how many times faster than the published-style loop and than the strongest
alternative (torch.compile; FFTKDE for density).  ``--json PATH`` also writes the results with
the machine's description (PATH may be a folder: the file is then named after the machine,
e.g. ``nvidia-h100-80gb-hbm3.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import textwrap
import time

import torch

from . import cases as C
from . import timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repetitions (the same cases)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device of the tensors (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the results as JSON to PATH (a folder: a file named after the machine)")
    p.add_argument("--ops", default=",".join(C.OPS),
                   help=f"comma-separated ops among {','.join(C.ALL_OPS)} (default: {','.join(C.OPS)})")
    C.add_sweep_arguments(p)
    p.add_argument("--check", action="store_true",
                   help="compare each provider's first output with the published-style one "
                        "(compiled formulations are always checked against the reference)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of providers (published, torch, compiled, dirfast backends, "
                        "clone, read pass, ...)")
    return p.parse_args(argv)


def _split(value, allowed, what):
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def _fmt_ratio(value):
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def split_skipped(rows):
    """(rows to show, footer lines): a provider skipped for the same reason in every case is
    left out of the table and named once below it."""
    by_provider = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
    always = {p: rs[0]["note"] for p, rs in by_provider.items()
              if all(r["median_ms"] is None and r["note"] == rs[0]["note"] for r in rs)}
    shown = [r for r in rows if r["provider"] not in always]
    return shown, [f"  {p}: {note}" for p, note in always.items()]


COLUMNS = [("x clone", "x_clone"), ("x yardstick", "x_yardstick"), ("x faster than published", "x_published"),
           ("x faster than alternative", "x_alternative")]
LEGEND = ("x clone: time / x.clone() of the features; x yardstick: time / the op's own yardstick (bin_stats: read "
          "pass x.sum(); calibrate_, fds_smooth: in-place pass x.mul_(1); mixture_logpdf: exp limit, float32 exp of "
          "N x K values on one thread / threads, its inverse the fraction of the exp limit); x faster than "
          "alternative: time of torch.compile of the vectorised formulation (density: KDEpy's FFTKDE) / time.")


def format_table(rows) -> str:
    """The result table: one block per case; skipped providers show their reason; a ratio column
    no row has is left out."""
    rows, footer = split_skipped(rows)
    columns = [(h, key) for h, key in COLUMNS if any(r.get(key) for r in rows)]
    header = ["case", "provider", "median ms"] + [h for h, _ in columns]
    with_check = any(r.get("check") for r in rows)
    if with_check:
        header.append("check")
    lines = []
    for r in rows:
        if r["median_ms"] is None:
            note = r["note"] if len(r["note"]) <= 90 else r["note"][:87] + "..."
            lines.append([r["case"], r["provider"], "skipped", note])
            continue
        ms = r["median_ms"]
        line = [r["case"], r["provider"], f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"]
        line += [_fmt_ratio(r.get(key)) for _, key in columns]
        if with_check:
            line.append(r.get("check", ""))
        lines.append(line)
    widths = [max([len(h)] + [len(l[i]) for l in lines if len(l) > 4 or i < 3]) for i, h in enumerate(header)]

    def fmt(cols):
        if len(cols) == 4 and cols[2] == "skipped":  # skipped: the reason after the time column
            return "  ".join([cols[0].ljust(widths[0]), cols[1].ljust(widths[1]),
                              cols[2].rjust(widths[2]), cols[3]]).rstrip()
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))]
        if with_check:
            cells[-1] = cols[-1].ljust(widths[-1])
        return "  ".join(cells).rstrip()

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    previous = None
    for r, line in zip(rows, lines):
        if previous is not None and r["case"] != previous:
            out.append("")
        previous = r["case"]
        out.append(fmt(line))
    out += [""] + textwrap.wrap(LEGEND, 110)
    if footer:
        out += ["", "not measured here:"] + footer
    return "\n".join(out)


def _measure_case(case, providers, rules, check):
    """Rows of every provider of ``case``, the runnable ones timed side by side; compiled
    formulations and FFTKDE are checked first (C.verify), a mismatch fails the provider."""
    rows, contenders, reference = {}, {}, None
    for provider in providers:
        try:
            contender = C.runner(case, provider)
            note = C.verify(case, provider, contender)
            if check and provider not in C.YARDSTICKS and C.checkable(case.op):
                out = C.first_output(contender)
                if provider == "published":
                    reference = out
                elif reference is not None:
                    diff = C.max_difference(reference, out)
                    note = f"{'ok' if diff <= C.CHECK_TOLERANCE else 'MISMATCH'} {diff:.1e}" + (
                        f"; {note}" if note else "")
            contenders[provider] = contender
            rows[provider] = {"check": note}
        except C.Unavailable as exc:
            rows[provider] = C.result_row(case, provider, note=str(exc))
        except Exception as exc:  # a failing provider must not hide the others
            rows[provider] = C.result_row(case, provider, note=f"failed: {type(exc).__name__}: {exc}")
    for provider, timed in timing.compare(contenders, rules).items():
        check_note = rows[provider]["check"]
        if isinstance(timed, Exception):
            rows[provider] = C.result_row(case, provider, note=f"failed: {type(timed).__name__}: {timed}")
        else:
            rows[provider] = C.result_row(case, provider, C.scaled(contenders[provider], timed))
        rows[provider]["check"] = check_note
    return [rows[p] for p in providers]


def _progress(row) -> str:
    if row["median_ms"] is None:
        return f"  {row['provider']}: {'skipped: ' if not row['note'].startswith('failed') else ''}{row['note']}"
    calls = row["calls_per_round"]
    return (f"  {row['provider']}: {row['median_ms']:.3f} ms (median of {row['rounds']} rounds of {calls} "
            f"call{'s' if calls > 1 else ''})" + (f", check: {row['check']}" if row.get("check") else ""))


def run(args) -> dict:
    if args.quick:
        os.environ["DIRFAST_BENCH_QUICK"] = "1"
    quick = C.quick_mode()
    rules = timing.rules(quick)
    C.apply_thread_setting(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    ops = _split(args.ops, C.ALL_OPS, "op")
    try:
        sweep = C.sweep(args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    wanted = args.providers.split(",") if args.providers else None
    jobs = [(case, [p for p in C.provider_names(case.op, device) if wanted is None or p in wanted])
            for case in C.cases(ops, devs=[device], **sweep)]

    load_before, busy = timing.load_report(device)
    info = timing.machine_info(device, busy)
    print(f"dirfast benchmarks on {device} ({info['gpu'] or info['cpu'] + ', ' + info['cpu_id']}), "
          f"{'quick' if quick else 'full'} mode, {info['torch_threads']} torch threads: {len(jobs)} cases, contenders "
          f"interleaved, median of {rules.repeats} rounds", flush=True)
    print(load_before, flush=True)
    rows = []
    started = time.perf_counter()
    for i, (case, providers) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {case.name} ...", flush=True)
        t0 = time.perf_counter()
        case_rows = _measure_case(case, providers, rules, args.check)
        for row in case_rows:
            print(_progress(row), flush=True)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
        rows += case_rows
        gc.collect()
    C.add_ratios(rows)
    load_after, busy_after = timing.load_report(device, running=True)

    print()
    print(timing.format_machine(info))
    print(load_before)
    print(load_after)
    print(f"mode:    {'quick' if quick else 'full'}, device {device}, median of {rules.repeats} interleaved rounds, "
          f"total {time.perf_counter() - started:.0f} s")
    print()
    print(format_table(rows))
    info.update(load_average_after=timing.load_average(), busy_after=busy_after)
    result = {"machine": info, "device": device, "quick": quick, "rules": dataclasses.asdict(rules), "results": rows}
    if args.json:
        path = args.json
        if path.endswith(os.sep) or os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, timing.machine_name(info) + ".json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nresults written to {timing.shown_path(path)}")
    return result


def main(argv=None):
    result = run(parse_args(argv))
    bad = [f"{r['case']} {r['provider']}: {r['note'] or r['check']}" for r in result["results"]
           if r["note"].startswith("failed") or r.get("check", "").startswith("MISMATCH")]
    if bad:
        print("\nfailed or mismatched providers:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
