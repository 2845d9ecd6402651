"""HF transformers interop: read and write ``save_pretrained`` folders (config.json + safetensors).

Supported architectures, both ways:

    LlamaForCausalLM               the plain decoder
    Qwen3ForCausalLM               + QK-norm (``TextConfig.qk_norm``); head_dim from the config
    Qwen2ForCausalLM               + q/k/v-only biases (``TextConfig.qkv_bias``)
    SiglipVisionModel              the vision encoder alone (see below)
    LlavaForConditionalGeneration  SigLIP + the ``mlp`` connector + one of the decoders above

A SigLIP-only folder has no decoder, so it cannot be a :class:`ModelConfig`:
``import_hf`` returns ``({"vision": ...}, VisionConfig)`` for it, and
``export_hf_weights`` takes the same pair back. The pooling head of
``SiglipVisionModel`` (``head.*``, only used for ``pooler_output``) has no
GhostVis counterpart: it is skipped on import and not written on export
(``vision_use_head: false``).

Everything else is refused with a :class:`ConfigError` that names the field:
rope scaling, sliding windows, activations other than SiLU (decoder) / GELU-tanh
(SigLIP) / GELU (projector), CLIP towers, LLaVA's ``default`` feature strategy
(it drops a CLS token SigLIP does not have), multi-layer features, and the
``pixel_shuffle`` / ``perceiver`` connectors on export.

Weight names. The maps below (one function per architecture) give, for every
GhostVis flattened name, its HF name in one canonical layout: the layout
transformers itself writes for LLaVA and vLLM 0.32 loads natively
(``language_model.model.*``, ``language_model.lm_head.weight``,
``multi_modal_projector.*``, ``vision_tower.vision_model.*``). On import, the
other spellings in the wild (transformers 5's ``model.language_model.*``,
``model.vision_tower.*``, ``lm_head.*``, and ``vision_tower.*`` without
``vision_model.``) are first rewritten to that layout, so each map is written
once. Only safetensors are read: a folder holding only pickles is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from .init_utils import Init
from .io import CheckpointError, check_tree
from .tree import flatten, unflatten
from .vision import init_vision

Tensor = torch.Tensor
AnyConfig = Union[ModelConfig, VisionConfig]

# ----------------------------------------------------------------------------------------------
# Name maps: GhostVis flattened name -> HF name (canonical layout)


def decoder_names(t: TextConfig, prefix: str = "model.", lm_head: str = "lm_head.weight") -> dict[str, str]:
    """Names of a Llama / Qwen2 / Qwen3 decoder; ``prefix`` is where its ``LlamaModel`` sits."""
    names = {"text.embed": f"{prefix}embed_tokens.weight"}
    for i in range(t.n_layers):
        g, h = f"text.layers.{i}", f"{prefix}layers.{i}"
        names |= {
            f"{g}.attn_norm": f"{h}.input_layernorm.weight",
            f"{g}.attn.wq": f"{h}.self_attn.q_proj.weight",
            f"{g}.attn.wk": f"{h}.self_attn.k_proj.weight",
            f"{g}.attn.wv": f"{h}.self_attn.v_proj.weight",
            f"{g}.attn.wo": f"{h}.self_attn.o_proj.weight",
            f"{g}.mlp_norm": f"{h}.post_attention_layernorm.weight",
            f"{g}.mlp.w_gate": f"{h}.mlp.gate_proj.weight",
            f"{g}.mlp.w_up": f"{h}.mlp.up_proj.weight",
            f"{g}.mlp.w_down": f"{h}.mlp.down_proj.weight",
        }
        if t.qkv_bias:
            names |= {f"{g}.attn.bq": f"{h}.self_attn.q_proj.bias", f"{g}.attn.bk": f"{h}.self_attn.k_proj.bias",
                      f"{g}.attn.bv": f"{h}.self_attn.v_proj.bias"}
        if t.qk_norm:
            names |= {f"{g}.attn.q_norm": f"{h}.self_attn.q_norm.weight",
                      f"{g}.attn.k_norm": f"{h}.self_attn.k_norm.weight"}
    names["text.norm"] = f"{prefix}norm.weight"
    if not t.tie_embeddings:
        names["text.lm_head"] = lm_head
    return names


def siglip_names(v: VisionConfig, prefix: str = "vision_model.") -> dict[str, str]:
    """Names of a SigLIP vision transformer; ``prefix`` is where its ``vision_model`` sits."""
    names = {
        "vision.patch_embed.weight": f"{prefix}embeddings.patch_embedding.weight",
        "vision.patch_embed.bias": f"{prefix}embeddings.patch_embedding.bias",
        "vision.pos_embed": f"{prefix}embeddings.position_embedding.weight",
    }
    for i in range(v.n_layers):
        g, h = f"vision.layers.{i}", f"{prefix}encoder.layers.{i}"
        for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
            names |= {f"{g}.{ours}.weight": f"{h}.{theirs}.weight", f"{g}.{ours}.bias": f"{h}.{theirs}.bias"}
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            names |= {f"{g}.attn.w{ours}": f"{h}.self_attn.{theirs}.weight",
                      f"{g}.attn.b{ours}": f"{h}.self_attn.{theirs}.bias"}
        for n in ("1", "2"):
            names |= {f"{g}.mlp.w{n}": f"{h}.mlp.fc{n}.weight", f"{g}.mlp.b{n}": f"{h}.mlp.fc{n}.bias"}
    names |= {"vision.post_norm.weight": f"{prefix}post_layernorm.weight",
              "vision.post_norm.bias": f"{prefix}post_layernorm.bias"}
    return names


def projector_names(bias: bool = True) -> dict[str, str]:
    """Names of LLaVA's two-layer projector (GhostVis's ``mlp`` connector)."""
    names = {"connector.w1": "multi_modal_projector.linear_1.weight",
             "connector.w2": "multi_modal_projector.linear_2.weight"}
    if bias:
        names |= {"connector.b1": "multi_modal_projector.linear_1.bias",
                  "connector.b2": "multi_modal_projector.linear_2.bias"}
    return names


def llava_names(cfg: ModelConfig, projector_bias: bool = True) -> dict[str, str]:
    """Names of a LLaVA model in the canonical (vLLM-native) layout."""
    return (decoder_names(cfg.text, "language_model.model.", "language_model.lm_head.weight")
            | siglip_names(cfg.vision, "vision_tower.vision_model.") | projector_names(projector_bias))


def hf_names(cfg: AnyConfig) -> dict[str, str]:
    """The GhostVis -> HF name map of any supported config."""
    if isinstance(cfg, VisionConfig):
        return siglip_names(cfg)
    if cfg.is_vlm:
        return llava_names(cfg)
    return decoder_names(cfg.text)


# Other spellings of LLaVA keys -> the canonical layout (transformers 5 nests everything under `model.`).
_LLAVA_KEY_FORMS = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def canonical_llava_key(key: str) -> str:
    for old, new in _LLAVA_KEY_FORMS:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def canonical_siglip_key(key: str) -> str:
    return key if key.startswith("vision_model.") else "vision_model." + key


# Tensors in HF folders that carry nothing GhostVis models: SigLIP's pooling head (only used for
# pooler_output) and buffers that old writers saved.
_IGNORED_PREFIXES = ("vision_model.head.", "vision_tower.vision_model.head.")
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def _ignorable(key: str) -> bool:
    return key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# Configs: HF config.json dict -> GhostVis config

TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}


def _refuse(where: str, field: str, value, why: str):
    raise ConfigError(f"{where}.{field}={value!r}: {why}")


def _rope_theta(d: dict, where: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or top-level ``rope_theta`` (4.x); plain RoPE only."""
    if d.get("rope_scaling"):
        _refuse(where, "rope_scaling", d["rope_scaling"], "rope scaling is not supported (plain RoPE only)")
    rp = d.get("rope_parameters") or {}
    if not isinstance(rp, dict) or any(isinstance(v, dict) for v in rp.values()):
        _refuse(where, "rope_parameters", rp, "per-layer-type RoPE is not supported")
    if rp.get("rope_type", "default") != "default":
        _refuse(where, "rope_parameters.rope_type", rp["rope_type"], "only 'default' RoPE is supported")
    if rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(where, "partial_rotary_factor", rp.get("partial_rotary_factor", d.get("partial_rotary_factor")),
                "partial rotary embeddings are not supported")
    return float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))


def text_config_from_hf(d: dict, where: str = "config") -> TextConfig:
    """A :class:`TextConfig` from a Llama / Qwen2 / Qwen3 config dict; refuses what GhostVis cannot run."""
    kind = d.get("model_type")
    if kind not in TEXT_ARCHITECTURES:
        _refuse(where, "model_type", kind, f"supported decoders are {sorted(TEXT_ARCHITECTURES)}")
    if d.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", d["hidden_act"], "the decoder MLP is SwiGLU; only 'silu' is supported")
    if d.get("mlp_bias"):
        _refuse(where, "mlp_bias", d["mlp_bias"], "MLP biases are not supported")
    if d.get("use_sliding_window"):
        _refuse(where, "use_sliding_window", True, "sliding-window attention is not supported")
    if kind == "llama" and d.get("sliding_window"):
        _refuse(where, "sliding_window", d["sliding_window"], "sliding-window attention is not supported")
    layer_types = d.get("layer_types") or []
    if any(lt != "full_attention" for lt in layer_types):
        _refuse(where, "layer_types", sorted(set(layer_types)), "only full attention is supported")
    if kind != "qwen2" and d.get("attention_bias"):
        _refuse(where, "attention_bias", True, f"{kind} puts a bias on o_proj too, which GhostVis has no slot for "
                "(q/k/v-only biases are supported as Qwen2ForCausalLM)")
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or dim // n_heads
    if kind == "qwen2" and head_dim != dim // n_heads:
        _refuse(where, "head_dim", head_dim, f"Qwen2 needs head_dim == hidden_size // num_attention_heads = "
                f"{dim // n_heads}")
    return TextConfig(
        vocab_size=d["vocab_size"], dim=dim, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads, head_dim=head_dim, ffn_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[kind],
        rope_theta=_rope_theta(d, where), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        qk_norm=kind == "qwen3", qkv_bias=kind == "qwen2",
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


_SIGLIP_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")


def vision_config_from_hf(d: dict, where: str = "config", feature_layer: int = -1) -> VisionConfig:
    """A :class:`VisionConfig` from a ``siglip_vision_model`` config dict."""
    kind = d.get("model_type", "siglip_vision_model")
    if kind != "siglip_vision_model":
        _refuse(where, "model_type", kind, "only SigLIP vision towers ('siglip_vision_model') are supported")
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _SIGLIP_TANH_GELUS:
        _refuse(where, "hidden_act", act, f"the SigLIP MLP uses tanh-GELU; supported: {list(_SIGLIP_TANH_GELUS)}")
    return VisionConfig(
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 16), dim=d.get("hidden_size", 768),
        n_layers=d.get("num_hidden_layers", 12), n_heads=d.get("num_attention_heads", 12),
        ffn_dim=d.get("intermediate_size", 3072), norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        num_channels=d.get("num_channels", 3), feature_layer=feature_layer,
    )


def llava_config_from_hf(d: dict) -> ModelConfig:
    """A VLM :class:`ModelConfig` (``mlp`` connector) from a ``LlavaForConditionalGeneration`` config."""
    w = "config"
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        _refuse(w, "vision_feature_select_strategy", strategy, "SigLIP has no CLS token, so only 'full' is "
                "supported ('default' would drop a real patch)")
    layer = d.get("vision_feature_layer", -2)
    vis = {"model_type": "clip_vision_model", **(d.get("vision_config") or {})}  # LlavaConfig's defaults
    n_vis_layers = vis.get("num_hidden_layers", 12)
    if not isinstance(layer, int) or not (1 <= layer <= n_vis_layers or -n_vis_layers <= layer <= -1):
        _refuse(w, "vision_feature_layer", layer, f"must be one block index in [1, {n_vis_layers}] or "
                f"[-{n_vis_layers}, -1] (lists and the embedding output are not supported)")
    if d.get("projector_hidden_act", "gelu") != "gelu":
        _refuse(w, "projector_hidden_act", d["projector_hidden_act"], "the mlp connector uses exact 'gelu'")
    text_d = {"model_type": "llama", **(d.get("text_config") or {})}
    if d.get("tie_word_embeddings"):
        text_d["tie_word_embeddings"] = True
    text = text_config_from_hf(text_d, "config.text_config")
    vision = vision_config_from_hf(vis, "config.vision_config", feature_layer=layer)
    token = d.get("image_token_index", d.get("image_token_id"))
    if token is None:
        _refuse(w, "image_token_index", None, "a LLaVA config needs the image placeholder token id")
    cfg = ModelConfig(text=text, vision=vision, connector=ConnectorConfig("mlp"), image_token_id=token)
    seq = d.get("image_seq_length")
    if seq is not None and seq != cfg.num_image_tokens:
        _refuse(w, "image_seq_length", seq, f"with strategy 'full' one image is {cfg.num_image_tokens} patches")
    return cfg


def architecture(d: dict) -> str:
    """The HF class a config.json describes (``architectures[0]``, else guessed from ``model_type``)."""
    archs = d.get("architectures") or []
    if archs:
        return archs[0]
    by_type = TEXT_ARCHITECTURES | {"siglip_vision_model": "SiglipVisionModel",
                                    "llava": "LlavaForConditionalGeneration"}
    return by_type.get(d.get("model_type"), f"<model_type {d.get('model_type')!r}>")


# ----------------------------------------------------------------------------------------------
# Reading a folder

def read_safetensors_folder(path: Path) -> dict[str, Tensor]:
    """All tensors of an HF folder: ``model.safetensors``, or the shards its index lists, or every
    ``*.safetensors`` file. Never a pickle."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {pickles}: pickles are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    flat: dict[str, Tensor] = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for k in f.keys():
                    flat[k] = f.get_tensor(k)
        except Exception as e:  # the parser's messages do not say which file
            raise CheckpointError(f"{path / name}: not a readable safetensors file: {type(e).__name__}: {e}") from None
    return flat


def _take(tensors: dict[str, Tensor], names: dict[str, str], where: Path) -> dict[str, Tensor]:
    """GhostVis flat params from HF tensors by ``names``; every HF tensor must be used or ignorable."""
    missing = [hf for hf in names.values() if hf not in tensors]
    used = set(names.values())
    unexpected = [k for k in tensors if k not in used and not _ignorable(k)]
    if missing or unexpected:
        lines = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
        raise CheckpointError(f"{where}: weights do not match config.json ({len(lines)} problems):\n  "
                              + "\n  ".join(lines[:50]))
    return {ours: tensors[theirs] for ours, theirs in names.items()}


def _check_vision(flat: dict[str, Tensor], cfg: VisionConfig, where: Path) -> None:
    spec = flatten({"vision": init_vision(cfg, Init(0, "meta"))})
    bad = [f"{k}: expected {list(spec[k].shape)}, got {list(t.shape)}" for k, t in flat.items()
           if tuple(t.shape) != tuple(spec[k].shape)]
    if bad:
        raise CheckpointError(f"{where}: weights do not match config.json:\n  " + "\n  ".join(bad))


def import_hf(path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> tuple[dict, AnyConfig]:
    """Read an HF ``save_pretrained`` folder into ``(params, cfg)``.

    Args:
        path: folder with ``config.json`` and ``*.safetensors`` (single file or sharded with an index).
        dtype: cast floating-point weights to this dtype (default: keep the stored dtype).

    Returns:
        For ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``LlavaForConditionalGeneration``:
        a GhostVis parameter pytree and its :class:`ModelConfig`. For ``SiglipVisionModel``:
        ``({"vision": tree}, VisionConfig)`` (a vision encoder alone is not a ModelConfig); run it with
        ``ghostvis.core.vision.encode(params["vision"], cfg, images)``.

    Raises:
        ConfigError: the architecture or a config field is not supported (the message names it).
        CheckpointError: weights missing, unexpected, mis-shaped or unreadable.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not an HF model folder)")
    d = json.loads((path / "config.json").read_text())
    arch = architecture(d)
    projector_bias = True
    if arch == "SiglipVisionModel":
        cfg = vision_config_from_hf(d)
        names, canonical = siglip_names(cfg), canonical_siglip_key
    elif arch == "LlavaForConditionalGeneration":
        cfg = llava_config_from_hf(d)
        projector_bias = bool(d.get("multimodal_projector_bias", True))
        names, canonical = llava_names(cfg, projector_bias), canonical_llava_key
    elif arch in TEXT_ARCHITECTURES.values():
        cfg = ModelConfig(text=text_config_from_hf(d))
        if arch != TEXT_ARCHITECTURES[d["model_type"]]:
            _refuse("config", "architectures", d.get("architectures"), f"does not match model_type {d['model_type']!r}")
        names, canonical = decoder_names(cfg.text), str
    else:
        supported = sorted(TEXT_ARCHITECTURES.values()) + ["LlavaForConditionalGeneration", "SiglipVisionModel"]
        raise ConfigError(f"config.architectures={d.get('architectures')!r}: unsupported; supported: {supported}")

    tensors = {canonical(k): v for k, v in read_safetensors_folder(path).items()}
    if isinstance(cfg, ModelConfig) and cfg.text.tie_embeddings:  # some writers store the tied copy too
        tensors.pop("lm_head.weight", None), tensors.pop("language_model.lm_head.weight", None)
    flat = _take(tensors, names, path)
    if not projector_bias:  # a bias-free projector is the mlp connector with zero biases
        flat |= {"connector.b1": flat["connector.w1"].new_zeros(cfg.text.dim),
                 "connector.b2": flat["connector.w2"].new_zeros(cfg.text.dim)}
    if dtype is not None:
        flat = {k: v.to(dtype) if v.is_floating_point() else v for k, v in flat.items()}
    if isinstance(cfg, VisionConfig):
        _check_vision(flat, cfg, path)
    else:
        check_tree(flat, cfg, str(path))
    return unflatten(flat), cfg


# ----------------------------------------------------------------------------------------------
# Writing a folder

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def text_architecture(t: TextConfig) -> str:
    """The HF class that runs this decoder exactly, or a :class:`ConfigError` naming the supported ones."""
    if t.qk_norm and t.qkv_bias:
        raise ConfigError("TextConfig.qk_norm=True with qkv_bias=True: no HF class has both; supported: "
                          "LlamaForCausalLM (neither), Qwen3ForCausalLM (qk_norm), Qwen2ForCausalLM (qkv_bias)")
    if t.qkv_bias and t.head_dim != t.dim // t.n_heads:
        raise ConfigError(f"TextConfig.qkv_bias=True exports as Qwen2ForCausalLM, which needs head_dim == "
                          f"dim // n_heads = {t.dim // t.n_heads}, got head_dim={t.head_dim}")
    return "Qwen3ForCausalLM" if t.qk_norm else "Qwen2ForCausalLM" if t.qkv_bias else "LlamaForCausalLM"


def text_config_to_hf(t: TextConfig) -> dict:
    """The HF config dict of a decoder (Llama, Qwen2 or Qwen3 by its features)."""
    arch = text_architecture(t)
    kind = {v: k for k, v in TEXT_ARCHITECTURES.items()}[arch]
    d = {
        "architectures": [arch], "model_type": kind,
        "vocab_size": t.vocab_size, "hidden_size": t.dim, "intermediate_size": t.ffn_dim,
        "num_hidden_layers": t.n_layers, "num_attention_heads": t.n_heads, "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.head_dim, "hidden_act": "silu", "max_position_embeddings": t.max_seq_len,
        "rms_norm_eps": t.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": t.tie_embeddings,
    }
    if kind == "llama":
        d["mlp_bias"] = False
    else:
        d |= {"use_sliding_window": False, "sliding_window": None}
    if kind == "qwen2":
        del d["head_dim"], d["attention_bias"]  # Qwen2 derives head_dim and always has q/k/v biases
    return d


def vision_config_to_hf(v: VisionConfig) -> dict:
    """The ``SiglipVisionConfig`` dict of a vision encoder (no pooling head)."""
    return {
        "model_type": "siglip_vision_model", "hidden_size": v.dim, "intermediate_size": v.ffn_dim,
        "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads, "num_channels": v.num_channels,
        "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": v.norm_eps, "attention_dropout": 0.0, "vision_use_head": False,
    }


def hf_config(cfg: AnyConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` dict that :func:`export_hf_weights` writes for ``cfg``."""
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype}: HF export supports {sorted(_DTYPE_NAMES.values())}")
    dt = {"dtype": _DTYPE_NAMES[dtype], "torch_dtype": _DTYPE_NAMES[dtype]}
    if isinstance(cfg, VisionConfig):
        return {"architectures": ["SiglipVisionModel"], **vision_config_to_hf(cfg), **dt}
    if not cfg.is_vlm:
        return {**text_config_to_hf(cfg.text), **dt}
    if cfg.connector.kind != "mlp":
        raise ConfigError(f"ModelConfig.connector.kind={cfg.connector.kind!r}: HF/vLLM export supports only the "
                          "'mlp' connector (LlavaForConditionalGeneration); pixel_shuffle and perceiver have no "
                          "HF class")
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        # text_config keeps its `architectures`: vLLM builds the inner decoder from it
        "text_config": text_config_to_hf(cfg.text), "vision_config": vision_config_to_hf(cfg.vision),
        "image_token_index": cfg.image_token_id, "image_seq_length": cfg.num_image_tokens,
        "vision_feature_layer": cfg.vision.feature_layer, "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.text.tie_embeddings, **dt,
    }


def _float_dtype(flat: dict[str, Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in flat.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise CheckpointError(f"params mix dtypes {sorted(map(str, dtypes))}; pass dtype= to export_hf_weights")
    return dtypes.pop()


def export_hf_weights(params: dict, cfg: AnyConfig, path: str | os.PathLike, *,
                      dtype: Optional[torch.dtype] = None, config_overrides: Optional[dict] = None) -> dict:
    """Write ``config.json`` and ``model.safetensors`` that transformers and vLLM load as-is.

    Text models become ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with qk_norm, ``Qwen2ForCausalLM``
    with qkv_bias); VLMs with the ``mlp`` connector become ``LlavaForConditionalGeneration``;
    ``({"vision": tree}, VisionConfig)`` becomes ``SiglipVisionModel``.

    Args:
        params: the parameter pytree (not INT8-quantized).
        cfg: its :class:`ModelConfig`, or a :class:`VisionConfig` for a vision encoder alone.
        path: output folder (created; existing files of the same names are replaced).
        dtype: cast weights to this dtype (default: the params' dtype, which must be uniform).
        config_overrides: extra top-level ``config.json`` entries (e.g. ``bos_token_id``); a dict value
            for ``text_config`` / ``vision_config`` updates that sub-config.

    Returns:
        The config dict written.
    """
    flat = flatten(params)
    quantized = sorted(k for k in flat if k.endswith(".q") or k.endswith(".scale"))
    if quantized:
        raise CheckpointError(f"params hold INT8-quantized weights ({quantized[0]}, ...); dequantize before export")
    dtype = dtype or _float_dtype(flat)
    config = hf_config(cfg, dtype)  # refuses what no HF class can represent
    names = hf_names(cfg)
    missing, unexpected = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
    if missing or unexpected:
        raise CheckpointError(f"params do not match cfg: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for k, v in (config_overrides or {}).items():
        config[k] = {**config[k], **v} if isinstance(v, dict) and isinstance(config.get(k), dict) else v
    tensors = {theirs: flat[ours].detach().to("cpu", dtype).contiguous() for ours, theirs in names.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
