"""GhostVis: small vision-language models as pure functions over safetensors parameter pytrees.

    import ghostvis as gv
    cfg = gv.presets.get("tiny-vlm")
    params = gv.init(cfg, seed=0)
    logits = gv.forward(params, cfg, tokens, images=None)
    gv.save("ckpt.safetensors", params, cfg); params, cfg = gv.load("ckpt.safetensors")
    params, cfg = gv.import_hf("some_hf_dir/")
    gv.export_hf(params, cfg, "out/", tokenizer)        # a folder transformers and vLLM load
    new_ids = gv.generate(params, cfg, [prompt_ids], max_new_tokens=32)
"""

from . import ops
from .infer import dequantize, export_hf, generate, quantize, stream
from .interop import from_jax, load_jax, to_jax
from .core import (CheckpointError, ConfigError, ConnectorConfig, ImageTokenMismatch, ModelConfig, TextConfig,
                   VisionConfig, count_params, encode_images, export_hf_weights, flatten, flops_per_token, forward,
                   hidden_states, import_hf, init, load, presets, save, tree_map, unflatten)

__version__ = "0.1.0"

__all__ = [
    "ops", "presets", "init", "forward", "hidden_states", "encode_images", "save", "load", "import_hf",
    "export_hf_weights", "count_params", "flops_per_token", "flatten", "unflatten", "tree_map", "ModelConfig",
    "TextConfig", "VisionConfig", "ConnectorConfig", "ConfigError", "CheckpointError", "ImageTokenMismatch",
    "to_jax", "from_jax", "load_jax", "generate", "stream", "quantize", "dequantize", "export_hf",
]
