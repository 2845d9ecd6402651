"""The Llama/Qwen3-family decoder as pure functions over its parameter subtree.

Layout of ``params["text"]`` (weights are ``[out, in]``, like ``nn.Linear``)::

    embed            [vocab, dim]
    layers[i].attn_norm              [dim]
    layers[i].attn.wq / wk / wv      [n_heads*hd, dim] / [n_kv*hd, dim] / [n_kv*hd, dim]
    layers[i].attn.bq / bk / bv      (qkv_bias only)
    layers[i].attn.q_norm / k_norm   [hd]  (qk_norm only)
    layers[i].attn.wo                [dim, n_heads*hd]
    layers[i].mlp_norm               [dim]
    layers[i].mlp.w_gate / w_up      [ffn, dim]
    layers[i].mlp.w_down             [dim, ffn]
    norm             [dim]
    lm_head          [vocab, dim]  (absent when tie_embeddings)

:func:`fuse_projections` gives the same model in a stacked layout: ``attn.wqkv``
(``wq``, ``wk``, ``wv`` stacked along the output dim, biases likewise as ``bqkv``)
and ``mlp.w_gate_up``, so a block runs one matmul where it ran three and two.
Generation uses it, and so does training (stacked inside the loss, so gradients and
optimizer state stay per matrix). The blocks accept either layout; checkpoints and HF
interop keep the separate one.

Nothing here holds state. The optional KV cache is a pair of preallocated
buffers per layer that :func:`attention_block` writes in place at ``cache_pos``
(the one documented exception, like a donated buffer in JAX).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .config import TextConfig
from .init_utils import Init

Tensor = torch.Tensor


def init_text(cfg: TextConfig, init: Init) -> dict:
    """Fresh decoder parameters (layout in the module docstring)."""
    hd, d = cfg.head_dim, cfg.dim
    out_std = 0.02 / (2 * cfg.n_layers) ** 0.5  # residual-branch outputs start small
    layers = []
    for _ in range(cfg.n_layers):
        attn = {
            "wq": init.normal(cfg.n_heads * hd, d),
            "wk": init.normal(cfg.n_kv_heads * hd, d),
            "wv": init.normal(cfg.n_kv_heads * hd, d),
            "wo": init.normal(d, cfg.n_heads * hd, std=out_std),
        }
        if cfg.qkv_bias:
            attn |= {"bq": init.zeros(cfg.n_heads * hd), "bk": init.zeros(cfg.n_kv_heads * hd),
                     "bv": init.zeros(cfg.n_kv_heads * hd)}
        if cfg.qk_norm:
            attn |= {"q_norm": init.ones(hd), "k_norm": init.ones(hd)}
        mlp = {"w_gate": init.normal(cfg.ffn_dim, d), "w_up": init.normal(cfg.ffn_dim, d),
               "w_down": init.normal(d, cfg.ffn_dim, std=out_std)}
        layers.append({"attn_norm": init.ones(d), "attn": attn, "mlp_norm": init.ones(d), "mlp": mlp})
    params = {"embed": init.normal(cfg.vocab_size, d), "layers": layers, "norm": init.ones(d)}
    if not cfg.tie_embeddings:
        params["lm_head"] = init.normal(cfg.vocab_size, d)
    return params


def rope_tables(cfg: TextConfig, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, T, head_dim]`` (float32) for integer ``positions`` ``[B, T]``."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def project(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """A linear layer; INT8-quantized weights (a dict with ``q`` and ``scale``) take the INT8 kernel."""
    if isinstance(w, dict):
        return ops.int8_linear(x, w["q"], w["scale"], b)
    return ops.linear(x, w, b)


def fuse_projections(params: dict) -> dict:
    """The text params with q/k/v and gate/up weights stacked into one matrix each (see module docstring).

    INT8 weights (dicts of ``q`` and ``scale``) are stacked too. The stacked tensors
    are new memory; ``params`` is left untouched.
    """
    return {**params, "layers": [fuse_layer(lp) for lp in params["layers"]]}


def fuse_layer(lp: dict) -> dict:
    """One block's params in the stacked layout of :func:`fuse_projections` (already stacked: as is)."""
    def stack(ws):
        if isinstance(ws[0], dict):
            return {key: torch.cat([w[key] for w in ws]) for key in ws[0]}
        return torch.cat(ws)

    out = dict(lp)
    if "attn" in lp and "wqkv" not in lp["attn"]:
        attn = {k: v for k, v in lp["attn"].items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv")}
        attn["wqkv"] = stack([lp["attn"]["wq"], lp["attn"]["wk"], lp["attn"]["wv"]])
        if "bq" in lp["attn"]:
            attn["bqkv"] = torch.cat([lp["attn"]["bq"], lp["attn"]["bk"], lp["attn"]["bv"]])
        out["attn"] = attn
    if "mlp" in lp and "w_gate_up" not in lp["mlp"]:
        mlp = {k: v for k, v in lp["mlp"].items() if k not in ("w_gate", "w_up")}
        mlp["w_gate_up"] = stack([lp["mlp"]["w_gate"], lp["mlp"]["w_up"]])
        out["mlp"] = mlp
    return out


def qkv(p: dict, cfg: TextConfig, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q ``[B, T, Hq*hd]``, k and v ``[B, T, Hkv*hd]`` of normalised ``x``, from either layout."""
    if "wqkv" in p:
        nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return project(x, p["wqkv"], p.get("bqkv")).split([nq, nk, nk], dim=-1)
    return project(x, p["wq"], p.get("bq")), project(x, p["wk"], p.get("bk")), project(x, p["wv"], p.get("bv"))


def attention_block(p: dict, cfg: TextConfig, x: Tensor, cos: Tensor, sin: Tensor, *,
                    doc_ids: Optional[Tensor] = None, kv_cache: Optional[tuple[Tensor, Tensor]] = None,
                    cache_pos: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
    """Self-attention of one block on already-normalised ``x`` ``[B, T, dim]``.

    Without a cache: causal attention over ``x`` (within documents if ``doc_ids``).
    With ``kv_cache=(k_buf, v_buf)`` (``[B, n_kv, S, hd]``): k/v are written at
    slots ``cache_pos`` ``[T]`` and the queries attend over the whole buffer
    under ``attn_mask`` ``[B, 1, T, S]`` (True = attend), which the caller builds.
    """
    if "wqkv" in p and kv_cache is None and not cfg.qk_norm:
        return attend_stacked(p, cfg, project(x, p["wqkv"], p.get("bqkv")), cos, sin, doc_ids=doc_ids)
    return attend(p, cfg, *qkv(p, cfg, x), cos, sin, doc_ids=doc_ids, kv_cache=kv_cache, cache_pos=cache_pos,
                  attn_mask=attn_mask)


def attend_stacked(p: dict, cfg: TextConfig, qkv: Tensor, cos: Tensor, sin: Tensor, *,
                   doc_ids: Optional[Tensor] = None) -> Tensor:
    """:func:`attend` (no KV cache, no qk-norm) from the stacked projection ``[B, T, (Hq + 2 Hkv) * hd]``.

    ``ops.qkv_rope`` splits it into heads and rotates q and k in one pass, and in the
    backward writes the projection's gradient as one tensor (no concatenation).
    """
    q, k, v = ops.qkv_rope(qkv, cos, sin, cfg.n_heads, cfg.n_kv_heads)
    return _merge_heads(p, cfg, ops.attention(q, k, v, causal=True, doc_ids=doc_ids))


def _merge_heads(p: dict, cfg: TextConfig, o: Tensor) -> Tensor:
    """The output projection of attention's ``o`` ``[B, H, T, hd]``."""
    b, _, t, hd = o.shape
    return project(o.transpose(1, 2).reshape(b, t, cfg.n_heads * hd), p["wo"])


def attend(p: dict, cfg: TextConfig, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, *,
           doc_ids: Optional[Tensor] = None, kv_cache: Optional[tuple[Tensor, Tensor]] = None,
           cache_pos: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
    """The rest of :func:`attention_block` from projected ``q`` ``[B, T, Hq*hd]``, ``k``, ``v``:
    qk-norm, RoPE, attention (cached or not) and the output projection."""
    b, t, _ = q.shape
    hd = cfg.head_dim
    q = q.reshape(b, t, cfg.n_heads, hd).transpose(1, 2)
    k = k.reshape(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
    v = v.reshape(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
    if cfg.qk_norm:
        q = ops.rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = ops.rms_norm(k, p["k_norm"], cfg.norm_eps)
    if kv_cache is None:
        q, k = ops.rope(q, k, cos, sin)
        o = ops.attention(q, k, v, causal=True, doc_ids=doc_ids)
    else:
        k_buf, v_buf = kv_cache
        q = ops.rope_into_cache(q, k, v, cos, sin, k_buf, v_buf, cache_pos)
        o = ops.attention(q, k_buf, v_buf, causal=False, mask=attn_mask)
    return _merge_heads(p, cfg, o)


def mlp_block(p: dict, x: Tensor) -> Tensor:
    """SwiGLU MLP on already-normalised ``x`` (separate or stacked gate/up weights).

    Stacked float weights go through ``ops.swiglu_mlp`` (its pieces by default; forced to
    ``epilogue``, one op with SwiGLU's backward inside the down projection's matmul).
    """
    if "w_gate_up" in p and not isinstance(p["w_gate_up"], dict) and not isinstance(p["w_down"], dict):
        return ops.swiglu_mlp(x, p["w_gate_up"], p["w_down"])
    if "w_gate_up" in p:
        h = ops.swiglu_stacked(project(x, p["w_gate_up"]))
    else:
        h = ops.swiglu(project(x, p["w_gate"]), project(x, p["w_up"]))
    return project(h, p["w_down"])


def block(p: dict, cfg: TextConfig, x: Tensor, cos: Tensor, sin: Tensor, **attn_kw) -> Tensor:
    """One pre-norm transformer block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))``."""
    x = x + attention_block(p["attn"], cfg, ops.rms_norm(x, p["attn_norm"], cfg.norm_eps), cos, sin, **attn_kw)
    return x + mlp_block(p["mlp"], ops.rms_norm(x, p["mlp_norm"], cfg.norm_eps))


def default_positions(tokens_or_embeds: Tensor) -> Tensor:
    """Positions ``0..T-1`` for every row of a ``[B, T, ...]`` input."""
    b, t = tokens_or_embeds.shape[:2]
    return torch.arange(t, device=tokens_or_embeds.device).expand(b, t)


def decode_hidden(params: dict, cfg: TextConfig, x: Tensor, positions: Optional[Tensor] = None, *,
                  doc_ids: Optional[Tensor] = None, kv_cache: Optional[list] = None,
                  cache_pos: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                  block_fn=None) -> Tensor:
    """Run all blocks on input embeddings ``x`` ``[B, T, dim]``; returns the final-normed hidden states.

    By default the blocks run as :func:`fused_blocks` (residual adds inside the norms).
    ``block_fn`` runs each block instead, in a loop of separate adds: :func:`block` itself,
    or a rematerialised version of it.
    """
    positions = default_positions(x) if positions is None else positions
    cos, sin = rope_tables(cfg, positions)
    if block_fn is None:
        return fused_blocks(params, cfg, x, cos, sin, doc_ids=doc_ids, kv_cache=kv_cache, cache_pos=cache_pos,
                            attn_mask=attn_mask)
    for i, lp in enumerate(params["layers"]):
        kw = {"doc_ids": doc_ids}
        if kv_cache is not None:
            kw |= {"kv_cache": kv_cache[i], "cache_pos": cache_pos, "attn_mask": attn_mask}
        x = block_fn(lp, cfg, x, cos, sin, **kw)
    return ops.rms_norm(x, params["norm"], cfg.norm_eps)


def fused_blocks(params: dict, cfg: TextConfig, x: Tensor, cos: Tensor, sin: Tensor, *,
                 doc_ids: Optional[Tensor] = None, kv_cache: Optional[list] = None,
                 cache_pos: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
    """The blocks and final norm of :func:`decode_hidden`, each residual add run with the norm after it.

    The same model as a loop of :func:`block`, but the loop carries each branch's output
    to the next norm, and ``ops.add_rms_norm`` adds it to the residual stream and
    normalises in one kernel. Its backward adds the residual stream's gradient inside the
    norm's backward kernel. Training, prefill and decoding (with ``kv_cache``) all run it.
    """
    eps, branch = cfg.norm_eps, None
    for i, lp in enumerate(params["layers"]):
        kw = {"doc_ids": doc_ids} if kv_cache is None else {
            "kv_cache": kv_cache[i], "cache_pos": cache_pos, "attn_mask": attn_mask}
        if kv_cache is not None and "wqkv" in lp["attn"] and "w_gate_up" in lp["mlp"]:
            x, branch = _cached_stacked_block(lp, cfg, x, branch, cos, sin, **kw)
            continue
        x, h = ops.add_rms_norm(x, branch, lp["attn_norm"], eps)
        a = attention_block(lp["attn"], cfg, h, cos, sin, **kw)
        x, h = ops.add_rms_norm(x, a, lp["mlp_norm"], eps)
        branch = mlp_block(lp["mlp"], h)
    return ops.add_rms_norm(x, branch, params["norm"], eps)[1]


def _weight_and_scale(w) -> tuple[Tensor, Optional[Tensor]]:
    """A projection weight as :func:`project` takes it (a tensor, or an INT8 dict) as ``(weight, scale)``."""
    return (w["q"], w["scale"]) if isinstance(w, dict) else (w, None)


def add_norm_project(x: Tensor, branch: Optional[Tensor], norm_weight: Tensor, eps: float, w,
                     b: Optional[Tensor] = None, *, gate: bool = False) -> tuple[Tensor, Tensor]:
    """``ops.add_rms_norm_linear`` for a weight as :func:`project` takes it (a tensor or an INT8 dict)."""
    weight, scale = _weight_and_scale(w)
    return ops.add_rms_norm_linear(x, branch, norm_weight, weight, eps, scale=scale, bias=b, gate=gate)


def _cached_stacked_block(lp: dict, cfg: TextConfig, x: Tensor, branch: Optional[Tensor], cos: Tensor,
                          sin: Tensor, *, kv_cache: tuple[Tensor, Tensor], cache_pos: Tensor,
                          attn_mask: Tensor) -> tuple[Tensor, Tensor]:
    """One block of :func:`fused_blocks` with a KV cache and stacked projections: returns the
    residual stream and the MLP's output. Each norm goes with the projection that reads it:
    ``ops.add_rms_norm_qkv_cache`` (add, norm, q/k/v, RoPE and the cache writes; without
    qk-norm) and ``ops.add_rms_norm_linear`` (add, norm, gate/up and SwiGLU), so that a
    decoding step's one row runs each as one kernel. Other shapes run the same pieces as the loop.

    Forcing a backend of ``linear``, ``add_rms_norm``, ``rope_into_cache`` or ``swiglu_mlp`` does
    not reach inside a one-row step's fused ops: force those two ops to ``unfused`` as well."""
    eps, attn, mlp = cfg.norm_eps, lp["attn"], lp["mlp"]
    if cfg.qk_norm:
        x, qkv_out = add_norm_project(x, branch, lp["attn_norm"], eps, attn["wqkv"], attn.get("bqkv"))
        nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        a = attend(attn, cfg, *qkv_out.split([nq, nk, nk], dim=-1), cos, sin, kv_cache=kv_cache,
                   cache_pos=cache_pos, attn_mask=attn_mask)
    else:
        weight, scale = _weight_and_scale(attn["wqkv"])
        k_buf, v_buf = kv_cache
        x, q = ops.add_rms_norm_qkv_cache(x, branch, lp["attn_norm"], weight, eps, cos, sin, k_buf, v_buf,
                                          cache_pos, scale=scale, bias=attn.get("bqkv"))
        a = _merge_heads(attn, cfg, ops.attention(q, k_buf, v_buf, causal=False, mask=attn_mask))
    x, act = add_norm_project(x, a, lp["mlp_norm"], eps, mlp["w_gate_up"], gate=True)
    return x, project(act, mlp["w_down"])


def lm_head_weight(params: dict) -> Tensor:
    """The LM head matrix (the embedding when tied)."""
    return params.get("lm_head", params["embed"])


def logits(params: dict, h: Tensor) -> Tensor:
    """LM-head logits for hidden states ``h``."""
    return project(h, lm_head_weight(params))
