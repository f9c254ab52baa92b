"""Benchmark cases, inputs and providers, shared by the pytest-benchmark suites and ``benchmarks.run``.

A *case* is an op at a size (and a number of bins, or of mixture components K) on a device; a
*provider* is one implementation of it:

* ``"published"`` -- the published-style per-bucket Python loop (:mod:`benchmarks.published`);
  for ``mixture_logpdf`` the published GAI balancing term (an [N, K] matrix), for ``density``
  the denseweight package;
* ``"torch"`` -- plain vectorised PyTorch (:mod:`benchmarks.vectorised`);
* ``"compiled"`` -- the same formulation under ``torch.compile(dynamic=False)``, checked against
  dirfast's reference before it is timed (:func:`verify`);
* one entry per dirfast backend available for the device (``"reference"``, ``"cpp"``,
  ``"triton"``, ``"cuda"``), called through ``dirfast.ops.<op>`` / ``dirfast.FDS`` inside
  ``with dirfast.use_backend(name)``;
* yardsticks: ``"clone"`` -- ``x.clone()`` of the same features, one read and one write of every
  byte; ``"read pass"`` -- ``x.sum()``, one read (bin_stats); ``"in-place pass"`` --
  ``x.mul_(1)``, one read and one write in place (calibrate_), on a copy restored before each
  call as the in-place ops are; ``"exp limit"`` -- float32 ``exp`` of N x K values on one
  thread, divided by the threads (mixture_logpdf).

``density`` (DenseWeight on ``n`` labels) has its own providers: the denseweight package,
``"FFTKDE"`` (KDEpy, used as a user would, :mod:`benchmarks.alternatives`), ``"dirfast"``
(``fit`` then ``weights`` of the labels: what the other two return) and ``"dirfast fit"``.

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
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import agedb, alternatives, real_labels, timing
from .published import PublishedFDS, published_bin_stats, published_calibrate, published_calibrate_mean_var
from .timing import Contender
from .vectorised import TorchFDS, torch_bin_stats, torch_calibrate, torch_calibrate_, torch_mixture_logpdf

# ---------------------------------------------------------------------------------------------
# What is measured

# measured by default, one bench_<op>.py each (calibrate_ in bench_calibrate.py)
OPS = ("bin_stats", "calibrate", "calibrate_", "fds_epoch", "mixture_logpdf", "density")
# Also available by name (python -m benchmarks.run --ops fds_smooth): FDS.smooth alone, in place.
EXTRA_OPS = ("fds_smooth",)
ALL_OPS = OPS + EXTRA_OPS
# The ops of the bins sweep; fds_smooth there runs an FDS of `bins` buckets (bucket_start 0, the
# bin indices as labels): calibrate_ as FDS calls it, on the statistics it holds.
BIN_OPS = ("bin_stats", "calibrate", "calibrate_", "fds_smooth")
COMPILED_OPS = tuple(alternatives.FORMULATIONS) + ("fds_smooth",)  # fds_smooth: TorchFDS.smooth compiled

# The default sizes: a training set's features [N, D], a training batch's (FDS.smooth runs on one
# per step: a call's fixed costs and the s and t of each bucket it meets show here), and a dense
# batch [B, C, H, W] with per-pixel buckets [B, H, W].  Any other "AxB[xC...]" size can be named
# (see parse_size).
SIZES = ("65536x512", "256x512", "8x64x120x160")
# Bins of the sweep on [N, D] sizes: 97 are the AgeDB-DIR buckets (ages from that distribution),
# other counts are drawn uniformly. Dense sizes and fds_epoch keep the 97 buckets.
BINS = (97, 1000, 10000)
MIXTURE_SIZES = ("8x1x240x320",)  # mixture_logpdf: a depth batch, as benchmarks.balanced_mse
KS = (10, 100, 1000)  # mixture components
LABEL_COUNTS = (12208, 1000000)  # density: the AgeDB-DIR training set, and a million labels


def parse_size(size: str):
    """"NxD" -> ((N, D), (N,)); "BxCxHxW..." -> ((B, C, H, W...), (B, H, W...))."""
    try:
        dims = tuple(int(v) for v in size.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"size must look like NxD or BxCxHxW, got {size!r}")
    return dims, (dims[0],) + dims[2:]


def parse_counts(value: str, what: str) -> list:
    """Positive integers from a comma-separated option (``what`` names it in the error)."""
    try:
        counts = [int(v) for v in value.split(",") if v]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"{what} takes comma-separated positive integers, got {value!r}")
    return counts


def add_sweep_arguments(parser, sizes=SIZES) -> None:
    """The options that choose a command's cases: --sizes (default ``sizes``), --bins, --K,
    --mixture-sizes and --labels; :func:`sweep` reads them."""
    parser.add_argument("--sizes", default=",".join(sizes),
                        help="comma-separated sizes NxD or BxCxHxW (default: %(default)s)")
    parser.add_argument("--bins", default=",".join(map(str, BINS)),
                        help="comma-separated bin counts of bin_stats, calibrate, calibrate_ and fds_smooth on NxD "
                             "sizes (default: %(default)s)")
    parser.add_argument("--K", dest="ks", default=",".join(map(str, KS)),
                        help="comma-separated mixture component counts of mixture_logpdf (default: %(default)s)")
    parser.add_argument("--mixture-sizes", default=",".join(MIXTURE_SIZES),
                        help="comma-separated prediction shapes of mixture_logpdf (default: %(default)s)")
    parser.add_argument("--labels", default=",".join(map(str, LABEL_COUNTS)),
                        help="comma-separated label counts of density (default: %(default)s)")


def sweep(args) -> dict:
    """The keyword arguments of :func:`cases` but ``ops`` and ``devs``, from the options of
    :func:`add_sweep_arguments`; a ValueError names the option at fault."""
    sizes = [v for v in args.sizes.split(",") if v]
    mixture_sizes = [v for v in args.mixture_sizes.split(",") if v]
    for size in sizes + mixture_sizes:
        parse_size(size)
    return dict(sizes=sizes, bins=parse_counts(args.bins, "--bins"), ks=parse_counts(args.ks, "--K"),
                mixture_sizes=mixture_sizes, label_counts=parse_counts(args.labels, "--labels"))


NUM_BINS = agedb.NUM_BUCKETS  # 97: ages 3..99 with FDS bucket_num=100, bucket_start=3
SEED = 20210706

BASELINES = ("published", "torch")
CEILING = "clone"
# The yardstick each op's times are divided by ("x yardstick"), besides the clone.
YARDSTICK = {"bin_stats": "read pass", "calibrate_": "in-place pass", "fds_smooth": "in-place pass",
             "mixture_logpdf": "exp limit"}
YARDSTICKS = (CEILING,) + tuple(YARDSTICK.values())
DENSITY_PROVIDERS = ("published", "FFTKDE", "dirfast", "dirfast fit")
# The strongest alternative without dirfast ("x faster than alternative").
ALTERNATIVE = {"density": "FFTKDE", **{op: "compiled" for op in COMPILED_OPS}}

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
    """``op`` at ``size`` on ``device``; ``bins`` of the bin ops, ``k`` components of the
    mixture; ``size`` of ``density`` is its number of labels."""

    op: str
    size: str
    device: str
    bins: int = NUM_BINS
    k: int = 0

    @property
    def name(self) -> str:
        if self.op == "density":
            return f"density {self.size} labels"
        if self.op == "mixture_logpdf":
            return f"{self.op} {self.size} K={self.k}"
        return f"{self.op} {self.size}" + ("" if self.bins == NUM_BINS else f" {self.bins} bins")

    @property
    def group(self) -> str:
        """pytest-benchmark group: one table per op, size (bins, K) and device."""
        return f"{self.name} {self.device}"

    @property
    def dense(self) -> bool:
        return self.op not in ("density", "mixture_logpdf") and len(parse_size(self.size)[0]) > 2

    def __str__(self) -> str:
        return self.group.replace(" ", "-")


def cases(ops=OPS, sizes=None, devs=None, bins=None, ks=None, mixture_sizes=None, label_counts=None) -> list:
    """Every case of ``ops``: the feature ops at ``sizes`` (the bin ops at each of ``bins`` on
    [N, D] sizes), mixture_logpdf at ``mixture_sizes`` for each K of ``ks``, density for each of
    ``label_counts``; on each device of ``devs``. Defaults: the module's constants."""
    ops = (ops,) if isinstance(ops, str) else ops
    out = []
    for op in ops:
        if op == "density":
            points = [dict(size=str(n)) for n in label_counts or LABEL_COUNTS]
        elif op == "mixture_logpdf":
            points = [dict(size=size, k=k) for size in mixture_sizes or MIXTURE_SIZES for k in ks or KS]
        else:
            points = [dict(size=size, bins=b) for size in sizes or SIZES
                      for b in ((bins or BINS) if op in BIN_OPS and len(parse_size(size)[0]) == 2 else (NUM_BINS,))]
        out += [Case(op, device=dev, **point) for point in points for dev in devs or devices()]
    return out


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
    if op == "density":
        return list(DENSITY_PROVIDERS)
    compiled = ["compiled"] if op in COMPILED_OPS else []
    yardsticks = ([] if op == "mixture_logpdf" else [CEILING]) + ([YARDSTICK[op]] if op in YARDSTICK else [])
    return list(BASELINES) + compiled + list(dirfast_backends(device)) + yardsticks


def unavailable_reason(op: str, device: str, provider: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if provider == "exp limit" and device != "cpu":
        return "a CPU yardstick (exp on one core)"
    if op == "density":
        return "" if device == "cpu" or provider.startswith("dirfast") else "runs on the CPU (NumPy)"
    if provider in BASELINES or provider in YARDSTICKS or provider == "compiled":
        return ""
    return dirfast_backends(device).get(provider, f"unknown provider {provider!r}")


# ---------------------------------------------------------------------------------------------
# Inputs: built once per size and device, shared by every provider


@functools.lru_cache(maxsize=None)
def inputs(size: str, device: str, bins: int = NUM_BINS) -> dict:
    """Features, labels and per-bin tables of a size (deterministic; cached).

    With the 97 default bins, labels are ages 3..99 drawn from the AgeDB-DIR training
    distribution and bins are age - 3; with another number of bins (2-D sizes only), bins are
    drawn uniformly. Features are standard normal plus a per-bin offset, so bins differ in mean.
    """
    x_shape, bin_shape = parse_size(size)
    g = torch.Generator().manual_seed(SEED)
    if bins == NUM_BINS:
        ages = agedb.benchmark_ages(math.prod(bin_shape), g).view(bin_shape)
        bin_idx = agedb.ages_to_buckets(ages)
    else:
        if len(x_shape) > 2:
            raise ValueError("the bins sweep runs on [N, D] sizes only")
        ages, bin_idx = None, torch.randint(0, bins, bin_shape, generator=g)
    x = torch.randn(x_shape, generator=g)
    offsets = 0.5 * torch.randn(bins, x_shape[1], generator=g)
    if len(x_shape) == 2:
        x += offsets[bin_idx]
    else:
        x += offsets[bin_idx].movedim(-1, 1)
    count, m1, v1 = torch_bin_stats(x, bin_idx, bins)
    smooth = PublishedFDS(1)._smooth_along_buckets  # reflect-padded window smoothing along the bins
    m2, v2 = smooth(m1), smooth(v1)
    out = dict(x=x, bin_idx=bin_idx, m1=m1, v1=v1, m2=m2, v2=v2)
    if ages is not None:
        out.update(ages=ages, fds_labels=ages.unsqueeze(1) if len(x_shape) > 2 else ages)  # dense: [B, 1, *spatial]
    return {k: v.to(device) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def mixture_inputs(size: str, device: str, k: int) -> dict:
    """Predictions of shape ``size`` around targets in [0.7, 9.7] and a mixture of ``k``
    components spread over that range (as benchmarks.balanced_mse; deterministic; cached)."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(parse_size(size)[0], generator=g) * 9 + 0.7 + 0.3 * torch.randn(parse_size(size)[0], generator=g)
    weights = torch.rand(k, generator=g) + 0.05
    out = dict(x=x, means=torch.linspace(0.5, 9.5, k), variances=torch.full((k,), 0.29),
               log_weights=torch.log(weights / weights.sum()))
    return {key: v.to(device) for key, v in out.items()}


@functools.lru_cache(maxsize=None)
def density_labels(n: int):
    """``n`` labels (float64 NumPy): the AgeDB-DIR training ages when the team's label file is
    there and holds ``n``, otherwise ``n`` ages drawn from that distribution."""
    real = real_labels.agedb_ages("train")
    if real is not None and real.size == n:
        return real.astype(np.float64)
    return agedb.sample_ages(n, torch.Generator().manual_seed(SEED)).double().numpy()


# ---------------------------------------------------------------------------------------------
# Providers: each gives a timing.Contender (the timed call, an untimed setup before each call)


class Unavailable(Exception):
    """The provider cannot run this case here (the message says why)."""


class Mismatch(Exception):
    """A provider's output is not the reference's."""


def published_calibrate_(x, bin_idx, m1, v1, m2, v2):
    """The published FDS.smooth on bin indices: each bucket's rows of ``x`` calibrated by
    ``published_calibrate_mean_var`` and written back into ``x`` (the mask built on both sides
    of the assignment, as published). Dense ``x``: the published NYUD2-DIR way, a channels-last
    copy calibrated, then copied back into ``x``."""
    if x.dim() > 2:
        return x.copy_(published_calibrate(x, bin_idx, m1, v1, m2, v2))
    for label in torch.unique(bin_idx):
        if label < 0 or label >= m1.shape[0]:
            continue
        k = int(label)
        x[bin_idx == label] = published_calibrate_mean_var(x[bin_idx == label], m1[k], v1[k], m2[k], v2[k])
    return x


MAX_PUBLISHED_TERMS = 1 << 28  # the published mixture's [N, K] matrices: 1 GiB each in float32


def published_mixture_logpdf(x, means, variances, log_weights):
    """The balancing term of the published ``gai_loss`` (benchmarks.published_balanced_mse),
    its noise variance folded into ``variances``: the mixture's log density plus log(2 pi) / 2
    by ``logsumexp`` over an [N, K] matrix."""
    pred = x.reshape(-1, 1)
    gmm = {"means": means, "variances": variances, "weights": log_weights.exp()}
    gmm = {k: gmm[k].reshape(1, -1).expand(pred.shape[0], -1) for k in gmm}
    sum_var = gmm['variances']
    balancing_term = - 0.5 * sum_var.log() - 0.5 * (pred - gmm['means']).pow(2) / sum_var + gmm['weights'].log()
    return torch.logsumexp(balancing_term, dim=-1).reshape(x.shape)


def _in_place(call, x):
    """A contender calling ``call(work)`` on a copy of ``x`` restored before each call (untimed)."""
    work = x.clone()
    return Contender(lambda: call(work), lambda: work.copy_(x), str(x.device))


def _args(case: Case) -> tuple:
    """The op's arguments (features first)."""
    if case.op == "mixture_logpdf":
        t = mixture_inputs(case.size, case.device, case.k)
        return t["x"], t["means"], t["variances"], t["log_weights"]
    t = inputs(case.size, case.device, case.bins)
    if case.op == "bin_stats":
        return t["x"], t["bin_idx"], case.bins
    return t["x"], t["bin_idx"], t["m1"], t["v1"], t["m2"], t["v2"]


def _with_backend(f, backend):
    dirfast, reason = _dirfast()
    if dirfast is None:
        raise Unavailable(reason)

    def call(*args):
        with dirfast.use_backend(backend):
            return f(*args)
    return call


def _pass_runner(provider: str, x, device: str):
    """The clone, read pass and in-place pass of the features ``x``; None for another provider."""
    if provider == CEILING:
        return Contender(lambda: x.clone(), None, device)
    if provider == "read pass":
        return Contender(lambda: x.sum(), None, device)
    if provider == "in-place pass":
        # Timed as calibrate_ and FDS.smooth are, on a copy restored before each call, so that the
        # pass meets the memory the op meets. Back to back, on a host whose last-level cache holds
        # x, it ran in that cache, 1.1-2x faster (benchmarks/results/cpu/in-place-yardstick-xeon.md).
        return _in_place(lambda work: work.mul_(1), x)
    return None


def _op_runner(case: Case, provider: str) -> Contender:
    """bin_stats, calibrate, calibrate_ and mixture_logpdf: the provider's function of the op's
    arguments; the in-place op on a copy of the features restored before each call."""
    args = _args(case)
    x, rest = args[0], args[1:]
    yardstick = _pass_runner(provider, x, case.device)
    if yardstick is not None:
        return yardstick
    if provider == "exp limit":
        return Contender(alternatives.ExpLimit(x.numel() * case.k), None, case.device)
    if provider == "published" and case.op == "mixture_logpdf" and x.numel() * case.k > MAX_PUBLISHED_TERMS:
        raise Unavailable(f"its [N, K] matrices would take {x.numel() * case.k * 4 / 2**30:.1f} GiB each")
    chunk = max(1, (1 << 22) // max(case.k, 1))  # eager: [chunk, K] matrices of 4M terms, as the reference
    table = {"published": {"bin_stats": published_bin_stats, "calibrate": published_calibrate,
                           "calibrate_": published_calibrate_, "mixture_logpdf": published_mixture_logpdf},
             "torch": {"bin_stats": torch_bin_stats, "calibrate": torch_calibrate, "calibrate_": torch_calibrate_,
                       "mixture_logpdf": functools.partial(torch_mixture_logpdf, chunk=chunk)}}
    if provider in table:
        f = table[provider][case.op]
    elif provider == "compiled":
        f = alternatives.compiled(case.op)
    else:
        dirfast, reason = _dirfast()
        if dirfast is None:
            raise Unavailable(reason)
        f = _with_backend(getattr(dirfast.ops, case.op), provider)
    if case.op == "calibrate_":
        return _in_place(lambda work: f(work, *rest), x)
    return Contender(lambda: f(*args), None, case.device)


def _density_runner(case: Case, provider: str) -> Contender:
    labels = density_labels(int(case.size))
    if provider == "published":
        alternatives.denseweight()
        return Contender(lambda: alternatives.denseweight_weights(labels))
    if provider == "FFTKDE":
        alternatives.kdepy()
        return Contender(lambda: alternatives.fftkde_weights(labels))
    dirfast, reason = _dirfast()
    if dirfast is None:
        raise Unavailable(reason)
    tensor = torch.from_numpy(labels).to(case.device)
    if provider == "dirfast fit":
        return Contender(lambda: dirfast.DenseWeight().fit(tensor), None, case.device)
    return Contender(lambda: dirfast.DenseWeight().fit(tensor).weights(tensor), None, case.device)


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
        if self.backend is not None:  # dirfast's: in place for dense features too (its default copies them)
            return self.fds.smooth(self.work, labels, e, inplace=True)
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


def _fds_runner(case: Case, provider: str) -> Contender:
    """fds_epoch and fds_smooth: the provider's FDS module on the case's features, with the AgeDB
    buckets, or in the bins sweep an FDS of ``case.bins`` buckets whose labels are the bin indices."""
    op, device, dense = case.op, case.device, case.dense
    t = inputs(case.size, device, case.bins)
    x = t["x"]
    d = x.shape[1]
    if case.bins == NUM_BINS:
        labels, common = t["fds_labels"], dict(bucket_num=agedb.BUCKET_NUM, bucket_start=agedb.BUCKET_START)
    else:
        labels, common = t["bin_idx"].to(x.dtype), dict(bucket_num=case.bins, bucket_start=0)
    yardstick = _pass_runner(provider, x, device)
    if yardstick is not None:
        return yardstick
    if provider == "published":
        run = _FDSRun(op, PublishedFDS(d, device=device, **common), x, labels, dense_published=dense)
    elif provider in ("torch", "compiled"):
        fds = TorchFDS(d, device=device, **common)
        if provider == "compiled":  # fds_smooth: the vectorised smooth, one module's method, compiled
            fds.smooth = alternatives.compiled(fds.smooth)
        run = _FDSRun(op, fds, x, labels)
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
    """The contender of ``provider`` on ``case``; raises Unavailable (with the reason: a missing
    optional package, too much memory, a failed setup)."""
    reason = unavailable_reason(case.op, case.device, provider)
    if reason:
        raise Unavailable(reason)
    try:
        if case.op == "density":
            return _density_runner(case, provider)
        if case.op in ("fds_epoch", "fds_smooth"):
            return _fds_runner(case, provider)
        return _op_runner(case, provider)
    except Unavailable:
        raise
    except alternatives.Missing as exc:
        raise Unavailable(str(exc)) from None
    except Exception as exc:
        raise Unavailable(f"setup failed: {type(exc).__name__}: {exc}") from exc


def reference_output(case: Case):
    """What the op must give: dirfast's reference backend (calibrate's for calibrate_; for
    fds_smooth, dirfast.FDS on it), or the vectorised formulation where dirfast does not import."""
    dirfast, _ = _dirfast()
    if case.op == "fds_smooth":
        return first_output(runner(case, "torch" if dirfast is None else "reference"))
    args = _args(case)
    if dirfast is None:
        return {"bin_stats": torch_bin_stats, "calibrate": torch_calibrate, "calibrate_": torch_calibrate,
                "mixture_logpdf": torch_mixture_logpdf}[case.op](*args)
    with dirfast.use_backend("reference"):
        return getattr(dirfast.ops, "calibrate" if case.op == "calibrate_" else case.op)(*args)


def verify(case: Case, provider: str, contender: Contender) -> str:
    """The check every "compiled" and "FFTKDE" contender passes before it is timed: the first
    output against :func:`reference_output` (FFTKDE: its p' against dirfast's on dirfast's grid).
    Returns the check's note ("" for other providers); raises :class:`Mismatch`."""
    if provider == "compiled":
        gap = max_difference(reference_output(case), first_output(contender))
        if not gap <= CHECK_TOLERANCE:
            raise Mismatch(f"differs from dirfast's reference by {gap:.1e} (relative)")
        return f"ok {gap:.1e} vs reference"
    if provider == "FFTKDE" and case.op == "density":
        dirfast, reason = _dirfast()
        if dirfast is None:
            return f"not checked: {reason}"
        labels = density_labels(int(case.size))
        gap = alternatives.fftkde_gap(labels, dirfast.DenseWeight().fit(torch.from_numpy(labels)))
        if not gap <= alternatives.DENSITY_TOLERANCE:
            raise Mismatch(f"its p' differs from dirfast's by {gap:.1e} on dirfast's grid")
        return f"p' ok {gap:.1e} vs dirfast"
    return ""


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


def checkable(op: str) -> bool:
    """Whether --check compares the providers of ``op`` with the published one (density's
    published package reads p' at the grid point below each label: its weights differ by more)."""
    return op != "density"


def scaled(contender: Contender, timed: timing.Timing) -> timing.Timing:
    """``timed`` in the time of the whole work where a contender measures a part of it (the
    exp limit: ``fn.factor``)."""
    factor = getattr(contender.fn, "factor", 1.0)
    return timed if factor == 1.0 else timing.Timing([v * factor for v in timed.samples], timed.inner)


def result_row(case: Case, provider: str, timed: timing.Timing | None = None, note: str = "") -> dict:
    """One result: median and min in ms (None when the provider did not run), with a note."""
    return {
        "case": case.name if case.device == "cpu" else f"{case.name} {case.device}",
        "op": case.op, "size": case.size, "bins": case.bins, "k": case.k, "device": case.device,
        "provider": provider,
        "median_ms": timed.median_ms if timed else None,
        "min_ms": timed.min_ms if timed else None,
        "rounds": len(timed.samples) if timed else 0,
        "calls_per_round": timed.inner if timed else 0,
        "note": note,
    }


def add_ratios(rows) -> list:
    """Add to each row, from the rows of the same case: ``x_clone`` (time / clone time),
    ``x_yardstick`` (time / the op's YARDSTICK time: read pass, in-place pass, exp limit),
    ``x_published`` (published time / time) and ``x_alternative`` (time of the op's
    ALTERNATIVE, compiled or FFTKDE / time)."""
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r["median_ms"]
    for r in rows:
        ref, ms = by_case[r["case"]], r["median_ms"]
        yardstick, alternative = ref.get(YARDSTICK.get(r["op"])), ref.get(ALTERNATIVE.get(r["op"]))
        r["x_clone"] = ms / ref[CEILING] if ms and ref.get(CEILING) else None
        r["x_yardstick"] = ms / yardstick if ms and yardstick else None
        r["x_published"] = ref["published"] / ms if ms and ref.get("published") else None
        r["x_alternative"] = alternative / ms if ms and alternative else None
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark glue (the bench_*.py suites are three lines each)

RESULTS: list = []  # rows measured in this pytest session, for the summary table of conftest.py


def pytest_params(op: str) -> list:
    """pytest parameters (case, provider) of an op, for every size, device and provider."""
    import pytest

    return [pytest.param(case, provider, id=f"{str(case)}-{provider}".replace(" ", "-"))
            for case in cases(op) for provider in provider_names(op, case.device)]


def pytest_bench(benchmark, case: Case, provider: str) -> None:
    """Measure ``provider`` on ``case`` with the pytest-benchmark fixture (its own timer, in
    pedantic mode) for the rounds and calls per round of :func:`benchmarks.timing.calibrate`
    (one call per round where a setup must run before each), after :func:`verify`."""
    import pytest

    benchmark.group = case.group
    benchmark.extra_info.update(op=case.op, size=case.size, bins=case.bins, k=case.k, device=case.device,
                                provider=provider)
    try:
        contender = runner(case, provider)
    except Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.extra_info["check"] = verify(case, provider, contender)
    rules = timing.rules(quick_mode())
    inner = 1 if contender.setup is not None else timing.calibrate(contender, rules)
    benchmark.pedantic(contender.waited, setup=contender.setup, rounds=rules.repeats, iterations=inner,
                       warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and getattr(stats, "data", None):
        RESULTS.append(result_row(case, provider, scaled(contender, timing.Timing(list(stats.data), inner))))
