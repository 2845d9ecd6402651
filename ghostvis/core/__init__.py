"""Configs, presets, parameter pytrees, the pure model functions, checkpoint I/O and HF weight maps."""

from . import presets
from .config import ConfigError, ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from .hf import export_hf_weights, import_hf
from .io import CheckpointError, load, save
from .model import ImageTokenMismatch, count_params, encode_images, flops_per_token, forward, hidden_states, init
from .tree import flatten, tree_map, unflatten

__all__ = [
    "presets", "ConfigError", "ConnectorConfig", "ModelConfig", "TextConfig", "VisionConfig", "CheckpointError",
    "import_hf", "export_hf_weights", "load", "save", "ImageTokenMismatch", "count_params", "encode_images",
    "flops_per_token", "forward", "hidden_states", "init", "flatten", "tree_map", "unflatten",
]
