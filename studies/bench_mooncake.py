"""Mooncake trace replay through every residency-index backend.

The FAST'25 Mooncake trace (3,993 requests, 512-token blocks as hash_id chains)
is replayed in file order into an empty index: per request, ``longest_prefix``
of its key chain, then ``put_many`` of the blocks past the hit.  The hit ratio
(blocks found / blocks referenced) is a property of the trace, not of the
backend, so every backend must report the same one; a dict model computes it
independently and the study asserts agreement.  Latency is per request
(longest_prefix + put_many), p50/p99/mean pooled over the rounds (each a
replay into a fresh index), plus the median round's total time.
"""

from __future__ import annotations

import shutil
import time

import pytest

from quiver import index_backends
from .config import pick
from .conftest import make_bench_dir
from .workloads import VALUE_BYTES, latency_summary, load_mooncake, mooncake_chains, warm_up_backend

BACKENDS = index_backends.available()
# Smoke mode replays the first requests only; quick and full replay the whole trace.
REQUESTS = pick(smoke=300, quick=None, full=None)
# Replays per backend, each into a fresh index; latencies pool over all of them.
ROUNDS = pick(smoke=1, quick=3, full=5)

_TRACE: dict = {}


def _trace():
    if not _TRACE:
        reqs = load_mooncake()
        if REQUESTS is not None:
            reqs = reqs[:REQUESTS]
        chains = mooncake_chains(reqs)
        _TRACE.update(chains=chains, expected=_model_hits(chains))
    return _TRACE


def _model_hits(chains) -> list[int]:
    """Per-request hit counts from a plain set: the reference every backend must match."""
    present: set[bytes] = set()
    hits = []
    for chain in chains:
        k = 0
        while k < len(chain) and chain[k] in present:
            k += 1
        hits.append(k)
        present.update(chain[k:])
    return hits


def _value(key: bytes) -> bytes:
    """A 16-byte residency value derived from the key (deterministic, no allocation games)."""
    return key[-VALUE_BYTES:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mooncake_replay(benchmark, backend):
    benchmark.group = "mooncake"
    tr = _trace()
    chains = tr["chains"]
    state: dict = {}
    warm = make_bench_dir(f"warmup-{backend}")
    try:
        warm_up_backend(backend, warm)  # untimed: JIT compilation and first-use costs
    finally:
        shutil.rmtree(warm, ignore_errors=True)

    def setup():
        if state.get("index") is not None:
            state["index"].close()
        if state.get("dir") is not None:
            shutil.rmtree(state["dir"], ignore_errors=True)
        state["dir"] = make_bench_dir(f"mooncake-{backend}")
        state["index"] = index_backends.open(backend, str(state["dir"]))

    def replay():
        index = state["index"]
        lp, put_many = index.longest_prefix, index.put_many
        pc = time.perf_counter_ns
        samples, hits = state.setdefault("samples", []), []
        t_start = pc()
        for chain in chains:
            t0 = pc()
            k = lp(chain)
            if k < len(chain):
                missing = chain[k:]
                put_many(missing, [_value(m) for m in missing])
            samples.append(pc() - t0)
            hits.append(k)
        index.flush()
        state.setdefault("totals", []).append((pc() - t_start) / 1e9)
        state.setdefault("hits", []).append(hits)

    try:
        benchmark.pedantic(replay, setup=setup, rounds=ROUNDS, iterations=1)
        refs = sum(len(c) for c in chains)
        for hits in state["hits"]:
            assert hits == tr["expected"], "hit counts differ from the dict model"
        totals = sorted(state["totals"])
        total_s = totals[(len(totals) - 1) // 2]
        st = state["index"].stats()
        assert st.records == len({k for c in chains for k in c})
        benchmark.extra_info.update(
            {
                "backend": backend,
                "requests": len(chains),
                "block_references": refs,
                "distinct_blocks": st.records,
                "blocks_found": sum(state["hits"][-1]),  # this backend's answer (equal to the model's)
                "hit_ratio": sum(state["hits"][-1]) / refs,
                "rounds": len(totals),
                "total_s": total_s,  # median round
                "requests_per_s": len(chains) / total_s,
                "bytes_on_disk": st.bytes_on_disk,
                "bytes_written": st.bytes_written,
                **{f"request_{k}": v for k, v in latency_summary(state["samples"]).items()},
            }
        )
    finally:
        if state.get("index") is not None:
            state["index"].close()
        if state.get("dir") is not None:
            shutil.rmtree(state["dir"], ignore_errors=True)
