"""The GhostVis forward in ``jax.numpy``, over the same parameter pytree.

An independent second implementation of the model (it shares no code with
``ghostvis.ops`` or ``ghostvis.core``'s math), so a JAX user can ``jax.jit`` and
``jax.grad`` a GhostVis model, and a PyTorch user can cross-check kernels
against it. Feed it the tree from :func:`ghostvis.interop.to_jax` or
:func:`ghostvis.interop.load_jax`; the layout is documented in
``ghostvis/core/decoder.py``, ``vision.py`` and ``connector.py``.

Every function is pure and shape-static, so ``cfg`` (a frozen, hashable
dataclass) is the only static argument under ``jax.jit``::

    logits = jax.jit(forward, static_argnums=1)(params, cfg, tokens, images)

Numerics follow the torch reference: norms, RoPE and softmax run in float32;
weights are ``[out, in]``; the vision MLP uses tanh-GELU, the ``mlp`` connector
exact GELU; the connector reads vision features from block ``feature_layer``
before the post-norm.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# ----------------------------------------------------------------------------- primitives


def linear(x: Array, w, b: Optional[Array] = None) -> Array:
    """``x @ w.T (+ b)`` for ``[out, in]`` weights; an INT8 weight ``{"q", "scale"}`` is dequantised per row."""
    if isinstance(w, dict):
        y = (x @ w["q"].astype(x.dtype).T) * w["scale"].astype(x.dtype)
    else:
        y = x @ w.T
    return y if b is None else y + b


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """RMSNorm over the last axis with a learned weight, in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: Array, w: Array, b: Array, eps: float) -> Array:
    """LayerNorm over the last axis (biased variance, like torch), in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def swiglu_mlp(x: Array, w_gate, w_up, w_down) -> Array:
    return linear(jax.nn.silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def attention(q: Array, k: Array, v: Array, allowed: Optional[Array] = None) -> Array:
    """Softmax attention with GQA, in float32.

    q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]``; query head ``h`` reads kv head
    ``h // (Hq // Hkv)``. ``allowed`` is a bool mask ``[B, Tq, Tk]`` (True = attend).
    Returns ``[B, Tq, Hq, D]``.
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, tq, hkv, hq // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * d**-0.5
    if allowed is not None:
        # a large finite negative keeps gradients finite; every query row here allows itself
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))
    return out.reshape(b, tq, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------- decoder


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin ``[B, T, head_dim]`` for integer positions ``[B, T]`` (frequencies repeated, half-split)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x`` ``[B, T, H, D]``: first and second halves of D form the (real, imaginary) pairs."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def decoder_mask(t: int, doc_ids: Optional[Array]) -> Array:
    """``[B|1, T, T]``: causal, and within one document when ``doc_ids`` ``[B, T]`` is given."""
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if doc_ids is None:
        return causal
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


def decoder_attention(p: dict, cfg, x: Array, cos: Array, sin: Array, allowed: Array) -> Array:
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = linear(x, p["wq"], p.get("bq")).reshape(b, t, cfg.n_heads, hd)
    k = linear(x, p["wk"], p.get("bk")).reshape(b, t, cfg.n_kv_heads, hd)
    v = linear(x, p["wv"], p.get("bv")).reshape(b, t, cfg.n_kv_heads, hd)
    if cfg.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = attention(q, k, v, allowed).reshape(b, t, cfg.n_heads * hd)
    return linear(o, p["wo"])


def decoder(params: dict, cfg, x: Array, positions: Optional[Array] = None,
            doc_ids: Optional[Array] = None) -> Array:
    """Final-normed hidden states ``[B, T, dim]`` of the decoder (``cfg`` a TextConfig) on embeddings ``x``."""
    b, t, _ = x.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    allowed = decoder_mask(t, doc_ids)
    for lp in params["layers"]:
        x = x + decoder_attention(lp["attn"], cfg, rms_norm(x, lp["attn_norm"], cfg.norm_eps), cos, sin, allowed)
        m = lp["mlp"]
        x = x + swiglu_mlp(rms_norm(x, lp["mlp_norm"], cfg.norm_eps), m["w_gate"], m["w_up"], m["w_down"])
    return rms_norm(x, params["norm"], cfg.norm_eps)


# ----------------------------------------------------------------------------- vision encoder


def patchify(images: Array, patch: int) -> Array:
    """``[N, C, H, W]`` -> ``[N, patches, C*p*p]``, patches row-major, features in the conv weight's (c, y, x) order."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def vision_block(p: dict, cfg, x: Array) -> Array:
    """One pre-LN SigLIP block: MHA with biases, then a tanh-GELU MLP."""
    n, t, d = x.shape
    a = p["attn"]
    h = layer_norm(x, p["ln1"]["weight"], p["ln1"]["bias"], cfg.norm_eps)
    q, k, v = (linear(h, a[w], a[b]).reshape(n, t, cfg.n_heads, cfg.head_dim)
               for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    x = x + linear(attention(q, k, v).reshape(n, t, d), a["wo"], a["bo"])
    m = p["mlp"]
    h = layer_norm(x, p["ln2"]["weight"], p["ln2"]["bias"], cfg.norm_eps)
    return x + linear(jax.nn.gelu(linear(h, m["w1"], m["b1"]), approximate=True), m["w2"], m["b2"])


def vision_features(params: dict, cfg, images: Array) -> Array:
    """Patch features ``[N, patches, dim]`` from block ``cfg.feature_layer`` (``cfg`` a VisionConfig), no post-norm."""
    w = params["patch_embed"]["weight"]
    x = linear(patchify(images.astype(w.dtype), cfg.patch_size), w.reshape(w.shape[0], -1),
               params["patch_embed"]["bias"]) + params["pos_embed"]
    for p in params["layers"][: cfg.layers_used]:
        x = vision_block(p, cfg, x)
    return x


# ----------------------------------------------------------------------------- connectors


def pixel_shuffle(x: Array, scale: int) -> Array:
    """``[N, g*g, d]`` -> ``[N, (g/s)^2, d*s*s]``: each output token concatenates an ``s x s`` block of patches."""
    n, t, d = x.shape
    g = int(round(t**0.5))
    x = x.reshape(n, g // scale, scale, g // scale, scale, d)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (g // scale) ** 2, d * scale * scale)


def perceiver(p: dict, cfg, feats: Array) -> Array:
    """Learned latents cross-attend to the projected patches; each block adds attention then a SwiGLU MLP."""
    heads, dt, eps = cfg.connector.n_heads, cfg.text.dim, cfg.text.norm_eps
    n = feats.shape[0]
    kv_in = linear(feats, p["in_proj"])
    x = jnp.broadcast_to(p["latents"].astype(kv_in.dtype), (n,) + p["latents"].shape)
    split = lambda y: y.reshape(n, y.shape[1], heads, dt // heads)  # noqa: E731
    for lp in p["layers"]:
        q_in, kv = rms_norm(x, lp["q_norm"], eps), rms_norm(kv_in, lp["kv_norm"], eps)
        o = attention(split(linear(q_in, lp["wq"])), split(linear(kv, lp["wk"])), split(linear(kv, lp["wv"])))
        x = x + linear(o.reshape(n, -1, dt), lp["wo"])
        x = x + swiglu_mlp(rms_norm(x, lp["mlp_norm"], eps), lp["w_gate"], lp["w_up"], lp["w_down"])
    return rms_norm(x, p["norm"], eps)


def connect(p: dict, cfg, feats: Array) -> Array:
    """Vision features -> ``[N, num_image_tokens, text_dim]`` with the configured connector."""
    kind = cfg.connector.kind
    if kind == "mlp":
        return linear(jax.nn.gelu(linear(feats, p["w1"], p["b1"]), approximate=False), p["w2"], p["b2"])
    if kind == "pixel_shuffle":
        return linear(pixel_shuffle(feats, cfg.connector.scale), p["w"])
    return perceiver(p, cfg, feats)


def encode_images(params: dict, cfg, images: Array) -> Array:
    """Connector outputs ``[N, num_image_tokens, text_dim]`` for normalised images ``[N, C, H, W]``."""
    return connect(params["connector"], cfg, vision_features(params["vision"], cfg.vision, images))


# ----------------------------------------------------------------------------- the whole model


def merge_images(x: Array, tokens: Array, image_embeds: Array, image_token_id: int) -> Array:
    """Put image tokens at the ``<|image|>`` placeholders of ``x`` ``[B, T, D]``, in reading order.

    Shape-static (jit-friendly): the k-th placeholder (row-major count, via a
    cumulative sum over the mask) takes row k of the flattened image tokens.
    """
    b, t, d = x.shape
    is_image = (tokens == image_token_id).reshape(-1)
    flat_images = image_embeds.reshape(-1, d).astype(x.dtype)
    index = jnp.clip(jnp.cumsum(is_image) - 1, 0, flat_images.shape[0] - 1)
    merged = jnp.where(is_image[:, None], flat_images[index], x.reshape(-1, d))
    return merged.reshape(b, t, d)


def check_image_tokens(cfg, tokens: Array, n_images: int) -> None:
    """Raise ``ValueError`` unless placeholders == images x tokens per image (skipped while tracing)."""
    if isinstance(tokens, jax.core.Tracer):
        return  # the count is not known under jit; the caller's batch building guarantees it
    found = 0 if cfg.image_token_id is None else int(jnp.sum(tokens == cfg.image_token_id))
    expected = n_images * cfg.num_image_tokens
    if found != expected:
        raise ValueError(f"found {found} <|image|> placeholder tokens but {n_images} images x "
                         f"{cfg.num_image_tokens} tokens per image = {expected}")


def hidden_states(params: dict, cfg, tokens: Array, images: Optional[Array] = None, *,
                  positions: Optional[Array] = None, doc_ids: Optional[Array] = None) -> Array:
    """Final-normed decoder hidden states ``[B, T, dim]`` (``cfg`` a ModelConfig)."""
    x = params["text"]["embed"][tokens]
    n_images = 0 if images is None else images.shape[0]
    check_image_tokens(cfg, tokens, n_images)
    if n_images:
        x = merge_images(x, tokens, encode_images(params, cfg, images), cfg.image_token_id)
    return decoder(params["text"], cfg.text, x, positions, doc_ids)


def forward(params: dict, cfg, tokens: Array, images: Optional[Array] = None, *,
            positions: Optional[Array] = None, doc_ids: Optional[Array] = None) -> Array:
    """Logits ``[B, T, vocab]``, the same contract as :func:`ghostvis.forward`."""
    h = hidden_states(params, cfg, tokens, images, positions=positions, doc_ids=doc_ids)
    return linear(h, params["text"].get("lm_head", params["text"]["embed"]))


def cross_entropy(logits: Array, targets: Array, ignore_index: int = -100) -> Array:
    """Mean token cross-entropy over targets != ``ignore_index`` (0 when none are supervised)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    keep = targets != ignore_index
    picked = jnp.take_along_axis(logp, jnp.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(keep, picked, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def loss(params: dict, cfg, batch: dict) -> Array:
    """Mean next-token loss of a GhostVis batch dict (``tokens``, ``targets``, optional ``images``,
    ``positions``, ``doc_ids``), as jax arrays. ``jax.grad(loss)(params, cfg, batch)`` gives the gradients."""
    logits = forward(params, cfg, batch["tokens"], batch.get("images"),
                     positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
    return cross_entropy(logits, batch["targets"])
