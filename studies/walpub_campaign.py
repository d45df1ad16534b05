"""walpub crash campaigns on the real file system: SIGKILL, torn tails, bit flips.

Shared by ``tests/test_walpub_kill.py``, ``tests/test_walpub_bitflip.py`` (small
counts) and ``studies/bench_walpub.py`` (the campaign figures).  Three parts:

* **SIGKILL** (``kill_campaign``).  A child process (``python -m
  studies.walpub_campaign child ...``) opens a Volume and runs several publisher
  threads with deletes and evictions.  It writes one line per event to its stdout
  pipe: ``B key`` before a publish starts, ``P key crc`` only after ``publish``
  has returned, ``DB key`` / ``DD key`` from the Volume observer when a delete
  (or eviction) begins / is done.  Each line is one ``os.write`` of less than
  PIPE_BUF bytes, so lines never interleave.  The parent kills the child with
  SIGKILL after a random number of lines, or the child kills itself at a named
  crash point (its ``--crashpoint`` argument, which it arms with the test-only
  walpub.volume.arm_crash_point; see walpub.volume.CRASH_POINTS),
  sometimes inside the recovery of a second child.  Sometimes the parent then
  tears the WAL tail (appends a partial frame, zeros or junk: what a torn
  in-flight append leaves).  Then it recovers in-process and checks the five
  invariants against the acknowledgements (``check_volume``).  The volume
  carries over from round to round.
* **Bit flips** (``bitflip_campaign``).  Single-bit flips in the objects and the
  WAL segments of a real volume; every flip is classified.
* **Crash states** (``explore_campaign``): the enumeration explorer of
  walpub.crash_check.explore on random workloads, until a number of distinct states.

Block contents are a function of the key (``block_data``), so the parent can
check bytes without the child sending them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from quiver.walpub import CorruptObjectError, ObjectNotFoundError, OsFileSystem, Volume
from quiver.walpub import wal as walmod
from quiver.walpub.crash_check import Expect, check_reads, check_recovered, explore
from quiver.walpub.volume import CRASH_POINTS, CRASHPOINT_ENV, arm_crash_point, object_relpath
from quiver.walpub.checksum import crc32c

REPO_ROOT = Path(__file__).resolve().parent.parent
WALPUB_BACKENDS = ("flat", "sorted", "lmdb", "lsm", "art")
LOAD_POINTS = [p for p in CRASH_POINTS if not p.startswith("recover.")]
RECOVER_POINTS = [p for p in CRASH_POINTS if p.startswith("recover.")]


def walpub_backends() -> list[str]:
    """The index backends walpub can use that import on this machine."""
    from quiver import index_backends
    return [b for b in WALPUB_BACKENDS if b in index_backends.available()]


# ------------------------------------------------------------------ blocks
def make_key(tag: str, i: int) -> bytes:
    return hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=32).digest()


def block_length(key: bytes, lo: int, hi: int) -> int:
    return lo + int.from_bytes(key[:4], "little") % (hi - lo + 1)


def block_data(key: bytes, length: int) -> bytes:
    """Deterministic bytes of a block: the key's BLAKE2b stream, cut to length."""
    seed = hashlib.blake2b(key, digest_size=64).digest()
    reps = -(-length // len(seed))
    return (seed * reps)[:length]


# ------------------------------------------------------------------ the child
def child_main(argv: list[str]) -> int:
    # Long because it declares the child's flags and its one straight-line
    # protocol (open, report each publish on the pipe, die); nothing repeats.
    ap = argparse.ArgumentParser(prog="walpub_campaign child")
    ap.add_argument("--root", required=True)
    ap.add_argument("--backend", default="flat")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--ops", type=int, default=400, help="publishes per thread at most")
    ap.add_argument("--lo", type=int, default=1)
    ap.add_argument("--hi", type=int, default=8192)
    ap.add_argument("--delete-p", type=float, default=0.35)
    ap.add_argument("--batch-p", type=float, default=0.2, help="chance a publish is a publish_many of 3")
    ap.add_argument("--capacity", type=int, default=1 << 20)
    ap.add_argument("--segment-bytes", type=int, default=8192)
    ap.add_argument("--compact-min", type=int, default=64)
    ap.add_argument("--recover-only", action="store_true", help="open (recover) and exit")
    ap.add_argument("--crashpoint", default=None, metavar="POINT[@N]",
                    help="arm this walpub crash point (walpub.volume.CRASH_POINTS) before opening the volume")
    a = ap.parse_args(argv)
    if a.crashpoint:
        arm_crash_point(a.crashpoint)  # ValueError (exit 1) for an unknown point

    out_lock = threading.Lock()

    def emit(line: str) -> None:
        b = (line + "\n").encode()
        assert len(b) < 512  # atomic on a pipe (PIPE_BUF >= 512)
        with out_lock:
            os.write(1, b)

    def observer(event: str, keys: list[bytes]) -> None:
        tag = "DB" if event == "delete_begin" else "DD"
        for k in keys:
            emit(f"{tag} {k.hex()}")

    vol = Volume(a.root, index=a.backend, observer=observer, capacity_bytes=a.capacity,
                 segment_bytes=a.segment_bytes, compact_min_records=a.compact_min)
    emit(f"OPEN {vol.last_recovery.index_mode} {vol.last_recovery.live}")
    if a.recover_only:
        vol.close()
        emit("END")
        return 0
    pool = list(vol.keys())            # keys fully published: the only ones deleted
    pool_lock = threading.Lock()
    counter = iter(range(10**9))
    errors: list[str] = []

    def worker(t: int) -> None:
        rng = random.Random(f"{a.tag}/{t}")
        try:
            for _ in range(a.ops):
                n = 3 if rng.random() < a.batch_p else 1
                with pool_lock:
                    idx = [next(counter) for _ in range(n)]
                items = []
                for i in idx:
                    k = make_key(a.tag, i)
                    items.append((k, block_data(k, block_length(k, a.lo, a.hi))))
                    emit(f"B {k.hex()}")
                vol.publish_many(items)
                for k, d in items:
                    emit(f"P {k.hex()} {crc32c(d):08x}")
                with pool_lock:
                    pool.extend(k for k, _ in items)
                    victim = pool.pop(rng.randrange(len(pool))) if rng.random() < a.delete_p and pool else None
                if victim is not None:
                    vol.delete(victim)     # may be gone already (evicted): then a no-op
                if rng.random() < 0.1:
                    k, d = items[0]
                    try:
                        if vol.read(k) != d:
                            emit(f"X wrong bytes {k.hex()}")
                    except ObjectNotFoundError:
                        pass               # evicted meanwhile
        except Exception as exc:  # noqa: BLE001 - reported to the parent as a violation
            errors.append(repr(exc))
            emit(f"X {type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(a.threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    vol.close()
    emit("END")
    return 1 if errors else 0


# ------------------------------------------------------------------ parent side
@dataclass
class Events:
    """What the child said, per key, in pipe order."""

    begun: set = field(default_factory=set)
    acked: dict = field(default_factory=dict)       # key -> crc the child reported
    del_begun: set = field(default_factory=set)
    del_done: set = field(default_factory=set)
    errors: list = field(default_factory=list)
    opened: str | None = None
    ended: bool = False
    lines: int = 0

    def feed(self, line: str) -> None:
        self.lines += 1
        parts = line.split()
        if not parts:
            return
        tag = parts[0]
        if tag == "B":
            self.begun.add(bytes.fromhex(parts[1]))
        elif tag == "P":
            self.acked[bytes.fromhex(parts[1])] = int(parts[2], 16)
        elif tag == "DB":
            self.del_begun.add(bytes.fromhex(parts[1]))
        elif tag == "DD":
            self.del_done.add(bytes.fromhex(parts[1]))
        elif tag == "OPEN":
            self.opened = line
        elif tag == "END":
            self.ended = True
        elif tag == "X":
            self.errors.append(line)


def expectations(before: set, ev: Events, lo: int, hi: int) -> Expect:
    """must / may / gone after a crash, from the keys live before the child ran
    (all verified) and the child's events.  A key is published at most once."""
    def data(k: bytes) -> bytes:
        return block_data(k, block_length(k, lo, hi))

    must, may, gone = {}, {}, set()
    for k in before | ev.begun:
        if k in ev.del_done:
            gone.add(k)
        elif k in ev.del_begun:
            may[k] = data(k)
        elif k in before or k in ev.acked:
            must[k] = data(k)
        else:
            may[k] = data(k)
    return Expect(must, may, gone)


def tree_snapshot(root: str) -> dict[str, bytes]:
    """Every file under objects/, tmp/ and wal/ with its bytes' digest (the
    index backends' own files change on every open: RocksDB logs, LMDB meta)."""
    out = {}
    for sub in ("objects", "tmp", "wal"):
        base = os.path.join(root, sub)
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                p = os.path.join(dirpath, name)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = hashlib.blake2b(f.read(), digest_size=16).digest()
    return out


def index_view(vol) -> list:
    return sorted(vol.index.scan_prefix(vol.index_prefix))


def check_volume(root: str, backend: str, expect: Expect, *, verify: str = "crc") -> tuple[list[str], set, object]:
    """Recover the volume at ``root`` and check the invariants:
    3-4 on the fresh recovery, 5 (a second recovery changes no file, no content,
    no index entry), then 1-2 (reads against ``expect``).  Returns
    (violations, live keys afterwards, the first RecoveryReport)."""
    fs = OsFileSystem()
    v: list[str] = []
    try:
        vol = Volume(root, index=backend, verify_on_recover=verify)
    except Exception as exc:  # noqa: BLE001 - a recovery that raises is the finding
        return [f"5-recovery raised {exc!r}"], set(), None
    report = vol.last_recovery
    v += [str(x) for x in check_recovered(vol, fs, root)]
    snap1, keys1, idx1 = tree_snapshot(root), sorted(vol.keys()), index_view(vol)
    vol.close()
    vol = Volume(root, index=backend, verify_on_recover=verify)
    r2 = vol.last_recovery
    if tree_snapshot(root) != snap1:
        v.append("5-idempotent: a second recovery changed the files")
    if sorted(vol.keys()) != keys1 or index_view(vol) != idx1:
        v.append("5-idempotent: a second recovery changed the contents or the index")
    if r2.truncated or r2.dropped or r2.orphans_removed or r2.tmp_removed:
        v.append(f"5-idempotent: a second recovery repaired again: {r2}")
    v += [str(x) for x in check_reads(vol, expect)]
    live = set(vol.keys())
    vol.close()
    return v, live, report


def tear_tail(root: str, rng: random.Random) -> str:
    """Append to the last WAL segment what a torn in-flight append leaves:
    a prefix of a frame, zeros, or junk.  Returns the kind."""
    wal_dir = os.path.join(root, "wal")
    segs = sorted(n for n in os.listdir(wal_dir) if walmod.SEGMENT_RE.match(n))
    if not segs:
        return "none"
    kind = rng.choice(["partial", "zeros", "junk"])
    if kind == "partial":
        frame = walmod.encode(walmod.PutRecord(10**12, b"\x07" * 32, 5, 5))
        tail = frame[: rng.randrange(1, len(frame))]
    elif kind == "zeros":
        tail = bytes(rng.randrange(1, 200))
    else:
        tail = rng.randbytes(rng.randrange(1, 200))
    with open(os.path.join(wal_dir, segs[-1]), "ab") as f:
        f.write(tail)
    return kind


def _spawn(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(CRASHPOINT_ENV, None)  # arms nothing any more; would only log a warning
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "quiver.studies.walpub_campaign", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO_ROOT), env=env)


def run_child(args: list[str], *, crashpoint: str | None = None, kill_after_lines: int | None = None,
              rng: random.Random | None = None, timeout_s: float = 120.0) -> tuple[Events, int, str]:
    """Run one child; SIGKILL it after ``kill_after_lines`` lines (plus a random
    pause of up to 2 ms), or let a crash point kill it (``crashpoint``: passed
    to a ``child`` as ``--crashpoint``).  (events, returncode, stderr)."""
    if crashpoint:
        if not args or args[0] != "child":
            raise ValueError("a crash point can only be armed in a 'child' run")
        args = [*args, "--crashpoint", crashpoint]
    proc = _spawn(args)
    ev = Events()
    deadline = time.monotonic() + timeout_s
    try:
        for raw in proc.stdout:  # bounded: the child writes finitely many lines
            ev.feed(raw.decode())
            if kill_after_lines is not None and ev.lines >= kill_after_lines:
                time.sleep((rng or random).random() * 0.002)
                proc.send_signal(signal.SIGKILL)
                kill_after_lines = None      # the rest of the pipe is still read
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError("walpub child ran past its deadline")
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    return ev, rc, err


@dataclass
class KillStats:
    kills: int = 0                 # child processes that died of SIGKILL
    random_kills: int = 0
    point_kills: dict = field(default_factory=dict)   # crash point -> kills there
    recovery_kills: int = 0        # kills inside a child's recovery
    completed: int = 0             # children that finished before any kill
    tears: dict = field(default_factory=dict)
    acked: int = 0
    deletes_acked: int = 0
    checks: int = 0
    index_modes: dict = field(default_factory=dict)
    truncations: int = 0
    orphans_removed: int = 0
    tmp_removed: int = 0
    violations: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "violations"} | {
            "violations": len(self.violations)}


def default_schedule(rounds: int, offset: int = 0) -> list[str]:
    """Half the rounds a random kill, a quarter a named load point (in turn from
    ``offset``), a quarter a random kill followed by a kill inside the next
    recovery (recovery points in turn)."""
    out = []
    for r in range(rounds):
        if r % 4 == 3:
            out.append(RECOVER_POINTS[(r // 4 + offset) % len(RECOVER_POINTS)])
        elif r % 2 == 0:
            out.append("random")
        else:
            out.append(LOAD_POINTS[(r // 4 + offset) % len(LOAD_POINTS)])
    return out


def kill_campaign(workdir: str, backend: str, rounds: int, *, seed: int = 0, threads: int = 3,
                  ops: int = 300, lo: int = 1, hi: int = 8192, schedule: list[str] | None = None,
                  nth_max: int = 40, child_args: tuple = (), stats: KillStats | None = None) -> KillStats:
    """``rounds`` SIGKILL rounds on one volume with index ``backend``.

    ``schedule[r]`` says how round r's child dies: "random" (SIGKILL from the
    parent after a random number of lines), a load crash point (at a random
    passage up to ``nth_max``), or a recovery crash point (a random kill, then a
    second child killed inside its recovery).  Every third round the WAL tail is
    also torn.  Then the parent recovers and checks (``check_volume``)."""
    st = stats or KillStats()
    # Each backend starts the crash points at a different place.
    schedule = schedule or default_schedule(rounds, offset=WALPUB_BACKENDS.index(backend) * 3 + seed)
    assert len(schedule) == rounds and all(x == "random" or x in CRASH_POINTS for x in schedule)
    t0 = time.perf_counter()
    rng = random.Random(f"{seed}/{backend}")
    root = os.path.join(workdir, f"vol-{backend}")
    live: set = set()
    common = ["--root", root, "--backend", backend, "--threads", str(threads), "--ops", str(ops),
              "--lo", str(lo), "--hi", str(hi), *child_args]
    for r, how in enumerate(schedule):
        tag = f"{seed}/{backend}/{r}"
        args = ["child", *common, "--tag", tag]
        if how in LOAD_POINTS:
            nth = rng.randrange(1, 1 + (min(nth_max, 3) if how.startswith(("compact", "evict")) else nth_max))
            ev, rc, err = run_child(args, crashpoint=f"{how}@{nth}")
        else:
            ev, rc, err = run_child(args, kill_after_lines=rng.randrange(2, 120), rng=rng)
        if rc == -signal.SIGKILL:
            st.kills += 1
            if how in LOAD_POINTS:
                st.point_kills[how] = st.point_kills.get(how, 0) + 1
            else:
                st.random_kills += 1
        elif rc == 0 and ev.ended:
            st.completed += 1
        else:
            st.violations.append(f"{backend} round {r}: child exited {rc}: {err[-800:]}")
            break
        st.violations += [f"{backend} round {r}: child reported {e}" for e in ev.errors]
        for k, crc in ev.acked.items():
            if crc != crc32c(block_data(k, block_length(k, lo, hi))):
                st.violations.append(f"{backend} round {r}: child and parent disagree on {k.hex()[:16]}")
        st.acked += len(ev.acked)
        st.deletes_acked += len(ev.del_done)
        expect = expectations(live, ev, lo, hi)
        if r % 3 == 2:
            kind = tear_tail(root, rng)
            st.tears[kind] = st.tears.get(kind, 0) + 1
        if how in RECOVER_POINTS:   # crash the next process inside its recovery
            _ev2, rc2, err2 = run_child(["child", *common, "--tag", tag + "/r", "--recover-only"], crashpoint=how)
            if rc2 == -signal.SIGKILL:
                st.kills += 1
                st.recovery_kills += 1
                st.point_kills[how] = st.point_kills.get(how, 0) + 1
            elif rc2 != 0:
                st.violations.append(f"{backend} round {r}: recovering child exited {rc2}: {err2[-800:]}")
        vs, live, rep = check_volume(root, backend, expect)
        st.checks += 1
        if rep is not None:
            st.index_modes[rep.index_mode] = st.index_modes.get(rep.index_mode, 0) + 1
            st.truncations += len(rep.truncated)
            st.orphans_removed += rep.orphans_removed
            st.tmp_removed += rep.tmp_removed
        st.violations += [f"{backend} round {r} ({how}): {x}" for x in vs]
        if st.violations:
            break
    st.seconds += time.perf_counter() - t0
    return st


# ------------------------------------------------------------------ bit flips
@dataclass
class FlipStats:
    flips: int = 0
    object_flips: int = 0
    wal_flips: int = 0
    object_detected_at_recovery: int = 0   # verify "crc": record dropped at open
    object_detected_at_read: int = 0       # verify "size": CorruptObjectError on read
    wal_cut_lost_records: int = 0          # flipped frame skipped (or cut as the tail); its block lost
    wal_cut_no_loss: int = 0               # flipped frame skipped; it held no live record
    undetected_no_effect: int = 0          # flip changed nothing observable
    wrong_bytes_served: int = 0
    acked_blocks_lost: int = 0             # by WAL flips: the records in the flipped frame
    max_blocks_lost_per_flip: int = 0      # goal (issue 13): <= 1, the records in one frame
    violations: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "violations"} | {
            "violations": len(self.violations)}


def build_pristine(root: str, n: int, *, lo: int, hi: int, tag: str, segment_bytes: int,
                   delete_every: int = 0) -> dict[bytes, bytes]:
    """A closed volume with ``n`` published blocks (every ``delete_every``-th one
    deleted again); returns the live blocks."""
    data = {}
    with Volume(root, segment_bytes=segment_bytes, compact_min_records=10**9) as vol:
        for i in range(n):
            k = make_key(tag, i)
            d = block_data(k, block_length(k, lo, hi))
            vol.publish(k, d)
            data[k] = d
            if delete_every and i % delete_every == delete_every - 1:
                victim = make_key(tag, i - 1)
                vol.delete(victim)
                data.pop(victim)
    return data


def _flip(path: str, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        b = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([b ^ (1 << (bit % 8))]))


def _read_all(vol, data: dict[bytes, bytes], st: FlipStats) -> set:
    """Read every key of ``data``; wrong bytes are counted; returns the keys that
    raised CorruptObjectError."""
    corrupt = set()
    for k, d in data.items():
        try:
            got = vol.read(k)
        except CorruptObjectError:
            corrupt.add(k)
            continue
        except ObjectNotFoundError:
            continue
        if got != d:
            st.wrong_bytes_served += 1
            st.violations.append(f"wrong bytes served for {k.hex()[:16]}")
    return corrupt


def object_flip_batches(workdir: str, batches: int, n_objects: int, *, seed: int = 0,
                        st: FlipStats | None = None) -> FlipStats:
    """One random single-bit flip in every object of a copy of a pristine volume
    per batch (so ``batches * n_objects`` flips, each in its own object).  Even
    batches recover with verify="crc" (each flip must be a dropped record),
    odd ones with verify="size" (each must be a CorruptObjectError on read)."""
    st = st or FlipStats()
    t0 = time.perf_counter()
    rng = random.Random(seed)
    pristine = os.path.join(workdir, "pristine-objects")
    data = build_pristine(pristine, n_objects, lo=64, hi=4096, tag=f"flip-obj-{seed}", segment_bytes=1 << 20)
    for b in range(batches):
        root = os.path.join(workdir, f"objflip-{b}")
        shutil.copytree(pristine, root)
        for k, d in data.items():
            _flip(os.path.join(root, object_relpath(k)), rng.randrange(len(d) * 8))
        verify = "crc" if b % 2 == 0 else "size"
        with Volume(root, verify_on_recover=verify) as vol:
            dropped = {k: why for k, why in vol.last_recovery.dropped}
            if verify == "crc":
                bad = [k for k in data if dropped.get(k) != "bad crc"]
                st.object_detected_at_recovery += len(data) - len(bad)
                st.violations += [f"object flip not dropped at recovery: {k.hex()[:16]}" for k in bad]
                if len(vol):
                    st.violations.append(f"{len(vol)} objects live after every one was flipped")
                _read_all(vol, data, st)
            else:
                if dropped:
                    st.violations.append(f"verify=size dropped {len(dropped)} same-size objects")
                corrupt = _read_all(vol, data, st)
                st.object_detected_at_read += len(corrupt)
                st.violations += [f"object flip not detected on read: {k.hex()[:16]}"
                                  for k in data if k not in corrupt]
                again = _read_all(vol, data, st)   # dropped by the first read: misses now
                if again or len(vol):
                    st.violations.append("a corrupt object was still readable after its read failed")
        st.flips += len(data)
        st.object_flips += len(data)
        shutil.rmtree(root)
    shutil.rmtree(pristine)
    st.seconds += time.perf_counter() - t0
    return st


def _frames(wal_dir: str) -> list[tuple[str, int, int, object]]:
    """(segment name, start, end, record) of every frame, in replay order."""
    out = []
    for name in sorted(n for n in os.listdir(wal_dir) if walmod.SEGMENT_RE.match(n)):
        with open(os.path.join(wal_dir, name), "rb") as f:
            buf = f.read()
        recs, end, why = walmod.decode_frames(buf)
        assert why is None and end == len(buf), "pristine WAL must be clean"
        pos = 0
        for rec in recs:
            n = len(walmod.encode(rec))
            out.append((name, pos, pos + n, rec))
            pos += n
    return out


def _link_copy(src: str, dst: str) -> None:
    """Make ``dst`` a copy of the closed volume ``src``: objects as hard links
    (walpub never writes an object in place: recovery only unlinks), the WAL
    copied.  Files already in ``dst`` are removed first; its directories are
    kept (rmdir is the slowest call here, and the directory tree is the same)."""
    for dirpath, _dirs, files in os.walk(dst):
        for name in files:
            os.unlink(os.path.join(dirpath, name))
    for dirpath, _dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            a, b = os.path.join(dirpath, name), os.path.join(dst, rel, name)
            if rel.startswith("objects"):
                os.link(a, b)
            else:
                shutil.copyfile(a, b)


def wal_flips(workdir: str, flips: int, *, seed: int = 0, st: FlipStats | None = None) -> FlipStats:
    """``flips`` single-bit flips, each in its own copy of a small pristine volume
    with several WAL segments (PUTs and DELETEs).  Expected, per flip: recovery
    finds the frame holding the flipped bit (CRC32C finds every single-bit error;
    a flipped length is oversized, torn or fails the CRC) and skips it -- a
    damaged region when a valid frame follows, the torn tail (cut) when none
    does -- so the live set is the replay of every *other* frame, less keys
    whose objects a DELETE already unlinked.  One flip costs at most the one
    record in the damaged frame."""
    st = st or FlipStats()
    t0 = time.perf_counter()
    rng = random.Random(seed + 1)
    pristine = os.path.join(workdir, "pristine-wal")
    data = build_pristine(pristine, 24, lo=16, hi=256, tag=f"flip-wal-{seed}", segment_bytes=640, delete_every=4)
    frames = _frames(os.path.join(pristine, "wal"))
    total_bits = sum(e - s for _, s, e, _ in frames) * 8
    root = os.path.join(workdir, "walflip")
    for _ in range(flips):
        bit = rng.randrange(total_bits)
        for fi, (seg, s, e, _rec) in enumerate(frames):
            if bit < (e - s) * 8:
                break
            bit -= (e - s) * 8
        live: dict = {}
        for j, (_seg, _s, _e, rec) in enumerate(frames):
            if j == fi:
                continue  # the damaged frame: its record is the one thing lost
            if isinstance(rec, walmod.ResetRecord):
                live.clear()
            elif isinstance(rec, walmod.PutRecord):
                live[rec.key] = rec
            else:
                live.pop(rec.key, None)
        expected = {k for k in live if k in data}     # deleted: object unlinked
        _link_copy(pristine, root)
        _flip(os.path.join(root, "wal", seg), s * 8 + bit)
        with Volume(root) as vol:
            rep = vol.last_recovery
            found = [(x[0], x[1]) for x in rep.truncated] + [(x[0], x[1]) for x in rep.damaged]
            if (int(seg[:16]), s) not in found:
                if set(vol.keys()) == set(data):
                    st.undetected_no_effect += 1
                else:
                    st.violations.append(f"flip in {seg}@{s}: recovery found {found}")
            elif set(vol.keys()) != expected:
                st.violations.append(f"flip in {seg}@{s}: live set {len(vol)} != expected {len(expected)}")
            elif expected == set(data):
                st.wal_cut_no_loss += 1
            else:
                st.wal_cut_lost_records += 1
                lost = len(set(data) - expected)
                st.acked_blocks_lost += lost
                st.max_blocks_lost_per_flip = max(st.max_blocks_lost_per_flip, lost)
            corrupt = _read_all(vol, data, st)
            if corrupt:
                st.violations.append(f"WAL flip made {len(corrupt)} objects read as corrupt")
        st.flips += 1
        st.wal_flips += 1
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(pristine)
    st.seconds += time.perf_counter() - t0
    return st


def bitflip_campaign(workdir: str, *, object_batches: int, n_objects: int, wal_flip_count: int,
                     seed: int = 0) -> FlipStats:
    st = object_flip_batches(workdir, object_batches, n_objects, seed=seed)
    return wal_flips(workdir, wal_flip_count, seed=seed, st=st)


# ------------------------------------------------------------------ crash states (simulated)
def random_workload(seed: int, ops: int):
    """A random single- or multi-threaded workload for walpub.crash_check.explore."""
    def K(i: int) -> bytes:
        return make_key(f"sim-{seed}", i)

    def D(k: bytes) -> bytes:
        return block_data(k, block_length(k, 1, 96))

    def workload(sim, tr):
        rng = random.Random(seed)
        threaded = rng.random() < 0.3
        if threaded:
            sim.fsync_delay_s = 0.002
        vol = Volume("/vol", io=sim, observer=tr.observer, segment_bytes=rng.choice([192, 384, 4096]),
                     compact_min_records=rng.choice([8, 12, 10**6]),
                     # No eviction with threads: another thread could evict a key between
                     # its commit and the Tracker's ack mark, which the Tracker cannot order.
                     capacity_bytes=None if threaded else rng.choice([None, None, 300]))
        if threaded:
            def worker(t):
                for j in range(3):
                    k = K(100 * t + j)
                    tr.publish(vol, k, D(k))
            ths = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
        nxt = 0
        for _ in range(ops):
            x = rng.random()
            if x < 0.45 or not len(vol):
                k = K(nxt)
                nxt += 1
                tr.publish(vol, k, D(k))
            elif x < 0.6:
                ks = [K(nxt + j) for j in range(3)]
                nxt += 3
                tr.publish_many(vol, [(k, D(k)) for k in ks])
            elif x < 0.85:
                vol.delete(rng.choice(vol.keys()))
            elif x < 0.92:
                vol.compact()
            else:
                try:
                    vol.read(rng.choice(vol.keys()))
                except ObjectNotFoundError:
                    pass
        vol.close()
    return workload


def explore_campaign(min_distinct: int, *, seed: int = 0, ops: int = 10, max_states_per_point: int = 24,
                     time_budget_s: float | None = None) -> dict:
    """Explore random workloads until ``min_distinct`` distinct crash states
    (summed over workloads) were recovered and checked."""
    t0 = time.perf_counter()
    out = dict(workloads=0, points=0, states=0, distinct=0, checked=0, recovery_crash_states=0, violations=[])
    s = seed
    while out["distinct"] < min_distinct:
        r = explore(random_workload(s, ops), max_states_per_point=max_states_per_point, seed=s,
                    idempotence_every=3, continue_every=4, recovery_crash_every=40)
        out["workloads"] += 1
        for f in ("points", "states", "distinct", "checked", "recovery_crash_states"):
            out[f] += getattr(r, f)
        out["violations"] += [f"workload seed {s}: {v}" for v in r.violations]
        s += 1
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------ recovery-time child
def tail_main(argv: list[str]) -> int:
    """Open the volume (any recovery), publish ``count`` more blocks in batches,
    print how many, then SIGKILL itself: the state a crash under load leaves."""
    ap = argparse.ArgumentParser(prog="walpub_campaign tail")
    ap.add_argument("--root", required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, default=4096)
    a = ap.parse_args(argv)
    vol = Volume(a.root, index=a.backend, verify_on_recover="size")
    done = 0
    while done < a.count:
        n = min(64, a.count - done)
        keys = [make_key(a.tag, done + j) for j in range(n)]
        vol.publish_many([(k, (k * (a.size // 32 + 1))[: a.size]) for k in keys])
        done += n
    os.write(1, f"TAIL {done} {len(vol)}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("child", "tail"):
        print("usage: python -m quiver.studies.walpub_campaign child|tail ...", file=sys.stderr)
        return 2
    return child_main(argv[1:]) if argv[0] == "child" else tail_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
