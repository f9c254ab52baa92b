"""DenseWeight on the team's real labels next to the denseweight package: ``python -m
benchmarks.density_table [--data DIR] [--out PATH]``.

Needs the team's real label files (``--data DIR``, default ``../shared/data`` beside the
checkout; team machines only): without them it exits with status 1 and writes nothing.
Fits :class:`dirfast.DenseWeight` (defaults: alpha 1, Silverman's bandwidth, 4096 grid points) on
the AgeDB-DIR training ages and the STS-B-DIR training scores (:mod:`benchmarks.real_labels`,
float64), and, when the package is installed, ``denseweight.DenseWeight`` with its defaults on the
same labels. Prints a markdown table of p' and the weights at a few labels, and the largest and
median differences over all training labels for alpha 0.5, 1 and 2, then (with the package) the
median times of fitting and of the weights, side by side (:mod:`benchmarks.timing`); writes the
same text to ``--out`` (default ``benchmarks/results/density-weights.md``).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import dirfast

from . import real_labels, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "density-weights.md")
AGES = [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
SCORES = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
ALPHAS = [0.5, 1.0, 2.0]


def package():
    """``denseweight.DenseWeight``, or None when the package is not installed."""
    try:
        from denseweight import DenseWeight
    except ImportError:
        return None
    return DenseWeight


def compare(labels: np.ndarray, alpha: float, package_class):
    """(dirfast's DenseWeight, the package's fitted object or None) on ``labels``."""
    ours = dirfast.DenseWeight(alpha=alpha).fit(torch.from_numpy(labels))
    theirs = None
    if package_class is not None:
        theirs = package_class(alpha=alpha)
        theirs.fit(labels)
    return ours, theirs


def differences(labels: np.ndarray, ours, theirs) -> dict:
    """Largest absolute, and median and largest relative, weight difference over ``labels``."""
    mine, package_weights = ours.weights(torch.from_numpy(labels)).double().numpy(), theirs.eval(labels)
    relative = np.abs(mine - package_weights) / package_weights
    return dict(max_abs=float(np.abs(mine - package_weights).max()), median_rel=float(np.median(relative)),
                max_rel=float(relative.max()))


def table(name: str, labels: np.ndarray, points, package_class) -> list:
    """Markdown lines: p' and the weight at ``points`` (alpha 1), then the differences per alpha."""
    ours, theirs = compare(labels, 1.0, package_class)
    query = np.asarray(points, dtype=np.float64)
    tensor = torch.from_numpy(query)
    counts = [int(np.sum(labels == point)) for point in query]
    lines = [f"### {name}: {labels.size} training labels, bandwidth {ours.fitted_bandwidth:.4g} (Silverman)", ""]
    if theirs is None:
        lines += ["| label | training labels there | p' | weight |", "| ---: | ---: | ---: | ---: |"]
        for point, count, density, weight in zip(query, counts, ours.density(tensor).tolist(),
                                                 ours.weights(tensor).tolist()):
            lines.append(f"| {point:g} | {count} | {density:.4f} | {weight:.4f} |")
        return lines + ["", "(the denseweight package is not installed: no comparison)", ""]
    lines += [f"denseweight's bandwidth: {theirs.bandwidth:.4g}", "",
              "| label | training labels there | weight, dirfast | weight, denseweight | difference |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for point, count, mine, package_weight in zip(query, counts, ours.weights(tensor).tolist(), theirs.eval(query)):
        lines.append(f"| {point:g} | {count} | {mine:.4f} | {package_weight:.4f} | {mine - package_weight:+.4f} |")
    lines += ["", "| alpha | max abs. weight difference | median rel. difference | max rel. difference |",
              "| ---: | ---: | ---: | ---: |"]
    for alpha in ALPHAS:
        gap = differences(labels, *compare(labels, alpha, package_class))
        lines.append(f"| {alpha:g} | {gap['max_abs']:.2e} | {gap['median_rel']:.2e} | {gap['max_rel']:.2e} |")
    return lines + [""]


def timing_row(name: str, labels: np.ndarray, package_class, rules: timing.Rules = timing.FULL) -> str:
    """A markdown row: fitting and weighing ``labels``, dirfast and the package, medians of
    interleaved rounds (:func:`benchmarks.timing.compare`) and ratios."""
    tensor = torch.from_numpy(labels)
    ours = dirfast.DenseWeight().fit(tensor)
    theirs = package_class(alpha=1.0)
    theirs.fit(labels)
    calls = {"fit, dirfast": lambda: dirfast.DenseWeight().fit(tensor),
             "fit, package": lambda: package_class(alpha=1.0).fit(labels),
             "weights, dirfast": lambda: ours.weights(tensor), "weights, package": lambda: theirs.eval(labels)}
    ms = {}
    for key, timed in timing.compare({k: timing.Contender(fn) for k, fn in calls.items()}, rules).items():
        if isinstance(timed, Exception):
            raise RuntimeError(f"{name}: {key} failed") from timed
        ms[key] = timed.median_ms
    fit, weights = (ms["fit, dirfast"], ms["fit, package"]), (ms["weights, dirfast"], ms["weights, package"])
    return (f"| {name} | {labels.size} | {fit[0]:.2f} | {fit[1]:.2f} | {fit[1] / fit[0]:.1f}x | "
            f"{weights[0]:.2f} | {weights[1]:.2f} | {weights[1] / weights[0]:.1f}x |")


def main(argv=None) -> int:
    parser = real_labels.parser("python -m benchmarks.density_table",
                                "DenseWeight on the team's real labels next to the denseweight package.")
    parser.add_argument("--out", default=OUT, help="where to write the markdown (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="shorter measurements (benchmarks.timing.QUICK)")
    args = parser.parse_args(argv)
    rules = timing.rules(args.quick)
    ages = real_labels.agedb_ages("train", real_labels.agedb_path(args.data))
    scores = real_labels.stsb_scores("train", np.float64, data=args.data)
    if ages is None or scores is None:
        missing = real_labels.agedb_path(args.data) if ages is None else real_labels.stsb_path("train", args.data)
        print(f"density_table: nothing to compare: {missing} not found (the team's label files; pass --data DIR)",
              file=sys.stderr)
        return 1
    ages = ages.astype(np.float64)  # as a user's NumPy or pandas reads them
    package_class = package()
    lines = ["## DenseWeight: dirfast next to the denseweight package", "",
             "Weights at a few labels (alpha 1, eps 1e-6, defaults of both; the weights average 1 over the "
             "training labels), then the differences over every training label.", ""]
    lines += table("AgeDB-DIR ages", ages, AGES, package_class)
    lines += table("STS-B-DIR scores", scores, SCORES, package_class)
    lines += ["Where they differ: the package reads p' at the grid point at or below a label (a step of "
              "(range + 9 bandwidths) / 4095), dirfast interpolates between grid points; dirfast's p' is within "
              "1e-4 of the exact Gaussian KDE (tests/test_density.py). Near the densest labels the weight "
              "1 - alpha p' is close to 0, so a small difference in p' is a large relative one there.", ""]
    if package_class is not None:
        load_before, busy = timing.load_report()
        info = timing.machine_info(busy=busy)
        rows = [timing_row("AgeDB-DIR ages", ages, package_class, rules),
                timing_row("STS-B-DIR scores", scores, package_class, rules)]
        lines += [f"### Time: median of {rules.repeats} interleaved rounds, ms ({info['cpu']}, "
                  f"{info['torch_threads']} threads, torch {torch.__version__})", "",
                  "Fitting on the training labels, then the weights of those labels (dirfast's `weights`, the "
                  "package's `eval`).", "",
                  "| labels | n | fit, dirfast | fit, denseweight | dirfast faster | weights, dirfast | "
                  "weights, denseweight | dirfast faster |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  *rows, "", "```", load_before, timing.load_report(running=True)[0], "```", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
