"""Training checkpoints: a folder per step, written whole or not at all.

    runs/<name>/checkpoints/step_000200/
        model.safetensors   params + model config (ghostvis.save)
        optim.safetensors   the optimizer state pytree
        state.json          step, data cursor, RNG states, anything else the loop keeps

A checkpoint is written into a hidden temporary folder beside the others, each
file flushed to disk, and only then renamed to ``step_XXXXXX`` (a rename within
one filesystem is atomic). So a crash or a kill mid-save leaves at worst a
stale ``.tmp-*`` folder, which :func:`latest` ignores and the next save removes;
the previous checkpoint stays loadable. ``keep_last`` prunes old ones after a
successful save. No pickle is read or written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..core.config import ModelConfig
from ..core.io import CheckpointError, load, save
from .optim import load_state, save_state

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optim.safetensors", "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint at ``step`` under ``root``."""
    return Path(root) / f"step_{step:06d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    """Python, torch CPU (and CUDA) RNG states as JSON-friendly values."""
    state = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, step: int, params: dict, cfg: ModelConfig, opt_state: Optional[dict],
                    state: dict, keep_last: int = 0) -> Path:
    """Write the checkpoint of ``step`` atomically; returns its folder.

    Args:
        root: the checkpoints folder (e.g. ``runs/<name>/checkpoints``).
        step: number of completed optimizer steps.
        params: the full parameter pytree.
        cfg: the model config (stored in the model file's metadata).
        opt_state: the optimizer state pytree (or None).
        state: JSON-serialisable extras (data cursor, RNG, counters); ``step`` is added.
        keep_last: keep only this many newest checkpoints (0 keeps all).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by an earlier crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save(tmp / MODEL_FILE, params, cfg)
        if opt_state is not None:
            save_state(tmp / OPTIM_FILE, opt_state)
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**state, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        for name in (MODEL_FILE, OPTIM_FILE):
            if (tmp / name).exists():
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. the final save) replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, opt_template: Optional[dict] = None,
                    device: str | torch.device = "cpu") -> tuple[dict, ModelConfig, Optional[dict], dict]:
    """Read ``(params, cfg, opt_state, state)`` from a checkpoint folder.

    ``opt_template`` (``opt.init(trainable)``) receives the saved optimizer state;
    without it the optimizer state is not read and None is returned.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no {STATE_FILE})")
    params, cfg = load(path / MODEL_FILE, device=device)
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    opt_state = None
    if opt_template is not None:
        if not (path / OPTIM_FILE).is_file():
            raise CheckpointError(f"{path}: no {OPTIM_FILE} to resume the optimizer from")
        opt_state = load_state(path / OPTIM_FILE, opt_template, device=device)
    return params, cfg, opt_state, state
