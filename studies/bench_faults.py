"""Faults beyond crashes, through ``BlockStore`` (issue 13).

Index-corruption campaign, per persistent backend (art, lmdb, lsm): one pristine
store of ``BLOCKS`` blocks (512-byte payloads, ``PROMPTS`` prompts), closed.
Each trial copies it, damages the index's files -- a single-bit flip at a
random offset of a random index file, a truncation at a random length, or the
deletion of a random index file -- then, in a child process (so that a SIGBUS
or SIGSEGV would be counted, not fatal; one long-lived child per campaign,
replaced if it dies), opens the store and gets every block.
Counted: opens that fail, blocks lost (a block that is not itself damaged and
no longer comes back), wrong bytes served, children that died, and how the
store healed (index files discarded at open, index rebuilt while open).
Goals: 0 blocks lost, 0 wrong bytes, 0 failed opens, 0 deaths.

WAL-flip campaign, through the store: each trial flips one random bit of the
L1 WAL (the index deleted too, so the whole log is replayed), reopens and gets
every block.  Goal: blocks lost per flip <= the records in the damaged frame
(1); with adoption (a verified envelope naming its key keeps its block) 0.

ENOSPC sweep (``faults-enospc``), on a real, small tmpfs mounted by the study
(``mount -t tmpfs -o size=N``, root only; where it cannot be mounted the row
records ``skipped`` and why -- no injected fault here, tests/test_store_faults.py
has that).  Per disk size and budget -- the default (``disk_bytes=None``: half
of free + held) and an explicit budget 4x the disk -- one store (default index)
is sent distinct 64 KiB blocks, one per put, until a put is refused or 2x (4x)
the disk has been offered; three more puts follow a refusal.  Counted: puts
acknowledged, typed (QuiverError) vs untyped errors from every call (open, put,
lookup, get, close), acknowledged blocks no longer readable after a reopen in
the same process (budget evictions counted apart), wrong bytes, reads served
after the refusal, the lock (every reopen is in the same process), and a reopen
with a quarter-disk budget: opens, frees space (tmpfs bytes used before/after),
takes a new put.  Goals: 0 untyped errors, 0 acknowledged blocks lost, 0 wrong
bytes, every reopen succeeds.

Hung L2 (``faults-l2``): the L2 endpoint is ``SilentServer`` below, a listening
socket on 127.0.0.1 written in this study (as tests/test_l2_hung.py's): it
accepts, reads and never answers.  For the "after-open" rows it first forwards
bytes to a real moto server (tests/s3servers.py) so the store opens with L2
attached, then goes silent (requests are read and dropped); "at-open" rows are
silent from the start.  Each row times BlockStore.open, lookups of unknown
prompts (an L1 miss: each asks L2 by HEAD), a sync put, ``flush_l2(timeout_s=2)``
and ``close(l2_timeout_s=2)``, with the breaker as configured by default
(``BreakerPolicy()``: opens after 3 failed tries) and effectively disabled
(``BreakerPolicy(failures=10**9)``: never opens on failures).  Open's own L2
check trips the breaker whatever ``failures`` says (engine/store.py
``_l2_attach``), so the "at-open" rows are the same with it "off"; the rows
where "off" differs are "after-open".  RetryPolicy for every row (to bound the
test): 3 tries, 3 s per operation, connect 0.5 s, read 1 s; lookups have the
store's own 1 s L2 budget (``BlockStore.L2_LOOKUP_TIMEOUT_S``).  Index ``flat``
(the L2 path does not depend on it).  Goals: open succeeds; a lookup adds
<= 50 ms while L2 is down (breaker open).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from quiver import index_backends
from quiver.engine import BlockStore, CacheIdentity
from quiver.engine.errors import QuiverError
from .config import MODE, SMOKE, pick
from .conftest import REPO_ROOT, make_bench_dir, run_once

BACKENDS = [b for b in ("art", "lmdb", "lsm") if b in index_backends.available()]
PROMPTS = pick(smoke=2, quick=16, full=32)
BLOCKS_PER_PROMPT = 16
TRIALS = pick(smoke=2, quick=60, full=200)
WAL_FLIPS = pick(smoke=2, quick=60, full=200)
IDENT = CacheIdentity(model="faults", model_revision="r", tokenizer="t", tokenizer_revision="r", tenant="study",
                      kv_dtype="float16", block_tokens=16, num_layers=1, num_kv_heads=2, head_dim=64)
KINDS = ("flip", "flip", "flip", "truncate", "delete")
_REPO = str(Path(__file__).resolve().parent.parent)


def _prompt(p: int) -> list[int]:
    return [p * 100_000 + t for t in range(BLOCKS_PER_PROMPT * 16)]


def _blocks(p: int) -> np.ndarray:
    rng = np.random.default_rng(p)
    return rng.standard_normal((BLOCKS_PER_PROMPT, *IDENT.block_shape)).astype(np.float16)


def _build(path: str, backend: str) -> None:
    with BlockStore.open(path, index=backend, ram_bytes=0) as s:
        for p in range(PROMPTS):
            s.put(IDENT, _prompt(p), _blocks(p))


def _check_all(path: str, backend: str) -> dict:
    """Open the store and get every block: what came back, lost or wrong."""
    out = dict(open_failed=0, lost=0, wrong=0, index_reset=0, index_repairs=0, adopted=0, error="")
    try:
        s = BlockStore.open(path, index=backend, ram_bytes=0)
    except Exception as exc:  # noqa: BLE001 - a failed open is the finding
        out.update(open_failed=1, lost=PROMPTS * BLOCKS_PER_PROMPT, error=f"{type(exc).__name__}: {exc}"[:200])
        return out
    try:
        rep = s._disk.last_recovery
        out["index_reset"] = int(rep.index_reset is not None)
        out["adopted"] = rep.adopted
        for p in range(PROMPTS):
            want = _blocks(p)
            for i in range(BLOCKS_PER_PROMPT):  # block by block: one loss does not hide the rest
                try:
                    got = s.get(IDENT, _prompt(p), n_blocks=i + 1)[i].view(np.float16)
                except Exception as exc:  # noqa: BLE001 - counted
                    out["lost"] += 1
                    out["error"] = out["error"] or f"{type(exc).__name__}: {exc}"[:200]
                    continue
                if not np.array_equal(got, want[i]):
                    out["wrong"] += 1
        out["index_repairs"] = s._disk.volume.stats().index_repairs
    finally:
        s.close()
    return out


class _Checker:
    """A long-lived child process that runs _check_all on each trial it is sent
    (one JSON line back per path).  A child killed by a signal (SIGBUS, SIGSEGV)
    counts as a death and is replaced; fork is not used (RocksDB's and Numba's
    threads do not survive it)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.proc = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quiver.studies.bench_faults", "worker", self.backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=_REPO, env=dict(os.environ))

    def check(self, path: str) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return dict(open_failed=0, lost=PROMPTS * BLOCKS_PER_PROMPT, wrong=0, index_reset=0, index_repairs=0,
                        adopted=0, died=1, error=f"checker exit {code}")
        return json.loads(line) | {"died": 0}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(60)


def _worker(backend: str) -> None:
    for line in sys.stdin:
        print(json.dumps(_check_all(line.strip(), backend)), flush=True)


def _index_files(store: str, backend: str) -> list[str]:
    d = os.path.join(store, "l1", f"index-{backend}")
    out = []
    for dirpath, _dirs, files in os.walk(d):
        out += [os.path.join(dirpath, f) for f in files if f != "QUIVER-INDEX.LOCK" and os.path.getsize(os.path.join(dirpath, f)) > 0]
    return sorted(out)


def _damage(path: str, kind: str, rng: random.Random) -> str:
    size = os.path.getsize(path)
    if kind == "flip":
        off = rng.randrange(size)
        with open(path, "r+b") as f:
            f.seek(off)
            b = f.read(1)[0]
            f.seek(off)
            f.write(bytes([b ^ (1 << rng.randrange(8))]))
        return f"flip {os.path.basename(path)}@{off}"
    if kind == "truncate":
        n = rng.randrange(size)
        os.truncate(path, n)
        return f"truncate {os.path.basename(path)} to {n}"
    os.unlink(path)
    return f"delete {os.path.basename(path)}"


def _totals(rows: list[dict]) -> dict:
    keys = ("open_failed", "lost", "wrong", "died", "index_reset", "index_repairs", "adopted")
    return {k: sum(r.get(k, 0) for r in rows) for k in keys}


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_corruption_campaign(benchmark, backend):
    benchmark.group = "faults-index"
    work = make_bench_dir(f"faults-{backend}")
    try:
        pristine = str(work / "pristine")
        _build(pristine, backend)
        rng = random.Random(f"faults-{backend}")

        checker = _Checker(backend)

        def campaign() -> list[dict]:
            rows = []
            for t in range(TRIALS):
                trial = str(work / "trial")
                shutil.copytree(pristine, trial)
                files = _index_files(trial, backend)
                kind = KINDS[t % len(KINDS)]
                what = _damage(rng.choice(files), kind, rng) if files else "no index file"
                row = checker.check(trial)
                row.update(kind=kind, what=what)
                rows.append(row)
                shutil.rmtree(trial)
            return rows

        t0 = time.perf_counter()
        try:
            rows = run_once(benchmark, campaign)
        finally:
            checker.close()
        tot = _totals(rows)
        by_kind = {k: _totals([r for r in rows if r["kind"] == k]) | {"trials": sum(r["kind"] == k for r in rows)}
                   for k in sorted(set(KINDS))}
        examples = [f"{r['what']}: {r['error']}" for r in rows if r["error"]][:5]
        benchmark.extra_info.update(
            backend=backend, mode=MODE, trials=len(rows), blocks=PROMPTS * BLOCKS_PER_PROMPT, by_kind=by_kind,
            seconds=time.perf_counter() - t0, examples=examples, **tot,
        )
        assert tot["wrong"] == 0, "wrong bytes served after index damage"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_wal_flip_campaign(benchmark):
    benchmark.group = "faults-wal"
    backend = "lmdb" if "lmdb" in BACKENDS else BACKENDS[0]
    work = make_bench_dir("faults-wal")
    try:
        pristine = str(work / "pristine")
        _build(pristine, backend)
        rng = random.Random("faults-wal")
        wal = os.path.join(pristine, "l1", "wal")
        segs = sorted(os.listdir(wal))

        checker = _Checker(backend)

        def campaign() -> list[dict]:
            rows = []
            for _ in range(WAL_FLIPS):
                trial = str(work / "trial")
                shutil.copytree(pristine, trial)
                shutil.rmtree(os.path.join(trial, "l1", f"index-{backend}"))  # replay the whole log
                seg = os.path.join(trial, "l1", "wal", rng.choice(segs))
                what = _damage(seg, "flip", rng)
                row = checker.check(trial)
                row.update(kind="flip", what=what)
                rows.append(row)
                shutil.rmtree(trial)
            return rows

        t0 = time.perf_counter()
        try:
            rows = run_once(benchmark, campaign)
        finally:
            checker.close()
        tot = _totals(rows)
        benchmark.extra_info.update(
            backend=backend, mode=MODE, flips=len(rows), blocks=PROMPTS * BLOCKS_PER_PROMPT,
            max_lost_per_flip=max((r["lost"] for r in rows), default=0),
            flips_with_loss=sum(1 for r in rows if r["lost"]), seconds=time.perf_counter() - t0, **tot,
        )
        assert tot["wrong"] == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)



# ------------------------------------------------------------------ ENOSPC sweep

MiB = 1 << 20
ENOSPC_DISKS = pick(smoke=[4 * MiB], quick=[4 * MiB, 16 * MiB], full=[4 * MiB, 16 * MiB, 64 * MiB])
ENOSPC_BUDGETS = ("default", "over")  # over: disk_bytes = 4 x the disk (a budget the disk cannot honour)
ENOSPC_OVER = 4
ENOSPC_EXTRA_PUTS = 3  # puts tried after the first refusal
ENOSPC_IDENT = CacheIdentity(model="faults-enospc", model_revision="r", tokenizer="t", tokenizer_revision="r",
                             tenant="study", kv_dtype="float16", block_tokens=16, num_layers=8, num_kv_heads=2,
                             head_dim=64)  # 64 KiB blocks
ENOSPC_BLOCK = int(np.prod(ENOSPC_IDENT.block_shape)) * 2


def _enospc_tokens(i: int) -> list[int]:
    return [i * 100_000 + t for t in range(16)]


def _enospc_block(i: int) -> np.ndarray:
    return np.random.default_rng(1_000_000 + i).standard_normal((1, *ENOSPC_IDENT.block_shape)).astype(np.float16)


def _mount_tmpfs(where: str, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``where``: None, or why it could not be."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: this process may not mount a tmpfs (the ENOSPC sweep needs a real small disk)"
    if shutil.which("mount") is None:
        return "no mount(8) on this machine"
    os.makedirs(where, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], capture_output=True, text=True)
    if r.returncode != 0:
        return f"mount -t tmpfs failed: {(r.stderr or r.stdout).strip()[:200]}"
    return None


class _Calls:
    """Every store call of a case, each outcome counted: ok, typed (QuiverError), untyped."""

    def __init__(self) -> None:
        self.typed = 0
        self.untyped = 0
        self.typed_names: dict[str, int] = {}
        self.untyped_examples: list[str] = []

    def __call__(self, fn):
        """(True, value) or (False, the exception)."""
        try:
            return True, fn()
        except QuiverError as exc:
            self.typed += 1
            self.typed_names[type(exc).__name__] = self.typed_names.get(type(exc).__name__, 0) + 1
            return False, exc
        except Exception as exc:  # noqa: BLE001 - an untyped error is the finding
            self.untyped += 1
            if len(self.untyped_examples) < 3:
                self.untyped_examples.append(f"{type(exc).__name__}: {exc}"[:200])
            return False, exc


def _read_back(calls: _Calls, store, ids: list[int]) -> tuple[int, int, int]:
    """(readable, wrong bytes, failed reads) over blocks ``ids``: lookup, then get what it reports."""
    readable = wrong = failed = 0
    for i in ids:
        ok, n = calls(lambda: store.lookup(ENOSPC_IDENT, _enospc_tokens(i)))
        if not ok:
            failed += 1
            continue
        if n < 1:
            continue
        ok, got = calls(lambda: store.get(ENOSPC_IDENT, _enospc_tokens(i), n_blocks=1))
        if not ok:
            failed += 1
        elif np.array_equal(np.asarray(got).view(np.float16).reshape(-1), _enospc_block(i).reshape(-1)):
            readable += 1
        else:
            wrong += 1
    return readable, wrong, failed


def _enospc_case(mnt: str, disk: int, budget: str) -> dict:
    calls = _Calls()
    path = os.path.join(mnt, "store")
    disk_bytes = None if budget == "default" else ENOSPC_OVER * disk
    offered = math.ceil((2 if budget == "default" else ENOSPC_OVER) * disk / ENOSPC_BLOCK) + 8
    out = dict(disk_bytes=disk, budget=budget, budget_bytes=disk_bytes, block_bytes=ENOSPC_BLOCK, offered=offered,
               acked=0, refused_at=None, first_error="", extra_acked=0, reads_after_enospc=None,
               read_errors_after_enospc=0, lost=None, wrong=0, evicted=0, reopen_ok=False, close_errors=[],
               small_budget=disk // 4, small_reopen_ok=False, used_before=None, used_after_small_open=None,
               freed_bytes=None, small_put_ok=False, small_used_bytes=None, final_reopen_ok=False, l1_capacity=None)

    def close(store, what: str) -> None:
        ok, exc = calls(store.close)
        if not ok:
            out["close_errors"].append(f"{what}: {type(exc).__name__}")

    ok, a = calls(lambda: BlockStore.open(path, ram_bytes=0, disk_bytes=disk_bytes))
    if not ok:
        out["first_error"] = f"open: {type(a).__name__}: {a}"[:200]
        return out | _calls_info(calls)
    out["l1_capacity"] = a.stats()["tiers"]["l1"]["capacity_bytes"]
    acked: list[int] = []
    t0 = time.perf_counter()
    for i in range(offered):
        ok, exc = calls(lambda: a.put(ENOSPC_IDENT, _enospc_tokens(i), _enospc_block(i)))
        if ok:
            acked.append(i)
            continue
        out["refused_at"] = i
        out["first_error"] = f"{type(exc).__name__}: {exc}"[:200]
        for j in range(i + 1, i + 1 + ENOSPC_EXTRA_PUTS):
            ok, _ = calls(lambda: a.put(ENOSPC_IDENT, _enospc_tokens(j), _enospc_block(j)))
            if ok:
                acked.append(j)
                out["extra_acked"] += 1
        break
    out["put_s"] = time.perf_counter() - t0
    out["acked"] = len(acked)
    out["evicted"] = a.stats()["tiers"]["l1"]["evictions"]
    out["used_at_refusal"] = shutil.disk_usage(mnt).used
    if out["refused_at"] is not None:  # the same handle, after ENOSPC
        readable, wrong, failed = _read_back(calls, a, acked)
        out.update(reads_after_enospc=readable, read_errors_after_enospc=failed)
        out["wrong"] += wrong
    close(a, "first handle")
    # a reopen in the same process: the lock was released whatever close raised
    ok, b = calls(lambda: BlockStore.open(path, ram_bytes=0, disk_bytes=disk_bytes))
    out["reopen_ok"] = ok
    if ok:
        out["evicted"] += b.stats()["tiers"]["l1"]["evictions"]  # evictions at open (the budget), not losses
        readable, wrong, failed = _read_back(calls, b, acked)
        out.update(readable_after_reopen=readable, read_errors_after_reopen=failed)
        out["wrong"] += wrong
        out["lost"] = max(0, len(acked) - readable - out["evicted"])
        close(b, "reopen")
    # a reopen with a quarter-disk budget: it must open, free space and take a new put
    out["used_before"] = shutil.disk_usage(mnt).used
    ok, c = calls(lambda: BlockStore.open(path, ram_bytes=0, disk_bytes=disk // 4))
    out["small_reopen_ok"] = ok
    if ok:
        out["used_after_small_open"] = shutil.disk_usage(mnt).used
        out["freed_bytes"] = out["used_before"] - out["used_after_small_open"]
        out["small_used_bytes"] = c.stats()["tiers"]["l1"]["used_bytes"]
        new = offered + ENOSPC_EXTRA_PUTS + 1
        ok, _ = calls(lambda: c.put(ENOSPC_IDENT, _enospc_tokens(new), _enospc_block(new)))
        readable, wrong, _failed = _read_back(calls, c, [new] + acked)
        out["small_put_ok"] = ok and readable >= 1
        out["wrong"] += wrong
        close(c, "smaller budget")
    ok, d = calls(lambda: BlockStore.open(path, ram_bytes=0, disk_bytes=disk // 4))
    out["final_reopen_ok"] = ok
    if ok:
        close(d, "final")
    out["used_at_end"] = shutil.disk_usage(mnt).used
    return out | _calls_info(calls)


def _calls_info(calls: _Calls) -> dict:
    return dict(typed_errors=calls.typed, untyped_errors=calls.untyped, typed_error_names=calls.typed_names,
                untyped_examples=calls.untyped_examples)


@pytest.mark.parametrize("budget", ENOSPC_BUDGETS)
@pytest.mark.parametrize("disk", ENOSPC_DISKS, ids=lambda d: f"{d // MiB}MiB")
def test_enospc_sweep(benchmark, disk, budget):
    benchmark.group = "faults-enospc"
    work = make_bench_dir("faults-enospc")
    mnt = str(work / "mnt")
    info = dict(mode=MODE, disk_bytes=disk, budget=budget, block_bytes=ENOSPC_BLOCK)
    why = _mount_tmpfs(mnt, disk)
    try:
        if why is not None:
            run_once(benchmark, lambda: None)
            benchmark.extra_info.update(info, skipped=why)
            return
        t0 = time.perf_counter()
        row = run_once(benchmark, lambda: _enospc_case(mnt, disk, budget))
        benchmark.extra_info.update(info, **row, real_tmpfs=True, seconds=time.perf_counter() - t0)
        assert row["wrong"] == 0, "wrong bytes served after ENOSPC"
    finally:
        if why is None:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ hung L2

_REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/1\.1\r\n")
LOOPBACK = "127.0.0.1"
L2_BUCKET = "quiver-faults"
L2_PROFILE = "quiver-faults"
L2_BUDGET_S = 2.0  # flush_l2(timeout_s=...) and close(l2_timeout_s=...)
L2_LOOKUP_GOAL_MS = 50.0
L2_LOOKUPS = pick(smoke=4, quick=8, full=12)
L2_LOOKUPS_NO_BREAKER = pick(smoke=2, quick=3, full=4)  # each waits out the lookup's 1 s L2 budget


class SilentServer:
    """Accepts TCP connections on 127.0.0.1, reads, never answers (see the module doc).

    With ``upstream`` (host, port) it first forwards bytes both ways (a plain TCP
    pipe, so SigV4 signatures stay valid); after ``go_silent()`` every request
    it reads -- on new or pooled connections -- is dropped, never answered."""

    def __init__(self, upstream: tuple[str, int] | None = None) -> None:
        self.upstream = upstream
        self.silent = upstream is None
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(256)
        self.endpoint = f"http://{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.dropped = 0  # requests read while silent
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def go_silent(self) -> None:
        self.silent = True

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = None
            if not self.silent:
                try:
                    up = socket.create_connection(self.upstream, timeout=5)
                    up.settimeout(None)
                except OSError:
                    up = None
            with self.lock:
                self.conns += [conn] + ([up] if up is not None else [])
            threading.Thread(target=self._client, args=(conn, up), daemon=True).start()
            if up is not None:
                threading.Thread(target=self._back, args=(up, conn), daemon=True).start()

    def _client(self, conn: socket.socket, up: socket.socket | None) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.silent or up is None:
                with self.lock:
                    self.dropped += len(_REQUEST_LINE.findall(data))
                continue
            try:
                up.sendall(data)
            except OSError:
                return

    @staticmethod
    def _back(up: socket.socket, conn: socket.socket) -> None:
        while True:
            try:
                data = up.recv(65536)
                if not data:
                    return
                conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.close()
                except OSError:
                    pass


class _Moto:
    """A real moto server (tests/s3servers.py), started on first use, shared by the rows."""

    def __init__(self) -> None:
        self.srv = None
        self.why: str | None = None
        self.start_s: float | None = None

    def get(self):
        if self.srv is None and self.why is None:
            t0 = time.monotonic()
            try:
                sys.path.insert(0, str(REPO_ROOT / "tests"))
                from s3servers import MotoServer

                self.srv = MotoServer()
                self.srv.server.client().create_bucket(Bucket=L2_BUCKET)
            except Exception as exc:  # noqa: BLE001 - recorded as the rows' skip reason
                self.why = f"moto could not be started: {type(exc).__name__}: {exc}"[:200]
                if self.srv is not None:
                    self.srv.stop()
                    self.srv = None
            self.start_s = time.monotonic() - t0
        return self.srv

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.stop()
            self.srv = None


@pytest.fixture(scope="module")
def _moto():
    m = _Moto()
    yield m
    m.stop()


@pytest.fixture
def _l2_creds(_moto, monkeypatch, tmp_path):
    """Profile L2_PROFILE, with moto's keys once it runs (the silent server never checks them)."""

    def write(key: str = "faults", secret: str = "faults") -> None:
        f = tmp_path / "credentials"
        f.write_text(f"[{L2_PROFILE}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(f))

    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    write()
    return write


def _timed(fn):
    """(seconds, value or None, error class name or "")."""
    t0 = time.perf_counter()
    try:
        v = fn()
        return time.perf_counter() - t0, v, ""
    except Exception as exc:  # noqa: BLE001 - recorded
        return time.perf_counter() - t0, None, type(exc).__name__


def _hung_prompt(i: int) -> list[int]:
    return [7_000_000 + i * 1000 + t for t in range(32)]


def _hung_case(root: str, breaker: str, onset: str, upstream) -> dict:
    from quiver.tier.objectstore import BreakerPolicy
    from quiver.tier.s3 import RetryPolicy

    retry = RetryPolicy(max_tries=3, total_s=3.0, base_delay_s=0.05, connect_timeout_s=0.5, read_timeout_s=1.0)
    policy = BreakerPolicy() if breaker == "default" else BreakerPolicy(failures=10**9)
    blocks = _blocks(0)[:2]
    out = dict(retry=dict(max_tries=retry.max_tries, total_s=retry.total_s, connect_timeout_s=retry.connect_timeout_s,
                          read_timeout_s=retry.read_timeout_s),
               breaker_failures=policy.failures, cooldown_s=policy.cooldown_s, probe_timeout_s=policy.probe_timeout_s,
               lookup_budget_s=BlockStore.L2_LOOKUP_TIMEOUT_S, budget_s=L2_BUDGET_S)
    # the same lookups on a store without L2: what a lookup costs anyway
    with BlockStore.open(os.path.join(root, "local"), ram_bytes=0, index="flat") as s:
        base = [_timed(lambda: s.lookup(IDENT, _hung_prompt(i)))[0] for i in range(L2_LOOKUPS)]
    out["lookup_no_l2_ms"] = statistics.median(base) * 1e3
    silent = SilentServer(upstream if onset == "after-open" else None)
    store = None
    try:
        opts = dict(endpoint_url=silent.endpoint, profile=L2_PROFILE, retry=retry, breaker=policy)
        spec = f"s3://{L2_BUCKET}/{breaker}-{onset}-{os.getpid()}-{time.monotonic_ns()}"
        out["open_s"], store, err = _timed(lambda: BlockStore.open(os.path.join(root, "s"), object_store=spec,
                                                                   s3_options=opts, ram_bytes=0, index="flat"))
        out["open_ok"], out["open_error"] = store is not None, err
        if store is None:
            return out
        h = store.l2_health()
        out["attached_at_open"], out["breaker_after_open"] = h["attached"], h["breaker"]
        if onset == "after-open":
            _s, n, err = _timed(lambda: store.put(IDENT, _prompt(0)[:32], blocks))
            out["put_before_silence"] = err or n
            silent.go_silent()
        n_look = L2_LOOKUPS if breaker == "default" or onset == "at-open" else L2_LOOKUPS_NO_BREAKER
        ms, states = [], []
        for i in range(n_look):
            states.append(store.l2_health()["breaker"])
            secs, _n, err = _timed(lambda: store.lookup(IDENT, _hung_prompt(i)))
            ms.append(secs * 1e3)
            if err:
                out["lookup_error"] = err
        out["lookup_ms"], out["lookup_breaker_state"] = ms, states
        down = [m for m, st in zip(ms, states) if st != "closed"] or ms
        out["lookup_first_ms"] = ms[0]
        out["lookup_down_ms"] = statistics.median(down)  # breaker open when the call began (or all, if it never was)
        out["lookup_down_max_ms"] = max(down)
        out["lookup_down_added_ms"] = out["lookup_down_ms"] - out["lookup_no_l2_ms"]
        out["lookups_waiting"] = sum(1 for m in ms if m > L2_LOOKUP_GOAL_MS)
        out["breaker_after_lookups"] = store.l2_health()["breaker"]
        out["put_s"], n, out["put_error"] = _timed(lambda: store.put(IDENT, _prompt(1)[:32], blocks))
        out["put_stored"] = n
        out["put_l1_kept"] = store.lookup(IDENT, _prompt(1)[:32]) == len(blocks)
        out["flush_s"], out["flush_owed"], out["flush_error"] = _timed(lambda: store.flush_l2(timeout_s=L2_BUDGET_S))
        st = store.stats()["counters"]
        out["l2_lookup_errors"], out["l2_heads"] = st.get("l2_lookup_errors"), st.get("l2_heads")
        h = store.l2_health()
        out["breaker_at_close"], out["outages"], out["refused"], out["failures"] = (
            h["breaker"], h["outages"], h["refused"], h["failures"])
        out["close_s"], _v, out["close_error"] = _timed(lambda: store.close(l2_timeout_s=L2_BUDGET_S))
        store = None
        out["requests_dropped"] = silent.dropped
        return out
    finally:
        if store is not None:
            try:
                store.close(l2_timeout_s=L2_BUDGET_S)
            except Exception:  # noqa: BLE001 - already recorded
                pass
        silent.close()


@pytest.mark.parametrize("onset", ["at-open", "after-open"])
@pytest.mark.parametrize("breaker", ["default", "off"])
def test_hung_l2_timings(benchmark, _moto, _l2_creds, breaker, onset):
    benchmark.group = "faults-l2"
    info = dict(mode=MODE, breaker=breaker, onset=onset)
    upstream = None
    why = None
    if onset == "after-open":
        if SMOKE and breaker == "off":
            why = "smoke mode: the no-breaker after-open row waits out every budget (quick and full runs measure it)"
        else:
            srv = _moto.get()
            if srv is None:
                why = _moto.why
            else:
                _l2_creds(srv.server.access_key, srv.server.secret_key)
                port = int(srv.endpoint.rsplit(":", 1)[1])
                upstream = (LOOPBACK, port)
                info["moto_start_s"] = _moto.start_s
    if why is not None:
        run_once(benchmark, lambda: None)
        benchmark.extra_info.update(info, skipped=why)
        return
    work = make_bench_dir("faults-l2")
    try:
        t0 = time.perf_counter()
        row = run_once(benchmark, lambda: _hung_case(str(work), breaker, onset, upstream))
        benchmark.extra_info.update(info, **row, seconds=time.perf_counter() - t0)
        assert row["open_ok"], f"open failed against a silent L2: {row.get('open_error')}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
