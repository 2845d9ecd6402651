"""Would programmatic dependent launch (PDL) make batch-1 decoding bound by bytes? A probe.

    python scripts/pdl_probe.py [OUT_JSON]

Batch-1 decoding runs about ten small kernels per block, each bound by its latency more than
its bytes (BENCHMARKS.md). With PDL a kernel may start while the one before it finishes: it
loads what does not depend on its predecessor (a GEMV's weight strip) before
``gdc_wait()``, then waits for the predecessor's output (the input row).

The probe runs the four one-row matmuls of each d20 block (q/k/v, output, gate/up, down),
each reading the previous one's output, with a small elementwise kernel between them (as
the norms and SwiGLU sit there), for 20 blocks of distinct weights (more than L2 holds),
captured in one CUDA graph. Three ways:

- ``library``: the decode GEMV (``ghostvis.ops.decode``'s kernel) and a torch add;
- ``no-pdl``: this probe's kernels, whose GEMV loads its whole weight strip at once;
- ``pdl``: the same kernels launched with ``launch_pdl=True``, weights loaded before the wait;
- ``pdl+bulkD`` / ``pdl+lineD``: as ``pdl``, and each GEMV also asks L2 to fetch the weight
  of the GEMV D places after it in the chain (``cp.async.bulk.prefetch.L2`` of 4 KB pieces,
  or ``prefetch.global.L2`` of 128-byte lines), before it waits. The prefetches return at
  once; the bytes stream in while the latency-bound kernels run, so the later GEMV reads L2;
- ``pdl+bulk1/bnB``: ``pdl+bulk1`` with B rows a program.

bf16 and INT8 (per-row scale) weights. Prints microseconds per block and weight bytes per
second; the table last. Nothing here is used by the library.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from gemv_probe import per_call_us  # this folder is on sys.path when run as a script
from ghostvis.ops import fused

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: PDL cannot be probed
    gdc_launch_dependents = gdc_wait = None

DIM, QKV, FFN, LAYERS = 1280, 2560, 3456, 20
# (name, rows N, columns K, how many of the previous output's values it reads)
WAYS = ["library", "no-pdl", "pdl", "pdl+bulk1", "pdl+bulk2", "pdl+bulk4", "pdl+line1", "pdl+line2",
        "pdl+bulk1/bn4", "pdl+bulk1/bn8", "pdl+bulk2/bn4"]
MATS = [("wqkv", QKV, DIM), ("wo", DIM, DIM), ("w_gate_up", 2 * FFN, DIM), ("w_down", DIM, FFN)]


@triton.jit
def l2_prefetch(PF, PF_BYTES, UNIT, MODE: tl.constexpr, LANES: tl.constexpr):
    # ask L2 for PF[0:PF_BYTES] in UNIT-byte pieces, piece i from program i % grid (fire and forget)
    grid = tl.num_programs(0)
    piece = tl.arange(0, LANES).to(tl.int64) * grid + tl.program_id(0)
    off = piece * UNIT
    ok = (off < PF_BYTES).to(tl.int32)
    ptr = PF + tl.minimum(off, PF_BYTES - UNIT)
    if MODE == 1:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; }\n"
            "mov.u32 $0, 0;", "=r,l,r,r", [ptr, ok, tl.full([LANES], UNIT, tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p prefetch.global.L2 [$1]; }\nmov.u32 $0, 0;",
            "=r,l,r", [ptr, ok], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def gemv_strip(X, W, SCALE, Y, N, K, PF, PF_BYTES, PF_UNIT, HAS_SCALE: tl.constexpr, PDL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PF_MODE: tl.constexpr = 0,
               PF_LANES: tl.constexpr = 128):
    # y = x @ w.T for one row; each program holds its BLOCK_N rows of w whole (BLOCK_K >= K)
    pid = tl.program_id(0)
    rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    if PDL:
        gdc_launch_dependents()
    if PF_MODE != 0:
        l2_prefetch(PF, PF_BYTES, PF_UNIT, PF_MODE, PF_LANES)
    w = tl.load(W + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0)
    if HAS_SCALE:
        s = tl.load(SCALE + rn, mask=rn < N, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_SCALE:
        acc = acc * s
    tl.store(Y + rn, acc.to(Y.dtype.element_ty), mask=rn < N)


@triton.jit
def scale_row(X, Y, N, PDL: tl.constexpr, BLOCK: tl.constexpr):
    # y = x (a copy through registers): stands for the norm / SwiGLU kernels between the matmuls
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=offs < N)


def chain(way: str, layers, x0: torch.Tensor, bufs: dict):
    """A function running the 20 blocks' matmuls the given way; returns the last output."""
    flat = [m for mats in layers for m in mats]
    pf_mode, pf_dist, pf_unit, rows = 0, 0, 0, None
    if "+" in way:  # e.g. pdl+bulk2/bn4
        spec = way.split("+")[1]
        spec, _, bn_spec = spec.partition("/bn")
        rows = int(bn_spec) if bn_spec else None
        pf_mode, pf_unit = (1, 4096) if spec.startswith("bulk") else (2, 128)
        pf_dist = int(spec.lstrip("bulkine"))

    def run():
        x = x0
        for i, (name, w, scale) in enumerate(flat):
            n, k = w.shape
            y, mid = bufs[name]
            if way == "library":
                fused.gemv_launch(x[:, :k], w, scale, None, y)
                mid.copy_(y)
            else:
                pdl = way != "no-pdl"
                bn = rows or (8 if (w.dtype == torch.int8 and n >= 4096) else 2)
                bk = triton.next_power_of_2(k)
                extra = {"launch_pdl": True} if pdl else {}
                grid = triton.cdiv(n, bn)
                pf = flat[(i + pf_dist) % len(flat)][1].view(torch.uint8).view(-1) if pf_mode else w
                lanes = triton.next_power_of_2(max(128, triton.cdiv(triton.cdiv(pf.numel(), pf_unit or 1), grid)))
                gemv_strip[(grid,)](x[:, :k], w, scale if scale is not None else w, y, n, k,
                                    pf, pf.numel(), pf_unit, HAS_SCALE=scale is not None, PDL=pdl,
                                    BLOCK_N=bn, BLOCK_K=bk, PF_MODE=pf_mode, PF_LANES=lanes,
                                    num_warps=8 if bn * bk >= 16384 else 4, **extra)
                scale_row[(triton.cdiv(n, 1024),)](y, mid, n, PDL=pdl, BLOCK=1024, num_warps=4, **extra)
            x = mid
        return x
    return run


def main(out_path: str | None) -> None:
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    for kind in ("bf16", "int8"):
        layers, weight_bytes = [], 0
        for _ in range(LAYERS):
            mats = []
            for name, n, k in MATS:
                if kind == "bf16":
                    w, scale = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5, None
                else:
                    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
                    scale = torch.full((n,), k ** -0.5 / 64, device=dev, dtype=torch.bfloat16)
                weight_bytes += w.numel() * w.element_size()
                mats.append((name, w, scale))
            layers.append(mats)
        bufs = {name: (torch.empty(1, n, device=dev, dtype=torch.bfloat16),
                       torch.empty(1, n, device=dev, dtype=torch.bfloat16)) for name, n, _ in MATS}
        x0 = torch.randn(1, FFN, device=dev, dtype=torch.bfloat16)
        ref = None
        for way in WAYS:
            if way != "library" and way != "no-pdl" and gdc_wait is None:
                rows.append({"weights": kind, "way": way, "error": "this triton has no PDL intrinsics"})
                continue
            try:
                run = chain(way, layers, x0, bufs)
                out = run().float().clone()
                torch.cuda.synchronize()
                ref = out if ref is None else ref
                err = ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()
                us = per_call_us([run], reps=20)  # one CUDA-graph replay of the 20 blocks
                row = {"weights": kind, "way": way, "us_per_block": us / LAYERS,
                       "weight_TBps": weight_bytes / (us * 1e-6) / 1e12, "rel_err_vs_library": err}
            except Exception as e:  # e.g. launch_pdl unknown to this triton, or not capturable
                row = {"weights": kind, "way": way, "error": f"{type(e).__name__}: {str(e)[:160]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nd20 batch-1 matmul chain (4 GEMVs + 4 small kernels per block, {LAYERS} blocks, one CUDA graph), "
          f"{torch.cuda.get_device_name()}, triton {triton.__version__}")
    print(f"{'weights':<6} {'way':<14} {'us/block':>9} {'weight TB/s':>12} {'rel err':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['weights']:<6} {r['way']:<14} failed: {r['error']}")
        else:
            print(f"{r['weights']:<6} {r['way']:<14} {r['us_per_block']:>9.1f} {r['weight_TBps']:>12.2f} "
                  f"{r['rel_err_vs_library']:>9.1e}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
