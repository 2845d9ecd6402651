"""Batches prepared ahead, in a background thread, while the current step trains.

    feed = Prefetcher(batches, depth=2, pin=True)   # batches: e.g. a BatchIterator
    batch = next(feed)                               # ready, or waits for the thread
    cursor = feed.state_dict()                       # the cursor after the batches handed out
    feed.close()

Drawing a batch is host work: images decoded or drawn, rows collated, tensors stacked
(each a fresh allocation the kernel must fault in). Done in the training loop, the GPU
idles for all of it after every step. A :class:`Prefetcher` does it in one background
thread, up to ``depth`` batches ahead, and with ``pin`` copies each batch into pinned
(page-locked) memory, so that ``tensor.to("cuda", non_blocking=True)`` really is
asynchronous. One thread keeps the order, so the batches are exactly those the iterator
gives in the loop; :meth:`state_dict` is the iterator's cursor as it was right after the
last batch handed out, so a checkpoint resumes from the same batch either way.
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
