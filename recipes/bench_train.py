"""Training throughput: GhostVis's optimized and reference paths beside two baselines, same shapes, one process.

    python recipes/bench_train.py --preset d20 --batch 16 --seq 2048

Rows: GhostVis optimized (kernels + torch.compile of the whole grad function + fused AdamW),
GhostVis reference (plain-torch ops, eager), a plain ~100-line PyTorch Llama (nn.Modules,
torch.compile, SDPA, fused AdamW, chunked loss) and HF ``LlamaForCausalLM`` compiled with fused AdamW.
MFU counts ``gv.flops_per_token`` (6 * non-embedding params + 12 * layers * dim * seq) against
989 TFLOP/s (H100 bf16 dense). Prints a table and writes JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import ghostvis as gv
from ghostvis.train.optim import AdamW
from ghostvis.train.step import value_and_grad

PEAK_FLOPS = 989e12


@dataclass
class BenchTrain:
    """Tokens/s, MFU and peak memory of one training step per implementation."""

    preset: str = "d20"
    """Text preset to benchmark (e.g. d12, d20)."""
    batch: int = 16
    """Sequences per step."""
    seq: int = 2048
    """Tokens per sequence."""
    steps: int = 10
    """Timed steps (after warm-up)."""
    warmup: int = 3
    """Untimed steps first (compilation happens here)."""
    rows: list[str] = field(default_factory=lambda: ["ghostvis", "ghostvis-reference", "plain", "hf"])
    """Which implementations to run."""
    json_out: Optional[str] = None
    """Write the results here as JSON."""


# ----------------------------------------------------------------------------- timing


def time_steps(step: Callable[[], torch.Tensor], steps: int, warmup: int) -> tuple[float, float]:
    """Seconds per step (median of CUDA-event timed steps) and the last loss."""
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2], float(loss)


def random_batch(cfg: gv.ModelConfig, b: int, t: int, device="cuda") -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.text.vocab_size, (b, t + 1), generator=g).to(device)
    return {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
            "positions": None, "doc_ids": None, "images": None}


# ----------------------------------------------------------------------------- GhostVis


def ghostvis_step(cfg: gv.ModelConfig, batch: dict, *, compiled: bool, reference: bool) -> Callable:
    params = gv.flatten(gv.init(cfg, seed=0, device="cuda", dtype=torch.bfloat16))
    opt = AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    state = opt.init(params)
    grad_fn = value_and_grad(cfg, {}, select=False)
    if compiled:
        grad_fn = torch.compile(grad_fn)
    normalizer = torch.tensor(float(batch["targets"].numel()), device="cuda")

    def step():
        if reference:
            with gv.ops.use(all="reference"):
                grads, loss = grad_fn(params, batch, normalizer)
        else:
            grads, loss = grad_fn(params, batch, normalizer)
        opt.update(params, grads, state, 0)
        return loss

    return step


# ----------------------------------------------------------------------------- plain PyTorch Llama


class Block(nn.Module):
    def __init__(self, c: gv.TextConfig):
        super().__init__()
        self.c = c
        self.attn_norm, self.mlp_norm = nn.RMSNorm(c.dim, eps=c.norm_eps), nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.w13 = nn.Linear(c.dim, 2 * c.ffn_dim, bias=False)
        self.w2 = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        c, (b, t, _) = self.c, x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q = q.view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        rot = lambda z: torch.cat((-z[..., c.head_dim // 2:], z[..., : c.head_dim // 2]), -1)  # noqa: E731
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(o.transpose(1, 2).reshape(b, t, -1))
        g, u = self.w13(self.mlp_norm(x)).chunk(2, -1)
        return x + self.w2(F.silu(g) * u)


class PlainLlama(nn.Module):
    """What a strong engineer writes in an afternoon."""

    def __init__(self, c: gv.TextConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)

    def forward(self, tokens, targets):
        t = tokens.shape[1]
        inv = 1.0 / (self.c.rope_theta ** (torch.arange(0, self.c.head_dim, 2, device=tokens.device) / self.c.head_dim))
        f = torch.outer(torch.arange(t, device=tokens.device).float(), inv)
        emb = torch.cat((f, f), -1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        h = self.norm(x).flatten(0, 1)
        tg = targets.flatten()
        total = 0.0
        for hc, tc in zip(h.split(8192), tg.split(8192)):  # chunked loss: logits one slice at a time
            total = total + F.cross_entropy(self.head(hc).float(), tc, reduction="sum")
        return total / tg.numel()


def module_step(model: nn.Module, batch: dict, loss_of: Callable) -> Callable:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def plain_step(cfg: gv.ModelConfig, batch: dict) -> Callable:
    model = PlainLlama(cfg.text).to("cuda", torch.bfloat16)
    model = torch.compile(model)
    return module_step(model, batch, lambda m, b: m(b["tokens"], b["targets"]))


def hf_step(cfg: gv.ModelConfig, batch: dict) -> Callable:
    from transformers import LlamaConfig, LlamaForCausalLM
    t = cfg.text
    hc = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=t.ffn_dim,
                     num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads,
                     head_dim=t.head_dim, max_position_embeddings=t.max_seq_len, rms_norm_eps=t.norm_eps,
                     tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hc).to("cuda", torch.bfloat16)
    model = torch.compile(model)
    labels = batch["tokens"]  # HF shifts labels inside its loss: position t predicts labels[t+1]
    return module_step(model, batch, lambda m, b: m(input_ids=b["tokens"], labels=labels).loss)


# ----------------------------------------------------------------------------- main


def main(args: BenchTrain) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("bench_train needs a CUDA device")
    cfg = gv.presets.get(args.preset)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_seq_len=max(cfg.text.max_seq_len, args.seq)))
    batch = random_batch(cfg, args.batch, args.seq)
    fpt = gv.flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    builders = {
        "ghostvis": lambda: ghostvis_step(cfg, batch, compiled=True, reference=False),
        "ghostvis-reference": lambda: ghostvis_step(cfg, batch, compiled=False, reference=True),
        "plain": lambda: plain_step(cfg, batch),
        "hf": lambda: hf_step(cfg, batch),
    }
    results = []
    for name in args.rows:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = {"impl": name, "preset": args.preset, "batch": args.batch, "seq": args.seq}
        try:
            t0 = time.perf_counter()
            step = builders[name]()
            sec, loss = time_steps(step, args.steps, args.warmup)
            row |= {"sec_per_step": sec, "tokens_per_s": tokens / sec, "mfu": fpt * tokens / sec / PEAK_FLOPS,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss,
                    "wall_s": time.perf_counter() - t0}
        except torch.cuda.OutOfMemoryError:
            row |= {"error": "out of memory"}
        except Exception as e:  # a baseline that fails is reported, not fatal
            row |= {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        step = None
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.preset}, {args.batch} x {args.seq} tokens/step, bf16, {torch.cuda.get_device_name()}")
    print(f"{'impl':<20} {'tok/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<20} {r['error']}")
        else:
            print(f"{r['impl']:<20} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>6.1f}% {r['peak_gib']:>9.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchTrain))
