"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus), seeded.

``sample`` is a pure function of the logits and a ``torch.Generator``; the same
seed on the same device gives the same tokens. ``temperature == 0`` is greedy.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Raise ValueError naming the bad sampling setting."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits with everything below the k-th largest of each row set to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Logits outside the smallest set of tokens whose probability reaches ``p`` set to -inf.

    The most likely token always survives, so ``p`` close to 0 is greedy.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, *, temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Next tokens ``[B]`` (long) from logits ``[B, vocab]``.

    ``temperature == 0`` (or ``top_k == 1``) picks the argmax; otherwise the
    float32 logits are divided by ``temperature``, filtered by ``top_k`` then
    ``top_p``, and one token per row is drawn with ``generator``.
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
