"""Decoding throughput: GhostVis generation (bf16 and INT8, eager-captured and compiled) beside HF
``generate``, a plain compiled static-KV-cache decoder and the bandwidth roofline.

    python recipes/bench.py decode --preset d20 --batches 1 32 [--profile]

tokens/s counts generated tokens of all rows over the wall time of a whole ``generate`` call
(prefill, CUDA-graph capture and decoding; the first call per shape, which compiles, is an
untimed warm-up). The roofline is parameter bytes read per step over the measured copy
bandwidth: a batch-1 step must read every weight once. ``--profile`` adds, for the GhostVis
rows, the GPU time of one decode step by kernel category and the LM head's share.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    rows: list[str] = field(default_factory=lambda: ["bf16", "int8", "bf16-eager", "plain", "hf"])
    """Which to run: bf16 / int8 (compiled step), int8-head (compiled, the LM head INT8 too), bf16-unfused (compiled,
    without the decode kernels of ``ghostvis.ops.decode``: SDPA, residual adds left to inductor, RoPE then cache
    copies, cuBLAS GEMVs), bf16-inductor (compiled, every elementwise op and attention as plain torch), bf16-eager /
    int8-eager (eager ops captured), bf16-no-pdl / int8-no-pdl (compiled, captured without programmatic dependent
    launch), bf16-norm-apart / int8-norm-apart (compiled, each add + norm, projection, RoPE + cache write and SwiGLU
    as separate kernels, as before ``ops.add_rms_norm_linear`` and ``ops.add_rms_norm_qkv_cache``), bf16-rope-apart
    / int8-rope-apart (compiled, RoPE and the cache writes apart from the q/k/v projection), plain, hf."""
    profile: bool = False
    """Profile one decode step per GhostVis row (GPU time per kernel category)."""
    reuse: bool = True
    """Keep the KV cache and captured step between the warm-up and the timed call (``generate(reuse=True)``,
    as a chat loop does); ``--no-reuse`` times a cold call (allocation, weight stacking, capture)."""
    out: str = "bench_out"
    """Folder for ``decode_<preset>.json``."""


def param_bytes(params) -> int:
    return sum(t.numel() * t.element_size() for t in gv.flatten(params).values())


def _prompts(cfg, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(8, cfg.text.vocab_size, (batch, length), generator=g).tolist()


def time_generate(params, cfg, batch: int, args: BenchDecode, compile: bool) -> tuple[float, float, float]:
    """Tokens/s of one whole ``generate`` call (after a warm-up call of the same shapes), of its
    decoding alone (first token out to last, i.e. without prefill and graph capture), and the
    milliseconds to the first token (the prefill)."""
    prompts = _prompts(cfg, batch, args.prompt_len)
    gv.generate(params, cfg, prompts, max_new_tokens=args.new_tokens, compile=compile, reuse=args.reuse)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n, t_first = 0, None
    for step in gv.stream(params, cfg, prompts, max_new_tokens=args.new_tokens, compile=compile, reuse=args.reuse):
        n += sum(t is not None for t in step)
        if t_first is None:
            t_first = time.perf_counter()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    return n / (t1 - t0), (n - batch) / (t1 - t_first), 1e3 * (t_first - t0)


def profile_decode(params, cfg, batch: int, compile: bool, slots: int = 512) -> dict:
    """GPU time of one captured decode step by kernel category, and of the LM head matmul alone.

    The step is the one ``generate`` builds (its decode session, under ``torch.no_grad`` as
    generation runs, with the same op choices and launch options), at slot ``slots // 2``."""
    from bench_train import profile_step

    from ghostvis.core import decoder
    from ghostvis.infer.generate import decode_session
    from ghostvis.infer.kv_cache import key_valid

    device = "cuda"
    with torch.no_grad():
        session = decode_session(params, cfg, batch, slots, use_graph=True, compile=compile)
        session["valid"].copy_(key_valid(session["pad"], slots))
        step = session["step"]
        tokens = torch.randint(8, 100, (batch,), device=device)
        for _ in range(3):
            step(tokens, slots // 2)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            step(tokens, slots // 2)
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / 100
        prof = profile_step(lambda: step(tokens, slots // 2), steps=20)
    h = torch.randn(batch, cfg.text.dim, device=device, dtype=torch.bfloat16)
    head = decoder.lm_head_weight(params["text"])
    from bench import bench_graph_ms

    head_ms = bench_graph_ms(lambda: decoder.project(h, head))
    return {"step_ms_graph_replay": replay_ms, "lm_head_ms": head_ms, "slots": slots, **prof}


# ----------------------------------------------------------------------------- plain compiled decoder


class PlainDecoder(torch.nn.Module):
    """A static-KV-cache Llama decoder of the same shapes: stacked qkv / gate-up weights, SDPA, compiled."""

    def __init__(self, c, batch: int, slots: int):
        super().__init__()
        self.c = c
        nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.embed = torch.nn.Embedding(c.vocab_size, c.dim)
        self.wqkv = torch.nn.ModuleList(lin(c.dim, nq + 2 * nk) for _ in range(c.n_layers))
        self.wo = torch.nn.ModuleList(lin(nq, c.dim) for _ in range(c.n_layers))
        self.w13 = torch.nn.ModuleList(lin(c.dim, 2 * c.ffn_dim) for _ in range(c.n_layers))
        self.w2 = torch.nn.ModuleList(lin(c.ffn_dim, c.dim) for _ in range(c.n_layers))
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(c.dim, eps=c.norm_eps) for _ in range(2 * c.n_layers + 1))
        self.head = lin(c.dim, c.vocab_size)
        shape = (c.n_layers, batch, c.n_kv_heads, slots, c.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        f = torch.outer(torch.arange(slots).float(), inv)
        self.register_buffer("cos", torch.cat((f, f), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((f, f), -1).sin(), persistent=False)

    def forward(self, tokens, pos):  # tokens [B, T], pos [T]
        c, (b, t) = self.c, tokens.shape
        nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        cos, sin = self.cos[pos].to(torch.bfloat16), self.sin[pos].to(torch.bfloat16)
        rot = lambda z: torch.cat((-z[..., c.head_dim // 2:], z[..., : c.head_dim // 2]), -1)  # noqa: E731
        mask = torch.arange(self.k_cache.shape[3], device=tokens.device)[None, :] <= pos[:, None]
        x = self.embed(tokens)
        for i in range(c.n_layers):
            q, k, v = self.wqkv[i](self.norms[2 * i](x)).split([nq, nk, nk], -1)
            q = q.view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
            k = k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2))
            o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask, enable_gqa=True)
            x = x + self.wo[i](o.transpose(1, 2).reshape(b, t, nq))
            g, u = self.w13[i](self.norms[2 * i + 1](x)).chunk(2, -1)
            x = x + self.w2[i](F.silu(g) * u)
        return self.head(self.norms[-1](x)[:, -1]).float()


def time_plain(cfg, batch: int, args: BenchDecode) -> float:
    """Greedy tokens/s of :class:`PlainDecoder` with its step compiled in reduce-overhead mode (CUDA graphs)."""
    slots = args.prompt_len + args.new_tokens
    model = PlainDecoder(cfg.text, batch, slots).to("cuda", torch.bfloat16)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    prompt = torch.tensor(_prompts(cfg, batch, args.prompt_len), device="cuda")

    def run(n_new: int) -> int:
        with torch.no_grad():
            logits = model(prompt, torch.arange(args.prompt_len, device="cuda"))
            tok = logits.argmax(-1)
            for i in range(n_new - 1):
                logits = step(tok[:, None], torch.tensor([args.prompt_len + i], device="cuda"))
                tok = logits.argmax(-1)
        return n_new * batch

    run(args.new_tokens)  # warm-up: compile and capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = run(args.new_tokens)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def time_hf(cfg, batch: int, args: BenchDecode) -> float:
    from bench_train import hf_llama

    model = hf_llama(cfg.text).to("cuda", torch.bfloat16).eval()
    ids = torch.tensor(_prompts(cfg, batch, args.prompt_len), device="cuda")
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
        raise SystemExit("bench decode needs a CUDA device")
    from bench_train import write_json

    generate_mod = importlib.import_module("ghostvis.infer.generate")  # the package's `generate` is the function

    cfg = gv.presets.get(args.preset)
    params = gv.init(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    quantized = {}  # lm_head quantized too -> tree
    from bench import copy_bandwidth_gbs

    bw = copy_bandwidth_gbs("cuda") * 1e9  # bytes/s, read + written
    results = []
    for row in args.rows:
        int8, head = row.startswith("int8"), row == "int8-head"
        if int8 and head not in quantized:
            quantized[head] = gv.quantize(params, "int8", lm_head=head)
        p = quantized[head] if int8 else params
        compile = row in ("bf16", "int8", "int8-head", "bf16-inductor", "bf16-unfused", "bf16-no-pdl", "int8-no-pdl",
                          "bf16-norm-apart", "int8-norm-apart", "bf16-rope-apart", "int8-rope-apart")
        generate_mod.DECODE_PDL = not row.endswith("-no-pdl")
        generate_mod.release_decode_session()
        generate_mod.COMPILED_DECODE_OPS.clear()
        if row.endswith("-rope-apart"):
            generate_mod.COMPILED_DECODE_OPS.update(add_rms_norm_qkv_cache="unfused")
        if row.endswith("-norm-apart"):
            generate_mod.COMPILED_DECODE_OPS.update(add_rms_norm_linear="unfused", add_rms_norm_qkv_cache="unfused")
        if row == "bf16-unfused":  # the step as it was before the decode kernels
            generate_mod.COMPILED_DECODE_OPS.update(add_rms_norm_linear="unfused", add_rms_norm_qkv_cache="unfused",
                                                    attention="sdpa",
                                                    add_rms_norm="reference", rope_into_cache="reference",
                                                    linear="reference")
        if row == "bf16-inductor":  # the elementwise ops and attention as plain torch, for inductor to fuse
            generate_mod.COMPILED_DECODE_OPS.update(add_rms_norm_linear="unfused",
                                                    add_rms_norm_qkv_cache="unfused", rms_norm="reference",
                                                    swiglu="reference", rope="reference",
                                                    attention="reference", add_rms_norm="reference",
                                                    rope_into_cache="reference")
        torch._dynamo.reset()
        roof = bw / param_bytes(p)
        for b in args.batches:
            r = {"impl": row, "preset": args.preset, "batch": b, "roofline_tok_s_per_seq": roof,
                 "device": torch.cuda.get_device_name(), "copy_tb_s": bw / 1e12}
            try:
                if row == "hf":
                    r["tokens_per_s"] = time_hf(cfg, b, args)
                elif row == "plain":
                    r["tokens_per_s"] = time_plain(cfg, b, args)
                else:
                    r["tokens_per_s"], r["decode_tokens_per_s"], r["first_token_ms"] = time_generate(
                        p, cfg, b, args, compile)
                    if args.profile:
                        r["profile"] = profile_decode(p, cfg, b, compile)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            results.append(r)
            print(json.dumps(r), flush=True)
    generate_mod.DECODE_PDL = True
    print(f"\n{args.preset} decode, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'impl':<14} {'batch':>5} {'tok/s':>9} {'decode tok/s':>13} {'% roofline (per seq)':>21} "
          f"{'step ms':>8} {'LM head ms':>10} {'1st token ms':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<14} {r['batch']:>5} {r['error']}")
            continue
        per_seq = r["tokens_per_s"] / r["batch"]
        prof = r.get("profile", {})
        step = f"{prof['step_ms_graph_replay']:.3f}" if prof else "-"
        head = f"{prof['lm_head_ms']:.3f}" if prof else "-"
        dec = r.get("decode_tokens_per_s")
        dec = f"{dec:.0f}" if dec else "-"
        first = f"{r['first_token_ms']:.1f}" if "first_token_ms" in r else "-"
        print(f"{r['impl']:<14} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {dec:>13} "
              f"{100 * per_seq / r['roofline_tok_s_per_seq']:>20.1f}% {step:>8} {head:>10} {first:>12}")
    for r in results:
        if r.get("profile"):
            cats = r["profile"]["by_category_ms"]
            print(f"{r['impl']} b{r['batch']} step by category (ms): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])))
    write_json(args.out, f"decode_{args.preset}.json", results)
    return results
