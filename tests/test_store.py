"""BlockStore (engine/store.py): the facade over L0 RAM, L1 disk and a local-directory L2.

Real tiers throughout: a RAM arena, a walpub volume on disk, a directory object
store, and real child processes (tests/store_child.py) for reuse across
processes and the lock.  S3 (moto, Ceph RGW) is in tests/test_store_s3.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine.envelope import decode_header
from engine.errors import (
    BlockNotFoundError,
    ChecksumMismatchError,
    DTypeMismatchError,
    InvalidTokensError,
    QuiverError,
    ShapeMismatchError,
    StoreClosedError,
    StoreConfigError,
    StoreLockedError,
)
from engine.keys import chain_keys
from engine.store import BlockStore
from tier.objectstore import LocalDirObjectStore

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from store_child import make_case, make_ident  # noqa: E402

CHILD = os.path.join(HERE, "store_child.py")
SMALL = dict(ram_bytes=1 << 20, index="flat")


def child(*args: str, timeout: float = 60) -> dict:
    r = subprocess.run([sys.executable, CHILD, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def bits(a) -> bytes:
    return a.tobytes() if isinstance(a, np.ndarray) else a.contiguous().view(torch.int16).numpy().tobytes()


# ------------------------------------------------------------------ round trips


def test_put_lookup_get_roundtrip(tmp_path):
    ident, tokens, blocks = make_case(1, 4)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        assert store.lookup(ident, tokens) == 0
        assert store.put(ident, tokens, blocks) == 4
        assert store.lookup(ident, tokens) == 4
        got = store.get(ident, tokens, 4)
        assert got.dtype == np.float16 and got.shape == (4, *ident.block_shape)
        assert got.tobytes() == blocks.tobytes()
        assert store.get(ident, tokens, 2).tobytes() == blocks[:2].tobytes()
        assert store.put(ident, tokens, blocks) == 0  # already stored: nothing rewritten
        st = store.stats()
        assert st["put_blocks"] == 4 and st["put_present"] == 4 and st["l0_hits"] == 6


def test_default_index_is_art_when_available(tmp_path):
    import index_backends

    with BlockStore.open(tmp_path / "s", ram_bytes=0) as store:
        assert store.index == ("art" if "art" in index_backends.available() else "flat")


def test_lookup_stops_at_first_missing_block(tmp_path):
    ident, tokens, blocks = make_case(2, 4)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        store.put(ident, tokens, blocks[:2])
        assert store.lookup(ident, tokens) == 2
        with pytest.raises(BlockNotFoundError):
            store.get(ident, tokens, 3)
        # a different token continuation shares only the common leading blocks
        other = list(tokens)
        other[16] += 1  # block 1 differs
        assert store.lookup(ident, other) == 1


def test_sequence_and_torch_inputs_and_out(tmp_path):
    ident, tokens, blocks = make_case(3, 3)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        store.put(ident, tokens, [torch.from_numpy(b) for b in blocks])
        out = torch.zeros((3, *ident.block_shape), dtype=torch.float16)
        assert store.get(ident, tokens, 3, out=out) is out
        assert out.numpy().tobytes() == blocks.tobytes()
        per_block = [np.zeros(ident.block_shape, np.float16) for _ in range(3)]
        store.get(ident, tokens, 3, out=per_block)
        assert b"".join(p.tobytes() for p in per_block) == blocks.tobytes()


def test_bfloat16_torch_roundtrip(tmp_path):
    ident = make_ident(kv_dtype="bfloat16")
    _, tokens, _ = make_case(4, 2, ident)
    blocks = torch.randn((2, *ident.block_shape), dtype=torch.bfloat16)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        store.put(ident, tokens, blocks)
        out = torch.empty_like(blocks)
        store.get(ident, tokens, 2, out=out)
        assert torch.equal(out, blocks)
        plain = store.get(ident, tokens, 2)  # numpy has no bfloat16: a uint16 carrier
        assert plain.dtype == np.uint16 and plain.tobytes() == bits(blocks)


# ------------------------------------------------------------------ validation before any write


@pytest.mark.parametrize("bad, error", [
    ("shape", ShapeMismatchError), ("dtype", DTypeMismatchError), ("tokens", InvalidTokensError),
    ("torch_dtype", DTypeMismatchError), ("ndim", ShapeMismatchError),
])
def test_bad_put_writes_nothing(tmp_path, bad, error):
    ident, tokens, blocks = make_case(5, 3)
    if bad == "shape":
        blocks = [blocks[0], blocks[1], blocks[2][:, :, :8]]  # the last block is short
    elif bad == "dtype":
        blocks = [blocks[0], blocks[1].astype(np.float32), blocks[2]]
    elif bad == "tokens":
        tokens = tokens[: 2 * ident.block_tokens]  # 3 blocks, tokens for 2
    elif bad == "torch_dtype":
        blocks = torch.from_numpy(blocks).to(torch.bfloat16)
    elif bad == "ndim":
        blocks = blocks[0]
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        with pytest.raises(error):
            store.put(ident, tokens, blocks)
        assert store.stats()["residency"] == {"l0": 0, "l1": 0, "l2": 0}
        assert len(store._disk) == 0


def test_bad_destination_is_refused_before_reading(tmp_path):
    ident, tokens, blocks = make_case(6, 2)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        store.put(ident, tokens, blocks)
        with pytest.raises(ShapeMismatchError):
            store.get(ident, tokens, 2, out=np.zeros((1, *ident.block_shape), np.float16))
        with pytest.raises(DTypeMismatchError):
            store.get(ident, tokens, 2, out=np.zeros((2, *ident.block_shape), np.float32))
        assert store.stats()["get_blocks"] == 0


def test_invalid_options_are_typed(tmp_path):
    with pytest.raises(StoreConfigError):
        BlockStore.open(tmp_path / "a", l2_mode="eventually")
    with pytest.raises(StoreConfigError):
        BlockStore.open(tmp_path / "b", index="no-such-index")
    with pytest.raises(StoreConfigError):
        BlockStore.open(tmp_path / "c", object_store="ftp://x/y")
    with pytest.raises(StoreConfigError):
        BlockStore.open(tmp_path / "d", ram_policy="mru")
    with pytest.raises(StoreConfigError):  # a RAM arena smaller than one block's slot
        BlockStore.open(tmp_path / "e", ram_bytes=1024, ram_slot_bytes=4096)
    # a failed open released its lock
    BlockStore.open(tmp_path / "b", index="flat", ram_bytes=0).close()


# ------------------------------------------------------------------ durability, lock, tiers


def test_durable_across_reopen_without_l2(tmp_path):
    ident, tokens, blocks = make_case(7, 3)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        store.put(ident, tokens, blocks)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        assert store.lookup(ident, tokens) == 3
        assert store.get(ident, tokens, 3).tobytes() == blocks.tobytes()
        st = store.stats()
        assert st["l1_hits"] == 3 and st["l0_hits"] == 0
        store.get(ident, tokens, 3)  # promoted: now from RAM
        assert store.stats()["l0_hits"] == 3


def test_second_open_is_locked_in_process_and_across_processes(tmp_path):
    path = tmp_path / "s"
    store = BlockStore.open(path, ram_bytes=0)
    with pytest.raises(StoreLockedError):
        BlockStore.open(path, ram_bytes=0)
    store.close()
    with pytest.raises(StoreClosedError):
        store.lookup(make_ident(), [1] * 16)
    proc = subprocess.Popen([sys.executable, CHILD, "hold", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError):
            BlockStore.open(path, ram_bytes=0)
        assert time.monotonic() - t0 < 1.0  # at once, not after a wait
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    BlockStore.open(path, ram_bytes=0).close()  # free again once the holder exits


def test_ram_eviction_then_disk_hits_promote(tmp_path):
    ident, tokens, blocks = make_case(8, 6)
    from engine.store import envelope_bound

    slot = envelope_bound(ident, "none")
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=2 * slot) as store:
        store.put(ident, tokens, blocks)
        assert store.stats()["residency"]["l0"] == 2  # the arena holds two blocks
        assert store.get(ident, tokens, 2).tobytes() == blocks[:2].tobytes()
        st = store.stats()
        assert st["l1_hits"] == 2 and st["l0_hits"] == 0  # the last two blocks were in RAM
        assert store.get(ident, tokens, 2).tobytes() == blocks[:2].tobytes()
        st = store.stats()
        assert st["l1_hits"] == 2 and st["l0_hits"] == 2  # promoted
        assert st["residency"] == {"l0": 2, "l1": 6, "l2": 0}
        assert store.get(ident, tokens, 6).tobytes() == blocks.tobytes()


def test_disk_budget_evicts_and_lookup_follows(tmp_path):
    ident, tokens, blocks = make_case(9, 6)
    from engine.store import envelope_bound

    per = envelope_bound(ident, "none")
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=0, disk_bytes=3 * per) as store:
        store.put(ident, tokens, blocks)
        assert store.stats()["residency"]["l1"] == 3
        assert store.lookup(ident, tokens) == 0  # the oldest (leading) blocks were evicted
        with pytest.raises(BlockNotFoundError):
            store.get(ident, tokens, 1)


def _flip_l1_object(store_path, skey: bytes) -> None:
    for dirpath, _, files in os.walk(os.path.join(store_path, "l1", "objects")):
        for f in files:
            if f.startswith(skey.hex()):
                p = os.path.join(dirpath, f)
                data = bytearray(open(p, "rb").read())
                data[len(data) // 2] ^= 0x40
                open(p, "wb").write(bytes(data))
                return
    raise AssertionError("object file not found")


def test_corrupt_disk_copy_is_never_served_and_l2_copy_is(tmp_path):
    ident, tokens, blocks = make_case(10, 2)
    skeys = [ident.namespace + k for k in chain_keys(ident, tokens, 2)]
    path, l2 = tmp_path / "s", tmp_path / "l2"
    with BlockStore.open(path, object_store=l2, ram_bytes=0, index="flat") as store:
        store.put(ident, tokens, blocks)
        _flip_l1_object(path, skeys[1])  # damaged at rest while the store is open
        assert store.get(ident, tokens, 2).tobytes() == blocks.tobytes()
        st = store.stats()
        assert st["corrupt_l1"] == 1 and st["l2_hits"] == 1 and st["l1_hits"] == 1
        assert store.get(ident, tokens, 2).tobytes() == blocks.tobytes()  # repaired in L1
        assert store.stats()["l1_hits"] == 3
    # without an L2 copy the corruption is a typed error, never bytes
    path2 = tmp_path / "s2"
    with BlockStore.open(path2, ram_bytes=0, index="flat") as store:
        store.put(ident, tokens, blocks)
        _flip_l1_object(path2, skeys[0])
        with pytest.raises(ChecksumMismatchError):
            store.get(ident, tokens, 1)
        with pytest.raises(BlockNotFoundError):  # the bad copy was dropped
            store.get(ident, tokens, 1)
        assert store.lookup(ident, tokens) == 0


# ------------------------------------------------------------------ L2 (local directory)


def test_background_l2_mode_publishes_and_manifests(tmp_path):
    ident, tokens, blocks = make_case(11, 5)
    l2 = tmp_path / "l2"
    with BlockStore.open(tmp_path / "s", object_store=l2, l2_mode="background", l2_queue_max=2,
                         **SMALL) as store:
        store.put(ident, tokens, blocks)
        assert store.flush_l2() == 0
        st = store.stats()
        assert st["l2_published"] + st["l2_retried"] >= 5 and st["l2_retry_pending"] == 0
    objs = LocalDirObjectStore(l2)
    skeys = {ident.namespace + k for k in chain_keys(ident, tokens, 5)}
    assert set(objs.list_keys()) == skeys
    assert objs.read_manifests() == skeys
    for sk in skeys:
        h = decode_header(objs.get(sk))
        assert h.fingerprint == ident.fingerprint and h.key == sk[16:]
        assert len(h.layer_crcs) == ident.num_layers  # ranged layer reads are verifiable


def test_reuse_across_processes_via_shared_directory(tmp_path):
    l2 = str(tmp_path / "shared-l2")
    assert child("put", str(tmp_path / "a"), l2, "12", "4") == {"written": 4}
    got = child("get", str(tmp_path / "b"), l2, "12", "4")
    assert got["equal"] and got["lookup"] == 4 and got["l2_hits"] == 4
    assert got["bootstrap_keys"] == 4 and got["l2_heads"] == 0  # manifest, not HEADs


def test_found_by_key_without_manifest(tmp_path):
    ident, tokens, blocks = make_case(13, 3)
    l2 = tmp_path / "l2"
    with BlockStore.open(tmp_path / "a", object_store=l2, manifest_batch=10_000, **SMALL) as a:
        a.put(ident, tokens, blocks)
        # a second process-like handle while A has not written its manifest yet
        with BlockStore.open(tmp_path / "b", object_store=l2, **SMALL) as b:
            assert b.stats()["bootstrap_keys"] == 0
            assert b.lookup(ident, tokens) == 3 and b.stats()["l2_heads"] == 3
            assert b.get(ident, tokens, 3).tobytes() == blocks.tobytes()


def test_two_processes_publish_the_same_blocks_at_once(tmp_path):
    l2 = str(tmp_path / "l2")
    start = f"{time.time() + 5:.3f}"  # both have opened their stores by then
    procs = [subprocess.Popen([sys.executable, CHILD, "race", str(tmp_path / d), l2, "14", "3", start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in "ab"]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert not any(o["late"] for o in outs), outs
    assert sum(o["published"] for o in outs) == 3  # each object created exactly once
    assert sum(o["existing"] for o in outs) == 3   # the loser saw "exists": success
    ident, tokens, blocks = make_case(14, 3)
    assert len(list(LocalDirObjectStore(l2).list_keys())) == 3
    got = child("get", str(tmp_path / "c"), l2, "14", "3")
    assert got["equal"]


def test_not_an_identity_is_typed(tmp_path):
    from engine.errors import InvalidIdentityError

    _, tokens, blocks = make_case(16, 1)
    with BlockStore.open(tmp_path / "s", **SMALL) as store:
        for call in (lambda: store.put({"model": "x"}, tokens, blocks), lambda: store.lookup("x", tokens),
                     lambda: store.get(None, tokens, 1)):
            with pytest.raises(InvalidIdentityError):
                call()


def test_quiver_errors_share_one_base():
    for cls in (BlockNotFoundError, StoreLockedError, StoreConfigError, StoreClosedError):
        assert issubclass(cls, QuiverError)


def test_compressed_codec_roundtrip(tmp_path):
    ident, tokens, blocks = make_case(15, 3)
    with BlockStore.open(tmp_path / "s", codec="zstd", **SMALL) as store:
        store.put(ident, tokens, blocks)
        assert store.get(ident, tokens, 3).tobytes() == blocks.tobytes()
        assert store.stats()["l0_hits"] == 3 and store.stats()["l0_oversize"] == 0
    with BlockStore.open(tmp_path / "s", codec="zstd", **SMALL) as store:
        assert store.get(ident, tokens, 3).tobytes() == blocks.tobytes()  # from disk
        assert store.stats()["l1_hits"] == 3


def test_threads_share_one_store(tmp_path):
    import threading

    from engine.store import envelope_bound

    cases = [make_case(100 + i, 4, make_ident(tenant=f"t{i}")) for i in range(4)]
    slot = envelope_bound(cases[0][0], "none")
    errors: list[BaseException] = []
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=6 * slot) as store:  # RAM churns

        def work(ident, tokens, blocks):
            try:
                for _ in range(5):
                    store.put(ident, tokens, blocks)
                    assert store.lookup(ident, tokens) == 4
                    assert store.get(ident, tokens, 4).tobytes() == blocks.tobytes()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=c) for c in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        st = store.stats()
        assert st["get_blocks"] == 4 * 5 * 4 and st["put_blocks"] == 16
        assert st["l0_hits"] + st["l1_hits"] == st["get_blocks"]
