"""Times the MLP's matmuls with SwiGLU in their epilogues against cuBLAS plus the SwiGLU kernel.

    python scripts/mlp_gemm_probe.py [OUT_JSON]

For the d20 and d12 MLP shapes (16 x 2048 tokens, bf16) and a grid of launch shapes it times:

- backward: ``dy @ w_down`` then the stacked SwiGLU backward kernel (cuBLAS + Triton), against
  ``ops.mlp.swiglu_bwd_matmul_launch`` (one Triton matmul);
- forward: ``x @ w_gate_up.T`` then the SwiGLU kernel, against ``ops.mlp.gate_up_swiglu_launch``;
- the whole op, forward + backward through autograd, unfused against fused.

Each fused result is checked against the unfused one (relative error, bf16). Timings are
medians of ``triton.testing.do_bench`` (L2 flushed). Prints the table last.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

import ghostvis.ops as ops
from ghostvis.ops import fused, mlp

M = 16 * 2048
ONLY = os.environ.get("PROBE_ONLY", "")  # "bwd" or "fwd": that grid alone
SHAPES = {"d20": (1280, 3456), "d12": (768, 2048)}
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, split epilogue])
BWD_GRID = [(64, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4, 1), (128, 128, 64, 8, 8, 4, 1), (128, 128, 64, 8, 8, 3, 1),
            (128, 128, 64, 8, 4, 4, 1), (128, 256, 64, 8, 8, 3, 1), (64, 256, 64, 8, 4, 4, 1),
            (64, 128, 64, 8, 4, 3, 1), (128, 64, 64, 8, 4, 4, 1), (64, 64, 64, 8, 4, 4, 1)]
FWD_GRID = [(128, 64, 64, 8, 8, 3), (128, 64, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
            (64, 128, 64, 8, 4, 4), (256, 64, 64, 8, 8, 3), (128, 64, 128, 8, 8, 3), (64, 64, 64, 8, 4, 4)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def probe(preset: str, d: int, f: int, add) -> None:
    """Every case for one preset's shapes (dim ``d``, ffn ``f``)."""
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, d, device=dev, dtype=dt, generator=g)
    wgu = torch.randn(2 * f, d, device=dev, dtype=dt, generator=g) * d ** -0.5
    wd = torch.randn(d, f, device=dev, dtype=dt, generator=g) * f ** -0.5
    dy = torch.randn(M, d, device=dev, dtype=dt, generator=g)
    gu = x @ wgu.t()
    flop = 2.0 * M * f * d

    def bwd_unfused():
        return fused.swiglu_stacked_bwd(dy @ wd, gu)

    ref = bwd_unfused()
    add(preset=preset, case="bwd cuBLAS + SwiGLU kernel", ms=do_bench(bwd_unfused), flop=flop)
    add(preset=preset, case="bwd cuBLAS dy @ w_down alone", ms=do_bench(lambda: dy @ wd), flop=flop)
    for cfg in BWD_GRID if ONLY in ("", "bwd") else ():
        try:
            out = mlp.swiglu_bwd_matmul_launch(dy, wd, gu, config=cfg)
            err = rel(out, ref)
            ms = do_bench(lambda: mlp.swiglu_bwd_matmul_launch(dy, wd, gu, config=cfg))
            add(preset=preset, case=f"bwd fused {cfg}", ms=ms, flop=flop, err=err, cfg=cfg)
        except Exception as e:  # a launch shape that does not fit (shared memory, registers)
            add(preset=preset, case=f"bwd fused {cfg}", error=str(e)[:120])

    def fwd_unfused():
        a = x @ wgu.t()
        return a, fused.swiglu_stacked_fwd(a)

    gu_ref, h_ref = fwd_unfused()
    add(preset=preset, case="fwd cuBLAS + SwiGLU kernel", ms=do_bench(fwd_unfused), flop=2 * flop)
    add(preset=preset, case="fwd cuBLAS x @ w_gate_up.T alone", ms=do_bench(lambda: x @ wgu.t()), flop=2 * flop)
    for cfg in FWD_GRID if ONLY in ("", "fwd") else ():
        try:
            a, h = mlp.gate_up_swiglu_launch(x, wgu, config=cfg)
            err = max(rel(a, gu_ref), rel(h, h_ref))
            ms = do_bench(lambda: mlp.gate_up_swiglu_launch(x, wgu, config=cfg))
            add(preset=preset, case=f"fwd fused {cfg}", ms=ms, flop=2 * flop, err=err, cfg=cfg)
        except Exception as e:
            add(preset=preset, case=f"fwd fused {cfg}", error=str(e)[:120])

    leaves = [t.clone().requires_grad_() for t in (x, wgu, wd)]
    for name, backend in (("op fwd+bwd unfused", "unfused"), ("op fwd+bwd fused (defaults)", "triton")):
        def run():
            y = ops.swiglu_mlp(*leaves, backend=backend)
            return torch.autograd.grad(y, leaves, dy)
        add(preset=preset, case=name, ms=do_bench(run), flop=6 * flop)


def main(out_path: str | None) -> None:
    rows = []

    def add(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    for preset, (d, f) in SHAPES.items():
        probe(preset, d, f, add)
        torch.cuda.empty_cache()

    print(f"\nMLP matmuls with SwiGLU epilogues, {M} tokens, bf16, {torch.cuda.get_device_name()}")
    print(f"{'preset':<6} {'case':<44} {'ms':>7} {'TFLOP/s':>8} {'rel err':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<6} {r['case']:<44} failed: {r['error'][:60]}")
            continue
        tf = r["flop"] / (r["ms"] * 1e-3) / 1e12
        err = f"{r['err']:.2e}" if "err" in r else ""
        print(f"{r['preset']:<6} {r['case']:<44} {r['ms']:>7.3f} {tf:>8.0f} {err:>9}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
