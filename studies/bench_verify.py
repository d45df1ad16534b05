"""`quiver verify` beside the disk's raw read bandwidth of the same files (group ``cli-verify``).

A store is built through ``BlockStore`` (``BLOCKS`` blocks of ``BLOCK_BYTES`` of random
float16 payload, codec none, default index), closed, and then, per cache state:

- ``raw``: every object file under ``<store>/l1/objects`` read sequentially, whole,
  into one reusable buffer with ``readinto`` (one thread): the disk's (or the page
  cache's) read bandwidth of exactly the bytes verify must read;
- ``verify``: ``python -m quiver.cli verify --json PATH`` as a subprocess, its wall time
  (process start, imports, recovery, the reads, CRC32C and envelope checks, exit).

``verify_bytes_per_s`` = the object files' bytes / that wall time; ``ratio`` = it ÷
``raw_read_bytes_per_s``.  ``cli_start_s`` is the wall time of ``python -m quiver.cli
--help`` (start + imports), so the report can show the pass without the start; the
command runs with ``--json``, and ``cli_pass_s`` / ``cli_bytes_per_s`` are its own
figures of the read-and-check pass (open and recovery excluded).

Cache states: ``cold`` evicts the object files' pages before each timed read with
``posix_fadvise(POSIX_FADV_DONTNEED)`` per file (after ``os.sync()``, so the pages are
clean) -- not ``/proc/sys/vm/drop_caches``, which would empty the page cache of every
other process on a shared machine.  ``resident_before_*`` is the share of the files'
pages in the page cache just before each timed read (``mincore``), the evidence that
the eviction took; where it did not (more than ``MAX_COLD_RESIDENT`` left), the case is
recorded as ``warm`` and says so.  ``warm`` reads every file once first.  On a virtual
machine "cold" is cold for this kernel's page cache: the host may still cache the disk.

Skipped, with the reason, where ``quiver.cli`` (the ``quiver`` command) or its
``verify`` subcommand is missing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .config import pick
from .conftest import REPO_ROOT, make_bench_dir, run_once

KiB = 1 << 10
BLOCKS = pick(smoke=32, quick=2000, full=8000)
HEADS = pick(smoke=8, quick=32, full=32)               # 1 layer × K,V × 16 tokens × HEADS × 128 × 2 B
BLOCK_BYTES = 2 * 16 * HEADS * 128 * 2                 # 64 KiB smoke, 256 KiB quick and full
PUT_BATCH = 50
CACHES = ["cold", "warm"]
MAX_COLD_RESIDENT = 0.10
CLI = [sys.executable, "-m", "quiver.cli"]
_STATE: dict = {}


# ------------------------------------------------------------------------------ the page cache
def _object_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "l1" / "objects").rglob("*") if p.is_file())


def _evict(files: list[Path]) -> None:
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _resident(files: list[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore), or None where it cannot be read."""
    libc, page = _libc(), os.sysconf("SC_PAGE_SIZE")
    held = total = 0
    for p in files:
        size = p.stat().st_size
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(addr, size, vec)
            libc.munmap(addr, size)
            if rc != 0:
                return None
            held += sum(v & 1 for v in vec)
            total += pages
        finally:
            os.close(fd)
    return held / total if total else None


# ------------------------------------------------------------------------------ the store
def _cli_problem() -> str | None:
    """Why ``quiver verify`` cannot run here, or None."""
    if importlib.util.find_spec("quiver.cli") is None:
        return "quiver.cli (the `quiver` command) is not in this tree yet"
    r = subprocess.run(CLI + ["--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or "verify" not in r.stdout:
        return f"`python -m quiver.cli --help` does not offer verify (rc {r.returncode}): {(r.stdout + r.stderr)[-300:]}"
    return None


def _build(store: Path) -> dict:
    from quiver.engine import BlockStore, CacheIdentity

    ident = CacheIdentity(model="quiver/bench-verify", model_revision="1", tokenizer="bench", tokenizer_revision="1",
                          adapter=None, tenant="bench", kv_dtype="float16", block_tokens=16, num_layers=1,
                          num_kv_heads=HEADS, head_dim=128)
    assert ident.block_nbytes == BLOCK_BYTES
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with BlockStore.open(store, ram_bytes=0) as st:
        index = st.index
        for first in range(0, BLOCKS, PUT_BATCH):
            n = min(PUT_BATCH, BLOCKS - first)
            tokens = np.arange(n * 16, dtype=np.uint32) + np.uint32(first * 16 + 1)
            payload = rng.integers(0, 1 << 16, size=(n, *ident.block_shape), dtype=np.uint16).view(np.float16)
            assert st.put(ident, tokens, payload) == n
    return {"build_s": time.perf_counter() - t0, "index": index}


def _store() -> dict:
    if "store" in _STATE:
        return _STATE["store"]
    why = _cli_problem()
    if why:
        print(f"!!! CLI VERIFY STUDY NOT RUN: {why} !!!", file=sys.stderr)
        pytest.skip(why)
    root = make_bench_dir("verify")
    store = root / "store"
    info = _build(store)
    files = _object_files(store)
    t0 = time.perf_counter()
    subprocess.run(CLI + ["--help"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=300)
    info.update(root=root, store=store, files=files, stored_bytes=sum(p.stat().st_size for p in files),
                cli_start_s=time.perf_counter() - t0)
    _STATE["store"] = info
    return info


# ------------------------------------------------------------------------------ the two reads
def _raw_read(files: list[Path]) -> tuple[float, int]:
    """Every file read whole, in order, into one reusable buffer: (seconds, bytes)."""
    buf = bytearray(max(p.stat().st_size for p in files))
    mv = memoryview(buf)
    done = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                done += n
    return time.perf_counter() - t0, done


def _verify(store: Path) -> tuple[float, dict]:
    """Wall time of the subprocess, and what it reported about its own pass (``--json``)."""
    t0 = time.perf_counter()
    r = subprocess.run(CLI + ["verify", "--json", str(store)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=1800)
    dt = time.perf_counter() - t0
    assert r.returncode == 0, f"quiver verify failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}"
    try:
        rep = json.loads(r.stdout)
    except ValueError:
        rep = {}
    return dt, rep if isinstance(rep, dict) else {}


def _measure(s: dict, cache: str) -> dict:
    files = s["files"]
    if cache == "cold":
        _evict(files)
    else:
        _raw_read(files)
    before_raw = _resident(files)
    raw_s, raw_bytes = _raw_read(files)
    if cache == "cold":
        _evict(files)
    before_verify = _resident(files)
    verify_s, rep = _verify(s["store"])
    assert raw_bytes == s["stored_bytes"]
    measured = cache
    note = "page cache warm: every file read once first"
    if cache == "cold":
        note = "posix_fadvise(DONTNEED) per object file after os.sync(), before each timed read"
        left = max((v for v in (before_raw, before_verify) if v is not None), default=None)
        if left is not None and left > MAX_COLD_RESIDENT:
            measured = "warm"
            note = f"eviction left {left:.0%} of the pages resident: measured warm, not cold"
    raw_bps = raw_bytes / raw_s if raw_s > 0 else None
    ver_bps = s["stored_bytes"] / verify_s if verify_s > 0 else None
    net = verify_s - s["cli_start_s"]
    net_bps = s["stored_bytes"] / net if net > 0 else None
    return dict(
        blocks=BLOCKS, block_bytes=BLOCK_BYTES, files=len(files), stored_bytes=s["stored_bytes"], index=s["index"],
        build_s=s["build_s"], cache=measured, cache_requested=cache, cache_method=note,
        resident_before_raw=before_raw, resident_before_verify=before_verify,
        raw_read_s=raw_s, raw_read_bytes_per_s=raw_bps, verify_s=verify_s, verify_bytes_per_s=ver_bps,
        ratio=ver_bps / raw_bps if ver_bps and raw_bps else None, cli_start_s=s["cli_start_s"],
        verify_net_bytes_per_s=net_bps, ratio_net=net_bps / raw_bps if net_bps and raw_bps else None,
        command="python -m quiver.cli verify --json PATH",
        cli_pass_s=rep.get("seconds"), cli_bytes=rep.get("bytes"), cli_blocks=rep.get("blocks"),
        cli_bytes_per_s=rep.get("bytes_per_s"), cli_dropped=rep.get("dropped"),
    )


@pytest.mark.parametrize("cache", CACHES)
def test_cli_verify(benchmark, cache):
    benchmark.group = "cli-verify"
    s = _store()
    info = run_once(benchmark, lambda: _measure(s, cache))
    benchmark.extra_info.update(info)
    assert info["stored_bytes"] >= BLOCKS * BLOCK_BYTES


def teardown_module(module):
    """Remove the store (hundreds of MB at quick sizes)."""
    s = _STATE.pop("store", None)
    if s is not None:
        shutil.rmtree(s["root"], ignore_errors=True)
