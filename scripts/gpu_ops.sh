#!/usr/bin/env bash
# The GPU pass for ghostvis.ops in one go: the ops/kernel tests (gpu-marked and the
# hypothesis tests on cuda, real Triton compiler) then the kernel benchmark.
# Usage: OUT=/some/dir scripts/gpu_ops.sh     (logs and kernels.json land in $OUT)
# Optional wheels for a bare machine (pytest, hypothesis, tyro) are installed from .whl/ if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"

HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q tests/test_kernels.py tests/test_ops.py -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" --durations=15 2>&1 | tee "$OUT/tests.log"
test_rc=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-300}" python3 recipes/bench.py kernels --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== summary: tests rc=$test_rc bench rc=$bench_rc"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -2
exit $(( test_rc != 0 || bench_rc != 0 ))
