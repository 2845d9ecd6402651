"""Model configuration: frozen dataclasses that fully describe a GhostVis model.

A config is plain data. It travels inside every safetensors checkpoint as JSON
(`to_dict` / `from_dict`), so a checkpoint is self-describing. Validation runs in
`__post_init__` and names the offending field, because a bad shape discovered
three layers deep in a forward pass is much harder to read than `n_heads=7 must
divide ...` at construction time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional


class ConfigError(ValueError):
    """A config field holds a value GhostVis cannot build a model from."""


def _require(cond: bool, cls: str, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{name}: {msg}")


@dataclass(frozen=True)
class TextConfig:
    """A Llama/Qwen3-family decoder.

    Attributes:
        vocab_size: rows of the embedding and of the LM head.
        dim: residual stream width.
        n_layers: number of transformer blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA); must divide ``n_heads``.
        head_dim: width of one attention head (need not equal dim // n_heads).
        ffn_dim: hidden width of the SwiGLU MLP.
        max_seq_len: longest sequence the model is meant to see (RoPE tables, KV cache).
        rope_theta: RoPE base frequency.
        norm_eps: RMSNorm epsilon.
        qk_norm: Qwen3-style RMSNorm over head_dim on q and k before RoPE.
        qkv_bias: Qwen2-style biases on the q/k/v projections.
        tie_embeddings: share the embedding matrix with the LM head.
    """

    vocab_size: int = 65536
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 6
    n_kv_heads: int = 3
    head_dim: int = 128
    ffn_dim: int = 2048
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        c = "TextConfig"
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, c, name, f"must be a positive int, got {v!r}")
        _require(self.n_heads % self.n_kv_heads == 0, c, "n_kv_heads",
                 f"{self.n_kv_heads} must divide n_heads={self.n_heads}")
        _require(self.head_dim % 2 == 0, c, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        _require(self.rope_theta > 0, c, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(self.norm_eps > 0, c, "norm_eps", f"must be > 0, got {self.norm_eps}")


@dataclass(frozen=True)
class VisionConfig:
    """A SigLIP-style ViT, weight-compatible with HF ``SiglipVisionModel``.

    Attributes:
        image_size: square input side in pixels.
        patch_size: square patch side; must divide ``image_size``.
        dim: width of the encoder.
        n_layers: number of encoder blocks.
        n_heads: attention heads; must divide ``dim``.
        ffn_dim: hidden width of the GELU(tanh) MLP.
        norm_eps: LayerNorm epsilon.
        num_channels: input channels.
        feature_layer: which block's output feeds the connector (LLaVA's
            ``vision_feature_layer``): -1 is the last block. The connector reads
            features before ``post_norm``, like LLaVA and vLLM do.
    """

    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    norm_eps: float = 1e-6
    num_channels: int = 3
    feature_layer: int = -1

    def __post_init__(self) -> None:
        c = "VisionConfig"
        for name in ("image_size", "patch_size", "dim", "n_layers", "n_heads", "ffn_dim", "num_channels"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, c, name, f"must be a positive int, got {v!r}")
        _require(self.image_size % self.patch_size == 0, c, "patch_size",
                 f"{self.patch_size} must divide image_size={self.image_size}")
        _require(self.dim % self.n_heads == 0, c, "n_heads", f"{self.n_heads} must divide dim={self.dim}")
        fl = self.feature_layer
        _require(isinstance(fl, int) and (1 <= fl <= self.n_layers or -self.n_layers <= fl <= -1), c, "feature_layer",
                 f"{fl} is not a block index in [1, {self.n_layers}] or [-{self.n_layers}, -1]")

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def layers_used(self) -> int:
        """How many blocks run to produce the connector's features."""
        return self.feature_layer if self.feature_layer > 0 else self.n_layers + 1 + self.feature_layer


ConnectorKind = Literal["mlp", "pixel_shuffle", "perceiver"]


@dataclass(frozen=True)
class ConnectorConfig:
    """Turns vision features into decoder token embeddings.

    Attributes:
        kind: ``mlp`` (LLaVA: Linear-GELU-Linear per patch), ``pixel_shuffle``
            (merge ``scale``x``scale`` patches, then a bias-free Linear) or
            ``perceiver`` (``num_latents`` learned queries cross-attending to
            the patches, fixed token count).
        scale: pixel-shuffle factor; must divide the patch grid side.
        num_latents: perceiver output tokens.
        n_layers: perceiver cross-attention blocks.
        n_heads: perceiver attention heads (over the decoder width).
    """

    kind: ConnectorKind = "mlp"
    scale: int = 2
    num_latents: int = 64
    n_layers: int = 2
    n_heads: int = 4

    def __post_init__(self) -> None:
        c = "ConnectorConfig"
        _require(self.kind in ("mlp", "pixel_shuffle", "perceiver"), c, "kind",
                 f"must be one of 'mlp', 'pixel_shuffle', 'perceiver', got {self.kind!r}")
        for name in ("scale", "num_latents", "n_layers", "n_heads"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, c, name, f"must be a positive int, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A text decoder, optionally with a vision encoder and connector (a VLM).

    Attributes:
        text: the decoder.
        vision: the image encoder, or None for a text-only model.
        connector: how vision features become token embeddings (required with ``vision``).
        image_token_id: the ``<|image|>`` placeholder id in the vocabulary (required with ``vision``).
        name: a label (the preset name), informational only.
    """

    text: TextConfig = field(default_factory=TextConfig)
    vision: Optional[VisionConfig] = None
    connector: Optional[ConnectorConfig] = None
    image_token_id: Optional[int] = None
    name: str = ""

    def __post_init__(self) -> None:
        c = "ModelConfig"
        if self.vision is None:
            _require(self.connector is None, c, "connector", "given without a vision encoder")
            return
        _require(self.connector is not None, c, "connector", "a vision model needs a connector")
        _require(self.image_token_id is not None and 0 <= self.image_token_id < self.text.vocab_size, c,
                 "image_token_id", f"must be a token id in [0, {self.text.vocab_size}), got {self.image_token_id!r}")
        conn, vis = self.connector, self.vision
        if conn.kind == "pixel_shuffle":
            _require(vis.grid % conn.scale == 0, c, "connector.scale",
                     f"{conn.scale} must divide the patch grid side {vis.grid}")
        if conn.kind == "perceiver":
            _require(self.text.dim % conn.n_heads == 0, c, "connector.n_heads",
                     f"{conn.n_heads} must divide text.dim={self.text.dim}")

    @property
    def is_vlm(self) -> bool:
        """True when the model has a vision encoder."""
        return self.vision is not None

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one image expands to in the sequence (0 for text models)."""
        if self.vision is None:
            return 0
        kind = self.connector.kind
        if kind == "mlp":
            return self.vision.num_patches
        if kind == "pixel_shuffle":
            return self.vision.num_patches // self.connector.scale**2
        return self.connector.num_latents

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some top-level fields changed (configs are frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain nested dict of every field (what the checkpoint metadata stores)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as a JSON string, keys sorted."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        """Rebuild a config from :meth:`to_dict` output; unknown fields raise ConfigError."""
        d = dict(d)
        try:
            text = TextConfig(**d.pop("text"))
            vision = VisionConfig(**d["vision"]) if d.get("vision") else None
            connector = ConnectorConfig(**d["connector"]) if d.get("connector") else None
        except TypeError as e:  # unknown or missing field names
            raise ConfigError(f"config does not describe a GhostVis model: {e}") from None
        d.pop("vision", None), d.pop("connector", None)
        return ModelConfig(text=text, vision=vision, connector=connector, **d)

    @staticmethod
    def from_json(s: str) -> "ModelConfig":
        """Rebuild a config from :meth:`to_json` output."""
        return ModelConfig.from_dict(json.loads(s))
