"""The simulated file system: an in-memory twin of walpub's I/O layer that
knows what is durable.

:class:`SimFileSystem` implements :class:`walpub.io.FileSystem` in memory.
Besides the state a process sees (the *volatile* view, as in the page cache),
it keeps what is *durable* and, per file and per directory, the list of
mutations made since that file or directory was last fsynced: writes and
truncates for a file; link, unlink and same-directory rename for a directory
(a cross-directory rename is a link in the target plus an unlink in the
source; a hard link is one link op).  After every mutating call it can record
a :class:`CrashPoint` (durable state plus pending ops), and ``kill_at`` makes
it raise :class:`SimulatedKill` between two calls; ``clone()`` keeps the page
cache for the next process.

Also here, because they are the same durable/volatile state model:
:class:`CrashState` (one on-disk state: files and directories, by digest),
:func:`walk_state` (the state reachable from the root), :func:`materialise`
(write a state into a real directory) and :class:`PersistentIndexTwin` (the
residency index's twin: a dict whose durable copy is taken at flush).

Which states a power loss at a point may leave is
:mod:`walpub.crash_states`; recovering them and checking the invariants is
:mod:`walpub.crash_check`.  Nothing here runs a Volume.
"""

from __future__ import annotations

import copy
import hashlib
import posixpath
import threading
import time
from dataclasses import dataclass
from typing import Callable

from quiver.walpub.io import FileSystem

ROOT = 0

# ============================================================== the in-memory FS
@dataclass(frozen=True)
class CrashPoint:
    """The durable state and pending ops right after mutating call ``n_ops``."""

    n_ops: int
    desc: str
    dur_data: dict
    dur_entries: dict
    pend_data: dict
    pend_dir: dict


@dataclass(frozen=True)
class CrashState:
    """One possible on-disk state after a power loss: files and directories."""

    files: tuple[tuple[str, bytes], ...]
    dirs: tuple[str, ...]

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for d in self.dirs:
            h.update(b"D" + d.encode() + b"\0")
        for p, data in self.files:
            h.update(b"F" + p.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        return h.digest()


class SimulatedKill(BaseException):
    """Raised by SimFileSystem at ``kill_at``: the process dies (page cache stays)."""


class SimFileSystem(FileSystem):
    """In-memory FS that knows what a power loss would keep. Thread-safe.

    ``kill_at = n`` makes the mutating call after op n raise SimulatedKill (a
    SIGKILL between two calls); continue on ``clone()``."""

    def __init__(self, state: CrashState | None = None):
        super().__init__()
        self._mu = threading.RLock()
        self._next_ino = 1
        self._kind: dict[int, str] = {ROOT: "d"}
        self._data: dict[int, bytearray] = {}
        self._entries: dict[int, dict[str, int]] = {ROOT: {}}
        self._dur_data: dict[int, bytes] = {}
        self._dur_entries: dict[int, dict[str, int]] = {ROOT: {}}
        self._pend_data: dict[int, tuple] = {}
        self._pend_dir: dict[int, tuple] = {}
        self._fds: dict[int, int] = {}
        self._next_fd = 3
        self._locks: dict[int, int] = {}   # ino -> fd holding it
        self.n_ops = 0
        self.kill_at: int | None = None
        self.fsync_delay_s = 0.0          # model fsync latency (threaded workloads)
        self.recording = False
        self.points: list[CrashPoint] = []
        self.marks: list[tuple[int, object]] = []   # (n_ops when marked, event)
        self.op_log: list[str] = []
        if state is not None:
            for d in state.dirs:
                self._mk(d, "d")
            for p, data in state.files:
                ino = self._mk(p, "f")
                self._data[ino] = bytearray(data)
            # Everything in a materialised state is durable.
            self._dur_data = {i: bytes(b) for i, b in self._data.items()}
            self._dur_entries = {i: dict(e) for i, e in self._entries.items()}

    def _mk(self, path: str, kind: str) -> int:
        parent, name = self._parent(path)
        ino = self._new_ino(kind)
        self._entries[parent][name] = ino
        return ino

    def _new_ino(self, kind: str) -> int:
        ino = self._next_ino
        self._next_ino += 1
        self._kind[ino] = kind
        if kind == "d":
            self._entries[ino] = {}
        else:
            self._data[ino] = bytearray()
        return ino

    # -- recording ---------------------------------------------------------------
    def start_recording(self) -> None:
        with self._mu:
            self.recording = True
            self._point("start")

    def mark(self, event) -> None:
        """Note a workload event (an acknowledgement) at the current op count."""
        with self._mu:
            self.marks.append((self.n_ops, event))

    def _point(self, desc: str) -> None:
        if self.recording:
            self.points.append(CrashPoint(self.n_ops, desc, self._dur_data, self._dur_entries,
                                          dict(self._pend_data), dict(self._pend_dir)))

    def _gate(self) -> None:
        if self.kill_at is not None and self.n_ops >= self.kill_at:
            raise SimulatedKill(self.n_ops)

    def _mutated(self, desc: str) -> None:
        self.n_ops += 1
        if self.recording:
            self.op_log.append(desc)
        self._point(desc)

    def clone(self) -> "SimFileSystem":
        """A deep copy (volatile view, durable state, pending ops): a process
        kill keeps the page cache, so run the next process on a clone."""
        with self._mu:
            other = copy.copy(self)
            other._mu = threading.RLock()
            other._count_lock = threading.Lock()
            other._data = {i: bytearray(b) for i, b in self._data.items()}
            other._entries = {i: dict(e) for i, e in self._entries.items()}
            other._kind = dict(self._kind)
            other._pend_data, other._pend_dir = dict(self._pend_data), dict(self._pend_dir)
            other._fds, other._locks = {}, {}
            other.points, other.marks, other.op_log = [], [], []
            other.recording = False
            other.kill_at = None
            other.disabled_fsyncs = set(self.disabled_fsyncs)
            other.fsync_counts = type(self.fsync_counts)()
            other.skipped_fsyncs = type(self.skipped_fsyncs)()
            return other

    # -- path helpers ------------------------------------------------------------
    @staticmethod
    def _split(path: str) -> list[str]:
        assert path.startswith("/"), f"SimFileSystem needs absolute paths: {path!r}"
        return [c for c in posixpath.normpath(path).split("/") if c]

    def _lookup(self, path: str) -> int | None:
        ino = ROOT
        for c in self._split(path):
            if self._kind[ino] != "d":
                return None
            ino = self._entries[ino].get(c)
            if ino is None:
                return None
        return ino

    def _parent(self, path: str) -> tuple[int, str]:
        parts = self._split(path)
        if not parts:
            raise FileExistsError(path)
        parent = self._lookup("/" + "/".join(parts[:-1]))
        if parent is None or self._kind[parent] != "d":
            raise FileNotFoundError(path)
        return parent, parts[-1]

    def _file(self, path: str) -> int:
        ino = self._lookup(path)
        if ino is None:
            raise FileNotFoundError(path)
        if self._kind[ino] != "f":
            raise IsADirectoryError(path)
        return ino

    def _dirop(self, dino: int, op: tuple) -> None:
        self._pend_dir[dino] = self._pend_dir.get(dino, ()) + (op,)

    def _dataop(self, ino: int, op: tuple) -> None:
        self._pend_data[ino] = self._pend_data.get(ino, ()) + (op,)

    # -- FileSystem --------------------------------------------------------------
    def _fsync(self, fd: int) -> None:
        with self._mu:
            self._gate()
            ino = self._fds[fd]
            self._dur_data = dict(self._dur_data)
            self._dur_data[ino] = bytes(self._data[ino])
            self._pend_data.pop(ino, None)
            self._mutated(f"fsync {ino}")

    def _fsync_dir(self, path: str) -> None:
        with self._mu:
            self._gate()
            ino = self._lookup(path)
            if ino is None or self._kind[ino] != "d":
                raise NotADirectoryError(path)
            self._dur_entries = dict(self._dur_entries)
            self._dur_entries[ino] = dict(self._entries[ino])
            self._pend_dir.pop(ino, None)
            self._mutated(f"fsync_dir {path}")

    def fsync(self, fd: int, label: str) -> None:
        if self.fsync_delay_s:
            time.sleep(self.fsync_delay_s)  # outside the lock: lets group commits form
        super().fsync(fd, label)

    def _open(self, ino: int) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = ino
        return fd

    def create(self, path: str) -> int:
        with self._mu:
            self._gate()
            parent, name = self._parent(path)
            if name in self._entries[parent]:
                raise FileExistsError(path)
            ino = self._new_ino("f")
            self._entries[parent][name] = ino
            self._dirop(parent, ("link", name, ino))
            self._mutated(f"create {path}")
            return self._open(ino)

    def open_append(self, path: str) -> int:
        with self._mu:
            ino = self._lookup(path)
            if ino is None:
                return self.create(path)
            if self._kind[ino] != "f":
                raise IsADirectoryError(path)
            return self._open(ino)

    def write(self, fd: int, data) -> None:
        with self._mu:
            self._gate()
            ino = self._fds[fd]
            data = b"".join(bytes(p) for p in data) if isinstance(data, tuple) else bytes(data)
            buf = self._data[ino]
            self._dataop(ino, ("write", len(buf), data))
            buf += data
            self._mutated(f"write {ino} +{len(data)}")

    def truncate(self, fd: int, size: int) -> None:
        with self._mu:
            self._gate()
            ino = self._fds[fd]
            del self._data[ino][size:]
            self._dataop(ino, ("trunc", size))
            self._mutated(f"truncate {ino} {size}")

    def close(self, fd: int) -> None:
        with self._mu:
            self._fds.pop(fd)

    def read_file(self, path: str) -> bytes:
        with self._mu:
            return bytes(self._data[self._file(path)])

    def read_head(self, path: str, n: int) -> bytes:
        with self._mu:
            return bytes(self._data[self._file(path)][:n])

    def file_size(self, path: str) -> int:
        with self._mu:
            return len(self._data[self._file(path)])

    def rename(self, src: str, dst: str) -> None:
        with self._mu:
            self._gate()
            sp, sn = self._parent(src)
            dp, dn = self._parent(dst)
            ino = self._entries[sp].get(sn)
            if ino is None:
                raise FileNotFoundError(src)
            old = self._entries[dp].get(dn)
            if old is not None and self._kind[old] == "d":
                raise IsADirectoryError(dst)
            del self._entries[sp][sn]
            self._entries[dp][dn] = ino
            if sp == dp:
                self._dirop(sp, ("rename", sn, dn, ino))
            else:
                self._dirop(dp, ("link", dn, ino))
                self._dirop(sp, ("unlink", sn))
            self._mutated(f"rename {src} -> {dst}")

    def link(self, src: str, dst: str) -> None:
        """A new entry for ``src``'s inode, pending in ``dst``'s directory like a
        create (a "link" op: until that directory is fsynced a crash may drop
        it; the inode's data stays whatever its own fsyncs made durable)."""
        with self._mu:
            self._gate()
            ino = self._lookup(src)
            if ino is None:
                raise FileNotFoundError(src)
            if self._kind[ino] != "f":
                raise PermissionError(src)  # as os.link on a directory (EPERM)
            dp, dn = self._parent(dst)
            if dn in self._entries[dp]:
                raise FileExistsError(dst)
            self._entries[dp][dn] = ino
            self._dirop(dp, ("link", dn, ino))
            self._mutated(f"link {src} -> {dst}")

    def unlink(self, path: str) -> None:
        with self._mu:
            self._gate()
            parent, name = self._parent(path)
            ino = self._entries[parent].get(name)
            if ino is None:
                raise FileNotFoundError(path)
            if self._kind[ino] == "d":
                raise IsADirectoryError(path)
            del self._entries[parent][name]
            self._dirop(parent, ("unlink", name))
            self._mutated(f"unlink {path}")

    def mkdir(self, path: str) -> None:
        with self._mu:
            self._gate()
            parent, name = self._parent(path)
            if name in self._entries[parent]:
                raise FileExistsError(path)
            ino = self._new_ino("d")
            self._entries[parent][name] = ino
            self._dirop(parent, ("link", name, ino))
            self._mutated(f"mkdir {path}")

    def listdir(self, path: str) -> list[str]:
        with self._mu:
            ino = self._lookup(path)
            if ino is None:
                raise FileNotFoundError(path)
            if self._kind[ino] != "d":
                raise NotADirectoryError(path)
            return sorted(self._entries[ino])

    def exists(self, path: str) -> bool:
        with self._mu:
            return self._lookup(path) is not None

    def isdir(self, path: str) -> bool:
        with self._mu:
            ino = self._lookup(path)
            return ino is not None and self._kind[ino] == "d"

    def try_lock(self, path: str) -> int | None:
        with self._mu:
            ino = self._lookup(path)
            if ino is None:
                fd = self.create(path)
                ino = self._fds[fd]
            else:
                fd = self._open(ino)
            if ino in self._locks:
                self._fds.pop(fd)
                return None
            self._locks[ino] = fd
            return fd

    def unlock(self, handle: int) -> None:
        with self._mu:
            ino = self._fds.pop(handle)
            assert self._locks.get(ino) == handle
            del self._locks[ino]

    # -- views -------------------------------------------------------------------
    def snapshot(self) -> CrashState:
        """The state a process sees now (as if all of it were durable)."""
        with self._mu:
            return walk_state(self._entries, lambda ino: bytes(self._data[ino]), self._kind)

    def durable_state(self) -> CrashState:
        """Only what is fsynced: the harshest crash state now."""
        with self._mu:
            return walk_state(self._dur_entries, lambda ino: self._dur_data.get(ino, b""), self._kind)

    def last_point(self) -> CrashPoint:
        with self._mu:
            return CrashPoint(self.n_ops, "now", self._dur_data, self._dur_entries,
                              dict(self._pend_data), dict(self._pend_dir))

    @property
    def kinds(self) -> dict[int, str]:
        return self._kind


def walk_state(entries: dict[int, dict[str, int]], data_of: Callable[[int], bytes], kind: dict[int, str]) -> CrashState:
    """The state reachable from the root through ``entries``; unreachable
    inodes are not in it.  ``data_of(ino)`` gives a file's bytes."""
    files, dirs = [], []
    stack = [("", ROOT)]
    seen = set()
    while stack:  # bounded: each directory inode is expanded once
        path, ino = stack.pop()
        if ino in seen:
            continue
        seen.add(ino)
        for name, child in entries.get(ino, {}).items():
            p = f"{path}/{name}"
            if kind[child] == "d":
                dirs.append(p)
                stack.append((p, child))
            else:
                files.append((p, data_of(child)))
    return CrashState(tuple(sorted(files)), tuple(sorted(dirs)))


class PersistentIndexTwin:
    """A persistent residency index for crash tests: a dict whose *durable* copy
    (records + applied seq) is taken at flush(); ``after_crash()`` is what a
    power loss leaves of it.  Lets the suite exercise walpub's catch-up path
    (get_applied_seq / tail replay / full reconcile) under crashes."""

    name, persistent = "twin", True

    def __init__(self, durable: tuple[dict, int] | None = None):
        self.durable = durable if durable is not None else ({}, 0)
        self.d, self.seq = dict(self.durable[0]), self.durable[1]
        self.flushes = 0

    def after_crash(self) -> "PersistentIndexTwin":
        return PersistentIndexTwin((dict(self.durable[0]), self.durable[1]))

    def put(self, k, v):
        self.d[k] = v

    def put_many(self, ks, vs):
        self.d.update(zip(ks, vs))

    def write_batch(self, ks, vs, ds, seq):
        self.d.update(zip(ks, vs))
        for k in ds:
            self.d.pop(k, None)
        self.seq = seq

    def get(self, k):
        return self.d.get(k)

    def get_many(self, ks):
        return [self.d.get(k) for k in ks]

    def delete(self, k):
        return self.d.pop(k, None) is not None

    def scan_prefix(self, p):
        return iter(sorted((k, v) for k, v in self.d.items() if k.startswith(p)))

    def longest_prefix(self, chain):
        n = 0
        for k in chain:
            if k not in self.d:
                break
            n += 1
        return n

    def __len__(self):
        return len(self.d)

    def flush(self):
        self.durable = (dict(self.d), self.seq)
        self.flushes += 1

    def close(self):
        self.flush()

    def stats(self):
        return None

    def get_applied_seq(self):
        return self.seq

    def set_applied_seq(self, s):
        assert s >= 0
        self.seq = s


def materialise(state: CrashState, path: str) -> None:
    """Write a crash state into a real directory (for debugging, or to run the
    real OsFileSystem on it); ``path`` stands for the simulated "/"."""
    import os

    for d in state.dirs:
        os.makedirs(path + d, exist_ok=True)
    for p, data in state.files:
        with open(path + p, "wb") as f:
            f.write(data)
