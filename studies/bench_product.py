"""The index study, measured through the product: ``BlockStore`` per residency-index backend.

Only the public API is used (``engine.BlockStore``, ``engine.CacheIdentity``,
``engine.keys.chain_keys`` for the hashing baseline).  Every figure is taken in
a fresh Python process (``python -m quiver.studies.bench_product child ...``), one per
measurement, so a timing or an RSS figure carries nothing of an earlier one.

Stores.  A block is ``[1 layer, 2, 16 tokens, 1 head, head_dim 8]`` float16 (a
512-byte payload) in the block-count sweep.  A store of ``N`` blocks holds the
*lookup prompt* (``LOOKUP_BLOCKS`` blocks of 16 tokens; 131,072 tokens at quick
and full sizes) plus filler prompts of ``BATCH`` blocks, each stored by one
``put`` call, until it holds N blocks.  Stores are built in a child process with
``os.fsync``/``os.fdatasync`` made no-ops there (the files written are those of
a durable build; one ``os.sync()`` at the end), because a durable put of 1M
small blocks costs ~1M fsyncs and building is not what is measured.
``ram_bytes=0`` everywhere: no L0, so every get is served by L1, as after a
restart.

At N <= ``OWN_BUILD_MAX_N`` each backend builds its own store.  Above it one
*shared base* is built by ``BUILDER`` (art when available) and every other
backend opens that same store: its first (warm-up) open rebuilds its index from
the WAL (timed and recorded as ``first_open_s``), the later opens are the steady
state.  Memory-only backends (flat, sorted) rebuild at every open by design.

Sizes run in the order smallest N, largest N, then the others, so that a
tight budget drops a middle size rather than the 1M one.

Groups and their ``extra_info``:

* ``product-build``: the build.  ``put_blocks_per_s`` (fsync masked),
  ``rss_after_put_per_block`` (process RSS after the puts minus a baseline taken
  in the same process after opening, filling and closing a tiny store with the
  same backend, divided by blocks), ``index_bytes_per_put`` /
  ``index_bytes_per_block``: what the index wrote over the build's last
  ``TAIL_PUTS`` puts (``index_tail_puts``), per put / per block --
  ``index_bytes_source`` says how: "stats (index bytes_written)" when
  ``store.stats()["tiers"]["l1"]`` exposes the index's own ``bytes_written``, else
  "index dir growth (os.walk)" of ``<store>/l1/index*`` (net growth: a rewrite
  in place is not counted).
* ``product-open``: ``BlockStore.open`` + one ``get`` of one stored block, page
  cache warm, each repetition in a fresh process after a warm-up open (so the
  ART's Numba cache on disk is warm).  In each child the backend's code is
  loaded first by opening a tiny store (``code_load_s``), then the big store is
  opened: ``open_s``, ``get_s``, ``open_get_s`` (medians over ``reps``),
  ``rss_per_block`` (VmRSS after open + get minus before, / blocks),
  ``rss_anon_per_block`` (RssAnon), ``index_disk_per_block`` (the index's own
  files), ``rss_excess_per_block`` = rss_per_block - index_disk_per_block.
  The last repetition's process then measures ``lookup`` of the lookup prompt
  all-hit and all-miss (its first token changed) beside ``chain_keys`` of the
  same tokens: ``hash_ms``, ``hit_ms``, ``miss_ms`` (medians), ``hit_over_hash``.
* ``product-open-bytes``: the same open + first get at a fixed block count
  (the sweep's smallest N) with payloads scaled so the store holds ~1 GB,
  ~4 GB (quick) and ~10 GB (full); one shared store per size, built by the
  first backend.

A measurement that does not fit the study's time budget (``BUDGET_S``), or the
disk (``DISK_FACTOR`` × its size free), is recorded with a ``skipped`` reason
instead of figures: each size's cost is predicted from the smaller sizes
measured before it (linear in N, the pessimistic case) and skipped when it
would not fit.

Run just this study:  ``python -m quiver.studies.cli run -- studies/bench_product.py``
(``QUIVER_SMOKE=1`` for tiny sizes, ``--full`` for full ones), then
``python -m quiver.studies.cli report``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KiB, MiB, GB = 1 << 10, 1 << 20, 10**9

# ----------------------------------------------------------------------------- the child process
# Kept above the pytest imports' users: ``python -m quiver.studies.bench_product child ARGS`` runs one
# measurement and prints one JSON line.


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tree_bytes(root: str) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``root``."""
    apparent = allocated = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def _index_dirs(store_path: str) -> list[str]:
    """The index's own files: ``<store>/l1/index*`` (absent for memory-only backends)."""
    l1 = os.path.join(store_path, "l1")
    try:
        return [os.path.join(l1, d) for d in sorted(os.listdir(l1)) if d.startswith("index")]
    except FileNotFoundError:
        return []


def _index_disk(store_path: str) -> int:
    return sum(_tree_bytes(d)[0] for d in _index_dirs(store_path))


def _index_bytes_written(stats: dict):
    """The index's own bytes_written, if ``store.stats()["tiers"]["l1"]`` exposes it (None otherwise)."""
    l1 = stats["tiers"]["l1"]
    for path in (("index_bytes_written",), ("index", "bytes_written"), ("index_stats", "bytes_written"),
                 ("volume", "index_bytes_written"), ("volume", "index", "bytes_written")):
        obj = l1
        for part in path:
            obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, int) and not isinstance(obj, bool):
            return obj
    return None


def _spec_payload(spec: dict) -> int:
    """Payload bytes of one block of the identity ``spec`` (16 tokens, K and V, float16)."""
    return spec["layers"] * 2 * 16 * spec["heads"] * spec["head_dim"] * 2


def _identity(spec: dict):
    from quiver.engine import CacheIdentity

    return CacheIdentity(model="quiver/bench-product", model_revision="1", tokenizer="bench", tokenizer_revision="1",
                         adapter=None, tenant="bench", kv_dtype="float16", block_tokens=16,
                         num_layers=spec["layers"], num_kv_heads=spec["heads"], head_dim=spec["head_dim"])


def _payloads(ident, count: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (count, *ident.block_shape)
    return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(np.float16)


def _lookup_tokens(blocks: int):
    import numpy as np

    return np.arange(blocks * 16, dtype=np.uint32) + np.uint32(3_000_000_000)


def _filler_tokens(p: int, batch: int):
    import numpy as np

    return np.arange(batch * 16, dtype=np.uint32) + np.uint32(p * batch * 16 + 1)


def _warm_code(root: str, backend: str, ident) -> float:
    """Open, fill, read and close a tiny store with ``backend``: loads its code (and Numba's cache)."""
    from quiver.engine import BlockStore

    tiny = root + ".tiny"
    shutil.rmtree(tiny, ignore_errors=True)
    t0 = time.perf_counter()
    with BlockStore.open(tiny, index=backend, ram_bytes=0) as st:
        toks = _filler_tokens(10**6, 4)
        st.put(ident, toks, _payloads(ident, 4, 7))
        assert st.lookup(ident, toks) == 4
        st.get(ident, toks, n_blocks=4)
    sec = time.perf_counter() - t0
    shutil.rmtree(tiny, ignore_errors=True)
    return sec


def child_build(a: dict) -> dict:
    os.fsync = lambda fd: None       # building is not what is measured: see the module docstring
    os.fdatasync = lambda fd: None
    from quiver.engine import BlockStore

    ident = _identity(a["ident"])
    n, batch, lookup_blocks = a["n"], a["batch"], a["lookup_blocks"]
    shutil.rmtree(a["path"], ignore_errors=True)
    code_s = _warm_code(a["path"], a["backend"], ident)
    _trim()
    base = _status()
    blocks = _payloads(ident, batch, a["seed"])
    fillers = -(-(n - lookup_blocks) // batch)
    tail = min(a.get("tail_puts", 8), fillers)       # index bytes are measured over the last `tail` puts
    puts = 0
    t0 = time.perf_counter()
    with BlockStore.open(a["path"], index=a["backend"], ram_bytes=0) as st:
        lookup_payload = _payloads(ident, lookup_blocks, a["seed"] + 1)
        assert st.put(ident, _lookup_tokens(lookup_blocks), lookup_payload) == lookup_blocks
        del lookup_payload
        puts += 1
        left, p, tail_blocks = n - lookup_blocks, 0, 0
        idx0 = bw0 = None
        while left > 0:
            if p == fillers - tail:
                idx0, bw0 = _index_disk(a["path"]), _index_bytes_written(st.stats())
            k = min(batch, left)
            assert st.put(ident, _filler_tokens(p, batch), blocks[:k]) == k
            if p >= fillers - tail:
                tail_blocks += k
            left -= k
            p += 1
            puts += 1
        idx1, bw1 = _index_disk(a["path"]), _index_bytes_written(st.stats())
        put_s = time.perf_counter() - t0
        _trim()
        after = _status()
        held = st.stats()["residency"]["l1"]
    idx_closed = _index_disk(a["path"])
    t1 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t1
    apparent, allocated = _tree_bytes(a["path"])
    if bw0 is not None and bw1 is not None:
        idx_bytes, source = bw1 - bw0, "stats (index bytes_written)"
    elif idx0 is not None:
        idx_bytes, source = idx1 - idx0, "index dir growth (os.walk)"
    else:
        idx_bytes, source = None, None
    return dict(
        blocks=held, put_calls=puts, last_prompt=p - 1 if p else None, put_s=put_s, sync_s=sync_s,
        put_blocks_per_s=n / put_s, code_load_s=code_s, rss_base=base["VmRSS"], rss_after_put=after["VmRSS"],
        rss_after_put_per_block=(after["VmRSS"] - base["VmRSS"]) / n,
        rss_anon_after_put_per_block=(after.get("RssAnon", 0) - base.get("RssAnon", 0)) / n,
        index_tail_puts=tail, index_tail_blocks=tail_blocks, index_bytes=idx_bytes, index_bytes_source=source,
        index_bytes_per_put=idx_bytes / tail if idx_bytes is not None and tail else None,
        index_bytes_per_block=idx_bytes / tail_blocks if idx_bytes is not None and tail_blocks else None,
        index_disk_bytes=idx_closed, index_disk_per_block=idx_closed / n, store_bytes=apparent,
        store_allocated_bytes=allocated, payload_bytes=n * _spec_payload(a["ident"]),
    )


def child_open(a: dict) -> dict:
    from quiver.engine import BlockStore
    from quiver.engine.keys import chain_keys

    ident = _identity(a["ident"])
    code_s = _warm_code(a["path"], a["backend"], ident)
    _trim()
    base = _status()
    probe = _filler_tokens(a["probe_prompt"], a["batch"]) if a["probe_prompt"] is not None else _lookup_tokens(1)
    t0 = time.perf_counter()
    st = BlockStore.open(a["path"], index=a["backend"], ram_bytes=0)
    t1 = time.perf_counter()
    got = st.get(ident, probe, n_blocks=1)
    t2 = time.perf_counter()
    after = _status()
    out = dict(open_s=t1 - t0, get_s=t2 - t1, open_get_s=t2 - t0, code_load_s=code_s)
    try:
        assert got.shape == (1, *ident.block_shape)
        stats = st.stats()
        blocks = stats["residency"]["l1"]
        out.update(blocks=blocks, rss_base=base["VmRSS"], rss_after_open=after["VmRSS"],
                   rss_delta=after["VmRSS"] - base["VmRSS"], rss_anon_delta=after.get("RssAnon", 0) - base.get("RssAnon", 0),
                   rss_file_delta=after.get("RssFile", 0) - base.get("RssFile", 0),
                   index_disk_bytes=_index_disk(a["path"]))
        if a.get("lookup"):
            L = a["lookup_blocks"]
            hit = _lookup_tokens(L)
            miss = hit.copy()
            miss[0] = 4_000_000_000
            assert st.lookup(ident, hit) == L, "lookup prompt not all present"
            assert st.lookup(ident, miss) == 0
            assert len(chain_keys(ident, hit)) == L
            hs, hh, ms = [], [], []
            for _ in range(a["lookup_reps"]):   # interleaved, so drift hits both alike
                s0 = time.perf_counter()
                chain_keys(ident, hit)
                s1 = time.perf_counter()
                st.lookup(ident, hit)
                s2 = time.perf_counter()
                hs.append(s1 - s0)
                hh.append(s2 - s1)
            for _ in range(a["miss_reps"]):
                s0 = time.perf_counter()
                st.lookup(ident, miss)
                ms.append(time.perf_counter() - s0)
            out.update(lookup_blocks=L, lookup_tokens=L * 16, hash_ms=statistics.median(hs) * 1e3,
                       hit_ms=statistics.median(hh) * 1e3, miss_ms=statistics.median(ms) * 1e3,
                       hash_min_ms=min(hs) * 1e3, hit_min_ms=min(hh) * 1e3, miss_min_ms=min(ms) * 1e3,
                       lookup_reps=len(hh), miss_reps=len(ms))
    finally:
        st.close()
    return out


def _child_main(argv: list[str]) -> int:
    cmd, args = argv[0], json.loads(argv[1])
    fn = {"build": child_build, "open": child_open}[cmd]
    print("QUIVER-RESULT " + json.dumps(fn(args)), flush=True)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    sys.exit(_child_main(sys.argv[2:]))

# ----------------------------------------------------------------------------- the study (pytest)
import pytest  # noqa: E402

from quiver import index_backends  # noqa: E402
from .config import MODE, pick  # noqa: E402
from .conftest import make_bench_dir, run_once  # noqa: E402

BACKENDS = pick(smoke=[b for b in index_backends.available() if b in ("flat", "lmdb")],
                quick=index_backends.available(), full=index_backends.available())
PERSISTENT = [b for b in ("art", "lmdb", "lsm") if b in BACKENDS]
ORDER = PERSISTENT + [b for b in BACKENDS if b not in PERSISTENT]      # persistent first: they matter most
BUILDER = ORDER[0] if ORDER else None

SIZES = pick(smoke=[256, 1024], quick=[10_000, 100_000, 1_000_000], full=[10_000, 100_000, 1_000_000])
# Run order: the smallest N first (it predicts the others), then the largest (the goals are set there), then the
# rest, so a tight budget drops a middle size rather than the 1M one.
RUN_ORDER = SIZES[:1] + SIZES[-1:] + SIZES[1:-1] if len(SIZES) > 1 else SIZES
OWN_BUILD_MAX_N = pick(smoke=1024, quick=10_000, full=100_000)   # above: one shared base per N
MEMORY_ONLY_MAX_N = pick(smoke=1024, quick=100_000, full=1_000_000)
BATCH = 1024                                                      # blocks per put call
LOOKUP_BLOCKS = pick(smoke=128, quick=8192, full=8192)            # 131,072 tokens at quick/full
SMALL = {"layers": 1, "heads": 1, "head_dim": 8}                  # 512-byte payload
REPS = pick(smoke=1, quick=3, full=5)
WARMUP = pick(smoke=False, quick=True, full=True)                 # a warm-up open in its own process first
SLOW_OPEN_S = pick(smoke=5.0, quick=4.0, full=30.0)               # above this, one repetition only
LOOKUP_REPS = pick(smoke=3, quick=15, full=31)
MISS_REPS = pick(smoke=20, quick=201, full=501)
TAIL_PUTS = 8                                                     # index bytes per put: the build's last puts
BYTES_TARGETS = pick(smoke=[2 * MiB, 8 * MiB], quick=[1 * GB, 4 * GB], full=[1 * GB, 4 * GB, 10 * GB])
BYTES_REPS = pick(smoke=1, quick=5, full=5)                      # a ratio of two opens: more repetitions
BYTES_BACKENDS = pick(smoke=ORDER, quick=PERSISTENT or ORDER, full=ORDER)
BUDGET_S = pick(smoke=30.0, quick=900.0, full=3600.0)            # the study's whole wall time, at most
BYTES_RESERVE_S = pick(smoke=8.0, quick=80.0, full=900.0)        # kept for the bytes sweep
CHILD_TIMEOUT_S = pick(smoke=60, quick=600, full=3600)
CHILD_OVERHEAD_S = 1.5                                            # interpreter + imports + tiny store
DISK_FACTOR = 3                                                   # free space needed, × the store's size

_T0: list[float] = []
_STATE: dict = {"builds": {}, "opens": {}, "stores": {}, "rates": []}


def _now() -> float:
    if not _T0:
        _T0.append(time.perf_counter())
    return time.perf_counter() - _T0[0]


def _left(reserve: float = 0.0) -> float:
    return BUDGET_S - reserve - _now()


def _run_child(cmd: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "quiver.studies.bench_product", "child", cmd, json.dumps(args)],
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("QUIVER-RESULT "):
            return json.loads(line[len("QUIVER-RESULT "):])
    raise AssertionError(f"child {cmd} failed (rc {proc.returncode}): {proc.stderr[-3000:]}")




@pytest.fixture(scope="module")
def scratch():
    d = make_bench_dir("product")
    _now()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _need_bytes(n: int, payload: int) -> int:
    """Disk a store of n blocks of ``payload`` bytes takes: objects rounded to 4 KiB + WAL + index."""
    per = ((payload + 1024 + 4095) // 4096) * 4096 + 256
    return n * per + 64 * MiB


def _disk_ok(scratch, need: int) -> str | None:
    free = shutil.disk_usage(scratch).free
    if free < DISK_FACTOR * need:
        return f"disk: {free / GB:.1f} GB free < {DISK_FACTOR} × {need / GB:.2f} GB needed"
    return None


def _predict_open(backend: str, n: int) -> float:
    """Seconds one open (+ get) is expected to take: linear in N from this backend's nearest measured N
    (pessimistic when open costs the WAL tail only), else from any backend at that N, else a guess."""
    known = [(abs(m - n), m, s) for (b, m), s in _STATE["opens"].items() if b == backend and isinstance(m, int)]
    if known:
        _d, m, s = min(known)
        return s * n / m if m < n else s
    same = [s for (b, m), s in _STATE["opens"].items() if m == n]
    if same:
        return max(same)
    return 0.5 + n * 5e-6


def _predict_build(n: int, payload: int) -> float:
    rate = statistics.median(_STATE["rates"]) if _STATE["rates"] else 5000.0   # blocks/s, fsync masked
    return n / rate + n * payload / 300e6 + CHILD_OVERHEAD_S + n * 20e-6      # + sync


def _reps_for(pred: float) -> int:
    return 1 if pred > SLOW_OPEN_S else REPS


def _case_plan(n: int, backend: str) -> str | None:
    """Why (n, backend) is not measured by design (memory-only backends at the largest N), or None."""
    if backend not in PERSISTENT and n > MEMORY_ONLY_MAX_N:
        return (f"not run at N = {n:,} in {MODE} mode: memory-only backend, rebuilt from the WAL at every open "
                f"(O(N) by design); largest N for it: {MEMORY_ONLY_MAX_N:,}")
    return None


def _owner(n: int, backend: str) -> str:
    return backend if n <= OWN_BUILD_MAX_N else BUILDER


def _users(n: int) -> list[str]:
    return [b for b in ORDER if _case_plan(n, b) is None]


def _open_cost(n: int, backend: str, reps: int | None = None) -> tuple[float, int]:
    """(predicted seconds of this backend's open row at N: warm-up + reps, the last with the lookups; reps)."""
    pred = _predict_open(backend, n)
    foreign = _owner(n, backend) != backend and backend in PERSISTENT
    warm = (pred * (3 if foreign else 1) + CHILD_OVERHEAD_S) if WARMUP else 0.0   # a foreign index is rebuilt
    reps = _reps_for(pred) if reps is None else reps
    return warm + reps * (pred + CHILD_OVERHEAD_S) + 1.0, reps


# ----------------------------------------------------------------------------- block-count sweep
def _cases() -> list[tuple[str, int, str]]:
    out = []
    for n in RUN_ORDER:
        for b in ORDER:
            if _case_plan(n, b) is None and (n <= OWN_BUILD_MAX_N or b == BUILDER):
                out.append(("build", n, b))
            out.append(("open", n, b))
    return out


def _store_path(scratch, n: int, backend: str) -> str:
    return os.path.join(str(scratch), f"n{n}-{_owner(n, backend)}")


def _drop_store(scratch, n: int, backend: str) -> None:
    """Delete the store once its last row is done."""
    users = _users(n)
    if n <= OWN_BUILD_MAX_N or not users or backend == users[-1]:
        path = _store_path(scratch, n, backend)
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path + ".tiny", ignore_errors=True)


def _skip_row(benchmark, info: dict, reason: str) -> None:
    run_once(benchmark, lambda: None)
    benchmark.extra_info.update(info, skipped=reason, study_elapsed_s=_now())


def _build_skip(scratch, n: int, backend: str) -> str | None:
    """Why the store for (n, backend) is not built: disk or time budget (its opens included)."""
    need = _need_bytes(n, _spec_payload(SMALL))
    users = _users(n) if n > OWN_BUILD_MAX_N else [backend]
    pred = _predict_build(n, _spec_payload(SMALL)) + sum(_open_cost(n, b)[0] for b in users)
    why = _disk_ok(scratch, need)
    if why is None and pred > _left(BYTES_RESERVE_S):
        why = (f"time budget: building {n:,} blocks and opening it predicted {pred:.0f} s (opens extrapolated "
               f"linearly in N from the sizes measured before it) > {max(0.0, _left(BYTES_RESERVE_S)):.0f} s left of "
               f"the study's {BUDGET_S:.0f} s")
    return why


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_product_blocks(benchmark, scratch, case):
    step, n, backend = case
    benchmark.group = f"product-{step}"
    owner = _owner(n, backend)
    path = _store_path(scratch, n, backend)
    info = dict(backend=backend, n=n, payload_bytes_per_block=_spec_payload(SMALL), batch=BATCH,
                lookup_blocks=min(LOOKUP_BLOCKS, n), ram_bytes=0, mode=MODE, store_built_by=owner,
                shared_base=n > OWN_BUILD_MAX_N)
    why = _case_plan(n, backend)
    if why:
        return _skip_row(benchmark, info, why)

    if step == "build":
        why = _build_skip(scratch, n, backend)
        if why:
            _STATE["stores"][(n, owner, "skip")] = why
            return _skip_row(benchmark, info, why)
        args = dict(path=path, backend=backend, n=n, batch=BATCH, lookup_blocks=min(LOOKUP_BLOCKS, n),
                    ident=SMALL, seed=n, tail_puts=TAIL_PUTS)
        r = run_once(benchmark, lambda: _run_child("build", args))
        _STATE["builds"][(n, backend)] = r
        _STATE["rates"].append(r["put_blocks_per_s"])
        assert r["blocks"] == n
        benchmark.extra_info.update(info, **r, study_elapsed_s=_now(),
                                    fsync="masked in the build process (os.fsync no-op), os.sync() after")
        return None

    # open + first get; the last repetition also measures lookup
    built = _STATE["builds"].get((n, owner))
    if built is None:
        return _skip_row(benchmark, info, _STATE["stores"].get((n, owner, "skip"))
                         or f"no store: the build of N = {n:,} by {owner} failed")
    cost, reps = _open_cost(n, backend)
    if cost > _left(BYTES_RESERVE_S) and reps > 1:
        cost, reps = _open_cost(n, backend, reps=1)
    if cost > _left(BYTES_RESERVE_S):
        _drop_store(scratch, n, backend)
        return _skip_row(benchmark, info, f"time budget: the opens predicted {cost:.0f} s > "
                                          f"{max(0.0, _left(BYTES_RESERVE_S)):.0f} s left of the study's {BUDGET_S:.0f} s")
    args = dict(path=path, backend=backend, ident=SMALL, batch=BATCH, probe_prompt=built.get("last_prompt"),
                lookup=False, lookup_blocks=min(LOOKUP_BLOCKS, n), lookup_reps=LOOKUP_REPS, miss_reps=MISS_REPS)

    def measure():
        # warm-up: page cache, Numba cache; a shared base's foreign index is rebuilt from the WAL here
        first = _run_child("open", args) if WARMUP else None
        runs = [_run_child("open", dict(args, lookup=i == reps - 1)) for i in range(reps)]
        return first or runs[0], runs

    try:
        first, runs = run_once(benchmark, measure)
    finally:
        _drop_store(scratch, n, backend)
    keys = ("open_s", "get_s", "open_get_s", "code_load_s", "rss_delta", "rss_anon_delta", "rss_file_delta")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    last = runs[-1]
    blocks = last["blocks"]
    assert blocks == n, (blocks, n)
    idx_disk = last["index_disk_bytes"]
    _STATE["opens"][(backend, n)] = max(r["open_get_s"] for r in runs)
    benchmark.extra_info.update(
        info, blocks=blocks, reps=reps, **med, open_get_all_s=[r["open_get_s"] for r in runs],
        open_get_min_s=min(r["open_get_s"] for r in runs),
        first_open_s=first["open_s"], first_open_get_s=first["open_get_s"],
        first_open_note=("no warm-up open (smoke): the timed open" if not WARMUP else
                         "index rebuilt from the WAL (store built by " + owner + ")" if backend != owner
                         and backend in PERSISTENT else "warm-up"),
        rss_per_block=med["rss_delta"] / blocks, rss_anon_per_block=med["rss_anon_delta"] / blocks,
        rss_file_per_block=med["rss_file_delta"] / blocks, index_disk_bytes=idx_disk,
        index_disk_per_block=idx_disk / blocks, rss_excess_per_block=(med["rss_delta"] - idx_disk) / blocks,
        rss_after_put_per_block=built.get("rss_after_put_per_block") if backend == owner else None,
        store_bytes=built.get("store_bytes"), store_allocated_bytes=built.get("store_allocated_bytes"),
        page_cache="warm (a warm-up open in its own process first)" if WARMUP else "as the build left it (smoke)",
        # lookup of the lookup prompt, in the last repetition's process, after its timed open + get and RSS
        lookup_tokens=last["lookup_tokens"], hash_ms=last["hash_ms"], hit_ms=last["hit_ms"], miss_ms=last["miss_ms"],
        hash_min_ms=last["hash_min_ms"], hit_min_ms=last["hit_min_ms"], miss_min_ms=last["miss_min_ms"],
        hit_over_hash=last["hit_ms"] / last["hash_ms"], lookup_reps=last["lookup_reps"], miss_reps=last["miss_reps"],
        token_input="numpy uint32 array", hashing="quiver.engine.keys.chain_keys of the same tokens",
        study_elapsed_s=_now(),
    )
    return None


# ----------------------------------------------------------------------------- bytes sweep
def _bytes_spec(target: int, n: int) -> dict:
    """An identity whose payload makes n blocks hold about ``target`` bytes (head_dim 128, heads scaled)."""
    per_head = 2 * 16 * 128 * 2            # K and V, 16 tokens, head_dim 128, float16
    heads = max(1, round(target / n / per_head))
    return {"layers": 1, "heads": heads, "head_dim": 128}


def _bytes_cases() -> list[tuple[int, str]]:
    return [(t, b) for t in BYTES_TARGETS for b in BYTES_BACKENDS]


def _gb_label(t: int) -> str:
    return f"{t / GB:g}GB" if t >= GB else f"{t // MiB}MiB"


@pytest.mark.parametrize("case", _bytes_cases(), ids=lambda c: f"{_gb_label(c[0])}-{c[1]}")
def test_product_open_vs_bytes(benchmark, scratch, case):
    target, backend = case
    benchmark.group = "product-open-bytes"
    n = SIZES[0]
    spec = _bytes_spec(target, n)
    payload = _spec_payload(spec)
    batch = max(1, min(BATCH, (64 * MiB) // payload))
    owner = BYTES_BACKENDS[0]
    path = os.path.join(str(scratch), f"bytes-{target}")
    info = dict(backend=backend, n=n, target_bytes=target, payload_bytes_per_block=payload,
                payload_bytes=n * payload, batch=batch, ram_bytes=0, store_built_by=owner, mode=MODE)
    key = ("bytes", target)
    if backend == owner:   # the first row of this size builds the shared store
        skip = _disk_ok(scratch, _need_bytes(n, payload))
        pred = _predict_build(n, payload) + len(BYTES_BACKENDS) * (1 + WARMUP) * (CHILD_OVERHEAD_S + 0.5 + n * payload / 2e9)
        if skip is None and pred > _left():
            skip = (f"time budget: building {n * payload / GB:.1f} GB and opening it predicted {pred:.0f} s > "
                    f"{max(0.0, _left()):.0f} s left of the study's {BUDGET_S:.0f} s")
        if skip is None:
            args = dict(path=path, backend=owner, n=n, batch=batch, lookup_blocks=1, ident=spec, seed=target % 9973)
            try:
                _STATE["stores"][key] = _run_child("build", args)
            except Exception as exc:  # noqa: BLE001 - recorded as the reason
                shutil.rmtree(path, ignore_errors=True)
                _STATE["stores"][key] = None
                _STATE["stores"][(key, "skip")] = f"build failed: {str(exc)[:200]}"
        else:
            _STATE["stores"][key] = None
            _STATE["stores"][(key, "skip")] = skip
    built = _STATE["stores"].get(key)
    last = backend == BYTES_BACKENDS[-1]
    try:
        if built is None:
            return _skip_row(benchmark, info, _STATE["stores"].get((key, "skip")) or "no store")
        pred = _STATE["opens"].get((backend, ("bytes", target)), 0.5 + n * payload / 1e9)
        reps = BYTES_REPS if pred <= SLOW_OPEN_S else 1
        if (1 + reps) * (pred + CHILD_OVERHEAD_S) > _left() and reps > 1:
            reps = 1
        if 2 * (pred + CHILD_OVERHEAD_S) > _left():
            return _skip_row(benchmark, info,
                             f"time budget: 2 opens predicted {2 * pred:.0f} s > {max(0.0, _left()):.0f} s left")
        args = dict(path=path, backend=backend, ident=spec, batch=batch, probe_prompt=built.get("last_prompt"),
                    lookup=False)

        def measure():
            first = _run_child("open", args) if WARMUP else None
            runs = [_run_child("open", args) for _ in range(reps)]
            return first or runs[0], runs

        first, runs = run_once(benchmark, measure)
        med = {k: statistics.median(r[k] for r in runs) for k in ("open_s", "get_s", "open_get_s", "code_load_s")}
        _STATE["opens"][(backend, ("bytes", target))] = max(r["open_get_s"] for r in runs)
        # the next (larger) size predicts from this one, linear in bytes
        for t in BYTES_TARGETS:
            if t > target:
                _STATE["opens"].setdefault((backend, ("bytes", t)), max(r["open_get_s"] for r in runs) * t / target)
        benchmark.extra_info.update(
            info, blocks=runs[-1]["blocks"], reps=reps, **med, open_get_all_s=[r["open_get_s"] for r in runs],
            open_get_min_s=min(r["open_get_s"] for r in runs),
            first_open_s=first["open_s"], store_bytes=built.get("store_bytes"),
            stored_gb=(built.get("store_bytes") or 0) / GB, study_elapsed_s=_now(),
            page_cache="warm (a warm-up open in its own process first)" if WARMUP else "as the build left it (smoke: no warm-up open)",
        )
        return None
    finally:
        if last:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path + ".tiny", ignore_errors=True)
