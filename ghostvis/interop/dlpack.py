"""Zero-copy conversion of parameter pytrees between PyTorch and JAX, through DLPack.

``to_jax(params)`` returns the same nested dicts/lists with every ``torch.Tensor``
replaced by a ``jax.Array`` that *aliases* the tensor's memory (CPU or CUDA);
``from_jax(tree)`` does the reverse; ``load_jax(path)`` reads a GhostVis
safetensors checkpoint straight into JAX arrays. The conversions copy no bytes,
so converting a multi-GB model is instant and costs no memory. Names and structure are kept:
``ghostvis.flatten`` gives the same dotted names on both sides.

Aliasing has one consequence worth knowing. JAX assumes its arrays are
immutable, but after ``to_jax`` a JAX array and a torch tensor share one
buffer: an in-place torch update (``param.add_(...)``, the GhostVis optimizers,
``load_state_dict``-style copies) silently changes the JAX array too, and code
JAX has already traced or cached may or may not see the change. The same holds
the other way for tensors from ``from_jax``: writing into them writes into a
buffer JAX believes is constant. So treat a converted tree as a read-only view;
convert again after training steps, or copy explicitly
(``jax.tree.map(jnp.copy, tree)`` / ``tree_map(torch.clone, params)``) when both
sides must evolve independently.

A few inputs cannot be aliased and are copied instead: non-contiguous torch
views (made contiguous first), views whose data pointer is not aligned the way
XLA needs (JAX copies them), and 64-bit integers while JAX's ``jax_enable_x64``
is off (JAX narrows them to int32). Model parameters are none of these.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Tree = Any


def _map_tree(fn: Callable[[Any, str], Any], tree: Tree, path: str = "") -> Tree:
    """Apply ``fn(leaf, dotted_path)`` to every leaf, keeping dicts, lists, tuples and None."""
    if isinstance(tree, dict):
        return {k: _map_tree(fn, v, f"{path}.{k}" if path else str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        mapped = [_map_tree(fn, v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(tree)]
        return type(tree)(mapped) if isinstance(tree, tuple) else mapped
    if tree is None:
        return None
    return fn(tree, path)


def _tensor_to_jax(t: torch.Tensor, path: str):
    import jax

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"to_jax: leaf {path or '<root>'!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.is_cuda and not any(d.platform == "gpu" for d in jax.devices()):
        raise ValueError(f"to_jax: {path or '<root>'!r} lives on {t.device} but JAX has no GPU backend "
                         "(install a CUDA build of jax, or move the params to the CPU first)")
    t = t.detach()  # DLPack refuses tensors that require grad; detaching shares the storage
    if not t.is_contiguous():
        t = t.contiguous()  # strided views (e.g. broadcasts) have no DLPack form JAX accepts
    return jax.dlpack.from_dlpack(t)


def _array_to_torch(a, path: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        raise TypeError(f"from_jax: leaf {path or '<root>'!r} is already a torch.Tensor")
    if not hasattr(a, "__dlpack__"):
        raise TypeError(f"from_jax: leaf {path or '<root>'!r} is a {type(a).__name__}, not an array with DLPack")
    return torch.from_dlpack(a)


def to_jax(params: Tree) -> Tree:
    """The pytree ``params`` with every torch tensor viewed as a ``jax.Array`` (zero-copy, same device).

    Tensors are detached first (the JAX view carries no autograd history).
    See the module docstring for what aliasing means for later in-place updates.
    """
    return _map_tree(_tensor_to_jax, params)


def from_jax(tree: Tree) -> Tree:
    """The pytree ``tree`` with every ``jax.Array`` (or other DLPack array) viewed as a torch tensor, zero-copy."""
    return _map_tree(_array_to_torch, tree)


def load_jax(path) -> tuple[dict, "object"]:
    """Load a GhostVis safetensors checkpoint straight into JAX: ``(tree of jax.Array, ModelConfig)``.

    Uses ``safetensors``' JAX loader (no torch in the loop), then rebuilds the
    nested tree from the dotted names. Unlike :func:`ghostvis.load` it does not
    check the tensors against the config.
    """
    from safetensors import safe_open
    from safetensors.flax import load_file

    from ..core.config import ModelConfig
    from ..core.tree import unflatten

    with safe_open(str(path), framework="flax") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no GhostVis config in the safetensors metadata (not written by ghostvis.save?)")
    return unflatten(load_file(str(path))), ModelConfig.from_json(meta["config"])
