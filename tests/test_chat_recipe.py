"""recipes/chat.py: --help documents every field; interactive mode driven through stdin; one-shot mode."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import ghostvis as gv
from ghostvis.infer.generate import generate
from ghostvis.train.chat import render_chat
from ghostvis.train.data.images import load_image
from ghostvis.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SIDE = gv.presets.get("tiny-vlm").vision.image_size
QUESTION = [{"role": "user", "content": [{"type": "image"}, "What is in this picture?"]}]
CORPUS = ["What is in this picture? A red square.", "Hello there, how are you?", "a blue circle and a square"] * 30


def load_recipe():
    spec = importlib.util.spec_from_file_location("chat_recipe", ROOT / "recipes" / "chat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny-vlm checkpoint in a run folder layout, with its tokenizer and an image."""
    root = tmp_path_factory.mktemp("chat")
    tok = train_tokenizer(CORPUS, 400)
    tok.save(root / "tokenizer.json")
    cfg = gv.presets.get("tiny-vlm")
    # the model's vocabulary is the tokenizer's, so every generated id decodes to text
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size))
    from PIL import Image
    Image.new("RGB", (SIDE, SIDE), (200, 30, 30)).save(root / "red.png")
    image = load_image(root / "red.png", SIDE)
    for seed in range(20):  # a random model whose greedy replies are printable text, so the comparison means something
        params = gv.init(cfg, seed=seed)
        replies = []
        for text in ("What is in this picture?", "Hello there"):
            messages = QUESTION + ([{"role": "assistant", "content": replies[0]}, {"role": "user", "content": text}]
                                   if replies else [])
            ids, _ = render_chat(tok, messages, cfg.num_image_tokens, add_generation_prompt=True)
            out = generate(params, cfg, [ids], [[image]], max_new_tokens=6, stop_ids=[tok.end_id, tok.eos_id])
            replies.append(tok.decode(out[0]))
        if all(r and r.isprintable() for r in replies):
            break
    gv.save(root / "checkpoints" / "step_000001" / "model.safetensors", params, cfg)
    (root / "checkpoints" / "step_000001" / "state.json").write_text("{}")
    return root


def greedy_reply(run_dir, messages, images, max_new_tokens):
    params, cfg = gv.load(run_dir / "checkpoints" / "step_000001" / "model.safetensors")
    from ghostvis.train.tokenizer import Tokenizer
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    ids, _ = render_chat(tok, messages, cfg.num_image_tokens, add_generation_prompt=True)
    out = generate(params, cfg, [ids], [images], max_new_tokens=max_new_tokens, stop_ids=[tok.end_id, tok.eos_id])
    return tok.decode(out[0])


def test_help_documents_every_field(capsys):
    recipe = load_recipe()
    import tyro
    with pytest.raises(SystemExit):
        tyro.cli(recipe.ChatConfig, args=["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(recipe.ChatConfig):
        assert "--" + f.name.replace("_", "-") in text
    doc = recipe.ChatConfig.__doc__
    for f in dataclasses.fields(recipe.ChatConfig):
        assert f"    {f.name}:" in doc, f"ChatConfig field {f.name} is not documented"


def test_interactive_session_through_stdin(run_dir):
    stdin = "/image red.png\nWhat is in this picture?\n/image missing.png\n/bogus\nHello there\n/quit\nnever read\n"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "chat.py"), "--checkpoint", str(run_dir),
                           "--temperature", "0", "--max-new-tokens", "6"],
                          input=stdin, capture_output=True, text=True, cwd=run_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "(image attached: red.png)" in out
    assert "cannot attach 'missing.png'" in out and "unknown command '/bogus'" in out
    assert out.count("assistant> ") == 2
    image = load_image(run_dir / "red.png", SIDE)
    first = greedy_reply(run_dir, [{"role": "user", "content": [{"type": "image"}, "What is in this picture?"]}],
                         [image], 6)
    second = greedy_reply(run_dir, [{"role": "user", "content": [{"type": "image"}, "What is in this picture?"]},
                                    {"role": "assistant", "content": first},
                                    {"role": "user", "content": "Hello there"}], [image], 6)
    replies = [part.split("\nyou> ")[0] for part in out.split("assistant> ")[1:]]
    assert replies == [first, second]
    assert first and second  # non-empty replies, so the comparison means something


def test_one_shot_mode(run_dir, capsys):
    recipe = load_recipe()
    cfg = recipe.ChatConfig(checkpoint=str(run_dir / "checkpoints" / "step_000001"), prompt="What is in this picture?",
                            image=(str(run_dir / "red.png"),), temperature=0.0, max_new_tokens=5)
    recipe.main(cfg)
    expected = greedy_reply(run_dir, [{"role": "user", "content": [{"type": "image"}, "What is in this picture?"]}],
                            [load_image(run_dir / "red.png", SIDE)], 5)
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit, match="cannot take images"):
        text_run = run_dir / "text"
        cfg_t = gv.presets.get("tiny")
        gv.save(text_run / "m.safetensors", gv.init(cfg_t, seed=0), cfg_t)
        recipe.main(dataclasses.replace(cfg, checkpoint=str(text_run / "m.safetensors"),
                                        tokenizer=str(run_dir / "tokenizer.json")))
