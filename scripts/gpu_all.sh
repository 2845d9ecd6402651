#!/usr/bin/env bash
# Every GPU benchmark of BENCHMARKS.md on one 4-GPU host, in two calls of under 10 minutes each.
# Single-GPU jobs run side by side on different cards (each has a card to itself); multi-GPU
# jobs run alone. Usage: OUT=/some/dir PHASE=1 scripts/gpu_all.sh, then PHASE=2.
#   PHASE=1: dp on 1 GPU | bench train d20 | bench decode d20 | remat; then dp on 2 GPUs | ring on 2
#   PHASE=2: dp on 4 GPUs, dp-report, ring on 4, context on 4; then context on 1 | bench vlm | bench train d12
#            | packing
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_all_out}
source scripts/gpu_env.sh

scale() {  # name, limit, GPUs, subcommand args...
  local name=$1 limit=$2 gpus=$3; shift 3
  local n=$(( $(tr -cd , <<< "$gpus" | wc -c) + 1 ))
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" \
    recipes/bench_scale.py "$@" --out "$OUT" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"
}
bench() {  # name, limit, GPU, bench.py args...
  local name=$1 limit=$2 gpu=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 recipes/bench.py "$@" --out "$OUT" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"
}
table() { grep -vE '^(\{|\[rank|[WI][0-9]{4} |.*[Ww]arning|  _warn)' "$OUT/$1.log" | tail -${2:-14}; }

if [ "${PHASE:-1}" = 1 ]; then
  scale dp_1 300 0 dp --preset d20 --batch 16 --seq 2048 --steps 6 --warmup 2 &
  bench train_d20 330 1 train --preset d20 --steps 6 --warmup 3 --profile &
  bench decode 300 2 decode --preset d20 --rows bf16 bf16-inductor int8 plain hf --profile &
  scale remat 330 3 remat --preset d20 --batch 16 --seq 2048 --policies full selective --steps 3 --warmup 2 \
    --search-seqs 32768 65536 131072 &
  wait
  scale dp_2 150 0,1 dp --preset d20 --batch 16 --seq 2048 --steps 6 --warmup 2 &
  scale ring_2 120 2,3 ring --seq 32768 &
  wait
  for t in train_d20 decode; do table $t 22; done
  for t in dp_1 dp_2 ring_2 remat packing; do table $t 10; done
else
  scale dp_4 170 0,1,2,3 dp --preset d20 --batch 16 --seq 2048 --steps 6 --warmup 2
  python3 recipes/bench_scale.py dp-report --out "$OUT" > "$OUT/dp_report.log" 2>&1
  scale ring_4 100 0,1,2,3 ring --seq 32768
  scale context_4 180 0,1,2,3 context --preset d12 --seq 32768 --steps 3 --warmup 1
  scale context_1 170 0 context --preset d12 --seq 32768 --steps 3 --warmup 1 &
  bench vlm 170 1 vlm --preset d12-vlm --profile &
  bench train_d12 170 2 train --preset d12 --rows ghostvis plain hf --steps 8 --warmup 3 &
  scale packing 200 3 packing --preset d12 &
  wait
  for t in dp_report ring_4 context_4 context_1 vlm train_d12 packing; do table $t 12; done
fi
