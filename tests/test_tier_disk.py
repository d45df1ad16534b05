"""L1 disk tier: a walpub volume bounded by bytes, evicting LRU through WAL
deletes, with walpub's errors translated into tier errors."""

from __future__ import annotations

import os

import pytest

from quiver.tier.disk import DiskTier
from quiver.tier.errors import (
    TierClosedError,
    TierConfigError,
    TierCorruptError,
    TierKeyError,
    TierLockedError,
    TierObjectTooLargeError,
)
from quiver.walpub.errors import CorruptObjectError, VolumeLockedError
from quiver.walpub.volume import object_relpath


def k(i: int) -> bytes:
    return b"disk-block-%04d" % i


def blob(i: int, n: int = 1000) -> bytes:
    return bytes([i % 251]) * n


def test_put_get_durable_across_reopen(tmp_path):
    with DiskTier(str(tmp_path / "l1"), capacity_bytes=None) as d:
        assert d.put(k(0), blob(0)) == []
        assert d.put_many([(k(1), memoryview(blob(1))), (k(2), bytearray(blob(2)))]) == []
        assert d.get(k(1)) == blob(1) and d.get(k(9)) is None
        assert len(d) == 3 and d.used_bytes == 3000 and k(2) in d
    with DiskTier(str(tmp_path / "l1"), capacity_bytes=None) as d:
        assert d.last_recovery.live == 3
        assert [d.get(k(i)) for i in range(3)] == [blob(i) for i in range(3)]


def test_budget_evicts_least_recently_used_through_the_wal(tmp_path):
    with DiskTier(str(tmp_path / "l1"), capacity_bytes=3000) as d:
        for i in range(3):
            assert d.put(k(i), blob(i)) == []
        assert d.get(k(0)) == blob(0)                  # k0 refreshed: LRU is k1
        assert d.put(k(3), blob(3)) == [k(1)]
        assert d.put(k(2), blob(2)) == []              # present: refresh, nothing written
        assert d.put_many([(k(4), blob(4)), (k(5), blob(5))]) == [k(0), k(3)]
        assert d.keys() == [k(2), k(4), k(5)] and d.used_bytes == 3000
        st = d.stats()
        assert (st.inserts, st.refreshes, st.evictions, st.hits) == (6, 1, 3, 1)
        assert st.bytes_evicted == 3000 and st.bytes_in == 6000 and st.volume.evictions == 3
        assert not os.path.exists(tmp_path / "l1" / object_relpath(k(1)))
        with pytest.raises(TierObjectTooLargeError):
            d.put(k(6), blob(6, 3001))
    with DiskTier(str(tmp_path / "l1"), capacity_bytes=3000) as d:  # evictions were logged
        assert sorted(d.keys()) == [k(2), k(4), k(5)]


def test_corrupt_block_is_a_typed_error_then_a_miss(tmp_path):
    with DiskTier(str(tmp_path / "l1"), capacity_bytes=None) as d:
        d.put(k(0), blob(7))
        path = tmp_path / "l1" / object_relpath(k(0))
        raw = bytearray(path.read_bytes())
        raw[10] ^= 0x01
        path.write_bytes(bytes(raw))
        with pytest.raises(TierCorruptError) as exc:
            d.get(k(0))
        assert isinstance(exc.value.__cause__, CorruptObjectError)
        assert d.get(k(0)) is None and k(0) not in d
        assert d.stats().corrupt_reads == 1
        d.put(k(0), blob(7))                            # the good copy can be published again
        assert d.get(k(0)) == blob(7)


def test_locked_closed_and_bad_arguments_are_tier_errors(tmp_path):
    root = str(tmp_path / "l1")
    d = DiskTier(root, capacity_bytes=10_000)
    with pytest.raises(TierLockedError) as exc:
        DiskTier(root, capacity_bytes=10_000)
    assert isinstance(exc.value.__cause__, VolumeLockedError)
    with pytest.raises(TierKeyError):
        d.put(b"", b"x")
    with pytest.raises(TierKeyError):
        d.get("not-bytes")
    assert d.delete(k(0)) is False
    d.put(k(0), b"x")
    assert d.delete(k(0)) is True and d.stats().deletes == 1
    d.close()
    with pytest.raises(TierClosedError):
        d.get(k(0))
    with pytest.raises(TierConfigError):
        DiskTier(root, capacity_bytes=0)
