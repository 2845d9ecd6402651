"""Named model configs. ``get("d12")`` and friends; ``names()`` lists them.

Depth presets follow one rule: ``dim = 64 * depth``, ``head_dim = 128``,
``n_heads = dim / 128``, ``n_kv_heads = n_heads // 2``, ``ffn = int(2.7 * dim) // 128 * 128``,
vocab 65536, context 2048. ``d12`` is ~180M parameters, ``d20`` ~530M.
The tiny presets run on a laptop CPU (head_dim stays >= 32, which vLLM's CPU
attention needs).
"""

from __future__ import annotations

from .config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig

TINY_VOCAB = 4096
TINY_IMAGE_TOKEN = 3  # the tokenizer reserves the first ids for special tokens (see ghostvis.train.tokenizer)


def depth(depth: int, vocab_size: int = 65536, max_seq_len: int = 2048) -> TextConfig:
    """The decoder of the ``d<depth>`` preset."""
    dim = 64 * depth
    n_heads = max(1, dim // 128)
    return TextConfig(vocab_size=vocab_size, dim=dim, n_layers=depth, n_heads=n_heads,
                      n_kv_heads=max(1, n_heads // 2), head_dim=128, ffn_dim=int(2.7 * dim) // 128 * 128,
                      max_seq_len=max_seq_len)


def _tiny_text() -> TextConfig:
    return TextConfig(vocab_size=TINY_VOCAB, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                      ffn_dim=384, max_seq_len=512)


def _tiny_vision(patch_size: int = 32) -> VisionConfig:
    # tiny-vlm uses 32 px patches: a 64 px image is 2 x 2 patches, one per quadrant of the synthetic VQA
    # scenes, so the CPU demo (recipes/sft.py) learns the task in ~200 steps; 8 px patches needed many times
    # more. The token-reducing connectors get 8 px patches (64 per image) so they have something to reduce.
    return VisionConfig(image_size=64, patch_size=patch_size, dim=128, n_layers=2, n_heads=4, ffn_dim=256)


def _siglip_b16() -> VisionConfig:
    # SigLIP-B/16 at 224 px: 196 patches, 12 x 768
    return VisionConfig(image_size=224, patch_size=16, dim=768, n_layers=12, n_heads=12, ffn_dim=3072)


_PRESETS = {
    "tiny": lambda: ModelConfig(text=_tiny_text(), name="tiny"),
    "tiny-vlm": lambda: ModelConfig(text=_tiny_text(), vision=_tiny_vision(), connector=ConnectorConfig("mlp"),
                                    image_token_id=TINY_IMAGE_TOKEN, name="tiny-vlm"),
    "tiny-vlm-shuffle": lambda: ModelConfig(text=_tiny_text(), vision=_tiny_vision(8),
                                            connector=ConnectorConfig("pixel_shuffle", scale=2),
                                            image_token_id=TINY_IMAGE_TOKEN, name="tiny-vlm-shuffle"),
    "tiny-vlm-perceiver": lambda: ModelConfig(text=_tiny_text(), vision=_tiny_vision(8),
                                              connector=ConnectorConfig("perceiver", num_latents=16, n_layers=1),
                                              image_token_id=TINY_IMAGE_TOKEN, name="tiny-vlm-perceiver"),
    "d12": lambda: ModelConfig(text=depth(12), name="d12"),
    "d20": lambda: ModelConfig(text=depth(20), name="d20"),
    "d12-vlm": lambda: ModelConfig(text=depth(12), vision=_siglip_b16(), connector=ConnectorConfig("mlp"),
                                   image_token_id=TINY_IMAGE_TOKEN, name="d12-vlm"),
}


def names() -> list[str]:
    """All preset names."""
    return list(_PRESETS)


def get(name: str) -> ModelConfig:
    """The preset config called ``name`` (a frozen :class:`ModelConfig`)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {names()}")
    return _PRESETS[name]()
