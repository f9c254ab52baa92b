"""dirfast's benchmarks (``python -m benchmarks.run``, ``python -m benchmarks.gpu``).

The published-style providers are the tests' oracle, ``tests/published.py``, imported from there
(references are imported from the tests, not rewritten): the tests folder goes on the path here.
"""

import os
import sys

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
