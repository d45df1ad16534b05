"""Faults at BlockStore's edges (issue 13): full disks (finding 6) and bad input (finding 10).

Full disks are real where this process may mount a file system: an 8 MiB tmpfs
per test (``mount -t tmpfs``, root only).  Where it may not, the same small
disk is *injected*: walpub's FileSystem is replaced by one that refuses a write
with ENOSPC once the files under the store's root (plus a ballast) would exceed
8 MiB, and ``shutil.disk_usage`` reports that disk.  The injected fault exists
only because a real full disk cannot be had there; ``SmallDisk.real`` says which
one a run used (set QUIVER_FAULTS_INJECT=1 to force the injected one).

Each test names the assertion that fails on the code before issue 13.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from quiver import index_backends
from quiver.engine.errors import (
    DTypeMismatchError,
    InvalidPayloadError,
    QuiverError,
    StoreConfigError,
    StoreIOError,
)
from quiver.engine.store import BlockStore
from quiver.tier.disk import AUTO, DEFAULT_DISK_FRACTION, DiskTier, auto_budget
from quiver.walpub.io import OsFileSystem
from quiver.walpub.volume import object_relpath

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from store_child import make_case, make_ident  # noqa: E402

MiB = 1 << 20
DISK = 8 * MiB
IDENT = make_ident(num_layers=4, head_dim=64)  # 32 KiB blocks: an 8 MiB disk holds ~250
HAS_ART = "art" in index_backends.available()


# ------------------------------------------------------------------ a small disk


def _du(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


_MOUNT_OK: bool | None = None


def _can_mount(probe_dir: str) -> bool:
    global _MOUNT_OK
    if _MOUNT_OK is None:
        _MOUNT_OK = False
        if not os.environ.get("QUIVER_FAULTS_INJECT") and hasattr(os, "geteuid") and os.geteuid() == 0:
            os.makedirs(probe_dir, exist_ok=True)
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe_dir], capture_output=True)
            if r.returncode == 0:
                subprocess.run(["umount", probe_dir], capture_output=True)
                _MOUNT_OK = True
    return _MOUNT_OK


class SmallDisk:
    """An 8 MiB file system at ``root``: a real tmpfs, or the injected twin (module doc)."""

    def __init__(self, root: str, monkeypatch) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.real = _can_mount(root + ".probe")
        self.ballast = 0  # injected mode: bytes another tenant holds
        if self.real:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", root], check=True)
            return
        disk = self

        class QuotaFS(OsFileSystem):
            def write(self, fd: int, data) -> None:
                n = len(memoryview(data).cast("B"))
                if disk.used() + n > DISK:
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                super().write(fd, data)

        real_usage = shutil.disk_usage

        def usage(path):
            if os.path.abspath(os.fspath(path)).startswith(root):
                used = disk.used()
                return type(real_usage(root))(DISK, used, max(0, DISK - used))
            return real_usage(path)

        import quiver.walpub.volume

        from quiver import walpub
        monkeypatch.setattr(walpub.volume, "OsFileSystem", QuotaFS)
        monkeypatch.setattr(shutil, "disk_usage", usage)

    def used(self) -> int:
        return _du(self.root) + self.ballast

    def free(self) -> int:
        return shutil.disk_usage(self.root).free

    def fill(self) -> None:
        """Another tenant takes every byte left."""
        if not self.real:
            self.ballast = max(0, DISK - _du(self.root))
            return
        fd = os.open(os.path.join(self.root, "ballast"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)
        assert self.free() == 0

    def unfill(self) -> None:
        self.ballast = 0
        if self.real and os.path.exists(os.path.join(self.root, "ballast")):
            os.unlink(os.path.join(self.root, "ballast"))

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", self.root], capture_output=True)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = SmallDisk(str(tmp_path / "mnt"), monkeypatch)
    yield d
    d.close()


def _case(seed: int, n: int = 4):
    return make_case(seed, n, IDENT)


def _readable(store: BlockStore, seeds) -> dict[int, int]:
    """seed -> leading blocks found, each verified byte-exact."""
    found = {}
    for seed in seeds:
        _, tokens, blocks = _case(seed)
        n = store.lookup(IDENT, tokens)
        assert store.get(IDENT, tokens, n).tobytes() == blocks[:n].tobytes()
        found[seed] = n
    return found


def _close_typed(store: BlockStore) -> QuiverError | None:
    """close(); a failure must be typed (a raw OSError fails the test)."""
    try:
        store.close()
    except QuiverError as exc:
        return exc
    return None


# ------------------------------------------------------------------ finding 6: full disks


@pytest.mark.skipif(not HAS_ART, reason="the ART index (numba) is not installed")
def test_close_on_a_full_disk_is_typed_and_releases_the_lock(disk):
    """Before: close() raised a raw OSError (ENOSPC writing the ART snapshot) -- the
    ``_close_typed`` call fails -- and kept the store's lock, so the reopen below
    raised StoreLockedError for as long as the process lived."""
    path = os.path.join(disk.root, "s")
    store = BlockStore.open(path, index="art", ram_bytes=0)
    for seed in range(10):
        _, tokens, blocks = _case(seed)
        store.put(IDENT, tokens, blocks)
    disk.fill()
    err = _close_typed(store)
    assert err is None or isinstance(err, StoreIOError)
    # Same process, disk still full: the lock was released and the store opens
    # (on an in-memory stand-in index if the ART cannot be written; half the
    # blocks may be given back under the default budget).
    store = BlockStore.open(path, index="art", ram_bytes=0)
    found = _readable(store, range(10))
    assert sum(found.values()) > 0 and all(n in (0, 4) for n in found.values())
    _close_typed(store)
    disk.unfill()
    with BlockStore.open(path, index="art", ram_bytes=0) as store:
        assert _readable(store, range(10)) == found


def test_after_enospc_reads_are_served_and_a_smaller_budget_reopens_and_frees_space(disk):
    """Before: the put after the reopen with a smaller budget raised StoreIOError
    (ENOSPC: the disk tier wrote first and evicted afterwards), and nothing was
    freed at open (the ``used <= 2 MiB`` assertion)."""
    path = os.path.join(disk.root, "s")
    store = BlockStore.open(path, ram_bytes=0, disk_bytes=64 * MiB)  # a budget the disk cannot honour
    stored = []
    with pytest.raises(StoreIOError, match="No space left"):
        for seed in range(1000):
            _, tokens, blocks = _case(seed)
            store.put(IDENT, tokens, blocks)
            stored.append(seed)
    assert len(stored) > 10
    assert _readable(store, stored) == {s: 4 for s in stored}  # reads are still served
    _close_typed(store)
    free_before = disk.free()
    with BlockStore.open(path, ram_bytes=0, disk_bytes=2 * MiB) as store:
        assert store.stats()["tiers"]["l1"]["used_bytes"] <= 2 * MiB
        assert disk.free() > free_before + 2 * MiB  # eviction at open gave the space back
        _, tokens, blocks = _case(5000)
        assert store.put(IDENT, tokens, blocks) == 4
        assert store.get(IDENT, tokens).tobytes() == blocks.tobytes()
        found = _readable(store, stored)
        assert all(n in (0, 4) for n in found.values()) and sum(found.values()) > 0


def test_the_default_disk_budget_keeps_the_disk_from_filling(disk):
    """Before: L1 was unbounded by default; the puts below filled the disk and one
    raised StoreIOError (ENOSPC)."""
    path = os.path.join(disk.root, "s")
    with BlockStore.open(path, ram_bytes=0) as store:
        cap = store.stats()["tiers"]["l1"]["capacity_bytes"]
        assert 0 < cap <= DEFAULT_DISK_FRACTION * DISK
        for seed in range(120):  # 120 x 4 x 32 KiB = 15 MiB through an 8 MiB disk
            _, tokens, blocks = _case(seed)
            store.put(IDENT, tokens, blocks)
            assert store.stats()["tiers"]["l1"]["used_bytes"] <= cap
        assert disk.free() > 0
        assert _readable(store, [119]) == {119: 4}


def test_disk_tier_evicts_before_it_writes(tmp_path):
    """Before: the new object was created first and the victim unlinked afterwards
    (the ``unlink < create`` assertion)."""
    ops = []

    class Recording(OsFileSystem):
        def create(self, path):
            ops.append(("create", path))
            return super().create(path)

        def unlink(self, path):
            ops.append(("unlink", path))
            return super().unlink(path)

    root = str(tmp_path / "l1")
    with DiskTier(root, capacity_bytes=3000, io=Recording()) as d:
        for i in range(3):
            d.put(b"key-%d" % i, bytes([i]) * 1000)
        ops.clear()
        assert d.put(b"key-3", b"\3" * 1000) == [b"key-0"]
        unlink = ops.index(("unlink", f"{root}/{object_relpath(b'key-0')}"))
        create = next(i for i, (op, p) in enumerate(ops) if op == "create" and "/tmp/" in p)
        assert unlink < create
        assert d.used_bytes == 3000


def test_auto_budget_is_a_fraction_of_free_plus_held(tmp_path, monkeypatch):
    """Before: there was no default budget (``tier.disk.AUTO`` did not exist)."""
    usage = type(shutil.disk_usage("/"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100 * MiB, 90 * MiB, 10 * MiB))
    assert auto_budget(str(tmp_path), 6 * MiB) == int(DEFAULT_DISK_FRACTION * 16 * MiB)
    assert auto_budget(str(tmp_path), 0, fraction=1.0) == 10 * MiB  # never above free + held
    with DiskTier(str(tmp_path / "l1"), capacity_bytes=AUTO) as d:
        assert d.capacity_bytes == int(DEFAULT_DISK_FRACTION * 10 * MiB) and d.auto_budget


# ------------------------------------------------------------------ finding 10: bad options


BAD_OPTIONS = [
    dict(l2_enqueue_timeout_s=-1), dict(l2_enqueue_timeout_s=math.nan), dict(l2_enqueue_timeout_s="1"),
    dict(l2_enqueue_timeout_s=math.inf), dict(l2_retry_interval_s=-1), dict(l2_retry_interval_s=0),
    dict(l2_retry_interval_s=True), dict(ram_bytes="1"), dict(ram_bytes=-1), dict(ram_bytes=1.5),
    dict(ram_bytes=True), dict(ram_slot_bytes=0), dict(ram_slot_bytes="4096"), dict(disk_bytes=0),
    dict(disk_bytes=-5), dict(disk_bytes="10"), dict(disk_bytes=True), dict(disk_bytes=1.5),
    dict(l2_queue_max=True), dict(l2_queue_max=0), dict(manifest_batch="x"), dict(manifest_batch=0),
    dict(bootstrap="yes"), dict(naive=1), dict(guard="no"), dict(index=5), dict(index=""),
    dict(codec=["none"]), dict(codec=None), dict(l2_mode=None), dict(ram_policy=3), dict(object_store=5),
    dict(object_store=""), dict(s3_options="endpoint_url=x"),
    dict(s3_options={"endpoint_url": "http://127.0.0.1:1"}),                       # without an object store
    dict(object_store="DIR", s3_options={"profile": "p"}),                          # a directory store
    dict(object_store="s3://bucket/p", s3_options={"no_such_option": 1}),
    dict(object_store="s3://bucket/p", s3_options={"endpoint": "http://127.0.0.1:1"}),
    dict(object_store="s3://bucket/p", s3_options={"part_size": "big"}),
    dict(object_store="s3://bucket/p", s3_options={"create_bucket": "yes"}),
    dict(object_store="s3://bucket/p", s3_options={"retry": 3}),
    dict(object_store="s3://bucket/p", s3_options={5: 1}),
]


@pytest.mark.parametrize("kw", BAD_OPTIONS, ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_bad_options_are_refused_up_front_and_write_nothing(tmp_path, kw):
    """Before: some were accepted (l2_enqueue_timeout_s=-1, l2_retry_interval_s=-1,
    bools, strings where open did not compare them), others raised TypeError or
    ValueError -- ``pytest.raises(StoreConfigError)`` fails either way."""
    kw = {k: (str(tmp_path / "l2") if v == "DIR" else v) for k, v in kw.items()}
    with pytest.raises(StoreConfigError):
        BlockStore.open(tmp_path / "s", **kw)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("bad", [None, "", "   ", b"/tmp/x", 5, "FILE", "NUL"])
def test_bad_paths_are_refused(tmp_path, monkeypatch, bad):
    """Before: None and 5 raised TypeError, "" opened the current directory, a file
    raised StoreConfigError only by accident of makedirs."""
    monkeypatch.chdir(tmp_path)
    if bad == "FILE":
        bad = tmp_path / "a-file"
        bad.write_bytes(b"x")
    elif bad == "NUL":
        bad = str(tmp_path / "a\0b")
    with pytest.raises(StoreConfigError):
        BlockStore.open(bad)
    assert sorted(os.listdir(tmp_path)) == (["a-file"] if isinstance(bad, os.PathLike) else [])


def test_good_options_in_other_numeric_types_still_open(tmp_path):
    with BlockStore.open(tmp_path / "s", ram_bytes=np.int64(1 << 20), disk_bytes=np.int32(64 * MiB),
                         l2_enqueue_timeout_s=0, l2_retry_interval_s=np.float64(0.5), guard=np.bool_(True),
                         index="flat") as store:
        _, tokens, blocks = _case(1)
        assert store.put(IDENT, tokens, blocks) == 4
        assert store.stats()["tiers"]["l1"]["capacity_bytes"] == 64 * MiB


def test_close_releases_the_lock_and_stays_typed_when_a_tier_fails(tmp_path, monkeypatch):
    """Before: an untyped error while closing (here L2's close; in the issue the
    queue's ValueError from l2_enqueue_timeout_s=-1) escaped raw and kept the
    lock: ``pytest.raises(StoreIOError)`` fails, then the reopen raised StoreLockedError."""
    path = tmp_path / "s"
    store = BlockStore.open(path, object_store=tmp_path / "l2", l2_mode="background", index="flat", ram_bytes=0)
    _, tokens, blocks = _case(2)
    store.put(IDENT, tokens, blocks)
    worker = store._worker

    def broken_close():
        raise RuntimeError("the L2 client blew up")

    monkeypatch.setattr(store._l2, "close", broken_close)
    with pytest.raises(StoreIOError, match="blew up"):
        store.close()
    assert not worker.is_alive()
    with BlockStore.open(path, object_store=tmp_path / "l2", index="flat", ram_bytes=0) as again:
        assert again.get(IDENT, tokens).tobytes() == blocks.tobytes()


# ------------------------------------------------------------------ finding 10: bad payloads


def _l1_empty(path) -> bool:
    with BlockStore.open(path, index="flat", ram_bytes=0) as s:
        return s.stats()["tiers"]["l1"]["blocks"] == 0


def _bad_tensors():
    dense = torch.from_numpy(_case(3, 2)[2])
    yield "meta", dense.to("meta")
    yield "sparse", dense.to_sparse()
    yield "sparse-block", [dense[0], dense[1].to_sparse()]
    yield "meta-block", [dense[0], dense[1].to("meta")]
    yield "quantized", torch.quantize_per_tensor(dense.float(), 0.1, 0, torch.qint8)
    yield "complex", [dense[0], torch.complex(dense[1].float(), dense[1].float())]


@pytest.mark.parametrize("name,blocks", list(_bad_tensors()), ids=[n for n, _ in _bad_tensors()])
def test_unreadable_tensors_are_typed_and_write_nothing(tmp_path, name, blocks):
    """Before: meta -> NotImplementedError, sparse -> RuntimeError, quantized ->
    TypeError/RuntimeError: ``pytest.raises((InvalidPayloadError, DTypeMismatchError))`` fails."""
    _, tokens, _ = _case(3, 2)
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=1 << 20) as store:
        with pytest.raises((InvalidPayloadError, DTypeMismatchError)) as exc:
            store.put(IDENT, tokens, blocks)
        assert isinstance(exc.value, QuiverError)
        assert store.lookup(IDENT, tokens) == 0
    assert _l1_empty(tmp_path / "s")


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_under_int8_is_typed_and_writes_nothing(tmp_path, kv_dtype, bad):
    """Before: quantize raised a bare ValueError: ``pytest.raises(InvalidPayloadError)`` fails."""
    ident = make_ident(kv_quant="int8-channel", kv_dtype=kv_dtype)
    _, tokens, blocks = make_case(4, 3, ident)
    t = torch.from_numpy(blocks.astype(np.float32)).to(getattr(torch, kv_dtype))
    t[2, 1, 0, 3, 0, 5] = bad  # the last block: the first two would be fine
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=1 << 20) as store:
        with pytest.raises(InvalidPayloadError, match="NaN or Inf"):
            store.put(ident, tokens, t)
        assert store.lookup(ident, tokens) == 0
        assert store.put(ident, tokens, t[:2]) == 2  # finite blocks of the same identity are fine
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=0) as store:
        assert store.stats()["tiers"]["l1"]["blocks"] == 2


def test_nan_under_an_exact_identity_is_stored_bit_exact(tmp_path):
    """Exact KV keeps its bits, NaN included: only int8 cannot represent it."""
    _, tokens, blocks = _case(6, 1)
    blocks = blocks.copy()
    blocks[0, 0, 0, 0, 0, 0] = np.nan
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=0) as store:
        store.put(IDENT, tokens, blocks)
        assert store.get(IDENT, tokens, 1).tobytes() == blocks.tobytes()


def test_invalid_payload_error_is_a_quiver_value_error():
    assert issubclass(InvalidPayloadError, QuiverError) and issubclass(InvalidPayloadError, ValueError)
