#!/usr/bin/env bash
# Decoding on one GPU, in one call of under 10 minutes: the GPU tests of the decode kernels and of
# generation, the one-row matmul probe (scripts/gemv_probe.py) and `bench decode` for d20.
# Usage: OUT=/some/dir [ROWS="bf16 bf16-unfused int8"] [SKIP="tests gemv prefill"] [TESTS=files] scripts/gpu_decode.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_decode_out}
ROWS=${ROWS:-bf16 bf16-unfused int8}
SKIP=${SKIP:-}
source scripts/gpu_env.sh
echo "start $(date +%T)"
if [[ " $SKIP " != *" tests "* ]]; then
  # shellcheck disable=SC2086
  timeout 170 python3 -m pytest -q -x -m gpu -p no:cacheprovider ${TESTS:-tests/test_decode_ops.py tests/test_generate.py} \
    > "$OUT/tests.log" 2>&1
  echo "== tests rc=$? $(date +%T)"
fi
if [[ " $SKIP " != *" gemv "* ]]; then
  timeout 150 python3 scripts/gemv_probe.py "$OUT/gemv.json" > "$OUT/gemv.log" 2>&1
  echo "== gemv rc=$? $(date +%T)"
fi
if [[ " $SKIP " != *" prefill "* ]]; then
  timeout 150 python3 scripts/prefill_probe.py > "$OUT/prefill.log" 2>&1
  echo "== prefill rc=$? $(date +%T)"
fi
# shellcheck disable=SC2086
timeout "${DECODE_LIMIT:-260}" python3 recipes/bench.py decode --preset d20 --rows $ROWS --profile --out "$OUT" \
  > "$OUT/decode.log" 2>&1
echo "== decode rc=$? $(date +%T)"
[ -f "$OUT/tests.log" ] && tail -4 "$OUT/tests.log"
[ -f "$OUT/gemv.log" ] && grep -A12 "^one-row" "$OUT/gemv.log"
[ -f "$OUT/prefill.log" ] && grep -E "^(decode kernels|unfused):" "$OUT/prefill.log"
grep -vE '^(\{|[WI][0-9]{4} |.*[Ww]arning|  _warn)' "$OUT/decode.log" | tail -16
