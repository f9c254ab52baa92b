"""Label binning: ``python -m benchmarks.binning [--device cpu|cuda] [--threads N] [--quick]
[--labels 65536,614400] [--cases PARTS] [--json PATH]``.

Every LDS and FDS step bins its labels (``LDS.weights``, ``FDS.smooth``, ``FDS.accumulate``), and
a dense target bins every pixel: 614,400 labels in a depth batch of 8 x 240 x 320. For the
binnings of the published tasks -- STS-B-DIR's 50 uniform bins on float64 scores (the LDS path) and
on float32 (the FDS path), NYUD2-DIR's 100 depth buckets of 0.1 m and 100 uniform bins, AgeDB-DIR's
ages -- and a ``GridBinning`` of two targets (100 x 100 bins), at each label count, side by side
(:mod:`benchmarks.timing`): ``binning(labels, check=False)`` (what the training path calls); the
vectorised PyTorch a user writes (``torch.bucketize``, or truncation for integer bins:
:mod:`benchmarks.vectorised`), eager and under ``torch.compile``; numpy's ``searchsorted`` on the
labels on the host (what ``np.histogram`` does inside; integer bins: ``astype(int)``); and
``labels.clone()``. Every alternative's bins are checked against dirfast's before it is timed.
Ratios are to the clone and to the fastest alternative.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import dirfast

from . import cases, timing
from .vectorised import torch_bins, torch_integer_bins

LABEL_COUNTS = (65536, 614400)  # a large batch of scalar labels; a depth batch 8 x 240 x 320
ALTERNATIVES = ("torch", "compiled", "numpy")


def _uniform_case(device, low, high, num_bins, dtype, precision="labels"):
    binning = dirfast.Binning.uniform(low, high, num_bins)
    compare = torch.float32 if precision == "float32" else dtype
    host_edges = np.histogram_bin_edges(np.array([], dtype=np.float32 if compare == torch.float32 else np.float64),
                                        bins=num_bins, range=(low, high))
    edges = torch.from_numpy(host_edges).to(device)

    def make(n, g):
        return torch.rand(n, generator=g, dtype=torch.float64).mul_(1.04 * (high - low)).add_(low - 0.02 * (high - low)).to(dtype)
    return {"binning": lambda labels: binning(labels, precision=precision, check=False),
            "torch": lambda labels: torch_bins(labels.to(compare), edges),
            "numpy": lambda labels: _numpy_searched(labels.to(compare).cpu().numpy(), host_edges),
            "make": make}


def _integer_case(device, num_bins, scale, high):
    binning = dirfast.Binning.integer(num_bins, scale=scale)
    return {"binning": lambda labels: binning(labels, precision="float32", check=False),
            "torch": lambda labels: torch_integer_bins(labels, num_bins, scale),
            "numpy": lambda labels: np.clip((labels.cpu().numpy() * np.float32(scale)).astype(np.int64), 0, num_bins - 1),
            "make": lambda n, g: torch.rand(n, generator=g).mul_(high)}


def _grid_case(device):
    grid = dirfast.GridBinning(dirfast.Binning.uniform(0, 1, 100), dirfast.Binning.integer(100))
    host_edges = np.histogram_bin_edges(np.array([], dtype=np.float32), bins=100, range=(0, 1))
    edges = torch.from_numpy(host_edges).to(device)

    def torch_grid(labels):
        first = torch_bins(labels[:, 0].contiguous(), edges)  # bucketize wants it contiguous
        second = torch_integer_bins(labels[:, 1], 100)
        return torch.where((first < 0) | (second < 0), -1, first * 100 + second)

    def numpy_grid(labels):
        values = labels.cpu().numpy()
        return _numpy_searched(values[:, 0], host_edges) * 100 + np.clip(values[:, 1].astype(np.int64), 0, 99)
    return {"binning": lambda labels: grid(labels, check=False), "torch": torch_grid, "numpy": numpy_grid,
            "make": lambda n, g: torch.rand(n, 2, generator=g) * torch.tensor([1.0, 100.0])}


def _numpy_searched(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


CASES = {  # name -> the case's functions for a device
    "STS-B scores float64, uniform(0, 5, 50)": lambda device: _uniform_case(device, 0, 5, 50, torch.float64),
    "STS-B scores float32 (FDS), uniform(0, 5, 50)": lambda device: _uniform_case(device, 0, 5, 50, torch.float32,
                                                                                  "float32"),
    "depths float32, uniform(0, 10, 100)": lambda device: _uniform_case(device, 0, 10, 100, torch.float32),
    "depths float32, integer(100, scale=10)": lambda device: _integer_case(device, 100, 10.0, 11.0),
    "ages float32, integer(121)": lambda device: _integer_case(device, 121, 1.0, 130.0),
    "two targets, 100 x 100 grid": _grid_case,
}


def run_case(name: str, count: int, device: str, quick: bool) -> list:
    case = CASES[name](device)
    labels = case["make"](count, torch.Generator().manual_seed(cases.SEED + count)).to(device)
    expected = case["binning"](labels).cpu()
    compiled = torch.compile(case["torch"], dynamic=False)
    steps = {"dirfast": lambda: case["binning"](labels), "torch": lambda: case["torch"](labels),
             "compiled": lambda: compiled(labels), "numpy": lambda: case["numpy"](labels),
             "clone": lambda: labels.clone()}
    for provider in ALTERNATIVES:
        got = torch.as_tensor(steps[provider]()).cpu()
        if not torch.equal(got, expected):
            raise AssertionError(f"{provider} bins differ from dirfast's: {name}, {count} labels")
    print(f"  {name}, {count} labels: timing {', '.join(steps)} side by side ...", flush=True)
    return timing.side_by_side(steps, device, quick, f"{name}, {count} labels", ALTERNATIVES, case=name, labels=count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.binning", description=__doc__.split("\n\n")[0])
    timing.add_command_arguments(parser)
    parser.add_argument("--labels", default=",".join(map(str, LABEL_COUNTS)),
                        help="label counts, comma-separated (default 65536,614400)")
    parser.add_argument("--cases", default="", help="comma-separated parts of case names to keep (default: all)")
    args = parser.parse_args(argv)
    try:  # a bad count fails before anything runs
        counts = cases.parse_counts(args.labels, "--labels")
    except ValueError as exc:
        parser.error(str(exc))
    parts = [part for part in args.cases.split(",") if part]
    names = [name for name in CASES if not parts or any(part in name for part in parts)]
    if not names:
        parser.error(f"--cases {args.cases!r} matches none of: {'; '.join(CASES)}")
    run = timing.Run(args, "Label binning")
    rows = []
    for count in counts:
        for name in names:
            rows += run_case(name, count, args.device, args.quick)
    run.finish(timing.side_by_side_table(rows, [("case", "<46"), ("labels", ">7"), ("provider", "<9")]), rows)


if __name__ == "__main__":
    main()
