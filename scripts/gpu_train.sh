#!/usr/bin/env bash
# Training throughput on one GPU: the GPU tests of the training kernels, then `bench train` for each
# preset in $PRESETS with the rows in $ROWS. On an H100, d20 (three rows, profiled) took 3 minutes
# and d12 1.5 minutes; the default tests take several minutes more, so split the work over calls
# of under 10 minutes with SKIP=tests or PRESETS=d20.
# Usage: OUT=/some/dir [PRESETS="d20 d12"] [ROWS="ghostvis plain hf"] [PROFILE=1]
#        [SKIP=tests] [TESTS="pytest args"] scripts/gpu_train.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_train_out}
PRESETS=${PRESETS:-d20 d12}
ROWS=${ROWS:-ghostvis plain hf}
SKIP=${SKIP:-}
source scripts/gpu_env.sh
echo "start $(date +%T)"
if [[ " $SKIP " != *" tests "* ]]; then
  # shellcheck disable=SC2086
  timeout "${TESTS_LIMIT:-400}" python3 -m pytest -q -x -m gpu -p no:cacheprovider ${TESTS:-tests/test_kernels.py tests/test_train.py} \
    > "$OUT/tests.log" 2>&1
  echo "== tests rc=$? $(date +%T)"
fi
for preset in $PRESETS; do
  steps=6; [ "$preset" = d12 ] && steps=8
  # shellcheck disable=SC2086
  timeout "${TRAIN_LIMIT:-330}" python3 recipes/bench.py train --preset "$preset" --rows $ROWS --steps $steps --warmup 3 \
    ${PROFILE:+--profile} --out "$OUT/$preset" > "$OUT/train_$preset.log" 2>&1
  echo "== train $preset rc=$? $(date +%T)"
done
[ -f "$OUT/tests.log" ] && tail -4 "$OUT/tests.log"
for preset in $PRESETS; do
  grep -vE '^(\{|[WI][0-9]{4} |.*[Ww]arning|  _warn)' "$OUT/train_$preset.log" | tail -14
done
