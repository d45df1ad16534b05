"""LMCache 0.5.6's storage layer beside Quiver's BlockStore, in one process (group ``lmcache``).

Run by studies/bench_lmcache.py with the interpreter of ``.venv-lmcache`` (LMCache pins its
own torch and numpy; Quiver is installed there too, editable), as
``python -m quiver.studies.lmcache_child '<json>'``; prints one JSON line.

Per chunk size, a request of ``request_bytes`` (``n`` chunks), ``rounds`` rounds, every
contender timed in each round in turn (interleaved; which store goes first alternates by
round, so neither always writes while the other's data is still being flushed), medians
reported.  One caller thread
throughout (LMCache's disk backend writes and reads on its own 4-thread pool: that is how it
runs).  Each round stores new chunks (new keys, random bytes).

- RAM: LMCache ``StorageManager`` with ``local_cpu=True`` and no disk: store = allocate from
  its pool + copy the caller's bytes in + ``batched_put``; lookup = ``batched_contains``;
  retrieve = ``batched_get(location="LocalCPUBackend")`` + copy into the caller's buffer.
  Quiver: ``BlockStore`` with an L0 large enough for the request; lookup = ``lookup``;
  retrieve = ``get(..., out=caller's buffer)`` from L0.  Quiver's store is its ``put``, which
  is durable in L1 on return: not comparable with a RAM-only store, reported beside it.
- Disk: LMCache with ``local_cpu=False`` (the CPU backend only stages) and a local disk:
  store = ``batched_put`` and then waiting until every chunk is in its file (LMCache's
  writes are asynchronous and it never fsyncs: not durable); ``store + fsync`` adds an
  ``fsync`` of each file by this harness, the durable equivalent.  Retrieve =
  ``batched_get(location="LocalDiskBackend")`` + copy out (it reads the files; page cache
  warm).  Quiver: ``ram_bytes=0``; store = ``put`` (durable on return: objects, their
  directories and the WAL fsync'd); retrieve = ``get`` from L1 (page cache warm).  Quiver
  has no non-durable local store mode to set beside LMCache's asynchronous one.

Bytes are checked equal to the source after every retrieve.  Quiver runs with its default
index (the ART), its kernels compiled before the first case (``quiver warmup``), as a server
would have them; LMCache's pools are created per case, before its timings.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import torch  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
TOKENS, HIDDEN = 256, 256  # LMCache chunk: 256 tokens; bf16 [2, layers, 256, 256] = layers x 256 KiB


def _quiet() -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lmcache"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _manager(local_cpu: bool, disk_dir: str | None, cpu_gib: float, disk_gib: float):
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.event_manager import EventManager
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.storage_manager import StorageManager

    kw = dict(local_cpu=local_cpu, max_local_cpu_size=cpu_gib, chunk_size=TOKENS)
    if disk_dir is not None:
        kw.update(local_disk=disk_dir, max_local_disk_size=disk_gib)
    cfg = LMCacheEngineConfig.from_defaults(**kw)
    md = LMCacheMetadata(model_name="quiver-bench", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                         kv_dtype=torch.bfloat16, kv_shape=(1, 2, TOKENS, 2, 128), role="worker")
    sm = StorageManager(cfg, md, EventManager())
    _quiet()
    return sm


class LMCacheSide:
    """One StorageManager and the calls a cache engine makes on it."""

    def __init__(self, chunk_bytes: int, local_cpu: bool, disk_dir: str | None, cpu_gib: float, disk_gib: float):
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.memory_management import MemoryFormat

        self._key_cls, self._fmt = CacheEngineKey, MemoryFormat.KV_2LTD
        self.shape = torch.Size([2, chunk_bytes // (2 * TOKENS * HIDDEN * 2), TOKENS, HIDDEN])
        self.sm = _manager(local_cpu, disk_dir, cpu_gib, disk_gib)
        self.location = "LocalCPUBackend" if disk_dir is None else "LocalDiskBackend"
        self.disk = self.sm.storage_backends.get("LocalDiskBackend")
        self._next = 0

    def keys(self, n: int) -> list:
        self._next += 1
        return [self._key_cls("quiver-bench", 1, 0, (self._next << 20) + i, torch.bfloat16) for i in range(n)]

    def store(self, keys, srcs: list[np.ndarray]) -> None:
        objs = []
        for src in srcs:
            obj = self.sm.allocate(self.shape, torch.bfloat16, fmt=self._fmt)
            if obj is None:
                raise RuntimeError("LMCache's CPU pool is full")
            obj.raw_tensor[: obj.get_size()].copy_(torch.from_numpy(src))
            objs.append(obj)
        self.sm.batched_put(keys, objs)  # takes the references
        if self.disk is not None:  # asynchronous: wait until each chunk is in its file
            while not all(self.disk.contains(k) for k in keys):
                time.sleep(0.0002)

    def fsync(self, keys) -> None:
        for k in keys:
            fd = os.open(self.disk._key_to_path(k), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def lookup(self, keys) -> int:
        return self.sm.batched_contains(keys)[0]

    def retrieve(self, keys, dsts: list[np.ndarray]) -> None:
        objs = self.sm.batched_get(keys, location=self.location)
        if any(o is None for o in objs):
            raise RuntimeError(f"LMCache missed {sum(o is None for o in objs)} of {len(objs)} chunks")
        for obj, dst in zip(objs, dsts):
            torch.from_numpy(dst).copy_(obj.raw_tensor[: obj.get_size()])
            obj.ref_count_down()

    def forget(self, keys) -> None:
        """Frees the RAM pool between rounds (the disk backend leaks capacity on remove: not called there)."""
        if self.disk is None:
            self.sm.batched_remove(keys)

    def close(self) -> None:
        self.sm.close()


class QuiverSide:
    """A BlockStore and an identity whose block is one chunk."""

    def __init__(self, path: str, chunk_bytes: int, ram_bytes: int):
        from quiver import BlockStore, CacheIdentity

        heads = chunk_bytes // (2 * 16 * 128 * 2)
        self.ident = CacheIdentity(model="quiver/bench-lmcache", model_revision="1", tokenizer="bench",
                                   tokenizer_revision="1", tenant="bench", kv_dtype="bfloat16", block_tokens=16,
                                   num_layers=1, num_kv_heads=heads, head_dim=128)
        assert self.ident.block_nbytes == chunk_bytes
        self.store_ = BlockStore.open(path, ram_bytes=ram_bytes)
        self._next = 0

    def keys(self, n: int) -> np.ndarray:
        self._next += 1
        return np.arange(n * 16, dtype=np.uint32) + np.uint32(self._next * 1_000_000)

    def store(self, tokens, srcs: list[np.ndarray]) -> None:
        blocks = np.stack(srcs).view(np.uint16).reshape(len(srcs), *self.ident.block_shape)
        assert self.store_.put(self.ident, tokens, blocks) == len(srcs)

    def lookup(self, tokens) -> int:
        return self.store_.lookup(self.ident, tokens)

    def retrieve(self, tokens, out: np.ndarray) -> None:
        self.store_.get(self.ident, tokens, out=out)

    def close(self) -> None:
        self.store_.close()


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def run_case(tier: str, chunk_bytes: int, request_bytes: int, rounds: int, root: str) -> dict:
    n = max(1, request_bytes // chunk_bytes)
    rng = np.random.default_rng(chunk_bytes)
    lm_dir = os.path.join(root, f"lmcache-{tier}-{chunk_bytes}")
    q_dir = os.path.join(root, f"quiver-{tier}-{chunk_bytes}")
    total_gib = (rounds + 2) * request_bytes / 2**30
    if tier == "ram":
        lm = LMCacheSide(chunk_bytes, True, None, cpu_gib=max(0.0625, 3 * request_bytes / 2**30), disk_gib=0)
        q = QuiverSide(q_dir, chunk_bytes, ram_bytes=(rounds + 2) * n * (chunk_bytes + 64 * KiB))
    else:
        lm = LMCacheSide(chunk_bytes, False, lm_dir, cpu_gib=max(0.0625, 3 * request_bytes / 2**30),
                         disk_gib=2 * total_gib + 0.0625)
        q = QuiverSide(q_dir, chunk_bytes, ram_bytes=0)
    t: dict[str, list[float]] = {}
    try:
        for r in range(rounds + 1):  # round 0 untimed: code and files warm
            srcs = [rng.integers(0, 256, chunk_bytes, dtype=np.uint8) for _ in range(n)]
            lk, qk = lm.keys(n), q.keys(n)
            lm_out = [np.ones(chunk_bytes, dtype=np.uint8) for _ in range(n)]
            q_out = np.ones((n, *q.ident.block_shape), dtype=np.uint16)
            steps: dict[str, float] = {}

            def lm_store():
                steps["lmcache_store"] = _timed(lm.store, lk, srcs)
                if tier == "disk":  # right after its own writes, before the other side's fsyncs
                    steps["lmcache_fsync"] = _timed(lm.fsync, lk)

            def q_store():
                steps["quiver_store"] = _timed(q.store, qk, srcs)

            def lm_read():
                steps["lmcache_lookup"] = _timed(lm.lookup, lk)
                steps["lmcache_retrieve"] = _timed(lm.retrieve, lk, lm_out)

            def q_read():
                steps["quiver_lookup"] = _timed(q.lookup, qk)
                steps["quiver_retrieve"] = _timed(q.retrieve, qk, q_out)

            # Who goes first alternates, in the stores and in the reads: the side that stored
            # last, or read second, finds more of its bytes in the CPU caches (8 MiB each, 32 MiB L3).
            for fn in ((lm_store, q_store, q_read, lm_read) if r % 2 else (q_store, lm_store, lm_read, q_read)):
                fn()
            assert all(np.array_equal(a, b) for a, b in zip(srcs, lm_out)), "LMCache returned other bytes"
            assert q_out.tobytes() == b"".join(s.tobytes() for s in srcs), "Quiver returned other bytes"
            assert lm.lookup(lk) == n and q.lookup(qk) == n
            lm.forget(lk)
            if r > 0:
                for k, v in steps.items():
                    t.setdefault(k, []).append(v)
        med = {k: _median(v) for k, v in t.items()}
        if tier == "disk":
            med["lmcache_store_fsync"] = _median([a + b for a, b in zip(t["lmcache_store"], t["lmcache_fsync"])])
        out = {"tier": tier, "chunk_bytes": chunk_bytes, "chunks": n, "request_bytes": n * chunk_bytes,
               "rounds": rounds, "medians_s": med, "threads": 1}
        if tier == "disk":
            q_fsyncs = sum(q.store_.stats()["tiers"]["l1"]["volume"]["fsyncs"].values())
            out["quiver_fsyncs"] = q_fsyncs
    finally:
        lm.close()
        q.close()
        shutil.rmtree(lm_dir, ignore_errors=True)
        shutil.rmtree(q_dir, ignore_errors=True)
    return out


def main() -> None:
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)  # small copies: torch's intra-op pool only adds waits on 2 shared cores
    import lmcache

    from quiver.index_backends import _art_kernels

    _art_kernels.warmup()  # as `quiver warmup` does for a server: no compile thread during the timings

    cases = [run_case(tier, cb, args["request_bytes"], args["rounds"], args["root"])
             for tier in args["tiers"] for cb in args["chunk_bytes"]]
    print(json.dumps({"lmcache_version": getattr(lmcache, "__version__", None) or _dist_version("lmcache"),
                      "torch": torch.__version__, "cases": cases}))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
