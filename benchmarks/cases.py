"""Benchmark cases, inputs and providers, shared by the pytest-benchmark suites and ``benchmarks.run``.

A *case* is an op at a size on a device; a *provider* is one implementation of it:

* ``"published"`` -- the published-style per-bucket Python loop (:mod:`benchmarks.published`);
* ``"torch"`` -- plain vectorised PyTorch (:mod:`benchmarks.vectorised`);
* one entry per dirfast backend available for the device (``"reference"``, ``"cpp"``,
  ``"triton"``, ``"cuda"``), called through ``dirfast.ops.<op>`` / ``dirfast.FDS`` inside
  ``with dirfast.use_backend(name)``;
* ``"clone"`` -- ``x.clone()`` of the same features: one read and one write of every byte, the
  memory-bandwidth yardstick.

A kernel issue adds a backend to dirfast; it appears here with no change to this file (a
backend name this file does not know is tried on every device; benchmarks.run reports a provider
that raises as "failed" and goes on, pytest reports it as an error).  Sizes and ops are defined
once, here; how long to measure is :mod:`benchmarks.timing`'s.

Dense inputs [B, C, *spatial] go to the published-style providers the way the published NYUD2-DIR
code feeds its FDS: a channels-last copy [B * H * W, C], the per-bucket loop, and a permuted view
back (buckets are given, so its per-pixel Python bucketing loop is not timed).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from . import agedb, timing
from .published import PublishedFDS, published_bin_stats, published_calibrate
from .timing import Contender
from .vectorised import TorchFDS, torch_bin_stats, torch_calibrate

# ---------------------------------------------------------------------------------------------
# What is measured

OPS = ("bin_stats", "calibrate", "fds_epoch")  # measured by default, one bench_<op>.py each
# Also available by name (python -m benchmarks.run --ops fds_smooth): FDS.smooth alone, in place.
EXTRA_OPS = ("fds_smooth",)
ALL_OPS = OPS + EXTRA_OPS

# The default sizes: a training set's features [N, D], and a dense batch [B, C, H, W] with
# per-pixel buckets [B, H, W].  Any other "AxB[xC...]" size can be named (see parse_size).
SIZES = ("65536x512", "8x64x120x160")


def parse_size(size: str):
    """"NxD" -> ((N, D), (N,)); "BxCxHxW..." -> ((B, C, H, W...), (B, H, W...))."""
    try:
        dims = tuple(int(v) for v in size.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"size must look like NxD or BxCxHxW, got {size!r}")
    return dims, (dims[0],) + dims[2:]

NUM_BINS = agedb.NUM_BUCKETS  # 97: ages 3..99 with FDS bucket_num=100, bucket_start=3
SEED = 20210706

BASELINES = ("published", "torch")
CEILING = "clone"

# Devices each known dirfast backend runs on.  A backend not listed is tried everywhere.
BACKEND_DEVICES = {"reference": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}


def quick_mode() -> bool:
    """Quick mode: DIRFAST_BENCH_QUICK=1 (``--quick`` of run.py and of the pytest suites sets it)."""
    return os.environ.get("DIRFAST_BENCH_QUICK", "0").lower() not in ("", "0", "false", "no")


def devices() -> list:
    """cpu, plus cuda when a GPU is visible; DIRFAST_BENCH_DEVICE=cpu|cuda picks one."""
    wanted = os.environ.get("DIRFAST_BENCH_DEVICE", "")
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if wanted:
        return [d for d in wanted.split(",") if d]
    return found


def apply_thread_setting(threads=None) -> None:
    """torch.set_num_threads from the argument or DIRFAST_BENCH_THREADS."""
    threads = threads or os.environ.get("DIRFAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


@dataclass(frozen=True)
class Case:
    op: str
    size: str
    device: str

    @property
    def name(self) -> str:
        return f"{self.op} {self.size}"

    @property
    def group(self) -> str:
        """pytest-benchmark group: one table per op, size and device."""
        return f"{self.op} {self.size} {self.device}"

    @property
    def dense(self) -> bool:
        return len(parse_size(self.size)[0]) > 2

    def __str__(self) -> str:
        return f"{self.op}-{self.size}-{self.device}"


def cases(ops=OPS, sizes=None, devs=None) -> list:
    ops = (ops,) if isinstance(ops, str) else ops
    return [Case(op, size, dev) for op in ops for size in (sizes or SIZES) for dev in (devs or devices())]


# ---------------------------------------------------------------------------------------------
# dirfast, as far as it is importable here


def _dirfast():
    """(module, None) or (None, reason)."""
    try:
        import dirfast
    except Exception as exc:  # dirfast must never stop the baselines from running
        return None, f"import dirfast failed: {type(exc).__name__}: {exc}"
    return dirfast, None


def dirfast_backends(device: str) -> dict:
    """Backend name -> "" (runs on ``device``) or the reason it does not."""
    dirfast, reason = _dirfast()
    if dirfast is None:
        return {}
    try:
        report = dirfast.backends()
    except Exception as exc:
        return {"dirfast": f"dirfast.backends() failed: {type(exc).__name__}: {exc}"}
    out = {}
    for name, info in report.items():
        runs_on = tuple(info.get("devices", BACKEND_DEVICES.get(name, (device,))))
        if not info.get("available", False):
            out[name] = info.get("reason", "") or "not available"
        elif device not in runs_on:
            out[name] = f"runs on {', '.join(runs_on)} tensors, not {device}"
        else:
            out[name] = ""
    return out


def provider_names(op: str, device: str) -> list:
    """Every provider of a case, runnable or not, in table order."""
    return list(BASELINES) + list(dirfast_backends(device)) + [CEILING]


def unavailable_reason(op: str, device: str, provider: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if provider in BASELINES or provider == CEILING:
        return ""
    return dirfast_backends(device).get(provider, f"unknown provider {provider!r}")


# ---------------------------------------------------------------------------------------------
# Inputs: built once per size and device, shared by every provider


@functools.lru_cache(maxsize=None)
def inputs(size: str, device: str) -> dict:
    """Features, labels and per-bin tables of a size (deterministic; cached).

    Labels are ages 3..99 drawn from the AgeDB-DIR training distribution; bins are age - 3.
    Features are standard normal plus a per-bin offset, so bins differ in mean.
    """
    x_shape, bin_shape = parse_size(size)
    g = torch.Generator().manual_seed(SEED)
    n_bins = 1
    for s in bin_shape:
        n_bins *= s
    ages = agedb.benchmark_ages(n_bins, g).view(bin_shape)
    bin_idx = agedb.ages_to_buckets(ages)
    x = torch.randn(x_shape, generator=g)
    offsets = 0.5 * torch.randn(NUM_BINS, x_shape[1], generator=g)
    if len(x_shape) == 2:
        x += offsets[bin_idx]
    else:
        x += offsets[bin_idx].movedim(-1, 1)
    count, m1, v1 = torch_bin_stats(x, bin_idx, NUM_BINS)
    smooth = PublishedFDS(1)._smooth_along_buckets  # reflect-padded window smoothing along the bins
    m2, v2 = smooth(m1), smooth(v1)
    fds_labels = ages.unsqueeze(1) if len(x_shape) > 2 else ages  # dense: [B, 1, *spatial]
    out = dict(x=x, bin_idx=bin_idx, ages=ages, fds_labels=fds_labels, m1=m1, v1=v1, m2=m2, v2=v2)
    return {k: v.to(device) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Providers: each gives a timing.Contender (the timed call, an untimed setup before each call)


class Unavailable(Exception):
    """The provider cannot run this case here (the message says why)."""


def _op_fn(op, provider, t, device):
    if op == "bin_stats":
        args = (t["x"], t["bin_idx"], NUM_BINS)
        table = {"published": published_bin_stats, "torch": torch_bin_stats}
    else:
        args = (t["x"], t["bin_idx"], t["m1"], t["v1"], t["m2"], t["v2"])
        table = {"published": published_calibrate, "torch": torch_calibrate}
    if provider in table:
        f = table[provider]
        return lambda: f(*args)
    dirfast, reason = _dirfast()
    if dirfast is None:
        raise Unavailable(reason)
    f = getattr(dirfast.ops, op)

    def call():
        with dirfast.use_backend(provider):
            return f(*args)
    return call


class _FDSRun:
    """A timed FDS call on a module prepared untimed.

    ``op == "fds_epoch"``: one FDS epoch per call -- update_last_epoch_stats, smooth of the
    features (in place, on a working copy restored by the untimed setup), update_running_stats.
    ``op == "fds_smooth"``: smooth alone, with the statistics of the untimed first epoch.
    Epoch 0 (the first update, which replaces the statistics) always runs once at construction,
    untimed, so that every timed call does the full work.
    """

    def __init__(self, op, fds, x, labels, dense_published=False, backend=None):
        self.op, self.fds, self.x, self.labels, self.backend = op, fds, x, labels, backend
        self.work = x.clone()
        self.dense_published = dense_published
        self.epoch = 0
        with self._ctx():
            self._update(0)
            if op == "fds_smooth":
                self.epoch = 1
                self.fds.update_last_epoch_stats(1)

    def _ctx(self):
        if self.backend is None:
            return contextlib.nullcontext()
        import dirfast
        return dirfast.use_backend(self.backend)

    @staticmethod
    def _flat(t):
        # the published NYUD2-DIR way to give dense features to FDS: a channels-last copy
        return t.permute(0, *range(2, t.dim()), 1).reshape(-1, t.shape[1])

    def _update(self, e):
        if self.dense_published:
            self.fds.update_running_stats(self._flat(self.x), self.labels.reshape(-1), e)
        else:
            self.fds.update_running_stats(self.x, self.labels, e)

    def _smooth(self, e):
        if self.dense_published:
            w = self.work
            flat = self.fds.smooth(self._flat(w), self.labels.reshape(-1, 1), e)
            return flat.view(w.shape[0], *w.shape[2:], w.shape[1]).permute(0, w.dim() - 1, *range(1, w.dim() - 1))
        labels = self.labels.unsqueeze(1) if self.labels.dim() == 1 else self.labels
        return self.fds.smooth(self.work, labels, e)

    def setup(self):
        self.work.copy_(self.x)

    def __call__(self):
        with self._ctx():
            if self.op == "fds_smooth":
                return self._smooth(self.epoch)
            self.epoch += 1
            e = self.epoch
            self.fds.update_last_epoch_stats(e)
            out = self._smooth(e)
            self._update(e)
        return out


def _fds_runner(op, provider, t, device, dense):
    x, labels = t["x"], t["fds_labels"]
    d = x.shape[1]
    common = dict(bucket_num=agedb.BUCKET_NUM, bucket_start=agedb.BUCKET_START)
    if provider == "published":
        run = _FDSRun(op, PublishedFDS(d, device=device, **common), x, labels, dense_published=dense)
    elif provider == "torch":
        run = _FDSRun(op, TorchFDS(d, device=device, **common), x, labels)
    else:
        dirfast, reason = _dirfast()
        if dirfast is None:
            raise Unavailable(reason)
        if not hasattr(dirfast, "FDS"):
            raise Unavailable("dirfast.FDS is not there yet")
        with dirfast.use_backend(provider):
            fds = dirfast.FDS(d, **common).to(device)
        run = _FDSRun(op, fds, x, labels, backend=provider)
    return Contender(run, run.setup, device)


def runner(case: Case, provider: str) -> Contender:
    """The contender of ``provider`` on ``case``; raises Unavailable (with the reason)."""
    reason = unavailable_reason(case.op, case.device, provider)
    if reason:
        raise Unavailable(reason)
    t = inputs(case.size, case.device)
    if provider == CEILING:
        x = t["x"]
        return Contender(lambda: x.clone(), None, case.device)
    try:
        if case.op in ("fds_epoch", "fds_smooth"):
            return _fds_runner(case.op, provider, t, case.device, case.dense)
        return Contender(_op_fn(case.op, provider, t, case.device), None, case.device)
    except Unavailable:
        raise
    except Exception as exc:
        raise Unavailable(f"setup failed: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Results


def first_output(run: Contender):
    """Run one call (after its setup) and return a copy of its output, for --check."""
    out = run.call()
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    return tuple(o.detach().clone() for o in out)


def max_difference(ref, out) -> float:
    """Largest |out - ref| over all output tensors, relative to max(1, |ref|)."""
    ref = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
    out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if len(ref) != len(out):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.double(), b.double()
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        worst = max(worst, float((a - b).abs().max()) / scale if a.numel() else 0.0)
    return worst


CHECK_TOLERANCE = 1e-4


def result_row(case: Case, provider: str, timed: timing.Timing | None = None, note: str = "") -> dict:
    """One result: median and min in ms (None when the provider did not run), with a note."""
    return {
        "case": case.name if case.device == "cpu" else f"{case.name} {case.device}",
        "op": case.op, "size": case.size, "device": case.device, "provider": provider,
        "median_ms": timed.median_ms if timed else None,
        "min_ms": timed.min_ms if timed else None,
        "rounds": len(timed.samples) if timed else 0,
        "calls_per_round": timed.inner if timed else 0,
        "note": note,
    }


def add_ratios(rows) -> list:
    """Add ``x_clone`` (time / clone time) and ``x_published`` (published time / time) to each
    row, from the rows of the same case."""
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r["median_ms"]
    for r in rows:
        ref, ms = by_case[r["case"]], r["median_ms"]
        r["x_clone"] = ms / ref[CEILING] if ms and ref.get(CEILING) else None
        r["x_published"] = ref["published"] / ms if ms and ref.get("published") else None
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark glue (the bench_*.py suites are three lines each)

RESULTS: list = []  # rows measured in this pytest session, for the summary table of conftest.py


def pytest_params(op: str) -> list:
    """pytest parameters (case, provider) of an op, for every size, device and provider."""
    import pytest

    return [pytest.param(case, provider, id=f"{case.size}-{case.device}-{provider}")
            for case in cases(op) for provider in provider_names(op, case.device)]


def pytest_bench(benchmark, case: Case, provider: str) -> None:
    """Measure ``provider`` on ``case`` with the pytest-benchmark fixture (its own timer, in
    pedantic mode) for the rounds and calls per round of :func:`benchmarks.timing.calibrate`
    (one call per round where a setup must run before each)."""
    import pytest

    benchmark.group = case.group
    benchmark.extra_info.update(op=case.op, size=case.size, device=case.device, provider=provider)
    try:
        contender = runner(case, provider)
    except Unavailable as exc:
        pytest.skip(str(exc))
    rules = timing.rules(quick_mode())
    inner = 1 if contender.setup is not None else timing.calibrate(contender, rules)
    benchmark.pedantic(contender.waited, setup=contender.setup, rounds=rules.repeats, iterations=inner,
                       warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and getattr(stats, "data", None):
        RESULTS.append(result_row(case, provider, timing.Timing(list(stats.data), inner)))
