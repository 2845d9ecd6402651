"""The train step, built by composing function transforms over the pure loss.

    trainable, frozen = partition(params, "connector,text.layers.3")
    step = make_train_step(cfg, optimizer, frozen, grad_clip=1.0, remat=True)
    trainable, opt_state, result = step(trainable, opt_state, micro_batches, step_index)

The pieces, each a function of a function:

* :func:`value_and_grad` -- ``torch.func.grad_and_value`` of the loss with respect
  to the *trainable* flat dict only; the frozen flat dict is closed over, so it is
  never differentiated and never changes (bit-identical after training).
* :func:`remat` -- activation checkpointing per decoder block, plugged in through
  ``decoder.decode_hidden``'s ``block_fn`` hook. ``torch.utils.checkpoint`` relies on
  saved-tensor hooks, which ``torch.func`` does not support, so the block runs as a
  custom autograd function that keeps only its inputs and recomputes itself (with
  ``torch.func.vjp``) in the backward.
* :func:`compile` -- ``torch.compile`` of the gradient function.
* :func:`accumulate` -- sums gradients over micro-batches. Each micro-batch's summed
  token loss is divided by the token count of the whole global batch, so k
  micro-batches give exactly the gradient of one big batch (up to float rounding).
* ``grad_sink`` of :func:`value_and_grad` -- each trainable leaf passes through an
  identity whose backward hands the leaf's finished gradient to a callback; a
  data-parallel reducer uses it to start all-reducing gradients while the backward
  is still running (see :class:`ghostvis.train.distributed.DataParallel`).

A step whose loss or gradient norm is NaN/Inf leaves params and optimizer state
untouched and reports ``skipped=True``; the loop counts and stops on a streak.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Protocol, Sequence

import torch

from .. import ops
from ..core import decoder
from ..core.tree import flatten, merge, split, unflatten
from .loss import loss_fn, supervised_tokens
from .optim import global_norm, scale_to_max_norm_, update_or_skip

log = logging.getLogger("ghostvis.train")

Tensor = torch.Tensor
Flat = dict[str, Tensor]


# --------------------------------------------------------------------------- freezing


def trainable_predicate(spec: str) -> Callable[[str], bool]:
    """A name predicate from a comma-separated list of dotted prefixes (``"all"`` = everything).

    ``"connector,text.layers.3"`` trains ``connector.*`` and ``text.layers.3.*``.
    """
    prefixes = [p.strip() for p in spec.split(",") if p.strip()]
    if not prefixes:
        raise ValueError(f"trainable spec {spec!r} names nothing; use 'all' or dotted prefixes like 'connector'")
    if "all" in prefixes:
        return lambda name: True
    return lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)


def partition(params: dict, spec: str) -> tuple[Flat, Flat]:
    """``(trainable, frozen)`` flat dicts of ``params`` by a :func:`trainable_predicate` spec.

    Every prefix must match some parameter, so a typo cannot silently freeze the whole model.
    """
    names = list(flatten(params))
    for p in (p.strip() for p in spec.split(",") if p.strip()):
        if p != "all" and not any(n == p or n.startswith(p + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"--train.trainable: {p!r} matches no parameter (top-level names: {tops})")
    trainable, frozen = split(params, trainable_predicate(spec))
    if not trainable:
        raise ValueError(f"--train.trainable {spec!r} leaves nothing to train")
    return trainable, frozen


# --------------------------------------------------------------------------- remat


def _after(x: Tensor, dep: Tensor) -> Tensor:
    """``x`` (same values) made to depend on ``dep``, when traced by ``torch.compile``; else ``x`` itself.

    A compiled ``torch.func.grad`` is one graph holding the forward and the backward. A recompute
    that reads only the block's input may be scheduled, and fused, with the forward's identical
    computation, which keeps its results alive until the backward and undoes the remat (a 4-layer
    graph compiled for CPU planned 3x the peak without this). Tying the recompute's input to
    the incoming gradient means it can only run in the backward. The factor is the float ``0.0``:
    inductor folds a product with the integer ``0`` to zeros and the tie with it. (A NaN in ``dep``
    spreads to the result, as it would to the gradient anyway.)
    """
    if not torch.compiler.is_compiling():
        return x
    return x + (dep.reshape(-1)[0] * 0.0).to(x.dtype)


class _Recompute(torch.autograd.Function):
    """Runs ``fn(*args)`` without saving activations; the backward recomputes it under ``torch.func.vjp``.

    The backward runs under ``no_grad``: ``torch.func.grad`` differentiates with ``create_graph``,
    so otherwise every block's recompute would be recorded for a second derivative and its
    activations kept until the whole backward ends (more memory than no remat at all).
    """

    @staticmethod
    def forward(fn, *args):
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad_out):
        x, *leaves = ctx.saved_tensors
        with torch.no_grad():  # vjp differentiates at its own level regardless
            _, vjp_fn = torch.func.vjp(ctx.fn, _after(x, grad_out), *leaves)
            return (None, *vjp_fn(grad_out))


def _plain(t: Tensor) -> Tensor:
    """The plain tensor inside ``torch.func``'s wrappers (the same memory)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


class _GradTap(torch.autograd.Function):
    """Identity on a group of leaves; the backward passes the gradients through and shows each to ``sink(name, grad)``.

    Autograd runs a node's backward only once every gradient flowing into it has been
    summed, so when a leaf reaches the loss only through its tap, ``grad`` is that
    leaf's complete gradient. Under ``torch.func.grad`` the backward runs inside the
    transform with the gradients wrapped, and the transform forbids writing into
    tensors made outside it (a reducer's buckets). So the sink gets the plain tensor
    and runs with the ``torch.func`` layers switched off: it may copy ``grad`` and
    launch collectives on its own buffers, but must neither modify nor keep ``grad``.
    """

    @staticmethod
    def forward(names, sink, *leaves):
        return tuple(x.view_as(x) for x in leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.names, ctx.sink = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        with torch._C._DisableFuncTorch(), torch.no_grad():
            for name, grad in zip(ctx.names, grads):
                if grad is not None:
                    ctx.sink(name, _plain(grad))
        return (None, None, *grads)


def _tap_group(name: str) -> str:
    """Leaves of one block share a tap (``text.layers.3.*`` -> ``text.layers.3``); others get their own."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return name


def tap_grads(flat: Flat, sink: Callable[[str, Tensor], None]) -> Flat:
    """``flat`` behind identities whose backward calls ``sink(name, grad)`` once per leaf the loss reaches.

    One tap per block rather than per leaf: each ``torch.func``-level autograd function
    costs a good fraction of a millisecond of Python (forward and backward), and an
    eager step is often bound by exactly that (180 per-leaf taps cost ~25x the time of
    20 per-block ones). A block's gradients are reported together, once its backward is done.
    """
    groups: dict[str, list[str]] = {}
    for name in flat:
        groups.setdefault(_tap_group(name), []).append(name)
    out: Flat = {}
    for names in groups.values():
        out.update(zip(names, _GradTap.apply(tuple(names), sink, *(flat[n] for n in names))))
    return {k: out[k] for k in flat}


class _LinearsOfRecomputed(torch.autograd.Function):
    """``[a @ w.T for w in ws]`` with ``a = fn(*xs)`` not kept: the backward recomputes ``a`` from ``xs``.

    For an elementwise ``fn`` (RMSNorm, SwiGLU) feeding matmuls, this keeps the matmul outputs
    and the (cheap) op's inputs, and drops the op's output, which plain autograd would save as
    the matmuls' input.
    """

    @staticmethod
    def forward(fn, n_weights, *args):
        a = fn(*args[n_weights:])
        return tuple(torch.nn.functional.linear(a, w) for w in args[:n_weights])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn, ctx.n_weights = inputs[0], inputs[1]
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx, *dys):
        with torch.no_grad():  # not recorded for a second derivative (see _Recompute)
            return _LinearsOfRecomputed._backward(ctx, *dys)

    @staticmethod
    def _backward(ctx, *dys):
        ws, xs = ctx.saved_tensors[:ctx.n_weights], ctx.saved_tensors[ctx.n_weights:]
        a, vjp_fn = torch.func.vjp(ctx.fn, *(_after(x, dys[0]) for x in xs))
        # under autocast the forward's matmuls ran in the autocast dtype, which the incoming
        # gradients carry; the backward runs outside autocast, so cast to it by hand
        cd = dys[0].dtype
        a2 = a.reshape(-1, a.shape[-1]).to(cd)
        # traced by dynamo, needs_input_grad reads False for weights that torch.func.grad differentiates
        need = [torch.compiler.is_compiling() or ctx.needs_input_grad[2 + i] for i in range(len(ws))]
        dws = [(dy.reshape(-1, dy.shape[-1]).T @ a2).to(w.dtype) if need[i] else None
               for i, (dy, w) in enumerate(zip(dys, ws))]
        da = sum(dy @ w.to(cd) for dy, w in zip(dys, ws)).to(a.dtype)
        return (None, None, *dws, *vjp_fn(da))


def linears_of(fn: Callable, weights: Sequence[Tensor], *xs: Tensor) -> tuple[Tensor, ...]:
    """``tuple(fn(*xs) @ w.T for w in weights)``, recomputing ``fn`` in the backward (see above)."""
    return _LinearsOfRecomputed.apply(fn, len(weights), *weights, *xs)


def selective_block(lp: dict, cfg, x: Tensor, cos: Tensor, sin: Tensor, **kw) -> Tensor:
    """:func:`decoder.block` that keeps matmul outputs and recomputes the norms and SwiGLU in the backward.

    Drops, per layer, the two normalised inputs of the projections and the SwiGLU output (the
    down projection's input): ``2 * dim + ffn_dim`` values per token, for a few elementwise
    passes of recompute. Takes the separate or the stacked projection layout (no INT8).
    """
    eps, attn, mlp = cfg.norm_eps, lp["attn"], lp["mlp"]
    norm = lambda h, g: ops.rms_norm(h, g, eps)  # noqa: E731
    if "wqkv" in attn:
        qkv = linears_of(norm, [attn["wqkv"]], x, lp["attn_norm"])[0]
        qkv = qkv + attn["bqkv"] if "bqkv" in attn else qkv
        if cfg.qk_norm or kw.get("kv_cache") is not None:  # attend_stacked has neither
            nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            x = x + decoder.attend(attn, cfg, *qkv.split([nq, nk, nk], dim=-1), cos, sin, **kw)
        else:
            x = x + decoder.attend_stacked(attn, cfg, qkv, cos, sin, **kw)
    else:
        q, k, v = linears_of(norm, [attn["wq"], attn["wk"], attn["wv"]], x, lp["attn_norm"])
        if "bq" in attn:
            q, k, v = q + attn["bq"], k + attn["bk"], v + attn["bv"]
        x = x + decoder.attend(attn, cfg, q, k, v, cos, sin, **kw)
    if "w_gate_up" in mlp:
        gate_up = linears_of(norm, [mlp["w_gate_up"]], x, lp["mlp_norm"])[0]
        return x + linears_of(ops.swiglu_stacked, [mlp["w_down"]], gate_up)[0]
    gate, up = linears_of(norm, [mlp["w_gate"], mlp["w_up"]], x, lp["mlp_norm"])
    return x + linears_of(ops.swiglu, [mlp["w_down"]], gate, up)[0]


REMAT_POLICIES = ("full", "attention", "mlp", "selective")


def _checkpointed(fn: Callable, params: dict, x: Tensor) -> Tensor:
    """``fn(params, x)`` that keeps only ``x`` (and the params) and recomputes itself in the backward."""
    names, leaves = zip(*flatten(params).items())

    def run(x, *leaves):
        return fn(unflatten(dict(zip(names, leaves))), x)

    return _Recompute.apply(run, x, *leaves)


def remat(block_fn: Callable = decoder.block, policy: str = "full", *, stacked: bool = False) -> Callable:
    """A drop-in ``block_fn`` for ``decode_hidden`` with activation checkpointing.

    Policies: ``full`` keeps only each block's input and recomputes the whole block;
    ``mlp`` recomputes only the MLP sub-block (norm, gate/up, SwiGLU, down: the widest
    activations) and keeps attention's; ``attention`` recomputes only the attention
    sub-block; ``selective`` recomputes no matmul, only the norms and SwiGLU whose outputs
    feed the projections (:func:`selective_block`). ``block_fn`` is used by ``full`` only
    (the other policies are built from the decoder's pieces). ``stacked`` runs each block on
    its q/k/v and gate/up weights stacked (:func:`decoder.fuse_layer`), inside the recomputed
    part, so that the checkpoint keeps the separate weights.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {policy!r}")
    layout = decoder.fuse_layer if stacked else (lambda p: p)

    def full(lp: dict, cfg, x: Tensor, cos: Tensor, sin: Tensor, **kw) -> Tensor:
        return _checkpointed(lambda p, x: block_fn(layout(p), cfg, x, cos, sin, **kw), lp, x)

    def sub_blocks(lp: dict, cfg, x: Tensor, cos: Tensor, sin: Tensor, **kw) -> Tensor:
        eps = cfg.norm_eps

        def attn(p, x):
            p = layout(p)
            return decoder.attention_block(p["attn"], cfg, ops.rms_norm(x, p["attn_norm"], eps), cos, sin, **kw)

        def mlp(p, x):
            p = layout(p)
            return decoder.mlp_block(p["mlp"], ops.rms_norm(x, p["mlp_norm"], eps))

        attn_p = {"attn": lp["attn"], "attn_norm": lp["attn_norm"]}
        mlp_p = {"mlp": lp["mlp"], "mlp_norm": lp["mlp_norm"]}
        x = x + (_checkpointed(attn, attn_p, x) if policy == "attention" else attn(attn_p, x))
        return x + (_checkpointed(mlp, mlp_p, x) if policy == "mlp" else mlp(mlp_p, x))

    def selective(lp: dict, cfg, x: Tensor, cos: Tensor, sin: Tensor, **kw) -> Tensor:
        return selective_block(layout(lp), cfg, x, cos, sin, **kw)

    return {"full": full, "selective": selective}.get(policy, sub_blocks)


# --------------------------------------------------------------------------- grad, compile, accumulate


def stack_projections(params: dict) -> dict:
    """``params`` with the decoder's q/k/v and gate/up weights stacked (:func:`decoder.fuse_projections`).

    Differentiable: inside a loss, each block then runs one q/k/v and one gate/up matmul
    (forward and backward), and the gradients come back to the separate matrices as row
    slices of the stacked ones, so the parameters, their optimizer state and Muon's
    per-matrix orthogonalisation are unchanged. Costs one copy of those weights per step.
    """
    if "text" not in params:
        return params
    return {**params, "text": decoder.fuse_projections(params["text"])}


def value_and_grad(cfg, frozen: Flat, *, remat_blocks: bool = False, remat_policy: str = "full", select: bool = True,
                   autocast: Optional[torch.dtype] = None, stacked: bool = True,
                   grad_sink: Optional[Callable[[str, Tensor], None]] = None,
                   block_fn: Optional[Callable] = None) -> Callable:
    """``fn(trainable, batch, normalizer) -> (grads, loss)``: gradients w.r.t. ``trainable`` only.

    ``frozen`` is closed over. ``autocast`` (e.g. ``torch.bfloat16``) runs the
    forward under ``torch.autocast`` while params and grads stay in their dtype.
    ``stacked`` runs the blocks on stacked q/k/v and gate/up weights
    (:func:`stack_projections`; same loss and gradients, fewer and larger matmuls). It is
    ignored with ``remat_blocks``: those blocks keep the separate weights (a ``block_fn``
    built with ``remat(..., stacked=True)`` and passed to :func:`loss_fn` stacks them).
    ``grad_sink(name, grad)``, if given, is called during the backward with each
    trainable leaf's complete gradient as soon as it exists (:func:`tap_grads`; a leaf
    the loss never reaches may go unreported, and ``fn`` returns zeros for it).
    ``block_fn`` runs each block instead of the default loop (``decoder.fused_blocks``,
    which fuses every residual add into the norm after it); ``decoder.block`` gives the
    textbook loop of separate adds. It cannot be combined with ``remat_blocks``.
    """
    if remat_blocks and block_fn is not None:
        raise ValueError("value_and_grad: pass remat_blocks or block_fn, not both")
    # remat keeps the separate weights (its recompute under compile is not measured stacked)
    if remat_blocks:
        block_fn = remat(policy=remat_policy)

    def loss_of_trainable(trainable: Flat, batch: dict, normalizer) -> Tensor:
        if grad_sink is not None:
            trainable = tap_grads(trainable, grad_sink)
        params = merge(trainable, frozen)
        if stacked and not remat_blocks:
            params = stack_projections(params)
        if autocast is None:
            return loss_fn(params, batch, cfg, normalizer=normalizer, block_fn=block_fn, select=select)
        device_type = batch["tokens"].device.type
        with torch.autocast(device_type, dtype=autocast):
            return loss_fn(params, batch, cfg, normalizer=normalizer, block_fn=block_fn, select=select).float()

    return torch.func.grad_and_value(loss_of_trainable)


# Remat recomputes a block inside a custom backward (:class:`_Recompute`). Under torch.compile, dynamo
# cannot trace the Triton kernels' own autograd Functions there (torch 2.11 fails on the nested
# Function's context), so with compile + remat these ops run as plain torch, which inductor fuses.
REMAT_COMPILED_OPS = {"rms_norm": "reference", "swiglu": "reference", "rope": "reference",
                      "qkv_rope": "reference", "swiglu_stacked": "reference", "swiglu_mlp": "reference"}


def _with_remat_compiled_ops(compiled: Callable) -> Callable:
    """``compiled`` called with :data:`REMAT_COMPILED_OPS` forced (set outside the traced region)."""
    log.info("remat under torch.compile: %s run as plain torch for inductor to fuse",
             ", ".join(sorted(REMAT_COMPILED_OPS)))

    def fn(*args, **kwargs):
        with ops.use(**REMAT_COMPILED_OPS):
            return compiled(*args, **kwargs)

    return fn


def compile_value_and_grad(grad_fn: Callable, *, remat_blocks: bool = False, **compile_kwargs) -> Callable:
    """:func:`compile` of a :func:`value_and_grad` function, with the op choice remat needs compiled."""
    compiled = compile(grad_fn, **compile_kwargs)
    return _with_remat_compiled_ops(compiled) if remat_blocks else compiled


def compile(fn: Callable, **compile_kwargs) -> Callable:
    """``torch.compile(fn)``: the compile transform (kwargs go to ``torch.compile``, e.g. ``backend=``).

    It first registers GhostVis's kernels with inductor (``ops.library.lower_as_fallbacks``),
    which deep training graphs need on torch 2.11 to compile in seconds rather than minutes;
    call that yourself if you use ``torch.compile`` directly.
    """
    from ..ops.library import lower_as_fallbacks

    if compile_kwargs.get("backend", "inductor") == "inductor":
        lower_as_fallbacks()
    return torch.compile(fn, **compile_kwargs)


def accumulate(grad_fn: Callable, trainable: Flat, micro_batches: Sequence[dict],
               normalizer: Tensor) -> tuple[Flat, Tensor]:
    """Sum ``grad_fn`` over micro-batches: ``(sum of grads, sum of losses)``.

    With more than one micro-batch and a ``grad_fn`` whose ``reuses_outputs`` is true (a
    CUDA-graph replay writes into the same memory each call; see :func:`graphed`), the first
    micro-batch's gradients are copied before the next call.
    """
    total: Optional[Flat] = None
    loss = torch.zeros((), dtype=torch.float32, device=normalizer.device)
    for mb in micro_batches:
        grads, value = grad_fn(trainable, mb, normalizer)
        if total is None:
            copy = len(micro_batches) > 1 and getattr(grad_fn, "reuses_outputs", False)
            total = {k: g.clone() for k, g in grads.items()} if copy else dict(grads)
        else:
            torch._foreach_add_(list(total.values()), [grads[k] for k in total])
        loss = loss + value.detach().float()
    if total is None:
        raise ValueError("accumulate needs at least one micro-batch")
    return total, loss


def graphed(grad_fn: Callable, frozen: Flat, **compile_kwargs) -> Callable:
    """:func:`compile` of ``grad_fn`` in ``reduce-overhead`` mode: each call replays a CUDA graph.

    A replay launches the whole forward and backward at once, so a step whose host
    launches kernels more slowly than the GPU runs them (small models, a VLM's many
    short kernels) stops waiting on the host. Parameters (trainable and frozen) are
    read where they are (``torch._dynamo.mark_static_address``), so they must keep
    their storage between steps, as the in-place optimizers do; the batch is copied
    into the graph's inputs. Each call starts a new step
    (``torch.compiler.cudagraph_mark_step_begin``): its outputs are overwritten by the
    next call, so use or copy them first (the returned function has
    ``reuses_outputs = True``, which tells :func:`accumulate` to copy). Each new batch
    shape records another graph. Attention runs on SDPA (``ops.use(attention="sdpa")``):
    for packed documents that is a dense document mask, which reads no sizes on the host,
    where ``flash_attn``'s varlen entry point would.
    """
    mode = compile_kwargs.pop("mode", "reduce-overhead")
    if mode != "reduce-overhead":
        raise ValueError(f"CUDA graphs compile in mode 'reduce-overhead', got mode={mode!r}")
    compiled = compile(grad_fn, mode="reduce-overhead", **compile_kwargs)
    for t in frozen.values():
        torch._dynamo.mark_static_address(t)

    def fn(trainable: Flat, batch: dict, normalizer: Tensor):
        for t in trainable.values():
            torch._dynamo.mark_static_address(t)
        torch.compiler.cudagraph_mark_step_begin()
        with ops.use(attention="sdpa"):
            return compiled(trainable, batch, normalizer)

    fn.reuses_outputs = True
    return fn


# --------------------------------------------------------------------------- the step


class Reducer(Protocol):
    """Sums across data-parallel ranks (see :mod:`.distributed`); ``None`` means one process.

    A reducer that also has ``overlap = True`` and the methods ``start_overlap(params,
    prior)``, ``grad_ready(name, grad)`` and ``finish_overlap_(grads)`` (as
    :class:`~ghostvis.train.distributed.DataParallel` does) gets its gradients during the
    backward instead of after it.
    """

    def sum_(self, t: Tensor) -> Tensor: ...

    def sum_grads_(self, grads: Flat) -> Flat: ...


def overlaps(reducer) -> bool:
    """True when ``reducer`` asks for, and supports, reducing gradients during the backward."""
    return (reducer is not None and bool(getattr(reducer, "overlap", False))
            and all(callable(getattr(reducer, m, None)) for m in ("start_overlap", "grad_ready", "finish_overlap_")))


def accumulate_overlapped(grad_fn: Callable, tapped_fn: Callable, reducer, trainable: Flat,
                          micro_batches: Sequence[dict], normalizer: Tensor) -> tuple[Flat, Tensor]:
    """:func:`accumulate` followed by the reducer's sum, with the sum overlapping the last backward.

    The micro-batches before the last run ``grad_fn`` and are summed locally; the last
    runs ``tapped_fn`` (the same gradient function with ``grad_sink=reducer.grad_ready``),
    whose backward feeds each leaf's gradient, plus the earlier sum, to the reducer as it
    arrives. Returns the all-reduced gradient total and this rank's summed loss.
    """
    if not micro_batches:
        raise ValueError("accumulate needs at least one micro-batch")
    *head, last = micro_batches
    prior, loss = accumulate(grad_fn, trainable, head, normalizer) if head else (None, None)
    reducer.start_overlap(trainable, prior)
    grads, value = tapped_fn(trainable, last, normalizer)
    if prior is not None:
        torch._foreach_add_(list(prior.values()), [grads[k] for k in prior])
        grads = prior
    else:
        loss = torch.zeros((), dtype=torch.float32, device=normalizer.device)
    return reducer.finish_overlap_(grads), loss + value.detach().float()


class StepResult:
    """What one step did: ``loss`` (the token-mean over the global batch), ``grad_norm`` (before
    clipping), ``tokens`` (its supervised count) and ``skipped`` (non-finite: nothing was updated).

    A train step's numbers stay on the device until read: :meth:`from_device` starts their copy
    to the host and the first read of any of them waits for that copy alone. The step's optimizer
    update is queued behind it, so reading a step's result does not wait for its update, and a
    loop that reads step ``n``'s numbers after queueing step ``n + 1`` keeps work queued ahead
    of the GPU.
    """

    def __init__(self, loss: float = math.nan, grad_norm: float = math.nan, tokens: int = 0,
                 skipped: bool = False):
        self._values = (float(loss), float(grad_norm), int(tokens), bool(skipped))
        self._pending: Optional[tuple[Tensor, Optional[torch.cuda.Event]]] = None

    @classmethod
    def from_device(cls, stats: Tensor) -> "StepResult":
        """A result read later from ``stats``: ``[loss, grad_norm, tokens, skipped]`` (a 1-D tensor)."""
        result = cls()
        if stats.is_cuda:
            host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(stats.device))  # the copy's stream, whatever the current device
            result._pending = (host, done)
        else:
            result._pending = (stats, None)
        return result

    def ready(self) -> bool:
        """Whether the numbers can be read without waiting for the device."""
        return self._pending is None or self._pending[1] is None or self._pending[1].query()

    def _read(self) -> tuple[float, float, int, bool]:
        if self._pending is not None:
            host, done = self._pending
            if done is not None:
                done.synchronize()
            loss, norm, tokens, skipped = host.tolist()
            self._values, self._pending = (loss, norm, int(tokens), bool(skipped)), None
        return self._values

    loss = property(lambda self: self._read()[0], doc="token-mean loss over the global batch")
    grad_norm = property(lambda self: self._read()[1], doc="global gradient norm before clipping")
    tokens = property(lambda self: self._read()[2], doc="supervised tokens in the global batch")
    skipped = property(lambda self: self._read()[3], doc="non-finite loss or gradient norm: nothing was updated")

    def __repr__(self) -> str:
        loss, norm, tokens, skipped = self._read()
        return f"StepResult(loss={loss}, grad_norm={norm}, tokens={tokens}, skipped={skipped})"


def make_train_step(cfg, optimizer, frozen: Flat, *, grad_clip: float = 1.0, remat_blocks: bool = False,
                    remat_policy: str = "full",
                    compile_grad: bool = False, autocast: Optional[torch.dtype] = None,
                    reducer: Optional[Reducer] = None, compile_kwargs: Optional[dict] = None,
                    cuda_graphs: bool = False) -> Callable:
    """Compose grad (+ remat, + compile), accumulation, all-reduce, clipping and the optimizer update.

    Returns ``train_step(trainable, opt_state, micro_batches, step) -> (trainable, opt_state, StepResult)``.
    Params and optimizer state are updated in place (see :mod:`.optim`); a step with a
    non-finite loss or gradient norm updates nothing.

    A compiled step with fused AdamW (the default on CUDA) does not wait for the device:
    clipping runs on the device, and the skip is the optimizer's ``found_inf`` flag, so the
    whole step is queued and the :class:`StepResult` is read later. Where the host does wait:
    an eager step once, in the loss, where it gathers the supervised positions before the LM
    head (a size only the data knows; it saves the head's work on unsupervised rows); and
    optimizers that read ``found_inf`` on the host (Muon, unfused AdamW, AdamW with no
    parameters on this rank) or take none (:func:`ghostvis.train.optim.update_or_skip`).

    With a reducer that overlaps (:func:`overlaps`), the gradient all-reduce runs during
    the last micro-batch's backward (:func:`accumulate_overlapped`). Not with
    ``compile_grad``: ``torch.compile`` traces the taps' backward and drops the Python
    call to the reducer (the sink is never called), so the reducer then sums the
    finished gradients after the backward (``sum_grads_``).

    ``cuda_graphs`` (with ``compile_grad``, on CUDA, without remat) replays the compiled
    gradient function as a CUDA graph (:func:`graphed`).
    """
    if cuda_graphs and not (compile_grad and not remat_blocks):
        raise ValueError("cuda_graphs needs compile_grad and no remat_blocks (it replays the compiled step)")
    kw = dict(remat_blocks=remat_blocks, remat_policy=remat_policy, select=not compile_grad, autocast=autocast)
    grad_fn = value_and_grad(cfg, frozen, **kw)
    if cuda_graphs:
        grad_fn = graphed(grad_fn, frozen, **(compile_kwargs or {}))
    elif compile_grad:
        grad_fn = compile_value_and_grad(grad_fn, remat_blocks=remat_blocks, **(compile_kwargs or {}))
    overlap = overlaps(reducer) and not compile_grad
    if overlaps(reducer) and compile_grad:
        log.info("gradient all-reduce: after the backward (it cannot overlap a compiled backward)")
    tapped_fn = value_and_grad(cfg, frozen, **kw, grad_sink=reducer.grad_ready) if overlap else None

    def train_step(trainable: Flat, opt_state: dict, micro_batches: Sequence[dict], step: int):
        device = next(iter(trainable.values())).device
        tokens = sum(supervised_tokens(mb) for mb in micro_batches).to(device)
        if reducer is not None:
            tokens = reducer.sum_(tokens)
        normalizer = tokens.clamp(min=1).float()
        if overlap:
            grads, loss = accumulate_overlapped(grad_fn, tapped_fn, reducer, trainable, micro_batches, normalizer)
        else:
            grads, loss = accumulate(grad_fn, trainable, micro_batches, normalizer)
            if reducer is not None:
                grads = reducer.sum_grads_(grads)
        if reducer is not None:
            loss = reducer.sum_(loss)
        # no host sync: the numbers are copied back while the update runs, and a non-finite step is
        # skipped by the optimizer on the device (found_inf), so the next step can be queued at once
        norm = global_norm(grads)
        stats = torch.stack([loss.double(), norm.double(), tokens.double()])
        bad = ~torch.isfinite(stats[:2]).all()
        result = StepResult.from_device(torch.cat([stats, bad.double()[None]]))
        scale_to_max_norm_(grads, grad_clip, norm)
        trainable, opt_state = update_or_skip(optimizer, trainable, grads, opt_state, step, bad.float())
        return trainable, opt_state, result

    return train_step
