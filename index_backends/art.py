"""ArtIndex: an adaptive radix tree (Leis et al., ICDE 2013) compiled with Numba.

The tree is three NumPy arrays (node/leaf words, key arena, value arena; see
``_art_kernels`` and docs/ART.md); every operation is one call into compiled
code, and the batch operations pass many keys in one call.  A first request
does not wait for Numba: until the kernels are compiled (or loaded from the
compile cache) by a background thread, small operations run the same kernels
interpreted, and only large ones wait (``_art_kernels``, docs/INDEXES.md "ART
compile cache").  Persistence is a
snapshot of the arrays plus an append-only log of its own:

* put / put_many / delete / set_applied_seq append a CRC32C-framed record to an
  in-memory buffer (spilled to the log file past ``SPILL_BYTES``, unsynced).
* ``flush()`` appends a COMMIT frame, writes and fsyncs: everything before it is
  durable when flush returns.  Reopen applies frames only up to the last COMMIT
  and truncates a torn or uncommitted tail, so a crash leaves exactly the
  flushed contents.
* a snapshot (tmp + fsync + rename + directory fsync) is written at close and
  when the log outgrows it; it records the last log sequence number it covers,
  and reopen replays only the frames past it.

With ``log=False`` (walpub drives the index and its WAL is the log) no log is
kept: ``flush()`` writes a snapshot when something changed, and
``get_applied_seq()`` after a reopen tells walpub where to start replaying.

Every file call (snapshot, its tmp, log, lock) goes through one I/O object with
the method names of walpub's ``FileSystem`` (``io=``): walpub passes its own, so
its crash simulator sees the snapshot's writes, fsyncs and rename; without one a
small ``os`` adapter (``_OsIO``) is used.  One code path either way.  fsync
labels: "index_snapshot" (the tmp file before its rename), "index_dir" (the
directory after the rename and after mkdir), "index_log" (the log, log=True only).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import struct
import time
from typing import Iterator, Sequence

import numpy as np

if importlib.util.find_spec("numba") is None:  # interpreted-only would be correct but far too slow
    raise ImportError("the ART index needs numba (pip install numba)")

from quiver.index_backends import _art_kernels as kern
from quiver.index_backends._common import (
    check_key,
    check_keys,
    check_pairs,
    check_prefix,
    check_seq,
    check_value,
)
from quiver.index_backends.errors import (
    IndexBackendError,
    IndexClosedError,
    IndexCorruptError,
    IndexLockedError,
    InvalidKeyError,
)
from quiver.index_backends.protocol import IndexStats
from quiver.walpub.checksum import crc32c

SNAP_NAME = "art.snap"
LOG_NAME = "art.log"
LOCK_NAME = "QUIVER-INDEX.LOCK"

MAX_VALUE = (1 << 19) - 1  # a leaf packs value offset | length << 44 into one int64 word
MAX_KEY = (1 << 15) - 1  # ... and key offset | length << 48

# snapshot header: magic, version, lsn, applied_seq, words, key bytes, value bytes,
# records, body crc32c, header crc32c
_SNAP = struct.Struct("<8sIQQQQQQII")
_SNAP_MAGIC = b"QARTSNP1"
_SNAP_VERSION = 1

# log frame: payload length, crc32c(type..payload), type, lsn
_FRAME = struct.Struct("<IIBQ")
F_PUT, F_DEL, F_BATCH, F_SEQ, F_COMMIT = 1, 2, 3, 4, 5
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_VOFF_MASK = kern.VOFF_MASK
SPILL_BYTES = 4 << 20  # bound on the unflushed log buffer held in memory
# A reopen with more log than this to replay waits for the compiled kernels
# instead of replaying through the interpreted ones (about 40 us a frame).
REPLAY_INTERPRET_BYTES = 512 << 10


class ArtCorruptError(IndexCorruptError):
    """art.snap (or a log frame) is damaged: short, bad magic/version/CRC32C,
    wrong length, header and body disagree.  An IndexCorruptError: rebuild."""


class ValueTooLargeError(IndexBackendError, ValueError):
    """A value longer than MAX_VALUE bytes."""


class _OsIO:
    """The real file system under the method names of walpub's ``FileSystem``
    (index_backends must not import walpub), so ArtIndex has one code path for
    real files and for walpub's crash simulator.  Labels are ignored here."""

    def create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def open_append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def write(self, fd: int, data) -> None:
        view = memoryview(data).cast("B")
        while view:  # bounded: each step writes >= 1 byte or raises
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0")
            view = view[n:]

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read()

    def file_size(self, path: str) -> int:
        return os.stat(path).st_size

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def try_lock(self, path: str) -> int | None:
        # flock belongs to the open file description: a second open in this
        # process is refused too.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        return fd

    def unlock(self, handle: int) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)

    def fsync(self, fd: int, label: str) -> None:
        # The log only appends (and truncates): fdatasync covers the size change.
        (os.fdatasync if label == "index_log" else os.fsync)(fd)

    def fsync_dir(self, path: str, label: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Lock:
    """The index directory's writer lock, taken through the I/O layer."""

    def __init__(self, io, directory: str):
        self.path = f"{directory}/{LOCK_NAME}"
        self._io = io
        self._h = io.try_lock(self.path)
        if self._h is None:
            raise IndexLockedError(f"index at {directory!r} is already open (lock {self.path!r} is held)")

    def release(self) -> None:
        if self._h is not None:
            self._io.unlock(self._h)
            self._h = None


def _make_dir(io, path: str) -> None:
    """Create ``path`` and missing parents, each made durable by an fsync of its
    parent (else a crash could lose the directory a snapshot was renamed into)."""
    if io.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if parent != path:
        _make_dir(io, parent)
    try:
        io.mkdir(path)
    except FileExistsError:
        if not io.isdir(path):
            raise
    io.fsync_dir(parent, "index_dir")


_blen = bytes.__len__  # raises TypeError on anything but bytes: type check + length in one pass

# Keys packed per compiled call in get_many: small enough that a chunk's key
# objects are still in cache when join() copies them after len() touched them.
CHUNK = 4096


def _as_seq(keys) -> Sequence[bytes]:
    if isinstance(keys, (bytes, bytearray, str)):
        raise InvalidKeyError("expected a sequence of keys, got a single bytes/str object")
    return keys if isinstance(keys, (list, tuple)) else list(keys)


def _fast_keys(keys: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
    """Pack keys as one bytes object + int64 lengths, refusing the batch whole if
    any key is not a non-empty bytes object of at most MAX_KEY bytes."""
    try:
        lens = np.fromiter(map(_blen, keys), dtype=np.int64, count=len(keys))
    except TypeError:
        check_keys(keys)  # raises the InvalidKeyError every backend raises
        raise
    if len(lens) and (lens.min() == 0 or lens.max() > MAX_KEY):
        for k in keys:
            _check_key_len(check_key(k))
    return b"".join(keys), lens


def _next_cap(cap: int, itemsize: int, need: int) -> int:
    """Next array length: doubling while the array is under GROW_DOUBLE_BYTES,
    then +25% (bounds the slack a large index carries), and never below ``need``."""
    step = cap if cap * itemsize < GROW_DOUBLE_BYTES else cap // 4
    return max(cap + step, need)


GROW_DOUBLE_BYTES = 16 << 20


def _check_key_len(key: bytes) -> bytes:
    if len(key) > MAX_KEY:
        raise InvalidKeyError(f"art keys are at most {MAX_KEY} bytes, got {len(key)}")
    return key


class ArtIndex:
    """Adaptive radix tree residency index: Numba kernels over NumPy arrays,
    persistent by snapshot + log."""

    name = "art"
    persistent = True

    def __init__(self, path, *, log: bool = True, fsync: bool = True, snapshot_min_log: int = 64 << 20,
                 io=None):
        """``io``: a walpub ``FileSystem`` (duck-typed) every file call goes
        through, paths being plain absolute strings; None means the real file
        system.  ``fsync=False`` skips only the log's commit fsync."""
        if path is None:
            raise ValueError("a persistent index needs a directory path")
        self._io = _OsIO() if io is None else io
        self._dir = os.path.abspath(os.fspath(path)) if io is None else os.fspath(path).rstrip("/")
        _make_dir(self._io, self._dir)
        self._lock = _Lock(self._io, self._dir)
        self._use_log = log
        self._fsync = fsync
        self._snapshot_min_log = snapshot_min_log
        self._snap_path = f"{self._dir}/{SNAP_NAME}"
        self._log_path = f"{self._dir}/{LOG_NAME}"
        self._snap_size = 0
        self._log_size = 0  # bytes in the log file (excluding self._buf)
        self._bytes_written = 0
        self._buf = bytearray()  # frames not yet written to the log file
        self._uncommitted = False  # frames since the last COMMIT (buffered or spilled)
        self._dirty = False  # changes since the last snapshot (log=False mode)
        self._lsn = 0
        self._seq = 0
        self._closed = False
        self._log_fd: int | None = None
        try:
            t0 = time.perf_counter()
            self._load_snapshot()
            self._replay_log()
            if int(self._N[kern.M_COUNT]) > 0:
                # A restart: have the read path's kernels in place before the first
                # gets and lookups (loaded from the compile cache: ~0.4 s, most of it
                # `import numba`; compiled when the cache is cold: ~5 s), instead of
                # running them interpreted beside the loader thread.
                kern.require("get", "longest_prefix")
            self.reopen_seconds = time.perf_counter() - t0
        except BaseException:
            self._lock.release()
            raise

    # -- persistence --------------------------------------------------------------

    def _load_snapshot(self) -> None:
        """Load art.snap whole; any damage (short, bad magic/CRC, wrong length)
        is ArtCorruptError, so walpub can rebuild from its WAL instead."""
        io = self._io
        if not io.exists(self._snap_path):
            self._N, self._K, self._V = kern.new_arrays()
            self._Vmv = memoryview(self._V)
            self._snap_lsn = 0
            return
        data = io.read_file(self._snap_path)
        if len(data) < _SNAP.size:
            raise ArtCorruptError(f"{self._snap_path}: short header")
        head = data[: _SNAP.size]
        magic, ver, lsn, seq, words, kbytes, vbytes, records, body_crc, head_crc = _SNAP.unpack(head)
        if magic != _SNAP_MAGIC or ver != _SNAP_VERSION:
            raise ArtCorruptError(f"{self._snap_path}: bad magic or version {ver}")
        if crc32c(head[:-4]) != head_crc:
            raise ArtCorruptError(f"{self._snap_path}: header CRC mismatch")
        if len(data) != _SNAP.size + words * 8 + kbytes + vbytes:
            raise ArtCorruptError(f"{self._snap_path}: {len(data)} bytes, its header says "
                                  f"{_SNAP.size + words * 8 + kbytes + vbytes} (truncated or overwritten)")
        body = memoryview(data)[_SNAP.size :]
        if crc32c(body) != body_crc:
            raise ArtCorruptError(f"{self._snap_path}: body CRC mismatch")
        # Small headroom, so a reopened index is not at its growth point.
        N = np.zeros(words + max(words // 16, kern.INSERT_W + 64), dtype=np.int64)
        K = np.zeros(kbytes + max(kbytes // 16, 4096), dtype=np.uint8)
        V = np.zeros(vbytes + max(vbytes // 16, 4096), dtype=np.uint8)
        pos = 0
        for arr, n in ((N.view(np.uint8), words * 8), (K, kbytes), (V, vbytes)):
            arr[:n] = np.frombuffer(body, dtype=np.uint8, count=n, offset=pos)
            pos += n
        if int(N[kern.M_COUNT]) != records or int(N[kern.M_TOP]) != words:
            raise ArtCorruptError(f"{self._snap_path}: header and body disagree")
        self._N, self._K, self._V = N, K, V
        self._Vmv = memoryview(V)
        self._snap_lsn = lsn
        self._snap_size = len(data)
        self._lsn = lsn
        self._seq = seq

    def _replay_log(self) -> None:
        """Apply committed frames past the snapshot; cut a torn/uncommitted tail."""
        if not self._use_log:
            return
        io = self._io
        existed = io.exists(self._log_path)
        data = io.read_file(self._log_path) if existed else b""
        size = len(data)
        fd = io.open_append(self._log_path)
        self._log_fd = fd
        if not existed:  # else a crash could drop the name, and every commit with it
            io.fsync_dir(self._dir, "index_dir")
        if size > REPLAY_INTERPRET_BYTES:
            kern.require("put", "put_many", "delete")
        pos = 0
        good = 0  # end of the last COMMIT frame
        pending: list[tuple[int, int, bytes]] = []
        while pos + _FRAME.size <= len(data):
            plen, crc, ftype, lsn = _FRAME.unpack_from(data, pos)
            end = pos + _FRAME.size + plen
            if end > len(data) or crc32c(memoryview(data)[pos + 8 : end]) != crc:
                break
            if lsn > self._snap_lsn:
                if ftype == F_COMMIT:
                    for pt, plsn, payload in pending:
                        self._apply(pt, payload)
                        self._lsn = max(self._lsn, plsn)
                    self._lsn = max(self._lsn, lsn)
                    pending.clear()
                else:
                    pending.append((ftype, lsn, data[pos + _FRAME.size : end]))
            if ftype == F_COMMIT:
                good = end
            pos = end
        if good != size:
            io.truncate(fd, good)
            io.fsync(fd, "index_log")
        self._log_size = good  # appends (O_APPEND) go on from here

    def _apply(self, ftype: int, payload: bytes) -> None:
        if ftype == F_PUT:
            (kl,) = _U32.unpack_from(payload, 0)
            self._put_raw(payload[4 : 4 + kl], payload[4 + kl :])
        elif ftype == F_DEL:
            kern.delete(self._N, self._K, payload)
        elif ftype == F_BATCH:
            (n,) = _U32.unpack_from(payload, 0)
            klens = np.frombuffer(payload, dtype="<u4", count=n, offset=4).astype(np.int64)
            vlens = np.frombuffer(payload, dtype="<u4", count=n, offset=4 + 4 * n).astype(np.int64)
            kstart = 4 + 8 * n
            ktotal = int(klens.sum())
            kbuf = payload[kstart : kstart + ktotal]
            vbuf = payload[kstart + ktotal :]
            self._put_many_raw(kbuf, klens, vbuf, vlens)
        elif ftype == F_SEQ:
            (self._seq,) = _U64.unpack(payload)
        else:
            raise ArtCorruptError(f"{self._log_path}: unknown frame type {ftype}")

    def _append(self, ftype: int, payload: bytes) -> None:
        """Buffer one log frame (or, without a log, just mark the state dirty)."""
        self._dirty = True
        if not self._use_log:
            return
        self._lsn += 1
        body = _FRAME.pack(len(payload), 0, ftype, self._lsn)[8:] + payload
        self._buf += _FRAME.pack(len(payload), crc32c(body), ftype, self._lsn)[:8]
        self._buf += body
        self._uncommitted = True
        if len(self._buf) >= SPILL_BYTES:
            self._write_buf()

    def _write_buf(self) -> None:
        if self._buf:
            self._io.write(self._log_fd, self._buf)
        self._bytes_written += len(self._buf)
        self._log_size += len(self._buf)
        self._buf = bytearray()

    def _commit(self) -> None:
        if not self._uncommitted:
            return
        self._uncommitted = False
        self._lsn += 1
        body = _FRAME.pack(0, 0, F_COMMIT, self._lsn)[8:]
        self._buf += _FRAME.pack(0, crc32c(body), F_COMMIT, self._lsn)[:8] + body
        self._write_buf()
        if self._fsync:
            self._io.fsync(self._log_fd, "index_log")

    def snapshot(self) -> int:
        """Write a snapshot of the arrays (durable on return) and empty the log;
        returns the snapshot's size in bytes.

        tmp, fsync("index_snapshot"), rename, fsync_dir("index_dir"): a crash at
        any step leaves the old snapshot or the new one under art.snap, never a
        mix (a stale tmp is ignored and replaced by the next snapshot)."""
        self._live()
        self._commit()
        self._maybe_compact(force=True)
        self._defrag()
        N, K, V = self._N, self._K, self._V
        words, kbytes, vbytes = int(N[kern.M_TOP]), int(N[kern.M_KUSED]), int(N[kern.M_VUSED])
        parts = (memoryview(N.view(np.uint8))[: words * 8], memoryview(K)[:kbytes], memoryview(V)[:vbytes])
        crc = 0
        for mv in parts:
            crc = crc32c(mv, crc)
        head = _SNAP.pack(_SNAP_MAGIC, _SNAP_VERSION, self._lsn, self._seq, words, kbytes, vbytes,
                          int(N[kern.M_COUNT]), crc, 0)[:-4]
        head += _U32.pack(crc32c(head))
        io = self._io
        tmp = self._snap_path + ".tmp"
        if io.exists(tmp):
            io.unlink(tmp)  # left by a crash mid-snapshot
        fd = io.create(tmp)
        try:
            io.write(fd, head)
            for mv in parts:
                if len(mv):
                    io.write(fd, mv)
            io.fsync(fd, "index_snapshot")
        finally:
            io.close(fd)
        io.rename(tmp, self._snap_path)
        io.fsync_dir(self._dir, "index_dir")
        size = len(head) + sum(len(mv) for mv in parts)
        self._bytes_written += size
        self._snap_size = size
        self._snap_lsn = self._lsn
        self._dirty = False
        if self._log_fd is not None:
            # The snapshot covers every frame; a crash before this truncate is
            # harmless because replay skips frames with lsn <= the snapshot's.
            io.truncate(self._log_fd, 0)
            io.fsync(self._log_fd, "index_log")
            self._log_size = 0
        return size

    # -- growth -------------------------------------------------------------------

    def _grow(self, which: int, need: int = 0) -> None:
        """Grow array ``which`` (1 N, 2 K, 3 V) geometrically (``_next_cap``),
        to at least ``need`` free slots; compacts an arena instead when at
        least half of it is dead."""
        N = self._N
        if which == 1:
            if int(N[kern.M_FREEW]) * 4 >= int(N[kern.M_TOP]):
                self._defrag()  # a quarter or more is free-list garbage: reclaim it instead
                if len(self._N) - int(self._N[kern.M_TOP]) >= need + kern.INSERT_W:
                    return
                N = self._N
            new = np.zeros(_next_cap(len(N), 8, int(N[kern.M_TOP]) + need + kern.INSERT_W), dtype=np.int64)
            new[: len(N)] = N
            self._N = new
            return
        if self._maybe_compact(extra_k=need if which == 2 else 0, extra_v=need if which == 3 else 0):
            return
        arr, used = (self._K, int(N[kern.M_KUSED])) if which == 2 else (self._V, int(N[kern.M_VUSED]))
        new = np.zeros(_next_cap(len(arr), 1, used + need), dtype=np.uint8)
        new[:used] = arr[:used]
        if which == 2:
            self._K = new
        else:
            self._V = new
            self._Vmv = memoryview(new)

    def _maybe_compact(self, force: bool = False, extra_k: int = 0, extra_v: int = 0) -> bool:
        """Rewrite the arenas without dead bytes when they are at least half
        dead (always on ``force`` if any are dead).  True if it compacted."""
        N = self._N
        kdead, vdead = int(N[kern.M_KDEAD]), int(N[kern.M_VDEAD])
        kused, vused = int(N[kern.M_KUSED]), int(N[kern.M_VUSED])
        if not (kdead or vdead):
            return False
        if not force and kdead * 2 < kused and vdead * 2 < vused:
            return False
        count = int(N[kern.M_COUNT])
        leaves = np.empty(count, dtype=np.int64)
        got = kern.scan_leaves(N, self._K, b"", leaves)
        assert got == count, (got, count)
        klive, vlive = kused - kdead, vused - vdead
        newK = np.zeros(max(len(self._K) if force else 0, klive + extra_k + klive // 4 + 4096), dtype=np.uint8)
        newV = np.zeros(max(len(self._V) if force else 0, vlive + extra_v + vlive // 4 + 4096), dtype=np.uint8)
        kern.compact_arenas(N, self._K, self._V, leaves, count, newK, newV)
        self._K, self._V = newK, newV
        self._Vmv = memoryview(newV)
        return True

    def _defrag(self) -> None:
        """Rebuild ``N`` without free-list garbage, breadth-first (the snapshot
        then carries only live blocks, and the top levels share cache lines)."""
        N = self._N
        top = int(N[kern.M_TOP])
        live = top - int(N[kern.M_FREEW])
        newN = np.zeros(live + max(live // 8, kern.INSERT_W + 64), dtype=np.int64)
        new_top = kern.defrag(N, newN)
        assert new_top == live, (new_top, live)  # the free-word count is exact
        self._N = newN

    def _put_raw(self, key: bytes, value: bytes) -> int:
        while True:
            r = kern.put(self._N, self._K, self._V, key, value)
            if r >= 0:
                return r
            self._grow(-r, len(key) if r == -2 else len(value))

    def _put_many_raw(self, kbuf: bytes, klens: np.ndarray, vbuf: bytes, vlens: np.ndarray) -> None:
        N = self._N
        ktotal, vtotal = len(kbuf), len(vbuf)
        # Presize the arenas for the whole batch (one copy, not log2(batch) copies).
        if len(self._K) - int(N[kern.M_KUSED]) < ktotal:
            self._grow(2, ktotal)
        if len(self._V) - int(N[kern.M_VUSED]) < vtotal:
            self._grow(3, vtotal)
        n = len(klens)
        kends = None
        i = 0
        while True:
            kpos = vpos = 0
            if i:
                if kends is None:
                    kends, vends = np.cumsum(klens), np.cumsum(vlens)
                kpos, vpos = int(kends[i - 1]), int(vends[i - 1])
            r = kern.put_many(self._N, self._K, self._V, kbuf, klens, vbuf, vlens, i, kpos, vpos)
            i, why = divmod(r, 4)
            if why == 0:
                assert i == n
                return
            self._grow(why, int(klens[i]) if why == 2 else (int(vlens[i]) if why == 3 else 0))

    # -- protocol -------------------------------------------------------------------

    def _live(self) -> None:
        if self._closed:
            raise IndexClosedError("ArtIndex is closed")

    def put(self, key: bytes, value: bytes) -> None:
        self._live()
        _check_key_len(check_key(key))
        check_value(value)
        if len(value) > MAX_VALUE:
            raise ValueTooLargeError(f"art values are at most {MAX_VALUE} bytes, got {len(value)}")
        self._put_raw(key, value)
        self._append(F_PUT, _U32.pack(len(key)) + key + value)

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        self._live()
        self._apply_puts(*self._pack_pairs(keys, values))

    def _pack_pairs(self, keys, values) -> tuple[bytes, np.ndarray, bytes, np.ndarray]:
        """Validate a put batch whole (typed errors, nothing written) and pack it."""
        keys = _as_seq(keys)
        kbuf, klens = _fast_keys(keys)
        if isinstance(values, (bytes, bytearray, str)):
            raise TypeError("expected a sequence of values, got a single bytes/str object")
        if not isinstance(values, (list, tuple)):
            values = list(values)
        if values and set(map(type, values)) != {bytes}:
            check_pairs(list(keys), values)  # raises the shared TypeError
        if len(values) != len(klens):
            raise ValueError(f"put_many got {len(klens)} keys but {len(values)} values")
        vlens = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        if len(vlens) and vlens.max() > MAX_VALUE:
            raise ValueTooLargeError(f"art values are at most {MAX_VALUE} bytes")
        return kbuf, klens, b"".join(values), vlens

    def _apply_puts(self, kbuf: bytes, klens: np.ndarray, vbuf: bytes, vlens: np.ndarray) -> None:
        if not len(klens):
            return
        self._put_many_raw(kbuf, klens, vbuf, vlens)
        if self._use_log:
            n = len(klens)
            self._append(
                F_BATCH,
                b"".join((_U32.pack(n), klens.astype("<u4").tobytes(), vlens.astype("<u4").tobytes(), kbuf, vbuf)),
            )
        else:
            self._dirty = True

    def write_batch(self, keys: Sequence[bytes], values: Sequence[bytes], deletes: Sequence[bytes],
                    applied_seq: int) -> None:
        """Puts, then deletes, then applied_seq, all validated before anything
        changes; atomic across a crash: with the log, its frames are followed by
        a COMMIT only at the next flush/snapshot/close (replay applies whole
        commits only), and without it snapshots are taken only between calls."""
        self._live()
        packed = self._pack_pairs(keys, values)
        deletes = _as_seq(deletes)
        _fast_keys(deletes)  # validates every key to delete
        check_seq(applied_seq)
        self._apply_puts(*packed)
        if len(deletes) > kern.SMALL_BATCH:  # many single-key calls: not through the interpreter
            kern.require("delete")
        for key in deletes:
            if kern.delete(self._N, self._K, key):
                self._append(F_DEL, key)
        self._seq = applied_seq
        self._append(F_SEQ, _U64.pack(applied_seq))

    def get(self, key: bytes) -> bytes | None:
        if self._closed:
            raise IndexClosedError("ArtIndex is closed")
        if key.__class__ is not bytes or not key:
            check_key(key)
        r = kern.get(self._N, self._K, key)
        if r < 0:
            return None
        off = r & _VOFF_MASK
        return self._Vmv[off : off + (r >> 44)].tobytes()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self._live()
        keys = _as_seq(keys)
        if len(keys) <= CHUNK:
            return self._get_chunk(keys)
        res: list[bytes | None] = []
        for i in range(0, len(keys), CHUNK):
            res += self._get_chunk(keys[i : i + CHUNK])
        return res

    def _get_chunk(self, keys: Sequence[bytes]) -> list[bytes | None]:
        kbuf, klens = _fast_keys(keys)
        if not len(klens):
            return []
        out, ends, leaves, width, misses = kern.get_many(self._N, self._K, self._V, kbuf, klens)
        vb = out.tobytes()
        if misses == 0 and width >= 0:
            if width == 0:
                return [b""] * len(klens)
            return [vb[i : i + width] for i in range(0, len(vb), width)]
        res: list[bytes | None] = []
        start = 0
        for end, leaf in zip(ends.tolist(), leaves.tolist()):
            res.append(vb[start:end] if leaf else None)
            start = end
        return res

    def delete(self, key: bytes) -> bool:
        self._live()
        _check_key_len(check_key(key))
        if not kern.delete(self._N, self._K, key):
            return False
        self._append(F_DEL, key)
        return True

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Pairs under ``prefix`` in key order, read when called (a snapshot of
        that moment: later writes do not show up in the iterator)."""
        self._live()
        check_prefix(prefix)
        N = self._N
        leaves = np.empty(min(int(N[kern.M_COUNT]), 1024), dtype=np.int64)
        total = kern.scan_leaves(N, self._K, prefix, leaves)
        if total > len(leaves):
            leaves = np.empty(total, dtype=np.int64)
            total = kern.scan_leaves(N, self._K, prefix, leaves)
        kout, kend, vout, vend, kw, vw = kern.gather_pairs(N, self._K, self._V, leaves, total)
        return zip(_split(kout.tobytes(), kend, kw), _split(vout.tobytes(), vend, vw))

    def longest_prefix(self, chain: Sequence[bytes]) -> int:
        self._live()
        kbuf, klens = _fast_keys(_as_seq(chain))
        if not len(klens):
            return 0
        return int(kern.longest_prefix(self._N, self._K, kbuf, klens))

    def longest_prefix_many(self, chains: Sequence[Sequence[bytes]]) -> list[int]:
        """``longest_prefix`` of many chains in one compiled call."""
        self._live()
        flat = [k for chain in chains for k in _as_seq(chain)]
        kbuf, klens = _fast_keys(flat)
        chain_lens = np.fromiter(map(len, chains), dtype=np.int64, count=len(chains))
        return kern.longest_prefix_many(self._N, self._K, kbuf, klens, chain_lens).tolist()

    def __len__(self) -> int:
        self._live()
        return int(self._N[kern.M_COUNT])

    def flush(self) -> None:
        """Durability point: every write before it survives a crash once it returns."""
        self._live()
        if not self._use_log:
            if self._dirty:
                self.snapshot()
            return
        self._commit()
        if self._log_size > max(self._snapshot_min_log, self._snap_size):
            self.snapshot()

    def close(self) -> None:
        """Flush, snapshot if the log holds anything, release files (idempotent)."""
        if self._closed:
            return
        try:
            if self._use_log:
                self._commit()
                if self._log_size > 0:
                    self.snapshot()
            elif self._dirty:
                self.snapshot()
        finally:
            self._closed = True
            if self._log_fd is not None:
                self._io.close(self._log_fd)
                self._log_fd = None
            self._lock.release()

    def stats(self) -> IndexStats:
        self._live()
        on_disk = 0
        for p in (self._snap_path, self._log_path):
            if self._io.exists(p):
                on_disk += self._io.file_size(p)
        N = self._N
        return IndexStats(
            records=int(N[kern.M_COUNT]),
            bytes_on_disk=on_disk,
            bytes_written=self._bytes_written,
            persistent=True,
            memory_bytes=int(self._N.nbytes + self._K.nbytes + self._V.nbytes),
            detail={
                "node_words_used": int(N[kern.M_TOP]),
                "node_words_free_listed": int(N[kern.M_FREEW]),
                "node_words_alloc": int(len(N)),
                "key_bytes_used": int(N[kern.M_KUSED]),
                "key_bytes_dead": int(N[kern.M_KDEAD]),
                "value_bytes_used": int(N[kern.M_VUSED]),
                "value_bytes_dead": int(N[kern.M_VDEAD]),
                "log_bytes_buffered": len(self._buf),
                "reopen_seconds": self.reopen_seconds,
            },
        )

    def get_applied_seq(self) -> int:
        self._live()
        return self._seq

    def set_applied_seq(self, seq: int) -> None:
        self._live()
        check_seq(seq)
        self._seq = seq
        self._append(F_SEQ, _U64.pack(seq))

    def node_census(self) -> dict[str, int]:
        """Reachable leaves and nodes per type (tests check growth and shrinking)."""
        self._live()
        c = kern.node_census(self._N).tolist()
        return dict(zip(("leaves", "n4", "n16", "n48", "n256", "max_depth"), c))


def _split(buf: bytes, ends: np.ndarray, width: int) -> list[bytes]:
    """Cut ``buf`` at the given end offsets (by a fixed stride when ``width`` >= 0)."""
    if width > 0:
        return [buf[i : i + width] for i in range(0, len(buf), width)]
    if width == 0:
        return [b""] * len(ends)
    e = ends.tolist()
    return [buf[s:t] for s, t in zip([0] + e[:-1], e)]
