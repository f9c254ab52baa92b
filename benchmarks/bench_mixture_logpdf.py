"""mixture_logpdf: the log density of a Gaussian mixture at every element (Balanced MSE's GAI).

Providers: the published [N, K] formulation, plain PyTorch, the same under torch.compile, each
dirfast backend, and the exp limit; a depth batch 8 x 1 x 240 x 320 for K = 10, 100 and 1,000
(benchmarks/cases.py).
Run: pytest benchmarks/bench_mixture_logpdf.py [--quick]
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("case,provider", cases.pytest_params("mixture_logpdf"))
def test_mixture_logpdf(benchmark, case, provider):
    cases.pytest_bench(benchmark, case, provider)
