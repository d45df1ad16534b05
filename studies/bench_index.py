"""Residency-index study: every backend in ``index_backends.available()`` at every size.

Records are Quiver's: 48-byte keys (16-byte identity namespace + 32-byte block
key, 64 namespaces) from the shared-prefix workload, 16-byte values.  Each
(backend, N) dataset is built once (the ``index-insert`` measurement), every
other operation runs against it, then it is closed and deleted.

Each backend first runs every operation once on a throwaway index (untimed), so
one-time costs such as Numba compilation are not charged to a measurement.

Groups and what ``extra_info`` holds (times per single call unless said):

- index-insert:        put_many in batches of 10,000 + flush into a fresh index
                       (1-5 rounds by N); records/s of the median round, RSS delta
- index-get:           10k random single get() calls; p50/p99/mean us
- index-get_many:      batches of 1,000 keys; keys/s, per-batch p50/p99
- index-scan:          scan_prefix(namespace) consumed fully; p50/p99, records returned
- index-replica-scan:  scan_prefix(one full 48-byte key): all records of one block
- index-longest-prefix: longest_prefix over request chains; p50/p99, chains/s
- index-footprint:     bytes on disk, bytes written, write amplification, memory
- index-reopen:        close + open + len (persistent backends only; memory-only
                       backends are skipped and the report says n/a)
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import random
import shutil
import time

import pytest

from quiver import index_backends
from .config import pick
from .conftest import make_bench_dir
from .workloads import (
    KEY_BYTES,
    NAMESPACE_BYTES,
    VALUE_BYTES,
    index_dataset,
    latency_summary,
    warm_up_backend,
)

SIZES = pick(smoke=[2_000], quick=[10_000, 100_000, 1_000_000], full=[10_000, 100_000, 1_000_000])
BACKENDS = index_backends.available()
BATCH = 10_000
GET_CALLS = pick(smoke=500, quick=10_000, full=20_000)
GET_MANY_KEYS = pick(smoke=2_000, quick=100_000, full=200_000)
GET_MANY_BATCH = 1_000
SCAN_CALLS = pick(smoke=4, quick=32, full=64)
REPLICA_CALLS = pick(smoke=200, quick=2_000, full=10_000)
PROBES = pick(smoke=200, quick=2_000, full=5_000)
# A timed loop stops after this many seconds once it has MIN_CALLS samples, so
# an O(N) scan at 1M records cannot eat the run; the call count is recorded.
LOOP_BUDGET_S = pick(smoke=0.5, quick=3.0, full=10.0)
MIN_CALLS = 5

_DATASET: dict = {}


def _insert_rounds(n: int) -> int:
    """Builds to time per (backend, N): more for small N, where one build is short and noisy."""
    return pick(smoke=1, quick=1 if n >= 1_000_000 else (3 if n >= 100_000 else 5), full=3 if n >= 1_000_000 else 5)


def _dataset(n: int):
    """The dataset of size ``n``; only the latest size is kept in memory."""
    if _DATASET.get("n") != n:
        _DATASET.clear()
        gc.collect()
        data = index_dataset(n, probes=PROBES)
        _DATASET.update(n=n, data=data, keyset=set(data.keys), ns_counts=collections.Counter(k[:NAMESPACE_BYTES] for k in data.keys))
    return _DATASET


def _rss() -> int:
    """Resident set size of this process in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Collect garbage and hand free heap back to the OS, so an RSS delta means something."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Case:
    """One (backend, N): its directory, its index handle and what the build measured."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n
        self.dir = make_bench_dir(f"index-{name}-{n}")
        self.index = None
        self.build_info: dict | None = None
        self.rss_before = 0

    @property
    def data(self):
        return _dataset(self.n)["data"]

    def open_empty(self) -> None:
        """Fresh empty index (benchmark setup: not timed)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.data  # noqa: B018 - make sure the dataset exists before the RSS baseline
        _trim()
        self.rss_before = _rss()
        self.index = index_backends.open(self.name, str(self.dir))

    def fill(self) -> None:
        """put_many in batches of BATCH, then flush (timed)."""
        keys, values = self.data.keys, self.data.values
        put_many = self.index.put_many
        for i in range(0, len(keys), BATCH):
            put_many(keys[i : i + BATCH], values[i : i + BATCH])
        self.index.flush()

    def after_fill(self, seconds: float) -> None:
        rss_after = _rss()
        st = self.index.stats()
        assert st.records == self.n == len(self.index)
        logical = self.n * (KEY_BYTES + VALUE_BYTES)
        self.build_info = {
            "insert_s": seconds,  # the median round's build time
            "records_per_s": self.n / seconds if seconds > 0 else None,
            "rss_delta_bytes": rss_after - self.rss_before,
            "memory_bytes": st.memory_bytes or None,
            "bytes_on_disk": st.bytes_on_disk,
            "bytes_written": st.bytes_written,
            "logical_bytes": logical,
            "write_amplification": st.bytes_written / logical if st.persistent else None,
            "persistent": st.persistent,
            "detail": _jsonable(st.detail),
        }

    def ensure(self):
        """The filled index (builds it if the insert study did not run)."""
        if self.index is None:
            self.open_empty()
            t = time.perf_counter()
            self.fill()
            self.after_fill(time.perf_counter() - t)
        return self.index

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index = None

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        _trim()


def _jsonable(obj):
    """``obj`` with anything JSON cannot hold turned into a string."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj)


@pytest.fixture(
    scope="module",
    params=[(b, n) for n in SIZES for b in BACKENDS],
    ids=[f"{b}-{n}" for n in SIZES for b in BACKENDS],
)
def case(request):
    c = Case(*request.param)
    warm = make_bench_dir(f"warmup-{c.name}")
    try:
        warm_up_backend(c.name, warm)
    finally:
        shutil.rmtree(warm, ignore_errors=True)
    yield c
    c.destroy()


def _common(benchmark, case: Case, group: str) -> None:
    benchmark.group = group
    benchmark.extra_info.update({"backend": case.name, "n": case.n})


def _timed_loop(fn, args: list, budget_s: float = LOOP_BUDGET_S) -> tuple[list[int], list]:
    """Call ``fn(a)`` for each a (until the budget runs out); per-call ns and results."""
    samples, results = [], []
    pc = time.perf_counter_ns
    deadline = pc() + int(budget_s * 1e9)
    for a in args:
        t0 = pc()
        r = fn(a)
        t1 = pc()
        samples.append(t1 - t0)
        results.append(r)
        if t1 > deadline and len(samples) >= MIN_CALLS:
            break
    return samples, results


def test_insert(benchmark, case):
    _common(benchmark, case, "index-insert")
    times: list[float] = []

    def run():
        t0 = time.perf_counter()
        case.fill()
        times.append(time.perf_counter() - t0)

    # Each round builds a fresh index; the last one is kept for the other studies.
    benchmark.pedantic(run, setup=case.open_empty, rounds=_insert_rounds(case.n), iterations=1)
    median = sorted(times)[(len(times) - 1) // 2]
    case.after_fill(median)
    benchmark.extra_info.update(
        {"batch": BATCH, "rounds": len(times), **{k: v for k, v in case.build_info.items() if k != "detail"}}
    )


def test_get(benchmark, case):
    _common(benchmark, case, "index-get")
    index = case.ensure()
    data = case.data
    rng = random.Random(1)
    picks = [rng.randrange(case.n) for _ in range(GET_CALLS)]
    keys = [data.keys[i] for i in picks]
    out = {}

    def run():
        out["samples"], out["values"] = _timed_loop(index.get, keys, budget_s=1e9)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert out["values"] == [data.values[i] for i in picks]
    benchmark.extra_info.update(latency_summary(out["samples"]))


def test_get_many(benchmark, case):
    _common(benchmark, case, "index-get_many")
    index = case.ensure()
    data = case.data
    rng = random.Random(2)
    picks = [rng.randrange(case.n) for _ in range(GET_MANY_KEYS)]
    batches = [[data.keys[i] for i in picks[j : j + GET_MANY_BATCH]] for j in range(0, len(picks), GET_MANY_BATCH)]
    out = {}

    def run():
        t0 = time.perf_counter()
        out["samples"], out["values"] = _timed_loop(index.get_many, batches, budget_s=1e9)
        out["s"] = time.perf_counter() - t0

    benchmark.pedantic(run, rounds=1, iterations=1)
    got = [v for batch in out["values"] for v in batch]
    assert got == [data.values[i] for i in picks]
    lat = latency_summary(out["samples"])
    benchmark.extra_info.update(
        {
            "batch": GET_MANY_BATCH,
            "keys": len(picks),
            "keys_per_s": len(picks) / out["s"],
            "per_key_us": out["s"] / len(picks) * 1e6,
            "batch_p50_us": lat["p50_us"],
            "batch_p99_us": lat["p99_us"],
        }
    )


def _scan_count(index, prefix: bytes) -> int:
    n = 0
    for _ in index.scan_prefix(prefix):
        n += 1
    return n


def test_scan(benchmark, case):
    _common(benchmark, case, "index-scan")
    index = case.ensure()
    ds = _dataset(case.n)
    namespaces = ds["data"].namespaces
    prefixes = [namespaces[i % len(namespaces)] for i in range(SCAN_CALLS)]
    out = {}

    def run():
        out["samples"], out["counts"] = _timed_loop(lambda p: _scan_count(index, p), prefixes)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert out["counts"] == [ds["ns_counts"][p] for p in prefixes[: len(out["counts"])]]
    benchmark.extra_info.update(latency_summary(out["samples"]))
    benchmark.extra_info["records_per_scan"] = sum(out["counts"]) / len(out["counts"])
    benchmark.extra_info["namespaces"] = len(namespaces)


def test_replica_scan(benchmark, case):
    _common(benchmark, case, "index-replica-scan")
    index = case.ensure()
    data = case.data
    rng = random.Random(3)
    prefixes = [data.keys[rng.randrange(case.n)] for _ in range(REPLICA_CALLS)]
    out = {}

    def run():
        out["samples"], out["counts"] = _timed_loop(lambda p: _scan_count(index, p), prefixes)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert all(c == 1 for c in out["counts"])
    benchmark.extra_info.update(latency_summary(out["samples"]))
    benchmark.extra_info["records_per_scan"] = sum(out["counts"]) / len(out["counts"])


def test_longest_prefix(benchmark, case):
    _common(benchmark, case, "index-longest-prefix")
    index = case.ensure()
    ds = _dataset(case.n)
    probes, keyset = ds["data"].probes, ds["keyset"]
    out = {}

    def run():
        t0 = time.perf_counter()
        out["samples"], out["hits"] = _timed_loop(index.longest_prefix, probes, budget_s=1e9)
        out["s"] = time.perf_counter() - t0

    benchmark.pedantic(run, rounds=1, iterations=1)
    expected = []
    for chain in probes:
        k = 0
        while k < len(chain) and chain[k] in keyset:
            k += 1
        expected.append(k)
    assert out["hits"] == expected
    benchmark.extra_info.update(latency_summary(out["samples"]))
    blocks = sum(len(c) for c in probes)
    benchmark.extra_info.update(
        {
            "chains_per_s": len(probes) / out["s"],
            "chains": len(probes),
            "mean_chain_blocks": blocks / len(probes),
            "hit_ratio": sum(expected) / blocks,
        }
    )


def test_footprint(benchmark, case):
    _common(benchmark, case, "index-footprint")
    index = case.ensure()
    st = benchmark.pedantic(index.stats, rounds=1, iterations=1)
    info = dict(case.build_info)
    info["detail"] = _jsonable(st.detail)
    info["stats_call_s"] = benchmark.stats.stats.median if benchmark.stats else None
    info["memory_measure"] = "memory_bytes: backend's stats().memory_bytes; rss_delta_bytes: process RSS after build minus before (after gc + malloc_trim)"
    benchmark.extra_info.update(info)


def test_reopen(benchmark, case):
    _common(benchmark, case, "index-reopen")
    index = case.ensure()
    if not index.persistent:
        pytest.skip(f"{case.name} is memory-only (persistent=False): no reopen to time")
    probe = case.data.keys[: min(100, case.n)]
    expect = case.data.values[: len(probe)]
    out = {}

    def run():
        case.index = index_backends.open(case.name, str(case.dir))
        out["len"] = len(case.index)

    benchmark.pedantic(run, setup=case.close, rounds=1, iterations=1)
    assert out["len"] == case.n
    assert case.index.get_many(probe) == expect
    st = case.index.stats()
    benchmark.extra_info.update({"persistent": True, "records": out["len"], "bytes_on_disk_after_reopen": st.bytes_on_disk})
