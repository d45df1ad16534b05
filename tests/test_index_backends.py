"""Backend-specific tests: what the conformance suite cannot say about every
backend (LMDB map growth and key limit, RocksDB tickers and prefix extractor,
cross-process locking, durability of flush() across a process crash)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest

from quiver import index_backends
from quiver.index_backends import _common
from quiver.index_backends.errors import IndexBackendError, IndexClosedError, IndexLockedError, InvalidKeyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSISTENT_NATIVE = [n for n in ("lmdb", "lsm") if n in index_backends.available()]


def _keys(n: int, seed: int = 0, ns: bytes = b"\x11" * 16) -> list[bytes]:
    rng = random.Random(seed)
    return [ns + rng.randbytes(32) for _ in range(n)]


# -- LMDB -----------------------------------------------------------------------


@pytest.mark.skipif("lmdb" not in index_backends.available(), reason="lmdb not installed")
class TestLmdb:
    def test_map_grows_past_initial_size(self, tmp_path):
        initial = 256 << 10
        idx = index_backends.open("lmdb", tmp_path, map_size=initial)
        keys = _keys(20_000)
        values = [b"v" * 40] * len(keys)
        idx.put_many(keys, values)  # one transaction far larger than the map
        for k in _keys(500, seed=1):  # and single puts past it too
            idx.put(k, b"w")
        st = idx.stats()
        assert st.detail["map_growths"] >= 1
        assert st.detail["map_size"] > initial
        assert st.detail["data_file_bytes"] > initial
        assert len(idx) == 20_500
        assert idx.get_many(keys[::997]) == values[::997]
        idx.close()
        again = index_backends.open("lmdb", tmp_path, map_size=initial)  # smaller than the file
        assert len(again) == 20_500
        assert again.get(keys[-1]) == b"v" * 40
        again.close()

    def test_map_full_at_max_is_a_typed_error(self, tmp_path):
        idx = index_backends.open("lmdb", tmp_path, map_size=128 << 10, max_map_size=256 << 10)
        with pytest.raises(IndexBackendError, match="map is full"):
            idx.put_many(_keys(20_000), [b"v" * 40] * 20_000)
        assert len(idx) == 0  # the failed batch was aborted whole
        idx.close()

    def test_key_longer_than_lmdb_limit(self, tmp_path):
        idx = index_backends.open("lmdb", tmp_path)
        idx.put(b"k" * 511, b"ok")  # LMDB's default limit
        with pytest.raises(InvalidKeyError, match="511"):
            idx.put(b"k" * 512, b"v")
        with pytest.raises(InvalidKeyError):
            idx.get(b"k" * 512)
        idx.close()

    def test_bytes_written_counts_commits_not_reads(self, tmp_path):
        idx = index_backends.open("lmdb", tmp_path)
        base = idx.stats().bytes_written
        keys = _keys(2000)
        idx.put_many(keys, [b"x" * 40] * len(keys))
        after_write = idx.stats().bytes_written
        # 2000 x 88 bytes of records need ~45 leaf pages of 4 KiB.
        assert 2000 * 88 <= after_write - base < 2000 * 88 * 4
        idx.get_many(keys)
        list(idx.scan_prefix(b""))
        assert idx.stats().bytes_written == after_write
        idx.close()


# -- RocksDB --------------------------------------------------------------------


@pytest.mark.skipif("lsm" not in index_backends.available(), reason="rocksdict not installed")
class TestRocks:
    def test_tickers_after_writes_and_flush(self, tmp_path):
        idx = index_backends.open("lsm", tmp_path)
        keys = _keys(3000)
        idx.put_many(keys, [b"v" * 40] * len(keys))
        idx.flush()  # WAL fsync
        assert idx.stats().detail["rocksdb.wal.bytes"] >= 3000 * 48
        idx.flush_memtables()  # memtable -> SST
        st = idx.stats()
        d = st.detail
        assert d["rocksdb.flush.write.bytes"] > 0
        assert d["total_sst_files_size"] > 0
        assert d["rocksdb.compact.write.bytes"] >= 0
        assert st.bytes_written == d["rocksdb.wal.bytes"] + d["rocksdb.flush.write.bytes"] + d["rocksdb.compact.write.bytes"]
        assert st.bytes_on_disk >= d["total_sst_files_size"]
        assert idx.tickers()["rocksdb.number.keys.written"] >= 3000
        idx.close()

    @pytest.mark.parametrize("in_sst", [True, False], ids=["sst", "memtable"])
    @pytest.mark.parametrize("prefix_len", [16, 0])
    def test_prefix_scans_of_every_length_across_sst_files(self, tmp_path, monkeypatch, prefix_len, in_sst):
        # Several SST files, each holding only some namespaces, so that prefix
        # bloom filters really get to skip files; keys shorter, equal to and
        # longer than the extractor's 16 bytes.  Tiny scan chunks make every scan
        # re-seek to full keys mid-way, where a prefix-bloom seek would skip files.
        monkeypatch.setattr(_common, "SCAN_CHUNK", 3)
        idx = index_backends.open("lsm", tmp_path, prefix_len=prefix_len)
        rng = random.Random(16)
        namespaces = [b"\x00" * 16, b"\x00" * 15 + b"\xff", b"\x7f" * 16, b"\xff" * 16, rng.randbytes(16)]
        model = {}
        # One SST per group (3 flushes: under the L0 compaction trigger of 4); the
        # first two namespaces share 15 bytes but never share a file.
        for round_, group in enumerate([namespaces[:1], namespaces[1:2], namespaces[2:]]):
            batch = {}
            for ns in group:
                for _ in range(30):
                    batch[ns + rng.randbytes(32)] = bytes([round_])
                batch[ns] = b"exactly16"
                batch[ns[:7]] = b"short"
                batch[ns + b"\x00"] = b"17"
            idx.put_many(list(batch), list(batch.values()))
            model.update(batch)
            if in_sst:
                idx.flush_memtables()
        assert idx.stats().detail["num_files_at_level0"] == (3 if in_sst else 0)
        keys = sorted(model)
        probes = rng.sample(keys, 8) + [keys[0], keys[-1]]
        for length in range(0, 49):
            for prefix in {k[:length] for k in probes}:
                want = sorted((k, v) for k, v in model.items() if k.startswith(prefix))
                assert list(idx.scan_prefix(prefix)) == want, (length, prefix.hex())
        idx.close()

    def test_reopen_after_abandoned_scan(self, tmp_path):
        idx = index_backends.open("lsm", tmp_path)
        idx.put_many(_keys(3000), [b"v"] * 3000)
        it = idx.scan_prefix(b"")
        next(it)  # a half-consumed scan must not pin the DB open
        idx.close()
        with pytest.raises(IndexClosedError):
            list(it)
        again = index_backends.open("lsm", tmp_path)
        assert len(again) == 3000
        again.close()


# -- all chunked scans ----------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in ("sorted", "lmdb", "lsm") if n in index_backends.available()])
def test_scan_survives_writes_between_chunks(tmp_path, name):
    idx = index_backends.open(name, tmp_path)
    keys = sorted(_keys(2 * _common.SCAN_CHUNK + 10))
    idx.put_many(keys, [b"v"] * len(keys))
    seen = []
    for i, (k, _) in enumerate(idx.scan_prefix(b"")):
        seen.append(k)
        if i == 5:
            idx.delete(keys[-1])  # not yet read: must not appear
            idx.put(b"\x00early", b"x")  # before the cursor: must not appear
    assert seen == keys[:-1]
    assert seen == sorted(set(seen))
    idx.close()


# -- locking and durability across processes -------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from quiver import index_backends
    from quiver.index_backends.errors import IndexLockedError
    name, path, mode = sys.argv[1:4]
    if mode == "lock":
        try:
            index_backends.open(name, path)
        except IndexLockedError:
            sys.exit(17)
        sys.exit(0)
    idx = index_backends.open(name, path)
    idx.put_many([bytes([i]) * 48 for i in range(1, 101)], [b"v%d" % i for i in range(1, 101)])
    idx.delete(bytes([7]) * 48)
    idx.set_applied_seq(99)
    idx.flush()
    os._exit(0)  # crash: no close()
    """
)


def _child(name, path, mode):
    code = _CHILD.format(repo=REPO)
    return subprocess.run([sys.executable, "-c", code, name, str(path), mode], capture_output=True, timeout=60)


@pytest.mark.parametrize("name", PERSISTENT_NATIVE)
def test_second_process_gets_locked_error(tmp_path, name):
    idx = index_backends.open(name, tmp_path)
    proc = _child(name, tmp_path, "lock")
    assert proc.returncode == 17, proc.stderr.decode()
    idx.close()
    assert _child(name, tmp_path, "lock").returncode == 0


@pytest.mark.parametrize("name", PERSISTENT_NATIVE)
def test_flush_survives_process_crash(tmp_path, name):
    proc = _child(name, tmp_path, "crash")
    assert proc.returncode == 0, proc.stderr.decode()
    idx = index_backends.open(name, tmp_path)
    assert len(idx) == 99
    assert idx.get(bytes([7]) * 48) is None
    assert idx.get(bytes([100]) * 48) == b"v100"
    assert idx.get_applied_seq() == 99
    idx.close()


def test_prefix_successor():
    assert _common.prefix_successor(b"") is None
    assert _common.prefix_successor(b"\xff\xff") is None
    assert _common.prefix_successor(b"ab") == b"ac"
    assert _common.prefix_successor(b"a\xff") == b"b"
    assert _common.prefix_successor(b"\x00\xff\xff") == b"\x01"


def test_dir_lock_is_exclusive_within_one_process(tmp_path):
    lock = _common.DirLock(str(tmp_path))
    with pytest.raises(IndexLockedError):
        _common.DirLock(str(tmp_path))
    lock.release()
    lock.release()  # idempotent
    _common.DirLock(str(tmp_path)).release()


def test_every_backend_is_available_here():
    """The conformance suite is parametrised over available(): a backend whose
    import broke would silently drop out of it.  This machine has every one."""
    assert set(index_backends.available()) == {"flat", "sorted", "lmdb", "lsm", "art"}
