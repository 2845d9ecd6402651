"""Evaluation: held-out exact-match accuracy by greedy generation, and held-out loss.

``vqa_accuracy`` feeds each question's prompt (ending in ``<|assistant|>``) and
image to :func:`ghostvis.infer.generate.generate`, decodes the answer up to
``<|end|>`` and compares it with the expected one by exact match (case and
surrounding whitespace ignored).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import torch

from ..infer.generate import generate
from .loss import loss_fn, supervised_tokens


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` equals ``answer`` ignoring case and surrounding whitespace."""
    return prediction.strip().lower() == answer.strip().lower()


def question_kind(question: str) -> str:
    """A short label for a question's template (its first two words), for per-kind accuracy."""
    return " ".join(question.split()[:2]).lower()


@torch.no_grad()
def vqa_accuracy(params: dict, cfg, tok, examples: Sequence, *, batch_size: int = 64, max_new_tokens: int = 8,
                 device: str | torch.device = "cpu") -> dict:
    """Exact-match accuracy of greedy answers on ``examples`` (with ``prompt``, ``images``, ``question``, ``answer``).

    Returns ``{"accuracy", "correct", "total", "by_kind": {kind: accuracy}, "examples": [first few as dicts]}``.
    """
    if not examples:
        raise ValueError("vqa_accuracy needs at least one example")
    stop = [tok.end_id, tok.eos_id]
    correct, hits = 0, defaultdict(list)
    shown = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        images = [[im.to(device) for im in e.images] for e in chunk]
        outs = generate(params, cfg, [list(e.prompt) for e in chunk], images, max_new_tokens=max_new_tokens,
                        stop_ids=stop)
        for e, ids in zip(chunk, outs):
            pred = tok.decode(ids)
            ok = exact_match(pred, e.answer)
            correct += ok
            hits[question_kind(e.question)].append(ok)
            if len(shown) < 8:
                shown.append({"question": e.question, "answer": e.answer, "prediction": pred, "correct": ok})
    return {"accuracy": correct / len(examples), "correct": correct, "total": len(examples),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(hits.items())}, "examples": shown}


@torch.no_grad()
def mean_loss(params: dict, cfg, batches: Iterable[dict]) -> float:
    """Token-mean loss over ``batches`` (each weighted by its supervised tokens)."""
    total, count = 0.0, 0
    for b in batches:
        n = int(supervised_tokens(b))
        if n:
            total += float(loss_fn(params, b, cfg, normalizer=1.0))
            count += n
    return total / max(count, 1)
