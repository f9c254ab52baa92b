"""dirfast's benchmarks: ``python -m benchmarks.run``, ``benchmarks.balanced_mse``,
``benchmarks.gpu``, ``benchmarks.density_table`` (all timed by :mod:`benchmarks.timing`) and the
pytest-benchmark suites ``benchmarks/bench_*.py``.

The published code they compare with is transcribed once, in :mod:`benchmarks.published` and
:mod:`benchmarks.published_balanced_mse`; the tests import it from here (imports point one way:
tests -> benchmarks -> dirfast).
"""
