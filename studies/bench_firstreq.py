"""Study: the first request of a fresh process (group ``first-request``).

What a new Python process pays before its first block is stored and read back:
``import quiver``, ``BlockStore.open``, the first ``put`` and the first ``get``,
each timed inside that process (``time.perf_counter``), torch never imported.
One fresh process per (backend, case); the parent only prepares and reads the
child's JSON.  Goal: total ≤ 1 s (studies/report_firstreq.py).  The store runs
with its default options, so the first put also creates L0's arena (256 MiB,
every page touched at creation: tier/ram.py), the largest part of that put on
this machine (0.05 s idle, over 1 s when memory is contended).

Backends: ``default`` (``BlockStore.open`` without ``index=``: the ART when
numba is installed; ``index`` in extra_info says which it took) and every
persistent index backend, ``art``, ``lmdb``, ``lsm``.

Cases:

- ``cold-install``: the first process after an installation, simulated by an
  empty compile-cache directory (``QUIVER_NUMBA_CACHE_DIR``) and a new store
  directory.  Nothing is compiled: the ART serves the first requests with its
  interpreted kernels while a background thread compiles
  (index_backends/_art_kernels.py).
- ``restart``: a later process on the same installation and store.  Before it,
  an untimed "previous server" process stored block A and compiled every kernel
  into a cache directory of this study (``warmup()``, what a long-running first
  process leaves behind; the first restart case pays that compile, 30-50 s);
  the timed process opens the store, puts block B and gets block A, which
  comes from L1 (L0 starts empty), through the index.  Smoke mode skips that
  compile: its restart cases use the user's own compile cache
  (``cache`` = "user", warm if anything ran the ART before) instead.

extra_info: ``case``, ``backend``, ``index``, ``import_s``, ``open_s``,
``first_put_s``, ``first_get_s``, ``total_s`` (their sum), ``process_s`` (the
child's wall time as the parent saw it: interpreter start, the above, and at
exit the wait for a kernel compile in flight, which only a cold-install ART
process has), ``compiled_at_first_get`` (ART kernels compiled by then),
``torch_imported`` (must be False), ``blocks``/``block_bytes`` of the put, and
for ``restart`` the prepared cache's ``compile_all_s`` (seconds the previous
process's thread spent compiling or loading every kernel; cold only in the
first case that fills the cache).
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

from .config import pick
from .conftest import make_bench_dir, run_once

REPO = Path(__file__).resolve().parent.parent
BACKENDS = pick(smoke=["default"], quick=["default", "art", "lmdb", "lsm"], full=["default", "art", "lmdb", "lsm"])
PREPARE_CACHE = pick(smoke=False, quick=True, full=True)
CASES = ["cold-install", "restart"]
# A Llama-3-8B-shaped block: 32 layers x 8 KV heads x 128 x 16 tokens, K and V, fp16 = 2 MiB.
IDENT = dict(model="meta-llama/Llama-3.1-8B", model_revision="r1", tokenizer="llama3", tokenizer_revision="r1",
             tenant="acme", kv_dtype="float16", block_tokens=16, num_layers=32, num_kv_heads=8, head_dim=128)
BLOCKS = 2

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import quiver
t1 = time.perf_counter()
import numpy as np
args = json.loads(sys.argv[1])
ident = quiver.CacheIdentity(**args["ident"])

def case(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128_000, size=args["blocks"] * ident.block_tokens).tolist()
    return tokens, rng.standard_normal((args["blocks"], *ident.block_shape)).astype(np.float16)

put_tokens, put_blocks = case(args["put_seed"])
get_tokens, get_blocks = case(args["get_seed"])
t2 = time.perf_counter()
store = quiver.BlockStore.open(args["path"], index=args["index"])
t3 = time.perf_counter()
store.put(ident, put_tokens, put_blocks)
t4 = time.perf_counter()
got = store.get(ident, get_tokens)
t5 = time.perf_counter()
assert got.tobytes() == get_blocks.tobytes(), "first get returned other bytes"
kern = sys.modules.get("quiver.index_backends._art_kernels")
compiled = kern.jit_status()["compiled"] if kern is not None else []
index = store.index
store.close()
out = {"import_s": t1 - t0, "open_s": t3 - t2, "first_put_s": t4 - t3, "first_get_s": t5 - t4,
       "index": index, "compiled_at_first_get": compiled, "torch_imported": "torch" in sys.modules,
       "block_bytes": int(put_blocks[0].nbytes)}
if args.get("warmup"):  # the untimed "previous server": leave every kernel in the cache
    from quiver.index_backends import _art_kernels as k
    st = k.warmup()
    out["compile_all_s"] = round(sum(st["seconds"].values()), 3)
    out["from_cache"] = st["from_cache"]
print(json.dumps(out))
"""


def _env(cache_dir: Path | None) -> dict:
    """The child's environment: the product's defaults (no QUIVER_ART_JIT), the
    given compile-cache directory (None: the user's own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("QUIVER_NUMBA_CACHE_DIR", "QUIVER_ART_JIT")}
    if cache_dir is not None:
        env.pop("NUMBA_CACHE_DIR", None)
        env["QUIVER_NUMBA_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _child(path: Path, index: str | None, cache_dir: Path | None, put_seed: int, get_seed: int,
           warmup: bool = False) -> dict:
    args = {"path": str(path), "index": index, "ident": IDENT, "blocks": BLOCKS, "put_seed": put_seed,
            "get_seed": get_seed, "warmup": warmup}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=_env(cache_dir), capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"first-request child failed ({r.returncode}): {r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


def _available() -> list[str]:
    from quiver import index_backends
    return index_backends.available()


@pytest.fixture(scope="module")
def scratch():
    d = make_bench_dir("firstreq")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_request(benchmark, scratch, backend, case):
    benchmark.group = "first-request"
    info = {"case": case, "backend": backend, "blocks": BLOCKS}
    if backend != "default" and backend not in _available():
        benchmark.extra_info.update(info, skipped=f"index backend {backend!r} does not import here")
        run_once(benchmark, lambda: None)
        return
    index = None if backend == "default" else backend
    store = scratch / f"{backend}-{case}" / "store"
    if case == "cold-install":
        cache = scratch / f"{backend}-{case}" / "numba-cache"  # empty: nothing compiled yet
        cache.mkdir(parents=True)
        out = run_once(benchmark, lambda: _child(store, index, cache, put_seed=1, get_seed=1))
        info["cache"] = "empty"
    else:
        if PREPARE_CACHE:
            cache = scratch / "numba-cache-warm"  # shared by the restart cases; filled by the first
            cache.mkdir(exist_ok=True)
            info["cache"] = "prepared"
        else:
            cache = None
            info["cache"] = "user"
        prev = _child(store, index, cache, put_seed=2, get_seed=2, warmup=PREPARE_CACHE)  # the previous server
        if PREPARE_CACHE:
            info["compile_all_s"] = prev.get("compile_all_s")
            info["compile_all_from_cache"] = all((prev.get("from_cache") or {"-": False}).values())
        out = run_once(benchmark, lambda: _child(store, index, cache, put_seed=3, get_seed=2))
    assert not out["torch_imported"], "the first request imported torch"
    total = out["import_s"] + out["open_s"] + out["first_put_s"] + out["first_get_s"]
    info.update({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()})
    info["total_s"] = round(total, 4)
    benchmark.extra_info.update(info)
