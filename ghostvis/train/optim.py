"""Functional optimizers: AdamW and Muon as pure ``init`` / ``update`` pairs, plus gradient clipping.

    opt = make_optimizer("muon", lr=3e-3, muon_lr=0.02)
    state = opt.init(params)
    params, state = opt.update(params, grads, state, step)

``params`` and ``grads`` are flat dicts ``{dotted.name: tensor}`` (what
:func:`ghostvis.core.tree.split` returns) or nested pytrees; names drive the
routing and weight-decay rules below. The optimizer *state* is a nested pytree
of tensors (per-parameter buffers keyed like ``text/layers/0/attn/wq``), so it
saves as safetensors with :func:`save_state` / :func:`load_state`.

Pure in form, in place in fact: like JAX's donated buffers, ``update`` writes the
new values into the tensors of ``params`` and ``state`` it was given and returns
those same objects. Keep a copy (``tree_map(torch.clone, ...)``) if you need the
old values.

Which parameter goes where (:func:`is_muon_param`): Muon orthogonalises the
update of a *matrix*, which only makes sense for the 2-D weights inside blocks
(``text.layers.*``, ``vision.layers.*``) and the connector's projections.
Everything else takes AdamW: token and position embeddings, the LM head, the
perceiver latents, the 4-D patch embedding, norms and biases.

Skipping a step: ``update(..., found_inf=flag)`` with a float32 scalar tensor
(1.0 = skip, 0.0 = apply) leaves ``params`` and ``state`` untouched when the flag is
set. Fused AdamW reads the flag on the device, so the host does not wait for it (a
train step can be queued whole, its loss read later); the other paths (Muon,
unfused AdamW, an AdamW with no parameters) read it on the host first.

Weight decay (:func:`decays`): matrices decay; vectors (norms, biases) and
embedding tables (``text.embed``, ``vision.pos_embed``, ``connector.latents``)
never do, since decaying a lookup table pulls rare tokens to zero.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from ..core.io import CheckpointError, load_tree, save_tree
from ..core.tree import flatten

Tensor = torch.Tensor
Flat = dict[str, Tensor]
LR = Union[float, Callable[[int], float]]

# Last name components of lookup tables: no decay, and never Muon.
EMBEDDING_NAMES = ("embed", "pos_embed", "latents", "lm_head")
NO_DECAY_NAMES = ("embed", "pos_embed", "latents")
MUON_PREFIXES = ("text.layers.", "vision.layers.", "connector.")


def is_muon_param(name: str, t: Tensor) -> bool:
    """True for 2-D weight matrices of decoder/encoder blocks and the connector (see module docstring)."""
    last = name.rsplit(".", 1)[-1]
    return t.ndim == 2 and last not in EMBEDDING_NAMES and name.startswith(MUON_PREFIXES)


def decays(name: str, t: Tensor) -> bool:
    """True when weight decay applies: tensors of rank >= 2 that are not embedding tables."""
    return t.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def _is_flat(tree) -> bool:
    return isinstance(tree, dict) and all(isinstance(v, Tensor) for v in tree.values())


def as_flat(tree) -> Flat:
    """A flat ``{name: tensor}`` view of a flat dict or nested pytree (same tensor objects)."""
    return tree if _is_flat(tree) else flatten(tree)


def _by_slot(flat: Flat) -> dict[str, Tensor]:
    """Per-parameter state keyed by the parameter name with ``/`` for ``.``: a flat, dot-free dict that
    saves as one safetensors key per parameter whatever subset of the model is trained."""
    return {k.replace(".", "/"): v for k, v in flat.items()}


def _by_name(slots: dict[str, Tensor]) -> Flat:
    return {k.replace("/", "."): v for k, v in slots.items()}


def _lr_at(lr: LR, step: int) -> float:
    return float(lr(step)) if callable(lr) else float(lr)


def _check_grads(params: Flat, grads: Flat) -> None:
    if params.keys() != grads.keys():
        missing, extra = sorted(params.keys() - grads.keys()), sorted(grads.keys() - params.keys())
        raise KeyError(f"grads do not match params: missing {missing[:5]}, unexpected {extra[:5]}")


# --------------------------------------------------------------------------- clipping


def global_norm(grads) -> Tensor:
    """The L2 norm of all gradients together (a float32 scalar tensor)."""
    gs = [g for g in as_flat(grads).values()]
    if not gs:
        return torch.zeros(())
    norms = torch._foreach_norm(gs)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def scale_to_max_norm_(grads, max_norm: float, norm: float | Tensor) -> None:
    """Scale ``grads`` in place by ``max_norm / norm`` when their global ``norm`` exceeds it.

    ``max_norm <= 0`` disables clipping; a non-finite norm leaves the gradients untouched.
    ``norm`` may be a float, or a scalar tensor (as :func:`global_norm` returns): then the
    scale is computed and applied on the tensor's device and the host does not wait for it.
    """
    if max_norm <= 0:
        return
    gs = list(as_flat(grads).values())
    if isinstance(norm, Tensor):
        coef = max_norm / (norm.float() + 1e-6)
        torch._foreach_mul_(gs, torch.where(torch.isfinite(norm) & (norm > max_norm), coef, torch.ones_like(coef)))
    elif math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_(gs, max_norm / (norm + 1e-6))


def clip_by_global_norm(grads, max_norm: float) -> tuple[dict, Tensor]:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``; returns ``(grads, norm_before)``.

    ``max_norm <= 0`` disables clipping (the norm is still returned). A non-finite
    norm leaves the gradients untouched (the train step skips such steps).
    """
    norm = global_norm(grads)
    scale_to_max_norm_(grads, max_norm, norm)
    return grads, norm


# --------------------------------------------------------------------------- AdamW


@dataclass(frozen=True)
class AdamW:
    """AdamW (decoupled weight decay), bit-compatible with ``torch.optim.AdamW``.

    Attributes:
        lr: a learning rate, or a pure function ``step -> lr`` (see :mod:`.schedule`).
        betas: moment decay rates.
        eps: added to the denominator.
        weight_decay: decoupled decay, applied only where ``decay(name, tensor)`` holds.
        decay: the weight-decay rule (default :func:`decays`).
        fused: use PyTorch's fused multi-tensor kernel (``torch._fused_adamw_``);
            ``None`` picks it on CUDA and the ``torch._foreach_*`` path elsewhere.
    """

    lr: LR = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay: Callable[[str, Tensor], bool] = decays
    fused: Optional[bool] = None

    def init(self, params) -> dict:
        """Zero moments shaped like ``params`` and an update counter (the state is a nested pytree)."""
        flat = as_flat(params)
        dev = next(iter(flat.values())).device if flat else "cpu"
        return {"count": torch.zeros((), dtype=torch.float32, device=dev),
                "exp_avg": _by_slot({k: torch.zeros_like(v) for k, v in flat.items()}),
                "exp_avg_sq": _by_slot({k: torch.zeros_like(v) for k, v in flat.items()})}

    def update(self, params, grads, state: dict, step: int, found_inf: Optional[Tensor] = None):
        """One AdamW step at schedule step ``step``; updates ``params`` and ``state`` in place, returns both.

        ``found_inf`` (a float32 scalar tensor, 1.0 to skip) leaves both untouched when set;
        the fused kernel reads it on the device without a host sync.
        """
        p, g = as_flat(params), as_flat(grads)
        _check_grads(p, g)
        m, v = _by_name(state["exp_avg"]), _by_name(state["exp_avg_sq"])
        lr = _lr_at(self.lr, step)
        fused = self.fused if self.fused is not None else any(t.is_cuda for t in p.values())
        if found_inf is not None and not fused and _skips(found_inf):
            return params, state
        state["count"] += 1
        # one call per weight-decay group: the kernels take a single decay value
        for wd, names in ((self.weight_decay, [k for k in p if self.decay(k, p[k])]),
                          (0.0, [k for k in p if not self.decay(k, p[k])])):
            if not names:
                continue
            args = ([p[k] for k in names], [g[k] for k in names], [m[k] for k in names], [v[k] for k in names])
            if fused:
                _fused_adamw(*args, state["count"], lr, self.betas, self.eps, wd, found_inf)
            else:
                _foreach_adamw(*args, state["count"], lr, self.betas, self.eps, wd)
        if fused and found_inf is not None:
            state["count"] -= found_inf.to(state["count"].dtype)  # as torch.optim does: a skipped step is not counted
        return params, state


def _skips(found_inf: Tensor) -> bool:
    """Whether a ``found_inf`` flag says skip (a host read: it waits for the device)."""
    return bool(found_inf.item() != 0)


def takes_found_inf(optimizer) -> bool:
    """Whether ``optimizer.update`` accepts a ``found_inf`` flag."""
    try:
        return "found_inf" in inspect.signature(optimizer.update).parameters
    except (TypeError, ValueError):
        return False


def update_or_skip(optimizer, params, grads, state: dict, step: int, found_inf: Optional[Tensor]):
    """``optimizer.update(...)`` with ``found_inf`` handed over where it is taken; for an optimizer
    without it, the flag is read on the host and a set one skips the call. Returns ``(params, state)``."""
    if found_inf is None:
        return optimizer.update(params, grads, state, step)
    if takes_found_inf(optimizer):
        return optimizer.update(params, grads, state, step, found_inf=found_inf)
    if _skips(found_inf):
        return params, state
    return optimizer.update(params, grads, state, step)


def _fused_adamw(ps, gs, ms, vs, count, lr, betas, eps, wd, found_inf=None):
    if found_inf is not None:
        found_inf = found_inf.to(device=ps[0].device, dtype=torch.float32)
    torch._fused_adamw_(ps, gs, ms, vs, [], [count] * len(ps), lr=lr, beta1=betas[0], beta2=betas[1],
                        weight_decay=wd, eps=eps, amsgrad=False, maximize=False, found_inf=found_inf)


def _foreach_adamw(ps, gs, ms, vs, count, lr, betas, eps, wd):
    # The same sequence of operations as torch.optim.AdamW's multi-tensor path, so results match bitwise.
    b1, b2 = betas
    t = float(count)
    if wd:
        torch._foreach_mul_(ps, 1 - lr * wd)
    torch._foreach_lerp_(ms, gs, 1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
    step_size = lr / (1 - b1**t)
    bc2_sqrt = (1 - b2**t) ** 0.5
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, ms, denom, -step_size)


# --------------------------------------------------------------------------- Muon

# Quintic Newton-Schulz coefficients that push singular values towards ~1 in few steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise matrices ``g`` ``[..., m, n]`` (batched over leading dims).

    Returns ``U V^T``-like matrices (singular values pushed into roughly [0.7, 1.2]).
    Runs in bfloat16 on CUDA (fast, and precise enough for an update direction), float32 elsewhere.
    """
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


@dataclass(frozen=True)
class Muon:
    """Muon: SGD-momentum (Nesterov) whose update is orthogonalised by Newton-Schulz.

    Only for 2-D matrices (see :func:`is_muon_param`). Matrices of one shape are
    stacked and orthogonalised in one batched call. The update is scaled by
    ``sqrt(max(1, rows/cols))`` so tall and wide matrices move alike.

    Attributes:
        lr: a learning rate or a pure function ``step -> lr``.
        momentum: momentum coefficient.
        nesterov: use the Nesterov-style lookahead gradient.
        weight_decay: decoupled decay, applied where ``decay(name, tensor)`` holds.
        ns_steps: Newton-Schulz iterations.
        decay: the weight-decay rule (default :func:`decays`).
    """

    lr: LR = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0
    ns_steps: int = 5
    decay: Callable[[str, Tensor], bool] = decays

    def init(self, params) -> dict:
        """Zero momentum buffers shaped like ``params``."""
        flat = as_flat(params)
        bad = [k for k, v in flat.items() if v.ndim != 2]
        if bad:
            raise ValueError(f"Muon takes 2-D matrices only; got {[(k, list(flat[k].shape)) for k in bad[:5]]}")
        return {"momentum": _by_slot({k: torch.zeros_like(v) for k, v in flat.items()})}

    def update(self, params, grads, state: dict, step: int, found_inf: Optional[Tensor] = None):
        """One Muon step; updates ``params`` and ``state`` in place, returns both.

        ``found_inf`` (a scalar tensor, nonzero to skip) is read on the host: a skipped step
        changes nothing.
        """
        p, g = as_flat(params), as_flat(grads)
        _check_grads(p, g)
        if found_inf is not None and _skips(found_inf):
            return params, state
        buf = _by_name(state["momentum"])
        lr = _lr_at(self.lr, step)
        by_shape: dict[tuple, list[str]] = defaultdict(list)
        for k in p:
            by_shape[tuple(p[k].shape)].append(k)
        for (rows, cols), names in by_shape.items():
            gs, bs, ps = [g[k] for k in names], [buf[k] for k in names], [p[k] for k in names]
            torch._foreach_lerp_(bs, gs, 1 - self.momentum)
            direction = torch._foreach_lerp(gs, bs, self.momentum) if self.nesterov else bs
            ortho = newton_schulz(torch.stack(direction), self.ns_steps)
            scale = max(1.0, rows / cols) ** 0.5
            if self.weight_decay:
                decayed = [t for k, t in zip(names, ps) if self.decay(k, t)]
                if decayed:
                    torch._foreach_mul_(decayed, 1 - lr * self.weight_decay)
            torch._foreach_add_(ps, list(ortho.unbind(0)), alpha=-lr * scale)
        return params, state


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Partitioned:
    """Several optimizers, each owning the parameters ``assign(name, tensor)`` names it for.

    The state is ``{label: that optimizer's state}``.
    """

    optimizers: dict = field(default_factory=dict)
    assign: Callable[[str, Tensor], str] = lambda name, t: "adamw"

    def _split(self, flat: Flat) -> dict[str, Flat]:
        parts: dict[str, Flat] = {label: {} for label in self.optimizers}
        for k, v in flat.items():
            label = self.assign(k, v)
            if label not in parts:
                raise KeyError(f"parameter {k!r} assigned to {label!r}, which is not one of {list(parts)}")
            parts[label][k] = v
        return parts

    def init(self, params) -> dict:
        """Each sub-optimizer's state over its share of ``params``."""
        parts = self._split(as_flat(params))
        return {label: opt.init(parts[label]) for label, opt in self.optimizers.items()}

    def update(self, params, grads, state: dict, step: int, found_inf: Optional[Tensor] = None):
        """Route each parameter's gradient to its optimizer; in place, returns ``(params, state)``.

        Every sub-optimizer steps, even one with no parameters here, so step counters
        advance together (a rank's shard of a sharded optimizer may hold none of a group).
        ``found_inf`` goes to each of them.
        """
        p, g = as_flat(params), as_flat(grads)
        _check_grads(p, g)
        pp, gp = self._split(p), self._split(g)
        for label, opt in self.optimizers.items():
            update_or_skip(opt, pp[label], gp[label], state[label], step, found_inf)
        return params, state


def muon_or_adamw(name: str, t: Tensor) -> str:
    """The routing rule of ``make_optimizer("muon")``: ``"muon"`` or ``"adamw"``."""
    return "muon" if is_muon_param(name, t) else "adamw"


def make_optimizer(kind: str = "adamw", *, lr: LR = 1e-3, muon_lr: LR = 0.02, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95):
    """The optimizer a recipe asks for: ``"adamw"`` (everything AdamW) or ``"muon"`` (Muon + AdamW)."""
    adamw = AdamW(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if kind == "adamw":
        return adamw
    if kind == "muon":
        return Partitioned({"muon": Muon(lr=muon_lr, momentum=momentum, weight_decay=weight_decay), "adamw": adamw},
                           assign=muon_or_adamw)
    raise ValueError(f"optimizer kind must be 'adamw' or 'muon', got {kind!r}")


# --------------------------------------------------------------------------- state I/O


def save_state(path, state: dict) -> None:
    """Write an optimizer state pytree as safetensors (atomic)."""
    save_tree(path, state, {"kind": "optimizer_state"})


def load_state(path, template: dict, device: str | torch.device = "cpu") -> dict:
    """Read a state saved by :func:`save_state` into the layout of ``template`` (``opt.init(params)``).

    Raises :class:`CheckpointError` naming every missing or mis-shaped tensor, so a
    state saved for a different model or optimizer never loads silently.
    """
    loaded = flatten(load_tree(path, device)[0])
    want = flatten(template)
    problems = [f"{k}: missing" for k in want if k not in loaded]
    problems += [f"{k}: expected {list(v.shape)}, got {list(loaded[k].shape)}" for k, v in want.items()
                 if k in loaded and loaded[k].shape != v.shape]
    problems += [f"{k}: unexpected" for k in loaded if k not in want]
    if problems:
        raise CheckpointError(f"{path}: optimizer state does not match the optimizer ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:20]))
    for k, v in want.items():
        v.copy_(loaded[k])
    return template


def num_updates(state: dict) -> int:
    """How many AdamW updates a state has seen (0 if it has no AdamW part)."""
    flat = flatten(state)
    counts = [v for k, v in flat.items() if k == "count" or k.endswith(".count")]
    return int(counts[0]) if counts else 0


__all__ = ["AdamW", "Muon", "Partitioned", "make_optimizer", "is_muon_param", "muon_or_adamw", "decays",
           "newton_schulz", "global_norm", "clip_by_global_norm", "scale_to_max_norm_", "save_state", "load_state",
           "as_flat", "num_updates", "takes_found_inf", "update_or_skip"]
