#!/usr/bin/env bash
# One command on a machine with one NVIDIA GPU and no network (torch, triton, nvcc, pytest
# already installed): build dirfast in place with its CUDA kernels, run the GPU tests, run the GPU
# benchmarks (CUDA C++ and Triton side by side), and write everything under $OUT (default
# ./gpu-results), a short table last. About 6 minutes on one H100, measured before two steps were
# added: FDS.accumulate (at most 90 s) and Balanced MSE's compiled rows and 2-dimensional cases
# (at most 3 minutes more).
#   bash benchmarks/gpu_check.sh
# Knobs: SKIP_BUILD=1 (use the modules in dirfast/ as they are; the build runs anyway when
# dirfast._C_cuda does not load); JOBS (pytest-xdist workers, default 8, when xdist is there); TORCH_CUDA_ARCH_LIST (default: this GPU's); SHARED_TESTS (files) and
# SHARED_K (pytest -k, default "triton or (cuda and not cpu)") for the shared tests; *_TIMEOUT (seconds) for BUILD, CUDA_TESTS, BENCH,
# SHARED_TESTS, BMSE, PAIRWISE, BINNING, ACCUMULATE.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
status=0
stamp() { echo "== $1 ($(date +%T), ${SECONDS}s)"; }

stamp environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
  $PY -c "import setuptools; print('setuptools', setuptools.__version__, '(the build needs >= 77)')"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
} 2>&1 | tee "$OUT/environment.txt"

stamp build
if [ -n "${SKIP_BUILD:-}" ] && $PY -c "import torch, dirfast._C_cuda" 2>"$OUT/build.log"; then
  echo "skipped (SKIP_BUILD, and the carried dirfast._C_cuda loads)"
else
  # Only this GPU's architecture: a third of the nvcc time of the default sm_80 + sm_90 + PTX.
  arch=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
  if ! TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
      timeout ${BUILD_TIMEOUT:-240} $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
    echo "BUILD FAILED (tail of $OUT/build.log):"; tail -n 30 "$OUT/build.log"; status=1
  fi
fi
$PY -c "import dirfast, json; print(json.dumps(dirfast.backends(), indent=1))" 2>&1 | tee -a "$OUT/environment.txt"

# Tests: in parallel where pytest-xdist is installed (the Triton compiles are CPU-bound), each test
# stopped after a minute where pytest-timeout is.
PYTEST="$PY -m pytest -q -p no:cacheprovider"
$PY -c "import xdist" 2>/dev/null && PYTEST="$PYTEST -n ${JOBS:-8}"
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST="$PYTEST --timeout 60"

stamp "CUDA backend tests"
# The op contracts on the GPU: every case of the op tests that names cuda (the CUDA C++ kernels,
# "auto" on the GPU, the CUDA-only paths, the CUDA graph and deterministic checks).
timeout ${CUDA_TESTS_TIMEOUT:-210} $PYTEST -k "cuda" \
  tests/test_bin_stats.py tests/test_accumulate_bin_stats.py tests/test_smooth_bins.py tests/test_calibrate.py tests/test_mixture_logpdf.py \
  tests/test_backends.py >"$OUT/tests-cuda.log" 2>&1
cuda_rc=$?
tail -n 15 "$OUT/tests-cuda.log"
[ $cuda_rc -eq 0 ] || status=1

stamp "shared tests on the GPU"
# The Triton cases of the op tests and the GPU cases of the API tests (the CPU ones ran in CI).
timeout ${SHARED_TESTS_TIMEOUT:-180} $PYTEST -k "${SHARED_K:-triton or (cuda and not cpu)}" \
  ${SHARED_TESTS:-tests/test_bin_stats.py tests/test_accumulate_bin_stats.py tests/test_smooth_bins.py tests/test_calibrate.py tests/test_mixture_logpdf.py \
  tests/test_rnc_loss.py tests/test_conr_loss.py tests/test_ranksim_loss.py tests/test_pairwise.py \
  tests/test_fds.py tests/test_lds.py tests/test_balanced_mse.py} >"$OUT/tests-shared.log" 2>&1
shared_rc=$?
tail -n 15 "$OUT/tests-shared.log"
[ $shared_rc -eq 0 ] || status=1

stamp "GPU goals"
timeout ${BENCH_TIMEOUT:-120} $PY -m benchmarks.gpu --json "$OUT" --profile "$OUT/kernel-profile.txt" 2>&1 | tee "$OUT/gpu-goals.txt" || status=1

stamp "Balanced MSE (BMC on 256 and 4,096, BNI and GAI on [8, 1, 240, 320] K=100, BMC and GAI in 2 dimensions) against the published formulation and compiled"
# Quick: the six compiles of the published formulation take most of this step.
timeout ${BMSE_TIMEOUT:-240} $PY -m benchmarks.balanced_mse --device cuda --quick --json "$OUT/balanced-mse.json" 2>&1 | tee "$OUT/balanced-mse.txt" || status=1

stamp "pairwise regularisers (RnC, ConR, RankSim) against the published formulations and compiled"
# Without --sweep (n up to 4096): on 2026-12-04 this step ran out of its 90 s at the compiled rows, before the sweep.
timeout ${PAIRWISE_TIMEOUT:-150} $PY -m benchmarks.pairwise --device cuda --quick --json "$OUT/pairwise.json" 2>&1 | tee "$OUT/pairwise.txt" || status=1

stamp "label binning of a depth batch (614,400 labels) beside torch.bucketize, compiled, and numpy"
# On a GPU dirfast searches the edges (its arithmetic guess is measured on CPU only): this says which wins there.
timeout ${BINNING_TIMEOUT:-90} $PY -m benchmarks.binning --device cuda --quick --labels 614400 --json "$OUT/binning.json" 2>&1 | tee "$OUT/binning.txt" || status=1

stamp "FDS.accumulate on a 256 x 512 batch against 10,000 buckets beside the PyTorch a user writes, compiled"
# On a GPU the op is its composite (bin_stats on the GPU, the merge in torch ops): this says whether that keeps up.
timeout ${ACCUMULATE_TIMEOUT:-90} $PY -m benchmarks.fds_accumulate --device cuda --quick --buckets 10000 --json "$OUT/fds-accumulate.json" 2>&1 | tee "$OUT/fds-accumulate.txt" || status=1

stamp "summary (cuda tests rc=$cuda_rc, shared tests rc=$shared_rc)"
grep -E "passed|failed" "$OUT/tests-cuda.log" | tail -n 1
grep -E "passed|failed" "$OUT/tests-shared.log" | tail -n 1
sed -n "/^case /,\$p" "$OUT/gpu-goals.txt"
sed -n "/^case /,\$p" "$OUT/balanced-mse.txt"
sed -n "/^loss /,\$p" "$OUT/pairwise.txt"
sed -n "/^case /,\$p" "$OUT/binning.txt"
sed -n "/^size /,\$p" "$OUT/fds-accumulate.txt"
exit $status
