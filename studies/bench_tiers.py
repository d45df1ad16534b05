"""Tiers: L0 RAM + L1 disk on the Mooncake trace, and restore latency per tier.

``tiers-mooncake``: the trace (requests in file order, each a chain of block
keys) replayed through a real RamTier (L0) and a real DiskTier (L1), the way
an engine uses a prefix cache.  Per request: the residency sets give, in two
bitmap queries, which blocks L0 and L1 hold; the leading run of held blocks
is fetched (an L0 hit is a ``get``; an L1 hit is a verified ``get`` plus a
promotion ``put`` into L0); the rest of the chain counts as misses, is
"computed", and is written through to L1 (``put_many``: durable, one group
commit) and then to L0.  Every block's payload starts with its key, and every
hit checks it.  Budgets are fractions of the distinct-block bytes of the
replayed requests: L0 = 1%, 5%, 20%; L1 = 25%, 100%; L0 policy LRU vs
S3-FIFO (L1 is always walpub's LRU).  Figures: hits per tier, misses, bytes
moved into L0 / into L1 / promoted L1 -> L0, evictions, replay wall time.

The replay's L1 volume lives on tmpfs (``/dev/shm``, or
``$QUIVER_TIERS_L1_DIR``): hit ratios and bytes moved do not depend on the
medium, and with an fsync per published block on the shared disk the
~44k-block trace would take minutes per configuration.  The replay time is
therefore *not* a disk figure; ``l1_medium`` says where it ran.

``tiers-restore``: p50/p99 of fetching one block from L0 (``get_into``: a copy
into a host buffer), L1 (walpub read + CRC32C) and L2 (LocalDirObjectStore,
read + CRC32C), on the repository's disk.  "cold" drops each file's pages
(``posix_fadvise(DONTNEED)``) before its read, outside the timing; "warm"
reads from the page cache.  A plain memcpy of the same size is the physical
reference for L0.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pytest

from .config import pick
from .conftest import make_bench_dir
from .workloads import latency_summary, load_mooncake, mooncake_chains
from quiver.tier.disk import DiskTier
from quiver.tier.objectstore import LocalDirObjectStore, object_name
from quiver.tier.ram import RamTier
from quiver.tier.residency import ResidencySets
from quiver.walpub.volume import object_relpath

KiB, MiB = 1 << 10, 1 << 20
# Requests replayed (file order); None = the whole trace (3,993 requests, 43,924 blocks).
REQUESTS = pick(smoke=60, quick=2000, full=None)
# Bytes per block.  Mooncake blocks are 512 tokens (64 MiB of fp16 KV for an 8B
# model): far too big to replay; the hit ratios do not depend on the size, the
# bytes moved scale with it.
PAYLOAD = pick(smoke=4 * KiB, quick=16 * KiB, full=64 * KiB)
L0_FRACTIONS = (0.01, 0.05, 0.20)
L1_FRACTIONS = (0.25, 1.00)
POLICIES = ("lru", "s3fifo")
KEY_BYTES = 48

RESTORE_SIZES = pick(smoke=(64 * KiB,), quick=(64 * KiB, 2 * MiB), full=(64 * KiB, 2 * MiB, 8 * MiB))
RESTORE_BLOCKS = pick(smoke=4, quick=32, full=64)
RESTORE_WARM_SAMPLES = pick(smoke=8, quick=300, full=1000)
RESTORE_TIERS = ("memcpy", "l0", "l1-warm", "l1-cold", "l2-warm", "l2-cold")

_TRACE: dict = {}


def _trace() -> dict:
    if not _TRACE:
        reqs = load_mooncake()
        if REQUESTS is not None:
            reqs = reqs[:REQUESTS]
        chains = mooncake_chains(reqs)
        _TRACE.update(chains=chains, distinct=len({k for c in chains for k in c}),
                      refs=sum(len(c) for c in chains), model_hits=_model_prefix_hits(chains))
    return _TRACE


def _model_prefix_hits(chains) -> int:
    """Blocks found with an unbounded cache (a set): what L0 + L1 must find when L1 never evicts."""
    present: set[bytes] = set()
    hits = 0
    for chain in chains:
        k = 0
        while k < len(chain) and chain[k] in present:
            k += 1
        hits += k
        present.update(chain[k:])
    return hits


def _replay_dir():
    """(scratch directory for the replay's L1, medium label)."""
    base = os.environ.get("QUIVER_TIERS_L1_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    if base is None:
        return make_bench_dir("tiers-l1"), "repository disk"
    return tempfile.mkdtemp(prefix="quiver-tiers-l1-", dir=base), base


class Replay:
    """One configuration's L0 + L1 + residency sets, and its counters."""

    def __init__(self, policy: str, l0_bytes: int, l1_bytes: int, l1_root: str) -> None:
        self.ram = RamTier(l0_bytes, PAYLOAD, policy=policy)
        self.disk = DiskTier(l1_root, l1_bytes, index="flat")
        self.res = ResidencySets(["l0", "l1"])
        self.tail = bytes(PAYLOAD - KEY_BYTES)
        self.l0_hits = self.l1_hits = self.misses = 0
        self.promoted_bytes = 0
        self.l0_lost = 0  # found in L0 at lookup, evicted by a promotion before its fetch

    def _ram_put(self, key: bytes, data) -> None:
        self.res.add("l0", key)
        self.res.discard_many("l0", self.ram.put(key, data))

    def request(self, chain: list[bytes]) -> None:
        res, ram, disk = self.res, self.ram, self.disk
        in0 = res.present("l0", chain)
        held = res.any_tier(chain)
        k = 0
        while k < len(chain) and held[k]:
            k += 1
        for i in range(k):
            key = chain[i]
            view = ram.get(key) if in0[i] else None
            if view is not None:
                assert view[:KEY_BYTES] == key, "L0 returned another block"
                self.l0_hits += 1
                continue
            if in0[i]:  # a promotion earlier in this request evicted it from L0
                assert not res.contains("l0", key), "L0 residency set disagrees with L0"
                self.l0_lost += 1
            data = disk.get(key)
            if data is None:  # also gone from L1: the usable prefix ends here
                assert not res.contains("l1", key), "L1 residency set disagrees with L1"
                k = i
                break
            assert data[:KEY_BYTES] == key, "L1 returned another block"
            self.l1_hits += 1
            self.promoted_bytes += len(data)
            self._ram_put(key, data)
        if k < len(chain):
            computed = [(key, key + self.tail) for key in chain[k:]]
            self.misses += len(computed)
            for key, _ in computed:
                res.add("l1", key)
            res.discard_many("l1", disk.put_many(computed))
            for key, data in computed:
                self._ram_put(key, data)

    def check(self) -> None:
        """Residency sets hold exactly the tiers' keys; budgets were kept."""
        self.ram.check_invariants()
        assert self.res.count("l0") == len(self.ram) and self.res.count("l1") == len(self.disk)
        assert all(self.res.present("l0", self.ram.keys())) and all(self.res.present("l1", self.disk.keys()))
        assert self.ram.used_bytes <= self.ram.capacity_bytes
        assert self.disk.capacity_bytes is None or self.disk.used_bytes <= self.disk.capacity_bytes


CASES = [(p, f0, f1) for f1 in L1_FRACTIONS for f0 in L0_FRACTIONS for p in POLICIES]


@pytest.mark.parametrize("policy, l0_frac, l1_frac", CASES,
                         ids=[f"{p}-L0={f0:.0%}-L1={f1:.0%}" for p, f0, f1 in CASES])
def test_tiers_mooncake(benchmark, policy, l0_frac, l1_frac):
    benchmark.group = "tiers-mooncake"
    tr = _trace()
    chains, distinct, refs = tr["chains"], tr["distinct"], tr["refs"]
    l0_bytes = max(PAYLOAD, int(distinct * l0_frac) * PAYLOAD)
    l1_bytes = max(PAYLOAD, int(distinct * l1_frac) * PAYLOAD)
    root, medium = _replay_dir()
    state: dict = {}

    def replay():
        r = state["r"] = Replay(policy, l0_bytes, l1_bytes, os.path.join(root, "l1"))
        t0 = time.perf_counter()
        for chain in chains:
            r.request(chain)
        state["seconds"] = time.perf_counter() - t0

    try:
        benchmark.pedantic(replay, rounds=1, iterations=1)
        r = state["r"]
        r.check()
        assert r.l0_hits + r.l1_hits + r.misses == refs
        assert r.misses >= distinct  # a block's first reference is always a miss
        if l1_frac >= 1.0:  # L1 never evicts: together the tiers find what an unbounded cache finds
            assert r.disk.stats().evictions == 0
            assert r.l0_hits + r.l1_hits == tr["model_hits"]
        s0, s1 = r.ram.stats(), r.disk.stats()
        assert s0.bytes_in == (s0.inserts) * PAYLOAD and s1.bytes_in == s1.inserts * PAYLOAD
        benchmark.extra_info.update({
            "policy": policy,
            "l0_budget_pct": 100 * l0_frac,
            "l1_budget_pct": 100 * l1_frac,
            "payload_bytes": PAYLOAD,
            "requests": len(chains),
            "block_references": refs,
            "distinct_blocks": distinct,
            "l0_capacity_bytes": r.ram.capacity_bytes,
            "l1_capacity_bytes": l1_bytes,
            "l0_hits": r.l0_hits,
            "l1_hits": r.l1_hits,
            "misses": r.misses,
            "l0_hit_ratio": r.l0_hits / refs,
            "l1_hit_ratio": r.l1_hits / refs,
            "miss_ratio": r.misses / refs,
            "bytes_into_l0": s0.bytes_in,
            "bytes_into_l1": s1.bytes_in,
            "bytes_promoted_l1_to_l0": r.promoted_bytes,
            "l0_evictions": s0.evictions,
            "l1_evictions": s1.evictions,
            "l0_lost_before_fetch": r.l0_lost,
            "l1_fsyncs": sum(s1.volume.fsyncs.values()),
            "l1_medium": medium,
            "replay_s": state["seconds"],
        })
    finally:
        if "r" in state:
            state["r"].disk.close()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- restore latency


def _drop_cache(path: str) -> None:
    """Drop one file's clean pages from the page cache (no root, no effect on other files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _blocks(size: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(size)
    out = []
    for i in range(RESTORE_BLOCKS):
        key = (b"restore-%d-%d-" % (size, i)).ljust(KEY_BYTES, b"~")
        out.append((key, key + rng.integers(0, 256, size - KEY_BYTES, dtype=np.uint8).tobytes()))
    return out


@pytest.mark.parametrize("size", RESTORE_SIZES, ids=[f"{s // KiB}KiB" for s in RESTORE_SIZES])
@pytest.mark.parametrize("tier", RESTORE_TIERS)
def test_tiers_restore(benchmark, bench_dir, tier, size):
    benchmark.group = "tiers-restore"
    blocks = _blocks(size)
    out = np.empty(size, dtype=np.uint8)
    out.fill(0)  # first touch outside the timing
    cold = tier.endswith("-cold")
    samples = RESTORE_BLOCKS if cold else RESTORE_WARM_SAMPLES
    closers = []
    if tier == "memcpy":
        src = np.frombuffer(blocks[0][1], dtype=np.uint8)

        def fetch(key):
            np.copyto(out, src)
            return out
    elif tier == "l0":
        ram = RamTier(RESTORE_BLOCKS * size, size, policy="lru")
        for key, data in blocks:
            ram.put(key, data)

        def fetch(key):
            assert ram.get_into(key, out) == size
            return out
    elif tier.startswith("l1"):
        disk = DiskTier(str(bench_dir / "l1"), None)
        closers.append(disk.close)
        disk.put_many(blocks)
        fetch = disk.get
        path_of = lambda key: str(bench_dir / "l1" / object_relpath(key))  # noqa: E731
    else:
        store = LocalDirObjectStore(bench_dir / "l2")
        closers.append(store.close)
        for key, data in blocks:
            store.put(key, data)
        fetch = store.get
        path_of = lambda key: os.path.join(store.root, *object_name(key).split("/"))  # noqa: E731
    state: dict = {}

    def run():
        pc = time.perf_counter_ns
        ns, bad = [], 0
        for j in range(samples):
            key, data = blocks[j % len(blocks)]
            if cold:
                _drop_cache(path_of(key))
            t0 = pc()
            got = fetch(key)
            ns.append(pc() - t0)
            if tier != "memcpy" and bytes(memoryview(got)[:KEY_BYTES]) != key:
                bad += 1
        state.update(ns=ns, bad=bad)

    try:
        if not cold and tier != "memcpy":
            for key, _ in blocks:  # warm: every block read once before the timing
                fetch(key)
        benchmark.pedantic(run, rounds=1, iterations=1)
        assert state["bad"] == 0
        if tier != "memcpy":
            key, data = blocks[-1]
            assert bytes(memoryview(fetch(key))) == data
        lat = latency_summary(state["ns"])
        benchmark.extra_info.update({
            "tier": tier,
            "payload_bytes": size,
            "blocks": RESTORE_BLOCKS,
            **lat,
            "mb_per_s_at_p50": size / (lat["p50_us"] * 1e-6) / 1e6 if lat["p50_us"] else None,
        })
    finally:
        for close in closers:
            close()
