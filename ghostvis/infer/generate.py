"""Batched generation with a static KV cache: prefill once, then one captured decode step per token.

    out = generate(params, cfg, [ids_a, ids_b], max_new_tokens=32, stop_ids=[tok.end_id, tok.eos_id])
    for step in stream(params, cfg, [ids]):   # tokens as they are produced
        print(step[0])

Prompts of different lengths share one batch: they are left-padded, padding
keys are masked out and every row gets its own RoPE positions (see
:mod:`.kv_cache`). Images are encoded once, merged into the prompt embeddings
and prefilled with the text; decoding never looks at them again.

On CUDA the decode step (embedding, all blocks, LM head) is captured once as
a CUDA graph and replayed for every token, so small-batch decoding is not
bound by Python and kernel launches. Shapes are static within a generation,
so one capture serves all of its steps. On the CPU the same step runs eagerly.

``compile=True`` also runs the step through ``torch.compile`` before capture,
and the q/k/v and gate/up weights are stacked once per call
(:func:`ghostvis.core.decoder.fuse_projections`) so each block runs one matmul
for each. The prefill is compiled and captured too, per prompt width: prompts
are left-padded to a multiple of :data:`PROMPT_BUCKET` tokens so that nearby
lengths share one graph. Without gradients the cached path takes the decode
kernels of :mod:`ghostvis.ops.decode` (split-KV attention, the residual add fused
into the next RMSNorm, RoPE fused with the cache write, a one-row GEMV). The
host never waits for the step it just launched: the next step is queued before
the tokens of the current one are read back.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional, Sequence

import torch

from .. import ops
from ..core import decoder as _decoder
from ..core.config import ModelConfig
from ..core.tree import flatten
from ..core.model import ImageTokenMismatch, embed, encode_images, forward
from ..ops.library import lower_as_fallbacks
from .kv_cache import attention_mask, init_kv_cache, key_valid, left_pad, positions_at
from .sampling import check_sampling, sample

Tensor = torch.Tensor
log = logging.getLogger(__name__)
Step = Callable[[Tensor, int], Tensor]


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                  images: Optional[Sequence[Sequence[Tensor]]]) -> None:
    """Raise a ValueError naming the first bad prompt (empty, out of vocab, too long, image mismatch)."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images has {len(images)} entries but there are {len(prompts)} prompts "
                         "(give one list of images per prompt, [] for a text-only prompt)")
    vocab, context = cfg.text.vocab_size, cfg.text.max_seq_len
    for row, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {row} is empty")
        if len(p) > context:
            raise ValueError(f"prompt {row} has {len(p)} tokens, longer than the model's context "
                             f"(max_seq_len={context})")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {row} has token ids outside [0, {vocab}): {bad[:5]}")
        n_images = 0 if images is None else len(images[row])
        if n_images and not cfg.is_vlm:
            raise ImageTokenMismatch(f"prompt {row} comes with {n_images} images but the model is text-only")
        found = sum(t == cfg.image_token_id for t in p) if cfg.image_token_id is not None else 0
        if found != n_images * cfg.num_image_tokens:
            raise ImageTokenMismatch(f"prompt {row} has {found} <|image|> placeholders but {n_images} images x "
                                     f"{cfg.num_image_tokens} tokens per image = {n_images * cfg.num_image_tokens}")


def stack_images(images: Optional[Sequence[Sequence[Tensor]]], device, dtype) -> Optional[Tensor]:
    """All images of all prompts, in reading order, as one ``[N, C, H, W]`` tensor (None if there are none)."""
    flat = [img for row in images or [] for img in row]
    return torch.stack(flat).to(device=device, dtype=dtype) if flat else None


def prefill(params: dict, cfg: ModelConfig, tokens: Tensor, pad: Tensor, valid: Tensor, cache: list,
            images: Optional[Tensor], text_fn: Optional[Callable] = None) -> Tensor:
    """Run the left-padded prompts ``[B, P]`` through the model, filling slots ``0..P-1`` of ``cache``.

    Returns the float32 logits ``[B, vocab]`` at the last prompt position. Images are encoded
    and merged here; the decoder part runs as ``text_fn`` (:func:`prefill_text` or its compiled form).
    """
    image_embeds = encode_images(params, cfg, images) if images is not None else None
    x = embed(params, cfg, tokens, image_embeds=image_embeds)
    return (text_fn or prefill_text)(params, cfg, x, pad, valid, cache)


def prefill_text(params: dict, cfg: ModelConfig, x: Tensor, pad: Tensor, valid: Tensor, cache: list) -> Tensor:
    """The decoder part of :func:`prefill`, from the prompt embeddings ``x`` ``[B, P, dim]``."""
    cache_pos = torch.arange(x.shape[1], device=x.device)
    h = _decoder.decode_hidden(params["text"], cfg.text, x, positions_at(cache_pos, pad), kv_cache=cache,
                               cache_pos=cache_pos, attn_mask=attention_mask(cache_pos, valid))
    return _decoder.logits(params["text"], h[:, -1]).float()


def decode_step(params: dict, cfg: ModelConfig, cache: list, pad: Tensor, valid: Tensor, tokens: Tensor,
                cache_pos: Tensor) -> Tensor:
    """Write ``tokens`` ``[B]`` at slot ``cache_pos`` ``[1]``; return the float32 next-token logits ``[B, vocab]``.

    Only tensor ops with static shapes, no host syncs: safe to capture in a CUDA graph.
    """
    x = params["text"]["embed"][tokens[:, None]]
    h = _decoder.decode_hidden(params["text"], cfg.text, x, positions_at(cache_pos, pad), kv_cache=cache,
                               cache_pos=cache_pos, attn_mask=attention_mask(cache_pos, valid))
    return _decoder.logits(params["text"], h[:, 0]).float()


def eager_step(fn: Callable, params: dict, cfg: ModelConfig, cache: list, pad: Tensor, valid: Tensor) -> Step:
    """``step(tokens, slot) -> logits`` calling ``fn`` (:func:`decode_step` or its compiled form) directly."""
    def step(tokens: Tensor, slot: int) -> Tensor:
        return fn(params, cfg, cache, pad, valid, tokens, torch.tensor([slot], device=tokens.device))
    return step


_COMPILED: dict = {}
# op backends the compiled step is traced with (``ghostvis.ops.use`` keywords); empty = the usual choice
COMPILED_DECODE_OPS: dict[str, str] = {}


_RECOMPILE_LIMIT_ERRORS = tuple(getattr(torch._dynamo.exc, name) for name in
                                ("FailOnRecompileLimitHit", "FailOnCacheLimitHit") if hasattr(torch._dynamo.exc, name))


def compiled_decode_step() -> Callable:
    """:func:`decode_step` under ``torch.compile`` (built once; recompiles only for new shapes).

    Every new batch size, cache size, config or dtype compiles again; past dynamo's recompile
    limit the step runs eagerly (still captured as a CUDA graph) and says so once.
    """
    return _compiled("step", decode_step)


def compiled_prefill_text() -> Callable:
    """:func:`prefill_text` under ``torch.compile``, like :func:`compiled_decode_step`.

    ``generate(compile=True)`` pads prompts to a multiple of :data:`PROMPT_BUCKET` tokens, so
    prompts of nearby lengths share one compiled prefill.
    """
    return _compiled("prefill", prefill_text)


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        lower_as_fallbacks()
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)

        def run(*args):
            with ops.use(**COMPILED_DECODE_OPS):
                try:
                    return compiled(*args)
                except _RECOMPILE_LIMIT_ERRORS:
                    if not _COMPILED.get(f"warned_{name}"):
                        _COMPILED[f"warned_{name}"] = True
                        log.warning("%s: torch.compile's recompile limit reached (too many distinct batch/cache "
                                    "shapes); running it uncompiled for new shapes", fn.__name__)
                    return fn(*args)

        _COMPILED[name] = run
    return _COMPILED[name]


PROMPT_BUCKET = 64  # compiled generation left-pads prompts to a multiple of this many tokens


def _capture(run: Callable[[], Tensor], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Warm ``run`` up on a side stream (as capture requires), then capture it: ``(graph, its output)``."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


# Capture the decode step's kernels with programmatic dependent launch (Hopper and later): each
# kernel starts while the one before it finishes, and the one-row GEMVs stream their weights in
# meanwhile (``ops.kernels.programmatic_launch``). Safe there because no kernel of a decode step
# writes a weight. On an H100 at d20 it took batch 1 from 1,005 to 1,377 tok/s (bf16) and from
# 1,192 to 1,436 (INT8), and cost batch 32 4-5% (BENCHMARKS.md), so it is used up to
# DECODE_PDL_MAX_BATCH rows (sizes between 1 and 32 were not measured).
DECODE_PDL = True
DECODE_PDL_MAX_BATCH = 1


def _programmatic_launch(on: bool):
    try:
        from ..ops.kernels import programmatic_launch
    except ImportError:  # no triton: no kernels to launch that way
        return contextlib.nullcontext()
    return programmatic_launch(on)


def cuda_graph_step(fn: Callable, params: dict, cfg: ModelConfig, cache: list, pad: Tensor, valid: Tensor) -> Step:
    """``step(tokens, slot) -> logits`` that captures ``fn`` (:func:`decode_step` or its compiled form)
    as a CUDA graph on first use.

    Inputs are copied into static buffers and the graph replayed; the returned
    logits live in the graph's static output (valid until the next call). The
    warm-up before capture rewrites the first step's slot, which is harmless.
    The kernels are captured with programmatic dependent launch where :data:`DECODE_PDL` and the
    batch has at most :data:`DECODE_PDL_MAX_BATCH` rows.
    """
    static_tokens = torch.zeros(pad.shape[0], dtype=torch.long, device=pad.device)
    static_slot = torch.zeros(1, dtype=torch.long, device=pad.device)
    captured = None

    def step(tokens: Tensor, slot: int) -> Tensor:
        nonlocal captured
        static_tokens.copy_(tokens)
        static_slot.fill_(slot)
        if captured is None:
            with _programmatic_launch(DECODE_PDL and pad.shape[0] <= DECODE_PDL_MAX_BATCH):
                captured = _capture(lambda: fn(params, cfg, cache, pad, valid, static_tokens, static_slot),
                                    pad.device)
        captured[0].replay()
        return captured[1]

    return step


PREFILL_GRAPHS = 4  # captured prefill widths a decode session keeps


def cuda_graph_prefill(fn: Callable) -> Callable:
    """``fn`` (:func:`prefill_text` or its compiled form) captured as a CUDA graph per input shape.

    A prefill launches a few hundred kernels for a few milliseconds of GPU work, so
    from Python it is bound by launches; replaying a graph is not. Each new
    ``[B, P, dim]`` shape is captured on first use (the last :data:`PREFILL_GRAPHS` are
    kept); later calls copy ``x`` into the graph's input and replay it. The other
    arguments must be the same tensors at every call (a decode session's).
    """
    graphs: dict = {}

    def run(params: dict, cfg: ModelConfig, x: Tensor, pad: Tensor, valid: Tensor, cache: list) -> Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in graphs:
            if len(graphs) >= PREFILL_GRAPHS:
                graphs.pop(next(iter(graphs)))
            static_x = x.clone()
            graphs[key] = (static_x, *_capture(lambda: fn(params, cfg, static_x, pad, valid, cache), x.device))
        static_x, graph, out = graphs[key]
        static_x.copy_(x)
        graph.replay()
        return out

    return run


@torch.no_grad()
def stream(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
           images: Optional[Sequence[Sequence[Tensor]]] = None, *, max_new_tokens: int = 64,
           stop_ids: Sequence[int] = (), temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, seed: Optional[int] = None,
           cuda_graph: Optional[bool] = None, compile: bool = False,
           reuse: bool = False) -> Iterator[list[Optional[int]]]:
    """Generate token by token: yields, per decoding step, one entry per prompt.

    An entry is the new token id of that row, or None once the row has stopped
    (a stop token is never yielded). The arguments are those of :func:`generate`.
    Stops after ``max_new_tokens`` steps, when every row has stopped, or when
    the longest prompt plus the new tokens fills the context (``max_seq_len``).
    """
    check_sampling(temperature, top_k, top_p)
    check_prompts(cfg, prompts, images)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    weight = params["text"]["embed"]
    device, dtype = weight.device, weight.dtype
    longest = max(len(p) for p in prompts)
    n_new = min(max_new_tokens, cfg.text.max_seq_len - longest)
    if n_new <= 0:
        return
    if compile:
        # compiled code recompiles per shape: more left padding (which every row's positions and
        # mask already account for) rounds the prompt width, and the cache slots, up to a few sizes
        longest = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    slots = longest + n_new
    if compile:
        slots = min(-(-slots // 256) * 256, max(cfg.text.max_seq_len, slots))
    pad_id = 0 if cfg.image_token_id != 0 else 1  # any id that is not an image placeholder
    tokens, pad = left_pad([list(p) for p in prompts], pad_id, device, width=longest)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    session = decode_session(params, cfg, len(prompts), slots, use_graph=use_graph, compile=compile, keep=reuse)
    session["busy"] = True
    session["pad"].copy_(pad)
    session["valid"].copy_(key_valid(pad, slots))
    try:
        logits = prefill(session["params"], cfg, tokens, session["pad"], session["valid"], session["cache"],
                         stack_images(images, device, dtype), session["prefill"])
        yield from _decode(session["step"], logits, n_new, longest, pad_id, stop_ids, temperature, top_k, top_p,
                           seed, device)
    finally:
        session["busy"] = False


_SESSION: dict = {}


def decode_session(params: dict, cfg: ModelConfig, batch: int, slots: int, *, use_graph: bool,
                   compile: bool, keep: bool = False) -> dict:
    """The KV cache, static inputs and (captured) decode step for ``batch`` rows of ``slots`` slots.

    With ``keep``, the session is kept after the call and handed to the next ``keep`` call with
    the same shapes, config and weights (the same tensors, unmodified: an in-place update bumps
    a tensor's version and forces a new session), so repeated calls skip the cache allocation,
    the stacking of the projections and the graph's warm-up and capture. The kept session holds
    its KV cache (and stacked weights) in memory until :func:`release_decode_session` or the next
    session replaces it. A session in use by a live :func:`stream` is never shared.
    """
    weight = params["text"]["embed"]
    key = (cfg.text, batch, slots, str(weight.device), weight.dtype, use_graph, compile, DECODE_PDL,
           tuple((id(t), t._version) for t in flatten(params["text"]).values()))
    cached = _SESSION.get("entry")
    if keep and cached is not None and cached["key"] == key and not cached["busy"]:
        _SESSION["hits"] = _SESSION.get("hits", 0) + 1
        return cached
    if keep and cached is not None and not cached["busy"]:
        release_decode_session()  # free its cache and graph before allocating the next
    device = weight.device
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    cache = init_kv_cache(cfg.text, batch, slots, device=device, dtype=weight.dtype)
    run_params = {**params, "text": _decoder.fuse_projections(params["text"])} if compile else params
    fn = compiled_decode_step() if compile else decode_step
    step = (cuda_graph_step if use_graph else eager_step)(fn, run_params, cfg, cache, pad, valid)
    # compiled generation buckets the prompt widths, so a few captured prefills serve every call
    prefill_fn = (cuda_graph_prefill(compiled_prefill_text()) if use_graph else compiled_prefill_text()) \
        if compile else prefill_text
    session = {"key": key, "pad": pad, "valid": valid, "cache": cache, "step": step, "busy": False,
               "params": run_params, "prefill": prefill_fn}
    if keep and "entry" not in _SESSION:
        _SESSION["entry"] = session
    return session


def release_decode_session() -> None:
    """Drop the kept decode session (its KV cache, stacked weights and CUDA graph)."""
    _SESSION.pop("entry", None)


def _decode(step: Step, logits: Tensor, n_new: int, longest: int, pad_id: int, stop_ids: Sequence[int],
            temperature: float, top_k: Optional[int], top_p: Optional[float], seed: Optional[int],
            device: torch.device) -> Iterator[list[Optional[int]]]:
    """The sampling loop of :func:`stream` after the prefill."""
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    on_cuda = device.type == "cuda"
    readback = torch.empty((2, logits.shape[0]), dtype=torch.long, pin_memory=on_cuda)
    for i in range(n_new):
        nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        finished = done | torch.isin(nxt, stop)
        readback.copy_(torch.stack([nxt, finished.long()]), non_blocking=on_cuda)
        ready = None
        if on_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        if i < n_new - 1:
            # queue the next step before reading this one back, so the GPU never waits for the host;
            # finished rows keep decoding (static shapes) on a harmless token
            logits = step(torch.where(done, pad_id, nxt), longest + i)
        if ready is not None:
            ready.synchronize()
        ids, stopped = readback.tolist()
        yield [None if d else t for t, d in zip(ids, stopped)]
        if all(stopped):
            return
        done = finished


def generate(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             images: Optional[Sequence[Sequence[Tensor]]] = None, *, max_new_tokens: int = 64,
             stop_ids: Sequence[int] = (), temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None,
             on_token: Optional[Callable[[int, int], None]] = None,
             cuda_graph: Optional[bool] = None, compile: bool = False, reuse: bool = False) -> list[list[int]]:
    """Continue each prompt; returns the generated ids only (no prompt, no stop token).

    Args:
        params, cfg: the model (any float dtype; INT8-quantized params work too).
        prompts: token id lists, of any lengths up to ``cfg.text.max_seq_len``.
        images: per prompt, the ``[C, H, W]`` normalised images whose
            ``<|image|>`` placeholders already appear in its ids (``[]`` for none).
        max_new_tokens: most tokens generated per prompt.
        stop_ids: ids that end a row (e.g. ``<|end|>``, ``<|eos|>``); excluded from the output.
        temperature: 0 is greedy; otherwise sampling at this temperature.
        top_k, top_p: keep only the k most likely tokens / the smallest set with mass ``top_p``.
        seed: seeds the sampler, so the same call gives the same tokens (on the same device).
        on_token: called as ``on_token(row, token_id)`` for every generated token, as it comes.
        cuda_graph: capture the decode step as a CUDA graph (default: on for CUDA params).
        compile: ``torch.compile`` the decode step and the prefill (stacked projections; on CUDA
            the prefill is captured as a CUDA graph per prompt width); the first call per shape
            pays the compile time, later calls reuse it. The stacked q/k/v and gate/up weights
            are a copy made per call (~2/3 of the decoder's weights) unless ``reuse`` keeps them.
        reuse: keep the KV cache, stacked weights and captured step for the next call with the
            same shapes and weights (see :func:`decode_session`); for chat loops and benchmarks.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in stream(params, cfg, prompts, images, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, cuda_graph=cuda_graph,
                         compile=compile, reuse=reuse):
        for row, t in enumerate(tokens):
            if t is not None:
                out[row].append(t)
                if on_token is not None:
                    on_token(row, t)
    return out


@torch.no_grad()
def generate_uncached(params: dict, cfg: ModelConfig, prompt: Sequence[int], images: Sequence[Tensor] = (), *,
                      max_new_tokens: int = 64, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy generation by re-running the full forward for every token: slow, the oracle for tests."""
    check_prompts(cfg, [prompt], [list(images)])
    weight = params["text"]["embed"]
    ids = list(prompt)
    image_batch = stack_images([list(images)], weight.device, weight.dtype)
    out: list[int] = []
    for _ in range(min(max_new_tokens, cfg.text.max_seq_len - len(prompt))):
        logits = forward(params, cfg, torch.tensor([ids], device=weight.device), image_batch)
        nxt = int(logits[0, -1].float().argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
        ids.append(nxt)
    return out
