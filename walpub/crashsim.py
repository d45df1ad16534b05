"""The crash-simulating twin of the I/O layer, and the crash-state explorer.

:class:`SimFileSystem` is an in-memory file system implementing
:class:`walpub.io.FileSystem`.  Besides the state a process sees, it keeps what
is *durable* and, per file and per directory, the list of mutations made since
that file or directory was last fsynced.  After every mutating call it can
record a :class:`CrashPoint`; :func:`crash_states` turns a point into the
on-disk states a power loss there could leave (the model, after ALICE/OSDI'14
and CrashMonkey):

* a file's data is durable only through fsync of that file; un-fsynced writes
  and truncates persist as any *prefix* of the sequence, the first lost write
  optionally torn (half of it, or its second half zeros or junk);
* a name (create, mkdir, rename, unlink) is durable only through fsync of its
  directory; un-synced directory operations persist per directory as any
  prefix, plus every single op alone, every all-but-one, and a seeded sample of
  other subsets; a cross-directory rename is two ops (link in the target,
  unlink in the source) that persist independently, and a hard link
  (``link``) is one such link op: a second name for the same inode;
* what a directory entry points to after the crash is the inode's durable data
  plus the chosen pending ops; unreachable inodes vanish.

Not modelled: reordering of ops *across* different files' data beyond the
independence above, block-granular tearing inside one write other than the
three variants, metadata like mtime/permissions, media errors (see the bit-flip
campaign), and the page cache surviving a process kill (SimFileSystem.clone()
gives that: keep the volatile view, keep the pending lists).

:func:`explore` runs a workload under recording, builds every crash state of
every point (bounded per point), recovers each with a fresh Volume and checks
the five invariants of docs/WALPUB.md, returning an :class:`ExploreResult`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import posixpath
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from quiver.walpub.errors import CorruptObjectError, ObjectNotFoundError, WalpubError
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
            data = bytes(data)
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
            return _walk(self._entries, lambda ino: bytes(self._data[ino]), self._kind)

    def durable_state(self) -> CrashState:
        """Only what is fsynced: the harshest crash state now."""
        with self._mu:
            return _walk(self._dur_entries, lambda ino: self._dur_data.get(ino, b""), self._kind)

    def last_point(self) -> CrashPoint:
        with self._mu:
            return CrashPoint(self.n_ops, "now", self._dur_data, self._dur_entries,
                              dict(self._pend_data), dict(self._pend_dir))

    @property
    def kinds(self) -> dict[int, str]:
        return self._kind


def _walk(entries: dict[int, dict[str, int]], data_of: Callable[[int], bytes], kind: dict[int, str]) -> CrashState:
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


# ============================================================== crash states
def _junk(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _file_options(ops: tuple) -> list[tuple]:
    """Choices for one file's pending data ops: ("prefix", j) or ("torn", j, variant)."""
    out = [("prefix", j) for j in range(len(ops) + 1)]
    for j, op in enumerate(ops):
        if op[0] == "write" and len(op[2]) >= 2:
            out += [("torn", j, "half"), ("torn", j, "zeros"), ("torn", j, "junk")]
    return out


def _apply_data(base: bytes, ops: tuple, choice: tuple) -> bytes:
    buf = bytearray(base)
    n = choice[1]
    for op in ops[:n]:
        _apply_one(buf, op)
    if choice[0] == "torn":
        _, off, data = ops[n]
        half = len(data) // 2
        if choice[2] == "half":
            data = data[:half]
        elif choice[2] == "zeros":
            data = data[:half] + bytes(len(data) - half)
        else:
            data = data[:half] + _junk(len(data) - half, off + len(data))
        _apply_one(buf, ("write", off, data))
    return bytes(buf)


def _apply_one(buf: bytearray, op: tuple) -> None:
    if op[0] == "write":
        _, off, data = op
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(data)] = data
    else:
        del buf[op[1]:]


def _dir_options(ops: tuple, rng: random.Random, samples: int) -> list[tuple[int, ...]]:
    """Subsets (as sorted index tuples) of one directory's pending ops."""
    m = len(ops)
    opts = {tuple(range(j)) for j in range(m + 1)}           # every prefix
    if m >= 2:
        opts |= {(i,) for i in range(m)}                      # each op alone
    if m >= 3:
        opts |= {tuple(j for j in range(m) if j != i) for i in range(m)}  # all but one
    for _ in range(samples if m >= 3 else 0):
        opts.add(tuple(j for j in range(m) if rng.random() < 0.5))
    return sorted(opts, key=lambda t: (len(t), t))


def _apply_dir(base: dict, ops: tuple, subset: tuple[int, ...]) -> dict:
    d = dict(base)
    for i in subset:
        op = ops[i]
        if op[0] == "link":
            d[op[1]] = op[2]
        elif op[0] == "unlink":
            d.pop(op[1], None)
        else:
            _, src, dst, ino = op
            if d.get(src) == ino:
                del d[src]
            d[dst] = ino
    return d


def crash_states(point: CrashPoint, kinds: dict[int, str], *, max_states: int = 64,
                 seed: int = 0, subset_samples: int = 3) -> list[CrashState]:
    """The on-disk states a power loss at ``point`` may leave (bounded sample).

    Full product of per-file and per-directory choices when it has at most
    ``max_states`` members; otherwise: nothing pending persisted, everything
    persisted, each single choice against both of those, then seeded random
    combinations up to ``max_states``."""
    rng = random.Random(seed * 1_000_003 + point.n_ops)
    comps: list[tuple[str, int, list]] = []
    for ino, ops in sorted(point.pend_data.items()):
        comps.append(("f", ino, _file_options(ops)))
    for ino, ops in sorted(point.pend_dir.items()):
        comps.append(("d", ino, _dir_options(ops, rng, subset_samples)))
    total = 1
    for c in comps:
        total *= len(c[2])
        if total > max_states:
            break
    if total <= max_states:
        combos = list(itertools.product(*[range(len(c[2])) for c in comps]))
    else:
        lo = tuple(0 for _ in comps)
        hi = tuple(_full_index(c) for c in comps)
        chosen = {lo: None, hi: None}
        # Round-robin over components, fewest options first, so that every
        # component gets its first choices varied before any gets its last.
        order = sorted(range(len(comps)), key=lambda i: len(comps[i][2]))
        widest = max(len(c[2]) for c in comps)
        for j in range(widest):
            for i in order:
                if j >= len(comps[i][2]):
                    continue
                for base in (hi, lo):
                    chosen[base[:i] + (j,) + base[i + 1 :]] = None
            if len(chosen) >= max_states:
                break
        # Bounded: at most 4 * max_states draws.
        for _ in range(4 * max_states):
            if len(chosen) >= max_states:
                break
            chosen[tuple(rng.randrange(len(c[2])) for c in comps)] = None
        combos = list(chosen)[:max_states]
    out, seen = [], set()
    for combo in combos:
        st = _build(point, kinds, comps, combo)
        dg = st.digest()
        if dg not in seen:
            seen.add(dg)
            out.append(st)
    return out


def _full_index(comp) -> int:
    kind, _ino, opts = comp
    if kind == "f":
        return opts.index(("prefix", max(o[1] for o in opts if o[0] == "prefix")))
    return max(range(len(opts)), key=lambda i: len(opts[i]))


def _build(point: CrashPoint, kinds, comps, combo) -> CrashState:
    entries = dict(point.dur_entries)
    data_over: dict[int, bytes] = {}
    for (kind, ino, opts), j in zip(comps, combo):
        if kind == "f":
            data_over[ino] = _apply_data(point.dur_data.get(ino, b""), point.pend_data[ino], opts[j])
        else:
            entries[ino] = _apply_dir(point.dur_entries.get(ino, {}), point.pend_dir[ino], opts[j])

    def data_of(ino: int) -> bytes:
        if ino in data_over:
            return data_over[ino]
        return point.dur_data.get(ino, b"")

    return _walk(entries, data_of, kinds)


def materialise(state: CrashState, path: str) -> None:
    """Write a crash state into a real directory (for debugging, or to run the
    real OsFileSystem on it); ``path`` stands for the simulated "/"."""
    import os

    for d in state.dirs:
        os.makedirs(path + d, exist_ok=True)
    for p, data in state.files:
        with open(path + p, "wb") as f:
            f.write(data)


# ============================================================== expectations
class Tracker:
    """Records what a workload was told (acknowledgements) against the op count.

    Use ``tracker.publish(vol, key, data)`` etc. (or pass ``tracker.observer`` to
    the Volume so its internal deletes and evictions are seen)."""

    def __init__(self, sim: SimFileSystem):
        self.sim = sim
        self.data: dict[bytes, bytes] = {}

    def observer(self, event: str, keys: list[bytes]) -> None:
        kind = "del_begin" if event == "delete_begin" else "del_ack"
        for k in keys:
            self.sim.mark((kind, k))

    def publish(self, vol, key: bytes, data: bytes) -> bool:
        return self.publish_many(vol, [(key, data)])[0]

    def publish_many(self, vol, items) -> list[bool]:
        items = [(k, bytes(d)) for k, d in items]
        for k, d in items:
            assert self.data.setdefault(k, d) == d, "content-addressed: one key, one content"
            self.sim.mark(("pub_begin", k))
        res = vol.publish_many(items)
        for k, _ in items:
            self.sim.mark(("pub_ack", k))
        return res

    def expectations(self, n_ops: int) -> "Expect":
        state: dict[bytes, str] = {}
        for pos, event in self.sim.marks:
            if pos > n_ops:
                break
            ev, key = event
            if ev not in ("pub_begin", "pub_ack", "del_begin", "del_ack"):
                continue
            cur = state.get(key, "absent")
            if ev == "pub_begin":
                state[key] = cur if cur == "acked" else "pub"
            elif ev == "pub_ack":
                # A no-op publish of a key being deleted acknowledges nothing new.
                state[key] = cur if cur == "del" else "acked"
            elif ev == "del_begin":
                state[key] = "del"
            else:
                state[key] = "deleted"
        must = {k: self.data[k] for k, s in state.items() if s == "acked"}
        may = {k: self.data[k] for k, s in state.items() if s in ("pub", "del")}
        gone = {k for k, s in state.items() if s == "deleted"}
        return Expect(must, may, gone)


@dataclass
class Expect:
    must: dict[bytes, bytes]    # acknowledged and no delete started: readable, exact
    may: dict[bytes, bytes]     # in flight: absent, or exact
    gone: set[bytes]            # acknowledged deletes: absent


# ============================================================== checking
@dataclass
class Violation:
    invariant: str
    detail: str
    n_ops: int = -1
    desc: str = ""

    def __str__(self) -> str:
        return f"[{self.invariant}] after op {self.n_ops} ({self.desc}): {self.detail}"


@dataclass
class ExploreResult:
    points: int = 0
    states: int = 0              # crash states built (distinct per point)
    distinct: int = 0            # distinct on-disk states over the whole run
    checked: int = 0             # (state, expectations) pairs recovered and checked
    recovery_crash_states: int = 0
    violations: list[Violation] = field(default_factory=list)
    fsyncs: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


ROOT_PATH = "/vol"


def logical_view(vol) -> dict[bytes, bytes]:
    """Every live key and its bytes as read through the volume."""
    out = {}
    for key in sorted(vol.keys()):
        try:
            out[key] = vol.read(key)
        except WalpubError as exc:
            out[key] = repr(type(exc)).encode()
    return out


def check_recovered(vol, sim: SimFileSystem, root: str = ROOT_PATH) -> list[Violation]:
    """Invariants 3 and 4 on a freshly recovered volume (before any read)."""
    from quiver.walpub.volume import iter_object_files, object_relpath, unpack_index_value

    v: list[Violation] = []
    live = set(vol.keys())
    for key, val in vol._records():
        length = unpack_index_value(key, val)[0]
        path = f"{root}/{object_relpath(key)}"
        if not sim.exists(path) or sim.file_size(path) != length:
            v.append(Violation("3-no-dangling-index", f"index entry {key.hex()} has no intact object"))
    if len(vol) != len(live):
        v.append(Violation("3-no-dangling-index", f"the volume counts {len(vol)} live, its index holds {len(live)}"))
    tmp = sim.listdir(f"{root}/tmp")
    if tmp:
        v.append(Violation("4-no-garbage", f"tmp/ not empty: {tmp}"))
    files = list(iter_object_files(sim, root))
    stray = [p for p, k in files if k is None or k not in live]
    if stray:
        v.append(Violation("4-no-garbage", f"orphan objects: {stray[:3]}"))
    missing = live - {k for _, k in files}
    if missing:
        v.append(Violation("3-no-dangling-index", f"live keys without object: {len(missing)}"))
    return v


def check_reads(vol, expect: Expect) -> list[Violation]:
    """Invariants 1 and 2: acknowledged blocks exact; nothing else wrong or back."""
    v: list[Violation] = []
    for key, data in expect.must.items():
        try:
            got = vol.read(key)
        except (ObjectNotFoundError, CorruptObjectError) as exc:
            v.append(Violation("1-acked-readable", f"{key.hex()[:16]}: {type(exc).__name__}"))
            continue
        if got != data:
            v.append(Violation("2-no-bad-bytes", f"{key.hex()[:16]} returned wrong bytes"))
    for key, data in expect.may.items():
        try:
            got = vol.read(key)
        except (ObjectNotFoundError, CorruptObjectError):
            continue
        if got != data:
            v.append(Violation("2-no-bad-bytes", f"in-flight {key.hex()[:16]} returned wrong bytes"))
    for key in vol.keys():
        if key not in expect.must and key not in expect.may:
            why = "deleted key came back" if key in expect.gone else "never-published key present"
            v.append(Violation("1-acked-readable", f"{key.hex()[:16]}: {why}"))
    return v


def check_state(state: CrashState, expect: Expect, *, volume_kwargs: dict | None = None,
                idempotence: bool = True, continue_after: bool = True,
                recovery_crashes: int = 0, max_states: int = 16, seed: int = 0,
                root: str = ROOT_PATH, index_factory: Callable[[], object] | None = None,
                ) -> tuple[list[Violation], int]:
    """Recover ``state`` and check the five invariants (plus, optionally, that a
    publish after recovery survives the next recovery).

    ``recovery_crashes`` > 0 also crashes the recovery itself at up to that many
    of its op boundaries (``max_states`` states each) and checks that recovering
    from each gives the same logical state.  Returns (violations, recovery crash
    states explored)."""
    from quiver.walpub.volume import Volume

    kw = dict(volume_kwargs or {})
    if index_factory is not None:
        kw["index"] = index_factory()   # one persistent index per simulated machine
    sim = SimFileSystem(state)
    if recovery_crashes:
        sim.start_recording()
    try:
        vol = Volume(root, io=sim, **kw)
    except Exception as exc:  # noqa: BLE001 - any failure to recover is the finding
        return [Violation("5-recovery", f"recovery raised {type(exc).__name__}: {exc}")], 0
    sim.recording = False
    v = check_recovered(vol, sim, root)
    after1 = sim.snapshot()
    view1 = logical_view(vol) if (idempotence or recovery_crashes) else None
    vol.close()
    explored = 0
    if idempotence:
        vol2 = Volume(root, io=sim, **kw)
        if sim.snapshot() != after1:
            v.append(Violation("5-idempotent", "a second recovery changed the files"))
        if logical_view(vol2) != view1:
            v.append(Violation("5-idempotent", "a second recovery changed the contents"))
        vol2.close()
    if recovery_crashes:
        pts = sim.points[1:]
        step = max(1, len(pts) // recovery_crashes)
        for pt in pts[::step][:recovery_crashes]:
            for st in crash_states(pt, sim.kinds, max_states=max_states, seed=seed):
                explored += 1
                s2 = SimFileSystem(st)
                kw2 = dict(kw, index=index_factory()) if index_factory is not None else kw
                try:
                    vr = Volume(root, io=s2, **kw2)
                except Exception as exc:  # noqa: BLE001
                    v.append(Violation("5-recovery-crash", f"re-recovery raised {exc!r}"))
                    continue
                v += check_recovered(vr, s2, root)
                if logical_view(vr) != view1:
                    v.append(Violation("5-recovery-crash",
                                       f"crash in recovery at op {pt.n_ops} ({pt.desc}) changed the result"))
                vr.close()
    vol = Volume(root, io=sim, **kw)
    v += check_reads(vol, expect)
    kw["capacity_bytes"] = None  # the probe must not evict what is being checked
    if continue_after:
        vol.close()
        vol = Volume(root, io=sim, **kw)
        probe = b"\xfe" * 31 + bytes([len(vol) % 251])
        data = b"after-recovery:" + probe
        try:
            if probe not in expect.must and probe not in expect.may:
                vol.publish(probe, data)
                vol.close()
                # A power loss now keeps exactly what was fsynced.
                s3 = SimFileSystem(sim.durable_state())
                if index_factory is not None:
                    kw["index"] = kw["index"].after_crash()
                vol = Volume(root, io=s3, **kw)
                try:
                    if vol.read(probe) != data:
                        v.append(Violation("1-acked-readable", "post-recovery publish read back wrong"))
                except WalpubError as exc:
                    v.append(Violation("1-acked-readable", f"post-recovery publish lost: {type(exc).__name__}"))
                v += check_reads(vol, Expect(dict(expect.must), {**expect.may, probe: data}, expect.gone))
        except WalpubError as exc:
            v.append(Violation("1-acked-readable", f"publish after recovery failed: {exc!r}"))
    vol.close()
    return v, explored


def explore(workload: Callable[[SimFileSystem, Tracker], None], *, volume_kwargs: dict | None = None,
            disabled_fsyncs: tuple[str, ...] = (), max_states_per_point: int = 32,
            point_stride: int = 1, idempotence_every: int = 1, continue_every: int = 1,
            recovery_crash_every: int = 0, recovery_crash_points: int = 6,
            stop_after: int | None = None, seed: int = 0,
            index_at: Callable[[int], tuple[object, Callable[[], object]]] | None = None) -> ExploreResult:
    """Run ``workload(sim, tracker)`` on a recording SimFileSystem, then check
    every crash state of every ``point_stride``-th op boundary.

    ``disabled_fsyncs`` plants bugs during the workload only (recovery runs
    correct).  ``stop_after``: stop at that many violations (bug hunts).
    ``index_at(n_ops)``: (version, factory) of the persistent index as a crash
    after op n_ops leaves it (see PersistentIndexTwin); default: memory-only
    "flat".  ``version`` (hashable) tells states apart for de-duplication."""
    sim = SimFileSystem()
    sim.disabled_fsyncs = set(disabled_fsyncs)
    tracker = Tracker(sim)
    sim.start_recording()
    workload(sim, tracker)
    sim.recording = False
    res = ExploreResult(points=len(sim.points), fsyncs=dict(sim.fsync_counts))
    digests: set[bytes] = set()
    checked: set = set()
    kw = dict(volume_kwargs or {})
    kw.pop("observer", None)
    k = 0
    for pt in sim.points[::point_stride]:
        expect = tracker.expectations(pt.n_ops)
        ekey = (frozenset(expect.must), frozenset(expect.may), frozenset(expect.gone))
        factory = None
        if index_at is not None:
            version, factory = index_at(pt.n_ops)
            ekey = (ekey, version)
        for st in crash_states(pt, sim.kinds, max_states=max_states_per_point, seed=seed):
            res.states += 1
            dg = st.digest()
            digests.add(dg)
            ck = (dg, ekey)
            if ck in checked:
                continue  # same bytes, same expectations: checked already
            checked.add(ck)
            res.checked += 1
            k += 1
            vs, n = check_state(
                st, expect, volume_kwargs=kw,
                idempotence=(k % idempotence_every == 0),
                continue_after=(continue_every > 0 and k % continue_every == 0),
                recovery_crashes=(recovery_crash_points if recovery_crash_every and k % recovery_crash_every == 0 else 0),
                seed=seed, index_factory=factory,
            )
            res.recovery_crash_states += n
            for x in vs:
                x.n_ops, x.desc = pt.n_ops, pt.desc
            res.violations += vs
            if stop_after is not None and len(res.violations) >= stop_after:
                res.distinct = len(digests)
                return res
    res.distinct = len(digests)
    return res


def states_iter(sim: SimFileSystem, **kw) -> Iterator[tuple[CrashPoint, CrashState]]:
    """Every (point, state) of a recorded SimFileSystem, for custom campaigns."""
    for pt in sim.points:
        for st in crash_states(pt, sim.kinds, **kw):
            yield pt, st


def explore_kill(workload: Callable[[SimFileSystem, Tracker], None], *, volume_kwargs: dict | None = None,
                 kill_stride: int = 1, max_states_per_point: int = 16,
                 next_disabled_fsyncs: tuple[str, ...] = (), seed: int = 0, kill_from: int = 0,
                 root: str = ROOT_PATH, stop_after: int | None = None) -> ExploreResult:
    """SIGKILL, then power loss: kill the workload after op n (for every
    ``kill_stride``-th n), run the next process on the surviving page cache
    (recovery + one publish), then cut the power at every op of that second
    process.  Catches a recovery that builds on what the dead process left
    un-fsynced.  ``next_disabled_fsyncs`` plants bugs in the second process."""
    from quiver.walpub.volume import Volume

    kw = dict(volume_kwargs or {})
    kw.pop("observer", None)
    probe, pdata = b"\xfd" * 32, b"second process"
    # Count the workload's ops once.
    base = SimFileSystem()
    workload(base, Tracker(base))
    res = ExploreResult()
    checked: set = set()
    for n in range(kill_from, base.n_ops, kill_stride):
        a = SimFileSystem()
        a.kill_at = n
        tr = Tracker(a)
        try:
            workload(a, tr)
        except SimulatedKill:
            pass
        b = a.clone()
        b.disabled_fsyncs = set(next_disabled_fsyncs)
        b.start_recording()
        acked_before = tr.expectations(a.n_ops)
        try:
            vol = Volume(root, io=b, **kw)
            b.mark(("pub_begin", probe))
            vol.publish(probe, pdata)
            b.mark(("pub_ack", probe))
            vol.close()
        except WalpubError as exc:
            res.violations.append(Violation("5-recovery", f"second process failed: {exc!r}", n, "kill"))
            continue
        b.recording = False
        res.points += len(b.points)
        acked_probe_at = next(pos for pos, ev in b.marks if ev == ("pub_ack", probe))
        for pt in b.points:
            must = dict(acked_before.must)
            may = dict(acked_before.may)
            if pt.n_ops >= acked_probe_at:
                must[probe] = pdata
            else:
                may[probe] = pdata
            expect = Expect(must, may, set(acked_before.gone))
            for st in crash_states(pt, b.kinds, max_states=max_states_per_point, seed=seed):
                res.states += 1
                key = (st.digest(), frozenset(must), frozenset(may))
                if key in checked:
                    continue
                checked.add(key)
                res.checked += 1
                vs, _ = check_state(st, expect, volume_kwargs=kw, idempotence=False,
                                    continue_after=False, root=root)
                for x in vs:
                    x.n_ops, x.desc = n, f"killed after op {n}; power lost at op {pt.n_ops} ({pt.desc})"
                res.violations += vs
                if stop_after is not None and len(res.violations) >= stop_after:
                    res.distinct = len({c[0] for c in checked})
                    return res
    res.distinct = len({c[0] for c in checked})
    return res
