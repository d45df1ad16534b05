"""Volume: a directory of immutable objects published object-first, behind a WAL.

Layout::

    (the root itself)       flock'ed by the one writer (VolumeLockedError otherwise): a
                            directory cannot be unlinked from under its holder
    objects/ab/<hex>.blk    one object per key; ab = last key byte in hex
    tmp/                    in-flight object writes and compaction output
    wal/<id>.log            WAL segments (walpub.wal)

Publish = tmp write, fsync; rename into objects/ab/, fsync objects/ab/; PUT frame
appended and fsynced (group commit); index update; acknowledge.  Delete = DELETE
frame fsynced; index; unlink.  Recovery (in the constructor) makes the WAL the
source of truth again.  The step-by-step argument is docs/WALPUB.md.

Crash testing: ``crash_point(name)`` marks the protocol's named points
(``CRASH_POINTS``).  They are armed only by ``arm_crash_point("<point>[@n]")``,
a test-only call made in the process that is to die (the SIGKILL campaign's
child, studies/walpub_campaign.py, makes it from its ``--crashpoint``
argument); the environment arms nothing -- ``QUIVER_WALPUB_CRASHPOINT`` is
ignored, with a warning -- so no production process can be made to SIGKILL
itself by an inherited variable.
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
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from quiver import index_backends
from quiver.index_backends.errors import IndexBackendError, IndexCorruptError, IndexLockedError, UnknownBackendError
from quiver.index_backends.protocol import ResidencyIndex
from quiver.walpub import wal as _wal
from quiver.walpub.checksum import crc32c
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
from quiver.walpub.io import FileSystem, OsFileSystem
from quiver.walpub.wal import MAX_KEY_BYTES, DeleteRecord, PutRecord

MAX_OBJECT_BYTES = 1 << 30
# The residency record, the index value of every live key (docs/INDEXES.md):
# object length, CRC32C, WAL seq of its PUT, flags (bit 0: L2 holds a copy),
# then a CRC32C over the walpub key and those fields: a damaged record (or a
# record under a damaged key) is recognised as index damage, never taken for a
# damaged object.
INDEX_VALUE = struct.Struct("<QIQBI")
_RECORD_HEAD = struct.Struct("<QIQB")
FLAG_IN_L2 = 1
# The volume's summary, stored in the index under META_KEY in the same atomic
# write_batch as the records it describes: applied seq, live records, live
# bytes, WAL frames since the last RESET.  META_KEY is longer than any walpub
# key (MAX_KEY_BYTES), so it can never collide with one.
META_VALUE = struct.Struct("<QQQQ")
META_KEY = b"\xff" * (MAX_KEY_BYTES + 1)
CLEAN_NAME = "CLEAN"  # present only after a clean close: no orphan can exist
VERIFY_MODES = ("crc", "size", "none")

# ---------------------------------------------------------------- crash points
# Named points of the protocol where the real-SIGKILL suite (tests/test_walpub_kill.py,
# studies/walpub_campaign.py) makes a child process kill itself; docs/WALPUB.md §10
# lists what each one leaves on disk.  Armed only by a test calling
# arm_crash_point("<name>[@n]") in the process that is to die (the campaign's
# child does so from its --crashpoint argument): kill at the first passage, or
# at the n-th.  Nothing in the environment arms them, so no production process
# can be made to SIGKILL itself by a variable it inherited.
# QUIVER_WALPUB_CRASHPOINT, which armed them before, is ignored (a process that
# has it set logs one warning at import).
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


def _parse_crash_spec(spec: str) -> tuple[str, int]:
    name, _, nth = spec.partition("@")
    if name not in CRASH_POINTS or (nth and not (nth.isdigit() and int(nth) >= 1)):
        raise ValueError(f"crash point {spec!r}: expected one of {CRASH_POINTS} [@n]")
    return name, int(nth or 1)


_CRASH_ARMED: tuple[str, int] | None = None
_crash_passes = 0
_crash_lock = threading.Lock()


def arm_crash_point(spec: str | None) -> None:
    """TEST ONLY: make this process SIGKILL itself at crash point ``spec``
    ("<name>" = its first passage, "<name>@<n>" = its n-th, counted over all
    threads); None disarms.  ValueError for an unknown name or a bad n.  The
    one way to arm a crash point: production code never calls it."""
    global _CRASH_ARMED, _crash_passes
    armed = None if spec is None else _parse_crash_spec(spec)
    with _crash_lock:
        _CRASH_ARMED = armed
        _crash_passes = 0


if os.environ.get(CRASHPOINT_ENV):
    import logging

    logging.getLogger("quiver.walpub").warning(
        "%s is set but arms nothing: walpub crash points are armed only by a test calling "
        "walpub.volume.arm_crash_point()", CRASHPOINT_ENV)


def crash_point(name: str) -> None:
    """SIGKILL this process here if a test armed this point with
    ``arm_crash_point`` (at its n-th passage).  A no-op otherwise: one comparison."""
    global _crash_passes
    armed = _CRASH_ARMED
    if armed is None or armed[0] != name:
        return
    assert name in CRASH_POINTS, name
    with _crash_lock:
        _crash_passes += 1
        if _crash_passes >= armed[1]:
            os.kill(os.getpid(), signal.SIGKILL)


class DamagedRecordError(Exception):
    """An index record fails its own CRC (or has the wrong size): the index is
    damaged, not the object.  Internal: the volume rebuilds the index from the WAL."""


def pack_index_value(key: bytes, rec: PutRecord, flags: int = 0) -> bytes:
    head = _RECORD_HEAD.pack(rec.length, rec.crc, rec.seq, flags)
    return head + struct.pack("<I", crc32c(key + head))


def _crc_of(pieces) -> int:
    """CRC32C of the pieces' bytes in order: one pass, no join (through this
    module's ``crc32c``, so a planted checksum-blind volume reaches every read)."""
    crc = 0
    for piece in pieces:
        crc = crc32c(piece, crc)
    return crc


def _nbytes(data) -> int:
    """Bytes of an object given as one bytes-like or a tuple of pieces."""
    if isinstance(data, tuple):
        return sum(memoryview(p).cast("B").nbytes for p in data)
    return memoryview(data).cast("B").nbytes


def unpack_index_value(key: bytes, value: bytes) -> tuple[int, int, int, int]:
    """(length, crc32c, seq, flags) of ``key``'s record; DamagedRecordError when
    the record does not verify against its key."""
    if len(value) != INDEX_VALUE.size:
        raise DamagedRecordError(f"record of {key.hex()} has {len(value)} bytes")
    length, crc, seq, flags, check = INDEX_VALUE.unpack(value)
    if crc32c(key + value[:_RECORD_HEAD.size]) != check:
        raise DamagedRecordError(f"record of {key.hex()} fails its CRC")
    return length, crc, seq, flags


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
    stray: list[str] = field(default_factory=list)  # entries skipped, not ours (e.g. directories in tmp/)
    index_reset: str | None = None              # the index's files were damaged: discarded, rebuilt from the WAL
    damaged: list[tuple[int, int, int, str]] = field(default_factory=list)  # WAL regions skipped (seg, start, end, why)
    adopted: int = 0                            # orphans kept after WAL damage: they verified as their key's


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
    checkpoints: int       # index flushes that bound the WAL tail an open replays
    index_repairs: int     # index rebuilt from the WAL after a damaged record was met
    orphans_collected: int
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

    The residency index is the one map of what the volume holds: every live
    key has exactly one record there (INDEX_VALUE), and walpub keeps no second
    key map beside it (the in-memory LRU order holds only keys touched since
    open, and is never asked what is live).  Opening costs the index's own
    files plus the WAL past its applied seq: no object is read.

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
        checkpoint_records: int = 65536,
        verify_on_recover: str = "size",
        truncate_torn_tail: bool = True,
        max_group_frames: int = 1024,
        max_pending_frames: int = 8192,
        wait_timeout_s: float = 60.0,
        observer=None,
        adopt=None,
    ):
        # Long only because it declares every field of the volume beside its
        # meaning; the logic of opening is in _take_lock, _open_index and _recover.
        assert verify_on_recover in VERIFY_MODES, verify_on_recover
        assert max_group_frames >= 1 and max_pending_frames >= max_group_frames
        assert capacity_bytes is None or capacity_bytes > 0
        self.io: FileSystem = io if io is not None else OsFileSystem()
        self.root = posixpath.normpath(root) if root.startswith("/") else root.rstrip("/")
        self.capacity_bytes = capacity_bytes
        self.compact_min_records = compact_min_records
        self.checkpoint_records = checkpoint_records
        self.truncate_torn_tail = truncate_torn_tail
        self.max_group_frames = max_group_frames
        self.max_pending_frames = max_pending_frames
        self.wait_timeout_s = wait_timeout_s
        self._prefix = index_prefix
        self._meta_key = index_prefix + META_KEY
        self._segment_bytes = segment_bytes
        self.observer = observer
        # adopt(key, bytes) -> bool: the caller's check that an object no surviving
        # WAL record names is intact and really ``key``'s (its own self-verifying
        # format); such objects are adopted after WAL damage instead of collected.
        self._adopt = adopt
        self._objects = f"{self.root}/objects"
        self._tmp = f"{self.root}/tmp"
        self._waldir = f"{self.root}/wal"

        self._cond = threading.Condition(threading.Lock())
        self._subdir_lock = threading.Lock()
        self._tmp_names = itertools.count()
        self._io_pool: ThreadPoolExecutor | None = None  # a batch's object writes + fsyncs (made on first use)
        self._closed = False
        self._failed: BaseException | None = None
        self._syncing = False               # a leader (or compaction) owns the WAL writer
        self._pending: list = []            # records enqueued, not yet written
        self._last_seq = 0                  # last seq assigned
        self._durable_seq = 0               # last seq fsynced and applied
        self._busy: set[bytes] = set()      # keys with a publish/delete in flight
        # Keys published or read since open, least recently used first.  Keys not
        # in it were last used before open: they are evicted first, oldest PUT
        # first, from the WAL (_cold_victims).  An order, not a map of what is live.
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self._cold: Iterator[PutRecord] | None = None
        self._open_seq = 0                  # records up to here were written before open
        self._live_count = 0
        self._used = 0
        self._wal_records = 0
        self._since_checkpoint = 0          # records applied since the index was last flushed
        self._subdirs: set[str] = set()     # objects/<ab> known durable
        self._unlinked_subdirs: set[str] = set()  # objects/<ab> with an unlink since open
        self._orphans_possible = False      # a publish failed after its renames
        self._stray: list[str] = []         # entries recovery skipped (directories where files belong)
        self._repair_due = False            # a damaged index record was met while applying
        self.last_repair: str | None = None  # why the index was last rebuilt while open
        self.index_reset: str | None = None  # why the index files were discarded at open
        self._n = dict(publishes=0, publish_noops=0, deletes=0, evictions=0, corrupt_reads=0,
                       commits=0, frames=0, compactions=0, checkpoints=0, orphans_collected=0,
                       index_repairs=0)

        self._lock_handle = self._take_lock()
        try:
            if isinstance(index, str):
                self._owns_index = True
                path = index_path
                if path is None and index not in ("flat", "sorted"):
                    path = f"{self.root}/index-{index}"
                self._index_name, self._index_path = index, path
                self.index: ResidencyIndex = self._open_index(index, path)
            else:
                self._owns_index = False
                self.index = index
            try:
                self.last_recovery = self._recover(verify_on_recover)
            except OSError as exc:
                raise VolumeIOError(f"recovery of {self.root} failed: {exc}") from exc
        except BaseException:
            if getattr(self, "_owns_index", False) and hasattr(self, "index"):
                try:
                    self.index.close()
                except Exception:  # noqa: BLE001 - the recovery error is the one to raise
                    pass
            self.io.unlock(self._lock_handle)
            raise

    def _open_index(self, name: str, path: str | None) -> ResidencyIndex:
        """Open the named index; if its files are damaged (any typed backend
        error but "locked"), remove them and start empty: the index is derived
        state, and recovery rebuilds it from the WAL (``index_reset``)."""
        opts = {"io": self.io, "log": False} if name == "art" else {}
        try:
            return index_backends.open(name, path, **opts)
        except (IndexLockedError, UnknownBackendError):
            raise
        except IndexBackendError as exc:
            if path is None:
                raise
            self.index_reset = f"{type(exc).__name__}: {exc}"
            self._remove_files(path)
            return index_backends.open(name, path, **opts)

    def _remove_files(self, path: str) -> None:
        """Unlink every file under ``path`` (directories are left, empty)."""
        for name in self.io.listdir(path):
            p = f"{path}/{name}"
            if self.io.isdir(p):
                self._remove_files(p)
            else:
                self.io.unlink(p)

    @classmethod
    def open(cls, root: str, **kwargs) -> "Volume":
        """Open (creating if needed) and recover the volume at ``root``."""
        return cls(root, **kwargs)

    # ------------------------------------------------------------------ opening
    def _take_lock(self) -> int:
        self._ensure_dir(self.root, parent_sync=True)
        handle = self.io.try_lock(self.root)
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

    def _read_meta(self) -> tuple[int, int, int, int] | None:
        """(applied seq, live, bytes, wal records) if the index's summary is
        there and agrees with its applied seq; None: the index cannot be trusted."""
        if not self.index.persistent:
            return None
        raw = self.index.get(self._meta_key)
        applied = self.index.get_applied_seq()
        if raw is None:
            return (0, 0, 0, 0) if applied == 0 and len(self.index) == 0 else None
        if len(raw) != META_VALUE.size:
            return None
        meta = META_VALUE.unpack(raw)
        return meta if meta[0] == applied else None

    def _recover(self, verify: str) -> RecoveryReport:
        io = self.io
        for d in (self._objects, self._tmp, self._waldir):
            self._ensure_dir(d, parent_sync=False)  # made durable just below
        clean = io.exists(f"{self.root}/{CLEAN_NAME}")
        if clean:  # from here on this process may leave orphans: the marker goes first
            io.unlink(f"{self.root}/{CLEAN_NAME}")
        # What a killed predecessor left in the page cache only must not be built
        # upon: make the names and the last segment we are about to use durable.
        # (This also makes the CLEAN removal durable before any publish.)
        io.fsync_dir(self.root, "recover_sync")
        io.fsync_dir(self._objects, "recover_sync")
        io.fsync_dir(self._waldir, "recover_sync")

        tmp_removed = 0
        for name in io.listdir(self._tmp):
            if io.isdir(f"{self._tmp}/{name}"):
                self._stray.append(f"tmp/{name}")  # not ours: skipped, counted, never fatal
                continue
            io.unlink(f"{self._tmp}/{name}")
            tmp_removed += 1
        crash_point("recover.tmp_cleared")
        ids, junk = _wal.list_segments(io, self._waldir)
        for name in list(junk):
            if io.isdir(f"{self._waldir}/{name}"):
                self._stray.append(f"wal/{name}")
                junk.remove(name)
                continue
            io.unlink(f"{self._waldir}/{name}")
        if ids:
            fd = io.open_append(f"{self._waldir}/{_wal.segment_name(ids[-1])}")
            try:
                io.fsync(fd, "recover_sync")
            finally:
                io.close(fd)

        meta = self._read_meta()
        since = meta[0] if meta is not None else 0
        r = _wal.replay(io, self._waldir, since_seq=since, truncate=self.truncate_torn_tail,
                        tail_only=meta is not None)
        crash_point("recover.replayed")
        # The tail can bring the index up to date only if no RESET passed the
        # index by (a compaction it missed) and the log reaches the index's seq.
        catch_up = meta is not None and r.reset_base <= since <= r.last_seq
        if not catch_up and not r.complete:
            r = _wal.replay(io, self._waldir, truncate=self.truncate_torn_tail)

        last_id = r.segments[-1] if r.segments else 0
        self._writer = _wal.WalWriter(io, self._waldir, self._segment_bytes, last_id, r.last_segment_size)
        self._last_seq = self._durable_seq = max(r.last_seq, since if catch_up else 0)
        if catch_up:
            mode = "catch_up"
            try:
                dropped = self._catch_up(r, meta, verify)
            except DamagedRecordError:
                catch_up = False
                if not r.complete:
                    r = _wal.replay(io, self._waldir, truncate=self.truncate_torn_tail)
        if not catch_up:
            mode = "rebuild" if not self.index.persistent else "reconcile"
            dropped = self._rebuild(r, verify)
        crash_point("recover.index_done")

        orphans = adopted = 0
        if not clean or r.truncated or r.damaged:  # a crash (or a damaged log) may have left objects no record names
            keep = None
            if (r.truncated or r.damaged) and self._adopt is not None:
                if not r.complete:  # adoption must know every surviving DELETE
                    r = _wal.replay(io, self._waldir, truncate=self.truncate_torn_tail)
                keep = r.deleted
            orphans, adopted = self._collect_orphans(never_adopt=keep)
        crash_point("recover.orphans_removed")
        self._open_seq = self._durable_seq  # records up to here: evicted before any used since open
        return RecoveryReport(
            segments=r.segments, last_seq=self._durable_seq, live=self._live_count,
            truncated=r.truncated, discarded_segments=r.discarded_segments, dropped=dropped,
            tmp_removed=tmp_removed, wal_junk_removed=len(junk), orphans_removed=orphans,
            index_mode=mode, stray=list(self._stray), index_reset=self.index_reset, damaged=list(r.damaged),
            adopted=adopted,
        )

    def _catch_up(self, r: _wal.ReplayResult, meta: tuple, verify: str) -> list[tuple[bytes, str]]:
        """Apply the WAL tail to an index that holds everything up to meta's seq."""
        _seq, live, used, wal_records = meta
        final: dict[bytes, PutRecord | None] = {}
        for rec in r.tail:
            final[rec.key] = rec if isinstance(rec, PutRecord) else None
        p = self._prefix
        keys = list(final)
        before = self.index.get_many([p + k for k in keys]) if keys else []
        for k, v in zip(keys, before):
            if v is not None:
                live -= 1
                used -= unpack_index_value(k, v)[0]  # DamagedRecordError: _recover reconciles
        dropped = self._verify_records([rec for rec in final.values() if rec is not None], verify)
        for key, _why in dropped:
            final[key] = None
        for rec in final.values():
            if rec is not None:
                live += 1
                used += rec.length
        self._live_count, self._used = live, used
        self._wal_records = wal_records + len(r.tail)
        puts = [rec for rec in final.values() if rec is not None]
        self._log_drops(dropped)
        if r.tail:  # a clean close leaves no tail: nothing to apply, no snapshot to write (ART: 118 MB at 1M)
            self._write_batch(puts, [k for k, rec in final.items() if rec is None])
            self.index.flush()
        return dropped

    def _rebuild(self, r: _wal.ReplayResult, verify: str) -> list[tuple[bytes, str]]:
        """Make the index exactly the WAL's live set (memory-only index, or a
        persistent one that cannot be trusted: no summary, or the log cannot tell
        what it missed)."""
        dropped = self._verify_records(list(r.live.values()), verify)
        for key, _why in dropped:
            del r.live[key]
        p = self._prefix
        stale = [k[len(p):] for k, _ in self.index.scan_prefix(p)
                 if len(p) < len(k) <= len(p) + MAX_KEY_BYTES and k[len(p):] not in r.live]
        self._live_count = len(r.live)
        self._used = sum(rec.length for rec in r.live.values())
        self._wal_records = r.records
        self._log_drops(dropped)
        self._write_batch(list(r.live.values()), stale)
        self.index.flush()
        return dropped

    def _verify_records(self, recs: list[PutRecord], verify: str) -> list[tuple[bytes, str]]:
        """Records recovery is about to add to the index whose object is missing
        or wrong ("size": a stat each; "crc": a full read; "none": trusted)."""
        if verify == "none":
            return []
        out = []
        for rec in recs:
            why = self._check_object(rec.key, rec, verify)
            if why is not None:
                out.append((rec.key, why))
        return out

    def _log_drops(self, dropped: list[tuple[bytes, str]]) -> None:
        """Make recovery's drops part of the log, as a read-time drop is."""
        if not dropped:
            return
        recs = []
        for key, _why in dropped:
            self._last_seq += 1
            recs.append(DeleteRecord(self._last_seq, key))
        self._writer.append(b"".join(_wal.encode(x) for x in recs))
        self._durable_seq = self._last_seq
        self._wal_records += len(recs)
        for key, _why in dropped:  # the DELETE is durable: the bad bytes can go
            try:
                self.io.unlink(f"{self.root}/{object_relpath(key)}")
            except FileNotFoundError:
                pass

    def _write_batch(self, puts: list[PutRecord], deletes: list[bytes], flags: dict | None = None) -> None:
        """Records, deletions and the summary in one atomic index write."""
        p = self._prefix
        keys = [p + rec.key for rec in puts] + [self._meta_key]
        vals = [pack_index_value(rec.key, rec, (flags or {}).get(rec.key, 0)) for rec in puts]
        vals.append(META_VALUE.pack(self._durable_seq, self._live_count, self._used, self._wal_records))
        self.index.write_batch(keys, vals, [p + k for k in deletes], self._durable_seq)

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

    # ------------------------------------------------------------------ garbage
    def _collect_orphans(self, never_adopt: set[bytes] | None = None) -> tuple[int, int]:
        """Unlink objects no live record names (a crash between an object's
        rename and its WAL commit, or between a DELETE and its unlink).  Lists
        names only; run at open after an unclean shutdown, and by ``gc()``.
        Each candidate is claimed first, so a publish of the same key waits.

        ``never_adopt`` (recovery after WAL damage, with an ``adopt`` check):
        an orphan whose key has no surviving DELETE and that the check accepts
        is adopted -- a new PUT record names it -- instead of collected: the
        damage cost the record, not the block.  (removed, adopted)"""
        removed = 0
        adopt: list[PutRecord] = []
        for sub in sorted(self.io.listdir(self._objects)):
            path = f"{self._objects}/{sub}"
            if not (len(sub) == 2 and self.io.isdir(path)):
                continue
            with self._subdir_lock:
                self._subdirs.add(sub)   # durable: objects/ was fsynced at open
            # A killed predecessor's unlinks (after durable DELETEs) and renames may
            # sit in the page cache only: make them durable before a CLEAN marker
            # could claim that no orphan exists.
            self.io.fsync_dir(path, "recover_sync")
            for name in self.io.listdir(path):
                if self.io.isdir(f"{path}/{name}"):
                    if f"objects/{sub}/{name}" not in self._stray:
                        self._stray.append(f"objects/{sub}/{name}")
                    continue
                key = _key_from_name(sub, name)
                if key is not None and self.contains(key):
                    continue
                if never_adopt is not None and key is not None and key not in never_adopt:
                    data = self.io.read_file(f"{path}/{name}")
                    if self._adopt(key, data):
                        adopt.append(PutRecord(0, key, len(data), crc32c(data)))
                        continue
                claimed = [key] if key is None else self._claim([key])
                try:
                    if key is None or not self.contains(key):
                        self.io.unlink(f"{path}/{name}")
                        removed += 1
                        with self._cond:  # made durable before a CLEAN marker claims "no orphans"
                            self._unlinked_subdirs.add(sub)
                finally:
                    if key is not None:
                        self._release(claimed)
        with self._cond:
            self._n["orphans_collected"] += removed
        if adopt:  # recovery only: single-threaded, the writer is ours
            recs = []
            for rec in adopt:
                self._last_seq += 1
                recs.append(PutRecord(self._last_seq, rec.key, rec.length, rec.crc))
            self._writer.append(b"".join(_wal.encode(x) for x in recs))
            self._durable_seq = self._last_seq
            self._wal_records += len(recs)
            self._live_count += len(recs)
            self._used += sum(x.length for x in recs)
            self._write_batch(recs, [])
            self.index.flush()
        return removed, len(adopt)

    def gc(self) -> int:
        """Remove orphan objects now; how many.  O(objects) names listed, none read."""
        with self._cond:
            self._check_usable()
        return self._collect_orphans()[0]

    def scrub(self, byte_budget: int | None = None) -> tuple[int, int]:
        """Read and verify (length + CRC32C) live objects, dropping any that fail,
        up to ``byte_budget`` bytes read: (objects checked, objects dropped).
        Optional: every read verifies anyway; this finds damage before a read does."""
        checked = dropped = read = 0
        for key, value in self._records():
            if byte_budget is not None and read >= byte_budget:
                break
            try:
                length = unpack_index_value(key, value)[0]
            except DamagedRecordError:
                self.repair_index("scrub found a damaged record")
                continue
            read += length
            checked += 1
            try:
                self.read(key)
            except CorruptObjectError:
                dropped += 1
            except ObjectNotFoundError:
                continue
        return checked, dropped

    def _records(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, record) of every live key, in key order (chunked: not a snapshot)."""
        p = self._prefix
        with self._cond:
            self._check_usable()
            it = self.index.scan_prefix(p)
        for k, v in it:
            if len(k) > len(p) + MAX_KEY_BYTES:
                continue  # the summary record
            yield k[len(p):], v

    # ------------------------------------------------------------------ publish
    def publish(self, key: bytes, data) -> bool:
        """Store ``data`` under ``key``; durable when it returns.

        True if newly stored, False if the key was already live (objects are
        immutable and content-addressed: the existing bytes are kept)."""
        return self.publish_many([(key, data)])[0]

    def publish_many(self, items: Iterable[tuple]) -> list[bool]:
        """Publish a batch: one fsync per object, one per distinct objects/ab/,
        one WAL fsync for all (shared further with concurrent publishers).

        Each item is (key, data) or (key, data, crc).  ``data`` is bytes-like,
        or a tuple of bytes-like pieces stored in order as one object (written
        with ``writev``: BlockStore's envelope header, the caller's payload and
        the CRC, never joined).  ``crc`` is the CRC32C of exactly those bytes,
        when the caller already has it (BlockStore derives it from the
        envelope's own CRC, walpub/checksum.py's combine): the record takes it instead of a
        pass over the bytes.  A wrong one loses the object, never serves it:
        every read checks the bytes against the record and drops what fails
        (CorruptObjectError)."""
        items = list(items)
        for key, data, *_crc in items:
            check_key(key)
            n = _nbytes(data)
            if n > MAX_OBJECT_BYTES or (self.capacity_bytes is not None and n > self.capacity_bytes):
                raise ObjectTooLargeError(f"object of {n} bytes exceeds the limit")
        result = [False] * len(items)
        first: dict[bytes, int] = {}
        for i, item in enumerate(items):
            first.setdefault(item[0], i)
        wanted = list(first)
        claimed = self._claim(wanted, skip_live=True)
        try:
            todo = [items[first[k]] for k in claimed]
            if todo:
                try:
                    recs = self._write_objects(todo)
                except OSError as exc:
                    raise VolumeIOError(f"writing objects failed: {exc}") from exc
                crash_point("publish.dir_synced")
                try:
                    self._commit(recs)
                except BaseException:
                    self._orphans_possible = True  # renamed, maybe never logged
                    raise
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

    def _write_objects(self, todo: list[tuple]) -> list[tuple]:
        """Each object written and fsync'd under a temporary name, then renamed
        into its shard, then each touched shard directory fsync'd: every object
        is durable under its final name before the WAL names it.

        The writes + fsyncs of a batch run ``io.write_parallelism`` at a time (a
        file system commits concurrent fsyncs together); all of them complete
        before the first rename, and all directory fsyncs before the commit, so
        the order the crash simulator checks is the same as one at a time (it
        runs with parallelism 1: a deterministic sequence of calls)."""
        io = self.io
        # CRC of the bytes handed to us, before they reach the disk (or the caller's, of the same bytes).
        ops = [("put", key, _nbytes(data), crc[0] if crc else _crc_of(data if isinstance(data, tuple) else (data,)))
               for key, data, *crc in todo]
        tmps = [f"{self._tmp}/{item[0].hex()}.{next(self._tmp_names)}.tmp" for item in todo]
        try:
            self._each(self._write_tmp, list(zip(tmps, [item[1] for item in todo])))
            rels = [object_relpath(item[0]) for item in todo]
            subs = {rel.split("/")[1] for rel in rels}
            self._ensure_subdirs(subs)
            for rel, tmp in zip(rels, tmps):
                io.rename(tmp, f"{self.root}/{rel}")
                crash_point("publish.renamed")
            tmps = []
            # The object is durable under its final name before anything names it.
            self._each(lambda sub: io.fsync_dir(f"{self._objects}/{sub}", "objects_dir"), sorted(subs))
        finally:
            for tmp in tmps:  # failed before the renames: leave no garbage
                try:
                    io.unlink(tmp)
                except OSError:
                    pass
        return ops

    def _write_tmp(self, item: tuple[str, bytes]) -> None:
        tmp, data = item
        io = self.io
        fd = io.create(tmp)
        try:
            io.write(fd, data)
            crash_point("publish.object_written")
            io.fsync(fd, "object")
            crash_point("publish.object_synced")
        finally:
            io.close(fd)

    def _each(self, fn, items: list) -> None:
        """``fn`` on every item, ``io.write_parallelism`` at a time; returns when all
        have finished, then raises the first failure (in item order)."""
        width = min(self.io.write_parallelism, len(items))
        if width <= 1:
            for item in items:
                fn(item)
            return
        with self._subdir_lock:
            if self._io_pool is None:
                self._io_pool = ThreadPoolExecutor(self.io.write_parallelism, thread_name_prefix="walpub-io")
            pool = self._io_pool
        futures = [pool.submit(fn, item) for item in items]
        wait_all(futures)  # none is left running when the caller cleans up
        for fut in futures:
            fut.result()

    def _ensure_subdirs(self, subs: set[str]) -> None:
        """Make the batch's new ``objects/<ab>/`` directories durable before
        anything is renamed into them: mkdir each, then one fsync of
        ``objects/`` for all of them (not one per directory: a fresh volume's
        batch of 16 objects touched ~10 new ones, each a serial fsync)."""
        if subs <= self._subdirs:
            return
        with self._subdir_lock:  # nobody may skip the fsync while it is pending
            new = sorted(subs - self._subdirs)
            if not new:
                return
            for sub in new:
                try:
                    self.io.mkdir(f"{self._objects}/{sub}")
                except FileExistsError:
                    pass
            self.io.fsync_dir(self._objects, "objects_parent")
            self._subdirs.update(new)

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
                try:
                    self._apply(batch)
                except IndexCorruptError as exc:  # the batch is durable in the WAL: the rebuild applies it
                    self._durable_seq = batch[-1].seq
                    self._rebuild_index(f"applying a batch: {exc}")
                if self._repair_due:  # still the writer: nothing commits meanwhile
                    self._rebuild_index("a record replaced by this batch was damaged")
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
        """Make a durable batch visible: one atomic index write of its records,
        deletions, the summary and the applied seq (lock held)."""
        # A key is busy from enqueue to return, so it appears once per batch.
        assert len({rec.key for rec in batch}) == len(batch), "key twice in one batch"
        p = self._prefix
        olds = self.index.get_many([p + rec.key for rec in batch])
        puts, dels = [], []
        for rec, old in zip(batch, olds):
            if old is not None:
                try:
                    self._used -= unpack_index_value(rec.key, old)[0]
                except DamagedRecordError:
                    self._repair_due = True  # the leader rebuilds the index right after this batch
                self._live_count -= 1
                self._lru.pop(rec.key, None)
            if isinstance(rec, PutRecord):
                puts.append(rec)
                self._live_count += 1
                self._used += rec.length
                self._lru[rec.key] = None
            else:
                dels.append(rec.key)
        self._durable_seq = batch[-1].seq
        self._wal_records += len(batch)
        self._write_batch(puts, dels)
        self._n["commits"] += 1
        self._n["frames"] += len(batch)
        self._since_checkpoint += len(batch)
        if self._since_checkpoint >= max(self.checkpoint_records, self._live_count // 8):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Flush the index so a reopen replays only what follows (lock held).
        Bounds the WAL tail an open after a crash must replay."""
        self.index.flush()
        self._since_checkpoint = 0
        self._n["checkpoints"] += 1

    def repair_index(self, why: str) -> None:
        """Rebuild the index from the WAL (the records it derives from): a record
        that fails its own CRC means the index is damaged, and the intact objects
        it describes must not be judged by it.  Takes the writer role (commits
        wait, bounded) like compaction."""
        deadline = time.monotonic() + self.wait_timeout_s
        with self._cond:
            while self._syncing:
                self._wait(deadline, "WAL writer for an index repair")
            self._check_usable()
            self._syncing = True
            try:
                self._rebuild_index(why)
            except BaseException as exc:
                self._fail(exc, "rebuilding a damaged index failed")
            finally:
                self._syncing = False
                self._cond.notify_all()

    def _rebuild_index(self, why: str) -> None:
        """(lock held, writer role held) Replay the whole WAL and make the index
        exactly its live set: stray and damaged records go, every live record is
        rewritten.  No object is read.  If the index's own files are damaged
        (IndexCorruptError from any call), they are discarded first and the
        index starts empty -- possible only for an index opened by name."""
        r = _wal.replay(self.io, self._waldir, truncate=False)
        assert r.last_seq == self._durable_seq, (r.last_seq, self._durable_seq)
        try:
            self._rebuild(r, "none")
        except IndexCorruptError as exc:
            if not self._owns_index or self._index_path is None:
                raise
            try:
                self.index.close()
            except IndexBackendError:
                pass
            self._remove_files(self._index_path)
            self.index_reset = f"{type(exc).__name__}: {exc}"
            self.index = self._open_index(self._index_name, self._index_path)
            self._rebuild(r, "none")
        self._repair_due = False
        self._n["index_repairs"] += 1
        self.last_repair = why

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

    def _touch(self, key: bytes) -> None:
        """Mark ``key`` most recently used (lock held)."""
        self._lru[key] = None
        self._lru.move_to_end(key)

    def _claim(self, keys: list[bytes], *, skip_live: bool = False, only_live: bool = False) -> list[bytes]:
        """Mark keys in flight (waiting, bounded, for other operations on them)."""
        deadline = time.monotonic() + self.wait_timeout_s
        with self._cond:
            while True:
                self._check_usable()
                if not any(k in self._busy for k in keys):
                    break
                self._wait(deadline, "a key in flight")
            if not (skip_live or only_live):
                out = list(keys)
            else:
                p = self._prefix
                present = self.index.get_many([p + k for k in keys]) if keys else []
                out = []
                for k, v in zip(keys, present):
                    if skip_live and v is not None:
                        self._touch(k)
                        continue
                    if only_live and v is None:
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
        See :meth:`read_into` for the same read into a caller's buffers."""
        return self._read_verified(key, None)

    def read_into(self, key: bytes, buffers_for) -> list:
        """The object's bytes read into ``buffers_for(length)`` (writable buffers
        of ``length`` bytes in all, ``length`` from the index), verified as by
        :meth:`read` (length, then one CRC32C pass over the buffers in order);
        returns those buffers.  The caller picks where the bytes land: the
        store reads an envelope's body straight into the destination array.
        On an error the buffers may hold any bytes and must not be used."""
        return self._read_verified(key, buffers_for)

    def read_many_into(self, keys: list[bytes], buffers_fors: list) -> list[list | None]:
        """:meth:`read_into` of many keys on its fast path only: one lock
        acquisition for all their index lookups, then each object read into
        ``buffers_fors[i](length)`` and verified (length, then one CRC32C pass).

        A key whose read does not simply verify gets None and nothing changes:
        a miss, a damaged record or index, a failed check, an I/O error, or a
        ``buffers_for`` that returns None (the caller cannot take that length
        in place).  The caller reads such a key again with :meth:`read_into`,
        which repairs, drops or explains (a get of n blocks pays the lock and
        the call layers once, not n times: issue 10)."""
        for key in keys:
            check_key(key)
        with self._cond:
            self._check_usable()
            try:
                values = self.index.get_many([self._prefix + key for key in keys])
            except IndexCorruptError:
                return [None] * len(keys)  # read_into rebuilds the index and answers
            for key, value in zip(keys, values):
                if value is not None:
                    self._touch(key)
        out: list[list | None] = []
        read_into, root = self.io.read_into, self.root
        for key, value, buffers_for in zip(keys, values, buffers_fors):
            pieces = None
            if value is not None:
                try:
                    length, crc, _seq, _flags = unpack_index_value(key, value)
                    pieces = buffers_for(length)
                    if pieces is not None and not (read_into(f"{root}/{object_relpath(key)}", pieces) == length
                                                   and _crc_of(pieces) == crc):
                        pieces = None
                except (DamagedRecordError, OSError):
                    pieces = None
            out.append(pieces)
        return out

    def _read_verified(self, key: bytes, buffers_for):
        """read / read_into (``buffers_for`` None: a new ``bytes``).

        ObjectNotFoundError on a miss; CorruptObjectError (after dropping the
        record) when the bytes fail verification: never wrong bytes.

        The file is read outside the lock, so the key may be deleted (and
        published again) meanwhile: a failed check is judged against the index
        entry read again under the lock.  Gone: a miss.  Another PUT (seq
        changed): the read is retried once with it (a second change is reported
        as a miss).  Only a failure against an unchanged entry is corruption."""
        check_key(key)
        try:
            return self._read(key, buffers_for)
        except (DamagedRecordError, IndexCorruptError) as exc:
            self.repair_index(str(exc))  # derived state is never trusted over the object
            return self._read(key, buffers_for)
        except ObjectNotFoundError:
            if not self._unnamed_object(key):
                raise
        # An object on disk that no index record names, and no publish of it in
        # flight: a record lost to index damage (a flipped key), or an orphan.
        # The WAL decides: rebuild the index from it and look again; still
        # absent, the object is an orphan and goes.
        self.repair_index(f"object {key.hex()} exists but the index has no record of it")
        try:
            return self._read(key, buffers_for)
        except ObjectNotFoundError:
            claimed = self._claim([key])
            try:
                if self._unnamed_object(key):
                    self._unlink_object(key)
            finally:
                self._release(claimed)
            raise

    def _unnamed_object(self, key: bytes) -> bool:
        """True if ``key``'s object file exists, the index has no record of it
        and no operation on it is in flight."""
        with self._cond:
            if key in self._busy or self.index.get(self._prefix + key) is not None:
                return False
        return self.io.exists(f"{self.root}/{object_relpath(key)}")

    def _read(self, key: bytes, buffers_for):
        with self._cond:
            self._check_usable()
            value = self.index.get(self._prefix + key)
            if value is None:
                raise ObjectNotFoundError(key)
            self._touch(key)
        for attempt in range(2):
            length, crc, seq, _flags = unpack_index_value(key, value)
            path = f"{self.root}/{object_relpath(key)}"
            try:
                if buffers_for is None:
                    data = self.io.read_file(path)
                    got, pieces = len(data), (data,)
                else:
                    data = pieces = buffers_for(length)
                    got = self.io.read_into(path, pieces)
            except FileNotFoundError:
                data = None
            except OSError as exc:
                raise VolumeIOError(f"reading {key.hex()} failed: {exc}") from exc
            if data is not None and got == length and _crc_of(pieces) == crc:
                return data
            with self._cond:
                now = self.index.get(self._prefix + key)
            if now is None:
                raise ObjectNotFoundError(key) from None  # deleted meanwhile
            if unpack_index_value(key, now)[2] == seq:
                break  # the same PUT: the object itself is bad
            if attempt == 1:
                raise ObjectNotFoundError(key) from None  # replaced twice during one read
            value = now  # deleted and published again meanwhile: read the new one
        why = "missing" if data is None else ("wrong length" if got != length else "bad crc")
        self._drop(key, seq)
        with self._cond:
            self._n["corrupt_reads"] += 1
        raise CorruptObjectError(f"object {key.hex()} failed verification ({why}); record dropped")

    def _drop(self, key: bytes, seq: int) -> None:
        claimed = self._claim([key], only_live=True)
        try:
            info = self.info(key) if claimed else None
            if info is not None and info.seq == seq:
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
        rel = object_relpath(key)
        try:
            self.io.unlink(f"{self.root}/{rel}")
        except FileNotFoundError:
            pass
        with self._cond:
            self._unlinked_subdirs.add(rel.split("/")[1])

    def _ask_index(self, question):
        """``question()`` under the lock; if the index's files turn out damaged
        (IndexCorruptError), the index is rebuilt from the WAL and asked again."""
        for attempt in range(2):
            try:
                with self._cond:
                    self._check_usable()
                    return question()
            except IndexCorruptError as exc:
                if attempt:
                    raise VolumeFailedError(f"index still damaged after a rebuild: {exc}") from exc
                self.repair_index(str(exc))

    def contains(self, key: bytes) -> bool:
        k = self._prefix + check_key(key)
        return self._ask_index(lambda: self.index.get(k) is not None)

    __contains__ = contains

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        """Membership of each key, one index call."""
        ks = [self._prefix + check_key(k) for k in keys]
        return self._ask_index(lambda: [v is not None for v in self.index.get_many(ks)])

    def longest_prefix(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` are live (stops at the first miss): the
        index's own longest_prefix, one call."""
        ks = [self._prefix + k for k in keys] if self._prefix else keys
        return self._ask_index(lambda: self.index.longest_prefix(ks))

    def __len__(self) -> int:
        with self._cond:
            return self._live_count

    def keys(self) -> list[bytes]:
        """Live keys, in key order (an O(N) scan of the index: for checkers and tools)."""
        return [k for k, _ in self._records()]

    def info(self, key: bytes) -> PutRecord | None:
        """The live PUT record of ``key`` (length, crc, seq) or None."""
        for attempt in range(2):
            with self._cond:
                value = self.index.get(self._prefix + check_key(key))
            if value is None:
                return None
            try:
                length, crc, seq, _flags = unpack_index_value(key, value)
            except DamagedRecordError as exc:
                if attempt:
                    raise VolumeFailedError(f"index still damaged after a rebuild: {exc}") from exc
                self.repair_index(str(exc))
                continue
            return PutRecord(seq, key, length, crc)

    def set_flags(self, keys: list[bytes], flag: int) -> int:
        """OR ``flag`` into the records of the live ``keys`` (e.g. FLAG_IN_L2);
        how many changed.  A hint, not logged: a rebuild from the WAL clears it."""
        p = self._prefix
        with self._cond:
            self._check_usable()
            values = self.index.get_many([p + k for k in keys]) if keys else []
            puts, flags = [], {}
            for k, v in zip(keys, values):
                if v is None:
                    continue
                try:
                    length, crc, seq, old = unpack_index_value(k, v)
                except DamagedRecordError:
                    continue  # a hint: the next read of the key repairs the index
                if old & flag:
                    continue
                puts.append(PutRecord(seq, k, length, crc))
                flags[k] = old | flag
            if puts:
                self._write_batch(puts, [], flags)
            return len(puts)

    def flags(self, key: bytes) -> int | None:
        """The record's flags, or None if ``key`` is not live."""
        with self._cond:
            value = self.index.get(self._prefix + check_key(key))
        try:
            return None if value is None else unpack_index_value(key, value)[3]
        except DamagedRecordError:
            return 0  # a hint only

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

    def _pick_victims(self, excess: int) -> list[bytes]:
        """Keys to delete to free ``excess`` bytes (lock held).  First the keys
        not used since open, oldest PUT first (read back from the WAL, one
        segment at a time); then the LRU order of the keys used since open."""
        p, victims = self._prefix, []
        if excess > 0 and self._cold is None:
            self._cold = _wal.iter_put_records(self.io, self._waldir, self._open_seq)
        for rec in self._cold if excess > 0 else ():
            if rec.key in self._lru or rec.key in self._busy:
                continue
            value = self.index.get(p + rec.key)
            if value is None or _seq_or_none(rec.key, value) != rec.seq:
                continue  # deleted, replaced since, or a damaged record (not evicted on a guess)
            victims.append(rec.key)
            excess -= rec.length
            if excess <= 0:
                break
        for key in self._lru:  # bounded by the keys used since open
            if excess <= 0:
                break
            if key in self._busy:
                continue
            value = self.index.get(p + key)
            if value is None or _seq_or_none(key, value) is None:
                continue
            victims.append(key)
            excess -= unpack_index_value(key, value)[0]
        return victims

    def evict_to(self, budget_bytes: int) -> list[bytes]:
        """Delete least-recently-used objects until at most ``budget_bytes`` are
        used (keys in flight are skipped).  One WAL fsync for all victims."""
        assert budget_bytes >= 0
        with self._cond:
            self._check_usable()
            victims = self._pick_victims(self._used - budget_bytes)
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
            n, live = self._wal_records, self._live_count
            return n >= self.compact_min_records and n - live > live

    def compact(self, only_if_needed: bool = False) -> bool:
        """Rewrite the WAL as RESET + live PUTs (wal.compact); commits wait meanwhile.

        The live PUTs are read from the index (the one map), which is flushed
        first so that its applied seq is at least the RESET's base: a crash
        after compaction then still opens by catching up, not by a rebuild.
        ``only_if_needed``: re-check should_compact() once the writer is ours
        (two threads may both have seen the threshold crossed)."""
        deadline = time.monotonic() + self.wait_timeout_s
        with self._cond:
            while self._syncing:
                self._wait(deadline, "WAL writer for compaction")
            self._check_usable()
            seg = self._writer.active_id
            n, live_n = self._wal_records, self._live_count
            if seg == 0 or (only_if_needed and not (n >= self.compact_min_records and n - live_n > live_n)):
                return False
            self._syncing = True
            base = self._durable_seq
            try:
                self._checkpoint()
                p = self._prefix
                live = [PutRecord(seq, k[len(p):], length, crc)
                        for k, v in self.index.scan_prefix(p) if len(k) <= len(p) + MAX_KEY_BYTES
                        for length, crc, seq, _flags in (unpack_index_value(k[len(p):], v),)]
            except DamagedRecordError:
                # Never compact from a damaged index: the WAL would lose records.
                self._syncing = False
                self._cond.notify_all()
                live = None
            except BaseException as exc:
                self._fail(exc, "reading the index for compaction failed")
        if live is None:
            self.repair_index("compaction found a damaged record")
            return False
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
            self._cold = None  # its segments are gone: restart over the compacted one
            self._n["compactions"] += 1
            self._syncing = False
            self._cond.notify_all()
        return True

    # ------------------------------------------------------------------ misc
    def stats(self) -> VolumeStats:
        with self._cond:
            return VolumeStats(
                objects=self._live_count, bytes=self._used, wal_rotations=self._writer.rotations,
                fsyncs=dict(self.io.fsync_counts), skipped_fsyncs=dict(self.io.skipped_fsyncs), **self._n,
            )

    def close(self) -> None:
        """Release the lock; everything acknowledged is already durable.  After a
        clean close a CLEAN marker tells the next open that no orphan can exist."""
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
            if self._io_pool is not None:
                self._io_pool.shutdown(wait=True)
            self._writer.close()
            if self._owns_index:
                self.index.close()
            else:
                self.index.flush()
            if self._failed is None and not self._orphans_possible and not self._busy:
                self._mark_clean()
        finally:
            self.io.unlock(self._lock_handle)

    def _mark_clean(self) -> None:
        """Unlinks made durable, then CLEAN created and its name made durable."""
        for sub in sorted(self._unlinked_subdirs):
            self.io.fsync_dir(f"{self._objects}/{sub}", "clean")
        path = f"{self.root}/{CLEAN_NAME}"
        if not self.io.exists(path):
            self.io.close(self.io.create(path))
        self.io.fsync_dir(self.root, "clean")

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _seq_or_none(key: bytes, value: bytes) -> int | None:
    try:
        return unpack_index_value(key, value)[2]
    except DamagedRecordError:
        return None


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
