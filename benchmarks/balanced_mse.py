"""Balanced MSE's dense case side by side: ``python -m benchmarks.balanced_mse [--device cpu|cuda]
[--threads N] [--quick] [--json PATH]``.

BNI and GAI on ``[8, 1, 240, 320]`` depth predictions with K = 100 components, forward plus
backward (in the predictions and the noise scale), for the published formulation
(:mod:`benchmarks.published_balanced_mse`: the ``[N, K]`` matrix), dirfast's loss on each backend that
runs here (its fused ``mixture_logpdf``), and a clone of the predictions plus its backward-sized
copy (the bandwidth yardstick). Per provider: median time (:mod:`benchmarks.timing`, the
providers of a loss side by side), peak memory of one warm call above the memory in use before
it (:func:`benchmarks.timing.peak_memory`), and both as ratios to the published formulation.
"""

from __future__ import annotations

import argparse

import torch

import dirfast
from dirfast.losses import bni_loss, gai_loss

from . import published_balanced_mse as published
from . import cases, timing

SHAPE, K = (8, 1, 240, 320), 100


def inputs(device: str, seed: int = 7, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(shape, generator=g) * 9 + 0.7)
    pred = target + 0.3 * torch.randn(shape, generator=g)
    centers = torch.linspace(0.05, 9.95, K)
    weights = torch.rand(K, generator=g) + 0.05
    weights = weights / weights.sum()
    gmm = {"means": torch.linspace(0.5, 9.5, K).reshape(K, 1), "variances": torch.full((K, 1, 1), 0.2),
           "weights": weights}
    move = lambda t: t.to(device)  # noqa: E731
    return move(pred), move(target), move(centers), move(weights), {k: move(v) for k, v in gmm.items()}


def providers(device: str) -> list:
    """(name, loss kind, callable(pred, target, sigma, centers, weights, gmm) -> loss)."""
    rows = []
    for kind in ("bni", "gai"):
        if kind == "bni":
            rows.append(("published", kind, lambda p, t, s, c, w, g: published.bni_loss(
                p.reshape(-1, 1), t.reshape(-1, 1), s ** 2, c, w)))
        else:
            rows.append(("published", kind, lambda p, t, s, c, w, g: published.gai_loss(
                p.reshape(-1, 1), t.reshape(-1, 1), g, s ** 2)))
        for backend, info in dirfast.backends().items():
            if not info["available"] or "mixture_logpdf" not in info["ops"] or device not in cases.BACKEND_DEVICES[backend]:
                continue  # runs on other devices (Triton on a CPU: its interpreter, a correctness tool)
            call = (lambda p, t, s, c, w, g: bni_loss(p, t, s ** 2, c, w)) if kind == "bni" else \
                (lambda p, t, s, c, w, g: gai_loss(p, t, g, s ** 2))
            rows.append((f"dirfast-{backend}", kind, _on(backend, call)))
        rows.append(("clone", kind, lambda p, t, s, c, w, g: (p.clone() * s).sum()))
    return rows


def _on(backend, call):
    def run(*args):
        with dirfast.use_backend(backend):
            loss = call(*args)
            return loss
    return run


def _step(fn, data, device):
    """One forward and backward of ``fn`` on ``data``: (loss, gradient in the predictions)."""
    pred, target, centers, weights, gmm = data
    sigma = torch.tensor(1.0, device=device, requires_grad=True)

    def step():
        p = pred.detach().requires_grad_()
        loss = fn(p, target, sigma, centers, weights, gmm)
        loss.backward()
        return loss.detach(), p.grad
    return step


def run(device: str, quick: bool, shape=SHAPE) -> list:
    """Per loss kind: each provider's values and peak memory, one at a time, then their times
    side by side (:func:`benchmarks.timing.compare`)."""
    data = inputs(device, shape=shape)
    rows = []
    for kind in ("bni", "gai"):
        steps = {name: _step(fn, data, device) for name, k, fn in providers(device) if k == kind}
        kind_rows, reference = {}, None
        for name, step in steps.items():
            print(f"  {kind} {name}: values and peak memory ...", flush=True)
            peak, loss, grad = timing.peak_memory(step, device)
            row = {"kind": kind, "provider": name, "peak_bytes": peak, "loss": float(loss)}
            if name == "published":
                reference = (row["loss"], grad)
            elif name != "clone":
                row["max_grad_difference"] = float((grad - reference[1]).abs().max() / reference[1].abs().max())
                row["loss_difference"] = abs(row["loss"] - reference[0])
            kind_rows[name] = row
            grad = None
        print(f"  {kind}: timing {', '.join(steps)} side by side ...", flush=True)
        contenders = {name: timing.Contender(step, device=device) for name, step in steps.items()}
        for name, timed in timing.compare(contenders, timing.rules(quick)).items():
            if isinstance(timed, Exception):
                raise RuntimeError(f"{kind} {name} failed") from timed
            kind_rows[name].update(median_ms=timed.median_ms, rounds=len(timed.samples), calls_per_round=timed.inner)
        rows += kind_rows.values()
    for row in rows:
        published_row = next(r for r in rows if r["kind"] == row["kind"] and r["provider"] == "published")
        row["x faster than published"] = published_row["median_ms"] / row["median_ms"]
        row["memory / published"] = row["peak_bytes"] / max(published_row["peak_bytes"], 1)
    return rows


def format_rows(rows) -> str:
    lines = [f"{'loss':<5} {'provider':<17} {'median ms':>10} {'x faster':>9} {'peak MB':>9} {'mem/published':>14}"
             f" {'|grad diff|':>12}"]
    for r in rows:
        diff = r.get("max_grad_difference")
        lines.append(f"{r['kind']:<5} {r['provider']:<17} {r['median_ms']:>10.1f} {r['x faster than published']:>9.2f} "
                     f"{r['peak_bytes'] / 2**20:>9.1f} {r['memory / published']:>14.4f} "
                     f"{'' if diff is None else format(diff, '.1e'):>12}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.balanced_mse", description=__doc__.split("\n\n")[0])
    timing.add_command_arguments(parser)
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="predictions' shape (default 8,1,240,320)")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        raise SystemExit(f"--shape must be integers separated by commas, got {args.shape!r}") from None
    run_ = timing.Run(args, f"Balanced MSE {list(shape)} K={K} forward+backward")
    rows = run(args.device, args.quick, shape)
    run_.finish(format_rows(rows), rows, shape=shape, K=K)


if __name__ == "__main__":
    main()
