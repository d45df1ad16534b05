"""L1: the local-disk tier, one walpub volume bounded by bytes.

Every block is a walpub object: ``put`` publishes it (object fsynced and named
before a WAL PUT record points at it; durable when ``put`` returns), ``get``
reads it back verified against the length and CRC32C of that record.  The
volume is opened *without* its own capacity, and this tier evicts after each
publish with ``Volume.evict_to(capacity_bytes)``: blocks not used since open first
(oldest first), then least recently used (reads and repeated puts refresh), all victims behind one WAL fsync of DELETE
records, and the evicted keys come back to the caller.  The volume's residency
index is the one map of what this tier holds: membership and lookups ask it.

walpub's errors become tier errors (tier/errors.py) with the walpub error as
``__cause__``: a locked volume is TierLockedError, a block that fails its CRC
is TierCorruptError (walpub dropped the record first, so the next get is a
miss), a failed fsync or I/O call is TierIOError.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from tier.errors import (
    TierBusyError,
    TierClosedError,
    TierConfigError,
    TierCorruptError,
    TierIOError,
    TierKeyError,
    TierLockedError,
    TierObjectTooLargeError,
)
from tier.ram import byte_view
from walpub import Volume, VolumeStats
from walpub.volume import FLAG_IN_L2
from walpub.errors import (
    BusyError,
    CorruptObjectError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    VolumeClosedError,
    VolumeFailedError,
    VolumeIOError,
    VolumeLockedError,
)

# walpub error -> tier error; ObjectNotFoundError is a miss and never reaches this table.
_TRANSLATE = (
    (VolumeLockedError, TierLockedError),
    (VolumeClosedError, TierClosedError),
    (CorruptObjectError, TierCorruptError),
    (VolumeFailedError, TierIOError),
    (VolumeIOError, TierIOError),
    (BusyError, TierBusyError),
    (InvalidKeyError, TierKeyError),
    (ObjectTooLargeError, TierObjectTooLargeError),
)


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Re-raise walpub's typed errors as the tier's, chaining the original."""
    try:
        yield
    except tuple(w for w, _ in _TRANSLATE) as exc:
        for walpub_type, tier_type in _TRANSLATE:
            if isinstance(exc, walpub_type):
                raise tier_type(f"disk tier {what}: {exc}") from exc
        raise  # unreachable: every caught type is in the table


@dataclass(frozen=True)
class DiskStats:
    """Tier-level counters since open, plus the volume's own (fsyncs per label...)."""

    hits: int
    misses: int
    inserts: int          # objects newly published
    refreshes: int        # put of a key already present (walpub no-op, LRU refresh)
    evictions: int        # objects deleted to stay within capacity_bytes
    deletes: int
    corrupt_reads: int
    bytes_in: int         # bytes published
    bytes_out: int        # bytes returned by get
    bytes_evicted: int
    blocks: int
    used_bytes: int
    capacity_bytes: int | None
    volume: VolumeStats


class DiskTier:
    """L1: a byte-bounded, crash-consistent block store on local disk."""

    def __init__(self, path: str, capacity_bytes: int | None, index: str = "flat", **volume_opts) -> None:
        if capacity_bytes is not None and not (isinstance(capacity_bytes, int) and capacity_bytes > 0):
            raise TierConfigError(f"capacity_bytes must be a positive int or None, got {capacity_bytes!r}")
        self.path = str(path)
        self.capacity_bytes = capacity_bytes
        with _translated(f"open {self.path}"):
            self.volume = Volume(self.path, index=index, capacity_bytes=None, **volume_opts)
        self._stats_lock = threading.Lock()
        self._n = dict(hits=0, misses=0, inserts=0, refreshes=0, evictions=0, deletes=0, corrupt_reads=0,
                       bytes_in=0, bytes_out=0, bytes_evicted=0)

    @property
    def last_recovery(self):
        """walpub's RecoveryReport of the open (what recovery found and repaired)."""
        return self.volume.last_recovery

    # ------------------------------------------------------------------ writes
    def put(self, key: bytes, data) -> list[bytes]:
        """Publish ``data`` (durable on return), then evict to the budget; the evicted keys."""
        return self.put_many([(key, data)])

    def put_many(self, items: Iterable[tuple[bytes, object]]) -> list[bytes]:
        """Publish a batch (one WAL group commit), then evict to the budget once.

        Returns the keys evicted, least recently used first.  A batch larger
        than the budget evicts some of its own earlier members."""
        items = [(k, byte_view(d)) for k, d in items]
        if self.capacity_bytes is not None:
            for _, mv in items:
                if mv.nbytes > self.capacity_bytes:
                    raise TierObjectTooLargeError(
                        f"a block of {mv.nbytes} bytes exceeds the disk tier's budget of {self.capacity_bytes}")
        if not items:
            return []
        with _translated("put"):
            created = self.volume.publish_many(items)
            evicted = self._evict()
        new = [mv.nbytes for (_, mv), c in zip(items, created) if c]
        self._count(inserts=len(new), bytes_in=sum(new), refreshes=len({k for k, _ in items}) - len(new))
        return evicted

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, d in deltas.items():
                self._n[name] += d

    def _evict(self) -> list[bytes]:
        if self.capacity_bytes is None or self.volume.used_bytes <= self.capacity_bytes:
            return []
        return self.evict_to(self.capacity_bytes)

    def evict_to(self, budget_bytes: int) -> list[bytes]:
        """Evict least recently used blocks until at most ``budget_bytes`` are used.

        ``bytes_evicted`` is counted as the drop in used bytes: exact for one
        writer, approximate while other threads publish at the same time."""
        assert budget_bytes >= 0
        with _translated("evict"):
            before = self.volume.used_bytes
            evicted = self.volume.evict_to(budget_bytes)
            after = self.volume.used_bytes
        self._count(evictions=len(evicted), bytes_evicted=max(0, before - after))
        return evicted

    def delete(self, key: bytes) -> bool:
        """Delete ``key`` (DELETE record durable first); False if it was not stored."""
        with _translated("delete"):
            gone = self.volume.delete(key)
        self._count(deletes=int(gone))
        return gone

    # ------------------------------------------------------------------ reads
    def get(self, key: bytes) -> bytes | None:
        """The block's bytes, verified by length and CRC32C, or None on a miss.

        TierCorruptError if the bytes fail verification: walpub has already
        dropped the record, so the next get of the key is a miss."""
        try:
            with _translated("get"):
                data = self.volume.read(key)
        except ObjectNotFoundError:
            self._count(misses=1)
            return None
        except TierCorruptError:
            self._count(corrupt_reads=1)
            raise
        self._count(hits=1, bytes_out=len(data))
        return data

    def contains(self, key: bytes) -> bool:
        """True if the key is stored; not an access."""
        with _translated("contains"):
            return self.volume.contains(key)

    __contains__ = contains

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        """Membership of each key: one index call, not an access."""
        with _translated("contains"):
            return self.volume.contains_many(keys)

    def longest_prefix(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` are stored: the residency index's longest_prefix."""
        with _translated("lookup"):
            return self.volume.longest_prefix(keys)

    def mark_in_l2(self, keys: list[bytes]) -> int:
        """Record (a hint, see docs/INDEXES.md) that L2 holds these stored keys."""
        with _translated("mark"):
            return self.volume.set_flags(keys, FLAG_IN_L2)

    def in_l2(self, key: bytes) -> bool:
        """True if the key's record says L2 holds it (False if unknown or not stored)."""
        with _translated("flags"):
            return bool((self.volume.flags(key) or 0) & FLAG_IN_L2)

    def keys(self) -> list[bytes]:
        """Stored keys in key order (an O(N) index scan: for tools and tests)."""
        with _translated("keys"):
            return self.volume.keys()

    def __len__(self) -> int:
        return len(self.volume)

    @property
    def used_bytes(self) -> int:
        return self.volume.used_bytes

    def stats(self) -> DiskStats:
        with _translated("stats"):
            vs = self.volume.stats()
        with self._stats_lock:
            n = dict(self._n)
        return DiskStats(**n, blocks=vs.objects, used_bytes=vs.bytes, capacity_bytes=self.capacity_bytes,
                         volume=vs)

    def close(self) -> None:
        """Close the volume (everything acknowledged is already durable)."""
        with _translated("close"):
            self.volume.close()

    def __enter__(self) -> "DiskTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
