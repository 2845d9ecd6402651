"""Parameter pytrees: nested dicts and lists of tensors.

A pytree's flattened names are its safetensors keys: dict keys and list indices
joined by dots (``text.layers.3.attn.wq``). ``flatten`` and ``unflatten`` are
exact inverses for trees whose lists are dense and whose dict keys are not
digit strings.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Tree = Any


def flatten(tree: Tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted.name: tensor}`` in a deterministic (insertion) order."""
    out: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str) or "." in k or k.isdigit():
                    raise ValueError(f"pytree key {k!r} at {path or '<root>'} must be a dot-free, non-numeric string")
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}" if path else str(i))
        elif isinstance(node, torch.Tensor):
            out[path] = node
        elif node is None:
            pass
        else:
            raise TypeError(f"pytree leaf at {path!r} is a {type(node).__name__}, not a tensor")

    walk(tree, prefix)
    return out


def unflatten(flat: dict[str, torch.Tensor]) -> Tree:
    """Inverse of :func:`flatten`: numeric path parts become list indices."""
    root: dict = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            idx = sorted(int(k) for k in node)
            if idx != list(range(len(idx))):
                raise ValueError(f"list indices {idx} are not 0..{len(idx) - 1}")
            return [node[str(i)] for i in idx]
        return node

    return listify(root)


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leafwise over one or more trees of the same structure."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [tree_map(fn, v, *(r[i] for r in rest)) for i, v in enumerate(tree)]
    if tree is None:
        return None
    return fn(tree, *rest)


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of a pytree, in flatten order."""
    return list(flatten(tree).values())


def subtree(tree: Tree, path: str) -> Tree:
    """The node at a dotted ``path`` (``""`` is the root)."""
    node = tree
    for p in path.split(".") if path else []:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


def split(tree: dict, trainable: Callable[[str], bool]) -> tuple[dict, dict]:
    """Split a tree into (trainable, frozen) flat dicts by a predicate on the dotted name."""
    flat = flatten(tree)
    return ({k: v for k, v in flat.items() if trainable(k)}, {k: v for k, v in flat.items() if not trainable(k)})


def merge(*flats: dict[str, torch.Tensor]) -> Tree:
    """Re-assemble a nested tree from disjoint flat dicts (the inverse of :func:`split`)."""
    out: dict[str, torch.Tensor] = {}
    for f in flats:
        out.update(f)
    return unflatten(out)
