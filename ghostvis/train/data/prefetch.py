"""Batches prepared ahead, in a background thread or in worker processes, while the current step trains.

    feed = Prefetcher(batches, depth=2, pin=True)   # batches: e.g. a BatchIterator
    batch = next(feed)                               # ready, or waits for the thread
    cursor = feed.state_dict()                       # the cursor after the batches handed out
    feed.close()

    feed = WorkerFeed(batch_iterator, workers=4, depth=2, pin=True)   # the same, drawn by 4 processes

Drawing a batch is host work: images decoded or drawn, rows collated, tensors stacked
(each a fresh allocation the kernel must fault in). Done in the training loop, the GPU
idles for all of it after every step. A :class:`Prefetcher` does it in one background
thread, up to ``depth`` batches ahead, and with ``pin`` copies each batch into pinned
(page-locked) memory, so that ``tensor.to("cuda", non_blocking=True)`` really is
asynchronous. One thread keeps the order, so the batches are exactly those the iterator
gives in the loop; :meth:`state_dict` is the iterator's cursor as it was right after the
last batch handed out, so a checkpoint resumes from the same batch either way.

One thread is enough while drawing a batch takes less time than a step. Drawing
pictures is Python work that holds the interpreter's lock, so where a batch takes
longer than a step (a VLM's batch of many images), :class:`WorkerFeed` draws batches in
several processes: a :class:`~ghostvis.train.data.BatchIterator`'s batch is a pure
function of its ``(epoch, step)`` (:meth:`~ghostvis.train.data.BatchIterator.batch_at`),
so workers draw the planned batches in parallel and torch's ``DataLoader`` hands them
back in order.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

import torch

_END = object()  # the thread's last item: (_END, the exception that stopped it)


class Prefetcher:
    """An iterator of ``batches``'s batch dicts, each prepared up to ``depth`` batches ahead.

    Args:
        batches: an iterator of batch dicts; with ``state_dict()`` (a
            :class:`~ghostvis.train.data.BatchIterator`), so is the prefetcher. Only the
            prefetcher's thread touches it from now on: load a cursor into it first.
        depth: batches held ready (at least 1).
        pin: copy every tensor of a batch into pinned memory (CUDA only).

    An exception raised by ``batches`` (its end too) is raised by the ``next`` call that
    would have returned the batch. Call :meth:`close` when done (also on errors).
    """

    def __init__(self, batches: Iterator[dict], depth: int = 2, *, pin: bool = False):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._batches = batches
        self._has_state = callable(getattr(batches, "state_dict", None))
        self._state: Optional[dict] = dict(batches.state_dict()) if self._has_state else None
        self._pin = pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="ghostvis-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue ``item``, waiting for room; False once :meth:`close` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._batches)
                state = dict(self._batches.state_dict()) if self._has_state else None
                if self._pin:
                    batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                if not self._put((batch, state)):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, StopIteration included
            self._put((_END, e))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        batch, state = self._queue.get()
        if batch is _END:
            self._done = True
            raise state
        self._state = state
        return batch

    def state_dict(self) -> dict:
        """The wrapped iterator's cursor right after the last batch handed out (as if not prefetched)."""
        if not self._has_state:
            raise AttributeError(f"{type(self._batches).__name__} has no state_dict()")
        return dict(self._state)

    def close(self) -> None:
        """Stop the thread (it finishes the batch in hand) and drop the batches prepared."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _BatchAt(torch.utils.data.Dataset):
    """A map-style dataset whose keys are ``(epoch, step)`` and whose items are ``(key, that batch)``."""

    def __init__(self, batches):
        self.batches = batches

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, int], dict]:
        return key, self.batches.batch_at(*key)


class _Plan(torch.utils.data.Sampler):
    """The ``(epoch, step)`` keys of the batches to come, forever."""

    def __init__(self, batches, epoch: int, step: int):
        self.batches, self.epoch, self.step = batches, epoch, step

    def __iter__(self):
        return self.batches.plan(self.epoch, self.step)


class WorkerFeed:
    """A :class:`~ghostvis.train.data.BatchIterator`'s batches, drawn by ``workers`` processes, in order.

    Args:
        batches: the iterator; it needs ``plan``, ``batch_at`` and ``state_dict``. Its cursor
            is where the feed starts (load a checkpoint's cursor into it first); the feed
            never moves it.
        workers: processes drawing batches (torch ``DataLoader`` workers, one torch thread each).
        depth: batches each worker draws ahead.
        pin: copy batches into pinned memory (CUDA only).

    :meth:`state_dict` is the cursor after the last batch handed out, the same as the
    iterator's own after as many ``next`` calls. Call :meth:`close` when done.
    """

    def __init__(self, batches, workers: int, depth: int = 2, *, pin: bool = False):
        if workers < 1 or depth < 1:
            raise ValueError(f"WorkerFeed needs workers >= 1 and depth >= 1, got {workers} and {depth}")
        missing = [m for m in ("plan", "batch_at", "state_dict") if not callable(getattr(batches, m, None))]
        if missing:
            raise TypeError(f"data workers need a BatchIterator; {type(batches).__name__} has no {', '.join(missing)}")
        self._state = dict(batches.state_dict())
        plan = _Plan(batches, self._state["epoch"], self._state["step"])
        loader = torch.utils.data.DataLoader(_BatchAt(batches), sampler=plan, batch_size=None,
                                             num_workers=workers, prefetch_factor=depth, pin_memory=pin)
        self._loader = iter(loader)

    def __iter__(self) -> "WorkerFeed":
        return self

    def __next__(self) -> dict:
        if self._loader is None:
            raise StopIteration
        (epoch, step), batch = next(self._loader)  # the key travels with its batch
        self._state = {**self._state, "epoch": epoch, "step": step + 1}
        return batch

    def state_dict(self) -> dict:
        """The cursor after the last batch handed out (as the iterator's would be)."""
        return dict(self._state)

    def close(self) -> None:
        """Stop the worker processes."""
        loader, self._loader = self._loader, None
        shutdown = getattr(loader, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()

    def __enter__(self) -> "WorkerFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
