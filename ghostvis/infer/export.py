"""Export a GhostVis model as a folder that HF transformers and vLLM load with no plugin.

    export_hf(params, cfg, "out/", tokenizer)

writes, next to the weights and ``config.json`` of :func:`ghostvis.core.hf.export_hf_weights`
(``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` / ``LlavaForConditionalGeneration``):

    generation_config.json     bos/eos/pad ids; generation stops at <|end|> or <|eos|>
    tokenizer.json             the byte-level BPE, as trained
    tokenizer_config.json      special tokens, the chat template, ``image_token`` (VLMs)
    chat_template.jinja        the same chat template, where HF processors read it
    processor_config.json      VLMs: LlavaProcessor with the SiglipImageProcessor settings inside
    preprocessor_config.json   VLMs: the SiglipImageProcessor alone (older readers look here)

The image processor repeats GhostVis's own preprocessing (RGB, bicubic resize
to ``image_size``, scale by 1/255, mean = std = 0.5), and the processor expands
one ``<|image|>`` in a rendered chat into ``num_image_tokens`` placeholders,
exactly as :func:`ghostvis.train.chat.render_chat` does, so HF and vLLM build
the same prompt ids GhostVis does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..core.config import ConfigError, ModelConfig
from ..core.hf import export_hf_weights
from .quantize import dequantize, has_quantized

BOS_ID, EOS_ID, PAD_ID, END_ID = 1, 2, 0, 7  # fixed by ghostvis.train.tokenizer
SPECIALS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|end|>"}
IMAGE_TOKEN = "<|image|>"


def generation_config(cfg: ModelConfig) -> dict:
    """``generation_config.json``: greedy by default, stop at ``<|end|>`` or ``<|eos|>``."""
    return {"bos_token_id": BOS_ID, "eos_token_id": [END_ID, EOS_ID], "pad_token_id": PAD_ID,
            "do_sample": False, "max_length": cfg.text.max_seq_len}


def tokenizer_config(cfg: ModelConfig) -> dict:
    """``tokenizer_config.json`` for the GhostVis tokenizer (the vocabulary itself is in ``tokenizer.json``)."""
    from ..train.chat import CHAT_TEMPLATE
    d = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIALS, "chat_template": CHAT_TEMPLATE,
         "model_max_length": cfg.text.max_seq_len, "clean_up_tokenization_spaces": False,
         "add_bos_token": False, "add_eos_token": False}
    if cfg.is_vlm:
        d |= {"image_token": IMAGE_TOKEN, "processor_class": "LlavaProcessor"}
    return d


def image_processor_config(cfg: ModelConfig) -> dict:
    """The ``SiglipImageProcessor`` settings equal to GhostVis's preprocessing."""
    side = cfg.vision.image_size
    return {"image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
            "do_convert_rgb": True, "do_resize": True, "size": {"height": side, "width": side},
            "resample": 3,  # PIL bicubic
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5] * cfg.vision.num_channels, "image_std": [0.5] * cfg.vision.num_channels}


def processor_config(cfg: ModelConfig) -> dict:
    """``processor_config.json``: a ``LlavaProcessor`` expanding each ``<|image|>`` to ``num_image_tokens``."""
    return {"processor_class": "LlavaProcessor", "image_processor": image_processor_config(cfg),
            "image_token": IMAGE_TOKEN, "patch_size": cfg.vision.patch_size, "num_additional_image_tokens": 0,
            "vision_feature_select_strategy": "full"}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _load_tokenizer(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from ..train.tokenizer import Tokenizer
    return Tokenizer.load(tokenizer)


def check_exportable(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for a model the HF/vLLM classes cannot represent, naming what is supported."""
    if cfg.is_vlm and cfg.connector.kind != "mlp":
        raise ConfigError(f"cannot export connector kind {cfg.connector.kind!r}: HF transformers and vLLM load VLMs "
                          "as LlavaForConditionalGeneration, which supports only the 'mlp' connector "
                          "(text-only models export as LlamaForCausalLM / Qwen3ForCausalLM)")


def export_hf(params: dict, cfg: ModelConfig, out_dir: Union[str, os.PathLike], tokenizer=None, *,
              dtype: Optional[torch.dtype] = None) -> Path:
    """Write an HF folder (weights, configs, tokenizer, processor) for ``params``; returns its path.

    Args:
        params: the parameter pytree; INT8-quantized projections are dequantized
            first (HF and vLLM read float weights).
        cfg: its :class:`ModelConfig`; VLMs need the ``mlp`` connector.
        out_dir: the folder to write (created; files of the same names are replaced).
        tokenizer: a :class:`ghostvis.train.tokenizer.Tokenizer`, or a path to its
            ``tokenizer.json`` (or folder); None writes no tokenizer files.
        dtype: weight dtype in the folder (default: the params' own).
    """
    check_exportable(cfg)
    tokenizer = _load_tokenizer(tokenizer)
    if tokenizer is not None and tokenizer.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{cfg.text.vocab_size}: they do not belong together")
    if has_quantized(params):
        params = dequantize(params)
    out = Path(out_dir)
    ids = {"bos_token_id": BOS_ID, "eos_token_id": END_ID, "pad_token_id": PAD_ID}
    overrides = {**ids, "text_config": ids} if cfg.is_vlm else ids
    export_hf_weights(params, cfg, out, dtype=dtype, config_overrides=overrides)
    _write_json(out / "generation_config.json", generation_config(cfg))
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")
        _write_json(out / "tokenizer_config.json", tokenizer_config(cfg))
        from ..train.chat import CHAT_TEMPLATE
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # where HF processors look for it
    if cfg.is_vlm:
        _write_json(out / "processor_config.json", processor_config(cfg))
        _write_json(out / "preprocessor_config.json", image_processor_config(cfg))
    return out
