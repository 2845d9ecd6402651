#!/usr/bin/env bash
# The multi-GPU scaling pass in one go (recipes/bench_scale.py) on a 4-GPU host:
# data-parallel throughput on 1, 2 and 4 GPUs and its scaling efficiency, ring attention
# correctness and speed on 2 and 4 GPUs, long-context (32k) training with context parallelism
# on 4 GPUs and without it on 1; SCALE_SINGLE=1 adds remat and packing (one GPU each), and
# SCALE_SINGLE=only runs just those two (so each part fits one 10-minute command).
# Usage: OUT=/some/dir scripts/gpu_scale.sh      (logs and JSON land in $OUT; ~7-8 min on 4 H100s)
# The runs share a budget of SCALE_BUDGET_S seconds (default 570): each timeout is cut to what is left.
# Wheels for a bare machine (tyro and its dependencies) are installed from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_scale_out}
source scripts/gpu_env.sh

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
DP_ARGS=${DP_ARGS:---preset d20 --batch 16 --seq 2048 --steps 6 --warmup 2}
RING_ARGS=${RING_ARGS:---seq 32768}
CONTEXT_ARGS=${CONTEXT_ARGS:---preset d12 --seq 32768 --steps 3 --warmup 1}
failed=0
DEADLINE=$(( SECONDS + ${SCALE_BUDGET_S:-570} ))  # every run's timeout is cut to what is left of this

bench() {  # name, timeout (s), GPUs (CUDA_VISIBLE_DEVICES), subcommand and its args...
  local name=$1 limit=$2 gpus=$3; shift 3
  local n=$(( $(tr -cd , <<< "$gpus" | wc -c) + 1 )) t0=$SECONDS
  if [ "$n" -gt "$NGPU" ]; then echo "== $name: skipped (needs $n GPUs, $NGPU here)"; return; fi
  local left=$(( DEADLINE - SECONDS ))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (SCALE_BUDGET_S spent)"; failed=1; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" \
    recipes/bench_scale.py "$@" --out "$OUT" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || { failed=1; grep -E "Error|error" "$OUT/$name.log" | grep -v "^W" | tail -3; }
  # the table the subcommand printed at the end (rank 0), without log lines
  sed -n '/^\(dp\|ring attention\|context\|remat\|packing\): /,$p' "$OUT/$name.log" \
    | grep -vE "^(\[rank|[WI][0-9]{4} |ghostvis\.|  warnings|\{)" | head -16
}

if [ "${SCALE_SINGLE:-0}" != only ]; then
  bench dp_1 240 0 dp $DP_ARGS
  bench dp_2 150 0,1 dp $DP_ARGS
  bench dp_4 150 0,1,2,3 dp $DP_ARGS
  python3 recipes/bench_scale.py dp-report --out "$OUT" > "$OUT/dp_report.log" 2>&1 || failed=1
  cat "$OUT/dp_report.log"
  bench ring_2 120 0,1 ring $RING_ARGS
  bench ring_4 120 0,1,2,3 ring $RING_ARGS
  bench context_4 240 0,1,2,3 context $CONTEXT_ARGS
  bench context_1 180 0 context $CONTEXT_ARGS
fi
if [ "${SCALE_SINGLE:-0}" != 0 ]; then  # one GPU each, side by side on GPUs 0 and 1 (~6 min)
  bench remat 540 0 remat ${REMAT_ARGS:---preset d20 --batch 16 --seq 2048 --policies full --steps 3 --warmup 2} \
    > "$OUT/remat.summary" &
  bench packing 540 "$(( NGPU > 1 ? 1 : 0 ))" packing ${PACKING_ARGS:---preset d12} > "$OUT/packing.summary" &
  wait
  cat "$OUT/remat.summary" "$OUT/packing.summary"
  grep -q "rc=0" "$OUT/remat.summary" && grep -q "rc=0" "$OUT/packing.summary" || failed=1
fi

echo "== summary ($OUT)"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
def f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)
rep = load("dp_report.json")
for r in (rep or {}).get("rows", []):
    print(f"dp {r['world']} GPU: {f(r['tokens_per_s_per_gpu'], '.0f')} tok/s/GPU, {f(r['tokens_per_s'], '.0f')} tok/s, "
          f"step {f(r['step_s'], '.3f')} s, peak {f(r['peak_gib'])} GiB, efficiency {100 * r['efficiency']:.1f}%")
for n in (2, 4):
    r = load(f"ring_{n}.json")
    if r:
        print(f"ring {n} GPU: T={r['seq']} max rel err {r['max_rel_err']:.2e} ({'ok' if r['ok'] else 'FAIL'} "
              f"<= {r['tolerance']:.0e}), fwd+bwd ring {r['ring_fwd_bwd_ms']:.1f} ms vs single "
              f"{r['single_fwd_bwd_ms']:.1f} ms")
for n in (4, 1):
    r = load(f"context_{n}.json")
    if r:
        if r.get("error"):
            print(f"context {n} GPU: {r['preset']} T={r['seq']}: {r['error']}")
        else:
            print(f"context {n} GPU: {r['preset']} T={r['seq']}: {r['tokens_per_s']:.0f} tok/s, step {r['step_s']:.2f} s, "
                  f"peak {f(r['peak_gib'])} GiB/GPU, losses finite: {r['losses_finite']}")
r = load("remat.json")
if r:
    base = r["rows"][0]
    for row in r["rows"][1:]:
        if row.get("memory_cut"):
            print(f"remat {row['remat']}: peak {f(base['peak_gib'])} -> {f(row['peak_gib'])} GiB "
                  f"(cut {row['memory_cut']:.1f}x) at {100 * row['time_overhead']:+.0f}% step time")
    for k, v in r["longest"].items():
        print(f"longest context, batch 1, remat {k}: {v['longest_seq']} (tried up to {r['search_max_tried']})")
r = load("packing.json")
if r:
    print(f"packing: packed/padded useful tok/s {r['speedup']:.2f}x ({r['packed']['useful_tokens_per_s']:.0f} vs "
          f"{r['padded']['useful_tokens_per_s']:.0f}; pad {100 * r['padded']['pad_fraction']:.0f}% vs "
          f"{100 * r['packed']['pad_fraction']:.0f}%)")
EOF
exit $failed
