"""The training loop every recipe shares.

    result = train(params, cfg, batches, TrainConfig(steps=300), RunConfig(name="sft"))

It owns everything around the train step: moving batches to the device, the
progress bar (loss, tokens/s, ETA; MFU on GPU), ``metrics.jsonl`` and a
loss-curve PNG in the run folder, the NaN/Inf guard, checkpoints every
``save_every`` steps (and at the end), and ``--resume`` from the latest one.

A step's loss and gradient norm (:class:`ghostvis.train.step.StepResult`) are
read once the next step is queued (at once after a skipped step, before a
checkpoint and at the end), so the loop does not make the host wait for the GPU
between steps. With ``--train.compile`` and AdamW on CUDA the step itself waits
on nothing either; an eager step waits once in the loss, and Muon once per step
(see :func:`ghostvis.train.step.make_train_step`).

Resume is exact: a checkpoint holds the params, the optimizer state, the data
cursor and the RNG states, and ``metrics.jsonl`` is cut back to the checkpoint's
step, so a run killed at any point and resumed writes the same losses as one
that never stopped (bit-identical on CPU in float32).

``batches`` is an iterator of batch dicts with ``state_dict()`` /
``load_state_dict()`` (a :class:`ghostvis.train.data.BatchIterator`); under
torchrun each rank passes its own shard, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import torch

from ..core.io import save_tree
from ..core.model import check_image_tokens, flops_per_token, inputs_checked
from ..core.model import init as gv_init
from ..core.tree import merge, tree_map
from ..ops import ring
from . import checkpoint as ckpt
from . import distributed
from .data.prefetch import Prefetcher, WorkerFeed
from .optim import make_optimizer
from .schedule import lr_schedule
from .step import StepResult, make_train_step, partition

log = logging.getLogger("ghostvis.train")

H100_BF16_FLOPS = 989e12  # the MFU denominator of the project's measurements


class TrainingDiverged(RuntimeError):
    """The loss or gradient was NaN/Inf for too many steps in a row."""


@dataclass
class TrainConfig:
    """How to optimise (the ``--train.*`` flags).

    Attributes:
        steps: optimizer steps in total.
        batch_size: rows per micro-batch on each rank.
        seq_len: tokens per row (samples are packed into rows).
        grad_accum: micro-batches summed into one step (global batch = batch_size x grad_accum x ranks rows).
        optimizer: ``adamw`` for everything, or ``muon`` (Muon for block/connector matrices, AdamW for the rest).
        lr: peak AdamW learning rate.
        muon_lr: peak Muon learning rate (only with ``--train.optimizer muon``).
        weight_decay: decoupled weight decay on matrices (never norms, biases or embeddings).
        beta1: AdamW first-moment decay.
        beta2: AdamW second-moment decay.
        schedule: learning-rate shape after warmup: ``cosine``, ``linear`` (to ``final_lr_frac``) or ``constant``.
        warmup: linear warmup steps.
        final_lr_frac: learning rate at the last step as a fraction of the peak (0 = decay to zero).
        grad_clip: clip the global gradient norm to this (0 disables).
        trainable: what to train: ``all``, or comma-separated dotted prefixes such as
            ``connector`` or ``connector,text.layers.2,text.layers.3``; everything else is frozen.
        remat: activation checkpointing per decoder block (less memory, ~1/3 more compute).
        remat_policy: with ``remat``: ``full`` (recompute whole blocks), ``mlp`` or ``attention``
            (recompute only that sub-block, keep the other's activations), or ``selective`` (keep
            every matmul output, recompute only the norms and SwiGLU feeding the projections).
        compile: ``torch.compile`` the gradient function.
        cuda_graphs: with ``compile`` on CUDA, replay the compiled gradient function as a CUDA
            graph (``mode="reduce-overhead"``): one launch per micro-batch's forward and backward, for
            steps whose host cannot launch kernels as fast as the GPU runs them (small models,
            VLMs). Needs fixed batch shapes (each new shape records a graph), and no ``remat`` or
            ``context_parallel``. Attention runs on SDPA (a dense mask for packed documents).
        dtype: compute dtype: ``float32``, or ``bfloat16`` (autocast; params and optimizer stay float32).
        seed: seed of the data order and of any randomness in training.
        max_bad_steps: stop after this many NaN/Inf steps in a row (each is skipped, not applied).
        context_parallel: split every sequence over this many ranks and run causal attention as ring
            attention (long-context training; text batches). It must divide the number of ranks:
            ranks form a (data, context) grid, each group of ``context_parallel`` consecutive ranks
            reads the same rows and each keeps its zigzag shard of them; the groups are data parallel.
        bucket_mb: with several ranks, gradients are all-reduced in flat buckets of about this many MiB.
        overlap_comm: with several ranks, start each gradient bucket's all-reduce during the backward
            as soon as its gradients exist (off, the default: all-reduce after the backward, which
            measured faster on one NVLink node; overlap pays on slower links). Ignored with
            ``compile`` (the compiled backward drops the Python hook that launches them).
        shard_optimizer: with several ranks, keep optimizer state only for this rank's share of the
            parameters (whole tensors, balanced by size; ZeRO stage 1) and broadcast each updated
            tensor from its owner. Checkpoints still hold the whole state, so a run may resume on
            another number of ranks.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3
    muon_lr: float = 0.02
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = 20
    final_lr_frac: float = 0.0
    grad_clip: float = 1.0
    trainable: str = "all"
    remat: bool = False
    remat_policy: Literal["full", "attention", "mlp", "selective"] = "full"
    compile: bool = False
    cuda_graphs: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    max_bad_steps: int = 3
    context_parallel: int = 1
    bucket_mb: float = 25.0
    overlap_comm: bool = False
    shard_optimizer: bool = False


@dataclass
class RunConfig:
    """Where results go and how the run is kept (the ``--run.*`` flags).

    Attributes:
        name: the run folder is ``<out_dir>/<name>``.
        out_dir: parent folder of run folders.
        save_every: write a checkpoint every this many steps (0: only at the end).
        keep_last: keep this many newest checkpoints (0 keeps all).
        resume: continue from the latest checkpoint of this run folder, if there is one.
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``.
        progress: show a progress bar (rank 0 only).
        log_every: update the progress bar's numbers every this many steps.
        plot: write ``loss.png`` (needs matplotlib).
        prefetch: batches drawn ahead in a background thread (pinned, on CUDA) while a step
            trains (:class:`ghostvis.train.data.prefetch.Prefetcher`); 0 draws each batch in the
            loop. Default: 2 on CUDA, 0 on the CPU (where the thread would take the step's cores).
        data_workers: processes drawing batches instead of the thread (each ``prefetch`` batches
            ahead, 2 if that is 0 or unset), for data slower to draw than a step trains (many
            images a batch); needs a :class:`ghostvis.train.data.BatchIterator`
            (:class:`ghostvis.train.data.prefetch.WorkerFeed`). 0: none.
    """

    name: str = "run"
    out_dir: str = "runs"
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    log_every: int = 5
    plot: bool = True
    prefetch: Optional[int] = None
    data_workers: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained params and the run's numbers."""

    params: dict
    steps: int
    skipped: int
    final_loss: float
    wall_s: float
    run_dir: Path
    history: list = field(default_factory=list)


@dataclass
class ModelSource:
    """Where the starting weights come from (the ``--model.*`` flags).

    Attributes:
        preset: the model preset to build when starting from scratch (see ``ghostvis.presets.names()``).
        init: ``scratch``; or a GhostVis ``.safetensors`` file, a checkpoint folder (``.../step_000300``)
            or a run folder (its latest checkpoint); or a Hugging Face folder (``config.json`` + safetensors).
        seed: initialisation seed when starting from scratch.
    """

    preset: str = "tiny-vlm"
    init: str = "scratch"
    seed: int = 0


def load_initial(src: ModelSource) -> tuple[dict, object]:
    """``(params, cfg)`` from a :class:`ModelSource` (the model config comes from the weights unless scratch)."""
    from ..core import presets
    from ..core.io import load
    if src.init == "scratch":
        cfg = presets.get(src.preset)
        return gv_init(cfg, src.seed), cfg
    path = Path(src.init)
    if path.is_file():
        return load(path)
    if (path / ckpt.STATE_FILE).is_file():
        return load(path / ckpt.MODEL_FILE)
    if (path / "checkpoints").is_dir() and ckpt.latest(path / "checkpoints") is not None:
        return load(ckpt.latest(path / "checkpoints") / ckpt.MODEL_FILE)
    if (path / "config.json").is_file():
        from ..core.hf import import_hf
        return import_hf(path, dtype=torch.float32)
    raise FileNotFoundError(f"--model.init {src.init!r} is not 'scratch', a .safetensors file, a checkpoint or run "
                            "folder, or a Hugging Face folder with config.json")


def build_optimizer(tc: TrainConfig):
    """The optimizer ``tc`` describes, with its learning-rate schedules bound in."""
    sched = dict(kind=tc.schedule, total=tc.steps, warmup=tc.warmup, final=tc.final_lr_frac)
    return make_optimizer(tc.optimizer, lr=lr_schedule(tc.lr, **sched), muon_lr=lr_schedule(tc.muon_lr, **sched),
                          weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2))


def context_shard(batch: dict, world: int, rank: int) -> dict:
    """This rank's zigzag shard (along the sequence) of every ``[B, T]`` tensor of a text batch."""
    if batch.get("images") is not None:
        raise ValueError("context parallelism takes text batches only (image placeholders would be split "
                         "across ranks); train VLMs with data parallelism")
    return {k: (ring.shard(v, world, rank, dim=1) if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
            for k, v in batch.items()}


def data_rank(di: "distributed.DistInfo", tc: TrainConfig) -> tuple[int, int]:
    """``(rank, world_size)`` to shard the data by: context-parallel ranks read the same batches."""
    cp = max(1, tc.context_parallel)
    return di.rank // cp, di.world_size // cp


def check_on_host(cfg, batch: dict) -> bool:
    """Check a CPU batch's ``<|image|>`` placeholders against its images (raises
    :class:`ghostvis.core.model.ImageTokenMismatch`); False, checking nothing, for a batch
    already on a GPU (the forward checks it then)."""
    if batch["tokens"].device.type != "cpu":
        return False
    images = batch.get("images")
    check_image_tokens(cfg, batch["tokens"], 0 if images is None else images.shape[0])
    return True


def to_device(batch: dict, device) -> dict:
    """A batch with every tensor on ``device`` (non-blocking where possible)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# --------------------------------------------------------------------------- files


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (empty if absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(run_dir: Path, upto_step: int) -> list[dict]:
    """Keep only training records of steps < ``upto_step`` (a resumed run rewrites the rest)."""
    kept = [r for r in read_metrics(run_dir) if "step" in r and r["step"] < upto_step]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one JSON record to ``metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_loss(history: list[dict], path: str | Path, title: str = "") -> Optional[Path]:
    """Write a loss-curve PNG of the ``loss`` of each step; None (and a log line) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss curve written (pip install matplotlib)")
        return None
    pts = [(r["step"], r["loss"]) for r in history if not r.get("skipped") and math.isfinite(r.get("loss", math.nan))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if pts:
        steps, losses = zip(*pts)
        ax.plot(steps, losses, lw=1, alpha=0.5, label="loss")
        k = max(1, len(losses) // 30)  # a moving average makes the trend readable on noisy curves
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _save_bad_batch(run_dir: Path, step: int, micro_batches: list[dict]) -> Path:
    path = run_dir / f"bad_batch_step{step:06d}.safetensors"
    save_tree(path, [{k: v for k, v in mb.items() if isinstance(v, torch.Tensor)} for mb in micro_batches],
              {"step": str(step)})
    return path


# --------------------------------------------------------------------------- the loop


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class _Progress:
    """A tqdm bar on rank 0 (or nothing)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, n: int, postfix: Optional[dict]) -> None:
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(params: dict, cfg, batches: Iterator[dict], tc: TrainConfig, rc: RunConfig,
          dist_info: Optional[distributed.DistInfo] = None, *,
          on_checkpoint: Optional[Callable[[Path], None]] = None) -> TrainResult:
    """Train ``params`` (the full pytree) for ``tc.steps`` steps; see the module docstring.

    Frozen parameters (outside ``tc.trainable``) come back bit-identical. With
    ``rc.resume`` and a checkpoint in the run folder, ``params`` is replaced by the
    checkpoint's and training continues from its step and data cursor.
    """
    di = dist_info or distributed.DistInfo(device=_resolve_device(rc.device))
    device = torch.device(di.device)
    if tc.cuda_graphs and (not tc.compile or tc.remat or tc.context_parallel > 1 or device.type != "cuda"):
        raise ValueError("--train.cuda-graphs needs --train.compile, a CUDA device, and no --train.remat "
                         "or --train.context-parallel")
    if rc.prefetch is not None and rc.prefetch < 0:
        raise ValueError(f"--run.prefetch must be >= 0, got {rc.prefetch}")
    if rc.data_workers < 0:
        raise ValueError(f"--run.data-workers must be >= 0, got {rc.data_workers}")
    main = di.is_main
    run_dir = rc.run_dir
    ckpt_root = run_dir / "checkpoints"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    params = tree_map(lambda t: t.to(device), params)
    trainable, frozen = partition(params, tc.trainable)
    optimizer = build_optimizer(tc)
    sharded = tc.shard_optimizer and di.enabled
    if sharded:
        optimizer = distributed.ShardedOptimizer(optimizer, di.rank, di.world_size, bucket_mb=tc.bucket_mb)
    opt_state = optimizer.init(trainable)
    start, skipped, history = 0, 0, []

    resume_from = ckpt.latest(ckpt_root) if rc.resume else None
    if resume_from is not None:
        loaded, _, full_state, state = ckpt.load_checkpoint(resume_from, None if sharded else opt_state,
                                                            device=device)
        # a checkpoint's names come back sorted: keep a fresh run's order, since it decides which gradients
        # share an all-reduce bucket, and so the summing order (bit-exact resume on several ranks)
        order = list(trainable)
        trainable, frozen = partition(tree_map(lambda t: t.to(device), loaded), tc.trainable)
        trainable = {k: trainable[k] for k in order}
        if sharded:
            opt_state = optimizer.load_state(resume_from / ckpt.OPTIM_FILE, trainable, opt_state, device)
        else:
            opt_state = full_state
        start, skipped = int(state["step"]), int(state.get("skipped", 0))
        batches.load_state_dict(state["data"])
        ckpt.set_rng_state(state.get("rng", {}))
        if main:
            history = _truncate_metrics(run_dir, start)
            log.info("resumed from %s (step %d)", resume_from, start)
    else:
        torch.manual_seed(tc.seed)
        if main:
            (run_dir / "metrics.jsonl").write_text("")
    if di.enabled:
        distributed.broadcast_tree(trainable)

    if main:
        (run_dir / "config.json").write_text(json.dumps({"train": asdict(tc), "run": {**asdict(rc)},
                                                         "model": cfg.to_dict(), "world_size": di.world_size},
                                                        indent=2, default=str))
    cp = tc.context_parallel
    if cp < 1:
        raise ValueError(f"--train.context-parallel must be >= 1, got {cp}")
    cp_group = distributed.context_parallel_group(cp) if cp > 1 else None
    cp_rank = di.rank % cp
    cp_positions = ring.shard_positions(tc.seq_len, cp, cp_rank, device=device) if cp > 1 else None
    autocast = torch.bfloat16 if tc.dtype == "bfloat16" else None
    reducer = distributed.DataParallel(tc.bucket_mb, overlap=tc.overlap_comm) if di.enabled else None
    step_fn = make_train_step(cfg, optimizer, frozen, grad_clip=tc.grad_clip, remat_blocks=tc.remat,
                              remat_policy=tc.remat_policy,
                              compile_grad=tc.compile, autocast=autocast, reducer=reducer,
                              cuda_graphs=tc.cuda_graphs)
    lr_at = lr_schedule(tc.lr, tc.schedule, total=tc.steps, warmup=tc.warmup, final=tc.final_lr_frac)
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * di.world_size // cp
    flops_tok = flops_per_token(cfg, tc.seq_len)

    def save(step: int) -> None:
        whole_state = optimizer.gather_state(trainable, opt_state) if sharded else opt_state  # every rank takes part
        if main:
            state = {"data": feed.state_dict(), "rng": ckpt.rng_state(), "skipped": skipped,
                     "train": asdict(tc)}
            path = ckpt.save_checkpoint(ckpt_root, step, merge(trainable, frozen), cfg, whole_state, state,
                                        keep_last=rc.keep_last)
            if on_checkpoint is not None:
                on_checkpoint(path)
            if rc.plot:
                plot_loss(history, run_dir / "loss.png", title=rc.name)
        distributed.barrier()

    depth = rc.prefetch if rc.prefetch is not None else (2 if device.type == "cuda" else 0)
    if rc.data_workers:
        feed = WorkerFeed(batches, rc.data_workers, rc.prefetch or 2, pin=device.type == "cuda")
    else:
        feed = Prefetcher(batches, depth, pin=device.type == "cuda") if depth else batches
    bar = _Progress(rc.progress and main, tc.steps, start, rc.name)
    t_start = time.perf_counter()
    t_last, steps_since = t_start, 0
    bad_streak = 0
    result = StepResult()

    def finish(step: int, micro: list[dict], result: StepResult) -> None:
        """Book-keep one step whose numbers are read now (the step after it may be running)."""
        nonlocal skipped, bad_streak, t_last, steps_since
        now = time.perf_counter()
        if result.skipped:
            skipped += 1
            bad_streak += 1
            bad_path = _save_bad_batch(run_dir, step, micro) if main else None
            log.warning("step %d: non-finite loss %s / grad norm %s; step skipped (batch saved to %s)",
                        step, result.loss, result.grad_norm, bad_path)
            if bad_streak >= tc.max_bad_steps:
                raise TrainingDiverged(f"step {step}: loss {result.loss} / grad norm {result.grad_norm} was "
                                       f"NaN/Inf for {bad_streak} steps in a row; the last batch is saved at "
                                       f"{bad_path}; params are those of step {step - bad_streak}")
        else:
            bad_streak = 0
        steps_since += 1
        record = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr_at(step),
                  "tokens": result.tokens, "elapsed_s": round(now - t_start, 3), "skipped": result.skipped}
        history.append(record)
        if main:
            append_metrics(run_dir, record)
        postfix = None
        if (step + 1) % rc.log_every == 0 or step + 1 == tc.steps:
            tok_s = tokens_per_step * steps_since / max(now - t_last, 1e-9)
            postfix = {"loss": f"{result.loss:.4f}", "tok/s": f"{tok_s:,.0f}"}
            if device.type == "cuda":
                postfix["mfu"] = f"{100 * flops_tok * tok_s / di.world_size / H100_BF16_FLOPS:.1f}%"
            t_last, steps_since = now, 0
        bar.update(1, postfix)

    # Step n's numbers are read once step n + 1 is queued, so the loop itself does not make the host
    # wait for the GPU between steps. After a non-finite step the next one is read at once too (a
    # streak stops the run exactly where a loop reading each step at once would), and so is every
    # step when one bad step stops the run, before a checkpoint, and at the end.
    read_at_once = tc.max_bad_steps <= 1
    queued: list[tuple[int, list[dict], StepResult]] = []
    try:
        for step in range(start, tc.steps):
            drawn = [next(feed) for _ in range(tc.grad_accum)]
            # placeholders are counted here on the host, so the forward need not read a count back
            checked = all(check_on_host(cfg, mb) for mb in drawn)
            micro = [to_device(mb, device) for mb in drawn]
            with contextlib.ExitStack() as scope:
                if checked:
                    scope.enter_context(inputs_checked())
                if cp > 1:
                    micro = [context_shard(mb, cp, cp_rank) for mb in micro]
                    scope.enter_context(ring.context_parallel(cp_group, cp_positions))
                trainable, opt_state, result = step_fn(trainable, opt_state, micro, step)
            queued.append((step, micro, result))
            saving = rc.save_every and (step + 1) % rc.save_every == 0 and step + 1 < tc.steps
            while queued and (len(queued) > 1 or bad_streak or read_at_once or saving or step + 1 == tc.steps):
                finish(*queued.pop(0))
            if saving:
                save(step + 1)
    except BaseException:
        # a failure while queueing the next step (the data ran out, Ctrl-C): the queued step's
        # numbers are still recorded, as far as they can be
        while queued:
            try:
                finish(*queued.pop(0))
            except Exception:
                break
        raise
    finally:
        bar.close()
        if feed is not batches:
            feed.close()
    if start < tc.steps or resume_from is None:
        save(tc.steps)
    wall = time.perf_counter() - t_start
    if main and rc.plot:
        plot_loss(history, run_dir / "loss.png", title=rc.name)
    return TrainResult(merge(trainable, frozen), tc.steps, skipped, result.loss, wall, run_dir, history)


def frozen_names(params: dict, spec: str) -> list[str]:
    """Names of the parameters ``spec`` leaves frozen (for reports)."""
    return sorted(partition(params, spec)[1]) if spec != "all" else []


__all__ = ["TrainConfig", "RunConfig", "ModelSource", "load_initial", "TrainResult", "TrainingDiverged", "train",
           "build_optimizer", "to_device", "check_on_host",
           "read_metrics", "append_metrics", "plot_loss", "frozen_names"]
