"""Promotion of a get's hits into the tiers above them, off the get's critical path (issue 10).

A get that finds blocks only in L2 hands the verified envelopes (or, where
it read them straight into its caller's array, ``FromL2``: read them again)
to the store's L1 promoter and returns; its background thread writes them into
L1 with one ``publish_many`` (one WAL group commit) per get, then copies them
into L0.  L1 hits go to the L0 promoter as ``FromL1`` (read them again from
L1, straight into an L0 slot): a get of blocks its caller will hold anyway (a
serving engine's own KV cache) does not also pay the copy into L0 and the
first-touch page faults of L0's memory.
Promotion is a cache copy: the blocks stay where they were read from, so a
crash before the write loses nothing but the copy, and a failed write is
counted and logged, never raised to anyone.

The queue is bounded by bytes (``max_bytes``): a batch that would take it past
the bound, while it already holds something, is promoted by the caller itself
(back-pressure: the get pays the write, as before, and no promotion is
dropped).  One batch is always accepted into an empty queue, so a get larger
than the bound is still promoted in the background.  ``drain`` waits until
everything submitted so far is written (close calls it before closing L1).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, NamedTuple

Items = list[tuple[bytes, Any]]


class FromL2(NamedTuple):
    """An item to promote whose bytes the writer reads from L2 again: the get read
    them straight into its caller's array (issue 10), which is the caller's once
    the get returns.  ``nbytes``: the envelope's size, for the queue's bound."""
    nbytes: int


class FromL1(NamedTuple):
    """An L1 hit to copy into L0: the writer reads it from L1 again into a slot.
    ``nbytes``: the envelope's size."""
    nbytes: int


def _nbytes(env: Any) -> int:
    return env.nbytes if isinstance(env, (FromL2, FromL1)) else memoryview(env).nbytes


class Promoter:
    """One writer thread (started on first use, named ``name``) over a byte-bounded queue."""

    def __init__(self, write: Callable[[Items], None], max_bytes: int, name: str) -> None:
        self._write = write  # never raises: counts and logs its own failures
        self.max_bytes = max_bytes
        self._name = name
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[tuple[Items, int]] = deque()
        self._queued_bytes = 0
        self._busy = False  # a batch taken off the queue is being written
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counts = dict(batches=0, blocks=0, inline_batches=0)

    def submit(self, items: Items) -> None:
        """Queue ``items`` for L1, or write them now if the queue is full."""
        if not items:
            return
        nbytes = sum(_nbytes(env) for _, env in items)
        with self._cv:
            queued = not self._stopping and (self._queued_bytes == 0 or self._queued_bytes + nbytes <= self.max_bytes)
            if queued:
                self._queue.append((items, nbytes))
                self._queued_bytes += nbytes
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
                self._cv.notify_all()
            else:
                self.counts["inline_batches"] += 1
        if not queued:
            self._write(items)
            with self._cv:
                self.counts["batches"] += 1
                self.counts["blocks"] += len(items)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:  # stopping, nothing left
                    return
                items, nbytes = self._queue.popleft()
                self._busy = True
            try:
                self._write(items)
            except Exception:  # noqa: BLE001 - the writer counts and logs its own; the thread must go on
                pass
            finally:
                with self._cv:
                    self._busy = False
                    self._queued_bytes -= nbytes
                    self.counts["batches"] += 1
                    self.counts["blocks"] += len(items)
                    self._cv.notify_all()

    def counts_snapshot(self) -> dict:
        """The counts, and the bytes queued now (``queued_bytes``)."""
        with self._cv:
            return dict(self.counts, queued_bytes=self._queued_bytes)

    def drain(self) -> None:
        """Return once every batch submitted before the call is written (or failed)."""
        with self._cv:
            while self._queue or self._busy:
                self._cv.wait()

    def stop(self) -> None:
        """Write what is queued, then end the thread (idempotent)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
