"""Checkpoints as safetensors: tensors by their flattened pytree names, config in the metadata.

No pickle is read or written anywhere. ``load`` checks the file against the
config it carries and names every missing, unexpected, mis-shaped or
mis-typed tensor; a truncated or corrupt file raises :class:`CheckpointError`
with the path, not a traceback from inside the parser.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .tree import flatten, unflatten

FORMAT = "ghostvis"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match its model config."""


def save_tree(path: str | os.PathLike, tree, metadata: Optional[dict[str, str]] = None) -> None:
    """Write any tensor pytree to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in flatten(tree).items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(tmp), metadata={"format": FORMAT, **(metadata or {})})
    os.replace(tmp, path)


def load_tree(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict, dict[str, str]]:
    """Read a pytree and its metadata; raises :class:`CheckpointError` on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the parser's own errors are not actionable for a user
        size = path.stat().st_size
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    return unflatten(flat), meta


def expected_spec(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flattened name -> shape of every parameter ``cfg`` has."""
    from .model import init
    return {k: tuple(v.shape) for k, v in flatten(init(cfg, device="meta")).items()}


def check_tree(flat: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "") -> None:
    """Raise :class:`CheckpointError` listing every difference between ``flat`` and ``cfg``'s layout.

    INT8-quantized weights (``name.q`` int8 plus ``name.scale``) stand for ``name``.
    """
    spec = expected_spec(cfg)
    problems = []
    seen = set()
    float_dtypes = set()
    for name, t in flat.items():
        base = name
        if name.endswith(".q") or name.endswith(".scale"):
            base = name.rsplit(".", 1)[0]
            if base in spec:
                seen.add(base)
                if name.endswith(".q") and (t.dtype != torch.int8 or tuple(t.shape) != spec[base]):
                    problems.append(f"{name}: expected int8 {list(spec[base])}, got {t.dtype} {list(t.shape)}")
                continue
        if name not in spec:
            problems.append(f"{name}: unexpected tensor")
            continue
        seen.add(name)
        if tuple(t.shape) != spec[name]:
            problems.append(f"{name}: expected shape {list(spec[name])}, got {list(t.shape)}")
        if not t.is_floating_point():
            problems.append(f"{name}: expected a floating-point tensor, got {t.dtype}")
        else:
            float_dtypes.add(t.dtype)
    problems += [f"{name}: missing" for name in spec if name not in seen]
    if len(float_dtypes) > 1:
        problems.append(f"mixed parameter dtypes {sorted(str(d) for d in float_dtypes)}")
    if problems:
        head = f"{where}: " if where else ""
        raise CheckpointError(head + f"checkpoint does not match its config ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:50]))


def save(path: str | os.PathLike, params: dict, cfg: ModelConfig, metadata: Optional[dict[str, str]] = None) -> None:
    """Save ``params`` with ``cfg`` in the safetensors metadata (bit-exact, atomic)."""
    check_tree(flatten(params), cfg, str(path))
    save_tree(path, params, {"config": cfg.to_json(), **(metadata or {})})


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: Optional[torch.dtype] = None) -> tuple[dict, ModelConfig]:
    """Load ``(params, cfg)`` from a file written by :func:`save`, checked against its config."""
    tree, meta = load_tree(path, device)
    if "config" not in meta:
        raise CheckpointError(f"{path}: no GhostVis config in the metadata (not written by ghostvis.save?)")
    try:
        cfg = ModelConfig.from_json(meta["config"])
    except (ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: bad config in metadata: {e}") from None
    check_tree(flatten(tree), cfg, str(path))
    if dtype is not None:
        from .tree import tree_map
        tree = tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)
    return tree, cfg
