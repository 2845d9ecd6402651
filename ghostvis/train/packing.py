"""Samples, sequence packing and collation into the fixed-shape batch dict the model reads.

Packing puts several short documents into one row of ``seq_len`` tokens instead
of padding each to ``seq_len``: far fewer wasted tokens for chat-sized samples.
Documents in a row must not see each other, so every row carries

- ``doc_ids``: documents numbered 0, 1, ... within the row (attention stays inside a document;
  the trailing padding is one more document),
- ``positions``: RoPE positions restarting at 0 at each document start,
- ``targets``: the next token where that token is supervised and in the same document, else -100.

Rows are filled by best-fit decreasing: documents sorted longest first, each
placed in the fullest row that still has room (a new row when none has).
``images`` is every image of the batch in reading order (row by row, left to
right), which is the order the model scatters them into the ``<|image|>`` runs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor
IGNORE = -100  # target value the loss skips


@dataclass
class Sample:
    """One document: token ids, which of them are supervised, and its images.

    Attributes:
        ids: token ids (image placeholders already expanded).
        loss_mask: True where the token is a prediction target (same length as ``ids``).
        images: ``[3, H, W]`` float32 images normalised to [-1, 1], one per placeholder run, in order.
    """

    ids: list[int]
    loss_mask: list[bool]
    images: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise ValueError(f"Sample: {len(self.ids)} ids but {len(self.loss_mask)} loss_mask entries")

    def __len__(self) -> int:
        return len(self.ids)


def image_runs(ids: Sequence[int], image_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each maximal run of ``image_id`` in ``ids`` (end exclusive)."""
    runs, start = [], None
    for i, t in enumerate(ids):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def truncate(sample: Sample, seq_len: int, image_id: Optional[int]) -> Optional[Sample]:
    """``sample`` cut to ``seq_len`` tokens, or None if the cut would split an image's placeholder run.

    Images whose placeholders fall wholly after the cut are dropped with them.
    Assumes one placeholder run per image (adjacent images would merge into one run;
    then the run is kept or the sample dropped as a whole).
    """
    if len(sample.ids) <= seq_len:
        return sample
    if image_id is None:
        return Sample(sample.ids[:seq_len], sample.loss_mask[:seq_len], [])
    runs = image_runs(sample.ids, image_id)
    if any(s < seq_len < e for s, e in runs):
        return None
    kept_placeholders = sum(min(e, seq_len) - s for s, e in runs if s < seq_len)
    total = sum(e - s for s, e in runs)
    n_keep = len(sample.images) * kept_placeholders // total if total else 0
    return Sample(sample.ids[:seq_len], sample.loss_mask[:seq_len], list(sample.images[:n_keep]))


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into ``lengths``) of total length <= ``capacity``, by best-fit decreasing.

    Ties keep the input order (the sort is stable), so a shuffled input gives
    a shuffled, reproducible packing. Within a bin, indices are in placement order.
    """
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}; lengths must be in [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the first fit is the best fit
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def _row_tensors(docs: Sequence[Sample], seq_len: int, pad_id: int) -> tuple[list[int], ...]:
    tokens, targets, positions, doc_ids = [], [], [], []
    for d, doc in enumerate(docs):
        n = len(doc.ids)
        tokens += doc.ids
        targets += [doc.ids[t + 1] if doc.loss_mask[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE]
        positions += range(n)
        doc_ids += [d] * n
    pad = seq_len - len(tokens)
    if pad < 0:
        raise ValueError(f"a row holds {len(tokens)} tokens, more than seq_len={seq_len}")
    tokens += [pad_id] * pad
    targets += [IGNORE] * pad
    positions += range(pad)
    doc_ids += [len(docs)] * pad
    return tokens, targets, positions, doc_ids


def collate_rows(rows: Sequence[Sequence[Sample]], seq_len: int, pad_id: int) -> dict:
    """The batch dict for ``rows`` (each a list of documents laid out left to right).

    Returns ``tokens``, ``targets``, ``positions``, ``doc_ids`` (Long ``[B, seq_len]``) and
    ``images`` (Float ``[N, 3, H, W]`` in reading order, or None when the batch has none).
    """
    cols = [_row_tensors(docs, seq_len, pad_id) for docs in rows]
    batch = {name: torch.tensor([c[k] for c in cols], dtype=torch.long).reshape(len(rows), seq_len)
             for k, name in enumerate(("tokens", "targets", "positions", "doc_ids"))}
    images = [img for docs in rows for doc in docs for img in doc.images]
    batch["images"] = torch.stack(images).float() if images else None
    return batch


def pack(samples: Sequence[Sample], seq_len: int, pad_id: int = 0) -> dict:
    """Pack ``samples`` (each at most ``seq_len`` long) into as few rows as best-fit decreasing finds."""
    bins = best_fit_decreasing([len(s.ids) for s in samples], seq_len)
    return collate_rows([[samples[i] for i in b] for b in bins], seq_len, pad_id)


def collate_padded(samples: Sequence[Sample], seq_len: int, pad_id: int = 0) -> dict:
    """One sample per row, padded to ``seq_len``: the unpacked baseline (same batch dict)."""
    return collate_rows([[s] for s in samples], seq_len, pad_id)
