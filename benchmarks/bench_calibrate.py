"""calibrate: per-bucket whitening and re-colouring of the features (FDS smooth's kernel), out of
place and in place (calibrate_).

Providers: the published-style loop, plain PyTorch, the same under torch.compile, each dirfast
backend, x.clone() and (calibrate_) an in-place pass; sizes 65,536 x 512 over 97, 1,000 and
10,000 bins and dense 8 x 64 x 120 x 160 (benchmarks/cases.py).
Run: pytest benchmarks/bench_calibrate.py [--quick]
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("case,provider", cases.pytest_params("calibrate"))
def test_calibrate(benchmark, case, provider):
    cases.pytest_bench(benchmark, case, provider)


@pytest.mark.parametrize("case,provider", cases.pytest_params("calibrate_"))
def test_calibrate_in_place(benchmark, case, provider):
    cases.pytest_bench(benchmark, case, provider)
