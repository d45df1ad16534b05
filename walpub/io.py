"""The one I/O layer every file-system call of walpub goes through.

Why: a crash-consistency protocol is only as good as its fsyncs, and a missing
fsync is invisible to any test that does not lose the page cache.  Routing every
call through :class:`FileSystem` lets :mod:`walpub.simfs` record the calls and
build the on-disk states a power loss could leave; :class:`OsFileSystem` is the
real thing (plain ``os.*`` and ``fcntl.flock``).

Every ``fsync``/``fsync_dir`` carries a *label* naming its role in the protocol
(see FSYNC_LABELS).  Counters are kept per label, and ``disabled_fsyncs`` turns
chosen labels into no-ops: the planted-bug hook the crash suite uses to prove
each fsync is load-bearing.  Never disable one outside a test.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from abc import ABC, abstractmethod
from collections import Counter

def write_all(fd: int, data) -> None:
    """Write every byte of ``data`` to ``fd``: one bytes-like, or a tuple of
    them written in order with ``writev`` (an envelope's header, body and CRC
    straight from where they are: no joined copy).  Bounded: each iteration
    writes >= 1 byte or raises."""
    views = [memoryview(p).cast("B") for p in (data if isinstance(data, tuple) else (data,))]
    views = [v for v in views if v.nbytes]
    while views:
        n = os.writev(fd, views) if len(views) > 1 else os.write(fd, views[0])
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0")
        while views and n >= views[0].nbytes:
            n -= views.pop(0).nbytes
        if n:
            views[0] = views[0][n:]


def fsync_dir(path: str) -> None:
    """fsync a directory (through an O_DIRECTORY descriptor): makes the names
    created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The fsyncs of the protocol, by role (docs/WALPUB.md explains each).
FSYNC_LABELS = (
    "object",          # publish: the object file in tmp/ before its rename
    "objects_dir",     # publish: objects/ab/ after the rename into it
    "objects_parent",  # first use of objects/ab/: objects/ after mkdir
    "layout",          # volume creation: root, objects/, tmp/, wal/ entries
    "wal",             # group commit: the active WAL segment after appending frames
    "wal_dir",         # WAL rotation: wal/ after creating a new segment
    "compact_file",    # compaction: the new segment before its rename
    "compact_dir",     # compaction: wal/ after the rename, before old segments go
    "truncate",        # recovery: a segment cut at its first bad frame, and wal/
    "recover_sync",    # recovery: what the previous process may have left unsynced
    "index_snapshot",  # ART index: the snapshot file before its rename
    "index_dir",       # ART index: its directory after the snapshot rename (and mkdir)
    "index_log",       # ART index (log mode): its own log
    "clean",           # close: the CLEAN marker file before its rename
    # The store's PENDING_L2 journal (engine/owed_journal.py, docs/STORE.md):
    "journal",         # PENDING_L2 after appending keys (or cutting a torn tail)
    "journal_dir",     # the store directory once PENDING_L2 is (re)created or reloaded
    "journal_rewrite", # compaction/close: PENDING_L2.tmp before its rename over PENDING_L2
    "journal_rewrite_dir",  # the store directory after that rename (or the unlink)
    # The local-directory L2 (tier/objectstore.py, docs/OBJECTSTORE.md):
    "l2_layout",       # creation: the root's parent, then root (blocks/, manifests/, tmp/)
    "l2_object",       # publish: the block's file in tmp/ before its link into blocks/ab/
    "l2_parent",       # first use of blocks/ab/: blocks/ after the mkdir
    "l2_dir",          # publish: blocks/ab/ after the link (also when another writer won)
    "l2_manifest",     # write_manifest: the manifest's file in tmp/ before its link
    "l2_manifest_dir", # write_manifest: manifests/ after the link
    "l2_delete",       # delete: the object's directory after the unlink
)


class FileSystem(ABC):
    """Abstract file-system calls walpub needs; paths are absolute strings.

    Handles (``fd``) are opaque ints.  Writes always go to the end of the file
    (walpub never rewrites a byte in place).  Errors are OSError subclasses
    (FileNotFoundError, FileExistsError, ...), as from ``os``.
    """

    #: How many object writes + fsyncs walpub may run at once.  1 keeps the calls
    #: in one deterministic order (the crash simulator's file system).
    write_parallelism = 1

    def __init__(self) -> None:
        self.disabled_fsyncs: set[str] = set()
        self.fsync_counts: Counter[str] = Counter()
        self.skipped_fsyncs: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    # -- fsync, counted and (for planted-bug tests) maskable -------------------
    def fsync(self, fd: int, label: str) -> None:
        """Make the file's data durable (unless ``label`` is disabled)."""
        assert label in FSYNC_LABELS, label
        if self._skip(label):
            return
        self._fsync(fd)

    def fsync_dir(self, path: str, label: str) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable."""
        assert label in FSYNC_LABELS, label
        if self._skip(label):
            return
        self._fsync_dir(path)

    def _skip(self, label: str) -> bool:
        with self._count_lock:
            if label in self.disabled_fsyncs:
                self.skipped_fsyncs[label] += 1
                return True
            self.fsync_counts[label] += 1
            return False

    @abstractmethod
    def _fsync(self, fd: int) -> None: ...

    @abstractmethod
    def _fsync_dir(self, path: str) -> None: ...

    # -- files ------------------------------------------------------------------
    @abstractmethod
    def create(self, path: str) -> int:
        """Create a new empty file for writing; FileExistsError if it exists."""

    @abstractmethod
    def open_append(self, path: str) -> int:
        """Open a file for appending, creating it if missing."""

    @abstractmethod
    def write(self, fd: int, data: bytes) -> None:
        """Append all of ``data`` at the end of the file."""

    @abstractmethod
    def truncate(self, fd: int, size: int) -> None:
        """Cut the file to ``size`` bytes."""

    @abstractmethod
    def close(self, fd: int) -> None: ...

    @abstractmethod
    def read_file(self, path: str) -> bytes:
        """The whole content of a file."""

    @abstractmethod
    def read_head(self, path: str, n: int) -> bytes:
        """The first ``n`` bytes of a file (fewer if it is shorter)."""

    def read_into(self, path: str, buffers: list) -> int:
        """Read a file's bytes in order into ``buffers`` (writable, C-contiguous),
        filling each before the next; the file's size when it fits them, or their
        total + 1 when the file is longer (a short file leaves the rest unwritten).

        Lets a reader put an object's bytes where they are used (issue 10: an
        envelope's body straight into the caller's array) instead of a new
        ``bytes``.  This default copies from ``read_file``; OsFileSystem reads
        with one ``preadv``."""
        data = memoryview(self.read_file(path)).cast("B")
        pos = 0
        for buf in buffers:
            dst = memoryview(buf).cast("B")
            piece = data[pos:pos + dst.nbytes]
            dst[:piece.nbytes] = piece
            pos += piece.nbytes
        return min(data.nbytes, pos + 1)

    def read_sized_into(self, path: str, buffers_for) -> tuple[int, list | None, int]:
        """``(size, buffers, got)``: the file's size, ``buffers_for(size)`` and, when
        that is not None, ``read_into(path, buffers)`` (else 0): a read whose
        buffers depend on the file's size (an L2 object file: body, then its
        trailer).  OsFileSystem sizes the open file (fstat), not its path."""
        size = self.file_size(path)
        buffers = buffers_for(size)
        return size, buffers, (0 if buffers is None else self.read_into(path, buffers))

    @abstractmethod
    def file_size(self, path: str) -> int: ...

    # -- names ------------------------------------------------------------------
    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Atomically (for the process) replace ``dst`` by ``src``."""

    @abstractmethod
    def link(self, src: str, dst: str) -> None:
        """A second name ``dst`` for the file ``src`` (a hard link); never
        replaces: FileExistsError if ``dst`` exists."""

    @abstractmethod
    def unlink(self, path: str) -> None: ...

    @abstractmethod
    def mkdir(self, path: str) -> None:
        """Create one directory; FileExistsError if it exists."""

    @abstractmethod
    def listdir(self, path: str) -> list[str]: ...

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def isdir(self, path: str) -> bool: ...

    # -- the writer lock --------------------------------------------------------
    @abstractmethod
    def try_lock(self, path: str) -> int | None:
        """Take an exclusive lock on ``path`` (created if missing) without
        waiting; a handle, or None when someone else holds it."""

    @abstractmethod
    def unlock(self, handle: int) -> None: ...


class OsFileSystem(FileSystem):
    """The real file system: ``os.*`` calls, ``O_DIRECTORY`` dir fsyncs, flock."""

    #: Object writes + fsyncs a publish runs at once: concurrent fsyncs let the file
    #: system commit them together (measured on ext4 here: 16 x 256 KiB files written
    #: and fsync'd 1.5-2x faster with 8 threads than one after another).
    write_parallelism = 8

    def _fsync(self, fd: int) -> None:
        os.fsync(fd)

    def _fsync_dir(self, path: str) -> None:
        fsync_dir(path)

    def create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def open_append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def write(self, fd: int, data: bytes) -> None:
        write_all(fd, data)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read()

    def read_head(self, path: str, n: int) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read(n)

    def read_into(self, path: str, buffers: list) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # One call: a regular file reads short only at its end, and the 1-byte
            # probe after the buffers is filled only when the file is longer.
            return os.preadv(fd, [*buffers, bytearray(1)], 0)
        finally:
            os.close(fd)

    def read_sized_into(self, path: str, buffers_for) -> tuple[int, list | None, int]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            buffers = buffers_for(size)
            return size, buffers, (0 if buffers is None else os.preadv(fd, [*buffers, bytearray(1)], 0))
        finally:
            os.close(fd)

    def file_size(self, path: str) -> int:
        return os.stat(path).st_size

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def try_lock(self, path: str) -> int | None:
        # flock locks belong to the open file description, so a second open in
        # the same process is refused too (POSIX fcntl locks would not be).
        # A directory is locked through an O_DIRECTORY descriptor: unlike a lock
        # file, nobody can unlink it from under the holder (a tmp cleaner).
        if os.path.isdir(path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def unlock(self, handle: int) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
