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
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import index_backends
from engine import BlockStore, CacheIdentity
from studies.config import MODE, pick
from studies.conftest import make_bench_dir

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
            [sys.executable, "-m", "studies.bench_faults", "worker", self.backend],
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


def _once(benchmark, fn):
    box = {}
    benchmark.pedantic(lambda: box.setdefault("v", fn()), rounds=1, iterations=1, warmup_rounds=0)
    return box["v"]


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
            rows = _once(benchmark, campaign)
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
            rows = _once(benchmark, campaign)
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


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
