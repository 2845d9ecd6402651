"""The recipes: documented CLIs, and shortened end-to-end runs of align, sft and pretrain."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ghostvis as gv
from ghostvis.core.tree import flatten
from ghostvis.train.loop import ModelSource, RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        t = f.type if not isinstance(f.type, str) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"--{prefix}{f.name}".replace("_", "-"), t


@pytest.mark.parametrize("name,config", [("sft", "SFTConfig"), ("align", None), ("pretrain", "PretrainConfig")])
def test_help_documents_every_field(name, config):
    env = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--help"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    text = re.sub(r"[│╭╮╰╯─]", " ", out.stdout)
    cls = getattr(_recipe("sft" if config is None else name), config or "SFTConfig")
    flags = [f for f, _ in _fields(cls)]
    assert len(flags) > 20
    for flag in flags:
        m = re.search(re.escape(flag) + r"(?:,| |\{)[^\n]*\n?(.*?)\(default", text, re.S)
        assert m, f"{name}: {flag} missing from --help"
        words = re.sub(r"--\S+|\{[^}]*\}|[A-Z]{3,}", "", m.group(0)).split()
        assert len(words) >= 3, f"{name}: {flag} has no description in --help: {m.group(0)!r}"


def _short(mod, tmp_path, name, **train):
    sft = mod
    return sft.SFTConfig(
        data=sft.Data(train_size=96),
        train=TrainConfig(**{"steps": 3, "batch_size": 2, "seq_len": 256, "warmup": 1, "optimizer": "muon", **train}),
        run=RunConfig(name=name, out_dir=str(tmp_path), progress=False),
        eval=sft.Eval(images=3, batch_size=16))


@pytest.mark.slow
def test_align_then_sft_end_to_end(tmp_path, capsys):
    sft = _recipe("sft")
    align = _recipe("align")
    cfg = _short(sft, tmp_path, "align", trainable="connector", lr=1e-2)
    assert align.align_defaults().train.trainable == "connector"
    report = align.main(cfg)
    run = tmp_path / "align"
    start = flatten(gv.init(gv.presets.get("tiny-vlm"), seed=0))
    trained = flatten(gv.load(run / "checkpoints" / "step_000003" / "model.safetensors")[0])
    for k, v in start.items():
        assert torch.equal(trained[k], v) != k.startswith("connector."), k  # only the connector moved

    cfg = _short(sft, tmp_path, "sft")
    cfg.model = ModelSource(init=str(run))  # start from the alignment run's latest checkpoint
    report = sft.main(cfg)
    out = capsys.readouterr().out
    assert "held-out exact match" in out
    assert 0.0 <= report["accuracy"] <= 1.0 and report["total"] == 3 * cfg.data.questions_per_image
    run = tmp_path / "sft"
    for f in ("metrics.jsonl", "loss.png", "tokenizer.json", "eval.json", "checkpoints/step_000003/model.safetensors",
              "checkpoints/step_000003/optim.safetensors", "checkpoints/step_000003/state.json"):
        assert (run / f).is_file(), f
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [0, 1, 2] and "eval" in records[-1]


@pytest.mark.slow
def test_pretrain_end_to_end(tmp_path):
    pre = _recipe("pretrain")
    cfg = pre.PretrainConfig(data=pre.Data(docs=200, eval_docs=20),
                             train=TrainConfig(steps=3, batch_size=2, seq_len=128, warmup=1),
                             run=RunConfig(name="pre", out_dir=str(tmp_path), progress=False))
    report = pre.main(cfg)
    assert report["eval_loss"] == report["eval_loss"] and report["eval_loss"] < 9.0
    assert (tmp_path / "pre" / "checkpoints" / "step_000003" / "model.safetensors").is_file()


def test_sft_refuses_a_text_only_model(tmp_path):
    sft = _recipe("sft")
    cfg = _short(sft, tmp_path, "x")
    cfg.model = ModelSource(preset="tiny")
    with pytest.raises(SystemExit, match="text-only"):
        sft.main(cfg)
