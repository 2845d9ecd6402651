"""An endless, deterministic, resumable and rank-sharded batch iterator over a sequence of samples.

Every epoch is planned from ``(seed, epoch)`` alone: the samples are shuffled,
packed into rows of ``seq_len`` by best-fit decreasing (or one per row when
``packed=False``), and the rows shuffled again. Global batch ``k`` of the epoch
is rows ``[k*G, (k+1)*G)`` with ``G = batch_size * world_size``; rank ``r``
takes its ``batch_size`` rows ``[r*B, (r+1)*B)`` of it. So

- every batch has the static shape ``[batch_size, seq_len]``;
- ranks see disjoint rows, and the global batch does not depend on how many
  ranks share it (2 ranks x 4 rows == 1 rank x 8 rows, row for row);
- the cursor is two ints, ``{"epoch", "step"}``: after ``load_state_dict`` the
  iterator yields exactly the batches an uninterrupted run would have.

The last partial global batch of an epoch is dropped (it would need all-padding
rows, i.e. a rank with no targets); the next epoch reshuffles, so different rows
are dropped each time. Samples longer than ``seq_len`` are truncated; one whose
cut would split an image's placeholder run is dropped and counted in ``dropped``.
"""

from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

from ..packing import Sample, best_fit_decreasing, collate_rows, truncate


class BatchIterator:
    """Fixed-shape batch dicts (see :mod:`ghostvis.train.packing`) forever, epoch after epoch.

    Args:
        samples: a sequence of :class:`Sample` (a list, a ``SampleSet``, a lazy ``SyntheticVQA``);
            if it has a ``lengths`` attribute, the plan uses it instead of materialising every sample.
        batch_size: rows per batch on this rank.
        seq_len: tokens per row.
        pad_id: padding token (``tok.pad_id``).
        image_token_id: the ``<|image|>`` id, so truncation never splits an image (None for text-only data).
        packed: pack several samples per row (else one sample per row, padded).
        shuffle: shuffle samples and rows each epoch (else keep the data order).
        seed: the shuffle seed.
        rank, world_size: this process's slice of each global batch.

    Attributes:
        epoch, step: the cursor (the next batch is batch ``step`` of epoch ``epoch``).
        dropped: samples left out because truncation would split an image.
        truncated: samples cut to ``seq_len``.
    """

    def __init__(self, samples: Sequence[Sample], *, batch_size: int, seq_len: int, pad_id: int = 0,
                 image_token_id: Optional[int] = None, packed: bool = True, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.samples, self.batch_size, self.seq_len, self.pad_id = samples, batch_size, seq_len, pad_id
        self.image_token_id, self.packed, self.shuffle, self.seed = image_token_id, packed, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.step = 0, 0
        self._lengths, self.truncated, self.dropped = self._plan_lengths()
        self._epoch_rows: tuple[int, list[list[int]]] | None = None
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self._usable)} usable samples give {len(self._rows(0))} rows, fewer than one "
                             f"global batch of {batch_size} x {world_size} ranks; use more data or smaller batches")

    def _plan_lengths(self) -> tuple[list[int], int, int]:
        """Each sample's length after truncation (0 = dropped), and the truncated/dropped counts."""
        raw = getattr(self.samples, "lengths", None)
        raw = list(raw) if raw is not None else [len(s.ids) for s in self.samples]
        lengths, truncated, dropped = [], 0, 0
        for i, n in enumerate(raw):
            if n > self.seq_len:
                kept = truncate(self.samples[i], self.seq_len, self.image_token_id)
                truncated += kept is not None
                dropped += kept is None
                n = 0 if kept is None else self.seq_len
            lengths.append(n)
        self._usable = [i for i, n in enumerate(lengths) if n > 0]
        return lengths, truncated, dropped

    def _rows(self, epoch: int) -> list[list[int]]:
        """The rows (lists of sample indices) of ``epoch``, a pure function of ``(seed, epoch)``."""
        order = list(self._usable)
        rng = random.Random(f"ghostvis-batches:{self.seed}:{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        if not self.packed:
            return [[i] for i in order]
        bins = best_fit_decreasing([self._lengths[i] for i in order], self.seq_len)
        rows = [[order[j] for j in b] for b in bins]
        if self.shuffle:
            rng.shuffle(rows)  # BFD emits longest-first; mix rows so batches are not sorted by length
        return rows

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The planned rows of ``epoch`` (cached for the current epoch)."""
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, self._rows(epoch))
        return self._epoch_rows[1]

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch (the same on every epoch when packing is off; may vary by one with packing)."""
        return len(self.epoch_rows(self.epoch)) // self.global_batch_size

    def batch_rows(self, epoch: int, step: int) -> list[list[int]]:
        """This rank's rows (sample indices) of batch ``step`` of ``epoch``."""
        rows = self.epoch_rows(epoch)
        start = step * self.global_batch_size + self.rank * self.batch_size
        return rows[start:start + self.batch_size]

    def _sample(self, i: int) -> Sample:
        s = self.samples[i]
        return truncate(s, self.seq_len, self.image_token_id) if len(s.ids) > self.seq_len else s

    def __iter__(self) -> "BatchIterator":
        return self

    def plan(self, epoch: Optional[int] = None, step: Optional[int] = None) -> Iterator[tuple[int, int]]:
        """``(epoch, step)`` of every batch that ``next`` gives from the cursor (or from ``epoch, step``), forever."""
        e, s = (self.epoch, self.step) if epoch is None else (epoch, step)
        while True:
            if s >= len(self.epoch_rows(e)) // self.global_batch_size:
                e, s = e + 1, 0
            yield e, s
            s += 1

    def batch_at(self, epoch: int, step: int) -> dict:
        """Batch ``step`` of ``epoch`` (this rank's rows): a pure function of the two, whatever the cursor."""
        rows = self.batch_rows(epoch, step)
        return collate_rows([[self._sample(i) for i in row] for row in rows], self.seq_len, self.pad_id)

    def __next__(self) -> dict:
        epoch, step = next(self.plan())
        self.epoch, self.step = epoch, step + 1
        return self.batch_at(epoch, step)

    def state_dict(self) -> dict:
        """The cursor as plain ints: ``{"epoch", "step", "seed"}``."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a cursor saved by :meth:`state_dict` (the seed must match)."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data cursor was saved with seed {state['seed']}, this iterator has seed {self.seed}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
