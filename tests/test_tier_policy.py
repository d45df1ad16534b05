"""Eviction policies: LRU order, S3-FIFO's queues and scan resistance, and the
property that a tier's policy always holds exactly the tier's keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quiver.tier.errors import TierConfigError, TierFullError
from quiver.tier.policy import LRUPolicy, S3FIFOPolicy, make_policy
from quiver.tier.ram import RamTier


def k(i: int) -> bytes:
    return b"key-%06d" % i


def test_lru_order():
    p = LRUPolicy()
    for i in range(4):
        p.insert(k(i))
    p.access(k(0))                       # order now 1, 2, 3, 0
    assert p.victim() == k(1)
    assert p.victim() == k(1)            # victim() does not remove
    assert len(p) == 4 and k(1) in p
    assert p.evict() == k(1)
    p.access(k(2))                       # 3, 0, 2
    assert [p.evict() for _ in range(3)] == [k(3), k(0), k(2)]
    assert len(p) == 0
    with pytest.raises(KeyError):
        p.victim()


def test_make_policy():
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("s3fifo", capacity=10), S3FIFOPolicy)
    with pytest.raises(TierConfigError):
        make_policy("arc")


def test_s3fifo_one_hit_wonders_go_first_and_ghost_readmits_to_main():
    p = S3FIFOPolicy(capacity=10)
    for i in range(10):
        p.insert(k(i))
    p.access(k(0))                       # k0 has a hit: leaving small, it moves to main
    assert p.evict() == k(1)             # the oldest key without a hit goes
    assert p.moved_to_main == 1 and k(0) in p
    assert k(1) not in p
    p.insert(k(1))                       # in the ghost: readmitted straight into main
    assert p.ghost_hits == 1
    # main holds k0 and k1 now; small holds 2..9 (8 >= small target 1), so small evicts next
    assert p.evict() == k(2)
    p.remove(k(5))                       # a delete, not an eviction: no ghost entry
    p.insert(k(5))
    assert p.ghost_hits == 1


def test_s3fifo_main_reinserts_by_frequency():
    """Main is a CLOCK with a 2-bit counter: a key with more hits outlives an
    older-in-queue key with fewer; hits in small are cleared on the move."""
    p = S3FIFOPolicy(capacity=4)
    for i in range(4):
        p.insert(k(i))
    assert [p.evict(), p.evict()] == [k(0), k(1)]   # no hits: out of small, into the ghost
    p.insert(k(0))
    p.insert(k(1))                                  # ghost hits: straight into main
    assert p.ghost_hits == 2
    p.access(k(0))
    p.access(k(0))
    p.access(k(1))
    p.access(k(3))                                  # k3 hit in small: moves to main, counter cleared
    # small (k2, k3) is at least its 10% target, so it is drained first: k2 goes,
    # k3 moves to main with a cleared counter.  Main is then k0(2) k1(1) k3(0):
    # the CLOCK hand spends one unit of k0 and k1 each and stops at k3; then
    # k1 (spent) goes before k0, which still had a unit left.
    assert [p.evict() for _ in range(4)] == [k(2), k(3), k(1), k(0)]


def _replay(policy: str, slots: int, trace: list[int]) -> list[bool]:
    """Hits of a get-or-put replay through a real RamTier with ``slots`` slots."""
    tier = RamTier(slots * 64, 64, policy=policy)
    hits = []
    for i in trace:
        hit = tier.get(k(i)) is not None
        if not hit:
            tier.put(k(i), b"x" * 64)
        hits.append(hit)
    tier.check_invariants()
    return hits


def test_s3fifo_keeps_hot_set_through_a_scan_that_flushes_lru():
    """Hot set of 50 in a 100-slot cache, seen 3 times; then a one-pass scan of
    1000 new keys; then the hot set again.

    LRU: the scan is 10x the cache, so every hot key is gone: 0 hits after it.
    S3-FIFO: hot keys have hits while in the small queue, so when the scan
    fills the cache they move to main; the scan keys (no hits) then cycle
    through small only, and main is never asked to evict: 50 hits after it."""
    hot = list(range(50))
    scan = list(range(1000, 2000))
    trace = hot * 3 + scan + hot
    after = slice(len(trace) - len(hot), None)
    lru = _replay("lru", 100, trace)
    s3 = _replay("s3fifo", 100, trace)
    assert sum(lru[:150]) == sum(s3[:150]) == 100      # warm-up: first round misses, two rounds hit
    assert sum(lru[150:1150]) == sum(s3[150:1150]) == 0  # a scan never hits
    assert sum(lru[after]) == 0
    assert sum(s3[after]) == 50


def test_loops_inside_and_beyond_the_cache():
    """A loop that fits the cache hits everything after its first pass under
    both policies (no eviction happens).  A loop 1.5x the cache is LRU's worst
    case, every request a miss; S3-FIFO's FIFO queues keep part of it."""
    slots = 100
    loop = list(range(60))              # reuse distance 60 < 100 slots
    trace = loop * 5
    lru = _replay("lru", slots, trace)
    s3 = _replay("s3fifo", slots, trace)
    assert sum(lru) == len(trace) - len(loop)   # only the first pass misses
    assert sum(s3) == len(trace) - len(loop)    # never full: no eviction, same answer
    trace = list(range(150)) * 3                # loop longer than the cache: LRU always misses
    assert sum(_replay("lru", slots, trace)) == 0
    assert sum(_replay("s3fifo", slots, trace)) > 0  # FIFO keeps part of the loop


ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "delete", "reserve", "commit", "abort"]), st.integers(0, 11)),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["lru", "s3fifo"]), slots=st.integers(1, 6), program=ops)
def test_policy_membership_equals_tier_content(policy, slots, program):
    """Whatever the operations, the policy knows exactly the committed keys,
    every slot is free, stored or reserved exactly once, and bytes read back
    are the bytes written."""
    tier = RamTier(slots * 16, 16, policy=policy)
    model: dict[bytes, bytes] = {}
    reserved: set[bytes] = set()
    for op, i in program:
        key, val = k(i), bytes([i]) * (1 + i)
        if op == "put" and key not in reserved and key not in model and len(reserved) == slots:
            with pytest.raises(TierFullError):
                tier.put(key, val)
        elif op == "put" and key not in reserved:
            for gone in tier.put(key, val):
                del model[gone]
            model[key] = val
        elif op == "get":
            v = tier.get(key)
            assert (None if v is None else bytes(v)) == model.get(key)
        elif op == "delete":
            assert tier.delete(key) == (key in model)
            model.pop(key, None)
        elif op == "reserve" and key not in model and key not in reserved and len(reserved) < slots:
            evicted: list[bytes] = []
            tier.reserve(key, len(val), evicted=evicted)[:] = val
            for gone in evicted:
                del model[gone]
            reserved.add(key)
        elif op == "commit" and key in reserved:
            assert tier.commit(key) == []  # reported at reserve time already
            reserved.discard(key)
            model[key] = val
        elif op == "abort" and key in reserved:
            assert tier.abort(key) == []
            reserved.discard(key)
        tier.check_invariants()
        assert set(tier.keys()) == set(model)
        assert all(key in tier._policy for key in model) and len(tier._policy) == len(model)
        assert len(model) + len(reserved) <= slots
