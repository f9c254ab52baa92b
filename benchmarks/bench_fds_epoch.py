"""A full FDS epoch: update_last_epoch_stats, smooth of the features, update_running_stats.

Providers: the published-style loop, plain PyTorch, each dirfast backend, and x.clone();
sizes 65,536 x 512 and dense 8 x 64 x 120 x 160 (benchmarks/cases.py).
Run: pytest benchmarks/bench_fds_epoch.py [--quick]
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("case,provider", cases.pytest_params("fds_epoch"))
def test_fds_epoch(benchmark, case, provider):
    cases.pytest_bench(benchmark, case, provider)
