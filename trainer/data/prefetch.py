"""Batches made ahead: a thread produces the next few batches while the loop runs the current step.

Why a thread: most of what a batch costs runs in code that releases the GIL (the tokenizer's Rust, numpy copies,
gloo's exchange, a memory map), so it overlaps the step instead of adding to it; the Python part (reading records,
parsing its share) takes the GIL in short slices.

Order: one producer and one FIFO queue, so the loop gets the items in the order they were made, and an item can
carry the stream's state after it (what a checkpoint saves is the state after the last item the loop took).

Stopping: `close` stops the thread where every rank's thread stops at the same item: when its queue is full. The
loop takes one batch per step on every rank, so every rank's queue fills at the same item, and no rank's thread
is left inside an exchange that its peers never join. An exception in the producer is queued in order and raised in
the loop as itself (the same object: a DataError stays a one-line DataError).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.05  # how often a thread waiting on a full queue looks for a stop
STOP_TIMEOUT_S = 60.0  # close gives up on a thread stuck longer (a peer that died): it is a daemon


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """Up to `depth` items of `items` made ahead by a daemon thread (see the module docstring)."""

    def __init__(self, items: Iterator[T], depth: int):
        self._queue: queue.Queue[T | _Failed] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(items,), name="data-prefetch", daemon=True)
        self._thread.start()

    def get(self) -> T:
        """The next item, waiting for it; the producer's exception, raised here, once it reaches the front."""
        if self._error is not None:
            raise self._error
        item = self._queue.get()
        if isinstance(item, _Failed):
            self._error = item.error
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread once its queue is full (at once when it already is) and wait for it; items not taken are
        dropped."""
        self._stop.set()
        self._thread.join(timeout=STOP_TIMEOUT_S)

    def _run(self, items: Iterator[T]) -> None:
        while True:
            try:
                item: T | _Failed = next(items)
            except BaseException as err:  # anything the producer raises belongs to the loop
                item = _Failed(err)
            if not self._put(item) or isinstance(item, _Failed):
                return

    def _put(self, item: T | _Failed) -> bool:
        """Queue `item`; False when stopped on a full queue instead."""
        while True:
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if self._stop.is_set():
                    return False
