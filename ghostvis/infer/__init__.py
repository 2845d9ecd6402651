"""Inference: static KV cache, sampling, the generation engine, INT8 quantization and HF/vLLM export."""

from .export import export_hf
from .generate import generate, generate_uncached, stream
from .quantize import dequantize, quantize

__all__ = ["generate", "generate_uncached", "stream", "quantize", "dequantize", "export_hf"]
