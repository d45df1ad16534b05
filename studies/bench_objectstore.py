"""L2 object store: throughput, latency and bootstrap, local directory vs moto vs Ceph RGW.

Servers are real and on loopback, started here the way the tests start them
(tests/s3servers.py): moto in server mode with SigV4 auth on, and a one-node
Ceph cluster (memstore OSD) + radosgw.  When radosgw is not installed and
cannot be installed, the RGW cases are skipped with the reason (the report
shows them absent; no number is made up).  Smoke mode does not start RGW.

1. ``test_throughput[backend-size-concurrency]``: PUT then GET of N distinct
   objects of one size (64 KiB .. 4 MiB) from a pool of 1..16 threads, through
   ``tier`` (S3ObjectStore / LocalDirObjectStore: first-writer-wins PUT with
   Content-MD5 and CRC32C metadata, verified GET).  The benchmark timing is the
   PUT batch; ``extra_info`` has both: ``put_mb_s``/``get_mb_s`` (bytes / batch
   wall time, 1 MB = 1e6 B) and per-request latency summaries (``put``/``get``:
   p50/p99/mean in µs).  Every GET is checked byte-exact.
2. ``test_bootstrap[backend-n]`` (group ``objectstore-bootstrap``): a prefix holding n published blocks with
   manifests (one per 1024 keys, as the BlockStore writes them); a *new
   process* opens it and times ``read_manifests`` (what a BlockStore's open
   does) against ``list_keys`` (a full listing), plus the whole
   ``BlockStore.open`` and the process start.  Both must find all n keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np
import pytest

from .config import SMOKE, pick
from .conftest import REPO_ROOT, make_bench_dir
from .workloads import latency_summary

sys.path.insert(0, str(REPO_ROOT / "tests"))
from s3servers import MotoServer, RgwServer, RgwUnavailable  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
BUCKET = "quiver-study"
BACKENDS = ["local", "moto", "rgw"]
SIZES = pick(smoke=[64 * KiB], quick=[64 * KiB, 1 * MiB, 4 * MiB], full=[64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB])
CONCURRENCY = pick(smoke=[1, 4], quick=[1, 4, 16], full=[1, 2, 4, 8, 16])
BATCH_BYTES = pick(smoke=512 * KiB, quick=16 * MiB, full=64 * MiB)
BOOT_N = pick(smoke=[50], quick=[100, 1000, 3000], full=[100, 1000, 10_000])
MANIFEST_EVERY = 1024


class _Backends:
    """Lazily started servers, shared by every case of this module."""

    def __init__(self) -> None:
        self.moto: MotoServer | None = None
        self.rgw: RgwServer | None = None
        self.rgw_absent: str | None = None
        self.local_root = make_bench_dir("objstore")
        self.env: dict[str, str] = {}

    def server(self, name: str):
        if name == "moto":
            if self.moto is None:
                t0 = time.monotonic()
                self.moto = MotoServer()
                self.moto.server.info["start_s"] = time.monotonic() - t0
                self.moto.server.client().create_bucket(Bucket=BUCKET)
            return self.moto.server
        if self.rgw_absent:
            pytest.skip(self.rgw_absent)
        if SMOKE:
            self.rgw_absent = "smoke mode: Ceph RGW is not started (quick and full runs measure it)"
            pytest.skip(self.rgw_absent)
        if self.rgw is None:
            try:
                self.rgw = RgwServer()
            except (RgwUnavailable, RuntimeError) as exc:
                self.rgw_absent = f"Ceph RGW absent: {exc}"
                pytest.skip(self.rgw_absent)
            self.rgw.server.client().create_bucket(Bucket=BUCKET)
        return self.rgw.server

    def spec_and_env(self, name: str, prefix: str) -> tuple[str, dict[str, str]]:
        """The object-store spec and the environment a process needs to reach it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if name == "local":
            return str(self.local_root / prefix), env
        srv = self.server(name)
        env.update(srv.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true")
        return f"s3://{BUCKET}/{prefix}", env

    def open(self, name: str, prefix: str):
        from quiver.tier.objectstore import open_object_store

        spec, env = self.spec_and_env(name, prefix)
        if name == "local":
            return open_object_store(spec)
        srv = self.server(name)
        from quiver.tier.s3 import S3ObjectStore

        # Credentials through the standard chain, as an engine would: set for this call only.
        saved = {k: os.environ.get(k) for k in env if k.startswith("AWS_")}
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        try:
            return S3ObjectStore(BUCKET, prefix, endpoint_url=srv.endpoint, max_pool_connections=32)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start_s(self, name: str) -> float | None:
        """Seconds the server took to start (None for the local directory)."""
        return None if name == "local" else self.server(name).info.get("start_s")

    def close(self) -> None:
        if self.moto is not None:
            self.moto.stop()
        if self.rgw is not None:
            self.rgw.stop()
        shutil.rmtree(self.local_root, ignore_errors=True)


@pytest.fixture(scope="module")
def backends():
    b = _Backends()
    yield b
    b.close()


def _keys(tag: str, n: int) -> list[bytes]:
    return [blake3.blake3(f"{tag}/{i}".encode()).digest() for i in range(n)]


def _timed_pool(fn, items, concurrency: int) -> tuple[float, list[int]]:
    """Run ``fn(item)`` over ``items`` on ``concurrency`` threads: (wall s, per-call ns)."""
    lat: list[int] = []
    lock = threading.Lock()

    def one(item):
        t0 = time.perf_counter_ns()
        fn(item)
        dt = time.perf_counter_ns() - t0
        with lock:
            lat.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, items))
    return time.perf_counter() - t0, lat


@pytest.mark.parametrize("concurrency", CONCURRENCY)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s // KiB}KiB")
@pytest.mark.parametrize("backend", BACKENDS)
def test_throughput(benchmark, backends, backend, size, concurrency):
    benchmark.group = "objectstore"
    prefix = f"tp-{uuid.uuid4().hex[:10]}"
    store = backends.open(backend, prefix)
    n = max(concurrency, BATCH_BYTES // size)
    keys = _keys(prefix, n)
    rng = np.random.default_rng(size + concurrency)
    data = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(min(n, 4))]
    payload = {k: data[i % len(data)] for i, k in enumerate(keys)}
    try:
        walls = {}

        def put_all():
            walls["put"] = _timed_pool(lambda k: store.put(k, payload[k]), keys, concurrency)

        benchmark.pedantic(put_all, rounds=1, iterations=1)
        got: dict[bytes, bytes] = {}
        walls["get"] = _timed_pool(lambda k: got.__setitem__(k, store.get(k)), keys, concurrency)
        assert all(got[k] == payload[k] for k in keys), "a GET returned other bytes"
        total = n * size
        benchmark.extra_info.update(
            backend=backend, object_bytes=size, concurrency=concurrency, objects=n, batch_bytes=total,
            put_s=walls["put"][0], get_s=walls["get"][0],
            put_mb_s=total / walls["put"][0] / 1e6, get_mb_s=total / walls["get"][0] / 1e6,
            put=latency_summary(walls["put"][1]), get=latency_summary(walls["get"][1]),
            server_start_s=backends.start_s(backend),
        )
    finally:
        with ThreadPoolExecutor(max_workers=8) as pool:  # keep the servers' memory bounded
            list(pool.map(store.delete, keys))
        store.close()


_CHILD = r"""
import json, os, sys, tempfile, time
t_start = time.perf_counter()
sys.path.insert(0, sys.argv[3])
from quiver.tier.objectstore import open_object_store
from quiver.engine.store import BlockStore
t_imported = time.perf_counter()
spec, n = sys.argv[1], int(sys.argv[2])
store = open_object_store(spec)
t0 = time.perf_counter(); man = store.read_manifests(); t_man = time.perf_counter() - t0
t0 = time.perf_counter(); listed = set(store.list_keys()); t_list = time.perf_counter() - t0
store.close()
with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    bs = BlockStore.open(os.path.join(d, "s"), object_store=spec, ram_bytes=0, index="flat")
    t_open = time.perf_counter() - t0
    boot = bs.stats()["gauges"]["bootstrap_keys"]
    bs.close()
print(json.dumps(dict(import_s=t_imported - t_start, manifests_s=t_man, manifest_keys=len(man),
                      listing_s=t_list, listed_keys=len(listed), store_open_s=t_open,
                      store_bootstrap_keys=boot, same_keys=man == listed)))
"""

_BOOT: dict[str, tuple[str, int, int]] = {}  # backend -> (prefix, blocks published, manifests written)


@pytest.mark.parametrize("n", BOOT_N)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bootstrap(benchmark, backends, backend, n):
    benchmark.group = "objectstore-bootstrap"
    prefix, have, manifests = _BOOT.get(backend, (f"boot-{uuid.uuid4().hex[:10]}", 0, 0))
    spec, env = backends.spec_and_env(backend, prefix)
    store = backends.open(backend, prefix)
    try:
        blob = np.random.default_rng(1).integers(0, 256, 1024, dtype=np.uint8).tobytes()
        keys = _keys(prefix, n)[have:]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda k: store.put(k, blob), keys))
        for i in range(0, len(keys), MANIFEST_EVERY):
            manifests += len(store.write_manifest(keys[i : i + MANIFEST_EVERY]))
        populate_s = time.perf_counter() - t0
    finally:
        store.close()
    _BOOT[backend] = (prefix, n, manifests)
    env["PYTHONPATH"] = str(REPO_ROOT)
    out: list[dict] = []

    def run_child():
        r = subprocess.run([sys.executable, "-c", _CHILD, spec, str(n), str(REPO_ROOT)], capture_output=True,
                           text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run_child, rounds=1, iterations=1)
    res = out[-1]
    assert res["manifest_keys"] == res["listed_keys"] == res["store_bootstrap_keys"] == n and res["same_keys"]
    benchmark.extra_info.update(backend=backend, blocks=n, populate_s=populate_s, object_bytes=len(blob),
                                manifests=manifests, **res,
                                listing_over_manifests=res["listing_s"] / res["manifests_s"],
                                server_start_s=backends.start_s(backend))

