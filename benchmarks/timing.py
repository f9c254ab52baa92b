"""The one timer of every benchmark command, and the machine it ran on.

:func:`compare` times contenders side by side under one set of :class:`Rules`:

* each contender is called once to warm up (allocations, kernel loading, compilation), then
  calibrated: ``inner`` calls make one *block*, at least ``min_block_s`` long and the
  contender's share of ``budget_s`` per repeat, so that every sample is long enough to time;
* then ``repeats`` rounds (at least 3): each round times one block of every contender, in an
  order rotated by one each round, so that a change of load hits every contender alike;
* a contender's time is the median over the rounds of block time / ``inner``.  No ratio rests
  on a single sample.  On a GPU every block is timed by CUDA events after a synchronisation;
  an untimed ``setup`` runs before each call.

:func:`load_report` gives the load average with a warning when other work shares the cores
(timings on a busy machine are not worth comparing); :func:`machine_info` the machine;
:func:`peak_memory` the peak memory of one call.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

MIN_REPEATS = 3


@dataclass(frozen=True)
class Rules:
    """How long to measure: ``repeats`` rounds; blocks of at least ``min_block_s`` seconds and
    ``budget_s / repeats`` (a contender's measured time is then about ``budget_s``)."""

    repeats: int
    min_block_s: float
    budget_s: float

    def __post_init__(self):
        if self.repeats < MIN_REPEATS:
            raise ValueError(f"repeats must be at least {MIN_REPEATS} (a median needs them), got {self.repeats}")


QUICK = Rules(repeats=3, min_block_s=0.005, budget_s=0.1)
FULL = Rules(repeats=7, min_block_s=0.02, budget_s=3.0)


def rules(quick: bool) -> Rules:
    return QUICK if quick else FULL


@dataclass
class Contender:
    """One thing to time: ``fn()`` (timed), ``setup()`` (untimed, before each call), the
    device whose work ``fn`` launches ("cuda..." is synchronised), and the torch threads it runs
    on (None: the process's; else set for each block, then set back)."""

    fn: Callable[[], object]
    setup: Optional[Callable[[], object]] = None
    device: str = "cpu"
    threads: Optional[int] = None

    @property
    def cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def waited(self):
        """``fn()``, waited for on a GPU (what a timer other than this module's should call)."""
        out = self.fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out

    def call(self):
        """One call after its setup, waited for: its output."""
        if self.setup is not None:
            self.setup()
        return self.waited()


@dataclass
class Timing:
    """Seconds per call, one sample per round, each the mean of a block of ``inner`` calls."""

    samples: list = field(default_factory=list)
    inner: int = 1

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.samples)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.samples)


def _block(c: Contender, n: int) -> float:
    """Seconds taken by ``n`` calls of ``c`` (setups excluded), with the garbage collector off
    and ``c``'s threads."""
    enabled, threads = gc.isenabled(), torch.get_num_threads()
    gc.disable()
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    try:
        if c.cuda:
            return _cuda_block(c, n)
        if c.setup is None:
            start = time.perf_counter()
            for _ in range(n):
                c.fn()
            return time.perf_counter() - start
        total = 0.0
        for _ in range(n):
            c.setup()
            start = time.perf_counter()
            c.fn()
            total += time.perf_counter() - start
        return total
    finally:
        if c.threads is not None:
            torch.set_num_threads(threads)
        if enabled:
            gc.enable()


def _cuda_block(c: Contender, n: int) -> float:
    """CUDA events around the block (around each call when there is a setup to leave out)."""
    def events():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    total = 0.0
    for _ in range(n if c.setup is not None else 1):
        if c.setup is not None:
            c.setup()
        torch.cuda.synchronize()
        start, end = events()
        start.record()
        for _ in range(1 if c.setup is not None else n):
            c.fn()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end) / 1e3
    return total


def calibrate(c: Contender, rules: Rules) -> int:
    """Warm ``c`` up, then the number of calls per block: blocks of 1, 2, 4, ... calls until one
    takes ``min_block_s``, scaled up to the contender's share of the budget."""
    _block(c, 1)
    target = max(rules.min_block_s, rules.budget_s / rules.repeats)
    n = 1
    while True:
        elapsed = _block(c, n)
        if elapsed >= rules.min_block_s or n >= 10**6:
            return max(n, math.ceil(target * n / max(elapsed, 1e-9)))
        n *= 2


def compare(contenders: dict, rules: Rules) -> dict:
    """Name -> :class:`Timing` of each contender, interleaved as the module docstring says; a
    contender that raises gets the exception instead and leaves the later rounds."""
    out, inner = {}, {}
    for name, c in contenders.items():
        try:
            inner[name] = calibrate(c, rules)
            out[name] = Timing(inner=inner[name])
        except Exception as exc:  # a failing contender must not hide the others
            out[name] = exc
    names = list(inner)
    for r in range(rules.repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if isinstance(out[name], Exception):
                continue
            try:
                out[name].samples.append(_block(contenders[name], inner[name]) / inner[name])
            except Exception as exc:
                out[name] = exc
    return out


def side_by_side(steps: dict, device: str, quick: bool, what: str, alternatives=(), **fields) -> list:
    """Rows of ``steps`` (name -> callable, one of them "clone") timed side by side with
    :func:`compare`: ``fields``, ``provider``, ``median_ms``, ``rounds``, ``calls_per_round``,
    ``x clone`` (time / the clone's) and, with ``alternatives`` (names of steps without dirfast),
    ``x faster than alternative`` (the fastest of them / time). A step that fails raises, naming it
    and ``what``."""
    timed = compare({name: Contender(fn, device=device) for name, fn in steps.items()}, rules(quick))
    rows = []
    for name, result in timed.items():
        if isinstance(result, Exception):
            raise RuntimeError(f"{name} failed: {what}") from result
        rows.append({**fields, "provider": name, "median_ms": result.median_ms, "rounds": len(result.samples),
                     "calls_per_round": result.inner})
    clone = next(row["median_ms"] for row in rows if row["provider"] == "clone")
    best = min((row["median_ms"] for row in rows if row["provider"] in alternatives), default=None)
    for row in rows:
        row["x clone"] = row["median_ms"] / clone
        if best is not None:
            row["x faster than alternative"] = best / row["median_ms"]
    return rows


def side_by_side_table(rows, leading) -> str:
    """Rows of :func:`side_by_side` as a table: the ``leading`` columns ((key, format spec) pairs,
    e.g. ``("size", "<10")``), then the median, the ratio to the clone and, where the rows have
    it, the ratio of the fastest alternative."""
    alternatives = any("x faster than alternative" in r for r in rows)
    head = " ".join(f"{key:{spec}}" for key, spec in leading) + f" {'median ms':>10} {'x clone':>9}"
    lines = [head + (f" {'x faster than alt.':>19}" if alternatives else "")]
    for r in rows:
        line = " ".join(f"{r[key]:{spec}}" for key, spec in leading) + f" {r['median_ms']:>10.3f} {r['x clone']:>9.1f}"
        lines.append(line + (f" {r['x faster than alternative']:>19.2f}" if alternatives else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The machine


def cores_used(device: str = "cpu") -> int:
    """CPU cores a benchmark keeps busy: torch's threads on CPU, one host thread for a GPU."""
    return torch.get_num_threads() if device == "cpu" else 1


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shown_path(path: str) -> str:
    """``path`` as a result prints it: relative to the checkout when inside it (results are
    committed, and read in other checkouts), else as given."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else path


def load_average():
    """(1, 5, 15 min) load average, or None where the platform has none."""
    return tuple(round(v, 2) for v in os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_jiffies(path: str = "/proc/stat"):
    """(busy, total) time of all CPUs since boot, in jiffies, from ``path``; None where it cannot
    be read. Idle and I/O wait are not busy; time the hypervisor gave to other machines (steal) is."""
    try:
        with open(path) as f:
            fields = f.readline().split()
        values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    if fields[:1] != ["cpu"] or len(values) < 5:
        return None
    return sum(values) - values[3] - values[4], sum(values)


def others_busy(window_s: float = 1.0) -> Optional[float]:
    """Cores that other work kept busy while this process slept for ``window_s`` (its own CPU
    time in that window, such as spinning worker threads, taken off); None without /proc/stat."""
    first, own = _cpu_jiffies(), time.process_time()
    if first is None:
        return None
    time.sleep(window_s)
    second, own = _cpu_jiffies(), time.process_time() - own
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, share * (os.cpu_count() or 1) - own / window_s)


def load_report(device: str = "cpu", running: bool = False):
    """(line, busy): the load average, and whether other work shares the cores.

    Busy when the 1-minute load, less this benchmark's own cores when ``running`` (at the end
    of a run), exceeds by half a core the cores the benchmark leaves free, and the cores other
    work holds over one second now (:func:`others_busy`, where it can be measured) do too: the
    load average still counts the run before for a minute after it, and warned of a busy machine
    with nothing else running."""
    load, cores, used = load_average(), os.cpu_count() or 1, cores_used(device)
    if load is None:
        return "load:    unknown on this platform", False
    others = load[0] - (used if running else 0)
    allowed = max(cores - used, 0) + 0.5  # the cores left free, and half a core
    measured = others_busy() if others > allowed else None
    others = others if measured is None else measured
    busy = others > allowed
    line = (f"load:    {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min, {'after' if running else 'before'} "
            f"the run; {cores} cores, {used} used here")
    line += ")" if measured is None else f"; other work {measured:.1f} cores over the last second)"
    if busy:
        line += ("\nWARNING: the machine is busy (other work holds about "
                 f"{max(others, 0):.1f} cores): these timings are skewed, compare them with care")
    return line, busy


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's fields of ``path`` (lower-case keys), empty where it cannot be read."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> str:
    """What the model name hides and the kernels depend on: the first CPU's x86 family and model
    ("AMD EPYC" has been Zen 1, Zen 2 and Zen 4 on the hosts here) and the vector instructions
    torch's own kernels use (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX2, AVX512)."""
    fields = _cpuinfo(cpuinfo)
    parts = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    parts.append(torch.backends.cpu.get_cpu_capability())
    return ", ".join(parts)


def machine_info(device: str = "cpu", busy: Optional[bool] = None) -> dict:
    """The machine, the software and the load before the run (for printing and JSON files);
    ``busy``: the verdict of the caller's :func:`load_report`, so that it is not taken twice."""
    info = {
        "node": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_id": cpu_identity(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "busy": load_report(device)[1] if busy is None else busy,
        "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") and torch.cuda.is_available() else None,
    }
    try:
        import dirfast

        info["dirfast"] = getattr(dirfast, "__version__", "?")
    except Exception as exc:  # the baselines are measured without dirfast too
        info["dirfast"] = f"import dirfast failed: {type(exc).__name__}: {exc}"
    return info


def format_machine(info: dict) -> str:
    """The machine and the software in a few lines (the load is :func:`load_report`'s)."""
    lines = [
        f"machine: {info['platform']} ({info['node']}), Python {info['python']}",
        f"cpu:     {info['cpu']} ({info['cpu_id']}; {info['cpu_count']} logical cores)",
        f"torch:   {info['torch']}, torch.get_num_threads() = {info['torch_threads']}",
        f"gpu:     {info['gpu'] or 'none used'}",
        f"dirfast: {info['dirfast']}",
    ]
    return "\n".join(lines)


def machine_name(info: dict) -> str:
    """A file-name-safe name of the measuring device (the GPU, else the CPU model and threads)."""
    name = info.get("gpu") or info.get("cpu") or "machine"
    safe = "".join(c if c.isalnum() else "-" for c in name)
    while "--" in safe:
        safe = safe.replace("--", "-")
    return safe.strip("-").lower() + ("" if info.get("gpu") else f"-{info.get('torch_threads')}t")


# ------------------------------------------------------------------------------ a command's frame
def add_command_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every side-by-side command takes: --device, --threads, --quick, --json."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    parser.add_argument("--quick", action="store_true", help="shorter measurements (benchmarks.timing.QUICK)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


class Run:
    """One run of a command: sets the threads, prints ``title`` with the machine and the load
    before; :meth:`finish` prints the table and the load before and after, and writes the JSON."""

    def __init__(self, args, title: str) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.load_before, busy = load_report(args.device)
        self.args, self.info = args, machine_info(args.device, busy)
        self.machine = (self.info["gpu"] if args.device == "cuda" else
                        f"{self.info['cpu']} ({self.info['cpu_id']}), {self.info['cpu_count']} cores, "
                        f"{self.info['torch_threads']} threads")
        print(f"{title} on {args.device} ({self.machine}); torch {torch.__version__}", flush=True)
        print(self.load_before, flush=True)

    def finish(self, table: str, rows: list, **extra) -> None:
        load_after, busy_after = load_report(self.args.device, running=True)
        print(table)
        print(self.load_before)
        print(load_after)
        if self.args.json:
            self.info.update(load_average_after=load_average(), busy_after=busy_after)
            with open(self.args.json, "w") as handle:
                json.dump({"device": self.args.device, "machine": self.machine, "torch": torch.__version__, **extra,
                           "info": self.info, "rules": dataclasses.asdict(rules(self.args.quick)), "rows": rows},
                          handle, indent=1)
            print(f"wrote {shown_path(self.args.json)}")


# ------------------------------------------------------------------------------ memory
def _peak_reset(device: str) -> int:
    """Reset the peak-memory counter; return the current memory (bytes) it is measured above."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL(None).malloc_trim(0)  # freed heap back to the system, so RSS is what is in use
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    return _status_kb("VmRSS") * 1024


def _peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM") * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory(step, device):
    """``(peak bytes above the memory in use before, *what step returns)`` of one warm call of
    ``step``. CPU: the process's resident high-water mark, reset after freed heap memory is
    returned to the system; CUDA: ``max_memory_allocated``."""
    step()
    base = _peak_reset(device)
    result = step()
    return (max(_peak(device) - base, 0),) + tuple(result)
