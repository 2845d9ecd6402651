"""Times one-row matmuls (batch-1 decode) as a decode step runs them: cuBLAS against the Triton GEMV
(``ghostvis.ops.kernels.gemv``) over a grid of block shapes, bf16 and INT8, for the d20 shapes.

    python scripts/gemv_probe.py [OUT_JSON]
    GEMV_SHAPES=lm_head python scripts/gemv_probe.py    # only the shapes named (comma-separated)

The grid includes strips held whole (``BLOCK_K >= K``), the default launch. Each case
captures a CUDA graph of back-to-back calls over enough copies of the weight to
overflow L2 (as the layers of a step do) and reports microseconds per call and the weight
bytes per second. Prints the best configuration per shape and dtype, the table last.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

from ghostvis.ops import fused
from ghostvis.ops import reference as R

SHAPES = {"wqkv": (2560, 1280), "wo": (1280, 1280), "w_gate_up": (6912, 1280), "w_down": (1280, 3456),
          "lm_head": (65536, 1280)}
DEFAULT_SHAPES = ("wqkv", "wo", "w_gate_up", "w_down")  # a block's; the LM head only when named
GRID = [(bn, bk, w) for bn, bk, w in itertools.product([2, 4, 8, 16], [256, 512, 1024], [2, 4, 8])
        if 512 <= bn * bk <= 32768]


def per_call_us(fn_list, reps: int = 10) -> float:
    """Microseconds per call of a CUDA graph running every fn of ``fn_list`` once, in order."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fn_list:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fn_list:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(fn_list))


def main(out_path: str | None) -> None:
    dev = "cuda"
    rows = []
    names = [s for s in os.environ.get("GEMV_SHAPES", ",".join(DEFAULT_SHAPES)).split(",") if s]
    for name in names:
        n, k = SHAPES[name]
        w_bytes = n * k * 2
        copies = max(2, -(-240 * 2**20 // w_bytes))  # several times the L2
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, ws[0])
        cublas = per_call_us([lambda w=w: torch.mm(x, w.t(), out=y) for w in ws])
        row = {"shape": name, "n": n, "k": k, "cublas_us": cublas, "cublas_tb_s": w_bytes / cublas / 1e6}
        qs = [_quantize(w) for w in ws]
        for dtype_name, weights in (("bf16", [(w, None) for w in ws]), ("int8", qs)):
            best = None
            whole = triton.next_power_of_2(k)  # strips held whole (the default up to 16K elements)
            for cfg in GRID + [(bn, whole, w) for bn in (2, 4, 8) for w in (4, 8) if bn * whole <= 16384]:
                try:
                    out = fused.gemv_launch(x, weights[0][0], weights[0][1], None, y, config=cfg).clone()
                    want = ref if dtype_name == "bf16" else R.int8_linear(x, *weights[0])
                    if (out.float() - want.float()).abs().max() > 2e-2 * want.float().abs().max() + 1e-3:
                        continue
                    us = per_call_us([lambda w=w, s=s: fused.gemv_launch(x, w, s, None, y, config=cfg)
                                      for w, s in weights])
                except Exception as e:  # a config that does not compile is skipped
                    print(f"{name} {dtype_name} {cfg}: {type(e).__name__}", flush=True)
                    continue
                if best is None or us < best[1]:
                    best = (cfg, us)
            if best is not None:
                b = n * k * (2 if dtype_name == "bf16" else 1)
                row[f"triton_{dtype_name}_us"] = best[1]
                row[f"triton_{dtype_name}_config"] = list(best[0])
                row[f"triton_{dtype_name}_tb_s"] = b / best[1] / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ws, qs
        torch.cuda.empty_cache()
    print(f"\none-row matmuls on {torch.cuda.get_device_name()} (us per call, weight TB/s)")
    for r in rows:
        line = f"{r['shape']:<10} {r['n']:>6}x{r['k']:<5} cuBLAS {r['cublas_us']:6.2f} us {r['cublas_tb_s']:.2f} TB/s"
        for d in ("bf16", "int8"):
            if f"triton_{d}_us" in r:
                line += (f" | triton {d} {r[f'triton_{d}_us']:6.2f} us {r[f'triton_{d}_tb_s']:.2f} TB/s "
                         f"{r[f'triton_{d}_config']}")
        print(line)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


def _quantize(w):
    scale = w.float().abs().amax(1).clamp(min=1e-8) / 127
    return (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.to(w.dtype)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
