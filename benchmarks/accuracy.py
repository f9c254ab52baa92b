"""The Balanced MSE paper's synthetic benchmark: ``python -m benchmarks.accuracy [--seeds N]
[--protocol fast|published] [--workers N] [--json PATH]``.

A linear regressor ``y = w x + b`` is trained on labels from a skewed distribution (a narrow normal,
N(5, 0.5^2), or an exponential of rate 2, both cut to [0, 10]) observed with Gaussian label noise
(sigma 1: ``x = y - noise``), and tested on a balanced, uniform test set over [0, 10], where the
oracle is ``y = x`` (test MSE 0). A loss that follows the training distribution pulls predictions
toward the frequent labels and pays for it on the uniform test set. As in the published
``synthetic_benchmark/main_1d.py``: 1,024 training samples, batches of 256, SGD with momentum 0.9
and a cosine schedule, the checkpoint with the best MSE on a uniform validation set (5 checks),
and the learnable noise starting at 1.5 times the true noise scale. ``--protocol published`` runs
its 2,000 epochs at learning rate 1e-3; the default ``fast`` protocol runs 400 epochs at 5e-3
(the same optimum in a fifth of the steps; see benchmarks/results/accuracy.md).

Methods: plain MSE; inverse re-weighting (histogram of 50 bins); LDS re-weighting (the same,
smoothed: Gaussian kernel, ks 5, sigma 2); BMC, BNI (the label histogram as its prior)
and GAI (an 8-component mixture fitted to the training labels by dirfast), each with the true
noise scale fixed and with a learnable one. Prints a progress line per finished run, then the
balanced-test MSE as mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dirfast
from dirfast.losses import BMCLoss, BNILoss, GAILoss, weighted_mse_loss

from .timing import shown_path

Y_LOW, Y_HIGH, NOISE_SIGMA = 0.0, 10.0, 1.0
NUM_TRAIN = NUM_VAL = NUM_TEST = 1024
BATCH = 256
PROTOCOLS = {"fast": (400, 5e-3), "published": (2000, 1e-3)}  # (epochs, learning rate)
DISTRIBUTIONS = {"normal": lambda: torch.distributions.Normal(5.0, 0.5),
                 "exp": lambda: torch.distributions.Exponential(2.0)}
METHODS = ("MSE", "Inverse", "LDS", "BMC", "BMC learnable", "BNI", "BNI learnable", "GAI", "GAI learnable")
BINNING = dirfast.Binning.uniform(Y_LOW, Y_HIGH, 50)


def make_data(distribution: str, seed: int):
    """Training (x, y) with label noise, then uniform validation and test sets (x = y)."""
    torch.manual_seed(seed)
    y = DISTRIBUTIONS[distribution]().sample((2 * NUM_TRAIN * 8, 1))
    y = y[(y >= Y_LOW) & (y <= Y_HIGH)][:NUM_TRAIN].unsqueeze(-1)
    assert len(y) == NUM_TRAIN
    x = y - torch.distributions.Normal(0.0, NOISE_SIGMA).sample((NUM_TRAIN, 1))
    uniform = torch.distributions.Uniform(Y_LOW, Y_HIGH)
    y_val, y_test = uniform.sample((NUM_VAL, 1)), uniform.sample((NUM_TEST, 1))
    return (x, y), (y_val.clone(), y_val), (y_test.clone(), y_test)


def criterion(method: str, y_train: torch.Tensor):
    """(loss(pred, target, index) , extra parameters to train)."""
    if method == "MSE":
        return (lambda pred, target, index: F.mse_loss(pred, target)), []
    if method in ("Inverse", "LDS"):
        lds = dirfast.LDS(BINNING, reweight="inverse", lds=method == "LDS", inverse_clip=None).fit(y_train)
        weights = lds.weights(y_train)  # per training sample, as the DIR datasets precompute them
        return (lambda pred, target, index: weighted_mse_loss(pred, target, weights[index])), []
    learn = method.endswith("learnable")
    sigma = 1.5 * NOISE_SIGMA if learn else NOISE_SIGMA
    kind = method.split()[0]
    if kind == "BMC":
        loss = BMCLoss(sigma, learn_noise=learn)
    elif kind == "BNI":
        loss = BNILoss.from_lds(dirfast.LDS(BINNING, reweight="inverse", lds=False).fit(y_train), sigma,
                                learn_noise=learn)
    else:
        loss = GAILoss.from_labels(y_train, 8, sigma, learn_noise=learn)
    return (lambda pred, target, index: loss(pred, target)), ([loss.noise_sigma] if learn else [])


def run_one(job):
    """Train one method on one seed's data; return its balanced-test MSE."""
    distribution, seed, method, protocol = job
    epochs, lr = PROTOCOLS[protocol]
    (x, y), (x_val, y_val), (x_test, y_test) = make_data(distribution, seed)
    loss_fn, extra = criterion(method, y)
    torch.manual_seed(seed + 1)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if extra:
        optimizer.add_param_group({"params": extra, "lr": lr})
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(seed + 2)
    best_val, best_state = float("inf"), None
    for epoch in range(epochs):
        for index in torch.randperm(NUM_TRAIN, generator=generator).split(BATCH):
            optimizer.zero_grad()
            loss_fn(model(x[index]), y[index], index).backward()
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % (epochs // 5) == 0:
            with torch.no_grad():
                val = float(F.mse_loss(model(x_val), y_val))
            if val < best_val:
                best_val, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    with torch.no_grad():
        test = float(F.mse_loss(model(x_test), y_test))
    noise = float(extra[0].detach()) if extra else None
    return {"distribution": distribution, "seed": seed, "method": method, "test_mse": test, "noise_sigma": noise}


def summarise(results) -> dict:
    table = {}
    for r in results:
        table.setdefault((r["distribution"], r["method"]), []).append(r["test_mse"])
    return {key: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for key, v in table.items()}


def format_table(summary, distributions) -> str:
    header = f"{'method':<15}" + "".join(f"{d + ' (mean ± sd)':>22}" for d in distributions)
    lines = [header]
    for method in METHODS:
        cells = []
        for d in distributions:
            mean, sd, _ = summary[(d, method)]
            cells.append(f"{mean:>13.3f} ± {sd:<6.3f}")
        lines.append(f"{method:<15}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per method and distribution (default 5)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="fast")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--distributions", default="normal,exp")
    parser.add_argument("--json", metavar="PATH", help="also write every run's result as JSON")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1:
        raise SystemExit("--seeds and --workers must be at least 1")
    distributions = [d for d in args.distributions.split(",") if d]
    unknown = [d for d in distributions if d not in DISTRIBUTIONS]
    if unknown:
        raise SystemExit(f"unknown distribution(s) {unknown}; choose from {list(DISTRIBUTIONS)}")
    jobs = [(d, seed, m, args.protocol) for d in distributions for seed in range(args.seeds) for m in METHODS]
    epochs, lr = PROTOCOLS[args.protocol]
    print(f"Balanced MSE synthetic benchmark: {len(jobs)} runs ({len(METHODS)} methods x {len(distributions)} "
          f"distributions x {args.seeds} seeds), {epochs} epochs at lr {lr}, {args.workers} workers", flush=True)
    start, results = time.perf_counter(), []
    tty = sys.stderr.isatty()  # one line rewritten in a terminal, a line per run in a log
    with concurrent.futures.ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for result in pool.map(run_one, jobs):
            results.append(result)
            line = (f"  {len(results)}/{len(jobs)} runs, {time.perf_counter() - start:5.1f} s "
                    f"({result['distribution']}, {result['method']}, seed {result['seed']})")
            print("\r" + line.ljust(78) if tty else line, end="" if tty else "\n", flush=True, file=sys.stderr)
    if tty:
        print(file=sys.stderr)
    summary = summarise(results)
    print(f"Balanced-test MSE (lower is better; the oracle y = x scores 0), {args.seeds} seeds, "
          f"{time.perf_counter() - start:.0f} s:")
    print(format_table(summary, distributions))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"protocol": args.protocol, "epochs": epochs, "lr": lr, "results": results}, handle, indent=1)
        print(f"wrote {shown_path(args.json)}")


if __name__ == "__main__":
    main()
