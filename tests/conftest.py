"""pytest configuration shared by every test module.

Order matters here: the Triton interpreter switch must be set before anything imports triton,
so this module sets it first, and only asks torch whether a GPU is there (no CUDA work).
"""

import os
import sys

# Under pytest-xdist (`-n auto`, the README's test command) each worker, and each process it starts,
# gets its share of the cores as torch threads: two workers of 2 threads each on 2 cores ran the
# compute-heavy tests up to 3x slower. The thread-count tests set their own counts.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(_share)

if not torch.cuda.is_available():
    # Lets the Triton backend run (slowly, on small sizes) on a machine without a GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dirfast  # noqa: E402

# Every test runs the C++ kernels on the threads it asks for: with the default "free", a worker
# would see the other worker as load and run every multi-threaded path on one thread
# (tests/test_cpu_threads.py checks "free" itself).
dirfast.set_cpu_threads("all")

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
for _path in (_ROOT, _TESTS):  # `benchmarks` (and `tests`) from the root; `testing`, `oracle` here
    if _path not in sys.path:
        sys.path.insert(0, _path)

import pytest  # noqa: E402


def pytest_configure(config):
    """The tests hold no pytest-benchmark case (those are in benchmarks/, run by
    `pytest benchmarks`): its plugin is told so, rather than warn, in every xdist worker, that it
    turns benchmarks off."""
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts and ends on the default backend, whatever it selected."""
    import dirfast

    dirfast.set_backend("auto")
    yield
    dirfast.set_backend("auto")
