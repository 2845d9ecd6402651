"""Scaling benchmarks: data parallelism, ring attention, long context, remat and packing.

One subcommand each; every one prints a short table and writes JSON into ``--out DIR``::

    torchrun --nproc_per_node=4 recipes/bench_scale.py dp --preset d20 --batch 16 --seq 2048 --out DIR
    python recipes/bench_scale.py dp-report --out DIR        # scaling efficiency from DIR/dp_<N>.json
    torchrun --nproc_per_node=4 recipes/bench_scale.py ring --seq 32768 --out DIR
    torchrun --nproc_per_node=4 recipes/bench_scale.py context --seq 32768 --out DIR
    python recipes/bench_scale.py remat --preset d20 --out DIR
    python recipes/bench_scale.py packing --preset d12 --out DIR

``dp``: tokens/s per GPU and in total, step time and peak memory of the train step with
:class:`ghostvis.train.distributed.DataParallel` over every rank (each rank its own random rows).
``dp-report``: (tokens/s per GPU at N) / (tokens/s at 1) for every ``dp_<N>.json`` found.
``ring``: ring attention on each rank's zigzag shard against single-device attention over the
whole sequence (outputs and dq/dk/dv, relative error in float32), and the time of each.
``context``: training on one long sequence split over all ranks (context parallelism: ring
attention); with one process the same config without it ("out of memory" if it does not fit).
``remat``: peak memory and step time with activation checkpointing off and per policy, then the
longest sequence (batch 1) that trains one step with and without it.
``packing``: useful (supervised) tokens/s of SFT-like documents, padded one per row to the
batch's longest vs packed into rows (attention kept inside documents).

The same code runs on CPU with tiny shapes (``--preset tiny``; float32, gloo, eager) and on
CUDA (NCCL, bfloat16 params, the default op dispatch -- Triton kernels, SDPA/cuDNN, FlexAttention
-- and the ``torch.compile``d gradient function, as the training recipes use).
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import inspect
import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ghostvis as gv  # noqa: E402
from ghostvis import ops  # noqa: E402
from ghostvis.ops import ring  # noqa: E402
from ghostvis.train import distributed  # noqa: E402
from ghostvis.train.loop import context_shard  # noqa: E402
from ghostvis.train.optim import AdamW  # noqa: E402
from ghostvis.train.packing import IGNORE, Sample, best_fit_decreasing, collate_rows  # noqa: E402
from ghostvis.train.step import make_train_step  # noqa: E402

PEAK_FLOPS = 989e12  # H100 bf16 dense, the MFU denominator used across the project
GiB = 2**30
DType = Literal["auto", "float32", "bfloat16"]


# ----------------------------------------------------------------------------- shared helpers


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def resolve_compile(flag: Optional[bool], device: str) -> bool:
    return device.startswith("cuda") if flag is None else flag


def model_config(preset: str, seq: int) -> gv.ModelConfig:
    """The text-only preset with a context of at least ``seq``."""
    cfg = gv.presets.get(preset)
    text = dataclasses.replace(cfg.text, max_seq_len=max(cfg.text.max_seq_len, seq))
    return gv.ModelConfig(text=text, name=cfg.name)


def init_params(cfg: gv.ModelConfig, device: str, dtype: torch.dtype) -> dict:
    return gv.flatten(gv.init(cfg, seed=0, device=device, dtype=dtype))


def random_batch(cfg: gv.ModelConfig, b: int, t: int, device: str, seed: int, positions: bool = False) -> dict:
    """Random tokens as a training batch (targets = next token); ``positions`` adds explicit ``0..t-1``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.text.vocab_size, (b, t + 1), generator=g)
    pos = torch.arange(t).expand(b, t).contiguous().to(device) if positions else None
    return {"tokens": tokens[:, :-1].contiguous().to(device), "targets": tokens[:, 1:].contiguous().to(device),
            "positions": pos, "doc_ids": None, "images": None}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    """Free what can be freed and restart the peak-memory counter."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / GiB if device.startswith("cuda") else None


def time_calls(fn: Callable[[], object], steps: int, warmup: int, device: str) -> tuple[list[float], object]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones (CUDA events, else perf_counter)."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return times, out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else math.nan


def reduce_max(values: list[float], device: str) -> list[float]:
    """Element-wise maximum over ranks (unchanged without a process group)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if not device.startswith("cuda") else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(x) for x in t.tolist()]


def fresh_compile_state(compiled: bool) -> None:
    """Forget earlier compilations (and their dynamic-shape decisions) so each config compiles on its own."""
    if compiled:
        torch._dynamo.reset()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def write_json(out: str, name: str, record: dict) -> Path:
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def setup_logging(main: bool) -> None:
    """Rank 0 logs which backend each op takes (the dispatch seam logs once per op)."""
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(name)s: %(message)s")


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def parse_extra(pairs: list[str]) -> dict:
    """``["overlap=True", "bucket_mb=50"]`` -> ``{"overlap": True, "bucket_mb": 50}``."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--extra takes KEY=VALUE pairs, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def split_step_kwargs(extra: dict) -> tuple[dict, dict]:
    """Route each option to ``DataParallel(...)`` or ``make_train_step(...)``, whichever takes it."""
    dp_params = inspect.signature(distributed.DataParallel).parameters
    step_params = inspect.signature(make_train_step).parameters
    dp_kw, step_kw = {}, {}
    for k, v in extra.items():
        if k in dp_params:
            dp_kw[k] = v
        elif k in step_params:
            step_kw[k] = v
        else:
            raise SystemExit(f"option {k!r} is taken by neither DataParallel ({sorted(dp_params)}) nor "
                             f"make_train_step ({sorted(step_params)})")
    return dp_kw, step_kw


# ----------------------------------------------------------------------------- dp


@dataclass
class Dp:
    """Data-parallel throughput of the train step over every rank (launch with torchrun)."""

    preset: str = "d20"
    """Text preset (e.g. d12, d20; tiny on CPU)."""
    batch: int = 16
    """Rows per GPU per step."""
    seq: int = 2048
    """Tokens per row."""
    steps: int = 10
    """Timed steps."""
    warmup: int = 3
    """Untimed steps first (compilation happens here)."""
    compile: Optional[bool] = None
    """torch.compile the gradient function (default: on CUDA)."""
    dtype: DType = "auto"
    """Parameter dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
    bucket_mb: float = 25.0
    """All-reduce bucket size in MiB."""
    overlap: Optional[bool] = None
    """Overlap the gradient all-reduce with the backward, if DataParallel offers it (None: its default)."""
    shard_optimizer: bool = False
    """Keep optimizer state only for this rank's share (distributed.ShardedOptimizer, where it exists)."""
    extra: list[str] = field(default_factory=list)
    """More KEY=VALUE options for DataParallel or make_train_step (only ones their signatures take)."""
    out: str = "scale_out"
    """Folder for dp_<N>.json."""


def run_dp(a: Dp) -> dict:
    di = distributed.init()
    dev, world = di.device, di.world_size
    setup_logging(di.is_main)
    dtype, compiled = resolve_dtype(a.dtype, dev), resolve_compile(a.compile, dev)
    extra = parse_extra(a.extra)
    dp_params = inspect.signature(distributed.DataParallel).parameters
    if a.overlap is not None:
        if "overlap" in dp_params:
            extra["overlap"] = a.overlap
        elif di.is_main:
            print("note: DataParallel has no 'overlap' option here; --overlap ignored", flush=True)
    if "bucket_mb" in dp_params:
        extra.setdefault("bucket_mb", a.bucket_mb)
    dp_kw, step_kw = split_step_kwargs(extra)

    cfg = model_config(a.preset, a.seq)
    params = init_params(cfg, dev, dtype)
    opt = AdamW(lr=1e-4, betas=(0.9, 0.95))
    sharded = a.shard_optimizer and world > 1 and hasattr(distributed, "ShardedOptimizer")
    if a.shard_optimizer and not sharded and di.is_main:
        print("note: optimizer state not sharded (one rank, or no distributed.ShardedOptimizer here)", flush=True)
    if sharded:
        opt = distributed.ShardedOptimizer(opt, di.rank, world)
    state = opt.init(params)
    reducer = distributed.DataParallel(**dp_kw) if world > 1 else None
    step_fn = make_train_step(cfg, opt, {}, compile_grad=compiled, autocast=None, reducer=reducer, **step_kw)
    batch = random_batch(cfg, a.batch, a.seq, dev, seed=1000 + di.rank)
    counter = [0]

    def step():
        nonlocal params, state
        params, state, res = step_fn(params, state, [batch], counter[0])
        counter[0] += 1
        return res

    reset_memory(dev)
    distributed.barrier()
    t0 = time.perf_counter()
    times, res = time_calls(step, a.steps, a.warmup, dev)
    wall = time.perf_counter() - t0
    step_s, peak = reduce_max([median(times), peak_gib(dev) or 0.0], dev)
    tok_gpu = a.batch * a.seq / step_s
    fpt = gv.flops_per_token(cfg, a.seq)
    rec = {"bench": "dp", "world": world, "preset": a.preset, "batch_per_gpu": a.batch, "seq": a.seq,
           "steps": a.steps, "warmup": a.warmup, "device": device_name(dev), "dtype": str(dtype).split(".")[-1],
           "compile": compiled, "dp_kwargs": dp_kw, "step_kwargs": step_kw, "shard_optimizer": sharded,
           "buckets_launched_in_backward": getattr(reducer, "launched_in_backward", None),
           "step_s": step_s, "tokens_per_s_per_gpu": tok_gpu, "tokens_per_s": tok_gpu * world,
           "mfu": fpt * tok_gpu / PEAK_FLOPS if dev.startswith("cuda") else None,
           "peak_gib": peak if dev.startswith("cuda") else None, "loss": res.loss,
           "loss_finite": math.isfinite(res.loss), "wall_s": wall}
    if di.is_main:
        write_json(a.out, f"dp_{world}.json", rec)
        print(f"\ndp: {a.preset}, {a.batch} x {a.seq} tokens per GPU, {world} x {rec['device']}, "
              f"{rec['dtype']}, compile={compiled}, options {dp_kw | step_kw}, sharded optimizer={sharded}")
        print(f"{'GPUs':>4} {'step s':>8} {'tok/s/GPU':>11} {'tok/s':>11} {'MFU':>6} {'peak GiB':>9} {'loss':>7}")
        mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] else "-"
        print(f"{world:>4} {step_s:>8.3f} {tok_gpu:>11.0f} {tok_gpu * world:>11.0f} {mfu:>6} "
              f"{fmt(rec['peak_gib']):>9} {res.loss:>7.3f}", flush=True)
    distributed.shutdown()
    return rec


@dataclass
class DpReport:
    """Scaling efficiency from the dp_<N>.json files in --out: (tokens/s per GPU at N) / (at 1)."""

    out: str = "scale_out"
    """Folder holding dp_1.json, dp_2.json, dp_4.json, ..."""


def run_dp_report(a: DpReport) -> dict:
    found = {}
    for p in Path(a.out).glob("dp_*.json"):
        try:
            n = int(p.stem.split("_")[1])
        except (IndexError, ValueError):
            continue
        found[n] = json.loads(p.read_text())
    if 1 not in found:
        raise SystemExit(f"dp-report needs {a.out}/dp_1.json (the one-GPU baseline); found {sorted(found)}")
    base = found[1]["tokens_per_s_per_gpu"]
    rows = []
    for n in sorted(found):
        r = found[n]
        rows.append({"world": n, "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "tokens_per_s": r["tokens_per_s"],
                     "step_s": r["step_s"], "peak_gib": r.get("peak_gib"),
                     "efficiency": r["tokens_per_s_per_gpu"] / base})
    rec = {"bench": "dp-report", "preset": found[1].get("preset"), "seq": found[1].get("seq"),
           "batch_per_gpu": found[1].get("batch_per_gpu"), "rows": rows}
    write_json(a.out, "dp_report.json", rec)
    print(f"\ndp scaling: {rec['preset']}, {rec['batch_per_gpu']} x {rec['seq']} tokens per GPU")
    print(f"{'GPUs':>4} {'tok/s/GPU':>11} {'tok/s':>11} {'step s':>8} {'efficiency':>11}")
    for r in rows:
        print(f"{r['world']:>4} {r['tokens_per_s_per_gpu']:>11.0f} {r['tokens_per_s']:>11.0f} {r['step_s']:>8.3f} "
              f"{100 * r['efficiency']:>10.1f}%", flush=True)
    return rec


# ----------------------------------------------------------------------------- ring


@dataclass
class Ring:
    """Ring attention on each rank's zigzag shard vs single-device attention on the whole sequence (torchrun)."""

    seq: int = 32768
    """Sequence length (one sequence, B=1); must divide by 2 x ranks."""
    heads: int = 6
    """Query heads (d12: 6)."""
    kv_heads: int = 3
    """Key/value heads (d12: 3)."""
    head_dim: int = 128
    """Head dimension."""
    dtype: DType = "auto"
    """q/k/v dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
    iters: int = 3
    """Timed fwd+bwd calls of each."""
    warmup: int = 1
    """Untimed calls first."""
    tolerance: Optional[float] = None
    """Largest acceptable relative error (default: 2e-2 in bfloat16, 1e-4 in float32)."""
    seed: int = 0
    """The same on every rank, so every rank holds the same full tensors."""
    out: str = "scale_out"
    """Folder for ring_<N>.json."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_ring(a: Ring) -> dict:
    di = distributed.init()
    dev, world, rank = di.device, di.world_size, di.rank
    setup_logging(di.is_main)
    if world < 2:
        raise SystemExit("ring needs at least 2 ranks: torchrun --nproc_per_node=N recipes/bench_scale.py ring")
    dtype = resolve_dtype(a.dtype, dev)
    tol = a.tolerance if a.tolerance is not None else (2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4)
    b, t, hq, hk, d = 1, a.seq, a.heads, a.kv_heads, a.head_dim
    g = torch.Generator().manual_seed(a.seed)
    q, k, v, go = (torch.randn(b, h, t, d, generator=g).to(dev, dtype) for h in (hq, hk, hk, hq))
    for x in (q, k, v):
        x.requires_grad_()

    # the oracle: single-device attention over the whole sequence (SDPA/cuDNN on CUDA, the reference on CPU)
    def single():
        o = ops.attention(q, k, v, causal=True)
        return (o, *torch.autograd.grad(o, (q, k, v), go))

    ref = [x.detach() for x in single()]
    ref_shard = [ring.shard(x, world, rank) for x in ref]

    pos = ring.shard_positions(t, world, rank, device=dev)
    ql, kl, vl = (ring.shard(x.detach(), world, rank).requires_grad_() for x in (q, k, v))
    gol = ring.shard(go, world, rank)

    def ringed():
        o = ring.ring_attention(ql, kl, vl, pos, causal=True)
        return (o, *torch.autograd.grad(o, (ql, kl, vl), gol))

    got = [x.detach() for x in ringed()]
    names = ("out", "dq", "dk", "dv")
    errs = reduce_max([rel_err(x, y) for x, y in zip(got, ref_shard)], dev)
    del got, ref, ref_shard

    reset_memory(dev)
    distributed.barrier()
    ring_times, _ = time_calls(ringed, a.iters, a.warmup, dev)
    ring_peak = peak_gib(dev)
    reset_memory(dev)
    distributed.barrier()
    single_times, _ = time_calls(single, a.iters, a.warmup, dev)
    single_peak = peak_gib(dev)
    ring_ms, single_ms, rp, sp = reduce_max([1e3 * median(ring_times), 1e3 * median(single_times),
                                             ring_peak or 0.0, single_peak or 0.0], dev)
    rec = {"bench": "ring", "world": world, "seq": t, "heads": hq, "kv_heads": hk, "head_dim": d,
           "dtype": str(dtype).split(".")[-1], "device": device_name(dev), "layout": "zigzag",
           "oracle_backend": "default dispatch (sdpa on CUDA, reference on CPU)",
           "rel_err": dict(zip(names, errs)), "max_rel_err": max(errs), "tolerance": tol, "ok": max(errs) <= tol,
           "ring_fwd_bwd_ms": ring_ms, "single_fwd_bwd_ms": single_ms, "speedup_vs_single": single_ms / ring_ms,
           "ring_peak_gib": rp if dev.startswith("cuda") else None,
           "single_peak_gib": sp if dev.startswith("cuda") else None}
    if di.is_main:
        write_json(a.out, f"ring_{world}.json", rec)
        print(f"\nring attention: T={t}, Hq={hq}, Hkv={hk}, D={d}, {rec['dtype']}, {world} ranks x {rec['device']}")
        print(f"{'tensor':<6} {'max rel err':>12} {'target':>8}")
        for n, e in zip(names, errs):
            print(f"{n:<6} {e:>12.2e} {'<=' + format(tol, '.0e'):>8} {'ok' if e <= tol else 'FAIL'}")
        print(f"fwd+bwd: ring {ring_ms:.1f} ms/rank vs single device {single_ms:.1f} ms "
              f"({rec['speedup_vs_single']:.2f}x); peak GiB ring {fmt(rec['ring_peak_gib'])} "
              f"single {fmt(rec['single_peak_gib'])}", flush=True)
    distributed.shutdown()
    return rec


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """Long-context training: one sequence split over every rank (ring attention); one process: no split."""

    preset: str = "d12"
    """Text preset."""
    seq: int = 32768
    """Tokens in the sequence (batch 1); must divide by 2 x ranks."""
    steps: int = 3
    """Timed steps."""
    warmup: int = 1
    """Untimed steps first."""
    remat: bool = False
    """Activation checkpointing per decoder block."""
    remat_policy: Literal["full", "attention", "mlp", "selective"] = "full"
    """With --remat: what to recompute."""
    compile: Optional[bool] = None
    """torch.compile the gradient function (default: on CUDA)."""
    dtype: DType = "auto"
    """Parameter dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
    out: str = "scale_out"
    """Folder for context_<ranks>_<seq>[_remat].json."""


def run_context(a: Context) -> dict:
    di = distributed.init()
    dev, world, rank = di.device, di.world_size, di.rank
    setup_logging(di.is_main)
    dtype, compiled = resolve_dtype(a.dtype, dev), resolve_compile(a.compile, dev)
    cfg = model_config(a.preset, a.seq)
    rec = {"bench": "context", "world": world, "context_parallel": world > 1, "preset": a.preset, "seq": a.seq,
           "batch": 1, "remat": a.remat, "remat_policy": a.remat_policy if a.remat else None,
           "dtype": str(dtype).split(".")[-1], "compile": compiled, "device": device_name(dev),
           "steps": a.steps, "warmup": a.warmup}
    losses: list[float] = []
    try:
        params = init_params(cfg, dev, dtype)
        opt = AdamW(lr=1e-4, betas=(0.9, 0.95))
        state = opt.init(params)
        step_fn = make_train_step(cfg, opt, {}, remat_blocks=a.remat, remat_policy=a.remat_policy,
                                  compile_grad=compiled, autocast=None,
                                  reducer=distributed.DataParallel() if world > 1 else None)
        batch = random_batch(cfg, 1, a.seq, dev, seed=7, positions=True)  # the same sequence on every rank
        if world > 1:
            batch = context_shard(batch, world, rank)
            cp_pos = ring.shard_positions(a.seq, world, rank, device=dev)
        counter = [0]

        def step():
            nonlocal params, state
            if world > 1:
                with ring.context_parallel(None, cp_pos):
                    params, state, res = step_fn(params, state, [batch], counter[0])
            else:
                params, state, res = step_fn(params, state, [batch], counter[0])
            counter[0] += 1
            losses.append(res.loss)
            return res

        reset_memory(dev)
        distributed.barrier()
        times, res = time_calls(step, a.steps, a.warmup, dev)
        step_s, peak = reduce_max([median(times), peak_gib(dev) or 0.0], dev)
        rec |= {"step_s": step_s, "tokens_per_s": a.seq / step_s, "tokens_per_s_per_gpu": a.seq / step_s / world,
                "peak_gib": peak if dev.startswith("cuda") else None, "losses": losses,
                "losses_finite": all(math.isfinite(x) for x in losses), "error": None}
    except Exception as e:
        if not is_oom(e):
            raise
        rec |= {"error": "out of memory", "detail": str(e).splitlines()[0][:200], "losses": losses}
    params = state = step_fn = None
    reset_memory(dev)
    if di.is_main:
        name = f"context_{world}_{a.seq}{'_remat' if a.remat else ''}.json"
        write_json(a.out, name, rec)
        mode = f"context parallel over {world} ranks" if world > 1 else "one device, no context parallelism"
        print(f"\ncontext: {a.preset}, 1 x {a.seq} tokens, {mode}, remat={a.remat}, {rec['dtype']}, "
              f"compile={compiled}, {rec['device']}")
        print(f"{'GPUs':>4} {'step s':>8} {'tok/s':>9} {'tok/s/GPU':>10} {'peak GiB':>9}  losses")
        if rec["error"]:
            print(f"{world:>4} {rec['error']}", flush=True)
        else:
            print(f"{world:>4} {rec['step_s']:>8.3f} {rec['tokens_per_s']:>9.0f} {rec['tokens_per_s_per_gpu']:>10.0f} "
                  f"{fmt(rec['peak_gib']):>9}  {' '.join(f'{x:.3f}' for x in losses)} "
                  f"({'finite' if rec['losses_finite'] else 'NOT FINITE'})", flush=True)
    distributed.shutdown()
    return rec


# ----------------------------------------------------------------------------- remat


@dataclass
class Remat:
    """Activation checkpointing on one device: peak memory and step time per policy, then the longest context."""

    preset: str = "d20"
    """Text preset."""
    batch: int = 16
    """Rows per step for the policy comparison."""
    seq: int = 2048
    """Tokens per row for the policy comparison."""
    policies: list[str] = field(default_factory=lambda: ["full", "attention", "mlp", "selective"])
    """Remat policies to compare against remat off."""
    steps: int = 5
    """Timed steps per row."""
    warmup: int = 2
    """Untimed steps first (compilation happens here)."""
    compile: Optional[bool] = None
    """torch.compile the gradient function for the policy comparison (default: on CUDA)."""
    dtype: DType = "auto"
    """Parameter dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
    search_seqs: list[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536, 131072])
    """Sequence lengths (batch 1) to try for the longest context, in increasing order (empty: skip)."""
    search_policy: str = "full"
    """Remat policy of the longest-context search."""
    search_compile: bool = False
    """Compile in the longest-context search too (one compilation per length; off keeps it short)."""
    out: str = "scale_out"
    """Folder for remat.json."""


def _train_one_config(cfg, params, opt, state, *, batch: dict, remat_policy: Optional[str], compiled: bool,
                      steps: int, warmup: int, dev: str) -> dict:
    """Median step time and peak memory of training on ``batch``; ``{"error": ...}`` when it fails.

    Out of memory is an expected result; any other failure is printed with its traceback and
    recorded too, so one broken row leaves the others measured.
    """
    fresh_compile_state(compiled)
    reset_memory(dev)
    box = {"params": params, "state": state, "n": 0, "fn": None}

    def step():
        box["params"], box["state"], res = box["fn"](box["params"], box["state"], [batch], box["n"])
        box["n"] += 1
        return res

    try:
        box["fn"] = make_train_step(cfg, opt, {}, remat_blocks=remat_policy is not None,
                                    remat_policy=remat_policy or "full", compile_grad=compiled, autocast=None)
        times, res = time_calls(step, steps, warmup, dev)
        return {"step_s": median(times), "peak_gib": peak_gib(dev), "loss": res.loss, "error": None}
    except Exception as e:
        if is_oom(e):
            return {"error": "out of memory"}
        traceback.print_exc()
        return {"error": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    finally:
        box = None
        reset_memory(dev)


def run_remat(a: Remat) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    setup_logging(True)
    dtype, compiled = resolve_dtype(a.dtype, dev), resolve_compile(a.compile, dev)
    cfg = model_config(a.preset, max([a.seq, *a.search_seqs]))
    params = init_params(cfg, dev, dtype)
    opt = AdamW(lr=1e-4, betas=(0.9, 0.95))
    state = opt.init(params)
    batch = random_batch(cfg, a.batch, a.seq, dev, seed=3)
    rows = []
    for policy in [None, *a.policies]:
        r = _train_one_config(cfg, params, opt, state, batch=batch, remat_policy=policy, compiled=compiled,
                              steps=a.steps, warmup=a.warmup, dev=dev)
        rows.append({"remat": policy or "off", **r})
        print(json.dumps(rows[-1]), flush=True)
    batch = None
    base = rows[0]
    for r in rows[1:]:
        ok = base["error"] is None and r["error"] is None
        r["time_overhead"] = r["step_s"] / base["step_s"] - 1 if ok else None
        r["memory_cut"] = base["peak_gib"] / r["peak_gib"] if ok and r["peak_gib"] and base["peak_gib"] else None

    longest = {}
    for label, policy in (("off", None), (a.search_policy, a.search_policy)):
        best, tried = None, []
        for t in a.search_seqs:
            r = _train_one_config(cfg, params, opt, state, batch=random_batch(cfg, 1, t, dev, seed=4),
                                  remat_policy=policy, compiled=a.search_compile, steps=1, warmup=0, dev=dev)
            tried.append({"seq": t, **r})
            print(json.dumps({"search": label, **tried[-1]}), flush=True)
            if r["error"] is not None:
                break
            best = t
        longest[label] = {"longest_seq": best, "tried": tried}

    rec = {"bench": "remat", "preset": a.preset, "batch": a.batch, "seq": a.seq, "dtype": str(dtype).split(".")[-1],
           "compile": compiled, "device": device_name(dev), "rows": rows, "longest": longest,
           "search_policy": a.search_policy, "search_compile": a.search_compile,
           "search_max_tried": max(a.search_seqs) if a.search_seqs else None}
    write_json(a.out, "remat.json", rec)
    print(f"\nremat: {a.preset}, {a.batch} x {a.seq}, {rec['dtype']}, compile={compiled}, {rec['device']}")
    print(f"{'remat':<10} {'step s':>8} {'peak GiB':>9}")
    for r in rows:
        if r["error"]:
            print(f"{r['remat']:<10} {r['error']}")
        else:
            print(f"{r['remat']:<10} {r['step_s']:>8.3f} {fmt(r['peak_gib'], '.2f'):>9}")
    for r in rows[1:]:
        if r.get("memory_cut") is not None:
            print(f"remat {r['remat']}: peak memory cut {r['memory_cut']:.1f}x at {100 * r['time_overhead']:+.0f}% "
                  f"step time")
        elif r.get("time_overhead") is not None:
            print(f"remat {r['remat']}: peak memory n/a on {dev} at {100 * r['time_overhead']:+.0f}% step time")
    for label, res in longest.items():
        top = res["longest_seq"]
        more = " (the largest tried)" if top is not None and top == rec["search_max_tried"] else ""
        last = res["tried"][-1]["error"] if res["tried"] else None
        more += f" (the next one: {last})" if last else ""
        print(f"longest context, batch 1, remat {label}: {top if top is not None else 'none of those tried'}{more}")
    sys.stdout.flush()
    return rec


# ----------------------------------------------------------------------------- packing


@dataclass
class Packing:
    """Useful tokens/s of SFT-like documents: padded one per row vs packed into rows."""

    preset: str = "d12"
    """Text preset (tiny on CPU)."""
    docs: int = 2000
    """Documents (the same ones in both modes)."""
    mean_len: float = 400.0
    """Mean document length in tokens (lognormal)."""
    sigma: float = 1.0
    """Lognormal shape (sigma of the log length)."""
    min_len: int = 8
    """Shortest document (lengths are clipped)."""
    max_len: int = 2048
    """Longest document (lengths are clipped); also the packed row length."""
    padded_batch: int = 16
    """Documents per padded batch (each row padded to the longest of its batch)."""
    pad_multiple: int = 64
    """Round each padded batch's length up to a multiple of this (bounds recompilation; 1: exact)."""
    packed_batch: int = 8
    """Packed rows of max_len tokens per batch."""
    compile: Optional[bool] = None
    """torch.compile the gradient function (default: on CUDA)."""
    dtype: DType = "auto"
    """Parameter dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
    seed: int = 0
    """Seed of the lengths and tokens."""
    out: str = "scale_out"
    """Folder for packing.json."""


def sft_like_samples(a: Packing, vocab: int) -> list[Sample]:
    """``a.docs`` documents, lognormal lengths with mean ``a.mean_len`` clipped to ``[min_len, max_len]``."""
    g = torch.Generator().manual_seed(a.seed)
    mu = math.log(a.mean_len) - a.sigma ** 2 / 2  # E[exp(N(mu, s^2))] = exp(mu + s^2/2)
    lengths = (torch.randn(a.docs, generator=g, dtype=torch.float64) * a.sigma + mu).exp()
    lengths = lengths.round().clamp(a.min_len, a.max_len).long().tolist()
    return [Sample(torch.randint(8, vocab, (n,), generator=g).tolist(), [True] * n) for n in lengths]


def padded_batches(samples: list[Sample], a: Packing) -> list[dict]:
    """Batches of ``padded_batch`` documents in data order, one per row, padded to the batch's longest.

    Padding sits after each document, so a plain causal mask already keeps it out of every real
    token's attention: these rows take dense causal attention (no document ids).
    """
    out = []
    for i in range(0, len(samples), a.padded_batch):
        chunk = samples[i:i + a.padded_batch]
        longest = max(len(s) for s in chunk)
        t = min(a.max_len, -(-longest // a.pad_multiple) * a.pad_multiple) if a.pad_multiple > 1 else longest
        b = collate_rows([[s] for s in chunk], t, pad_id=0)
        out.append({"tokens": b["tokens"], "targets": b["targets"], "positions": None, "doc_ids": None,
                    "images": None})
    return out


def packed_batches(samples: list[Sample], a: Packing) -> list[dict]:
    """Rows of ``max_len`` filled by best-fit decreasing, ``packed_batch`` rows per batch (the last one
    topped up with empty rows so every batch has one shape); documents attend only within themselves."""
    bins = best_fit_decreasing([len(s) for s in samples], a.max_len)
    rows = [[samples[i] for i in b] for b in bins]
    rows += [[] for _ in range(-len(rows) % a.packed_batch)]
    return [collate_rows(rows[i:i + a.packed_batch], a.max_len, pad_id=0)
            for i in range(0, len(rows), a.packed_batch)]


def _run_pass(cfg, params, opt, state, batches: list[dict], *, compiled: bool, dev: str) -> dict:
    """Warm up on one batch of every distinct shape, then time one pass over all batches.

    Compiled, the first two shapes compile (the second as a dynamic-shape graph, which serves the rest).
    """
    fresh_compile_state(compiled)
    step_fn = make_train_step(cfg, opt, {}, compile_grad=compiled, autocast=None)
    batches = [{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]
    box = {"params": params, "state": state, "n": 0}

    def step(b):
        box["params"], box["state"], res = step_fn(box["params"], box["state"], [b], box["n"])
        box["n"] += 1
        return res

    seen, t0 = set(), time.perf_counter()
    for b in batches:
        if tuple(b["tokens"].shape) not in seen:
            seen.add(tuple(b["tokens"].shape))
            step(b)
    sync(dev)
    warm_s = time.perf_counter() - t0
    reset_memory(dev)
    losses = []
    t0 = time.perf_counter()
    for b in batches:
        losses.append(step(b).loss)
    sync(dev)
    sec = time.perf_counter() - t0
    useful = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    slots = sum(b["tokens"].numel() for b in batches)
    return {"batches": len(batches), "shapes": len(seen), "token_slots": slots, "useful_tokens": useful,
            "pad_fraction": 1 - useful / slots, "seconds": sec, "warmup_s": warm_s,
            "useful_tokens_per_s": useful / sec, "peak_gib": peak_gib(dev),
            "losses_finite": all(math.isfinite(x) for x in losses)}


def run_packing(a: Packing) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    setup_logging(True)
    dtype, compiled = resolve_dtype(a.dtype, dev), resolve_compile(a.compile, dev)
    cfg = model_config(a.preset, a.max_len)
    samples = sft_like_samples(a, cfg.text.vocab_size)
    params = init_params(cfg, dev, dtype)
    opt = AdamW(lr=1e-5, betas=(0.9, 0.95))
    state = opt.init(params)
    res, compile_error = {}, None
    for mode, make in (("padded", padded_batches), ("packed", packed_batches)):
        try:
            res[mode] = _run_pass(cfg, params, opt, state, make(samples, a), compiled=compiled, dev=dev)
        except Exception as e:
            if not compiled or is_oom(e):
                raise
            # e.g. a dynamic-shape compilation of the padded batches failing: compare both modes eagerly instead
            compile_error = f"{mode}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"compiled {mode} pass failed ({compile_error}); running both modes without compile", flush=True)
            compiled, res = False, {}
            fresh_compile_state(True)
            for m, mk in (("padded", padded_batches), ("packed", packed_batches)):
                res[m] = _run_pass(cfg, params, opt, state, mk(samples, a), compiled=False, dev=dev)
            break
        print(json.dumps({"mode": mode, **res[mode]}), flush=True)
        reset_memory(dev)
    if res["padded"]["useful_tokens"] != res["packed"]["useful_tokens"]:
        raise RuntimeError(f"useful tokens differ: {res['padded']['useful_tokens']} padded vs "
                           f"{res['packed']['useful_tokens']} packed")
    lengths = [len(s) for s in samples]
    ratio = res["packed"]["useful_tokens_per_s"] / res["padded"]["useful_tokens_per_s"]
    rec = {"bench": "packing", "preset": a.preset, "docs": a.docs, "mean_len": sum(lengths) / len(lengths),
           "max_len": a.max_len, "padding": f"to the batch's longest document, rounded up to a multiple of "
           f"{a.pad_multiple}, {a.padded_batch} documents per batch in data order (dense causal attention)",
           "packing": f"best-fit decreasing into rows of {a.max_len}, {a.packed_batch} rows per batch "
           "(attention within documents: SDPA with a dense document mask on CUDA)",
           "dtype": str(dtype).split(".")[-1], "compile": compiled, "compile_error": compile_error,
           "device": device_name(dev), "padded": res["padded"], "packed": res["packed"], "speedup": ratio,
           "target": 1.5}
    write_json(a.out, "packing.json", rec)
    print(f"\npacking: {a.preset}, {a.docs} documents (mean {rec['mean_len']:.0f} tokens, <= {a.max_len}), "
          f"{rec['dtype']}, compile={compiled}, {rec['device']}")
    print(f"padded = {rec['padding']}; packed = {rec['packing']}")
    print(f"{'mode':<7} {'batches':>7} {'pad %':>6} {'useful tok':>11} {'seconds':>8} {'useful tok/s':>13}")
    for mode in ("padded", "packed"):
        r = res[mode]
        print(f"{mode:<7} {r['batches']:>7} {100 * r['pad_fraction']:>6.1f} {r['useful_tokens']:>11} "
              f"{r['seconds']:>8.2f} {r['useful_tokens_per_s']:>13.0f}")
    print(f"packed / padded useful tokens/s: {ratio:.2f}x (target >= 1.5x)", flush=True)
    return rec


# ----------------------------------------------------------------------------- CLI

RUNNERS: dict[type, Callable] = {Dp: run_dp, DpReport: run_dp_report, Ring: run_ring, Context: run_context,
                                 Remat: run_remat, Packing: run_packing}
SUBCOMMANDS = {"dp": Dp, "dp-report": DpReport, "ring": Ring, "context": Context, "remat": Remat, "packing": Packing}


def main(argv: Optional[list[str]] = None) -> dict:
    import tyro

    args = tyro.extras.subcommand_cli_from_dict(SUBCOMMANDS, args=argv, description=__doc__.split("\n")[0])
    return RUNNERS[type(args)](args)


if __name__ == "__main__":
    main()
