"""pytest options and hooks of the benchmark suites.

    pytest benchmarks/ [--quick] [--bench-device cpu|cuda] [--bench-threads N]

``--quick`` (or DIRFAST_BENCH_QUICK=1) shrinks the repetitions; the other two set
DIRFAST_BENCH_DEVICE and DIRFAST_BENCH_THREADS.  Cases, inputs and providers are
:mod:`benchmarks.cases`'; the timer is pytest-benchmark's, for the rounds of
:mod:`benchmarks.timing`'s rules.  pytest-benchmark prints one table per group (op, size,
device); a last table gives the ratios to x.clone(), to the op's yardstick, to the published-style
loop and to the strongest alternative, as ``python -m benchmarks.run`` does, with the load average.
"""

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("dirfast benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="few repetitions (sets DIRFAST_BENCH_QUICK=1)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (sets DIRFAST_BENCH_DEVICE)")
    group.addoption("--bench-threads", default=None, help="torch threads (sets DIRFAST_BENCH_THREADS)")


def pytest_configure(config):
    if config.getoption("--quick"):
        os.environ["DIRFAST_BENCH_QUICK"] = "1"
    if config.getoption("--bench-device"):
        os.environ["DIRFAST_BENCH_DEVICE"] = config.getoption("--bench-device")
    if config.getoption("--bench-threads"):
        os.environ["DIRFAST_BENCH_THREADS"] = str(config.getoption("--bench-threads"))
    from benchmarks import cases

    cases.apply_thread_setting()


def _targeted(config):
    """True when the command line names this folder or something in it."""
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py (not matched by pytest's default test_*.py pattern) when the command
    line names the benchmarks folder; files named explicitly are collected by pytest itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and file_path.parent == HERE and not parent.session.isinitpath(file_path)
            and _targeted(parent.config)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device():
    from benchmarks import cases

    return "cuda" if "cuda" in cases.devices() else "cpu"


def pytest_benchmark_update_machine_info(config, machine_info):
    from benchmarks import timing

    machine_info["dirfast"] = timing.machine_info(_device())


def pytest_terminal_summary(terminalreporter):
    from benchmarks import cases, timing
    from benchmarks.run import format_table

    if not cases.RESULTS:
        return
    rows = cases.add_ratios([dict(r) for r in cases.RESULTS])
    terminalreporter.write_sep("-", "dirfast: median ms and ratios (as benchmarks.run)")
    terminalreporter.write_line(format_table(rows))
    terminalreporter.write_line(timing.load_report(_device(), running=True)[0])
