"""Benchmarks, one subcommand each; every mode prints a table and writes JSON under ``--out``.

    python recipes/bench.py train --preset d20      # tokens/s, MFU, peak memory vs HF and plain PyTorch
    python recipes/bench.py decode --preset d20     # tokens/s at batch 1 and 32, bf16 and INT8, vs roofline
    python recipes/bench.py vlm                     # multimodal SFT step: images/s and tokens/s
    python recipes/bench.py kernels                 # the per-op table

``kernels`` times every GhostVis op forward+backward against torch eager and
``torch.compile`` of its reference, reports achieved bandwidth against a copy
measured in the same run (memory-bound ops), the extra peak memory of the
chunked linear cross-entropy against materialised logits, and attention
TFLOP/s per backend, dense causal and packed documents. It needs a CUDA GPU.
Results go to ``DIR/kernels.json`` and a table on stdout.

``train`` and ``vlm`` live in ``recipes/bench_train.py``, ``decode`` in
``recipes/bench_decode.py``. All modes need a CUDA GPU.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ghostvis.ops as ops  # noqa: E402
from ghostvis.ops import attention_backends, reference  # noqa: E402


# ----------------------------------------------------------------------------- timing helpers


def bench_ms(fn: Callable[[], object], warmup_ms: float = 100, rep_ms: float = 400) -> float:
    """Median milliseconds per call, timed with CUDA events (triton's do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph_ms(fn: Callable[[], object]) -> float:
    """Median ms per call with the calls captured in a CUDA graph: GPU time without Python overhead."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad_outs) -> Callable[[], object]:
    """A closure running ``fn(*inputs)`` and its backward (grads not accumulated)."""
    leaves = [t for t in inputs if t.requires_grad]

    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, leaves, grad_outs)

    return run


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def compiled(fn: Callable) -> Callable:
    from ghostvis.train.step import compile as compile_transform

    return compile_transform(fn, fullgraph=True, dynamic=False)


def time_variants(variants: dict[str, Callable], inputs, grad_outs) -> dict[str, float]:
    """fwd+bwd ms per variant: ``name`` eager-launched (Python overhead included), ``name@graph`` graph-replayed."""
    out = {}
    for name, fn in variants.items():
        run = fwd_bwd(fn, inputs, grad_outs)
        for label, timer in ((name, bench_ms), (name + "@graph", bench_graph_ms)):
            try:
                out[label] = timer(run)
            except Exception as e:  # a variant that fails is reported, not fatal
                print(f"  {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                out[label] = float("nan")
    return out


# ----------------------------------------------------------------------------- memory-bound ops


def bench_rms_norm(device, dtype, n=65536, d=4096):
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device=device, dtype=dtype)).requires_grad_()
    dy = torch.randn(n, d, device=device, dtype=dtype)
    ms = time_variants({
        "triton": lambda a, b: ops.rms_norm(a, b, backend="triton"),
        "eager": reference.rms_norm,
        "compile": compiled(reference.rms_norm),
    }, [x, w], (dy,))
    # fwd reads x, writes y; bwd reads x and dy, writes dx (weights and per-row stats are negligible)
    return {"shape": [n, d], "bytes": 5 * x.numel() * x.element_size(), "ms": ms}


def bench_swiglu(device, dtype, n=16384, f=8192):
    g = torch.randn(n, f, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(n, f, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, f, device=device, dtype=dtype)
    ms = time_variants({
        "triton": lambda a, b: ops.swiglu(a, b, backend="triton"),
        "eager": reference.swiglu,
        "compile": compiled(reference.swiglu),
    }, [g, u], (dy,))
    # fwd reads gate, up, writes y; bwd reads gate, up, dy, writes dgate, dup
    return {"shape": [n, f], "bytes": 8 * g.numel() * g.element_size(), "ms": ms}


def bench_rope(device, dtype, b=32, t=2048, hq=32, hk=8, d=128):
    q = torch.randn(b, hq, t, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, t, d, device=device, dtype=dtype, requires_grad=True)
    ang = torch.arange(t, device=device)[:, None] * torch.rand(d // 2, device=device)
    ang = torch.cat([ang, ang], -1)[None].expand(b, t, d).contiguous()
    cos, sin = ang.cos(), ang.sin()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    ms = time_variants({
        "triton": lambda x, y: ops.rope(x, y, cos, sin, backend="triton"),
        "eager": lambda x, y: reference.rope(x, y, cos, sin),
        "compile": compiled(lambda x, y: reference.rope(x, y, cos, sin)),
    }, [q, k], (dq, dk))
    nbytes = 4 * (q.numel() + k.numel()) * q.element_size()
    return {"shape": [b, hq, hk, t, d], "bytes": nbytes, "ms": ms}


# ----------------------------------------------------------------------------- linear cross-entropy


def bench_linear_ce(device, dtype, n=16384, v=65536, d=1280):
    h = (torch.randn(n, d, device=device, dtype=dtype) * 0.5).requires_grad_()
    w = (torch.randn(v, d, device=device, dtype=dtype) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    t[::7] = -100
    variants = {
        "triton_chunked": lambda a, b: ops.linear_cross_entropy(a, b, t, backend="triton"),
        "materialised_eager": lambda a, b: reference.linear_cross_entropy(a, b, t),
        "materialised_compile": compiled(lambda a, b: reference.linear_cross_entropy(a, b, t)),
    }
    out = {"shape": [n, v, d], "ms": {}, "extra_peak_mib": {}, "loss": {}}
    for name, fn in variants.items():
        run = fwd_bwd(fn, [h, w], None)
        try:
            run()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            out["extra_peak_mib"][name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            out["loss"][name] = float(fn(h, w).detach())
            out["ms"][name] = bench_ms(run, rep_ms=1000)
        except Exception as e:
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            out["ms"][name] = out["extra_peak_mib"][name] = float("nan")
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- int8 linear


def bench_int8(device, dtype, k=4096, n=14336):
    wq = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
    scale = torch.rand(n, device=device) * 0.01
    w16 = (wq.float() * scale[:, None]).to(dtype)
    rows = {}
    for m in (1, 16, 4096):
        x = torch.randn(m, k, device=device, dtype=dtype)
        rows[m] = {
            "triton_int8": bench_ms(lambda: ops.int8_linear(x, wq, scale, backend="triton")),
            "reference_int8": bench_ms(lambda: reference.int8_linear(x, wq, scale)),
            "bf16_linear": bench_ms(lambda: torch.nn.functional.linear(x, w16)),
        }
    return {"shape": [k, n], "weight_bytes_int8": wq.numel(), "ms_by_m": rows}


# ----------------------------------------------------------------------------- attention


def packed_doc_ids(b, t, mean_len, device, seed=0):
    """Rows of ``t`` tokens cut into documents of random (exponential) length with mean ``mean_len``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        lengths, left = [], t
        while left > 0:
            n = max(1, min(left, int(torch.empty(1).exponential_(1 / mean_len, generator=g).item())))
            lengths.append(n)
            left -= n
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).to(device)


def attention_flops(doc_ids: torch.Tensor | None, b, t, hq, d) -> float:
    """Forward FLOPs of causal attention counting only allowed (query, key) pairs: 4*D per pair."""
    if doc_ids is None:
        pairs = b * t * (t + 1) / 2
    else:
        _, counts = torch.unique_consecutive(doc_ids.cpu().reshape(-1) + 10**9 * torch.arange(b).repeat_interleave(t),
                                             return_counts=True)
        pairs = float((counts * (counts + 1) / 2).sum())
    return 4 * d * hq * pairs


def bench_attention(device, dtype, b=4, t=8192, hq=16, hk=8, d=128, mean_doc=512):
    q = torch.randn(b, hq, t, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, t, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, t, d, device=device, dtype=dtype, requires_grad=True)
    go = torch.randn_like(q)
    docs = packed_doc_ids(b, t, mean_doc, device)
    import time

    start = time.perf_counter()
    attention_backends.document_block_mask(docs, t, t, batch=b, device=device)
    torch.cuda.synchronize()
    mask_ms = (time.perf_counter() - start) * 1e3
    cases = {
        "dense_causal/sdpa": ("sdpa", None),
        "dense_causal/flex": ("flex", None),
        "packed_docs/flex": ("flex", docs),
        "packed_docs/sdpa_dense_mask": ("sdpa", docs),
    }
    if attention_backends.flash_attn_module() is not None:
        cases["dense_causal/flash_attn"] = ("flash_attn", None)
        cases["packed_docs/flash_attn_varlen"] = ("flash_attn", docs)
    out = {"shape": [b, t, hq, hk, d], "mean_doc": mean_doc, "n_docs": int(docs.max(1).values.sum() + b),
           "block_mask_build_ms_first": mask_ms, "cases": {}}
    for name, (backend, ids) in cases.items():
        fn = lambda a, c, e, _b=backend, _i=ids: ops.attention(a, c, e, causal=True, doc_ids=_i, backend=_b)  # noqa: E731
        try:
            fwd_ms = bench_ms(lambda: fn(q, k, v))
            fb_ms = bench_ms(fwd_bwd(fn, [q, k, v], (go,)))
        except Exception as e:
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            fwd_ms = fb_ms = float("nan")
        flops = attention_flops(ids, b, t, hq, d)
        out["cases"][name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "useful_fwd_tflops": flops / fwd_ms / 1e9,
                              "useful_fwd_bwd_tflops": 3.5 * flops / fb_ms / 1e9}
    return out


# ----------------------------------------------------------------------------- the subcommand


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("GHOSTVIS_COMMIT", "unknown")


def _report(res: dict) -> str:
    lines = [f"device {res['device']}  torch {res['torch']}  triton {res['triton']}  commit {res['commit']}",
             f"copy bandwidth {res['copy_gbs']:.0f} GB/s"]
    for op in ("rms_norm", "swiglu", "rope"):
        r = res.get(op)
        if not r:
            continue
        cells = [f"{k} {v:.3f} ms ({r['bytes'] / v / 1e6:.0f} GB/s, {r['bytes'] / v / 1e6 / res['copy_gbs']:.0%})"
                 for k, v in r["ms"].items()]
        lines.append(f"{op:9s} fwd+bwd: " + " | ".join(cells))
    if "linear_ce" in res:
        r = res["linear_ce"]
        for k in r["ms"]:
            lines.append(f"linear_ce {k:22s} {r['ms'][k]:8.2f} ms  extra peak {r['extra_peak_mib'][k]:8.0f} MiB")
    if "int8" in res:
        for m, row in res["int8"]["ms_by_m"].items():
            lines.append(f"int8 M={m:<5}" + " | ".join(f"{k} {v:.3f} ms" for k, v in row.items()))
    if "attention" in res:
        r = res["attention"]
        lines.append(f"attention {r['shape']} mean doc {r['mean_doc']} "
                     f"block mask build {r['block_mask_build_ms_first']:.0f} ms")
        for k, c in r["cases"].items():
            lines.append(f"  {k:30s} fwd {c['fwd_ms']:7.2f} ms ({c['useful_fwd_tflops']:5.0f} TF/s)  "
                         f"fwd+bwd {c['fwd_bwd_ms']:7.2f} ms ({c['useful_fwd_bwd_tflops']:5.0f} TF/s)")
    return "\n".join(lines)


def kernels(out: str = "bench_out", only: tuple[str, ...] = (), dtype: str = "bfloat16") -> dict:
    """Time every op fwd+bwd (triton vs eager vs torch.compile), bandwidth, CE memory, attention TFLOP/s.

    Args:
        out: folder for ``kernels.json``.
        only: run just these benches (rms_norm, swiglu, rope, linear_ce, int8, attention).
        dtype: activation dtype.
    """
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA device")
    device = torch.device("cuda")
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": _commit(), "date": datetime.date.today().isoformat(), "dtype": dtype,
           "copy_gbs": copy_bandwidth_gbs(device)}
    benches = {"rms_norm": bench_rms_norm, "swiglu": bench_swiglu, "rope": bench_rope, "linear_ce": bench_linear_ce,
               "int8": bench_int8, "attention": bench_attention}
    os.makedirs(out, exist_ok=True)
    for name, fn in benches.items():
        if only and name not in only:
            continue
        print(f"bench {name} ...", flush=True)
        res[name] = fn(device, dt)
        torch.cuda.empty_cache()
        with open(os.path.join(out, "kernels.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(_report(res), flush=True)
    return res


def _modes() -> dict:
    """Mode name -> (config dataclass or function, runner)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_decode
    import bench_train

    return {"train": (bench_train.BenchTrain, bench_train.main), "vlm": (bench_train.BenchVLM, bench_train.vlm),
            "decode": (bench_decode.BenchDecode, bench_decode.main), "kernels": (kernels, None)}


def main() -> None:
    import tyro

    modes = _modes()
    chosen = tyro.extras.subcommand_cli_from_dict({name: spec for name, (spec, _) in modes.items()})
    for spec, runner in modes.values():
        if runner is not None and isinstance(chosen, spec):
            runner(chosen)


if __name__ == "__main__":
    main()
