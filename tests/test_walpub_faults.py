"""Faults beyond crashes, on the volume (issue 13): derived state (the index) is
never trusted over the self-verifying objects and the WAL it describes; a stray
entry or a stolen lock file is never fatal or silent."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest

from quiver import index_backends
from quiver.walpub import Volume, VolumeLockedError
from quiver.walpub.volume import INDEX_VALUE, object_relpath

PERSISTENT = [b for b in ("art", "lmdb", "lsm") if b in index_backends.available()]


def K(i: int) -> bytes:
    return bytes([i % 251]) * 16 + i.to_bytes(16, "little")


def data(i: int) -> bytes:
    return bytes([i % 256]) * (100 + i)


def _fill(root: str, backend: str, n: int = 40) -> None:
    with Volume(root, index=backend) as v:
        v.publish_many([(K(i), data(i)) for i in range(n)])


def _damage_record(root: str, backend: str, key: bytes, how: str) -> None:
    """Change one index record behind the volume's back (a flipped bit on disk)."""
    idx = index_backends.open(backend, f"{root}/index-{backend}", **({"log": False} if backend == "art" else {}))
    try:
        value = idx.get(key)
        assert value is not None and len(value) == INDEX_VALUE.size
        if how == "value":
            raw = bytearray(value)
            raw[random.Random(1).randrange(len(raw))] ^= 0x10
            idx.write_batch([key], [bytes(raw)], [], idx.get_applied_seq())
        else:  # the key's bit flips: the record now sits under a wrong key
            bad = bytes([key[0] ^ 0x01]) + key[1:]
            idx.write_batch([bad], [value], [key], idx.get_applied_seq())
        idx.flush()
    finally:
        idx.close()


@pytest.mark.parametrize("backend", PERSISTENT)
def test_damaged_index_value_never_costs_the_intact_object(tmp_path, backend):
    """Finding 1: a flipped bit in an index value made the next read report a
    checksum mismatch and unlink the intact object."""
    root = str(tmp_path / "v")
    _fill(root, backend)
    _damage_record(root, backend, K(7), "value")
    with Volume(root, index=backend) as v:
        assert v.read(K(7)) == data(7)            # the record is rebuilt from the WAL, the object kept
        assert v.stats().index_repairs == 1 and v.stats().corrupt_reads == 0
        assert os.path.exists(os.path.join(root, object_relpath(K(7))))
        assert all(v.read(K(i)) == data(i) for i in range(40))


@pytest.mark.parametrize("backend", PERSISTENT)
def test_damaged_index_key_does_not_strand_the_block(tmp_path, backend):
    """Finding 1: a flipped key bit stranded the block for good (lookup 0, get not
    found, a re-put wrote nothing because the tier still "contained" it)."""
    root = str(tmp_path / "v")
    _fill(root, backend)
    _damage_record(root, backend, K(9), "key")
    with Volume(root, index=backend) as v:
        assert v.read(K(9)) == data(9)            # the object is there, the index has no record: rebuilt from the WAL
        assert v.stats().index_repairs == 1
        assert K(9) in v and len(v) == 40 and len(v.keys()) == 40
    _damage_record(root, backend, K(11), "key")
    with Volume(root, index=backend) as v:
        assert v.scrub()[1] == 0                  # a scrub meets the stranded record first: rebuilt too
        assert v.stats().index_repairs >= 1 and K(11) in v and len(v.keys()) == 40


@pytest.mark.parametrize("backend", PERSISTENT)
@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_index_files_are_rebuilt_from_the_wal(tmp_path, backend, damage):
    """Findings 2-4: a damaged index file made the store unopenable (ART), killed
    the process (truncated LMDB: SIGBUS) or escaped untyped (RocksDB).  The index
    is derived state: its files are discarded and it is rebuilt from the WAL.
    Run in a child so a SIGBUS would show as a failed child, not a dead suite."""
    root = str(tmp_path / "v")
    _fill(root, backend)
    idir = f"{root}/index-{backend}"
    main = {"art": "art.snap", "lmdb": "data.mdb"}.get(backend)
    files = [main] if main else sorted(f for f in os.listdir(idir) if f.endswith((".sst", ".log")) or f.startswith("MANIFEST"))
    for name in files:
        path = os.path.join(idir, name)
        size = os.path.getsize(path)
        if damage == "truncate":
            os.truncate(path, size // 3)
        elif damage == "garbage":
            with open(path, "r+b") as f:
                f.write(random.Random(3).randbytes(min(size, 4096)))
        else:
            os.unlink(path)
    child = textwrap.dedent(f"""
        from quiver.walpub import Volume
        from tests.test_walpub_faults import K, data
        with Volume({root!r}, index={backend!r}) as v:
            bad = [i for i in range(40) if v.read(K(i)) != data(i)]
            print(len(v), bad, v.last_recovery.index_reset is not None)
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-2000:]
    count, bad, _reset = run.stdout.split(" ", 2)
    assert count == "40" and bad.strip() == "[]" or run.stdout.startswith("40 []"), run.stdout


def test_unlinked_lock_file_cannot_let_a_second_writer_in(tmp_path):
    """Finding 7: with the lock in a file, a tmp cleaner that unlinked it let a
    second writer open the volume.  The root directory itself is locked now."""
    root = str(tmp_path / "v")
    with Volume(root) as v:
        v.publish(K(1), data(1))
        for name in os.listdir(root):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                os.unlink(p)                      # what a cleaner of stale files does
        child = f"from quiver.walpub import Volume\nVolume({root!r})\n"
        run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert run.returncode != 0 and "VolumeLockedError" in run.stderr
        with pytest.raises(VolumeLockedError):
            Volume(root)


@pytest.mark.parametrize("where", ["tmp", "wal", "objects/ab"])
def test_stray_directories_are_skipped_and_counted(tmp_path, where):
    """Finding 11: a stray directory in tmp/, wal/ or an objects shard made every open fail (EISDIR)."""
    root = str(tmp_path / "v")
    with Volume(root) as v:
        v.publish(K(1), data(1))
    os.unlink(os.path.join(root, "CLEAN"))        # as after a crash: the orphan scan runs
    stray = os.path.join(root, where, "lost+found")
    os.makedirs(stray)
    with Volume(root) as v:
        assert v.read(K(1)) == data(1)
        assert any(s.endswith("lost+found") for s in v.last_recovery.stray)
    assert os.path.isdir(stray)


def test_unlinked_files_cannot_let_a_second_store_in(tmp_path):
    """Finding 7 through the store: its lock file (STORE.lock) and the volume's
    could be unlinked by a cleaner; a second process then opened the store and
    its acknowledged puts were silently lost.  Directories are locked now."""
    from quiver.engine import BlockStore

    path = str(tmp_path / "store")
    with BlockStore.open(path, index="flat"):
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                if name.endswith(".lock") or name == "LOCK":
                    os.unlink(os.path.join(dirpath, name))
        child = f"from quiver.engine import BlockStore\nBlockStore.open({path!r}, index='flat')\n"
        run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert run.returncode != 0 and "StoreLockedError" in run.stderr, run.stderr[-1500:]


def test_wal_damage_adopts_the_orphans_that_verify(tmp_path):
    """Finding 5 through the store: a WAL flip used to cost every later block
    (collected as orphans).  Now the damaged frame's record is lost, and its
    object -- a self-verifying envelope naming its key -- is adopted back."""
    import numpy as np

    from quiver.engine import BlockStore, CacheIdentity

    ident = CacheIdentity(model="m", model_revision="r", tokenizer="t", tokenizer_revision="r", adapter=None,
                          tenant="a", kv_dtype="float16", block_tokens=16, num_layers=1, num_kv_heads=1, head_dim=8)
    path = str(tmp_path / "s")
    toks = list(range(16 * 30))
    blocks = np.random.default_rng(0).standard_normal((30, 1, 2, 16, 1, 8)).astype(np.float16)
    with BlockStore.open(path, index="lmdb", ram_bytes=0) as s:
        for i in range(30):  # one WAL frame per block
            s.put(ident, toks[: 16 * (i + 1)], blocks[: i + 1])
    wal = os.path.join(path, "l1", "wal")
    seg = os.path.join(wal, sorted(os.listdir(wal))[0])
    raw = bytearray(open(seg, "rb").read())
    raw[len(raw) // 2] ^= 0x04                      # one bit, in some frame in the middle
    open(seg, "wb").write(raw)
    os.unlink(os.path.join(path, "l1", "index-lmdb", "data.mdb"))  # and the index must be rebuilt from the WAL
    with BlockStore.open(path, index="lmdb", ram_bytes=0) as s:
        rep = s._disk.last_recovery
        assert rep.damaged and rep.adopted == 1 and rep.orphans_removed == 0
        assert s.lookup(ident, toks) == 30
        assert np.array_equal(s.get(ident, toks).view(np.float16), blocks)
