"""L0 RAM tier (one arena, slots, policy-driven eviction, in-place reservations)
and the roaring-bitmap residency sets."""

from __future__ import annotations

import numpy as np
import pytest

from quiver.tier.errors import (
    TierBufferError,
    TierConfigError,
    TierFullError,
    TierKeyError,
    TierObjectTooLargeError,
    TierReservationError,
)
from quiver.tier.ram import RamTier
from quiver.tier.residency import KeyIds, ResidencySets


def k(i: int) -> bytes:
    return b"block-%04d" % i


def test_arena_is_one_preallocated_array_and_get_is_a_view_into_it():
    t = RamTier(capacity_bytes=10 * 1024 + 100, slot_bytes=1024)
    assert t.n_slots == 10 and t.capacity_bytes == 10 * 1024
    assert t.arena.dtype == np.uint8 and t.arena.nbytes == 10 * 1024
    arena_id = id(t.arena)
    for i in range(50):
        t.put(k(i), bytes([i]) * (100 + i))
    assert id(t.arena) == arena_id and len(t) == 10
    view = t.get(k(49))
    assert view.readonly and bytes(view) == bytes([49]) * 149
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), t.arena)
    with pytest.raises(TypeError):
        view[0] = 1
    t.check_invariants()


def test_a_pinned_slot_is_not_reused_until_unpinned():
    """pin() lets a reader copy without a lock: eviction and delete take the key at
    once, but the slot's bytes stay until the last unpin."""
    t = RamTier(capacity_bytes=3 * 64, slot_bytes=64)
    for i in range(3):
        t.put(k(i), bytes([i]) * 64)
    view, slot = t.pin(k(0))
    view2, slot2 = t.pin(k(0))  # two readers of one block
    assert slot2 == slot and t.pin(b"absent") is None
    for i in range(3, 9):  # churn: k(0) is evicted, its slot must not be handed out
        t.put(k(i), bytes([i]) * 64)
        t.check_invariants()
    assert not t.contains(k(0)) and bytes(view) == bytes([0]) * 64 and len(t) == 2
    t.unpin(slot)
    t.put(k(9), b"\x09" * 64)
    assert bytes(view2) == bytes([0]) * 64  # still pinned once
    t.unpin(slot)
    t.check_invariants()
    t.put(k(10), b"\x0a" * 64)
    t.put(k(11), b"\x0b" * 64)
    assert len(t) == 3  # the slot is back in use
    t.check_invariants()


def test_delete_of_a_pinned_block_frees_its_slot_at_the_unpin():
    t = RamTier(capacity_bytes=2 * 64, slot_bytes=64)
    t.put(k(0), b"a" * 64)
    view, slot = t.pin(k(0))
    assert t.delete(k(0)) and not t.contains(k(0))
    t.put(k(1), b"b" * 64)  # the one free slot
    gone: list[bytes] = []
    t.reserve(k(2), 64, evicted=gone)  # evicts k(1) for its slot
    assert gone == [k(1)]
    with pytest.raises(TierFullError):  # one slot reserved, the other waits for the unpin
        t.reserve(k(3), 64, evicted=gone)
    assert bytes(view) == b"a" * 64
    t.unpin(slot)
    t.check_invariants()
    t.reserve(k(3), 64, evicted=gone)  # the unpinned slot
    t.check_invariants()



def test_put_accepts_buffers_and_refuses_what_it_cannot_copy_exactly():
    t = RamTier(4 * 256, 256)
    arr = np.arange(32, dtype=np.float32)                 # 128 bytes
    t.put(k(0), arr)
    assert np.array_equal(np.frombuffer(t.get(k(0)), dtype=np.float32), arr)
    t.put(k(1), bytearray(b"abc"))
    t.put(k(2), memoryview(b"xyz0123"))
    assert bytes(t.get(k(1))) == b"abc" and bytes(t.get(k(2))) == b"xyz0123"
    with pytest.raises(TierBufferError):
        t.put(k(3), np.arange(64, dtype=np.uint8)[::2])  # not contiguous
    with pytest.raises(TierBufferError):
        t.put(k(3), "text")
    with pytest.raises(TierObjectTooLargeError):
        t.put(k(3), b"x" * 257)
    for bad in (b"", "str-key", b"x" * 121):
        with pytest.raises(TierKeyError):
            t.put(bad, b"x")
    with pytest.raises(TierConfigError):
        RamTier(100, 256)
    with pytest.raises(TierConfigError):
        RamTier(1024, 256, policy="mru")
    assert len(t) == 3
    t.check_invariants()


def test_lru_eviction_returns_victims_and_refresh_does_not_copy():
    t = RamTier(3 * 64, 64, policy="lru")
    for i in range(3):
        assert t.put(k(i), bytes([i]) * 64) == []
    assert t.put(k(0), b"other bytes") == []               # refresh: k0 becomes MRU, bytes unchanged
    assert bytes(t.get(k(0))) == bytes([0]) * 64
    assert t.get(k(1)) is not None                          # k1 MRU; LRU order: k2, k0, k1
    assert t.put(k(3), b"3") == [k(2)]
    assert t.put(k(4), b"4") == [k(0)]
    assert t.keys() == [k(1), k(3), k(4)]
    st = t.stats()
    assert (st.inserts, st.refreshes, st.evictions, st.hits) == (5, 1, 2, 2)
    assert st.bytes_in == 3 * 64 + 2 and st.bytes_evicted == 128 and st.used_bytes == 64 + 2
    assert t.used_bytes == 66 and k(2) not in t and t.get(k(2)) is None
    assert t.stats().misses == 1


def test_reserve_commit_abort():
    t = RamTier(2 * 100, 100)
    view = t.reserve(k(0), 10)
    assert not view.readonly and len(view) == 10
    view[:] = b"0123456789"
    assert t.get(k(0)) is None and not t.contains(k(0)) and len(t) == 0  # invisible until commit
    with pytest.raises(TierReservationError):
        t.put(k(0), b"x")
    with pytest.raises(TierReservationError):
        t.reserve(k(0), 5)
    assert t.commit(k(0)) == []
    assert bytes(t.get(k(0))) == b"0123456789"
    with pytest.raises(TierReservationError):
        t.commit(k(0))
    with pytest.raises(TierReservationError):
        t.reserve(k(0), 5)                                   # already stored
    t.put(k(1), b"one")
    ev: list[bytes] = []
    t.reserve(k(2), 3, evicted=ev)                           # full: evicts the LRU block at once
    assert ev == [k(0)] and k(0) not in t
    assert t.abort(k(2)) == []
    t.reserve(k(3), 3)                                       # slot freed by the abort: no eviction
    t.reserve(k(4), 3)                                       # evicts k1, reported at commit
    assert t.commit(k(4)) == [k(1)]
    t.reserve(k(5), 3, evicted=ev)                           # k4 is the only evictable block
    assert ev == [k(0), k(4)]
    with pytest.raises(TierFullError):                       # both slots reserved: nothing to evict
        t.reserve(k(6), 3)
    with pytest.raises(TierObjectTooLargeError):
        t.reserve(k(7), 101)
    t.check_invariants()


def test_delete_and_get_into():
    t = RamTier(4 * 32, 32, policy="s3fifo")
    t.put(k(0), b"a" * 20)
    out = bytearray(32)
    assert t.get_into(k(0), out) == 20 and out[:20] == b"a" * 20
    assert t.get_into(k(9), out) is None
    with pytest.raises(TierBufferError):
        t.get_into(k(0), bytearray(5))
    with pytest.raises(TierBufferError):
        t.get_into(k(0), b"\0" * 32)
    assert t.delete(k(0)) and not t.delete(k(0))
    assert len(t) == 0 and t.used_bytes == 0 and t.stats().deletes == 1
    t.check_invariants()


# ---------------------------------------------------------------- residency sets


def test_key_ids_are_stable_and_dense():
    ids = KeyIds()
    assert ids.id_of(k(0)) is None
    assert [ids.id_of(k(i), create=True) for i in (0, 1, 0, 2)] == [0, 1, 0, 2]
    assert ids.key_of(1) == k(1) and len(ids) == 3 and k(2) in ids
    with pytest.raises(TierKeyError):
        ids.id_of(b"", create=True)


def test_residency_sets_bulk_membership_matches_a_set_model():
    rs = ResidencySets(["ram", "disk", "object"])
    rng = np.random.default_rng(1)
    model = {name: set() for name in rs.tier_names}
    keys = [k(i) for i in range(3000)]
    for name, p in (("ram", 0.05), ("disk", 0.5), ("object", 0.2)):
        chosen = [key for key in keys if rng.random() < p]
        rs.add_many(name, chosen[: len(chosen) // 2])
        for key in chosen[len(chosen) // 2 :]:
            rs.add(name, key)
        model[name].update(chosen)
    gone = [key for key in sorted(model["disk"]) if rng.random() < 0.3]
    rs.discard_many("disk", gone)
    rs.discard("disk", keys[0])
    rs.discard("disk", b"never-seen")
    model["disk"].difference_update(gone + [keys[0]])
    probe = keys[::3] + [b"unknown-%d" % i for i in range(50)]
    for name in rs.tier_names:
        assert rs.count(name) == len(model[name])
        assert rs.present(name, probe) == [key in model[name] for key in probe]
    union = model["ram"] | model["disk"] | model["object"]
    assert rs.any_tier(probe) == [key in union for key in probe]
    assert rs.contains("ram", next(iter(model["ram"])))
    assert len(rs.bitmap("disk") - rs.bitmap("ram")) == len(model["disk"] - model["ram"])
    with pytest.raises(TierConfigError):
        rs.add("tape", k(1))
    with pytest.raises(TierConfigError):
        ResidencySets(["ram", "ram"])


def test_pin_many_pins_each_key_and_unpin_many_releases_them():
    t = RamTier(capacity_bytes=2 * 64, slot_bytes=64)
    t.put(k(0), b"a" * 64)
    t.put(k(1), b"b" * 64)
    pins = t.pin_many([k(0), b"absent", k(1), k(0)])  # (slot, block bytes) of each hit
    view = [None if p is None else t.pinned_view(*p) for p in pins]
    assert pins[1] is None and bytes(view[0]) == b"a" * 64 and bytes(view[2]) == b"b" * 64
    assert pins[3] == pins[0] and pins[0][1] == 64  # one slot pinned twice
    t.delete(k(0))
    with pytest.raises(TierFullError):  # k(0)'s slot waits for both unpins, k(1)'s is pinned
        t.put(k(2), b"c" * 64)
    assert bytes(view[0]) == b"a" * 64 and bytes(view[2]) == b"b" * 64 and view[0].readonly
    t.unpin_many([p[0] for p in pins if p is not None])
    t.check_invariants()
    t.put(k(3), b"d" * 64)
    t.put(k(4), b"e" * 64)
    assert len(t) == 2 and t.contains(k(3)) and t.contains(k(4))
    t.check_invariants()
