"""HF transformers interop: import parity, export parity, bit-exact round trips, refusals.

HF models are built from tiny config objects (no downloads) in fp32. Every weight is
redrawn with non-trivial norms and biases, so a swapped norm, a dropped bias or a
transposed matrix moves the outputs far beyond the 1e-4 tolerance.
"""

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import ghostvis as gv  # noqa: E402
from ghostvis.core import vision as gv_vision  # noqa: E402
from ghostvis.core.config import ConfigError, ConnectorConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from ghostvis.core.hf import export_hf_weights, import_hf  # noqa: E402
from ghostvis.core.io import CheckpointError  # noqa: E402

TOL = 1e-4
VOCAB, IMAGE_TOKEN = 256, 3

# ---------------------------------------------------------------------------------------------- helpers


def hf_llama(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, **kw)


def hf_qwen3(**kw):
    # head_dim * heads (128) != hidden (64): head_dim must come from the config
    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, **kw)


def hf_siglip(**kw):
    return SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, layer_norm_eps=1e-5, **kw)


def hf_llava(text_config, feature_layer=-1, **kw):
    return LlavaConfig(vision_config=hf_siglip(), text_config=text_config, image_token_index=IMAGE_TOKEN,
                       image_seq_length=16, vision_feature_select_strategy="full",
                       vision_feature_layer=feature_layer, **kw)


def redraw_(tensors, seed):
    """Give every tensor a scale where mistakes show: matrices ~1/sqrt(fan_in), norms ~1±0.3, biases ~0.3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in tensors:
            noise = torch.randn(t.shape, generator=g)
            if t.dim() >= 2:
                t.copy_(noise / t[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight") or name.endswith("norm"):
                t.copy_(1 + 0.3 * noise)
            else:
                t.copy_(0.3 * noise)


def hf_model(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    redraw_(model.named_parameters(), seed)
    return model


def gv_model(cfg, seed=0):
    params = gv.init(cfg, seed=seed)
    redraw_(gv.flatten(params).items(), seed + 1)
    return params


def tokens_with_images(n_rows=2, length=24, n_image_tokens=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(IMAGE_TOKEN + 1, VOCAB, (n_rows, length), generator=g)
    tokens[:, 3:3 + n_image_tokens] = IMAGE_TOKEN
    return tokens


def images(n=2, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 0.1, "outputs too small for the comparison to mean anything"
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_clean(cls, path):
    """Load with transformers and require no missing/unexpected/mismatched keys and no warnings at all."""
    records, hf_logger = _Records(), logging.getLogger("transformers")
    hf_logger.addHandler(records)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logger.removeHandler(records)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not records.messages, records.messages
    return model.eval()


def text_tokens(seed=0):
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("cls,make,shard", [(LlamaForCausalLM, hf_llama, False), (LlamaForCausalLM, hf_llama, True),
                                            (Qwen3ForCausalLM, lambda: hf_qwen3(tie_word_embeddings=True), False)],
                         ids=["llama", "llama-sharded", "qwen3-tied"])
def test_import_text_matches_hf(tmp_path, cls, make, shard):
    hf = hf_model(cls, make())
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    params, cfg = import_hf(tmp_path)
    assert cfg.text.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert cfg.text.qk_norm == (cls is Qwen3ForCausalLM) and cfg.text.head_dim == 32
    assert cfg.text.tie_embeddings == hf.config.tie_word_embeddings
    tokens = text_tokens()
    with torch.no_grad():
        assert_close(gv.forward(params, cfg, tokens), hf(input_ids=tokens).logits)
    params16, _ = import_hf(tmp_path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in gv.flatten(params16).values())


def test_import_siglip_matches_hf(tmp_path):
    hf = hf_model(SiglipVisionModel, hf_siglip())  # with its pooling head, which import skips
    hf.save_pretrained(tmp_path)
    params, cfg = import_hf(tmp_path)
    assert isinstance(cfg, VisionConfig) and set(params) == {"vision"}
    x = images()
    with torch.no_grad():
        assert_close(gv_vision.encode(params["vision"], cfg, x), hf(pixel_values=x).last_hidden_state)


def to_transformers5_layout(key):
    """The key names transformers 5 uses in memory (``model.language_model.*`` etc.)."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


@pytest.mark.parametrize("text,feature_layer", [("llama", -1), ("qwen3", -2)])
def test_import_llava_matches_hf(tmp_path, text, feature_layer):
    text_config = hf_llama() if text == "llama" else hf_qwen3()
    hf = hf_model(LlavaForConditionalGeneration, hf_llava(text_config, feature_layer))
    hf.save_pretrained(tmp_path)
    params, cfg = import_hf(tmp_path)
    assert cfg.vision.feature_layer == feature_layer and cfg.image_token_id == IMAGE_TOKEN
    assert cfg.connector.kind == "mlp" and cfg.num_image_tokens == 16
    tokens, x = tokens_with_images(), images()
    with torch.no_grad():
        assert_close(gv.forward(params, cfg, tokens, x), hf(input_ids=tokens, pixel_values=x).logits)

    # The same weights under transformers 5's key names import to the same tree.
    weights = load_file(tmp_path / "model.safetensors")
    save_file({to_transformers5_layout(k): v for k, v in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    params5, _ = import_hf(tmp_path)
    for k, v in gv.flatten(params).items():
        assert torch.equal(gv.flatten(params5)[k], v), k


def test_import_llava_without_projector_bias(tmp_path):
    hf = hf_model(LlavaForConditionalGeneration, hf_llava(hf_llama(), multimodal_projector_bias=False))
    hf.save_pretrained(tmp_path)
    params, cfg = import_hf(tmp_path)
    tokens, x = tokens_with_images(), images()
    with torch.no_grad():
        assert_close(gv.forward(params, cfg, tokens, x), hf(input_ids=tokens, pixel_values=x).logits)


# ---------------------------------------------------------------------------------------------- export


def tiny_text(**kw):
    return TextConfig(**{"vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32,
                         "ffn_dim": 128, "max_seq_len": 128, "rope_theta": 3000.0, "norm_eps": 1e-5, **kw})


def tiny_vision(**kw):
    return VisionConfig(**{"image_size": 32, "patch_size": 8, "dim": 64, "n_layers": 2, "n_heads": 2, "ffn_dim": 128,
                           **kw})


def tiny_vlm(connector="mlp", text=None, **vision_kw):
    return ModelConfig(text=text or tiny_text(), vision=tiny_vision(**vision_kw), connector=ConnectorConfig(connector),
                       image_token_id=IMAGE_TOKEN)


@pytest.mark.parametrize("text_cfg,arch", [
    (tiny_text(), "LlamaForCausalLM"),
    (tiny_text(qk_norm=True, tie_embeddings=True, n_heads=4, n_kv_heads=2), "Qwen3ForCausalLM"),
    (tiny_text(qkv_bias=True), "Qwen2ForCausalLM"),
], ids=["llama", "qwen3-tied", "qwen2"])
def test_export_text_loads_in_transformers(tmp_path, text_cfg, arch):
    cfg = ModelConfig(text=text_cfg)
    params = gv_model(cfg)
    export_hf_weights(params, cfg, tmp_path)
    hf = load_clean(AutoModelForCausalLM, tmp_path)
    assert type(hf).__name__ == arch
    tokens = text_tokens()
    with torch.no_grad():
        assert_close(gv.forward(params, cfg, tokens), hf(input_ids=tokens).logits)


def test_export_siglip_loads_in_transformers(tmp_path):
    cfg = tiny_vision(norm_eps=1e-5)
    params = {"vision": gv_model(tiny_vlm())["vision"]}
    export_hf_weights(params, cfg, tmp_path)
    assert all(k.startswith("vision_model.") for k in load_file(tmp_path / "model.safetensors"))
    hf = load_clean(SiglipVisionModel, tmp_path)
    x = images()
    with torch.no_grad():
        assert_close(gv_vision.encode(params["vision"], cfg, x), hf(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("text_cfg,feature_layer", [(tiny_text(), -1),
                                                    (tiny_text(qk_norm=True, tie_embeddings=True), 1)],
                         ids=["llama", "qwen3-tied"])
def test_export_llava_loads_in_transformers(tmp_path, text_cfg, feature_layer):
    cfg = tiny_vlm(text=text_cfg, feature_layer=feature_layer)
    params = gv_model(cfg)
    config = export_hf_weights(params, cfg, tmp_path)
    assert config["vision_feature_layer"] == feature_layer and config["image_seq_length"] == 16
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in load_file(tmp_path / "model.safetensors")}
    # the layout vLLM's LLaVA loader reads natively
    assert prefixes <= {"language_model.model", "language_model.lm_head", "vision_tower.vision_model",
                        "multi_modal_projector.linear_1", "multi_modal_projector.linear_2"}, prefixes
    hf = load_clean(LlavaForConditionalGeneration, tmp_path)
    tokens, x = tokens_with_images(), images()
    with torch.no_grad():
        assert_close(gv.forward(params, cfg, tokens, x), hf(input_ids=tokens, pixel_values=x).logits)


def test_connector_reads_features_before_post_norm(tmp_path):
    """LLaVA semantics: the projector sees block outputs without SigLIP's post_layernorm."""
    cfg = tiny_vlm()
    params = gv_model(cfg)
    export_hf_weights(params, cfg, tmp_path)
    hf = load_clean(LlavaForConditionalGeneration, tmp_path)
    x = images()
    with torch.no_grad():
        theirs = torch.stack(hf.get_image_features(pixel_values=x).pooler_output)
        assert_close(gv.encode_images(params, cfg, x), theirs)
        normed = gv_vision.encode(params["vision"], cfg.vision, x)  # with post_norm
        from ghostvis.core.connector import connect
        assert (connect(params["connector"], cfg, normed) - theirs).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("cfg", [
    ModelConfig(text=tiny_text()),
    ModelConfig(text=tiny_text(qk_norm=True, tie_embeddings=True)),
    ModelConfig(text=tiny_text(qkv_bias=True)),
    tiny_vlm(feature_layer=-2),
    tiny_vision(),
], ids=["llama", "qwen3-tied", "qwen2", "llava", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip_is_bit_exact(tmp_path, cfg, dtype):
    if isinstance(cfg, VisionConfig):
        params = {"vision": gv_model(tiny_vlm())["vision"]}
    else:
        params = gv_model(cfg)
    params = gv.tree_map(lambda t: t.to(dtype), params)
    config = export_hf_weights(params, cfg, tmp_path)
    assert config["dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    back, cfg_back = import_hf(tmp_path)
    assert cfg_back == cfg
    flat, flat_back = gv.flatten(params), gv.flatten(back)
    assert flat.keys() == flat_back.keys()
    for k, v in flat.items():
        assert flat_back[k].dtype == dtype and torch.equal(flat_back[k], v), k


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind", ["pixel_shuffle", "perceiver"])
def test_export_refuses_connectors_without_hf_class(tmp_path, kind):
    cfg = tiny_vlm(kind)
    with pytest.raises(ConfigError, match="'mlp'"):
        export_hf_weights(gv.init(cfg), cfg, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_export_refuses_qk_norm_with_qkv_bias(tmp_path):
    cfg = ModelConfig(text=tiny_text(qk_norm=True, qkv_bias=True))
    with pytest.raises(ConfigError, match="Qwen3ForCausalLM"):
        export_hf_weights(gv.init(cfg), cfg, tmp_path)


def test_export_refuses_int8_params(tmp_path):
    cfg = ModelConfig(text=tiny_text())
    params = gv.init(cfg)
    w = params["text"]["layers"][0]["attn"]["wq"]
    params["text"]["layers"][0]["attn"]["wq"] = {"q": w.to(torch.int8), "scale": torch.ones(w.shape[0])}
    with pytest.raises(CheckpointError, match="dequantize"):
        export_hf_weights(params, cfg, tmp_path)


def _edit(d, path, value):
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    d[last] = value


@pytest.mark.parametrize("base,field,value", [
    ("text", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("text", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
    ("text", "hidden_act", "gelu"),
    ("text", "attention_bias", True),
    ("text", "architectures", ["MistralForCausalLM"]),
    ("qwen3", "use_sliding_window", True),
    ("llava", "vision_feature_select_strategy", "default"),
    ("llava", "vision_feature_layer", [-1, -2]),
    ("llava", "vision_config.model_type", "clip_vision_model"),
    ("llava", "projector_hidden_act", "relu"),
    ("llava", "text_config.rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_import_refuses_unsupported_config(tmp_path, base, field, value):
    cfg = {"text": ModelConfig(text=tiny_text()), "qwen3": ModelConfig(text=tiny_text(qk_norm=True)),
           "llava": tiny_vlm()}[base]
    export_hf_weights(gv.init(cfg), cfg, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    _edit(config, field, value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        import_hf(tmp_path)


def test_import_names_missing_and_unexpected_weights(tmp_path):
    cfg = ModelConfig(text=tiny_text())
    export_hf_weights(gv.init(cfg), cfg, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = weights.pop("model.layers.1.mlp.up_proj.weight")[:, 0].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight(.|\n)*"
                                              r"unexpected model\.layers\.0\.self_attn\.o_proj\.bias"):
        import_hf(tmp_path)


def test_import_never_reads_pickles(tmp_path):
    cfg = ModelConfig(text=tiny_text())
    export_hf_weights(gv.init(cfg), cfg, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        import_hf(tmp_path)


def test_transformers4_style_config_fields():
    """transformers 4.x keeps rope_theta at the top level and has no rope_parameters."""
    from ghostvis.core.hf import text_config_from_hf
    d = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 2, "rope_theta": 1e6, "rope_scaling": None,
         "torch_dtype": "bfloat16"}
    t = text_config_from_hf(d)
    assert (t.rope_theta, t.head_dim, t.n_kv_heads, t.max_seq_len) == (1e6, 32, 2, 2048)
    with pytest.raises(ConfigError, match="rope_type"):
        text_config_from_hf(d | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6}})
