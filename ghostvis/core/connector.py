"""Connectors: vision features ``[N, patches, vision_dim]`` -> token embeddings ``[N, tokens, text_dim]``.

``mlp``            LLaVA's projector: Linear -> GELU -> Linear on every patch.
                   Layout: ``w1 [text, vision], b1, w2 [text, text], b2``.
``pixel_shuffle``  merge each ``s x s`` group of neighbouring patches into one token
                   (channels concatenated), then a bias-free Linear (Idefics3/SmolVLM).
                   Layout: ``w [text, vision*s*s]``.
``perceiver``      ``num_latents`` learned queries; each block cross-attends from the
                   latents to the (projected) patches, then a SwiGLU MLP; a final norm.
                   Layout: ``in_proj [text, vision]``, ``latents [L, text]``, ``layers[i]``
                   with ``q_norm, kv_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down``,
                   and ``norm``.
"""

from __future__ import annotations

import torch

from .. import ops
from .config import ModelConfig
from .init_utils import Init

Tensor = torch.Tensor


def init_connector(cfg: ModelConfig, init: Init) -> dict:
    """Fresh connector parameters for ``cfg.connector.kind`` (layouts in the module docstring)."""
    conn, dv, dt = cfg.connector, cfg.vision.dim, cfg.text.dim
    if conn.kind == "mlp":
        return {"w1": init.normal(dt, dv), "b1": init.zeros(dt), "w2": init.normal(dt, dt), "b2": init.zeros(dt)}
    if conn.kind == "pixel_shuffle":
        return {"w": init.normal(dt, dv * conn.scale**2)}
    ffn = 4 * dt
    layers = [{"q_norm": init.ones(dt), "kv_norm": init.ones(dt), "wq": init.normal(dt, dt), "wk": init.normal(dt, dt),
               "wv": init.normal(dt, dt), "wo": init.normal(dt, dt), "mlp_norm": init.ones(dt),
               "w_gate": init.normal(ffn, dt), "w_up": init.normal(ffn, dt), "w_down": init.normal(dt, ffn)}
              for _ in range(conn.n_layers)]
    return {"in_proj": init.normal(dt, dv), "latents": init.normal(conn.num_latents, dt, std=1.0),
            "layers": layers, "norm": init.ones(dt)}


def pixel_shuffle(x: Tensor, scale: int) -> Tensor:
    """``[N, g*g, d]`` -> ``[N, (g/s)^2, d*s*s]``: each token holds an ``s x s`` patch neighbourhood."""
    n, t, d = x.shape
    g = int(round(t**0.5))
    x = x.reshape(n, g // scale, scale, g // scale, scale, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, (g // scale) ** 2, d * scale * scale)


def perceiver(p: dict, cfg: ModelConfig, feats: Tensor) -> Tensor:
    """Perceiver resampler: learned latents cross-attend to the projected patches."""
    conn, dt, eps = cfg.connector, cfg.text.dim, cfg.text.norm_eps
    n = feats.shape[0]
    kv_in = ops.linear(feats, p["in_proj"])
    x = p["latents"].to(kv_in.dtype).expand(n, -1, -1)
    heads = lambda y: y.view(n, -1, conn.n_heads, dt // conn.n_heads).transpose(1, 2)  # noqa: E731
    for lp in p["layers"]:
        q_in, kv = ops.rms_norm(x, lp["q_norm"], eps), ops.rms_norm(kv_in, lp["kv_norm"], eps)
        o = ops.attention(heads(ops.linear(q_in, lp["wq"])), heads(ops.linear(kv, lp["wk"])),
                          heads(ops.linear(kv, lp["wv"])), causal=False)
        x = x + ops.linear(o.transpose(1, 2).reshape(n, -1, dt), lp["wo"])
        h = ops.rms_norm(x, lp["mlp_norm"], eps)
        x = x + ops.linear(ops.swiglu(ops.linear(h, lp["w_gate"]), ops.linear(h, lp["w_up"])), lp["w_down"])
    return ops.rms_norm(x, p["norm"], eps)


def connect(p: dict, cfg: ModelConfig, feats: Tensor) -> Tensor:
    """Apply the configured connector to vision features."""
    kind = cfg.connector.kind
    if kind == "mlp":
        return ops.linear(ops.gelu(ops.linear(feats, p["w1"], p["b1"])), p["w2"], p["b2"])
    if kind == "pixel_shuffle":
        return ops.linear(pixel_shuffle(feats, cfg.connector.scale), p["w"])
    return perceiver(p, cfg, feats)
