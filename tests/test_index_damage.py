"""Damaged index files (issue 13, findings 2-4): every persistent backend, opened
on files that were truncated, bit-flipped or deleted, either raises a typed
IndexBackendError (IndexCorruptError where the damage is recognised) -- from the
open or from any later call -- or reads back only values that were written for
that key (or None).  Never a crash of the process (SIGBUS from a short LMDB
map, for one) and never a bare Exception.

The damaging trials run in a child process (this file, run as a script), which
prints one JSON line per trial; a trial that kills the child fails the test and
names the trial.  LMDB and RocksDB keep no per-record checksum, so a flipped bit
in a value can read back as a different value: those trials are counted
(``wrong_values``) and reported, not failed -- walpub's record CRC catches them.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from quiver import index_backends  # noqa: E402
from quiver.index_backends.errors import IndexBackendError, IndexCorruptError, IndexLockedError  # noqa: E402

N_RECORDS = 2000
N_FLIPS = 30
PAGE = 4096


def records() -> dict[bytes, bytes]:
    rng = random.Random(13)
    return {rng.randbytes(48): rng.randbytes(21) for _ in range(N_RECORDS)}


# -- child side ----------------------------------------------------------------


def build(backend: str, path: str, *, memtable_only: bool = False) -> None:
    """An index of N_RECORDS records at ``path``, flushed and closed.  With
    ``memtable_only`` (lsm) ``path`` is instead a copy taken while the DB was
    open after ``flush()``: the records live only in RocksDB's WAL, as after a
    crash (a clean close flushes the memtables to SST files)."""
    work = path + ".build" if memtable_only else path
    idx = index_backends.open(backend, work)
    recs = records()
    keys = list(recs)
    for i in range(0, len(keys), 500):
        part = keys[i : i + 500]
        idx.write_batch(part, [recs[k] for k in part], [], i // 500 + 1)
    idx.flush()
    if memtable_only:
        shutil.copytree(work, path)
    elif backend == "lsm":
        idx.flush_memtables()
    idx.close()


def main_files(backend: str, path: str, variant: str = "") -> list[str]:
    if backend == "lmdb":
        names = ["data.mdb"]
    elif backend == "art":
        names = ["art.snap"]
    elif variant == "wal":
        names = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.log"))]
    else:
        names = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.sst"))]
        names += [os.path.basename(p) for p in glob.glob(os.path.join(path, "MANIFEST-*"))]
    return sorted(names)


def flip(path: str, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def trials(backend: str, pristine: str, variant: str = "") -> list[tuple[str, callable]]:
    """(name, damage(dir)) pairs; names are stable across runs."""
    out = []
    files = main_files(backend, pristine, variant)
    sizes = {f: os.path.getsize(os.path.join(pristine, f)) for f in files}
    big = max(files, key=lambda f: sizes[f])

    def trunc(name, size):
        return lambda d: os.truncate(os.path.join(d, name), size)

    def unlink(*patterns):
        def go(d):
            for pat in patterns:
                for p in glob.glob(os.path.join(d, pat)):
                    os.unlink(p)
        return go

    if variant != "wal":
        n = sizes[big]
        for label, size in (("0", 0), ("100", 100), ("1page", PAGE), ("2pages", 2 * PAGE), ("half", n // 2),
                            ("minus1page", n - PAGE), ("minus1", n - 1)):
            if 0 <= size < n:
                out.append((f"truncate {big} to {label} ({size} B)", trunc(big, size)))
    # single-bit flips at fixed pseudo-random offsets across the main file(s)
    rng = random.Random(f"{backend}{variant}-flips")
    total = sum(sizes.values())
    for _ in range(N_FLIPS if variant != "wal" else 10):
        at = rng.randrange(total)
        bit = rng.randrange(8)
        for f in files:
            if at < sizes[f]:
                out.append((f"flip {f} byte {at} bit {bit}", lambda d, f=f, at=at, bit=bit: flip(os.path.join(d, f), at, bit)))
                break
            at -= sizes[f]
    if variant == "wal":
        return out
    if backend == "lmdb":
        out += [("delete data.mdb", unlink("data.mdb")), ("delete lock.mdb", unlink("lock.mdb")),
                ("delete both", unlink("*.mdb"))]
    elif backend == "lsm":
        small = min((f for f in files if f.endswith(".sst")), key=lambda f: sizes[f])
        manifest = [f for f in files if f.startswith("MANIFEST")][0]
        out += [("delete the largest SST", unlink(big)), ("delete the smallest SST", unlink(small)),
                ("delete MANIFEST", unlink("MANIFEST-*")), ("delete CURRENT", unlink("CURRENT")),
                ("truncate CURRENT to 0", trunc("CURRENT", 0)),
                ("truncate MANIFEST to half", trunc(manifest, sizes[manifest] // 2)),
                ("delete OPTIONS", unlink("OPTIONS-*")), ("delete the WAL", unlink("*.log")),
                ("delete every file", unlink("[0-9]*", "CURRENT", "MANIFEST-*", "OPTIONS-*", "IDENTITY", "LOG*"))]
    else:
        snap = os.path.join("{d}", "art.snap")

        def garbage(d):
            p = snap.format(d=d)
            with open(p, "wb") as f:
                f.write(random.Random(5).randbytes(sizes["art.snap"]))

        def grow(d):
            with open(snap.format(d=d), "ab") as f:
                f.write(b"\0" * 8)

        def to_tmp(d):
            os.rename(snap.format(d=d), snap.format(d=d) + ".tmp")

        out += [("garbage art.snap", garbage), ("art.snap 8 bytes too long", grow),
                ("delete art.snap", unlink("art.snap")), ("art.snap moved to art.snap.tmp", to_tmp)]
    return out


def read_all(backend: str, path: str, recs: dict[bytes, bytes]) -> dict:
    """Open and read everything; returns the outcome (typed error or counts)."""
    stage = "open"
    idx = None
    try:
        idx = index_backends.open(backend, path)
        stage = "get_many"
        keys = list(recs)
        got = idx.get_many(keys)
        stage = "get"
        got_one = [idx.get(k) for k in keys[:200]]
        stage = "scan_prefix"
        scanned = list(idx.scan_prefix(b""))
        stage = "longest_prefix"
        idx.longest_prefix(keys[:64])
        stage = "len"
        n = len(idx)
        stage = "get_applied_seq"
        seq = idx.get_applied_seq()
        stage = "close"
        idx.close()
    except IndexBackendError as exc:
        return {"outcome": "typed", "stage": stage, "error": type(exc).__name__,
                "corrupt": isinstance(exc, IndexCorruptError), "msg": str(exc)[:300]}
    except BaseException as exc:  # noqa: BLE001 - this is what the test is looking for
        return {"outcome": "untyped", "stage": stage, "error": type(exc).__name__, "msg": repr(exc)[:300]}
    finally:
        if idx is not None:
            try:
                idx.close()
            except BaseException:  # noqa: BLE001
                pass
    wrong = sum(1 for k, v in zip(keys, got) if v is not None and v != recs[k])
    wrong += sum(1 for k, v in zip(keys, got_one) if v is not None and v != recs[k])
    missing = sum(1 for v in got if v is None)
    phantom = sum(1 for k, _ in scanned if k not in recs)
    wrong_scan = sum(1 for k, v in scanned if k in recs and v != recs[k])
    return {"outcome": "read", "wrong_values": wrong, "wrong_scan_values": wrong_scan, "phantom_keys": phantom,
            "missing": missing, "len": n, "scanned": len(scanned), "applied_seq": seq}


def child(backend: str, work: str, variant: str = "") -> None:
    recs = records()
    pristine = os.path.join(work, "pristine")
    build(backend, pristine, memtable_only=variant == "wal")
    for name, damage in trials(backend, pristine, variant):
        print(json.dumps({"start": name}), flush=True)
        d = os.path.join(work, "trial")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(pristine, d)
        for lock in glob.glob(os.path.join(d, "QUIVER-INDEX.LOCK")):
            os.unlink(lock)
        damage(d)
        res = read_all(backend, d, recs)
        res["trial"] = name
        print(json.dumps(res), flush=True)
    print(json.dumps({"done": True}), flush=True)


# -- parent side ---------------------------------------------------------------

import pytest  # noqa: E402

PERSISTENT = [b for b in ("lmdb", "lsm", "art") if b in index_backends.available()]
CAMPAIGNS = [(b, "") for b in PERSISTENT] + ([("lsm", "wal")] if "lsm" in PERSISTENT else [])


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory):
    """Run every campaign at once (one child each) and parse their lines."""
    procs = {}
    for backend, variant in CAMPAIGNS:
        work = str(tmp_path_factory.mktemp(f"damage-{backend}{variant}"))
        procs[(backend, variant)] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), backend, work, variant],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        out[key] = (p.returncode, lines, stderr)
    return out


def results(campaigns, backend, variant=""):
    rc, lines, stderr = campaigns[(backend, variant)]
    last = [x["start"] for x in lines if "start" in x]
    assert rc == 0, f"{backend}{variant} child died (rc {rc}) during trial {last[-1] if last else None!r}:\n{stderr[-2000:]}"
    assert lines and lines[-1].get("done"), stderr[-2000:]
    return {x["trial"]: x for x in lines if "trial" in x}


@pytest.mark.parametrize("backend,variant", CAMPAIGNS, ids=[f"{b}{v and '-' + v}" for b, v in CAMPAIGNS])
def test_damage_is_typed_or_read_correctly(campaigns, backend, variant):
    res = results(campaigns, backend, variant)
    assert len(res) >= 10
    untyped = {t: r for t, r in res.items() if r["outcome"] == "untyped"}
    assert not untyped, untyped
    for t, r in res.items():
        if r["outcome"] == "read":
            # keys never written may appear only where a bit flip hit a key (no checksum: lmdb/lsm)
            assert backend != "art" or (r["wrong_values"] == r["phantom_keys"] == r["wrong_scan_values"] == 0), (t, r)
    wrong = {t: r for t, r in res.items() if r["outcome"] == "read"
             and (r["wrong_values"] or r["wrong_scan_values"] or r["phantom_keys"])}
    typed = sum(r["outcome"] == "typed" for r in res.values())
    print(f"\n{backend}{variant}: {len(res)} trials, {typed} typed errors, "
          f"{len(res) - typed - len(wrong)} reads with no wrong value, {len(wrong)} with silently wrong values/keys")
    for t, r in wrong.items():
        print(f"  {t}: wrong_values={r['wrong_values']} wrong_scan_values={r['wrong_scan_values']} "
              f"phantom_keys={r['phantom_keys']}")


def test_rocksdb_wal_damage_keeps_a_consistent_prefix(campaigns):
    """A bit flip in RocksDB's WAL (records not yet in SST files) makes recovery
    stop at the bad record (kPointInTimeRecovery): silent, but the index is a
    consistent prefix of the write_batch calls and applied_seq says which one,
    so walpub replays the rest from its own WAL."""
    if "lsm" not in PERSISTENT:
        pytest.skip("lsm unavailable")
    for t, r in results(campaigns, "lsm", "wal").items():
        if r["outcome"] == "read":
            assert r["len"] == r["scanned"] == 500 * r["applied_seq"] == N_RECORDS - r["missing"], (t, r)


def test_lmdb_truncation_is_corrupt_at_open(campaigns):
    """Finding 2: a truncated data.mdb is IndexCorruptError at open (it was SIGBUS)."""
    if "lmdb" not in PERSISTENT:
        pytest.skip("lmdb unavailable")
    res = results(campaigns, "lmdb")
    for label in ("0 (0 B)", "100 (100 B)", f"1page ({PAGE} B)", f"2pages ({2 * PAGE} B)"):
        r = res[f"truncate data.mdb to {label}"]
        assert r["outcome"] == "typed" and r["corrupt"] and r["stage"] == "open", r
    half = next(r for t, r in res.items() if t.startswith("truncate data.mdb to half"))
    assert half["outcome"] == "typed" and half["corrupt"] and half["stage"] == "open", half


def test_art_damage_is_corrupt_at_open(campaigns):
    """Finding 4: any damage to art.snap is ArtCorruptError (an IndexCorruptError) at open;
    a missing snapshot (even with a leftover .tmp) is an empty index."""
    if "art" not in PERSISTENT:
        pytest.skip("art unavailable")
    res = results(campaigns, "art")
    for t, r in res.items():
        if t in ("delete art.snap", "art.snap moved to art.snap.tmp"):
            assert r["outcome"] == "read" and r["len"] == 0 and r["missing"] == N_RECORDS, (t, r)
        else:
            assert r["outcome"] == "typed" and r["corrupt"] and r["stage"] == "open", (t, r)
            assert r["error"] == "ArtCorruptError", (t, r)


def test_lsm_damaged_files_are_corrupt(campaigns):
    """Finding 3: RocksDB damage is IndexCorruptError, never StoreLocked/bare Exception."""
    if "lsm" not in PERSISTENT:
        pytest.skip("lsm unavailable")
    res = results(campaigns, "lsm")
    must_be_corrupt = [t for t in res if t.startswith("truncate") and ".sst" in t] + [
        "delete the largest SST", "delete MANIFEST", "truncate CURRENT to 0"]
    for t in must_be_corrupt:
        r = res[t]
        assert r["outcome"] == "typed" and r["corrupt"], (t, r)
    for t, r in res.items():
        if r["outcome"] == "typed":
            assert r["error"] != "IndexLockedError", (t, r)


def test_rocksdb_status_classification():
    """The table maps RocksDB's status strings (as observed) to typed errors."""
    lsm = pytest.importorskip("quiver.index_backends.lsm")
    cases = {
        "IO error: While lock file: /x/LOCK: Resource temporarily unavailable": IndexLockedError,
        "IO error: lock hold by current process, acquire time 1 acquiring thread 2: /x/LOCK: No locks available":
            IndexLockedError,
        "Corruption: block checksum mismatch: stored(context removed) = 1, computed = 2, type = 4  in /x/9.sst "
        "offset 0 size 4058": IndexCorruptError,
        "IO error: No such file or directory: While opening a file for sequentially reading: /x/MANIFEST-000005: "
        "No such file or directory": IndexCorruptError,
        "IO error: No space left on device: While appending to file: /x/000008.log": IndexBackendError,
        "Invalid argument: Column families not opened: meta": IndexBackendError,
        # the old code called this "locked" because the text contains "lock"
        "Corruption: bad block contents in block lock": IndexCorruptError,
    }
    for msg, cls in cases.items():
        err = lsm._rocks_error(Exception(msg))
        assert type(err) is cls, (msg, err)


def test_rocksdb_own_lock_is_index_locked(tmp_path):
    """RocksDB's LOCK held (our DirLock free): in this process and from another,
    the open fails with IndexLockedError, and the raw strings are the ones the
    table knows."""
    lsm = pytest.importorskip("quiver.index_backends.lsm")
    rd = lsm.rd
    path = str(tmp_path / "rocks")
    index_backends.open("lsm", path).close()
    opts = rd.Options(raw_mode=True)
    holder = rd.Rdict(path, opts, column_families={"meta": rd.Options(raw_mode=True)})
    try:
        with pytest.raises(IndexLockedError):
            index_backends.open("lsm", path)
        with pytest.raises(Exception) as raw:
            rd.Rdict(path, rd.Options(raw_mode=True), column_families={"meta": rd.Options(raw_mode=True)})
        assert str(raw.value).startswith("IO error: lock hold by current process"), raw.value
        code = ("import sys; sys.path.insert(0, %r)\n"
                "from quiver import index_backends\n"
                "from quiver.index_backends.errors import IndexLockedError\n"
                "try:\n    index_backends.open('lsm', %r)\n"
                "except IndexLockedError as e:\n    print('LOCKED', e.__cause__)\n") % (ROOT, path)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("LOCKED IO error: While lock file: "), p.stdout + p.stderr
    finally:
        holder.close()
    index_backends.open("lsm", path).close()  # the lock is free again


def test_rocksdb_scan_reports_a_bad_block(tmp_path):
    """A scan that meets a bad block raises, instead of ending early as if the
    index had no more keys."""
    if "lsm" not in PERSISTENT:
        pytest.skip("lsm unavailable")
    path = str(tmp_path / "rocks")
    build("lsm", path)
    sst = max(glob.glob(os.path.join(path, "*.sst")), key=os.path.getsize)
    flip(sst, os.path.getsize(sst) // 3, 0)
    idx = index_backends.open("lsm", path)
    try:
        with pytest.raises(IndexCorruptError):
            list(idx.scan_prefix(b""))
    finally:
        idx.close()


def test_lmdb_short_free_tail_still_opens(tmp_path):
    """LMDB may leave data.mdb shorter than mm_last_pg when the last pages were
    allocated and freed in one transaction (never written).  That file is not
    damaged: it opens (the free tail is zero-filled) with every record."""
    if "lmdb" not in PERSISTENT:
        pytest.skip("lmdb unavailable")
    from quiver.index_backends.btree import check_data_file  # noqa: F401 - imported for the failure message

    path = str(tmp_path / "lm")
    rng = random.Random(0)
    live: list[bytes] = []
    idx = index_backends.open("lmdb", path, sync=False)
    for t in range(2):  # this sequence leaves the file one free page short on LMDB 0.9.x
        if rng.random() < 0.5 or not live:
            ks = [rng.randbytes(48) for _ in range(rng.randint(1, 200))]
            idx.write_batch(ks, [rng.randbytes(rng.choice([21, 21, 300, 5000])) for _ in ks], [], t + 1)
            live += ks
        else:
            rng.shuffle(live)
            k = rng.randint(1, min(len(live), 300))
            dels, live = live[:k], live[k:]
            idx.write_batch([], [], dels, t + 1)
    idx.close()
    idx = index_backends.open("lmdb", path)
    try:
        assert sorted(k for k, _ in idx.scan_prefix(b"")) == sorted(live)
        assert len(idx) == len(live)
    finally:
        idx.close()


if __name__ == "__main__":
    t0 = time.perf_counter()
    child(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2)}), file=sys.stderr)
