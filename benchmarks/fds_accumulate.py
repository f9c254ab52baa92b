"""FDS.accumulate on a training batch: ``python -m benchmarks.fds_accumulate [--device cpu|cuda]
[--threads N] [--quick] [--size NxD] [--buckets 97,1000,10000] [--json PATH]``.

``FDS.accumulate`` runs every training step (the streaming replacement of the published extra pass
over the training set), so its cost is per batch, and with many buckets (a ``GridBinning`` of two
targets of 100 bins has 10,000) most buckets meet no row of a batch. For a float32 batch (default
256 x 512, labels uniform over the buckets) against 97, 1,000 and 10,000 buckets, side by side
(:mod:`benchmarks.timing`): ``FDS(D, bucket_num=K).accumulate`` on each dirfast backend that runs
here; the same step as a user writes it in PyTorch (:func:`benchmarks.vectorised.torch_fds_accumulate`:
``index_add_`` sums over all K buckets and Chan's merge), eager and under ``torch.compile``, each
checked against dirfast's tables before it is timed; ``bin_stats`` of the batch over all K buckets
(the per-bucket statistics a whole-table step starts from, before any merge); and ``x.clone()`` of
the batch (one read and one write of its bytes). Ratios are to the clone and to the fastest
alternative.
"""

from __future__ import annotations

import argparse

import torch

import dirfast

from . import cases, timing
from .vectorised import torch_fds_accumulate

BUCKETS = (97, 1000, 10000)
ALTERNATIVES = ("torch", "compiled")


def inputs(size: str, num_buckets: int, device: str, seed: int = cases.SEED):
    """A float32 batch [N, D] and labels uniform over the buckets [0, num_buckets)."""
    (n, d), _ = cases.parse_size(size)
    g = torch.Generator().manual_seed(seed + num_buckets)
    x = torch.randn(n, d, generator=g)
    labels = torch.randint(0, num_buckets, (n,), generator=g).float()
    return x.to(device), labels.to(device)


def _running(num_buckets: int, dim: int, device: str):
    """Fresh running tables (count, mean, M2), as an FDS starts them."""
    return (torch.zeros(num_buckets, dtype=torch.float64, device=device), torch.zeros(num_buckets, dim, device=device),
            torch.zeros(num_buckets, dim, device=device))


def _checked(step, x, labels, num_buckets: int, device: str):
    """``step``'s tables after one batch, against FDS.accumulate's (float32 rounding apart)."""
    fds = dirfast.FDS(x.shape[1], bucket_num=num_buckets, bucket_start=0).to(device)
    fds.accumulate(x, labels)
    tables = _running(num_buckets, x.shape[1], device)
    step(*tables, x, labels)
    for got, expected in zip(tables, (fds.accumulated_count, fds.accumulated_mean, fds.accumulated_m2)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def providers(x, labels, num_buckets: int, device: str) -> dict:
    rows = {}
    for backend, info in dirfast.backends().items():
        if not info["available"] or device not in cases.BACKEND_DEVICES.get(backend, (device,)):
            continue
        with dirfast.use_backend(backend):
            fds = dirfast.FDS(x.shape[1], bucket_num=num_buckets, bucket_start=0).to(device)

        def step(fds=fds, backend=backend):
            with dirfast.use_backend(backend):
                fds.accumulate(x, labels)
        rows[f"accumulate {backend}"] = step
    compiled = torch.compile(torch_fds_accumulate, dynamic=False)
    for name, step in (("torch", torch_fds_accumulate), ("compiled", compiled)):
        _checked(step, x, labels, num_buckets, device)
        rows[name] = lambda step=step, tables=_running(num_buckets, x.shape[1], device): step(*tables, x, labels)
    buckets = labels.long()
    rows["bin_stats, all buckets"] = lambda: dirfast.ops.bin_stats(x, buckets, num_buckets)
    rows["clone"] = lambda: x.clone()
    return rows


def run_case(size: str, num_buckets: int, device: str, quick: bool) -> list:
    x, labels = inputs(size, num_buckets, device)
    steps = providers(x, labels, num_buckets, device)
    print(f"  {size} K={num_buckets}: timing {', '.join(steps)} side by side ...", flush=True)
    return timing.side_by_side(steps, device, quick, f"K={num_buckets}", ALTERNATIVES, size=size, buckets=num_buckets)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fds_accumulate", description=__doc__.split("\n\n")[0])
    timing.add_command_arguments(parser)
    parser.add_argument("--size", default="256x512", help="the batch, NxD (default 256x512)")
    parser.add_argument("--buckets", default=",".join(map(str, BUCKETS)),
                        help="bucket counts, comma-separated (default 97,1000,10000)")
    args = parser.parse_args(argv)
    try:  # a bad size or count fails before anything runs
        cases.parse_size(args.size)
        buckets = cases.parse_counts(args.buckets, "--buckets")
    except ValueError as exc:
        parser.error(str(exc))
    run = timing.Run(args, "FDS.accumulate on a training batch")
    rows = []
    for k in buckets:
        rows += run_case(args.size, k, args.device, args.quick)
    run.finish(timing.side_by_side_table(rows, [("size", "<10"), ("buckets", ">7"), ("provider", "<24")]), rows)


if __name__ == "__main__":
    main()
