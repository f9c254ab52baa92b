"""Balanced MSE's BNI and GAI on [8, 1, 240, 320] predictions with K = 100, forward plus backward:
the published formulation, dirfast on each backend here, and a clone (benchmarks/balanced_mse.py,
which also measures peak memory).
Run: pytest benchmarks/bench_balanced_mse.py
"""

import pytest
import torch

from benchmarks import balanced_mse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name, kind, fn", [pytest.param(*p, id=f"{p[1]}-{p[0]}") for p in balanced_mse.providers(DEVICE)])
def test_balanced_mse(benchmark, name, kind, fn):
    pred, target, centers, weights, gmm = balanced_mse.inputs(DEVICE)
    sigma = torch.tensor(1.0, device=DEVICE, requires_grad=True)

    def step():
        p = pred.detach().requires_grad_()
        fn(p, target, sigma, centers, weights, gmm).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=3 if name == "published" else 10, warmup_rounds=1)
