"""density: DenseWeight weights of 12,208 and 1,000,000 labels.

Providers: the denseweight package, KDEpy's FFTKDE as a user would use it, dirfast (fit and the
weights of the labels) and dirfast's fit alone (benchmarks/cases.py, benchmarks/alternatives.py).
Run: pytest benchmarks/bench_density.py [--quick]
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("case,provider", cases.pytest_params("density"))
def test_density(benchmark, case, provider):
    cases.pytest_bench(benchmark, case, provider)
