#!/usr/bin/env bash
# The GPU pass for ghostvis.ops in one go: the ops/kernel tests (gpu-marked and the
# hypothesis tests on cuda, real Triton compiler) then the kernel benchmark.
# Usage: OUT=/some/dir scripts/gpu_ops.sh     (logs and kernels.json land in $OUT)
# Wheels for a bare machine (pytest, hypothesis, tyro) are installed from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

run_tests() {  # name, timeout, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short "$@" \
    --junitxml="$OUT/$name.xml" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/$name.log" | tail -25
  return $rc
}
# CPU parameters are left to CI: triton 3.6's interpreter (this machine) cannot run kernels with
# runtime loops ("only 0-dimensional arrays can be converted"); CI's triton 3.9 interpreter can.
run_tests kernels "${KERNEL_TEST_TIMEOUT:-150}" tests/test_kernels.py -k "not cpu"; k_rc=$?
run_tests attention "${OPS_TEST_TIMEOUT:-150}" tests/test_ops.py; o_rc=$?

timeout "${BENCH_TIMEOUT:-270}" python3 recipes/bench.py kernels --out "$OUT" > "$OUT/bench.log" 2>&1
bench_rc=$?
grep -v "^DEBUG" "$OUT/bench.log" | tail -30
echo "== summary: kernel tests rc=$k_rc ops tests rc=$o_rc bench rc=$bench_rc"
exit $(( k_rc != 0 || o_rc != 0 || bench_rc != 0 ))
