"""HF export: the folder loads in transformers with GhostVis's logits, and HF builds GhostVis's prompt ids."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import ghostvis as gv
from ghostvis.infer.export import export_hf
from ghostvis.infer.quantize import dequantize, quantize
from ghostvis.train.chat import CHAT_TEMPLATE, render_chat
from ghostvis.train.data.images import preprocess_image
from ghostvis.train.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = ["What is in this picture? A red square on a blue background.", "Describe the image.",
          "Hello! How are you today? Fine, thanks.", "The quick brown fox jumps over the lazy dog."] * 30
CONVERSATIONS = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the image."},
     {"role": "assistant", "content": "A fox."}, {"role": "user", "content": "and the dog?"}],
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 400)


def distinct(params: dict, seed: int) -> dict:
    """Random params whose norms are not all ones and whose logits are not tiny, so a mixed-up name shows."""
    g = torch.Generator().manual_seed(seed)
    return gv.tree_map(lambda t: t * 4 if t.dim() == 2 else t + 0.3 * torch.randn(t.shape, generator=g), params)


def test_text_export_matches_in_transformers(tok, tmp_path):
    cfg = gv.presets.get("tiny")
    params = distinct(gv.init(cfg, seed=0), 1)
    export_hf(params, cfg, tmp_path, tok)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert "processor_config.json" not in names
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.end_id, tok.eos_id] and gen["bos_token_id"] == tok.bos_id
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        ids, _ = render_chat(tok, messages, 0, add_generation_prompt=True)
        hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert hf_tok(hf_ids, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok(hf_ids)["input_ids"] == ids  # no extra bos/eos from the tokenizer itself
        x = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = gv.forward(params, cfg, x), model(input_ids=x).logits
        assert (ours - theirs).abs().max() <= 1e-4
        assert ours.std() > 0.5  # logits large enough for the tolerance to mean something
    assert hf_tok.eos_token_id == tok.end_id and hf_tok.pad_token_id == tok.pad_id


def test_qwen3_text_export_matches(tok, tmp_path):
    cfg = gv.presets.get("tiny")
    cfg = cfg.replace(text=gv.TextConfig(**{**cfg.text.__dict__, "qk_norm": True}))
    params = distinct(gv.init(cfg, seed=3), 4)
    export_hf(params, cfg, tmp_path, tok)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    x = torch.tensor([render_chat(tok, CONVERSATIONS[1], 0)[0]])
    with torch.no_grad():
        assert (gv.forward(params, cfg, x) - model(input_ids=x).logits).abs().max() <= 1e-4


def test_vlm_export_matches_in_transformers(tok, tmp_path):
    cfg = gv.presets.get("tiny-vlm")
    params = distinct(gv.init(cfg, seed=5), 6)
    export_hf(params, cfg, tmp_path, tok)
    proc_cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert proc_cfg["num_additional_image_tokens"] == 0 and proc_cfg["patch_size"] == cfg.vision.patch_size
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["image_token"] == "<|image|>"
    assert (tmp_path / "preprocessor_config.json").is_file()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.startswith("vision_tower.vision_model.") for k in f.keys())

    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    proc = transformers.AutoProcessor.from_pretrained(tmp_path)
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (80, 50), (30, 60, 200))  # not the encoder's size: the processor must resize
    ImageDraw.Draw(image).rectangle([10, 10, 40, 30], fill=(220, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image"}, "What is in this picture?"]}]
    ids, _ = render_chat(tok, messages, cfg.num_image_tokens, add_generation_prompt=True)
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = proc(images=[image], text=text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ids
    pixels = preprocess_image(image, cfg.vision.image_size)
    assert (enc["pixel_values"][0] - pixels).abs().max() <= 2e-2  # same resize + normalisation (PIL bicubic)
    with torch.no_grad():
        ours = gv.forward(params, cfg, enc["input_ids"], enc["pixel_values"])
        theirs = model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"]).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_unrepresentable_connector_is_refused(tok, tmp_path):
    cfg = gv.presets.get("tiny-vlm-shuffle")
    with pytest.raises(gv.ConfigError, match="only the 'mlp' connector"):
        export_hf(gv.init(cfg, seed=0), cfg, tmp_path, tok)
    assert not (tmp_path / "config.json").exists()


def test_quantized_params_export_dequantized(tok, tmp_path):
    cfg = gv.presets.get("tiny")
    q = quantize(distinct(gv.init(cfg, seed=7), 8), lm_head=True)  # the head too: dequantized as well
    export_hf(q, cfg, tmp_path, tok)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    x = torch.tensor([[1, 4, 20, 30, 7, 5]])
    with torch.no_grad():
        assert (gv.forward(dequantize(q), cfg, x) - model(input_ids=x).logits).abs().max() <= 1e-4


def test_export_recipe(tok, tmp_path):
    cfg = gv.presets.get("tiny-vlm")
    run = tmp_path / "run"
    gv.save(run / "checkpoints" / "step_000010" / "model.safetensors", gv.init(cfg, seed=0), cfg)
    (run / "checkpoints" / "step_000010" / "state.json").write_text("{}")
    tok.save(run / "tokenizer.json")
    spec = importlib.util.spec_from_file_location("export_recipe", Path(__file__).parents[1] / "recipes/export.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(recipe)
    out = recipe.main(recipe.ExportConfig(checkpoint=str(run), out=str(tmp_path / "hf"), dtype="bfloat16"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
