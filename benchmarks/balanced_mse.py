"""Balanced MSE side by side: ``python -m benchmarks.balanced_mse [--device cpu|cuda] [--threads N]
[--quick] [--shape B,1,H,W] [--batches N,...] [--md-rows N,N] [--dims D] [--json PATH]``.

BMC on scalar batches (``--batches``, default 256 and 4,096 samples: a training batch, and the
prior of 16 ranks' batches gathered), BNI and GAI on ``[8, 1, 240, 320]`` depth predictions with
K = 100 components, and BMC and GAI on targets of ``--dims`` dimensions (default 2: 4,096 and
65,536 rows, ``--md-rows``; GAI with K = 8 full-covariance components), each forward plus
backward (in the predictions and the noise scale), for the published formulation
(:mod:`benchmarks.published_balanced_mse`: the ``[N, K]`` or ``[N, N]`` matrix, its
``MultivariateNormal`` forms in d dimensions), that formulation under ``torch.compile`` (the
strongest plain-PyTorch alternative), dirfast's loss on each backend that runs here (its fused
``mixture_logpdf``; one ``dirfast`` row in d dimensions, plain PyTorch), and a clone of the
predictions plus its backward-sized copy (the bandwidth yardstick). Per provider: median time
(:mod:`benchmarks.timing`, the providers of a case side by side), peak memory of one warm call
above the memory in use before it (:func:`benchmarks.timing.peak_memory`), both as ratios to the
published formulation, and the largest gradient difference from it (checked before timing).
"""

from __future__ import annotations

import argparse

import torch

import dirfast
from dirfast.losses import bmc_loss, bni_loss, gai_loss

from . import published_balanced_mse as published
from . import alternatives, cases, timing

SHAPE, K = (8, 1, 240, 320), 100
BMC_BATCHES = (256, 4096)
MD_ROWS, DIMS, K_MD = (4096, 65536), 2, 8  # BMC's and GAI's rows in d dimensions, GAI's components
KINDS = ("bmc", "bni", "gai")
# A provider's loss and gradient against the published ones, relative to the largest gradient
# (float32: the sums run in another order)
GRAD_TOLERANCE = 1e-4


def inputs(device: str, seed: int = 7, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(shape, generator=g) * 9 + 0.7)
    pred = target + 0.3 * torch.randn(shape, generator=g)
    centers = torch.linspace(0.05, 9.95, K)
    weights = torch.rand(K, generator=g) + 0.05
    weights = weights / weights.sum()
    if dims_of(shape) == 1:
        gmm = {"means": torch.linspace(0.5, 9.5, K).reshape(K, 1), "variances": torch.full((K, 1, 1), 0.2),
               "weights": weights}
    else:  # K_MD full covariances in d dimensions
        d = dims_of(shape)
        a = torch.randn(K_MD, d, d, generator=g) * 0.3
        mixture_weights = torch.rand(K_MD, generator=g) + 0.1
        gmm = {"means": torch.rand(K_MD, d, generator=g) * 9 + 0.5,
               "variances": a @ a.transpose(1, 2) + 0.2 * torch.eye(d), "weights": mixture_weights / mixture_weights.sum()}
    move = lambda t: t.to(device)  # noqa: E731
    return move(pred), move(target), move(centers), move(weights), {k: move(v) for k, v in gmm.items()}


def dims_of(shape) -> int:
    """The targets' dimensions: d for a ``[N, d]`` case of more than one, else 1 (scalar targets)."""
    return shape[1] if len(shape) == 2 and shape[1] > 1 else 1


def case_shapes(shape=SHAPE, batches=BMC_BATCHES, md_rows=MD_ROWS, dims=DIMS) -> list:
    """(loss kind, predictions' shape) of each case: BMC at each batch size, BNI and GAI at ``shape``,
    BMC and GAI on ``md_rows`` rows of ``dims`` dimensions (none for ``dims`` 1)."""
    cases = [("bmc", (n, 1)) for n in batches] + [("bni", tuple(shape)), ("gai", tuple(shape))]
    return cases + ([("bmc", (md_rows[0], dims)), ("gai", (md_rows[1], dims))] if dims > 1 else [])


def _published(kind: str, dims: int = 1):
    """The published loss of ``kind`` on (pred, target, sigma, centers, weights, gmm) for targets
    of ``dims`` dimensions."""
    if dims > 1:
        return {"bmc": lambda p, t, s, c, w, g: published.bmc_loss_md(p, t, s ** 2),
                "gai": lambda p, t, s, c, w, g: published.gai_loss_md(p, t, g, s ** 2)}[kind]
    return {"bmc": lambda p, t, s, c, w, g: published.bmc_loss(p.reshape(-1, 1), t.reshape(-1, 1), s ** 2),
            "bni": lambda p, t, s, c, w, g: published.bni_loss(p.reshape(-1, 1), t.reshape(-1, 1), s ** 2, c, w),
            "gai": lambda p, t, s, c, w, g: published.gai_loss(p.reshape(-1, 1), t.reshape(-1, 1), g, s ** 2)}[kind]


def providers(device: str, kind: str, with_compiled: bool = True, dims: int = 1) -> list:
    """(name, callable(pred, target, sigma, centers, weights, gmm) -> loss) of each provider of
    ``kind`` on targets of ``dims`` dimensions: published, compiled (``with_compiled``), dirfast
    on each backend here (one row in d dimensions: no dirfast op runs there), clone."""
    rows = [("published", _published(kind, dims))]
    if with_compiled:
        rows.append(("compiled", alternatives.compiled(_published(kind, dims))))
    call = {"bmc": lambda p, t, s, c, w, g: bmc_loss(p, t, s ** 2),
            "bni": lambda p, t, s, c, w, g: bni_loss(p, t, s ** 2, c, w),
            "gai": lambda p, t, s, c, w, g: gai_loss(p, t, g, s ** 2)}[kind]
    if dims > 1:
        rows.append(("dirfast", call))
    for backend, info in dirfast.backends().items() if dims == 1 else ():
        if not info["available"] or "mixture_logpdf" not in info["ops"] or device not in cases.BACKEND_DEVICES[backend]:
            continue  # runs on other devices (Triton on a CPU: its interpreter, a correctness tool)
        rows.append((f"dirfast-{backend}", _on(backend, call)))
    rows.append(("clone", lambda p, t, s, c, w, g: (p.clone() * s).sum()))
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


def run(device: str, quick: bool, shape=SHAPE, batches=BMC_BATCHES, with_compiled: bool = True, md_rows=MD_ROWS,
        dims=DIMS) -> list:
    """Per case: each provider's values and peak memory, one at a time (a provider whose loss or
    gradient differs from the published ones raises), then their times side by side
    (:func:`benchmarks.timing.compare`)."""
    rows = []
    for kind, case_shape in case_shapes(shape, batches, md_rows, dims):
        data = inputs(device, shape=case_shape)
        case = f"{kind} {'x'.join(map(str, case_shape))}"
        named = providers(device, kind, with_compiled, dims_of(case_shape))
        steps = {name: _step(fn, data, device) for name, fn in named}
        case_rows, reference = {}, None
        for name, step in steps.items():
            print(f"  {case} {name}: values and peak memory ...", flush=True)
            peak, loss, grad = timing.peak_memory(step, device)
            row = {"kind": kind, "shape": list(case_shape), "provider": name, "peak_bytes": peak, "loss": float(loss)}
            if name == "published":
                reference = (row["loss"], grad)
            elif name != "clone":
                row["max_grad_difference"] = float((grad - reference[1]).abs().max() / reference[1].abs().max())
                row["loss_difference"] = abs(row["loss"] - reference[0])
                if not (row["max_grad_difference"] <= GRAD_TOLERANCE
                        and row["loss_difference"] <= GRAD_TOLERANCE * max(abs(reference[0]), 1.0)):
                    raise RuntimeError(f"{case} {name}: gradient {row['max_grad_difference']:.2e} and loss "
                                       f"{row['loss_difference']:.2e} from the published ones (relative "
                                       f"tolerance {GRAD_TOLERANCE})")
            case_rows[name] = row
            grad = None
        print(f"  {case}: timing {', '.join(steps)} side by side ...", flush=True)
        contenders = {name: timing.Contender(step, device=device) for name, step in steps.items()}
        for name, timed in timing.compare(contenders, timing.rules(quick)).items():
            if isinstance(timed, Exception):
                raise RuntimeError(f"{case} {name} failed") from timed
            case_rows[name].update(median_ms=timed.median_ms, rounds=len(timed.samples), calls_per_round=timed.inner)
        for row in case_rows.values():
            row["x faster than published"] = case_rows["published"]["median_ms"] / row["median_ms"]
            row["memory / published"] = row["peak_bytes"] / max(case_rows["published"]["peak_bytes"], 1)
        rows += case_rows.values()
    return rows


def format_rows(rows) -> str:
    lines = [f"{'case':<16} {'provider':<17} {'median ms':>10} {'x faster':>9} {'x compiled':>10} {'peak MB':>9} "
             f"{'mem/published':>14} {'|grad diff|':>12}"]
    for r in rows:
        diff = r.get("max_grad_difference")
        compiled = next((c for c in rows if c["provider"] == "compiled" and c["kind"] == r["kind"]
                         and c["shape"] == r["shape"]), None)
        versus = "" if compiled is None else format(compiled["median_ms"] / r["median_ms"], ".2f")
        case = f"{r['kind']} {'x'.join(map(str, r['shape']))}"
        lines.append(f"{case:<16} {r['provider']:<17} {r['median_ms']:>10.2f} {r['x faster than published']:>9.2f} "
                     f"{versus:>10} {r['peak_bytes'] / 2**20:>9.1f} {r['memory / published']:>14.4f} "
                     f"{'' if diff is None else format(diff, '.1e'):>12}")
    return "\n".join(lines)


def _integers(option: str, text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"{option} must be integers separated by commas, got {text!r}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.balanced_mse", description=__doc__.split("\n\n")[0])
    timing.add_command_arguments(parser)
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)),
                        help="BNI's and GAI's predictions' shape (default 8,1,240,320)")
    parser.add_argument("--batches", default=",".join(map(str, BMC_BATCHES)),
                        help="BMC's batch sizes (default 256,4096)")
    parser.add_argument("--md-rows", default=",".join(map(str, MD_ROWS)),
                        help="BMC's and GAI's rows in d dimensions (default 4096,65536)")
    parser.add_argument("--dims", type=int, default=DIMS, help="their dimensions (default 2; 1 leaves them out)")
    args = parser.parse_args(argv)
    shape, batches = _integers("--shape", args.shape), _integers("--batches", args.batches)
    md_rows = _integers("--md-rows", args.md_rows)
    if len(md_rows) != 2 or args.dims < 1:
        raise SystemExit(f"--md-rows must be two integers (BMC's rows, GAI's) and --dims at least 1, got "
                         f"{args.md_rows!r} and {args.dims}")
    run_ = timing.Run(args, f"Balanced MSE, BMC on {list(batches)} samples, BNI and GAI on {list(shape)} with "
                            f"K={K}" + (f", BMC and GAI on {list(md_rows)} rows of {args.dims} dimensions (GAI K="
                                        f"{K_MD})" if args.dims > 1 else "") + ", forward+backward")
    rows = run(args.device, args.quick, shape, batches, md_rows=md_rows, dims=args.dims)
    run_.finish(format_rows(rows), rows, shape=shape, batches=batches, K=K, md_rows=md_rows, dims=args.dims,
                K_md=K_MD)


if __name__ == "__main__":
    main()
