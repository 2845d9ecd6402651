"""The SigLIP vision encoder as pure functions, weight-compatible with HF ``SiglipVisionModel``.

Layout of ``params["vision"]``::

    patch_embed.weight   [dim, channels, patch, patch]   (a stride-patch conv, run as a matmul)
    patch_embed.bias     [dim]
    pos_embed            [num_patches, dim]
    layers[i].ln1.weight / bias            [dim]
    layers[i].attn.wq, bq, wk, bk, wv, bv, wo, bo
    layers[i].ln2.weight / bias            [dim]
    layers[i].mlp.w1 [ffn, dim], b1, w2 [dim, ffn], b2
    post_norm.weight / bias                [dim]

Images are float tensors ``[N, channels, H, W]``, already normalised
(SigLIP uses mean 0.5 and std 0.5 per channel, i.e. pixels in [-1, 1]).
"""

from __future__ import annotations

import torch

from .. import ops
from .config import VisionConfig
from .init_utils import Init

Tensor = torch.Tensor


def init_vision(cfg: VisionConfig, init: Init) -> dict:
    """Fresh SigLIP encoder parameters (layout in the module docstring)."""
    d = cfg.dim
    out_std = 0.02 / (2 * cfg.n_layers) ** 0.5
    ln = lambda: {"weight": init.ones(d), "bias": init.zeros(d)}  # noqa: E731
    layers = []
    for _ in range(cfg.n_layers):
        attn = {"wq": init.normal(d, d), "bq": init.zeros(d), "wk": init.normal(d, d), "bk": init.zeros(d),
                "wv": init.normal(d, d), "bv": init.zeros(d), "wo": init.normal(d, d, std=out_std), "bo": init.zeros(d)}
        mlp = {"w1": init.normal(cfg.ffn_dim, d), "b1": init.zeros(cfg.ffn_dim),
               "w2": init.normal(d, cfg.ffn_dim, std=out_std), "b2": init.zeros(d)}
        layers.append({"ln1": ln(), "attn": attn, "ln2": ln(), "mlp": mlp})
    return {
        "patch_embed": {"weight": init.normal(d, cfg.num_channels, cfg.patch_size, cfg.patch_size),
                        "bias": init.zeros(d)},
        "pos_embed": init.normal(cfg.num_patches, d),
        "layers": layers,
        "post_norm": ln(),
    }


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, (H/p)*(W/p), C*p*p]`` in the conv weight's (c, ph, pw) order."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def embed_patches(params: dict, cfg: VisionConfig, images: Tensor) -> Tensor:
    """Patch embeddings plus learned positions, ``[N, num_patches, dim]``; checks the image shape."""
    if images.dim() != 4 or images.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"images must be [N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}], "
                         f"got {list(images.shape)}")
    w = params["patch_embed"]["weight"]
    x = ops.linear(patchify(images.to(w.dtype), cfg.patch_size), w.reshape(w.shape[0], -1),
                   params["patch_embed"]["bias"])
    return x + params["pos_embed"]


def encoder_block(p: dict, cfg: VisionConfig, x: Tensor) -> Tensor:
    """One pre-LN SigLIP block: MHA with biases, then a GELU(tanh) MLP."""
    n, t, d = x.shape
    h = ops.layer_norm(x, p["ln1"]["weight"], p["ln1"]["bias"], cfg.norm_eps)
    a = p["attn"]
    heads = lambda y: y.view(n, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(ops.linear(h, a[w], a[b])) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    o = ops.attention(q, k, v, causal=False).transpose(1, 2).reshape(n, t, d)
    x = x + ops.linear(o, a["wo"], a["bo"])
    h = ops.layer_norm(x, p["ln2"]["weight"], p["ln2"]["bias"], cfg.norm_eps)
    m = p["mlp"]
    return x + ops.linear(ops.gelu(ops.linear(h, m["w1"], m["b1"]), "tanh"), m["w2"], m["b2"])


def encode(params: dict, cfg: VisionConfig, images: Tensor, *, n_layers: int | None = None,
           post_norm: bool = True) -> Tensor:
    """Patch features ``[N, num_patches, dim]``.

    The defaults give ``SiglipVisionModel``'s ``last_hidden_state``. A VLM asks
    for ``n_layers=cfg.layers_used, post_norm=False`` (LLaVA's feature layer).
    """
    x = embed_patches(params, cfg, images)
    for p in params["layers"][: cfg.n_layers if n_layers is None else n_layers]:
        x = encoder_block(p, cfg, x)
    if post_norm:
        x = ops.layer_norm(x, params["post_norm"]["weight"], params["post_norm"]["bias"], cfg.norm_eps)
    return x
