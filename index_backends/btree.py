"""LmdbIndex: an LMDB B+tree (copy-on-write pages in one memory-mapped file).

Layout: two named sub-databases in one environment — ``records`` (the index)
and ``meta`` (``applied_seq`` as u64 little-endian) — so metadata can never
collide with a user key.  Records and applied_seq move together: a crash keeps a
consistent prefix of commits.

Durability policy: every write call is one transaction, committed with
``metasync=False`` (MDB_NOMETASYNC): the data pages are fsynced at commit but the
meta page only at the next commit or ``flush()``.  A system crash may therefore
undo the last committed transaction but never corrupts the tree; ``flush()``
calls ``env.sync(True)`` and makes everything durable.  ``sync=False`` opts into
MDB_NOSYNC (no fsync until ``flush()``), which LMDB documents can corrupt the file
on a *system* crash: only for indexes that are rebuilt from the walpub WAL.

The map (the file's maximum size) starts at ``map_size`` bytes and doubles on
``MapFullError``, retrying the whole batch, up to ``max_map_size``.

bytes_written: LMDB keeps no write counter, so every write transaction reads
this thread's ``wchar`` from ``/proc/thread-self/io`` before it begins and after
it commits.  LMDB writes its dirty pages and meta page with pwrite/pwritev from
the committing thread, and nothing else in that thread writes meanwhile, so the
delta is exactly the bytes LMDB handed to the kernel for this environment
(~2.6 µs per read of the counter).

Damaged files: LMDB maps ``data.mdb`` and trusts it, so a file shorter than
the pages its meta page names kills the process with SIGBUS at the first
touch.  Before ``lmdb.open`` maps anything, ``check_data_file`` reads the two
meta pages with pread and requires both to parse (magic, data version, page
size) and the file to hold every page up to the newer meta's ``mm_last_pg``;
anything else is IndexCorruptError.  A file may legitimately end short of
``mm_last_pg`` when the last pages are free (LMDB never writes a page that was
allocated and freed in the same transaction): only then, after walking the
free-page B-tree to prove every missing page is free, the file is extended
with zeros to its full length.  Every ``lmdb.Error`` a call raises is typed:
the corruption codes (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, MDB_INVALID,
MDB_VERSION_MISMATCH, MDB_INCOMPATIBLE, MDB_BAD_VALSIZE) as IndexCorruptError,
the rest as IndexBackendError, chained.  LMDB has no checksums: a flipped bit
in a key or value byte reads back as a wrong key or value (walpub's record
CRC catches that).
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Iterator, Sequence

import lmdb

from quiver.index_backends._common import (
    DirLock,
    check_key,
    check_keys,
    check_batch,
    check_pairs,
    check_prefix,
    check_seq,
    check_value,
    chunked_scan,
    dir_size,
    require_dir,
)
from quiver.index_backends.errors import IndexBackendError, IndexClosedError, IndexCorruptError, InvalidKeyError
from quiver.index_backends.protocol import IndexStats

_SEQ_KEY = b"applied_seq"
_U64 = struct.Struct("<Q")

# lmdb.Error subclasses that mean "the file is damaged" (liblmdb error codes in
# brackets); every other lmdb.Error becomes a plain IndexBackendError.
_CORRUPT_ERRORS = (
    lmdb.CorruptedError,  # MDB_CORRUPTED: located page was wrong type
    lmdb.PageNotFoundError,  # MDB_PAGE_NOTFOUND: requested page not found
    lmdb.InvalidError,  # MDB_INVALID: file is not an LMDB file
    lmdb.VersionMismatchError,  # MDB_VERSION_MISMATCH: data file version
    lmdb.IncompatibleError,  # MDB_INCOMPATIBLE: a sub-db record lost its flags
    lmdb.BadValsizeError,  # MDB_BAD_VALSIZE: e.g. a sub-db record of the wrong size
    lmdb.CursorFullError,  # MDB_CURSOR_FULL: a tree deeper than 32 levels (a page cycle)
)


def _typed(exc: lmdb.Error) -> IndexBackendError:
    """The typed error for an lmdb.Error (raise it ``from exc``)."""
    if isinstance(exc, _CORRUPT_ERRORS):
        return IndexCorruptError(f"LMDB index is damaged: {type(exc).__name__}: {exc}")
    return IndexBackendError(f"LMDB error: {type(exc).__name__}: {exc}")


# -- on-disk layout of data.mdb (liblmdb 0.9.x, 64-bit, mdb.c) -----------------
# MDB_page header (PAGEHDRSZ = 16): mp_pgno u64 @0, mp_pad u16 @8, mp_flags u16
# @10, mp_lower u16 @12, mp_upper u16 @14 (mp_pages u32 @12 on overflow pages).
# Pages 0 and 1 are meta pages; MDB_meta follows the header (@16): mm_magic u32
# @16, mm_version u32 @20, mm_address @24, mm_mapsize @32, mm_dbs[2] (MDB_db,
# 48 bytes each) @40 and @88, mm_last_pg u64 @136, mm_txnid u64 @144.
# mm_psize aliases mm_dbs[0].md_pad (u32 @40); mm_dbs[0].md_root is @80.
# liblmdb's mdb_env_read_header reads both metas the same way and keeps the
# one with the higher txnid.
_PAGEHDRSZ = 16
_META_END = 152
_MDB_MAGIC = 0xBEEFC0DE
_MDB_DATA_VERSION = 1
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_F_BIGDATA = 0x01
_P_INVALID = (1 << 64) - 1
_HDR = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper
_NODE = struct.Struct("<HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize


class _Meta:
    __slots__ = ("psize", "free_root", "last_pg", "txnid")

    def __init__(self, buf: bytes, where: str):
        _pgno, _pad, flags, _lo, _up = _HDR.unpack_from(buf, 0)
        magic, version = struct.unpack_from("<II", buf, 16)
        if not flags & _P_META or magic != _MDB_MAGIC:
            raise IndexCorruptError(f"{where}: not an LMDB meta page (flags {flags:#x}, magic {magic:#x})")
        if version != _MDB_DATA_VERSION:
            raise IndexCorruptError(f"{where}: LMDB data version {version}, expected {_MDB_DATA_VERSION}")
        (self.psize,) = struct.unpack_from("<I", buf, 40)
        (self.free_root,) = struct.unpack_from("<Q", buf, 80)
        self.last_pg, self.txnid = struct.unpack_from("<QQ", buf, 136)


def check_data_file(path: str) -> None:
    """Refuse (IndexCorruptError) a ``data.mdb`` that LMDB would map and then
    touch beyond its end; a missing file is a new environment and passes.

    Cost: two small preads, plus -- only when the file ends short of the newer
    meta's last page -- a walk of the free-page tree (see the module doc)."""
    data = os.path.join(path, "data.mdb")
    try:
        fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        if size < _META_END:
            raise IndexCorruptError(f"{data}: {size} bytes, too short for an LMDB meta page")
        m0 = _Meta(os.pread(fd, _META_END, 0), f"{data} meta page 0")
        psize = m0.psize
        if psize < 256 or psize > 65536 or psize & (psize - 1):
            raise IndexCorruptError(f"{data}: implausible page size {psize}")
        if size < 2 * psize:
            raise IndexCorruptError(f"{data}: {size} bytes, shorter than its two {psize}-byte meta pages")
        m1 = _Meta(os.pread(fd, _META_END, psize), f"{data} meta page 1")
        if m1.psize != psize:
            raise IndexCorruptError(f"{data}: meta pages disagree on the page size ({psize} vs {m1.psize})")
        meta = m1 if m1.txnid > m0.txnid else m0
        if meta.last_pg < 1:
            raise IndexCorruptError(f"{data}: last page {meta.last_pg} < 1")
        need = (meta.last_pg + 1) * psize
        if size >= need:
            return
        have = size // psize  # pages wholly inside the file
        _require_free_tail(fd, data, psize, size, meta, have)
        os.ftruncate(fd, need)  # the missing pages are free: back them with zeros
    finally:
        os.close(fd)


def _require_free_tail(fd: int, data: str, psize: int, size: int, meta: _Meta, have: int) -> None:
    """IndexCorruptError unless every page in [have, last_pg] is listed in the
    free-page tree (LMDB's FREE_DBI: txnid -> IDL of freed page numbers)."""
    missing = meta.last_pg + 1 - have
    short = IndexCorruptError(
        f"{data}: {size} bytes, but its meta page names {meta.last_pg + 1} pages of {psize} bytes (truncated)")
    free: set[int] = set()
    if meta.free_root != _P_INVALID:
        budget = [have]  # pages the walk may read: bounded by the file

        def page(pgno: int, n: int = 1) -> bytes:
            budget[0] -= n
            if budget[0] < 0 or pgno < 2 or (pgno + n) * psize > size:
                raise short
            return os.pread(fd, n * psize, pgno * psize)

        stack = [(meta.free_root, 0)]
        while stack:
            pgno, depth = stack.pop()
            if depth > 32:
                raise short
            buf = page(pgno)
            _p, _pad, flags, lower, _up = _HDR.unpack_from(buf, 0)
            nkeys = (lower - _PAGEHDRSZ) >> 1
            if nkeys < 0 or _PAGEHDRSZ + 2 * nkeys > psize or not flags & (_P_BRANCH | _P_LEAF):
                raise short
            for i in range(nkeys):
                (off,) = struct.unpack_from("<H", buf, _PAGEHDRSZ + 2 * i)
                if off + 8 > psize:
                    raise short
                lo, hi, nflags, ksize = _NODE.unpack_from(buf, off)
                if flags & _P_BRANCH:
                    stack.append((lo | hi << 16 | nflags << 32, depth + 1))
                    continue
                dsize = lo | hi << 16
                start = off + 8 + ksize
                if nflags & _F_BIGDATA:
                    if start + 8 > psize:
                        raise short
                    (opg,) = struct.unpack_from("<Q", buf, start)
                    npages = (_PAGEHDRSZ - 1 + dsize) // psize + 1
                    idl = page(opg, npages)[_PAGEHDRSZ : _PAGEHDRSZ + dsize]
                else:
                    if start + dsize > psize:
                        raise short
                    idl = buf[start : start + dsize]
                if len(idl) < 8 or len(idl) % 8:
                    raise short
                (n,) = struct.unpack_from("<Q", idl, 0)
                if 8 * (n + 1) > len(idl):
                    raise short
                free.update(struct.unpack_from(f"<{n}Q", idl, 8))
    if missing > len(free) or any(p not in free for p in range(have, meta.last_pg + 1)):
        raise short


class _WriteCounter:
    """Bytes the calling thread passed to write syscalls (``wchar`` of
    /proc/thread-self/io), or None where procfs does not provide it.

    /proc/thread-self resolves to a thread when opened, so one descriptor is
    kept per native thread id (bounded by the number of writer threads).
    """

    def __init__(self):
        self._fds: dict[int, int] = {}
        self.available = os.path.exists("/proc/thread-self/io")

    def read(self) -> int | None:
        if not self.available:
            return None
        tid = threading.get_native_id()
        fd = self._fds.get(tid)
        if fd is None:
            fd = self._fds[tid] = os.open("/proc/thread-self/io", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, 1024, 0)
        except OSError:  # the thread that owned this id has exited; id was reused
            os.close(fd)
            fd = self._fds[tid] = os.open("/proc/thread-self/io", os.O_RDONLY | os.O_CLOEXEC)
            raw = os.pread(fd, 1024, 0)
        i = raw.index(b"wchar:")
        return int(raw[i + 6 : raw.index(b"\n", i)])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class LmdbIndex:
    """LMDB-backed residency index (persistent; B+tree; one txn per call)."""

    name = "lmdb"
    persistent = True

    def __init__(self, path, *, map_size: int = 64 << 20, max_map_size: int = 1 << 40, sync: bool = True):
        self.path = require_dir(path)
        if map_size <= 0 or max_map_size < map_size:
            raise ValueError("need 0 < map_size <= max_map_size")
        self._lock = DirLock(self.path)
        env = None
        try:
            check_data_file(self.path)  # before anything maps data.mdb
            try:
                env = lmdb.open(
                    self.path,
                    subdir=True,
                    map_size=map_size,
                    max_dbs=2,
                    sync=sync,
                    metasync=False,
                    readahead=False,  # random point reads: readahead only pollutes the page cache
                    lock=True,
                )
                self._records = env.open_db(b"records")
                self._meta = env.open_db(b"meta")
                self._max_key = env.max_key_size()
            except lmdb.Error as exc:
                raise _typed(exc) from exc
        except BaseException:
            if env is not None:
                env.close()
            self._lock.release()
            raise
        self._env = env
        self._max_map_size = max_map_size
        self._counter = _WriteCounter()
        self._bytes_written = 0
        self._commits = 0
        self._map_growths = 0
        self._closed = False

    # -- plumbing -------------------------------------------------------------

    def _live(self) -> lmdb.Environment:
        if self._closed:
            raise IndexClosedError("LmdbIndex is closed")
        return self._env

    def _key(self, key) -> bytes:
        check_key(key)
        if len(key) > self._max_key:
            raise InvalidKeyError(f"LMDB keys are at most {self._max_key} bytes, got {len(key)}")
        return key

    def _write(self, fn) -> object:
        """Run ``fn(txn)`` in one write transaction, growing the map on MapFullError."""
        env = self._live()
        # Bounded: each retry doubles the map, and the map cannot exceed max_map_size.
        while True:
            before = self._counter.read()
            try:
                with env.begin(write=True) as txn:
                    result = fn(txn)
            except lmdb.MapFullError as exc:
                self._count_written(before)  # a big txn may have spilled pages first
                try:
                    size = env.info()["map_size"]
                    if size >= self._max_map_size:
                        raise IndexBackendError(
                            f"LMDB map is full at max_map_size={self._max_map_size} bytes") from exc
                    env.set_mapsize(min(size * 2, self._max_map_size))
                except lmdb.Error as exc2:
                    raise _typed(exc2) from exc2
                self._map_growths += 1
                continue
            except lmdb.Error as exc:
                raise _typed(exc) from exc
            self._count_written(before)
            self._commits += 1
            return result

    def _count_written(self, before: int | None) -> None:
        after = self._counter.read()
        if before is not None and after is not None:
            self._bytes_written += after - before

    # -- protocol -------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        key, value = self._key(key), check_value(value)
        self._write(lambda txn: txn.put(key, value, db=self._records))

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        ks, vs = check_pairs(keys, values)
        for k in ks:
            self._key(k)
        if not ks:
            self._live()
            return

        def body(txn):
            for k, v in zip(ks, vs):
                txn.put(k, v, db=self._records)

        self._write(body)

    def write_batch(self, keys, values, deletes, applied_seq) -> None:
        ks, vs, ds, seq = check_batch(keys, values, deletes, applied_seq)
        for k in ks + ds:
            self._key(k)
        packed = _U64.pack(seq)

        def body(txn):
            for k, v in zip(ks, vs):
                txn.put(k, v, db=self._records)
            for k in ds:
                txn.delete(k, db=self._records)
            txn.put(_SEQ_KEY, packed, db=self._meta)

        self._write(body)

    def get(self, key: bytes) -> bytes | None:
        key = self._key(key)
        env = self._live()
        try:
            with env.begin(db=self._records, buffers=False) as txn:
                return txn.get(key)
        except lmdb.Error as exc:
            raise _typed(exc) from exc

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        ks = [self._key(k) for k in check_keys(keys)]
        env = self._live()
        try:
            with env.begin(db=self._records) as txn:
                return [txn.get(k) for k in ks]
        except lmdb.Error as exc:
            raise _typed(exc) from exc

    def delete(self, key: bytes) -> bool:
        key = self._key(key)
        return bool(self._write(lambda txn: txn.delete(key, db=self._records)))

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._live()
        return chunked_scan(self._fetch, check_prefix(prefix), lambda: not self._closed)

    def _fetch(self, prefix: bytes, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        env = self._live()
        try:
            with env.begin(db=self._records) as txn:
                cur = txn.cursor()
                ok = cur.set_range(prefix if after is None else after)
                if ok and after is not None and cur.key() == after:
                    ok = cur.next()
                prev = after
                while ok and len(out) < limit:
                    k = cur.key()
                    if prev is not None and k <= prev:  # else a damaged tree could make the scan loop
                        raise IndexCorruptError("LMDB scan went backwards: the tree's key order is damaged")
                    if not k.startswith(prefix):
                        break
                    out.append((k, cur.value()))
                    prev = k
                    ok = cur.next()
        except lmdb.Error as exc:
            raise _typed(exc) from exc
        return out

    def longest_prefix(self, chain: Sequence[bytes]) -> int:
        ks = [self._key(k) for k in check_keys(chain)]
        env = self._live()
        try:
            with env.begin(db=self._records) as txn:
                for i, k in enumerate(ks):
                    if txn.get(k) is None:
                        return i
        except lmdb.Error as exc:
            raise _typed(exc) from exc
        return len(ks)

    def __len__(self) -> int:
        env = self._live()
        try:
            with env.begin() as txn:
                return txn.stat(self._records)["entries"]
        except lmdb.Error as exc:
            raise _typed(exc) from exc

    def flush(self) -> None:
        env = self._live()
        try:
            env.sync(True)
        except lmdb.Error as exc:
            raise _typed(exc) from exc

    def close(self) -> None:
        if self._closed:
            return
        try:
            try:
                self._env.sync(True)
            finally:
                self._env.close()
        except lmdb.Error as exc:
            raise _typed(exc) from exc
        finally:
            self._closed = True
            self._counter.close()
            self._lock.release()

    def stats(self) -> IndexStats:
        env = self._live()
        try:
            info = env.info()
            with env.begin() as txn:
                st = txn.stat(self._records)
        except lmdb.Error as exc:
            raise _typed(exc) from exc
        data_file = os.path.join(self.path, "data.mdb")
        detail = {
            "page_size": st["psize"],
            "depth": st["depth"],
            "branch_pages": st["branch_pages"],
            "leaf_pages": st["leaf_pages"],
            "overflow_pages": st["overflow_pages"],
            "last_pgno": info["last_pgno"],
            "map_size": info["map_size"],
            "map_growths": self._map_growths,
            "commits": self._commits,
            "data_file_bytes": os.path.getsize(data_file),
            "bytes_written_source": "proc_wchar" if self._counter.available else "unavailable",
        }
        return IndexStats(
            records=st["entries"],
            bytes_on_disk=dir_size(self.path),
            bytes_written=self._bytes_written,
            persistent=True,
            memory_bytes=0,  # pages live in the OS page cache via mmap; not attributed
            detail=detail,
        )

    def get_applied_seq(self) -> int:
        env = self._live()
        try:
            with env.begin(db=self._meta) as txn:
                raw = txn.get(_SEQ_KEY)
        except lmdb.Error as exc:
            raise _typed(exc) from exc
        if raw is None:
            return 0
        if len(raw) != _U64.size:
            raise IndexCorruptError(f"LMDB applied_seq is {len(raw)} bytes, not {_U64.size}")
        return _U64.unpack(raw)[0]

    def set_applied_seq(self, seq: int) -> None:
        packed = _U64.pack(check_seq(seq))
        self._write(lambda txn: txn.put(_SEQ_KEY, packed, db=self._meta))
