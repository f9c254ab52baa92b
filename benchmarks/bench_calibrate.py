"""calibrate: per-bucket whitening and re-colouring of the features (FDS smooth's kernel).

Providers: the published-style loop, plain PyTorch, each dirfast backend, and x.clone();
sizes 65,536 x 512 and dense 8 x 64 x 120 x 160 (benchmarks/cases.py).
Run: pytest benchmarks/bench_calibrate.py [--quick]
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("case,provider", cases.pytest_params("calibrate"))
def test_calibrate(benchmark, case, provider):
    cases.pytest_bench(benchmark, case, provider)
