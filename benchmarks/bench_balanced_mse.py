"""Balanced MSE forward plus backward, as benchmarks/balanced_mse.py measures it (which also
measures peak memory and the compiled formulation): BMC on a batch of 256, BNI and GAI on
[8, 1, 240, 320] predictions with K = 100, BMC on 256 and GAI on 65,536 rows of 2 dimensions;
the published formulation, dirfast on each backend here, and a clone.
Run: pytest benchmarks/bench_balanced_mse.py
"""

import pytest
import torch

from benchmarks import balanced_mse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = balanced_mse.case_shapes(batches=balanced_mse.BMC_BATCHES[:1], md_rows=(256, 65536))


@pytest.mark.parametrize("kind, shape, name, fn", [
    pytest.param(kind, shape, name, fn, id=f"{kind}-{name}")
    for kind, shape in CASES
    for name, fn in balanced_mse.providers(DEVICE, kind, with_compiled=False, dims=balanced_mse.dims_of(shape))])
def test_balanced_mse(benchmark, kind, shape, name, fn):
    pred, target, centers, weights, gmm = balanced_mse.inputs(DEVICE, shape=shape)
    sigma = torch.tensor(1.0, device=DEVICE, requires_grad=True)

    def step():
        p = pred.detach().requires_grad_()
        fn(p, target, sigma, centers, weights, gmm).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=3 if name == "published" else 10, warmup_rounds=1)
