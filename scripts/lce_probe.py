"""Times the chunked linear cross-entropy of a training step at several chunk sizes.

    python scripts/lce_probe.py [OUT_JSON]

For the LM head of d20 (dim 1280) and d12 (dim 768), 16 x 2048 tokens, a 65536 vocab, bf16,
it times ``linear_ce_fused`` (loss and both gradients: the op a training step runs) with
``linear_ce.CHUNK_ELEMENTS`` set so a chunk holds 2048 to 32768 tokens, and reports its extra
peak memory. For each chunk size it also times the pieces of one chunk: the logits matmul, the
row kernel, the input-gradient matmul and the weight-gradient matmul (the float32 ``addmm`` into
the running sum, or a plain ``mm`` where one chunk holds every token), and the logits matmul in
the other order (``W @ h.T``, the logits transposed). Then, on a chunk of 8192 tokens, it times
the row kernel's launches (``linear_ce.ROWS_LAUNCH``: columns per loop step and warps). Timings are medians of
``triton.testing.do_bench`` (L2 flushed). Prints the tables last.
"""

from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench

from ghostvis.ops import linear_ce as lce

N, V = 16 * 2048, 65536
DIMS = {"d20": 1280, "d12": 768}
CHUNKS = (2048, 4096, 8192, 16384, 32768)


def pieces(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, rows: int) -> dict:
    """ms of each step of one chunk of ``rows`` tokens, and the count of chunks."""
    hc, tc = h[:rows], targets[:rows]
    logits = hc @ w.t()
    scale = torch.ones(1, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(hc)
    acc = torch.zeros(w.shape, dtype=torch.float32, device=h.device)
    out = {
        "logits_mm": do_bench(lambda: torch.mm(hc, w.t(), out=logits)),
        "rows": do_bench(lambda: lce._rows_triton(logits, tc, scale, -100, True)),
        "grad_h_mm": do_bench(lambda: torch.mm(logits, w, out=grad_h)),
    }
    if rows < N:
        out["grad_w_addmm_fp32"] = do_bench(lambda: torch.addmm(acc, logits.t(), hc, out_dtype=torch.float32, out=acc))
    else:
        out["grad_w_mm"] = do_bench(lambda: torch.mm(logits.t(), hc))
    logits_t = torch.empty((w.shape[0], rows), dtype=h.dtype, device=h.device)
    out["logits_t_mm"] = do_bench(lambda: torch.mm(w, hc.t(), out=logits_t))
    out["chunks"] = N // rows
    return out


def row_launches(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, rows: int = 8192) -> list[dict]:
    """ms of the row kernel on one chunk of ``rows`` tokens, per launch of it."""
    logits = h[:rows] @ w.t()
    scale = torch.ones(1, dtype=torch.float32, device=h.device)
    saved = dict(lce.ROWS_LAUNCH)
    out = []
    for block, warps in ((2048, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32)):
        lce.ROWS_LAUNCH.update(block=block, warps=warps)
        ms = do_bench(lambda: lce._rows_triton(logits, targets[:rows], scale, -100, True))
        out.append({"block": block, "warps": warps, "ms": ms, "tb_s_3_passes": 3 * logits.numel() * 2 / ms / 1e9})
        print(json.dumps(out[-1]), flush=True)
    lce.ROWS_LAUNCH.update(saved)
    return out


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    results = []
    for name, dim in DIMS.items():
        h = torch.randn(N, dim, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(V, dim, device=dev) * dim**-0.5).to(torch.bfloat16)
        targets = torch.randint(0, V, (N,), device=dev)
        for rows in CHUNKS:
            lce.CHUNK_ELEMENTS = rows * V
            run = lambda: lce.linear_ce_fused(h, w, targets, -100, "mean", "triton")  # noqa: E731
            run()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = do_bench(run, warmup=50, rep=300)
            row = {"preset": name, "chunk_tokens": rows, "ms": ms, "extra_peak_mib": extra,
                   **pieces(h, w, targets, rows)}
            results.append(row)
            print(json.dumps(row), flush=True)
    launches = row_launches(h, w, targets)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"chunks": results, "row_launches": launches}, f, indent=1)
    print(f"{'preset':6} {'chunk':>6} {'ms':>7} {'MiB':>6} {'logits':>7} {'rows':>6} {'dh':>6} {'dW':>6} {'T':>7}")
    for r in results:  # the pieces are ms per chunk
        dw = r.get("grad_w_addmm_fp32", r.get("grad_w_mm"))
        print(f"{r['preset']:6} {r['chunk_tokens']:6d} {r['ms']:7.2f} {r['extra_peak_mib']:6.0f} "
              f"{r['logits_mm']:7.3f} {r['rows']:6.3f} {r['grad_h_mm']:6.3f} {dw:6.3f} {r['logits_t_mm']:7.3f}")
    print("row kernel, 8192 x 65536 logits (d12 run): block, warps, ms, TB/s counting three passes")
    for r in launches:
        print(f"{r['block']:5d} {r['warps']:2d} {r['ms']:6.3f} {r['tb_s_3_passes']:5.2f}")


if __name__ == "__main__":
    main()
