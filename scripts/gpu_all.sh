#!/usr/bin/env bash
# Every GPU benchmark of BENCHMARKS.md on one 4-GPU host, in four calls of under 10 minutes each.
# Single-GPU jobs run side by side on different cards (each has a card to itself); multi-GPU jobs run
# alone. Usage: OUT=/some/dir PHASE=1 scripts/gpu_all.sh, then PHASE=2, 3 and 4.
#   PHASE=1: dp on 1 GPU, then ring on 2 | context (d12) on 1 GPU at 32k and at $CTX_LONG | bench vlm;
#            then ring on 4
#   PHASE=2: dp on 4 GPUs (dp on 1 again first unless PHASE=1's result is still on this machine),
#            dp-report, context on 4 GPUs at 32k and at $CTX_LONG
#   PHASE=3: packing (d12) | bench train d12 | bench train d20 (with profile)
#   PHASE=4: remat (d20) | GPU tests | bench decode d20
# Results also go to out/gpu_keep/ (ignored by git), which lives as long as the machine stays warm.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_all_out}
KEEP=out/gpu_keep
CTX_LONG=${CTX_LONG:-262144}
mkdir -p "$KEEP"
source scripts/gpu_env.sh

scale() {  # name, limit, GPUs, subcommand args...
  local name=$1 limit=$2 gpus=$3; shift 3
  local n=$(( $(tr -cd , <<< "$gpus" | wc -c) + 1 ))
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" \
    recipes/bench_scale.py "$@" --out "$OUT" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $(date +%T)"
}
bench() {  # name, limit, GPU, bench.py args...
  local name=$1 limit=$2 gpu=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 recipes/bench.py "$@" --out "$OUT" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $(date +%T)"
}
table() { [ -f "$OUT/$1.log" ] && grep -vE '^(\{|\[rank|[WI][0-9]{4} |.*[Ww]arning|  _warn)' "$OUT/$1.log" | tail -${2:-14}; }
CTX="context --preset d12 --steps 3 --warmup 1"
DP="dp --preset d20 --batch 16 --seq 2048 --steps 6 --warmup 2"
echo "start $(date +%T)"

case "${PHASE:-1}" in
1)
  scale dp_1 200 0 $DP & p0=$!
  { scale context_1_32k 150 1 $CTX --seq 32768
    scale context_1_long 150 1 $CTX --seq "$CTX_LONG" --compile False; } & p1=$!
  wait $p0 $p1
  scale ring_2 80 0,1 ring --seq 32768 &
  bench vlm 170 2 vlm --preset d12-vlm --profile &
  wait
  scale ring_4 80 0,1,2,3 ring --seq 32768
  for t in dp_1 context_1_32k context_1_long ring_2 ring_4; do table $t 10; done
  table vlm 20
  ;;
2)
  if cmp -s "$KEEP/device.txt" "$OUT/device.txt" && [ -f "$KEEP/dp_1.json" ]; then
    cp "$KEEP/dp_1.json" "$OUT/" && echo "dp_1.json from PHASE=1 on this machine"
  else
    scale dp_1 200 0 $DP
  fi
  scale dp_4 170 0,1,2,3 $DP
  python3 recipes/bench_scale.py dp-report --out "$OUT" > "$OUT/dp_report.log" 2>&1
  scale context_1_long 100 0 $CTX --seq "$CTX_LONG" --compile False
  scale context_4_32k 140 0,1,2,3 $CTX --seq 32768
  scale context_4_long 140 0,1,2,3 $CTX --seq "$CTX_LONG" --compile False
  for t in dp_report context_1_long context_4_32k context_4_long; do table $t 10; done
  ;;
3)
  # one-GPU jobs side by side, one card each
  scale packing 300 1 packing --preset d12 &
  bench train_d12 200 2 train --preset d12 --rows ghostvis plain hf --steps 8 --warmup 3 &
  bench train_d20 400 3 train --preset d20 --rows ghostvis plain hf --steps 6 --warmup 3 --profile &
  wait
  for t in packing train_d12; do table $t 12; done
  table train_d20 24
  ;;
4)
  # remat | GPU tests | decode, one card each
  scale remat 400 0 remat --preset d20 --batch 16 --seq 2048 --policies full selective --steps 3 --warmup 2 \
    --search-seqs 32768 65536 131072 262144 &
  { CUDA_VISIBLE_DEVICES=1 HYPOTHESIS_PROFILE=ci timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_train.py tests/test_ops.py > "$OUT/gpu_tests.log" 2>&1; echo "== gpu_tests rc=$? $(date +%T)"; } &
  bench decode 300 2 decode --preset d20 --rows bf16 int8 plain hf --profile &
  wait
  table remat 12; tail -3 "$OUT/gpu_tests.log"; table decode 24
  ;;
esac
echo "end $(date +%T)"
# the device hands back only a few files per call: one archive of everything (and a copy kept on the machine)
cp -r "$OUT"/. "$KEEP"/ 2>/dev/null
tar czf /tmp/gpu_all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu_all.tgz "$OUT/all.tgz"
