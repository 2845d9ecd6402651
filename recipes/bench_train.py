"""Training throughput: GhostVis's optimized and reference paths beside two baselines, same shapes, one process.

    python recipes/bench.py train --preset d20 --batch 16 --seq 2048 [--profile]
    python recipes/bench.py vlm --preset d12-vlm

``train`` rows: GhostVis optimized (the default path: kernels + ``torch.compile`` of the
whole gradient function + fused AdamW), its variants (which elementwise ops inductor
sees, stacked projections), GhostVis reference (plain-torch ops, eager), a plain
~100-line PyTorch Llama (nn.Modules, torch.compile, SDPA, fused AdamW, chunked loss)
and HF ``LlamaForCausalLM`` compiled with fused AdamW. MFU counts
``gv.flops_per_token`` (6 * non-embedding params + 12 * layers * dim * seq) against
989 TFLOP/s (H100 bf16 dense). ``--profile`` adds, per row, GPU kernel time per
category (matmul, attention, norms/elementwise, loss, optimizer, other) from
``torch.profiler`` over two steps. ``vlm`` times a multimodal SFT step (images/s and
tokens/s). Each prints a table and writes JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import ghostvis as gv
from ghostvis.core.decoder import block as decoder_block
from ghostvis.core.decoder import fuse_projections
from ghostvis.train.optim import AdamW
from ghostvis.train.step import compile as compile_transform
from ghostvis.train.step import StepResult, graphed
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
    """Which implementations to run: the names in ``ROWS`` in recipes/bench_train.py, plus plain, hf,
    ghostvis-trainer and ghostvis-trainer-graphs."""
    profile: bool = False
    """Also profile two steps per row and print GPU time per kernel category."""
    out: str = "bench_out"
    """Folder for ``train.json`` (created)."""


# ----------------------------------------------------------------------------- timing


def time_steps(step: Callable[[], torch.Tensor], steps: int, warmup: int) -> tuple[float, float]:
    """Seconds per step (median over the timed steps) and the last loss.

    The steps are queued back to back as a training loop runs them: one CUDA event
    between consecutive steps and a single synchronisation at the end, so the host
    launching step ``i + 1`` overlaps the GPU running step ``i`` and no step pays for an
    idle GPU at its start. (Synchronising after every step would count that host time.)
    """
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        loss = step()
        events[i + 1].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:]))
    return times[len(times) // 2], float(loss.loss if isinstance(loss, StepResult) else loss)


CATEGORIES = [  # first match wins; matched against the lower-cased kernel name
    ("attention", r"flash|fmha|cudnn|attention|sdpa|flex"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("loss", r"cross_entropy|log_softmax|nll|_ce_|logsumexp"),
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|cublas|triton_tem|_mm_|matmul|splitk"),
    ("norms/elementwise", r"triton|rms|swiglu|rope|elementwise|vectorized|reduce|silu|mul|add"),
]


def categorize(name: str) -> str:
    """The profile category of a CUDA kernel name."""
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def profile_step(step: Callable[[], torch.Tensor], steps: int = 2) -> dict:
    """GPU kernel milliseconds per step by category, plus the step's wall time and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.time_range.elapsed_us() / 1e3 / steps
        by_cat[categorize(evt.name)] = by_cat.get(categorize(evt.name), 0.0) + ms
        by_name[evt.name] = by_name.get(evt.name, 0.0) + ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:40]
    return {"wall_ms": 1e3 * wall, "kernel_ms": sum(by_cat.values()), "by_category_ms": by_cat,
            "top_kernels_ms": [(n[:90], round(t, 3)) for n, t in top]}


def random_batch(cfg: gv.ModelConfig, b: int, t: int, device="cuda") -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.text.vocab_size, (b, t + 1), generator=g).to(device)
    return {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
            "positions": None, "doc_ids": None, "images": None}


# ----------------------------------------------------------------------------- GhostVis

# elementwise ops handed to inductor as plain torch (it fuses them with their neighbours)
INDUCTOR_OPS = {"rms_norm": "reference", "add_rms_norm": "reference", "swiglu": "reference", "rope": "reference",
                "qkv_rope": "reference", "swiglu_stacked": "reference", "swiglu_mlp": "reference"}

# name -> (compiled, which ops, weight layout[, torch.compile mode]): "stacked" stacks q/k/v and
# gate/up inside the loss (the default, ``value_and_grad(stacked=True)``), "separate" runs one matmul
# per matrix, "stored" keeps the parameters themselves stacked (``decoder.fuse_projections``),
# "stacked-block-loop" runs ``decoder.block`` per layer (separate residual adds, not fused into the norms);
# "max-autotune-no-cudagraphs" lets inductor time Triton GEMM templates against cuBLAS per shape;
# "fused-mlp" forces the MLP op with SwiGLU in its matmuls' epilogues (``ghostvis.ops.mlp``);
# "reduce-overhead" replays the compiled gradient function as a CUDA graph (``train.step.graphed``)
ROWS = {
    "ghostvis": (True, "default", "stacked"),
    "ghostvis-separate": (True, "default", "separate"),
    "ghostvis-stored": (True, "default", "stored"),
    "ghostvis-triton": (True, "triton", "stacked"),
    "ghostvis-inductor": (True, "inductor", "stacked"),
    "ghostvis-inductor-separate": (True, "inductor", "separate"),
    "ghostvis-reference": (False, "reference", "separate"),
    "ghostvis-block-loop": (True, "default", "stacked-block-loop"),
    "ghostvis-autotune": (True, "default", "stacked", "max-autotune-no-cudagraphs"),
    "ghostvis-graphs": (True, "default", "stacked", "reduce-overhead"),
    "ghostvis-fused-mlp": (True, "fused-mlp", "stacked"),
    "ghostvis-fused-mlp-gate-up": (True, "fused-mlp-gate-up", "stacked"),
}


def ops_context(which: str):
    """The dispatch setting a row runs under."""
    if which == "reference":
        return gv.ops.use(all="reference")
    if which == "inductor":
        return gv.ops.use(**INDUCTOR_OPS)
    if which == "triton":
        return gv.ops.use(rms_norm="triton", add_rms_norm="triton", swiglu="triton", rope="triton",
                          qkv_rope="triton", swiglu_stacked="triton")
    if which == "fused-mlp":  # the MLP as one op, SwiGLU's backward in the down projection's matmul
        return gv.ops.use(swiglu_mlp="epilogue")
    if which == "fused-mlp-gate-up":  # and SwiGLU's forward in the gate/up matmul's epilogue
        return _both(gv.ops.use(swiglu_mlp="epilogue"), gv.ops.mlp.fuse_gate_up())
    return gv.ops.use()


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def ghostvis_step(cfg: gv.ModelConfig, batch: dict, *, compiled: bool, which: str, layout: str = "stacked",
                  mode: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Callable:
    """A closure running one full training step (grad + AdamW update) on ``batch``; returns the loss.

    ``layout``: ``stacked`` (q/k/v and gate/up stacked inside the loss), ``separate``,
    ``stored`` (the parameters themselves stacked) or ``stacked-block-loop`` (stacked, with the
    residual adds left out of the norms). ``mode``: the ``torch.compile`` mode.
    """
    if layout not in ("stacked", "separate", "stored", "stacked-block-loop"):
        raise ValueError(f"layout must be stacked, separate, stored or stacked-block-loop, got {layout!r}")
    params = gv.init(cfg, seed=0, device=batch["tokens"].device, dtype=dtype)
    if layout == "stored":
        params = {**params, "text": fuse_projections(params["text"])}
    params = gv.flatten(params)
    opt = AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    state = opt.init(params)
    grad_fn = value_and_grad(cfg, {}, select=False, stacked=layout.startswith("stacked"),
                             block_fn=decoder_block if layout == "stacked-block-loop" else None)
    if compiled:
        # reduce-overhead: the training loop's --train.cuda-graphs (parameters read in place)
        grad_fn = graphed(grad_fn, {}) if mode == "reduce-overhead" else compile_transform(grad_fn, mode=mode)
    normalizer = (batch["targets"] != -100).sum().float()

    def step():
        with ops_context(which):
            grads, loss = grad_fn(params, batch, normalizer)
        opt.update(params, grads, state, 0)
        return loss

    return step


def trainer_step(cfg: gv.ModelConfig, batch: dict, dtype: torch.dtype = torch.bfloat16, *,
                 cuda_graphs: bool = False) -> Callable:
    """The training loop's own step (``train.step.make_train_step``: compiled gradients, gradient
    clipping, the non-finite guard, AdamW) on ``batch``, each step's numbers read once the next is
    queued, as the loop reads them; ``cuda_graphs`` replays the gradient function as a CUDA graph
    (``--train.cuda-graphs``)."""
    from ghostvis.train.step import make_train_step

    params = gv.flatten(gv.init(cfg, seed=0, device=batch["tokens"].device, dtype=dtype))
    opt = AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    state = opt.init(params)
    train_step = make_train_step(cfg, opt, {}, grad_clip=1.0, compile_grad=True, cuda_graphs=cuda_graphs)
    count, queued = [0], []

    def step():
        nonlocal params, state
        params, state, result = train_step(params, state, [batch], count[0])
        count[0] += 1
        if queued:
            queued.pop().loss  # read the step before: the loop reads step n once step n + 1 is queued
        queued.append(result)
        return result

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


def hf_llama(t: gv.TextConfig, **overrides) -> nn.Module:
    """A randomly initialised HF ``LlamaForCausalLM`` of the decoder's shapes (the project's own HF config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ghostvis.core.hf import text_config_to_hf

    return LlamaForCausalLM(LlamaConfig(**(text_config_to_hf(t) | overrides)))


def hf_step(cfg: gv.ModelConfig, batch: dict) -> Callable:
    model = hf_llama(cfg.text, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    model = torch.compile(model)
    labels = batch["tokens"]  # HF shifts labels inside its loss: position t predicts labels[t+1]
    return module_step(model, batch, lambda m, b: m(input_ids=b["tokens"], labels=labels).loss)


# ----------------------------------------------------------------------------- runner


def run_rows(builders: dict[str, Callable[[], Callable]], names: list[str], steps: int, warmup: int,
             profile: bool, extra: Callable[[float], dict]) -> list[dict]:
    """Build and time each named step (fresh memory stats and compile caches per row); errors are rows too."""
    results = []
    for name in names:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
        row = {"impl": name}
        try:
            if name not in builders:
                raise KeyError(f"unknown row {name!r}; choose from {sorted(builders)}")
            t0 = time.perf_counter()
            step = builders[name]()
            sec, loss = time_steps(step, steps, warmup)
            row |= {"sec_per_step": sec, **extra(sec), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "loss": loss, "wall_s": time.perf_counter() - t0}
            if profile:
                row["profile"] = profile_step(step)
        except torch.cuda.OutOfMemoryError:
            row |= {"error": "out of memory"}
        except Exception as e:  # a row that fails is reported, not fatal
            row |= {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        step = None
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def print_profiles(results: list[dict]) -> None:
    """One line per row: ms per step by category, and the share of the step it is."""
    cats = ["matmul", "attention", "norms/elementwise", "loss", "optimizer", "other"]
    print(f"\n{'GPU ms/step':<24}" + "".join(f"{c:>19}" for c in cats) + f"{'kernels':>10}{'wall':>9}")
    for r in results:
        p = r.get("profile")
        if not p:
            continue
        ms = [p["by_category_ms"].get(c, 0.0) for c in cats]
        cells = "".join(f"{m:>10.1f} ({100 * m / p['wall_ms']:>4.1f}%)" for m in ms)
        print(f"{r['impl']:<24}{cells}{p['kernel_ms']:>10.1f}{p['wall_ms']:>9.1f}")


def write_json(out: str, name: str, payload) -> None:
    import os

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(payload, f, indent=1)


def main(args: BenchTrain) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("bench train needs a CUDA device")
    cfg = gv.presets.get(args.preset)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_seq_len=max(cfg.text.max_seq_len, args.seq)))
    batch = random_batch(cfg, args.batch, args.seq)
    fpt = gv.flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    builders = {name: (lambda spec=spec: ghostvis_step(cfg, batch, compiled=spec[0], which=spec[1], layout=spec[2],
                                                       mode=spec[3] if len(spec) > 3 else None))
                for name, spec in ROWS.items()}
    builders |= {"plain": lambda: plain_step(cfg, batch), "hf": lambda: hf_step(cfg, batch),
                 "ghostvis-trainer": lambda: trainer_step(cfg, batch),
                 "ghostvis-trainer-graphs": lambda: trainer_step(cfg, batch, cuda_graphs=True)}
    results = run_rows(builders, args.rows, args.steps, args.warmup, args.profile,
                       lambda sec: {"tokens_per_s": tokens / sec, "mfu": fpt * tokens / sec / PEAK_FLOPS})
    for r in results:
        r |= {"preset": args.preset, "batch": args.batch, "seq": args.seq, "device": torch.cuda.get_device_name()}
    print(f"\n{args.preset}, {args.batch} x {args.seq} tokens/step, bf16, {torch.cuda.get_device_name()}")
    print(f"{'impl':<24} {'tok/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<24} {r['error']}")
        else:
            print(f"{r['impl']:<24} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>6.1f}% {r['peak_gib']:>9.1f}")
    print_profiles(results)
    write_json(args.out, f"train_{args.preset}.json", results)
    return results


# ----------------------------------------------------------------------------- vlm


@dataclass
class BenchVLM:
    """Images/s and tokens/s of a multimodal SFT step (vision encoder + connector + decoder, all trained)."""

    preset: str = "d12-vlm"
    """VLM preset (d12-vlm: SigLIP-B/16 at 224 px, 196 image tokens, d12 decoder)."""
    batch: int = 16
    """Rows per step, one image each."""
    seq: int = 1024
    """Tokens per row (image placeholders included)."""
    steps: int = 10
    """Timed steps."""
    warmup: int = 3
    """Untimed steps first."""
    rows: list[str] = field(default_factory=lambda: ["ghostvis", "ghostvis-eager"])
    """ghostvis (compiled), ghostvis-graphs (compiled, replayed as a CUDA graph), ghostvis-trainer (the
    training loop's step: clipping, the non-finite guard, its numbers read a step late),
    ghostvis-trainer-graphs (that step with --train.cuda-graphs), ghostvis-separate (compiled,
    unstacked q/k/v and gate/up), ghostvis-eager (kernels, no compile), ghostvis-reference (plain-torch
    ops, eager)."""
    profile: bool = False
    """Also print GPU time per kernel category."""
    out: str = "bench_out"
    """Folder for ``vlm.json``."""


def vlm_batch(cfg: gv.ModelConfig, b: int, t: int, device="cuda") -> dict:
    """Random rows whose first ``num_image_tokens`` positions are one image's placeholders (unsupervised)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n = cfg.num_image_tokens
    tokens = torch.randint(8, cfg.text.vocab_size, (b, t + 1), generator=g)
    tokens[:, :n] = cfg.image_token_id
    targets = tokens[:, 1:].clone()
    targets[:, : n - 1] = -100
    side = cfg.vision.image_size
    images = torch.rand(b, 3, side, side, generator=g) * 2 - 1
    return {"tokens": tokens[:, :-1].contiguous().to(device), "targets": targets.to(device), "positions": None,
            "doc_ids": None, "images": images.to(device, torch.bfloat16 if device != "cpu" else torch.float32)}


def vlm(args: BenchVLM) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("bench vlm needs a CUDA device")
    cfg = gv.presets.get(args.preset)
    if not cfg.is_vlm:
        raise SystemExit(f"preset {args.preset!r} has no vision encoder")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, max_seq_len=max(cfg.text.max_seq_len, args.seq)))
    batch = vlm_batch(cfg, args.batch, args.seq)
    builders = {"ghostvis": lambda: ghostvis_step(cfg, batch, compiled=True, which="default"),
                "ghostvis-separate": lambda: ghostvis_step(cfg, batch, compiled=True, which="default",
                                                           layout="separate"),
                "ghostvis-graphs": lambda: ghostvis_step(cfg, batch, compiled=True, which="default",
                                                         mode="reduce-overhead"),
                "ghostvis-trainer": lambda: trainer_step(cfg, batch),
                "ghostvis-trainer-graphs": lambda: trainer_step(cfg, batch, cuda_graphs=True),
                "ghostvis-eager": lambda: ghostvis_step(cfg, batch, compiled=False, which="default"),
                "ghostvis-reference": lambda: ghostvis_step(cfg, batch, compiled=False, which="reference",
                                                            layout="separate")}
    tokens = args.batch * args.seq
    results = run_rows(builders, args.rows, args.steps, args.warmup, args.profile,
                       lambda sec: {"images_per_s": args.batch / sec, "tokens_per_s": tokens / sec})
    print(f"\n{args.preset}, {args.batch} rows x {args.seq} tokens, 1 image of {cfg.vision.image_size} px "
          f"({cfg.num_image_tokens} tokens) per row, bf16, {torch.cuda.get_device_name()}")
    print(f"{'impl':<24} {'images/s':>9} {'tok/s':>10} {'ms/step':>8} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<24} {r['error']}")
        else:
            print(f"{r['impl']:<24} {r['images_per_s']:>9.0f} {r['tokens_per_s']:>10.0f} "
                  f"{1e3 * r['sec_per_step']:>8.1f} {r['peak_gib']:>9.1f}")
    print_profiles(results)
    write_json(args.out, "vlm.json", results)
    return results
