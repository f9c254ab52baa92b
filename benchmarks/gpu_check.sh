#!/usr/bin/env bash
# One command on a machine with one NVIDIA GPU and no network (torch, triton, nvcc, pytest
# already installed): build dirfast in place, run the test suite on the GPU, run the GPU
# benchmarks, and write the results under $OUT (default ./gpu-results), a short table last.
#   bash benchmarks/gpu_check.sh            # about 5 minutes on one H100
# Knobs: SKIP_BUILD=1, TESTS (paths), TESTS_K (pytest -k), TEST_TIMEOUT, BENCH_TIMEOUT (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
status=0

echo "== environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
} 2>&1 | tee "$OUT/environment.txt"

echo "== build"
if [ -n "${SKIP_BUILD:-}" ]; then echo "skipped (SKIP_BUILD)"
elif ! MAX_JOBS=${MAX_JOBS:-16} DIRFAST_REQUIRE_EXT=1 timeout 300 $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (tail of $OUT/build.log):"; tail -n 30 "$OUT/build.log"; status=1
fi
$PY -c "import dirfast, json; print(json.dumps(dirfast.backends(), indent=1))" 2>&1 | tee -a "$OUT/environment.txt"

echo "== tests on the GPU"
# The GPU cases only (the CPU ones ran in CI): every test whose id names cuda or triton.
timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -k "${TESTS_K:-cuda or triton}" ${TESTS:-tests} >"$OUT/tests.log" 2>&1
test_rc=$?
tail -n 25 "$OUT/tests.log"
[ $test_rc -eq 0 ] || status=1

echo "== benchmarks"
timeout ${BENCH_TIMEOUT:-150} $PY -m benchmarks.gpu --json "$OUT" 2>&1 | tee "$OUT/gpu-goals.txt" || status=1
DIRFAST_BENCH_QUICK=1 timeout ${BENCH_TIMEOUT:-150} $PY -m benchmarks.run --quick --device cuda --json "$OUT" >"$OUT/bench.txt" 2>&1 || status=1

echo "== summary (tests rc=$test_rc)"
grep -E "passed|failed" "$OUT/tests.log" | tail -n 1
tail -n 30 "$OUT/bench.txt"
cat "$OUT/gpu-goals.txt" | tail -n 14
exit $status
