"""ART study: what the Numba build costs, and what a snapshot costs to write and reopen.

Groups and what ``extra_info`` holds:

- art-compile: a fresh Python process runs every ArtIndex operation once.
  ``cold``: with an empty Numba cache directory (every kernel is compiled);
  ``warm``: with the cache the cold run left (kernels are loaded).  The child
  runs with QUIVER_ART_JIT=sync, so each first call compiles (or loads) its
  kernel in the caller and that cost is what is measured; the product's default
  serves first calls interpreted while a thread compiles (studies/bench_firstreq.py).  Figures:
  import_s (import of index_backends.art, numba included), first_calls_s (the
  first call of every operation), total_s (process start to exit, measured by
  the parent).  Smoke mode calls only the ``get`` kernel, so it stays within seconds.
- art-reopen: an index of N records (48-byte keys of the shared-prefix workload,
  16-byte values) is snapshotted; figures: snapshot_bytes, bytes_per_record,
  snapshot_s, and the timed part: close-free reopen (open + len) of the snapshot.
  Sizes 10k / 100k (1M in full mode).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quiver.index_backends.art import ArtIndex
from .config import pick
from .conftest import make_bench_dir
from .workloads import index_dataset

REPO = Path(__file__).resolve().parent.parent
REOPEN_SIZES = pick(smoke=[2_000], quick=[10_000, 100_000], full=[10_000, 100_000, 1_000_000])
COMPILE_OPS = pick(smoke="minimal", quick="all", full="all")

CHILD = r"""
import json, sys, tempfile, time
t0 = time.perf_counter()
from quiver.index_backends.art import ArtIndex
t1 = time.perf_counter()
if sys.argv[1] == "minimal":  # smoke: one small kernel, so the cold run takes seconds
    from quiver.index_backends import _art_kernels as k
    N, K, V = k.new_arrays()
    k.get(N, K, b"key")
    print(json.dumps({"import_s": t1 - t0, "first_calls_s": time.perf_counter() - t1}))
    sys.exit(0)
d = tempfile.mkdtemp()
ix = ArtIndex(d)
ix.put(b"k" * 48, b"v" * 16)
ix.get(b"k" * 48)
if sys.argv[1] == "all":
    ix.put_many([b"a" * 48, b"b" * 48], [b"1" * 16, b"2" * 16])
    ix.get_many([b"a" * 48, b"x"])
    list(ix.scan_prefix(b"a"))
    ix.longest_prefix([b"a" * 48, b"b" * 48, b"c" * 48, b"d" * 48, b"e" * 48])
    ix.longest_prefix_many([[b"a" * 48]])
    ix.delete(b"a" * 48)
    ix.flush()
    ix.snapshot()
    ix.stats()
    ix.node_census()
ix.close()
ArtIndex(d).close()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_calls_s": t2 - t1}))
"""


def _run_child(cache_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), QUIVER_NUMBA_CACHE_DIR=str(cache_dir), QUIVER_ART_JIT="sync")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, COMPILE_OPS], env=env, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    info["total_s"] = time.perf_counter() - t
    return info


@pytest.fixture(scope="module")
def compile_cache():
    d = make_bench_dir("art-numba-cache")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_art_compile_cold(benchmark, compile_cache):
    """Fresh process, empty cache: pays the compilation of every kernel it calls."""
    benchmark.group = "art-compile"
    infos = []

    def setup():
        shutil.rmtree(compile_cache, ignore_errors=True)
        compile_cache.mkdir()

    def cold():
        infos.append(_run_child(compile_cache))

    benchmark.pedantic(cold, setup=setup, rounds=1, iterations=1)
    benchmark.extra_info.update({"case": "cold", "ops": COMPILE_OPS, **infos[-1]})
    assert any(compile_cache.rglob("*.nbi")), "the cold run left no cache index"


def test_art_compile_warm(benchmark, compile_cache):
    """Fresh process, cache filled by a cold run: loads the kernels instead."""
    benchmark.group = "art-compile"
    if not any(compile_cache.rglob("*.nbi")):
        _run_child(compile_cache)  # the cold study did not run first: fill the cache
    infos = []
    benchmark.pedantic(lambda: infos.append(_run_child(compile_cache)), rounds=pick(smoke=1, quick=3, full=5), iterations=1)
    best = min(infos, key=lambda i: i["first_calls_s"])
    benchmark.extra_info.update({"case": "warm", "ops": COMPILE_OPS, **best, "rounds": len(infos)})


@pytest.mark.parametrize("n", REOPEN_SIZES)
def test_art_reopen(benchmark, n):
    benchmark.group = "art-reopen"
    data = index_dataset(n, probes=1)
    d = make_bench_dir(f"art-reopen-{n}")
    try:
        ix = ArtIndex(d)
        for i in range(0, n, 10_000):
            ix.put_many(data.keys[i : i + 10_000], data.values[i : i + 10_000])
        mem = ix.stats().memory_bytes
        t = time.perf_counter()
        size = ix.snapshot()
        snapshot_s = time.perf_counter() - t
        ix.close()

        def reopen():
            again = ArtIndex(d)
            try:
                assert len(again) == n
            finally:
                again.close()

        benchmark.pedantic(reopen, rounds=pick(smoke=1, quick=5, full=5), iterations=1)
        again = ArtIndex(d)
        assert again.get(data.keys[n // 2]) == data.values[n // 2]
        reopened_mem = again.stats().memory_bytes
        again.close()
        raw = n * (len(data.keys[0]) + len(data.values[0]))
        benchmark.extra_info.update({
            "n": n,
            "snapshot_bytes": size,
            "snapshot_bytes_per_record": size / n,
            "snapshot_s": snapshot_s,
            "raw_key_value_bytes": raw,
            "memory_bytes_built": mem,
            "memory_bytes_reopened": reopened_mem,
            "memory_over_raw_built": mem / raw,
            "memory_over_raw_reopened": reopened_mem / raw,
        })
    finally:
        shutil.rmtree(d, ignore_errors=True)
