"""The pairwise regularisers side by side: ``python -m benchmarks.pairwise [--device cpu|cuda]
[--threads N] [--quick] [--sweep] [--json PATH]``.

Rank-N-Contrast (bs = 256: n = 512 rows, D = 128 and 512), ConR (N = 512, D = 512) and RankSim
(M = 256 unique labels, D = 512), forward plus backward in the features, for the published
formulation (:mod:`benchmarks.published_pairwise`), dirfast on each backend that runs here, and
``torch.compile`` of dirfast's reference (the strongest plain-PyTorch alternative). Per
provider: median time (:mod:`benchmarks.timing`, side by side), peak memory of one warm call
(:func:`benchmarks.timing.peak_memory`), both as ratios to the published formulation, and the
largest difference from its loss and gradient. ``--sweep`` adds n = 256 .. 4,096 (D = 128) for
dirfast and for the published code where it finishes in reasonable time and memory.
"""

from __future__ import annotations

import argparse

import torch

import dirfast
from dirfast.losses import conr_loss, ranksim_loss, rnc_loss

from . import published_pairwise as published
from . import cases, timing

# (loss, rows n, D): the goals
CASES = [("rnc", 512, 128), ("rnc", 512, 512), ("conr", 512, 512), ("ranksim", 256, 512)]
SWEEP_N = (256, 512, 1024, 2048, 4096)
SWEEP_D = 128
PUBLISHED_MAX_N = {"rnc": 1024, "conr": 4096, "ranksim": 2048}  # beyond: minutes per call, or GBs


def inputs(loss: str, n: int, d: int, device: str, seed: int = 11):
    """Float32 features and labels of one case: RnC two views of n / 2 samples with integer ages
    (ties); ConR n rows (two views concatenated) with ages and predictions near them; RankSim n
    unique labels."""
    g = torch.Generator().manual_seed(seed)
    if loss == "rnc":
        features = torch.randn(n // 2, 2, d, generator=g)
        labels = torch.randint(0, 100, (n // 2, 1), generator=g).float()
        extra = ()
    elif loss == "conr":
        features = torch.randn(n, d, generator=g)
        half = torch.randint(0, 100, (n // 2, 1), generator=g).float()
        labels = torch.cat([half, half])
        extra = ((labels + torch.randn(n, 1, generator=g) * 5),)
    else:
        features = torch.randn(n, d, generator=g)
        labels = torch.randperm(4 * n, generator=g)[:n].float()[:, None] / 4
        extra = ()
    return tuple(t.to(device) for t in (features, labels) + extra)


def _published(loss: str):
    return {"rnc": lambda f, y, *p: published.rnc_loss(f, y, 2.0),
            "conr": lambda f, y, p: published.conr_loss_imdb(f, y, p, 1, 1, 0.07, 0.01),
            "ranksim": lambda f, y: published.ranksim_loss(f, y, 2.0)}[loss]


def _dirfast(loss: str):
    return {"rnc": lambda f, y: rnc_loss(f, y, 2.0),
            "conr": lambda f, y, p: conr_loss(f, y, p, 1.0, 1.0, 0.07, 0.01),
            "ranksim": lambda f, y: ranksim_loss(f, y, 2.0)}[loss]


def _compiled_reference(loss: str):
    """dirfast's pure-PyTorch reference of the op, under torch.compile (inductor)."""
    fn = _dirfast(loss)

    def run(*args):
        with dirfast.use_backend("reference"):
            return fn(*args)
    return torch.compile(run)


def providers(loss: str, n: int, device: str, with_compiled: bool = True) -> dict:
    rows = {}
    if n <= PUBLISHED_MAX_N[loss]:
        rows["published"] = _published(loss)
    for backend, info in dirfast.backends().items():
        if not info["available"] or f"{loss}_loss" not in info["ops"] or device not in cases.BACKEND_DEVICES[backend]:
            continue  # runs on other devices (Triton on a CPU: its interpreter, a correctness tool)
        rows[f"dirfast-{backend}"] = _on(backend, _dirfast(loss))
    if with_compiled:
        rows["compiled reference"] = _compiled_reference(loss)
    return rows


def _on(backend, fn):
    def run(*args):
        with dirfast.use_backend(backend):
            return fn(*args)
    return run


def _step(fn, data):
    features, *rest = data

    def step():
        f = features.detach().requires_grad_()
        loss = fn(f, *rest)
        loss.backward()
        return loss.detach(), f.grad
    return step


def run_case(loss: str, n: int, d: int, device: str, quick: bool, with_compiled: bool = True) -> list:
    data = inputs(loss, n, d, device)
    steps = {name: _step(fn, data) for name, fn in providers(loss, n, device, with_compiled).items()}
    rows, reference = {}, None
    for name, step in steps.items():
        print(f"  {loss} n={n} D={d} {name}: values and peak memory ...", flush=True)
        peak, value, grad = timing.peak_memory(step, device)
        row = {"loss": loss, "n": n, "D": d, "provider": name, "peak_bytes": peak, "value": float(value)}
        if reference is None:
            reference = (row["value"], grad)
        else:
            row["value_difference"] = abs(row["value"] - reference[0]) / max(abs(reference[0]), 1e-30)
            row["max_grad_difference"] = float((grad - reference[1]).abs().max() / reference[1].abs().max())
        rows[name] = row
    print(f"  {loss} n={n} D={d}: timing {', '.join(steps)} side by side ...", flush=True)
    contenders = {name: timing.Contender(step, device=device) for name, step in steps.items()}
    for name, timed in timing.compare(contenders, timing.rules(quick)).items():
        if isinstance(timed, Exception):
            raise RuntimeError(f"{loss} {name} failed") from timed
        rows[name].update(median_ms=timed.median_ms, rounds=len(timed.samples), calls_per_round=timed.inner)
    first = next(iter(rows.values()))
    for row in rows.values():
        row["x faster than first"] = first["median_ms"] / row["median_ms"]
        row["memory / first"] = row["peak_bytes"] / max(first["peak_bytes"], 1)
        row["first"] = first["provider"]
    return list(rows.values())


def format_rows(rows) -> str:
    lines = [f"{'loss':<8} {'n':>5} {'D':>4} {'provider':<19} {'median ms':>10} {'x faster':>9} {'peak MB':>9} "
             f"{'mem ratio':>10} {'|value diff|':>12} {'|grad diff|':>12}   (ratios and differences against the "
             "first provider of each case: the published code where it runs)"]
    for r in rows:
        diffs = [r.get("value_difference"), r.get("max_grad_difference")]
        lines.append(f"{r['loss']:<8} {r['n']:>5} {r['D']:>4} {r['provider']:<19} {r['median_ms']:>10.2f} "
                     f"{r['x faster than first']:>9.1f} {r['peak_bytes'] / 2**20:>9.1f} {r['memory / first']:>10.4f} "
                     + " ".join(f"{'' if v is None else format(v, '.1e'):>12}" for v in diffs))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pairwise", description=__doc__.split("\n\n")[0])
    timing.add_command_arguments(parser)
    parser.add_argument("--sweep", action="store_true", help=f"also n in {SWEEP_N} at D = {SWEEP_D}")
    parser.add_argument("--losses", default="rnc,conr,ranksim", help="which losses (default all three)")
    parser.add_argument("--no-compiled", action="store_true", help="leave out torch.compile of the reference")
    args = parser.parse_args(argv)
    losses = args.losses.split(",")
    unknown = set(losses) - {"rnc", "conr", "ranksim"}
    if unknown:
        raise SystemExit(f"--losses must be among rnc, conr, ranksim, got {sorted(unknown)}")
    run = timing.Run(args, "pairwise regularisers, forward+backward")
    cases = [case for case in CASES if case[0] in losses]
    if args.sweep:
        cases += [(loss, n, SWEEP_D) for loss in losses for n in SWEEP_N]
    rows = []
    for loss, n, d in cases:
        rows += run_case(loss, n, d, args.device, args.quick, with_compiled=not args.no_compiled and (loss, n, d) in CASES)
    run.finish(format_rows(rows), rows)


if __name__ == "__main__":
    main()
