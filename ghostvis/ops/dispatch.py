"""The one seam where every op picks its implementation.

Each op has a ``reference`` backend (plain torch, the oracle for tests and the CPU
path) and may register fast ones. ``call(op, ...)`` takes the first registered
backend, in priority order, whose ``supports(*args, **kwargs)`` says yes; a
forced backend (``use(...)`` context manager, or ``force(...)``) wins, and a
forced backend that cannot take the inputs raises instead of silently falling
back. The first time an op runs with a given backend it is logged once on the
``ghostvis.ops`` logger, so a run's log says which path it actually took.

A backend may also carry an ``auto`` predicate, stricter than ``supports``: it
says when the backend is worth picking unasked. The Triton kernels use it: they
*can* run CPU tensors (through Triton's interpreter) when forced, but are picked
automatically on CPU only when ``TRITON_INTERPRET=1`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger("ghostvis.ops")


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    supports: Callable[..., bool]
    priority: int
    auto: Optional[Callable[..., bool]] = None

    def picks(self, *args, **kwargs) -> bool:
        """Whether the automatic choice may take this backend for these inputs."""
        return self.supports(*args, **kwargs) and (self.auto is None or self.auto(*args, **kwargs))


_REGISTRY: dict[str, list[Backend]] = {}
_FORCED: dict[str, str] = {}
_LOGGED: set[tuple[str, str]] = set()


_SAID: set = set()


def log_once(key: str, msg: str, *args) -> None:
    """``log.info(msg, *args)`` the first time ``key`` comes up in this process (never while compiling)."""
    if key not in _SAID and not torch.compiler.is_compiling():
        _SAID.add(key)
        log.info(msg, *args)


def _always(*args, **kwargs) -> bool:
    return True


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels may then be picked for CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register(op: str, name: str, fn: Callable, supports: Callable[..., bool] = _always, priority: int = 0,
             auto: Optional[Callable[..., bool]] = None) -> None:
    """Register ``fn`` as backend ``name`` of ``op``; higher priority is tried first.

    ``supports`` says whether it can run the inputs (checked for forced backends
    too); ``auto`` (optional) additionally gates the automatic choice.
    """
    backends = [b for b in _REGISTRY.get(op, []) if b.name != name]
    backends.append(Backend(name, fn, supports, priority, auto))
    _REGISTRY[op] = sorted(backends, key=lambda b: -b.priority)


def backends(op: str) -> list[str]:
    """Names of the backends registered for ``op``, in the order they are tried."""
    return [b.name for b in _REGISTRY[op]]


def choose(op: str, *args, backend: Optional[str] = None, **kwargs) -> Backend:
    """The backend ``call`` would use for these inputs; ``backend`` forces one for this call."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")
    if backend is not None:
        for b in _REGISTRY[op]:
            if b.name == backend:
                if not b.supports(*args, **kwargs):
                    raise RuntimeError(f"backend {backend!r} was asked for {op!r} but cannot run these inputs")
                return b
        raise KeyError(f"op {op!r} has no backend {backend!r}; it has {backends(op)}")
    forced = _FORCED.get(op) or _FORCED.get("*")
    if forced is not None:
        for b in _REGISTRY[op]:
            if b.name == forced:
                if not b.supports(*args, **kwargs):
                    raise RuntimeError(f"backend {forced!r} was forced for {op!r} but cannot run these inputs")
                return b
        if op in _FORCED:  # a per-op force must name a real backend; a global one may skip ops lacking it
            raise KeyError(f"op {op!r} has no backend {forced!r}; it has {backends(op)}")
    for b in _REGISTRY[op]:
        if b.picks(*args, **kwargs):
            return b
    raise RuntimeError(f"no backend of {op!r} supports these inputs")


def call(op: str, *args, backend: Optional[str] = None, **kwargs):
    """Run ``op`` on the chosen backend (``backend`` forces one for this call)."""
    b = choose(op, *args, backend=backend, **kwargs)
    if (op, b.name) not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add((op, b.name))
        log.info("op %s uses backend %s", op, b.name)
    return b.fn(*args, **kwargs)


def force(**op_to_backend: str | None) -> None:
    """Pin backends globally, e.g. ``force(attention="sdpa")``; ``None`` unpins.

    The key ``all`` pins every op that has a backend of that name (``force(all="reference")``).
    """
    for op, name in op_to_backend.items():
        key = "*" if op == "all" else op
        if name is None:
            _FORCED.pop(key, None)
        else:
            _FORCED[key] = name


@contextlib.contextmanager
def use(**op_to_backend: str) -> Iterator[None]:
    """Context manager form of :func:`force`: ``with use(rms_norm="triton"): ...``."""
    saved = dict(_FORCED)
    force(**op_to_backend)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)
