#!/usr/bin/env bash
# The GPU pass for ghostvis.ops in one go: the ops/kernel tests (gpu-marked and the
# hypothesis tests on cuda, real Triton compiler) then the kernel benchmark.
# Usage: OUT=/some/dir scripts/gpu_ops.sh     (logs and kernels.json land in $OUT)
# Wheels for a bare machine (pytest, hypothesis, tyro) are installed from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
source scripts/gpu_env.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}

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
