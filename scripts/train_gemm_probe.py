"""Times the matmuls of one d20 training block as the step runs them, and their alternatives.

    python scripts/train_gemm_probe.py [OUT_JSON]

For each projection of a d20 block (16 x 2048 tokens) it times, with cuBLAS:
the forward ``x @ W.T``, the input gradient ``dy @ W`` and the weight gradient in both
orders (``dy.T @ x`` and ``(x.T @ dy).T``), and reports TFLOP/s against 989. For the two
projections that end a residual branch it also times ``x + a @ W.T`` as a matmul and an add,
as one ``addmm``, and as ``addmm`` writing into its own input (no copy), and lists the kernels
``addmm`` launches: a copy kernel before the GEMM means the add was only moved, not removed.
Timings are medians of ``triton.testing.do_bench`` (L2 flushed). Prints the table last.
"""

from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench

M = 16 * 2048
DIM, QKV, FFN = 1280, 2560, 3456
SHAPES = {"wqkv": (QKV, DIM), "wo": (DIM, DIM), "w_gate_up": (2 * FFN, DIM), "w_down": (DIM, FFN)}
PEAK = 989e12


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12


def kernels_of(fn) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name[:70] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main(out_path: str | None) -> None:
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for name, (n, k) in SHAPES.items():
        x = torch.randn(M, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        dy = torch.randn(M, n, device=dev, dtype=dt)
        flop = 2.0 * M * n * k
        cases = {
            "fwd x@W.T": lambda: x @ w.t(),
            "dgrad dy@W": lambda: dy @ w,
            "wgrad dy.T@x": lambda: dy.t() @ x,
            "wgrad (x.T@dy).T": lambda: (x.t() @ dy).t(),
        }
        for case, fn in cases.items():
            ms = do_bench(fn)
            rows.append({"weight": name, "case": case, "ms": ms, "tflops": tflops(flop, ms)})
        if name in ("wo", "w_down"):
            res = torch.randn(M, n, device=dev, dtype=dt)
            buf = res.clone()
            more = {
                "mm then add": lambda: res + x @ w.t(),
                "addmm": lambda: torch.addmm(res, x, w.t()),
                "addmm into its input": lambda: buf.addmm_(x, w.t()),
            }
            for case, fn in more.items():
                ms = do_bench(fn)
                rows.append({"weight": name, "case": case, "ms": ms, "tflops": tflops(flop, ms),
                             "kernels": kernels_of(fn)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nd20 block matmuls, {M} tokens, bf16, {torch.cuda.get_device_name()}")
    print(f"{'weight':<10} {'case':<22} {'ms':>8} {'TFLOP/s':>8} {'% of 989':>8}  kernels")
    for r in rows:
        print(f"{r['weight']:<10} {r['case']:<22} {r['ms']:>8.3f} {r['tflops']:>8.0f} "
              f"{100 * r['tflops'] * 1e12 / PEAK:>7.1f}%  {' | '.join(r.get('kernels', []))}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
