"""Decoding throughput: GhostVis generation (bf16 and INT8) beside HF ``generate`` and the bandwidth roofline.

    python recipes/bench_decode.py --preset d20 --batches 1 32

tokens/s counts generated tokens of all rows (prefill excluded from the count, included in the
time of HF; GhostVis times are for whole ``generate`` calls too, so a CUDA-graph capture per call
is inside the number). The roofline is parameter bytes read per step over the measured copy
bandwidth: a batch-1 step must read every weight once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

import ghostvis as gv


@dataclass
class BenchDecode:
    """Tokens/s of batched greedy decoding."""

    preset: str = "d20"
    """Text preset."""
    batches: list[int] = field(default_factory=lambda: [1, 32])
    """Batch sizes to measure."""
    prompt_len: int = 128
    """Prompt tokens per row."""
    new_tokens: int = 256
    """Generated tokens per row (no stop token: every row runs to the end)."""
    rows: list[str] = field(default_factory=lambda: ["bf16", "int8", "hf"])
    """Which implementations to run."""
    json_out: Optional[str] = None
    """Write the results here as JSON."""


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)


def param_bytes(params) -> int:
    return sum(t.numel() * t.element_size() for t in gv.flatten(params).values())


def time_generate(params, cfg, batch: int, args: BenchDecode) -> float:
    prompts = torch.randint(8, cfg.text.vocab_size, (batch, args.prompt_len)).tolist()
    gv.generate(params, cfg, prompts, max_new_tokens=8)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gv.generate(params, cfg, prompts, max_new_tokens=args.new_tokens)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return sum(len(o) for o in out) / dt


def time_hf(cfg, batch: int, args: BenchDecode) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM
    t = cfg.text
    hc = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=t.ffn_dim,
                     num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads,
                     head_dim=t.head_dim, max_position_embeddings=t.max_seq_len, tie_word_embeddings=False)
    model = LlamaForCausalLM(hc).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(8, t.vocab_size, (batch, args.prompt_len), device="cuda")
    n = min(args.new_tokens, 64)
    kw = dict(do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=0)
    model.generate(ids, **(kw | {"min_new_tokens": 4, "max_new_tokens": 4}))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
    return (out.shape[1] - args.prompt_len) * batch / (time.perf_counter() - t0)


def main(args: BenchDecode) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode needs a CUDA device")
    cfg = gv.presets.get(args.preset)
    params = gv.init(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    bw = copy_bandwidth()
    results = []
    for row in args.rows:
        p = gv.quantize(params, "int8") if row == "int8" else params
        roof = bw / param_bytes(p) if row != "hf" else bw / param_bytes(params)
        for b in args.batches:
            r = {"impl": row, "preset": args.preset, "batch": b, "roofline_tok_s_per_seq": roof}
            try:
                r["tokens_per_s"] = time_hf(cfg, b, args) if row == "hf" else time_generate(p, cfg, b, args)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{args.preset} decode, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'impl':<6} {'batch':>5} {'tok/s':>9} {'% roofline (per seq)':>21}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<6} {r['batch']:>5} {r['error']}")
        else:
            per_seq = r["tokens_per_s"] / r["batch"]
            print(f"{r['impl']:<6} {r['batch']:>5} {r['tokens_per_s']:>9.0f} "
                  f"{100 * per_seq / r['roofline_tok_s_per_seq']:>20.1f}%")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchDecode))
