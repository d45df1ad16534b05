"""L1: the local-disk tier, one walpub volume bounded by bytes.

Every block is a walpub object: ``put`` publishes it (object fsynced and named
before a WAL PUT record points at it; durable when ``put`` returns), ``get``
reads it back verified against the length and CRC32C of that record.  The
volume is opened *without* its own capacity; this tier keeps it within
``capacity_bytes`` with ``Volume.evict_to``: blocks not used since open first
(oldest first), then least recently used (reads and repeated puts refresh), all
victims behind one WAL fsync of DELETE records, and the evicted keys come back
to the caller.  Eviction runs *before* a publish that would cross the budget
(so a full disk is not asked for the new bytes first), again after it (other
writers, a batch larger than the budget), and at open when the volume holds
more than a (smaller) budget.  The volume's residency index is the one map of
what this tier holds: membership and lookups ask it.

``capacity_bytes=AUTO`` ("auto", what BlockStore uses by default) is
DEFAULT_DISK_FRACTION of (free space of the file system at open + the bytes this
volume already holds), see :func:`auto_budget` and docs/STORE.md.

walpub's errors become tier errors (tier/errors.py) with the walpub error as
``__cause__``: a locked volume is TierLockedError, a block that fails its CRC
is TierCorruptError (walpub dropped the record first, so the next get is a
miss), a failed fsync or I/O call is TierIOError.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from quiver.tier.errors import (
    TierBusyError,
    TierClosedError,
    TierConfigError,
    TierCorruptError,
    TierIOError,
    TierKeyError,
    TierLockedError,
    TierObjectTooLargeError,
)
from quiver.tier.ram import byte_view
from quiver.walpub import Volume, VolumeStats
from quiver.walpub.volume import FLAG_IN_L2
from quiver.walpub.errors import (
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


#: The default budget (capacity_bytes=AUTO): this fraction of what the volume
#: could ever hold at open (free space + its own bytes).  Half, because the
#: volume's payload bytes are not all it takes: file-system blocks round every
#: object up, the WAL and the index snapshot grow beside it, and the disk is
#: usually shared (other stores, logs, the engine's own files).
DEFAULT_DISK_FRACTION = 0.5
AUTO = "auto"

log = logging.getLogger("quiver.tier.disk")


def auto_budget(path: str, used_bytes: int, fraction: float = DEFAULT_DISK_FRACTION) -> int:
    """The default byte budget of a volume at ``path`` holding ``used_bytes``:
    ``fraction * (free + used_bytes)``, never above ``free + used_bytes``, at least 1."""
    free = shutil.disk_usage(path).free
    return max(1, min(free + used_bytes, int(fraction * (free + used_bytes))))


_MEMORY_INDEXES = ("flat", "sorted")  # backends that keep nothing on disk


def _disk_full(exc: BaseException) -> bool:
    """True if ``exc`` or an error it was raised from is ENOSPC / EDQUOT."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 16:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Re-raise walpub's typed errors as the tier's, chaining the original.

    A raw OSError that reaches this layer (e.g. ENOSPC writing the ART index
    snapshot at close) is a TierIOError too: nothing leaves the tier untyped."""
    try:
        yield
    except tuple(w for w, _ in _TRANSLATE) as exc:
        for walpub_type, tier_type in _TRANSLATE:
            if isinstance(exc, walpub_type):
                raise tier_type(f"disk tier {what}: {exc}") from exc
        raise  # unreachable: every caught type is in the table
    except OSError as exc:
        raise TierIOError(f"disk tier {what}: {exc}") from exc


def _object_bytes(data):
    """An object's bytes as walpub takes them: one 'B' view, or a tuple of them (pieces in order)."""
    return tuple(byte_view(p) for p in data) if isinstance(data, tuple) else byte_view(data)


def _nbytes(data) -> int:
    return sum(p.nbytes for p in data) if isinstance(data, tuple) else data.nbytes


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

    def __init__(self, path: str, capacity_bytes: int | str | None, index: str = "flat", **volume_opts) -> None:
        """``capacity_bytes``: a positive int, None (unbounded), or AUTO (see auto_budget).

        A volume holding more than the budget is evicted down to it here, so a
        reopen with a smaller budget frees the space at once.  On a disk too
        full for a persistent index's own writes at open (the ART catch-up
        snapshot), the volume is opened with an in-memory index instead (rebuilt
        from the WAL; ``degraded`` says why), evicted to the budget, and, once
        that freed space, reopened with the real index.  If the eviction itself
        fails (no room even for the WAL's DELETE records), the volume is reopened
        without it and still serves reads; the next put tries again."""
        auto = capacity_bytes == AUTO if isinstance(capacity_bytes, str) else False
        if not auto and capacity_bytes is not None and not (
                isinstance(capacity_bytes, int) and not isinstance(capacity_bytes, bool) and capacity_bytes > 0):
            raise TierConfigError(f"capacity_bytes must be a positive int, None or {AUTO!r}, got {capacity_bytes!r}")
        self.path = str(path)
        self._stats_lock = threading.Lock()
        self._n = dict(hits=0, misses=0, inserts=0, refreshes=0, evictions=0, deletes=0, corrupt_reads=0,
                       bytes_in=0, bytes_out=0, bytes_evicted=0)
        self._index, self._volume_opts = index, volume_opts
        self.auto_budget = auto
        self.capacity_bytes: int | None = None
        #: Why the volume runs on an in-memory stand-in index (None: it does not).
        self.degraded: str | None = None
        try:
            self._open_volume(index)
        except TierIOError as exc:
            if not _disk_full(exc) or index in _MEMORY_INDEXES:
                raise
            self.degraded = f"the disk is full: index {index!r} cannot be written at open ({exc})"
            log.warning("disk tier %s: %s; opening with an in-memory index", self.path, self.degraded)
            self._open_volume("flat")
        try:
            self.capacity_bytes = auto_budget(self.path, self.volume.used_bytes) if auto else capacity_bytes
        except OSError as exc:
            self.close()
            raise TierIOError(f"disk tier open {self.path}: cannot measure free space: {exc}") from exc
        if self.capacity_bytes is None or self.volume.used_bytes <= self.capacity_bytes:
            return
        try:
            self.evict_to(self.capacity_bytes)
        except TierIOError as exc:  # e.g. ENOSPC appending the DELETE records
            if not self._evict_stepwise(index, exc):
                return
        if self.degraded:  # space was freed: back to the real index
            try:
                self._reopen_volume(index)
                self.degraded = None
            except TierIOError as exc:
                log.warning("disk tier %s: index %r still cannot be opened (%s)", self.path, index, exc)
                self._reopen_volume("flat")

    def _evict_stepwise(self, index: str, first: BaseException) -> bool:
        """After one eviction at open failed on a full disk (the failed WAL append
        poisons the volume): reopen, then evict in growing steps, each one WAL
        commit of a few DELETE records -- the first needs only a few bytes of
        disk, and each frees objects for the next.  False if a step fails too
        (the volume is reopened once more and serves reads)."""
        log.warning("disk tier %s: evicting to the budget at open failed (%s); retrying in small steps",
                    self.path, first)
        self._reopen_volume("flat" if self.degraded else index)
        step = 1
        try:
            while self.volume.used_bytes > self.capacity_bytes:
                before = self.volume.used_bytes
                if not self.evict_to(max(self.capacity_bytes, before - step)):
                    break
                step *= 4
            return True
        except TierIOError as exc:
            log.warning("disk tier %s: evicting at open failed again (%s); reopened without it, "
                        "reads are served and the next put evicts first", self.path, exc)
            self._reopen_volume("flat" if self.degraded else index)
            return False

    def _open_volume(self, index: str) -> None:
        with _translated(f"open {self.path}"):
            self.volume = Volume(self.path, index=index, capacity_bytes=None, **self._volume_opts)

    def _reopen_volume(self, index: str) -> None:
        """Close the volume and open it again: recovery cuts a torn WAL tail."""
        try:
            with _translated("close"):
                self.volume.close()
        except TierIOError as exc:  # walpub releases LOCK whatever close raises
            log.warning("disk tier %s: closing the volume to reopen it: %s", self.path, exc)
        self._open_volume(index)

    @property
    def last_recovery(self):
        """walpub's RecoveryReport of the open (what recovery found and repaired)."""
        return self.volume.last_recovery

    # ------------------------------------------------------------------ writes
    def put(self, key: bytes, data) -> list[bytes]:
        """Publish ``data`` (durable on return), then evict to the budget; the evicted keys."""
        return self.put_many([(key, data)])

    def put_many(self, items: Iterable[tuple]) -> list[bytes]:
        """Publish a batch (one WAL group commit), then evict to the budget once.

        ``items``: (key, bytes) or (key, bytes, CRC32C of those bytes), the CRC
        where the caller has it; the bytes may be a tuple of pieces stored in
        order as one object (``Volume.publish_many``).  Returns the keys
        evicted, least recently used first.  A batch larger than the budget
        evicts some of its own earlier members."""
        items = [(k, _object_bytes(d), *crc) for k, d, *crc in items]
        if self.capacity_bytes is not None:
            for _, data, *_crc in items:
                if _nbytes(data) > self.capacity_bytes:
                    how = " (the default: DEFAULT_DISK_FRACTION of the free space at open)" if self.auto_budget else ""
                    raise TierObjectTooLargeError(
                        f"a block of {_nbytes(data)} bytes exceeds the disk tier's budget of "
                        f"{self.capacity_bytes}{how}")
        if not items:
            return []
        evicted = self._evict_for(items)
        with _translated("put"):
            created = self.volume.publish_many(items)
            evicted += self._evict()
        new = [_nbytes(item[1]) for item, c in zip(items, created) if c]
        self._count(inserts=len(new), bytes_in=sum(new), refreshes=len({item[0] for item in items}) - len(new))
        return evicted

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, d in deltas.items():
                self._n[name] += d

    def _evict(self) -> list[bytes]:
        if self.capacity_bytes is None or self.volume.used_bytes <= self.capacity_bytes:
            return []
        return self.evict_to(self.capacity_bytes)

    def _evict_for(self, items: list[tuple]) -> list[bytes]:
        """Before a publish: evict so that the batch's new bytes fit the budget.

        Only keys not stored yet count (a present key is a refresh, no bytes).
        Evicting first means a disk filled up to the budget is not asked for
        the new bytes before the old ones are gone."""
        if self.capacity_bytes is None:
            return []
        new: dict[bytes, int] = {}
        for k, data, *_crc in items:
            new.setdefault(k, _nbytes(data))
        with _translated("put"):
            held = self.volume.contains_many(list(new))
        incoming = sum(n for (k, n), h in zip(new.items(), held) if not h)
        if not incoming or self.volume.used_bytes + incoming <= self.capacity_bytes:
            return []
        return self.evict_to(max(0, self.capacity_bytes - incoming))

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
        data = self._counted_read(self.volume.read, key)
        if data is not None:
            self._count(bytes_out=len(data))
        return data

    def get_into(self, key: bytes, buffers_for) -> list | None:
        """The block read into ``buffers_for(length)`` (see ``Volume.read_into``),
        verified as by :meth:`get`; those buffers, or None on a miss."""
        pieces = self._counted_read(self.volume.read_into, key, buffers_for)
        if pieces is not None:
            self._count(bytes_out=sum(memoryview(p).nbytes for p in pieces))
        return pieces

    def get_many_into(self, keys: list[bytes], buffers_fors: list) -> list[list | None]:
        """``get_into`` of many keys on walpub's fast path (``Volume.read_many_into``):
        each key's verified pieces, or None where that read needs the one-key
        path (a miss, a failed check, a length its ``buffers_for`` declined),
        which the caller takes with ``get_into``.  Only the reads served here
        are counted (hits, bytes out); the others count where they end."""
        with _translated("get"):
            got = self.volume.read_many_into(keys, buffers_fors)
        served = [p for p in got if p is not None]
        if served:
            self._count(hits=len(served), bytes_out=sum(memoryview(p).nbytes for ps in served for p in ps))
        return got

    def _counted_read(self, read, *args):
        try:
            with _translated("get"):
                got = read(*args)
        except ObjectNotFoundError:
            self._count(misses=1)
            return None
        except TierCorruptError:
            self._count(corrupt_reads=1)
            raise
        self._count(hits=1)
        return got

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
