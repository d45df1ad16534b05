"""Volume: a directory of immutable objects published object-first, behind a WAL.

Layout::

    LOCK                    flock'ed by the one writer (VolumeLockedError otherwise)
    objects/ab/<hex>.blk    one object per key; ab = last key byte in hex
    tmp/                    in-flight object writes and compaction output
    wal/<id>.log            WAL segments (walpub.wal)

Publish = tmp write, fsync; rename into objects/ab/, fsync objects/ab/; PUT frame
appended and fsynced (group commit); index update; acknowledge.  Delete = DELETE
frame fsynced; index; unlink.  Recovery (in the constructor) makes the WAL the
source of truth again.  The step-by-step argument is docs/WALPUB.md.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import signal
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import index_backends
from index_backends.protocol import ResidencyIndex
from walpub import wal as _wal
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
from walpub.io import FileSystem, OsFileSystem
from walpub.wal import MAX_KEY_BYTES, DeleteRecord, PutRecord, crc32c

MAX_OBJECT_BYTES = 1 << 30
INDEX_VALUE = struct.Struct("<QIQ")  # object length, crc32c, WAL seq of its PUT
VERIFY_MODES = ("crc", "size")

# ---------------------------------------------------------------- crash points
# Named points of the protocol where the real-SIGKILL suite (tests/test_walpub_kill.py,
# studies/walpub_campaign.py) makes a child process kill itself; docs/WALPUB.md §10
# lists what each one leaves on disk.  Armed only by the environment of the process:
# QUIVER_WALPUB_CRASHPOINT=<name> kills at the first passage, <name>@<n> at the n-th.
CRASHPOINT_ENV = "QUIVER_WALPUB_CRASHPOINT"
CRASH_POINTS = (
    "publish.object_written",    # P1 done: tmp file written, not fsynced
    "publish.object_synced",     # P2 done: tmp file fsynced, not renamed
    "publish.renamed",           # P4 done: renamed into objects/ab/, dir not fsynced
    "publish.dir_synced",        # P5 done: object durable, no WAL frame yet
    "commit.wal_synced",         # P6 done (leader): frames written + fsynced, not applied
    "publish.committed",         # P7 done: applied, publish about to return (no ack yet)
    "delete.logged",             # D1+D2 done: DELETE durable, object not unlinked
    "delete.unlinked",           # D3 done: unlinked, delete about to return
    "evict.logged",              # eviction: DELETEs durable, no victim unlinked yet
    "compact.begin",             # compaction about to write its segment (C1)
    "compact.done",              # C1-C6 done
    "recover.tmp_cleared",       # R4 done
    "recover.replayed",          # R6 done (torn tail cut and fsynced)
    "recover.orphans_removed",   # R8-R9 done, index not reconciled
    "recover.index_done",        # R10 done
)


def _armed_crash_point() -> tuple[str, int] | None:
    spec = os.environ.get(CRASHPOINT_ENV)
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    if name not in CRASH_POINTS or (nth and not (nth.isdigit() and int(nth) >= 1)):
        raise ValueError(f"{CRASHPOINT_ENV}={spec!r}: expected one of {CRASH_POINTS} [@n]")
    return name, int(nth or 1)


_CRASH_ARMED = _armed_crash_point()
_crash_passes = 0
_crash_lock = threading.Lock()


def crash_point(name: str) -> None:
    """SIGKILL this process here if QUIVER_WALPUB_CRASHPOINT names this point
    (at its n-th passage).  A no-op otherwise: one comparison."""
    global _crash_passes
    if _CRASH_ARMED is None or _CRASH_ARMED[0] != name:
        return
    assert name in CRASH_POINTS, name
    with _crash_lock:
        _crash_passes += 1
        if _crash_passes >= _CRASH_ARMED[1]:
            os.kill(os.getpid(), signal.SIGKILL)


def pack_index_value(rec: PutRecord) -> bytes:
    return INDEX_VALUE.pack(rec.length, rec.crc, rec.seq)


def unpack_index_value(value: bytes) -> tuple[int, int, int]:
    """(length, crc32c, seq) from an index value walpub wrote."""
    return INDEX_VALUE.unpack(value)


@dataclass(frozen=True)
class RecoveryReport:
    """What the last open() found and repaired."""

    segments: list[int]
    last_seq: int
    live: int
    truncated: list[tuple[int, int, str]]       # (segment, offset, why)
    discarded_segments: list[int]
    dropped: list[tuple[bytes, str]]            # (key, why) live records whose object was bad
    tmp_removed: int
    wal_junk_removed: int
    orphans_removed: int
    index_mode: str                             # "rebuild" | "catch_up" | "reconcile"


@dataclass
class VolumeStats:
    objects: int
    bytes: int
    publishes: int
    publish_noops: int
    deletes: int
    evictions: int
    corrupt_reads: int
    commits: int           # group-commit WAL writes (each one fsync)
    frames: int            # WAL frames written
    compactions: int
    wal_rotations: int
    fsyncs: dict[str, int] = field(default_factory=dict)
    skipped_fsyncs: dict[str, int] = field(default_factory=dict)

    def fsyncs_per_publish(self) -> float:
        """All fsyncs of the I/O layer (recovery's included) per object published."""
        return sum(self.fsyncs.values()) / max(1, self.publishes)


def check_key(key) -> bytes:
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
        raise InvalidKeyError(f"key must be 1..{MAX_KEY_BYTES} bytes, got {type(key).__name__} {key!r:.40}")
    return key


def object_relpath(key: bytes) -> str:
    """objects/<ab>/<hex>.blk with ab the key's last byte (uniform for hash keys,
    also when the key starts with a shared namespace prefix)."""
    h = key.hex()
    return f"objects/{h[-2:]}/{h}.blk"


class Volume:
    """One writer's handle on a walpub volume; thread-safe.

    Opening runs recovery (see RecoveryReport in ``last_recovery``).
    Knobs for tests: ``io`` (a crashsim.SimFileSystem), ``truncate_torn_tail=False``
    (planted bug), ``io.disabled_fsyncs`` (planted bugs)."""

    def __init__(
        self,
        root: str,
        *,
        io: FileSystem | None = None,
        index: ResidencyIndex | str = "flat",
        index_path: str | None = None,
        index_prefix: bytes = b"",
        capacity_bytes: int | None = None,
        segment_bytes: int = 4 << 20,
        compact_min_records: int = 1024,
        verify_on_recover: str = "crc",
        truncate_torn_tail: bool = True,
        max_group_frames: int = 1024,
        max_pending_frames: int = 8192,
        wait_timeout_s: float = 60.0,
        observer=None,
    ):
        assert verify_on_recover in VERIFY_MODES, verify_on_recover
        assert max_group_frames >= 1 and max_pending_frames >= max_group_frames
        assert capacity_bytes is None or capacity_bytes > 0
        self.io: FileSystem = io if io is not None else OsFileSystem()
        self.root = posixpath.normpath(root) if root.startswith("/") else root.rstrip("/")
        self.capacity_bytes = capacity_bytes
        self.compact_min_records = compact_min_records
        self.truncate_torn_tail = truncate_torn_tail
        self.max_group_frames = max_group_frames
        self.max_pending_frames = max_pending_frames
        self.wait_timeout_s = wait_timeout_s
        self._prefix = index_prefix
        self._segment_bytes = segment_bytes
        self.observer = observer
        self._objects = f"{self.root}/objects"
        self._tmp = f"{self.root}/tmp"
        self._waldir = f"{self.root}/wal"

        self._cond = threading.Condition(threading.Lock())
        self._subdir_lock = threading.Lock()
        self._tmp_names = itertools.count()
        self._closed = False
        self._failed: BaseException | None = None
        self._syncing = False               # a leader (or compaction) owns the WAL writer
        self._pending: list = []            # records enqueued, not yet written
        self._last_seq = 0                  # last seq assigned
        self._durable_seq = 0               # last seq fsynced and applied
        self._busy: set[bytes] = set()      # keys with a publish/delete in flight
        self._live: dict[bytes, PutRecord] = {}
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self._used = 0
        self._wal_records = 0
        self._subdirs: set[str] = set()     # objects/<ab> known durable
        self._n = dict(publishes=0, publish_noops=0, deletes=0, evictions=0, corrupt_reads=0,
                       commits=0, frames=0, compactions=0)

        self._lock_handle = self._take_lock()
        try:
            if isinstance(index, str):
                self._owns_index = True
                path = index_path
                if path is None and index not in ("flat", "sorted"):
                    path = f"{self.root}/index-{index}"
                self.index: ResidencyIndex = index_backends.open(index, path)
            else:
                self._owns_index = False
                self.index = index
            try:
                self.last_recovery = self._recover(verify_on_recover)
            except OSError as exc:
                raise VolumeIOError(f"recovery of {self.root} failed: {exc}") from exc
        except BaseException:
            self.io.unlock(self._lock_handle)
            raise

    @classmethod
    def open(cls, root: str, **kwargs) -> "Volume":
        """Open (creating if needed) and recover the volume at ``root``."""
        return cls(root, **kwargs)

    # ------------------------------------------------------------------ opening
    def _take_lock(self) -> int:
        self._ensure_dir(self.root, parent_sync=True)
        handle = self.io.try_lock(f"{self.root}/LOCK")
        if handle is None:
            raise VolumeLockedError(f"volume {self.root} is locked by another writer")
        return handle

    def _ensure_dir(self, path: str, parent_sync: bool) -> bool:
        """mkdir ``path`` (and missing ancestors), fsyncing each parent."""
        if self.io.isdir(path):
            return False
        parent = posixpath.dirname(path)
        if parent and parent != path:
            self._ensure_dir(parent, parent_sync)
        try:
            self.io.mkdir(path)
        except FileExistsError:
            return False
        if parent_sync and parent:
            self.io.fsync_dir(parent, "layout")
        return True

    def _recover(self, verify: str) -> RecoveryReport:
        io = self.io
        for d in (self._objects, self._tmp, self._waldir):
            self._ensure_dir(d, parent_sync=False)  # made durable just below
        # What a killed predecessor left in the page cache only must not be built
        # upon: make the names and the last segment we are about to use durable.
        io.fsync_dir(self.root, "recover_sync")
        io.fsync_dir(self._objects, "recover_sync")
        io.fsync_dir(self._waldir, "recover_sync")

        tmp_removed = 0
        for name in io.listdir(self._tmp):
            io.unlink(f"{self._tmp}/{name}")
            tmp_removed += 1
        crash_point("recover.tmp_cleared")
        ids, junk = _wal.list_segments(io, self._waldir)
        for name in junk:
            io.unlink(f"{self._waldir}/{name}")
        if ids:
            fd = io.open_append(f"{self._waldir}/{_wal.segment_name(ids[-1])}")
            try:
                io.fsync(fd, "recover_sync")
            finally:
                io.close(fd)

        applied = self.index.get_applied_seq() if self.index.persistent else 0
        r = _wal.replay(io, self._waldir, since_seq=applied, truncate=self.truncate_torn_tail)
        crash_point("recover.replayed")

        dropped: list[tuple[bytes, str]] = []
        for key, rec in list(r.live.items()):
            why = self._check_object(key, rec, verify)
            if why is not None:
                dropped.append((key, why))
                del r.live[key]

        last_id = r.segments[-1] if r.segments else 0
        self._writer = _wal.WalWriter(io, self._waldir, self._segment_bytes, last_id, r.last_segment_size)
        self._live = r.live
        self._last_seq = self._durable_seq = r.last_seq
        self._wal_records = r.records
        if dropped:  # make the drop part of the log, as a read-time drop is
            recs = []
            for key, _why in dropped:
                self._last_seq += 1
                recs.append(DeleteRecord(self._last_seq, key))
            self._writer.append(b"".join(_wal.encode(x) for x in recs))
            self._durable_seq = self._last_seq
            self._wal_records += len(recs)

        orphans = 0
        for sub in io.listdir(self._objects):
            path = f"{self._objects}/{sub}"
            if not (len(sub) == 2 and io.isdir(path)):
                continue
            self._subdirs.add(sub)   # durable: objects/ was fsynced above
            for name in io.listdir(path):
                key = _key_from_name(sub, name)
                if key is None or key not in self._live:
                    io.unlink(f"{path}/{name}")
                    orphans += 1

        crash_point("recover.orphans_removed")
        mode = self._reconcile_index(r, applied, [k for k, _ in dropped])
        crash_point("recover.index_done")
        for key, rec in self._live.items():
            self._lru[key] = None
            self._used += rec.length
        self._assert_consistent()
        return RecoveryReport(
            segments=r.segments, last_seq=self._durable_seq, live=len(self._live),
            truncated=r.truncated, discarded_segments=r.discarded_segments, dropped=dropped,
            tmp_removed=tmp_removed, wal_junk_removed=len(junk), orphans_removed=orphans,
            index_mode=mode,
        )

    def _check_object(self, key: bytes, rec: PutRecord, verify: str) -> str | None:
        path = f"{self.root}/{object_relpath(key)}"
        try:
            if verify == "size":
                size = self.io.file_size(path)
                return None if size == rec.length else "wrong length"
            data = self.io.read_file(path)
        except FileNotFoundError:
            return "missing"
        if len(data) != rec.length:
            return "wrong length"
        if crc32c(data) != rec.crc:
            return "bad crc"
        return None

    def _reconcile_index(self, r: _wal.ReplayResult, applied: int, dropped: list[bytes]) -> str:
        """Bring the index to exactly the live set; never leave a dangling entry."""
        idx, p = self.index, self._prefix
        fresh = not idx.persistent or (applied == 0 and len(idx) == 0)
        if fresh or applied < r.reset_base or applied > r.last_seq:
            # rebuild: nothing to trust; reconcile: the tail cannot tell what the
            # index missed (a compaction erased DELETEs, or the log lost records).
            mode = "rebuild" if fresh else "reconcile"
            stale = [k for k, _ in idx.scan_prefix(p) if k[len(p):] not in self._live]
            for k in stale:
                idx.delete(k)
            keys = list(self._live)
            if keys:
                idx.put_many([p + k for k in keys], [pack_index_value(self._live[k]) for k in keys])
        else:
            mode = "catch_up"
            touched = {rec.key for rec in r.tail} | set(dropped)
            for key in touched:
                rec = self._live.get(key)
                if rec is None:
                    idx.delete(p + key)
                else:
                    idx.put(p + key, pack_index_value(rec))
        idx.set_applied_seq(self._durable_seq)
        idx.flush()
        return mode

    def _assert_consistent(self) -> None:
        assert self._durable_seq == self._last_seq
        assert len(self._lru) == len(self._live)
        assert self._used == sum(r.length for r in self._live.values())

    # ------------------------------------------------------------------ publish
    def publish(self, key: bytes, data) -> bool:
        """Store ``data`` under ``key``; durable when it returns.

        True if newly stored, False if the key was already live (objects are
        immutable and content-addressed: the existing bytes are kept)."""
        return self.publish_many([(key, data)])[0]

    def publish_many(self, items: Iterable[tuple[bytes, bytes]]) -> list[bool]:
        """Publish a batch: one fsync per object, one per distinct objects/ab/,
        one WAL fsync for all (shared further with concurrent publishers)."""
        items = list(items)
        for key, data in items:
            check_key(key)
            n = len(memoryview(data).cast("B"))
            if n > MAX_OBJECT_BYTES or (self.capacity_bytes is not None and n > self.capacity_bytes):
                raise ObjectTooLargeError(f"object of {n} bytes exceeds the limit")
        result = [False] * len(items)
        first: dict[bytes, int] = {}
        for i, (key, _) in enumerate(items):
            first.setdefault(key, i)
        wanted = list(first)
        claimed = self._claim(wanted, skip_live=True)
        try:
            todo = [(k, items[first[k]][1]) for k in claimed]
            if todo:
                try:
                    recs = self._write_objects(todo)
                except OSError as exc:
                    raise VolumeIOError(f"writing objects failed: {exc}") from exc
                crash_point("publish.dir_synced")
                self._commit(recs)
                crash_point("publish.committed")
                for k in claimed:
                    result[first[k]] = True
        finally:
            self._release(claimed)
        with self._cond:
            self._n["publishes"] += len(claimed)
            self._n["publish_noops"] += len(items) - len(claimed)
        self._after_write()
        return result

    def _write_objects(self, todo: list[tuple[bytes, bytes]]) -> list[tuple]:
        io, tmps, subs, ops = self.io, [], set(), []
        try:
            for key, data in todo:
                # CRC of the bytes handed to us, before they reach the disk.
                ops.append(("put", key, len(memoryview(data).cast("B")), crc32c(data)))
                tmp = f"{self._tmp}/{key.hex()}.{next(self._tmp_names)}.tmp"
                fd = io.create(tmp)
                tmps.append(tmp)
                try:
                    io.write(fd, data)
                    crash_point("publish.object_written")
                    io.fsync(fd, "object")
                    crash_point("publish.object_synced")
                finally:
                    io.close(fd)
            for (key, _), tmp in zip(todo, tmps):
                rel = object_relpath(key)
                sub = rel.split("/")[1]
                self._ensure_subdir(sub)
                io.rename(tmp, f"{self.root}/{rel}")
                crash_point("publish.renamed")
                subs.add(sub)
            tmps = []
            # The object is durable under its final name before anything names it.
            for sub in sorted(subs):
                io.fsync_dir(f"{self._objects}/{sub}", "objects_dir")
        finally:
            for tmp in tmps:  # failed before the renames: leave no garbage
                try:
                    io.unlink(tmp)
                except OSError:
                    pass
        return ops

    def _ensure_subdir(self, sub: str) -> None:
        if sub in self._subdirs:
            return
        with self._subdir_lock:  # nobody may skip the fsync while it is pending
            if sub in self._subdirs:
                return
            try:
                self.io.mkdir(f"{self._objects}/{sub}")
            except FileExistsError:
                pass
            self.io.fsync_dir(self._objects, "objects_parent")
            self._subdirs.add(sub)

    # ------------------------------------------------------------------ group commit
    def _commit(self, ops: list[tuple]) -> None:
        """Append ``ops`` as WAL frames and return once they are fsynced and applied.

        Leader/follower: whoever finds no fsync in progress writes every pending
        frame (up to max_group_frames) with one fsync; the others wait.

        ``ops`` is enqueued in slices of at most max_group_frames, each as soon as
        the queue has room, so a call may commit any number of frames.  Only the
        wait for queue space before the first slice is enqueued is bounded
        (BusyError).  Once records are enqueued they are never abandoned: they
        will be written and applied by some leader, so the caller waits until
        they are durable or the volume fails or closes (VolumeFailedError,
        VolumeClosedError).  Raising BusyError then would release the key while
        its frame is still on its way to the WAL."""
        assert ops
        deadline = time.monotonic() + self.wait_timeout_s
        g = self.max_group_frames
        slices = [ops[i:i + g] for i in range(0, len(ops), g)]
        mine = 0  # last seq of ours enqueued; 0 while none is
        while True:
            with self._cond:
                while slices and len(self._pending) + len(slices[0]) <= self.max_pending_frames:
                    self._check_usable()
                    mine = self._enqueue(slices.pop(0))
                if not slices and self._durable_seq >= mine:
                    return
                if mine == 0:
                    self._check_usable()
                    self._wait(deadline, "group-commit queue full")
                    continue
                if self._failed is not None:
                    self._check_usable()  # raises VolumeFailedError
                if self._syncing:
                    # The leader (or a compaction) ends by notifying, success or failure.
                    self._cond.wait()
                    continue
                self._check_usable()
                self._syncing = True
                batch = self._pending[: self.max_group_frames]
                del self._pending[: self.max_group_frames]
            self._lead(batch)

    def _enqueue(self, ops: list[tuple]) -> int:
        """Assign seqs to ``ops`` and queue their records (lock held); the last seq."""
        for op in ops:
            self._last_seq += 1
            if op[0] == "put":
                self._pending.append(PutRecord(self._last_seq, op[1], op[2], op[3]))
            else:
                self._pending.append(DeleteRecord(self._last_seq, op[1]))
        return self._last_seq

    def _lead(self, batch: list) -> None:
        """Write, fsync and apply ``batch`` (this thread set ``_syncing``).  Every
        way out clears ``_syncing`` and notifies; a failure poisons the volume."""
        try:
            assert batch and batch[0].seq == self._durable_seq + 1
            self._writer.append(b"".join(_wal.encode(r) for r in batch))
        except BaseException as exc:
            with self._cond:
                self._fail(exc, "WAL append failed")
        crash_point("commit.wal_synced")
        with self._cond:
            try:
                self._apply(batch)
            except BaseException as exc:
                # The frames are durable but the index (or the maps) may hold only
                # part of the batch: refuse further work; reopening recovers.
                self._fail(exc, "applying a durable WAL batch failed")
            finally:
                self._syncing = False
                self._cond.notify_all()

    def _fail(self, exc: BaseException, what: str) -> None:
        """Mark the volume failed (every later call: VolumeFailedError; reopen
        recovers), release the writer role, wake waiters, and raise.  Called
        with ``_cond`` held, from the leader's failure paths."""
        self._failed = exc
        self._syncing = False
        self._cond.notify_all()
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, a simulated kill: not an I/O error
        raise VolumeFailedError(f"{what}: {exc!r}") from exc

    def _apply(self, batch: list) -> None:
        """Make a durable batch visible: live map, LRU, index (in seq order)."""
        idx, p = self.index, self._prefix
        # A key is busy from enqueue to return, so it appears once per batch and
        # the index writes may be grouped (one transaction for persistent ones).
        assert len({rec.key for rec in batch}) == len(batch), "key twice in one batch"
        put_keys, put_vals = [], []
        for rec in batch:
            old = self._live.pop(rec.key, None)
            if old is not None:
                self._used -= old.length
                self._lru.pop(rec.key, None)
            if isinstance(rec, PutRecord):
                self._live[rec.key] = rec
                self._lru[rec.key] = None
                self._used += rec.length
                put_keys.append(p + rec.key)
                put_vals.append(pack_index_value(rec))
            else:
                idx.delete(p + rec.key)
        if put_keys:
            idx.put_many(put_keys, put_vals)
        self._durable_seq = batch[-1].seq
        idx.set_applied_seq(self._durable_seq)
        self._wal_records += len(batch)
        self._n["commits"] += 1
        self._n["frames"] += len(batch)

    def _wait(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BusyError(f"timed out waiting for {what}")
        self._cond.wait(left)

    def _check_usable(self) -> None:
        if self._closed:
            raise VolumeClosedError("volume is closed")
        if self._failed is not None:
            raise VolumeFailedError(f"volume failed earlier: {self._failed!r}")

    def _claim(self, keys: list[bytes], *, skip_live: bool = False, only_live: bool = False) -> list[bytes]:
        """Mark keys in flight (waiting, bounded, for other operations on them)."""
        deadline = time.monotonic() + self.wait_timeout_s
        with self._cond:
            while True:
                self._check_usable()
                if not any(k in self._busy for k in keys):
                    break
                self._wait(deadline, "a key in flight")
            out = []
            for k in keys:
                live = k in self._live
                if skip_live and live:
                    self._lru.move_to_end(k)
                    continue
                if only_live and not live:
                    continue
                out.append(k)
            self._busy.update(out)
            return out

    def _release(self, keys: list[bytes]) -> None:
        if keys:
            with self._cond:
                self._busy.difference_update(keys)
                self._cond.notify_all()

    # ------------------------------------------------------------------ read
    def read(self, key: bytes) -> bytes:
        """The object's bytes, verified (length + CRC32C) on every read.

        ObjectNotFoundError on a miss; CorruptObjectError (after dropping the
        record) when the bytes fail verification: never wrong bytes.

        The file is read outside the lock, so the key may be deleted (and
        published again) meanwhile: a failed check is judged against the index
        entry read again under the lock.  Gone: a miss.  Another PUT (seq
        changed): the read is retried once with it (a second change is reported
        as a miss).  Only a failure against an unchanged entry is corruption."""
        check_key(key)
        with self._cond:
            self._check_usable()
            value = self.index.get(self._prefix + key)
            if value is None:
                raise ObjectNotFoundError(key)
            if key in self._lru:
                self._lru.move_to_end(key)
        for attempt in range(2):
            length, crc, seq = unpack_index_value(value)
            try:
                data = self.io.read_file(f"{self.root}/{object_relpath(key)}")
            except FileNotFoundError:
                data = None
            except OSError as exc:
                raise VolumeIOError(f"reading {key.hex()} failed: {exc}") from exc
            if data is not None and len(data) == length and crc32c(data) == crc:
                return data
            with self._cond:
                now = self.index.get(self._prefix + key)
            if now is None:
                raise ObjectNotFoundError(key) from None  # deleted meanwhile
            if unpack_index_value(now)[2] == seq:
                break  # the same PUT: the object itself is bad
            if attempt == 1:
                raise ObjectNotFoundError(key) from None  # replaced twice during one read
            value = now  # deleted and published again meanwhile: read the new one
        why = "missing" if data is None else ("wrong length" if len(data) != length else "bad crc")
        self._drop(key, seq)
        with self._cond:
            self._n["corrupt_reads"] += 1
        raise CorruptObjectError(f"object {key.hex()} failed verification ({why}); record dropped")

    def _drop(self, key: bytes, seq: int) -> None:
        claimed = self._claim([key], only_live=True)
        try:
            if claimed and self._live[key].seq == seq:
                self._notify("delete_begin", claimed)
                self._commit([("del", key)])
                self._unlink_object(key)
                self._notify("delete_done", claimed)
        finally:
            self._release(claimed)

    def _notify(self, event: str, keys: list[bytes]) -> None:
        """Tell the observer (crash tests, kill tests) a delete starts/ends."""
        if self.observer is not None:
            self.observer(event, list(keys))

    def _unlink_object(self, key: bytes) -> None:
        try:
            self.io.unlink(f"{self.root}/{object_relpath(key)}")
        except FileNotFoundError:
            pass

    def contains(self, key: bytes) -> bool:
        with self._cond:
            return check_key(key) in self._live

    __contains__ = contains

    def __len__(self) -> int:
        with self._cond:
            return len(self._live)

    def keys(self) -> list[bytes]:
        """Live keys, least recently used first."""
        with self._cond:
            return list(self._lru)

    def info(self, key: bytes) -> PutRecord | None:
        """The live PUT record of ``key`` (length, crc, seq) or None."""
        with self._cond:
            return self._live.get(check_key(key))

    @property
    def index_prefix(self) -> bytes:
        """The prefix walpub puts before every key in the residency index."""
        return self._prefix

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return self._used

    # ------------------------------------------------------------------ delete / evict
    def delete(self, key: bytes) -> bool:
        """Delete ``key``: DELETE frame durable first, then index, then unlink.
        False if it was not live."""
        claimed = self._claim([check_key(key)], only_live=True)
        try:
            if not claimed:
                return False
            self._notify("delete_begin", claimed)
            self._commit([("del", key)])
            crash_point("delete.logged")
            self._unlink_object(key)
            crash_point("delete.unlinked")
            self._notify("delete_done", claimed)
        finally:
            self._release(claimed)
        with self._cond:
            self._n["deletes"] += 1
        self._after_write(evict=False)
        return True

    def evict_to(self, budget_bytes: int) -> list[bytes]:
        """Delete least-recently-used objects until at most ``budget_bytes`` are
        used (keys in flight are skipped).  One WAL fsync for all victims."""
        assert budget_bytes >= 0
        with self._cond:
            self._check_usable()
            excess, victims = self._used - budget_bytes, []
            for key in self._lru:  # bounded by the live count
                if excess <= 0:
                    break
                if key in self._busy:
                    continue
                victims.append(key)
                excess -= self._live[key].length
        claimed = self._claim(victims, only_live=True)
        try:
            if claimed:
                self._notify("delete_begin", claimed)
                self._commit([("del", k) for k in claimed])
                crash_point("evict.logged")
                for k in claimed:
                    self._unlink_object(k)
                self._notify("delete_done", claimed)
        finally:
            self._release(claimed)
        with self._cond:
            self._n["evictions"] += len(claimed)
        return claimed

    def _after_write(self, evict: bool = True) -> None:
        if evict and self.capacity_bytes is not None and self.used_bytes > self.capacity_bytes:
            self.evict_to(self.capacity_bytes)
        if self.should_compact():
            self.compact(only_if_needed=True)

    # ------------------------------------------------------------------ compaction
    def should_compact(self) -> bool:
        """True when dead records dominate a WAL of at least compact_min_records."""
        with self._cond:
            n, live = self._wal_records, len(self._live)
            return n >= self.compact_min_records and n - live > live

    def compact(self, only_if_needed: bool = False) -> bool:
        """Rewrite the WAL as RESET + live PUTs (wal.compact); commits wait meanwhile.

        ``only_if_needed``: re-check should_compact() once the writer is ours
        (two threads may both have seen the threshold crossed)."""
        deadline = time.monotonic() + self.wait_timeout_s
        with self._cond:
            while self._syncing:
                self._wait(deadline, "WAL writer for compaction")
            self._check_usable()
            seg = self._writer.active_id
            n, live_n = self._wal_records, len(self._live)
            if seg == 0 or (only_if_needed and not (n >= self.compact_min_records and n - live_n > live_n)):
                return False
            self._syncing = True
            base, live = self._durable_seq, list(self._live.values())
        try:
            crash_point("compact.begin")
            self._writer.seal()
            _wal.compact(self.io, self._waldir, self._tmp, seg, base, live)
            crash_point("compact.done")
        except BaseException as exc:
            with self._cond:
                self._fail(exc, "WAL compaction failed")
        with self._cond:
            self._wal_records = 1 + len(live)
            self._n["compactions"] += 1
            self._syncing = False
            self._cond.notify_all()
        return True

    # ------------------------------------------------------------------ misc
    def stats(self) -> VolumeStats:
        with self._cond:
            return VolumeStats(
                objects=len(self._live), bytes=self._used, wal_rotations=self._writer.rotations,
                fsyncs=dict(self.io.fsync_counts), skipped_fsyncs=dict(self.io.skipped_fsyncs), **self._n,
            )

    def close(self) -> None:
        """Release the lock; everything acknowledged is already durable."""
        deadline = time.monotonic() + self.wait_timeout_s
        with self._cond:
            if self._closed:
                return
            self._closed = True  # no new leader or compaction starts from here
            self._cond.notify_all()
        # A leader in flight finishes (and acknowledges) first.  If it does not
        # within the bound (a hung fsync), BusyError is raised and LOCK is kept:
        # releasing it while that batch may still be written would let a second
        # writer in.  The OS drops the lock when this process exits.
        with self._cond:
            while self._syncing:
                self._wait(deadline, "WAL writer to close")
        try:  # no writer is running: whatever happens below, LOCK is released
            self._writer.close()
            if self._owns_index:
                self.index.close()
            else:
                self.index.flush()
        finally:
            self.io.unlock(self._lock_handle)

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key_from_name(sub: str, name: str) -> bytes | None:
    """The key an objects/<sub>/<name> file stores, or None if it is not one."""
    if not name.endswith(".blk"):
        return None
    h = name[:-4]
    try:
        key = bytes.fromhex(h)
    except ValueError:
        return None
    if not key or len(key) > MAX_KEY_BYTES or h != key.hex() or h[-2:] != sub:
        return None
    return key


def iter_object_files(io: FileSystem, root: str) -> Iterator[tuple[str, bytes | None]]:
    """(path, key or None) of every file under objects/: for checkers."""
    objects = f"{root}/objects"
    for sub in sorted(io.listdir(objects)):
        p = f"{objects}/{sub}"
        if io.isdir(p):
            for name in sorted(io.listdir(p)):
                yield f"{p}/{name}", _key_from_name(sub, name)
