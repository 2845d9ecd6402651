"""Learning-rate schedules as pure functions of the step.

Each returns the multiplier (peak = 1.0) at 0-based ``step``: a linear warmup
over ``warmup`` steps, then a decay shape until ``total`` steps, ending at
``final`` (a fraction of the peak; 0 means "decay to zero"). ``lr_schedule``
binds a peak learning rate and gives the ``step -> lr`` callable the optimizers take.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

KINDS = ("cosine", "linear", "constant")


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _progress(step: int, warmup: int, total: int) -> float:
    """Fraction of the decay phase done, in [0, 1]."""
    span = max(1, total - warmup)
    return min(1.0, max(0.0, (step - warmup) / span))


def constant(step: int, *, total: int, warmup: int = 0, final: float = 0.0) -> float:
    """Warmup, then 1.0 forever (``total`` and ``final`` are ignored)."""
    return _warmup(step, warmup)


def cosine(step: int, *, total: int, warmup: int = 0, final: float = 0.0) -> float:
    """Warmup, then a half cosine from 1.0 down to ``final`` at step ``total``."""
    if step < warmup:
        return _warmup(step, warmup)
    t = _progress(step, warmup, total)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear(step: int, *, total: int, warmup: int = 0, final: float = 0.0) -> float:
    """Warmup, then a straight line from 1.0 down to ``final`` at step ``total`` (``final=0``: decay to zero)."""
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 - (1.0 - final) * _progress(step, warmup, total)


_SHAPES = {"cosine": cosine, "linear": linear, "constant": constant}


def multiplier(kind: str, step: int, *, total: int, warmup: int = 0, final: float = 0.0) -> float:
    """The multiplier of schedule ``kind`` at ``step``."""
    if kind not in _SHAPES:
        raise ValueError(f"schedule must be one of {KINDS}, got {kind!r}")
    if warmup < 0 or total < 0:
        raise ValueError(f"warmup and total must be >= 0, got warmup={warmup}, total={total}")
    return _SHAPES[kind](step, total=total, warmup=warmup, final=final)


def _scaled(peak: float, kind: str, total: int, warmup: int, final: float, step: int) -> float:
    return peak * multiplier(kind, step, total=total, warmup=warmup, final=final)


def lr_schedule(peak: float, kind: str = "cosine", *, total: int, warmup: int = 0,
                final: float = 0.0) -> Callable[[int], float]:
    """``step -> peak * multiplier(kind, step)``: a picklable pure function for the optimizers."""
    multiplier(kind, 0, total=total, warmup=warmup, final=final)  # validate now, not mid-run
    return partial(_scaled, peak, kind, total, warmup, final)
