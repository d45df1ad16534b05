"""walpub unit tests: frames, publish/read/delete, lock, recovery repairs,
eviction, rotation, compaction, group commit, index catch-up.  Real file system
(tmp_path) unless a test needs the simulated one."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from quiver import index_backends
from quiver.walpub import (
    CorruptObjectError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    OsFileSystem,
    SimFileSystem,
    Volume,
    VolumeClosedError,
    VolumeLockedError,
)
from quiver.walpub import wal
from quiver.walpub.simfs import PersistentIndexTwin
from quiver.walpub.volume import META_KEY, object_relpath


def K(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def data(i: int, n: int = 100) -> bytes:
    return (b"%06d" % i) * (n // 6) + b"!" * (n % 6)


def seg_files(root) -> list[str]:
    return sorted(os.listdir(os.path.join(root, "wal")))


# ----------------------------------------------------------------- frames
def test_frame_roundtrip_and_types():
    recs = [wal.PutRecord(1, K(1), 10, 99), wal.DeleteRecord(2, K(1)), wal.ResetRecord(7),
            wal.PutRecord(8, K(2), 0, 0)]
    buf = b"".join(wal.encode(r) for r in recs)
    got, end, why = wal.decode_frames(buf)
    assert got == recs and end == len(buf) and why is None


@pytest.mark.parametrize("cut", [1, 5, 8, 9, 20])
def test_torn_frame_is_detected_at_its_start(cut):
    a, b = wal.encode(wal.PutRecord(1, K(1), 1, 1)), wal.encode(wal.PutRecord(2, K(2), 2, 2))
    got, end, why = wal.decode_frames(a + b[:cut])
    assert len(got) == 1 and end == len(a) and why.startswith("torn")


def test_bad_crc_zeros_and_backward_seq_stop_replay():
    a = wal.encode(wal.PutRecord(5, K(1), 1, 1))
    b = bytearray(wal.encode(wal.PutRecord(6, K(2), 1, 1)))
    b[-1] ^= 0x40
    assert wal.decode_frames(a + bytes(b))[1:] == (len(a), "bad crc")
    assert wal.decode_frames(a + bytes(64))[1] == len(a)
    assert wal.decode_frames(a + wal.encode(wal.PutRecord(5, K(3), 1, 1)))[2] == "seq went backwards"
    huge = struct.pack("<IIB", 1 << 30, 0, 1)
    assert wal.decode_frames(a + huge)[2] == "oversized frame"


# ----------------------------------------------------------------- basic API
def test_publish_read_delete_reopen(tmp_path):
    root = str(tmp_path / "vol")
    with Volume(root) as v:
        assert v.publish(K(1), data(1)) is True
        assert v.publish(K(1), data(1)) is False          # immutable: no-op
        assert v.publish_many([(K(2), data(2)), (K(3), data(3)), (K(2), data(2))]) == [True, True, False]
        assert v.read(K(2)) == data(2)
        assert v.delete(K(3)) is True and v.delete(K(3)) is False
        with pytest.raises(ObjectNotFoundError):
            v.read(K(3))
        assert os.path.exists(os.path.join(root, object_relpath(K(1))))
    with Volume(root) as v:
        assert sorted(v.keys()) == sorted([K(1), K(2)])
        assert v.read(K(1)) == data(1) and v.last_recovery.live == 2
        assert v.last_recovery.orphans_removed == 0 and v.last_recovery.tmp_removed == 0
    with pytest.raises(VolumeClosedError):
        v.publish(K(9), b"x")


def test_empty_object_and_memoryview(tmp_path):
    with Volume(str(tmp_path)) as v:
        v.publish(K(1), b"")
        v.publish(K(2), memoryview(bytearray(b"abc")))
        assert v.read(K(1)) == b"" and v.read(K(2)) == b"abc"


def test_invalid_keys_and_sizes(tmp_path):
    with Volume(str(tmp_path), capacity_bytes=1000) as v:
        for bad in (b"", "str", b"x" * 121, None):
            with pytest.raises(InvalidKeyError):
                v.publish(bad, b"x")
        with pytest.raises(ObjectTooLargeError):
            v.publish(K(1), bytes(1001))


def test_second_writer_is_refused_at_once(tmp_path):
    root = str(tmp_path / "v")
    v = Volume(root)
    with pytest.raises(VolumeLockedError):
        Volume(root)
    v.close()
    Volume(root).close()


def test_lock_in_simulated_fs():
    sim = SimFileSystem()
    v = Volume("/v", io=sim)
    with pytest.raises(VolumeLockedError):
        Volume("/v", io=sim)
    v.close()


# ----------------------------------------------------------------- verification
def test_corrupt_object_is_typed_error_then_miss(tmp_path):
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1))
        v.publish(K(2), data(2))
        path = os.path.join(root, object_relpath(K(1)))
        raw = bytearray(open(path, "rb").read())
        raw[10] ^= 0x01
        open(path, "wb").write(raw)
        with pytest.raises(CorruptObjectError):
            v.read(K(1))
        with pytest.raises(ObjectNotFoundError):
            v.read(K(1))
        assert not os.path.exists(path)
        assert v.stats().corrupt_reads == 1
    with Volume(root) as v:   # the drop was logged (WAL DELETE): still gone
        assert K(1) not in v and v.read(K(2)) == data(2)
        assert v.last_recovery.dropped == []


def test_truncated_object_same_crc_length_check(tmp_path):
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1))
        with open(os.path.join(root, object_relpath(K(1))), "r+b") as f:
            f.truncate(10)
        with pytest.raises(CorruptObjectError):
            v.read(K(1))


def _split(sizes):
    """buffers_for of read_into: bytearrays of ``sizes`` (the rest of the length in the last)."""
    def buffers_for(length):
        bufs = [bytearray(n) for n in sizes]
        return bufs + [bytearray(length - sum(sizes))]
    return buffers_for


@pytest.mark.parametrize("fs", ["os", "sim"])
def test_read_into_fills_the_callers_buffers_in_order(tmp_path, fs):
    """read_into: the object's bytes across the caller's buffers, verified by one
    CRC32C over them in order; a miss is a miss (OsFileSystem: one preadv;
    SimFileSystem: the default, from read_file)."""
    root, io = (str(tmp_path), None) if fs == "os" else ("/v", SimFileSystem())
    with Volume(root, io=io) as v:
        v.publish(K(1), data(1, 1000))
        bufs = v.read_into(K(1), _split([7, 500]))
        assert [len(b) for b in bufs] == [7, 500, 493] and b"".join(bufs) == data(1, 1000)
        with pytest.raises(ObjectNotFoundError):
            v.read_into(K(2), _split([1]))
        assert v.stats().corrupt_reads == 0


@pytest.mark.parametrize("damage", ["flip", "short", "long"])
def test_read_into_refuses_a_damaged_object_like_read(tmp_path, damage):
    """A flipped byte (CRC over the pieces), a shorter file or a longer one (the
    byte past the buffers) is corruption: typed error, record dropped."""
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1, 1000))
        path = os.path.join(root, object_relpath(K(1)))
        raw = bytearray(open(path, "rb").read())
        if damage == "flip":
            raw[600] ^= 0x01
        elif damage == "short":
            raw = raw[:-1]
        else:
            raw += b"x"
        open(path, "wb").write(raw)
        with pytest.raises(CorruptObjectError, match="bad crc" if damage == "flip" else "wrong length"):
            v.read_into(K(1), _split([100]))
        assert K(1) not in v and v.stats().corrupt_reads == 1


@pytest.mark.parametrize("fs", ["os", "sim"])
def test_read_many_into_serves_the_fast_path_and_changes_nothing_else(tmp_path, fs):
    """read_many_into: verified pieces where a read simply verifies; None (and no
    state change) for a miss, a declined length and a damaged object, which
    read_into then judges as always (the damaged one: typed error, dropped)."""
    root, io = (str(tmp_path), None) if fs == "os" else ("/v", SimFileSystem())
    with Volume(root, io=io) as v:
        for i in (1, 2, 3):
            v.publish(K(i), data(i, 1000 + i))
        path = f"{root}/{object_relpath(K(3))}"
        raw = bytearray(v.io.read_file(path))
        raw[600] ^= 0x01
        fd = v.io.create(path + ".x")
        v.io.write(fd, bytes(raw))
        v.io.close(fd)
        v.io.rename(path + ".x", path)
        declined = lambda length: None  # noqa: E731
        got = v.read_many_into([K(1), K(9), K(2), K(3)], [_split([10]), _split([1]), declined, _split([10])])
        assert b"".join(got[0]) == data(1, 1001) and got[1:] == [None, None, None]
        assert K(3) in v and v.stats().corrupt_reads == 0
        assert b"".join(v.read_into(K(2), _split([10]))) == data(2, 1002)
        with pytest.raises(CorruptObjectError, match="bad crc"):
            v.read_into(K(3), _split([10]))
        assert K(3) not in v and v.stats().corrupt_reads == 1


@pytest.mark.parametrize("damage", ["missing", "flip", "short"])
def test_recovery_drops_bad_objects(tmp_path, damage):
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1))
        v.publish(K(2), data(2))
    path = os.path.join(root, object_relpath(K(1)))
    if damage == "missing":
        os.unlink(path)
    elif damage == "flip":
        raw = bytearray(open(path, "rb").read())
        raw[0] ^= 0x80
        open(path, "wb").write(raw)
    else:
        open(path, "wb").write(b"abc")
    with Volume(root, verify_on_recover="crc") as v:  # flat: the whole WAL is replayed and checked
        assert [k for k, _ in v.last_recovery.dropped] == [K(1)]
        assert K(1) not in v and v.read(K(2)) == data(2)
        assert not os.path.exists(path)
    with Volume(root) as v:
        assert v.last_recovery.dropped == [] and len(v) == 1


def test_verify_size_mode_still_catches_at_read(tmp_path):
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1))
    path = os.path.join(root, object_relpath(K(1)))
    raw = bytearray(open(path, "rb").read())
    raw[3] ^= 1
    open(path, "wb").write(raw)
    with Volume(root, verify_on_recover="size") as v:
        assert v.last_recovery.dropped == []
        with pytest.raises(CorruptObjectError):
            v.read(K(1))


def test_recovery_clears_tmp_orphans_and_wal_junk(tmp_path):
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1))
    open(os.path.join(root, "tmp", "half.tmp"), "wb").write(b"junk")
    orphan = os.path.join(root, object_relpath(K(7)))
    os.makedirs(os.path.dirname(orphan), exist_ok=True)
    open(orphan, "wb").write(b"orphan")
    open(os.path.join(root, os.path.dirname(object_relpath(K(1))), "notakey.txt"), "wb").write(b"?")
    open(os.path.join(root, "wal", "garbage"), "wb").write(b"?")
    os.unlink(os.path.join(root, "CLEAN"))  # what a crash leaves: no clean-close marker
    with Volume(root) as v:
        r = v.last_recovery
        assert (r.tmp_removed, r.orphans_removed, r.wal_junk_removed) == (1, 2, 1)
        assert v.keys() == [K(1)]
    assert os.listdir(os.path.join(root, "tmp")) == []
    assert not os.path.exists(orphan)


def test_clean_close_skips_the_orphan_scan_and_gc_still_collects(tmp_path):
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1))
    assert os.path.exists(os.path.join(root, "CLEAN"))
    orphan = os.path.join(root, object_relpath(K(7)))
    os.makedirs(os.path.dirname(orphan), exist_ok=True)
    open(orphan, "wb").write(b"planted after a clean close")
    with Volume(root) as v:
        assert v.last_recovery.orphans_removed == 0 and os.path.exists(orphan)
        assert not os.path.exists(os.path.join(root, "CLEAN"))  # open: from here on, not clean
        assert v.gc() == 1 and not os.path.exists(orphan)
        assert v.read(K(1)) == data(1)


def test_torn_tail_is_truncated_and_later_appends_survive(tmp_path):
    root = str(tmp_path)
    with Volume(root) as v:
        v.publish(K(1), data(1))
    seg = os.path.join(root, "wal", seg_files(root)[-1])
    good = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(wal.encode(wal.PutRecord(99, K(5), 3, 3))[:11])
    with Volume(root) as v:
        assert v.last_recovery.truncated == [(1, good, "torn payload")]
        assert os.path.getsize(seg) == good
        v.publish(K(2), data(2))
    with Volume(root) as v:
        assert sorted(v.keys()) == [K(1), K(2)] and v.last_recovery.truncated == []


def test_bad_frame_in_a_sealed_segment_costs_only_its_record(tmp_path):
    """Media damage at the end of a sealed segment: that segment is cut at the
    bad frame and the later segments are replayed (they used to be discarded)."""
    root = str(tmp_path)
    with Volume(root, segment_bytes=256) as v:
        for i in range(12):
            v.publish(K(i), data(i))
    segs = seg_files(root)
    assert len(segs) >= 3
    p = os.path.join(root, "wal", segs[0])
    raw = bytearray(open(p, "rb").read())
    raw[-1] ^= 0xFF
    open(p, "wb").write(raw)
    with Volume(root, segment_bytes=256) as v:
        r = v.last_recovery
        assert r.truncated and r.truncated[0][0] == 1 and r.discarded_segments == []
        assert seg_files(root) == segs
        assert len(v) == 11 and r.orphans_removed == 1     # the one record in the bad frame
        assert all(v.read(K(i)) == data(i) for i in range(12) if K(i) in v)


def test_bad_frame_in_the_middle_is_skipped(tmp_path):
    """Finding 5 (issue 13): one bad frame used to cut the log there and collect
    every later, intact object as an orphan.  Replay now resyncs past it."""
    root = str(tmp_path)
    with Volume(root) as v:
        for i in range(30):
            v.publish(K(i), data(i))
    p = os.path.join(root, "wal", seg_files(root)[0])
    raw = bytearray(open(p, "rb").read())
    raw[300] ^= 0x01
    open(p, "wb").write(raw)
    with Volume(root) as v:
        r = v.last_recovery
        assert len(r.damaged) == 1 and not r.truncated
        assert len(v) == 29 and r.orphans_removed == 1
        assert all(v.read(K(i)) == data(i) for i in range(30) if K(i) in v)
        v.publish(K(99), data(99))
    with Volume(root) as v:                          # the damaged region stays skipped, appends survive
        assert len(v) == 30 and v.read(K(99)) == data(99)


# ----------------------------------------------------------------- eviction, rotation, compaction
def test_lru_eviction_to_capacity(tmp_path):
    with Volume(str(tmp_path), capacity_bytes=500) as v:
        for i in range(5):
            v.publish(K(i), data(i, 100))
        v.read(K(0))                       # K(0) becomes most recent
        v.publish(K(5), data(5, 100))
        assert v.used_bytes <= 500
        assert K(1) not in v and K(0) in v and K(5) in v
        assert v.stats().evictions == 1
        assert v.evict_to(200) == [K(2), K(3), K(4)]
        assert v.keys() == [K(0), K(5)]
    with Volume(str(tmp_path)) as v:
        assert sorted(v.keys()) == sorted([K(0), K(5)])


def test_rotation_and_compaction_keep_the_live_set():
    sim = SimFileSystem()   # logic, not disk speed: the twin keeps this fast
    kw = dict(io=sim, segment_bytes=512, compact_min_records=40)
    with Volume("/v", **kw) as v:
        for i in range(60):
            v.publish(K(i), data(i, 20))
            if i >= 5:
                v.delete(K(i - 5))
        st = v.stats()
        assert st.wal_rotations >= 3 and st.compactions >= 1
        live = sorted(v.keys())
    assert len(sim.listdir("/v/wal")) <= 3
    with Volume("/v", **kw) as v:
        assert sorted(v.keys()) == live == [K(i) for i in range(55, 60)]
        assert all(v.read(k) == data(int.from_bytes(k[:4], "little"), 20) for k in live)
    # A power loss now keeps the same (everything was acknowledged, so fsynced).
    with Volume("/v", io=SimFileSystem(sim.durable_state())) as v:
        assert sorted(v.keys()) == live


def test_compaction_without_dead_records_is_a_rewrite(tmp_path):
    with Volume(str(tmp_path), segment_bytes=256) as v:
        for i in range(10):
            v.publish(K(i), data(i))
        assert v.compact() is True
        v.publish(K(10), data(10))
    with Volume(str(tmp_path)) as v:
        assert len(v) == 11 and v.read(K(3)) == data(3)
        assert v.last_recovery.segments[0] > 1


# ----------------------------------------------------------------- group commit and fsync counts
def test_fsyncs_per_block_single_publisher():
    sim = SimFileSystem()
    v = Volume("/v", io=sim)
    v.publish(K(0), data(0))                      # first use of objects/ab/ and of the WAL
    before = dict(sim.fsync_counts)
    n = 50
    for i in range(1, n + 1):
        v.publish(K(i * 256), data(i))            # same last byte: same objects/ab/
    per = {k: (sim.fsync_counts[k] - before.get(k, 0)) / n for k in sim.fsync_counts}
    assert per["object"] == 1 and per["objects_dir"] == 1 and per["wal"] == 1
    assert sum(per.values()) == 3
    v.close()


def test_publish_many_shares_dir_and_wal_fsyncs():
    sim = SimFileSystem()
    v = Volume("/v", io=sim)
    v.publish(K(0), b"x")
    before = dict(sim.fsync_counts)
    v.publish_many([(K(i * 256), data(i)) for i in range(1, 33)])
    d = {k: sim.fsync_counts[k] - before.get(k, 0) for k in sim.fsync_counts}
    assert d["object"] == 32 and d["objects_dir"] == 1 and d["wal"] == 1
    v.close()


def test_publish_many_takes_a_callers_crc_and_a_wrong_one_loses_the_object_never_serves_it(tmp_path):
    """(key, data, crc): the record keeps the caller's CRC32C of the bytes (no pass over them);
    reads check the bytes against it, so a wrong one is a corrupt object, dropped, not wrong bytes."""
    import crc32c

    v = Volume(str(tmp_path))
    assert v.publish_many([(K(1), data(1), crc32c.crc32c(data(1))), (K(2), data(2), crc32c.crc32c(data(2)) ^ 1),
                           (K(3), data(3))]) == [True, True, True]
    assert v.read(K(1)) == data(1) and v.read(K(3)) == data(3)
    with pytest.raises(CorruptObjectError):
        v.read(K(2))
    assert not v.contains(K(2))
    v.close()


@pytest.mark.parametrize("fs", ["os", "sim"])
def test_an_object_given_as_pieces_is_stored_as_their_concatenation(tmp_path, fs):
    """(key, (piece, piece, ...)): one object, written in order (writev on the real file system)."""
    v = Volume(str(tmp_path), io=OsFileSystem()) if fs == "os" else Volume("/v", io=SimFileSystem())
    pieces = (b"head", memoryview(data(7, 5000)), bytearray(b"crc!"), b"")
    assert v.publish_many([(K(7), pieces)]) == [True]
    assert v.read(K(7)) == b"head" + data(7, 5000) + b"crc!"
    v.close()


def test_group_commit_threads_share_wal_fsyncs(tmp_path):
    v = Volume(str(tmp_path))
    n_threads, per_thread = 8, 40
    errors = []

    def worker(t):
        try:
            for i in range(per_thread):
                k = K(t * 1000 + i)
                v.publish(k, data(t * 1000 + i))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert not errors
    st = v.stats()
    total = n_threads * per_thread
    assert st.publishes == total and st.frames == total
    assert st.fsyncs["wal"] == st.commits <= total
    v.close()
    with Volume(str(tmp_path)) as v2:
        assert len(v2) == total


def test_concurrent_publish_and_delete_same_key_is_serialised():
    sim = SimFileSystem()
    v = Volume("/v", io=sim)
    stop = threading.Event()
    errors = []

    def flip():
        try:
            for _ in range(200):
                v.publish(K(1), data(1))
                v.delete(K(1))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        while not stop.is_set():
            try:
                assert v.read(K(1)) == data(1)
            except ObjectNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                return

    ths = [threading.Thread(target=flip), threading.Thread(target=flip), threading.Thread(target=reader)]
    for t in ths:
        t.start()
    for t in ths[:2]:
        t.join()
    stop.set()
    ths[2].join()
    assert not errors
    v.close()
    v = Volume("/v", io=SimFileSystem(sim.durable_state()))
    assert K(1) not in v


# ----------------------------------------------------------------- residency index
class PersistentDictIndex(PersistentIndexTwin):
    """The crash twin's persistent index, counting single puts so a test can
    see that catch-up replays only the WAL tail."""

    def __init__(self, durable=None):
        super().__init__(durable)
        self.puts = 0

    def put(self, k, v):
        super().put(k, v)
        self.puts += 1

    def put_many(self, ks, vs):
        for k, v in zip(ks, vs):
            self.put(k, v)

    def write_batch(self, ks, vs, ds, seq):
        super().write_batch(ks, vs, ds, seq)
        self.puts += sum(1 for k in ks if not k.endswith(META_KEY))  # records, not the summary


def test_persistent_index_catches_up_only_the_tail():
    sim = SimFileSystem()
    idx = PersistentDictIndex()
    v = Volume("/v", io=sim, index=idx, index_prefix=b"ns:")
    for i in range(10):
        v.publish(K(i), data(i))
    idx.flush()                                    # index durable at seq 10
    at10 = (dict(idx.durable[0]), idx.durable[1])
    for i in range(10, 13):
        v.publish(K(i), data(i))
    v.delete(K(0))
    v.close()
    stale = PersistentDictIndex(at10)              # what a crash after seq 10 leaves
    v = Volume("/v", io=sim, index=stale, index_prefix=b"ns:")
    assert v.last_recovery.index_mode == "catch_up" and stale.puts == 3
    assert sorted(k for k, _ in stale.scan_prefix(b"ns:") if not k.endswith(META_KEY)) == sorted(
        b"ns:" + K(i) for i in range(1, 13))
    assert stale.get_applied_seq() == 14
    v.close()


def test_persistent_index_never_keeps_an_entry_whose_object_is_gone():
    sim = SimFileSystem()
    idx = PersistentDictIndex()
    v = Volume("/v", io=sim, index=idx)
    for i in range(4):
        v.publish(K(i), data(i))
    v.close()                                       # index durable, applied = 4
    sim.unlink("/v/" + object_relpath(K(2)))        # object lost out of band
    v = Volume("/v", io=sim, index=PersistentDictIndex(idx.durable))
    assert v.last_recovery.index_mode == "catch_up"  # open reads no object...
    with pytest.raises(CorruptObjectError):         # ...the first read finds the loss
        v.read(K(2))
    assert v.index.get(K(2)) is None and K(2) not in v and len(v) == 3
    v.close()


def test_persistent_index_behind_compaction_is_reconciled():
    """Compaction erases DELETE records; an index older than the RESET base
    cannot catch up from the tail and must be reconciled in full."""
    sim = SimFileSystem()
    idx = PersistentDictIndex()
    v = Volume("/v", io=sim, index=idx, segment_bytes=256)
    for i in range(6):
        v.publish(K(i), data(i))
    idx.flush()
    old = (dict(idx.durable[0]), idx.durable[1])
    assert old[1] == 6
    for i in range(3):
        v.delete(K(i))
    v.compact()
    v.close()
    v = Volume("/v", io=sim, index=PersistentDictIndex(old))
    assert v.last_recovery.index_mode == "reconcile"
    assert sorted(k for k, _ in v.index.scan_prefix(b"") if k != META_KEY) == sorted([K(3), K(4), K(5)])
    v.close()


@pytest.mark.parametrize("backend", [b for b in ("flat", "sorted", "lmdb", "lsm") if b in index_backends.available()])
def test_real_index_backends(tmp_path, backend):
    root = str(tmp_path / "v")
    with Volume(root, index=backend) as v:
        for i in range(20):
            v.publish(K(i), data(i))
        v.delete(K(3))
    with Volume(root, index=backend) as v:
        assert len(v) == 19 and v.index.get(K(3)) is None and len(v.keys()) == 19
        if v.index.persistent:
            assert v.last_recovery.index_mode == "catch_up"
        assert v.read(K(4)) == data(4)


def test_os_filesystem_counts_and_masks_fsyncs(tmp_path):
    fs = OsFileSystem()
    fs.disabled_fsyncs = {"object"}
    with Volume(str(tmp_path), io=fs) as v:
        v.publish(K(1), b"abc")
    assert fs.skipped_fsyncs["object"] == 1 and fs.fsync_counts["object"] == 0
    assert fs.fsync_counts["wal"] == 1


class FailingFS(SimFileSystem):
    """Twin whose fsyncs of chosen labels fail with EIO."""

    def __init__(self):
        super().__init__()
        self.fail: set[str] = set()

    def fsync(self, fd, label):
        if label in self.fail:
            raise OSError(5, "Input/output error")
        super().fsync(fd, label)


def test_failed_wal_fsync_poisons_the_volume():
    from quiver.walpub import VolumeFailedError

    fs = FailingFS()
    v = Volume("/v", io=fs)
    v.publish(K(1), b"a")
    fs.fail = {"wal"}
    with pytest.raises(VolumeFailedError):
        v.publish(K(2), b"b")
    fs.fail = set()
    with pytest.raises(VolumeFailedError):   # no retry after a failed fsync
        v.publish(K(3), b"c")
    v.close()
    with Volume("/v", io=fs) as v:           # reopen = recover
        assert v.read(K(1)) == b"a"
        v.publish(K(3), b"c")


def test_failed_object_fsync_is_a_typed_error_and_leaves_no_garbage():
    from quiver.walpub import VolumeIOError

    fs = FailingFS()
    v = Volume("/v", io=fs)
    fs.fail = {"object"}
    with pytest.raises(VolumeIOError):
        v.publish(K(1), b"a")
    assert fs.listdir("/v/tmp") == [] and K(1) not in v
    fs.fail = set()
    assert v.publish(K(1), b"a") is True
    v.close()


# ----------------------------------------------------------------- review fixes
class GatedWalFS(SimFileSystem):
    """Twin whose WAL fsyncs block while ``gate`` is closed (a slow disk, on cue)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.in_wal_fsync = threading.Event()

    def fsync(self, fd, label):
        if label == "wal" and not self.gate.is_set():
            self.in_wal_fsync.set()
            assert self.gate.wait(10), "test gate never opened"
        super().fsync(fd, label)


def _run(fn, out, name):
    try:
        out[name] = fn()
    except BaseException as exc:  # noqa: BLE001
        out[name] = exc


@pytest.mark.parametrize("op", ["publish", "delete"])
def test_enqueued_records_are_never_abandoned_on_a_deadline(op):
    """#1: a follower whose frame is queued behind a slow fsync used to get
    BusyError after wait_timeout_s while its frame was still written and applied
    later (a retry then put the key twice in one batch: the volume wedged; a
    delete was applied but its object never unlinked).  Now it waits for the
    frame to be durable and succeeds."""
    import time

    fs = GatedWalFS()
    v = Volume("/v", io=fs, wait_timeout_s=0.2)
    v.publish(K(2), data(2))
    path = "/v/" + object_relpath(K(2))
    fs.gate.clear()
    out: dict = {}
    leader = threading.Thread(target=_run, args=(lambda: v.publish(K(1), data(1)), out, "leader"))
    leader.start()
    assert fs.in_wal_fsync.wait(10)                 # the leader is inside the WAL fsync
    follow = (lambda: v.publish(K(3), data(3))) if op == "publish" else (lambda: v.delete(K(2)))
    follower = threading.Thread(target=_run, args=(follow, out, "follower"))
    follower.start()
    for _ in range(1000):                           # the follower's frame is queued
        with v._cond:
            if v._pending:
                break
        time.sleep(0.005)
    time.sleep(0.5)                                 # well past wait_timeout_s
    fs.gate.set()
    leader.join(10)
    follower.join(10)
    assert out["leader"] is True and out["follower"] is True, out
    if op == "publish":
        assert v.publish(K(3), data(3)) is False    # the "retry" is a no-op, not a wedge
        assert v.read(K(3)) == data(3)
    else:
        assert K(2) not in v and not fs.exists(path)
    v.publish(K(4), data(4))                        # the volume still commits
    v.close()
    with Volume("/v", io=fs) as v2:
        assert v2.last_recovery.orphans_removed == 0
        assert sorted(v2.keys()) == sorted([K(1), K(4)] + ([K(2), K(3)] if op == "publish" else []))


class FailingPutIndex(PersistentIndexTwin):
    """Index whose write_batch fails (disk full, lmdb map full) once armed."""

    def __init__(self):
        super().__init__()
        self.fail = False

    def write_batch(self, ks, vs, ds, seq):
        if self.fail:
            raise OSError(28, "No space left on device")
        super().write_batch(ks, vs, ds, seq)


def test_failure_applying_a_batch_poisons_the_volume_and_close_unlocks():
    """#2: an exception in _apply used to leave _syncing set for ever (every later
    commit and close() timed out with BusyError, LOCK held) and escaped raw."""
    from quiver.walpub import VolumeFailedError

    sim = SimFileSystem()
    idx = FailingPutIndex()
    v = Volume("/v", io=sim, index=idx, wait_timeout_s=0.2)
    v.publish(K(1), data(1))
    idx.fail = True
    with pytest.raises(VolumeFailedError) as ei:
        v.publish(K(2), data(2))
    assert isinstance(ei.value.__cause__, OSError)
    idx.fail = False
    with pytest.raises(VolumeFailedError):
        v.publish(K(3), data(3))
    v.close()                                       # returns, and releases LOCK
    with Volume("/v", io=sim) as v2:                # the PUT of K(2) was durable
        assert sorted(v2.keys()) == [K(1), K(2)] and v2.read(K(2)) == data(2)


def test_commit_larger_than_the_queue_is_sliced():
    """#3: one call committing more than max_pending_frames frames used to
    fail an assertion (leaving orphans)."""
    sim = SimFileSystem()
    v = Volume("/v", io=sim, max_group_frames=4, max_pending_frames=4)
    items = [(K(i), data(i, 20)) for i in range(30)]
    assert v.publish_many(items) == [True] * 30
    st = v.stats()
    assert st.frames == 30 and st.commits == 8
    assert all(v.read(k) == d for k, d in items)
    assert sorted(v.evict_to(0)) == sorted(k for k, _ in items)
    assert len(v) == 0 and v.used_bytes == 0
    v.close()
    with Volume("/v", io=sim) as v2:
        assert len(v2) == 0 and v2.last_recovery.orphans_removed == 0


def test_sliced_commits_from_many_threads():
    """#3 under contention: slices from several threads share a small queue."""
    sim = SimFileSystem()
    sim.fsync_delay_s = 0.001
    v = Volume("/v", io=sim, max_group_frames=4, max_pending_frames=8)
    out: dict = {}
    ths = [threading.Thread(target=_run, args=(
        lambda t=t: v.publish_many([(K(t * 100 + i), data(i, 20)) for i in range(25)]), out, t))
        for t in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(30)
    assert all(out[t] == [True] * 25 for t in range(4)), out
    assert len(v) == 100 and v.stats().frames == 100
    v.close()
    with Volume("/v", io=sim) as v2:
        assert len(v2) == 100


class RacingReadFS(SimFileSystem):
    """Twin that runs ``hook`` once, at the next read of ``path``: the read of
    the file happens after the volume looked the key up in its index."""

    def __init__(self):
        super().__init__()
        self.path = None
        self.hook = None
        self.raise_missing = False

    def read_file(self, path):
        if path == self.path and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
            if self.raise_missing:
                raise FileNotFoundError(path)   # read inside the delete..republish window
        return super().read_file(path)


@pytest.mark.parametrize("window", ["replaced", "missing"])
def test_read_racing_delete_and_republish_is_not_corruption(window):
    """#4: a key deleted and published again between read's index lookup and its
    file read used to raise CorruptObjectError (and drop nothing)."""
    fs = RacingReadFS()
    v = Volume("/v", io=fs)
    v.publish(K(1), data(1))
    new = data(1) if window == "missing" else data(7, 50)
    fs.path = "/v/" + object_relpath(K(1))
    fs.raise_missing = window == "missing"
    fs.hook = lambda: (v.delete(K(1)), v.publish(K(1), new))
    assert v.read(K(1)) == new
    fs.hook = lambda: (v.delete(K(1)), v.publish(K(1), new))  # read_into: the same judgement
    assert b"".join(v.read_into(K(1), _split([3]))) == new
    assert v.stats().corrupt_reads == 0 and K(1) in v
    # A genuinely bad object (same PUT on both looks) is still corruption.
    fs.hook = lambda: None
    fs.raise_missing = True
    with pytest.raises(CorruptObjectError):
        v.read(K(1))
    assert K(1) not in v and v.stats().corrupt_reads == 1
    v.close()


def test_read_racing_a_delete_is_a_miss():
    fs = RacingReadFS()
    v = Volume("/v", io=fs)
    v.publish(K(1), data(1))
    fs.path = "/v/" + object_relpath(K(1))
    fs.hook = lambda: v.delete(K(1))
    with pytest.raises(ObjectNotFoundError):
        v.read(K(1))
    assert v.stats().corrupt_reads == 0
    v.close()
