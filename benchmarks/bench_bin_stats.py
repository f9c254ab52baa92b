"""bin_stats: per-bucket count, mean and unbiased variance of the features.

Providers: the published-style loop, plain PyTorch, the same under torch.compile, each dirfast
backend, x.clone() and a read pass (x.sum()); sizes 65,536 x 512 over 97, 1,000 and 10,000 bins
and dense 8 x 64 x 120 x 160 (benchmarks/cases.py).
Run: pytest benchmarks/bench_bin_stats.py [--quick]
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("case,provider", cases.pytest_params("bin_stats"))
def test_bin_stats(benchmark, case, provider):
    cases.pytest_bench(benchmark, case, provider)
