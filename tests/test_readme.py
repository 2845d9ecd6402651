"""The README's code is part of the API contract: its notebook snippet must run as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_notebook_snippet_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## In a notebook\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "ckpt.safetensors").is_file()
    assert namespace["logits"].shape[-1] == namespace["cfg"].text.vocab_size


def test_readme_commands_match_ci():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert test_cmd in text and test_cmd in ci
    assert "bash scripts/setup.sh && .venv/bin/python recipes/sft.py" in text
    assert (ROOT / "recipes" / "sft.py").is_file()
