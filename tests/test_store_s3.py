"""BlockStore over S3 L2: real moto and Ceph RGW servers (tests/conftest.py fixtures).

- Reuse across processes: process A puts and exits; process B, with its own
  store directory and the same bucket, gets the blocks byte-exact.  The
  children configure S3 only through the standard AWS environment.
- Two processes publishing the same blocks at once: one object each, both succeed.
- An L2 that fails (a FaultProxy answering 503) never loses the L1 copy: sync
  mode raises the typed error after L1 holds the blocks, background mode
  counts it; both publish once the store answers again (flush_l2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

from conftest import BUCKET
from quiver.engine.errors import ObjectStoreUnreachableError
from quiver.engine.keys import chain_keys
from quiver.engine.store import BlockStore
from s3servers import FaultProxy
from store_child import make_case, race
from quiver.tier.s3 import RetryPolicy

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "store_child.py")


def _child_env(server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    return env


def _bucket_keys(server, prefix: str) -> list[str]:
    page = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/blocks/")
    return [o["Key"] for o in page.get("Contents", ())]


def test_reuse_across_processes(s3_server, s3_prefix, tmp_path):
    spec, env = f"s3://{BUCKET}/{s3_prefix}", _child_env(s3_server)
    r = subprocess.run([sys.executable, CHILD, "put", str(tmp_path / "a"), spec, "31", "4"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {"written": 4}
    assert len(_bucket_keys(s3_server, s3_prefix)) == 4
    r = subprocess.run([sys.executable, CHILD, "get", str(tmp_path / "b"), spec, "31", "4"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["equal"] and got["lookup"] == 4 and got["l2_hits"] == 4 and got["bootstrap_keys"] == 4


def test_two_processes_publish_the_same_blocks_at_once(s3_server, s3_prefix, tmp_path):
    spec, env = f"s3://{BUCKET}/{s3_prefix}", _child_env(s3_server)
    # A pipe barrier: both children are released together once both have opened (no start time).
    outs = race([str(tmp_path / d) for d in "ab"], spec, 32, 3, env=env)
    assert sum(o["published"] for o in outs) == 3 and sum(o["existing"] for o in outs) == 3
    assert len(_bucket_keys(s3_server, s3_prefix)) == 3


@pytest.fixture
def proxy(s3_server):
    u = urlsplit(s3_server.endpoint)
    p = FaultProxy((u.hostname, u.port))
    yield p
    p.close()


@pytest.mark.parametrize("mode", ["sync", "background"])
def test_l2_failure_keeps_l1_and_publishes_later(s3_server, s3_profile, s3_prefix, proxy, tmp_path, mode):
    ident, tokens, blocks = make_case(33, 3)
    opts = dict(endpoint_url=proxy.endpoint, profile=s3_profile,
                retry=RetryPolicy(max_tries=2, total_s=1.0, base_delay_s=0.01))
    kw = dict(object_store=f"s3://{BUCKET}/{s3_prefix}", s3_options=opts, l2_mode=mode,
              l2_retry_interval_s=30.0, ram_bytes=0, index="flat")
    with BlockStore.open(tmp_path / "s", **kw) as store:
        proxy.inject("status", method="PUT", status=503, times=1000)
        if mode == "sync":
            with pytest.raises(ObjectStoreUnreachableError, match="durable in L1"):
                store.put(ident, tokens, blocks)
        else:
            store.put(ident, tokens, blocks)
            assert store.flush_l2(timeout_s=30) == 3  # still failing: nothing published
        st = store.stats()
        assert st["counters"]["l2_failures"] >= 1 and st["gauges"]["l2_retry_pending"] == 3
        assert store.get(ident, tokens, 3).tobytes() == blocks.tobytes()  # from L1
        assert _bucket_keys(s3_server, s3_prefix) == []
        if mode == "background":
            proxy.reset()  # the store answers again: the same handle catches up
            assert store.flush_l2(timeout_s=30) == 0
            assert store.stats()["counters"]["l2_retried"] == 3
    if mode == "sync":  # closed while L2 was down: the next open of the path catches up
        assert os.path.getsize(tmp_path / "s" / "PENDING_L2") == 3 * 48
        proxy.reset()
        # L2 answers again: a budget that lets a slow server's PUTs through (RGW on these
        # 2 cores timed out within the 1 s one in some runs: flush_l2 then returned 3).
        answering = dict(opts, retry=RetryPolicy(max_tries=3, total_s=20.0, base_delay_s=0.01))
        with BlockStore.open(tmp_path / "s", **dict(kw, s3_options=answering)) as store:
            assert store.stats()["gauges"]["l2_retry_pending"] == 3
            assert store.flush_l2(timeout_s=30) == 0
        assert not (tmp_path / "s" / "PENDING_L2").exists()
    names = _bucket_keys(s3_server, s3_prefix)
    skeys = [ident.namespace + k for k in chain_keys(ident, tokens, 3)]
    assert sorted(n.rsplit("/", 1)[1] for n in names) == sorted(k.hex() for k in skeys)


def test_full_background_queue_defers_to_the_retry_list(s3_server, s3_profile, s3_prefix, proxy, tmp_path):
    """A slow L2 never blocks put for long: overflow goes to the retry list (read back from L1).
    The worker is first stalled on one block's upload (it takes several queued keys at a
    time, so the stall comes before the put that overflows the queue)."""
    _, stall_tokens, stall_block = make_case(35, 1)
    ident, tokens, blocks = make_case(34, 4)
    opts = dict(endpoint_url=proxy.endpoint, profile=s3_profile,
                retry=RetryPolicy(max_tries=3, total_s=10.0, base_delay_s=0.01, read_timeout_s=5.0))
    with BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}", s3_options=opts,
                         l2_mode="background", l2_queue_max=1, l2_enqueue_timeout_s=0.05,
                         l2_retry_interval_s=30.0, ram_bytes=0, index="flat") as store:
        proxy.reset()  # the requests of the open (the layout marker's PUT) are not counted below
        proxy.inject("hang", method="PUT", hang_s=1.5, times=1)  # the worker's first PUT stalls
        store.put(ident, stall_tokens, stall_block)
        end = time.monotonic() + 60  # a cap against a hang only
        while proxy.count("PUT") < 1 and time.monotonic() < end:  # an event: the worker's upload reached the proxy
            time.sleep(0.005)
        assert proxy.count("PUT") >= 1
        store.put(ident, tokens, blocks)  # one key fits the queue, the rest wait 0.05 s once
        st = store.stats()  # put did not wait for the stalled upload: the overflow was deferred
        assert st["counters"]["l2_deferred"] == 3 and st["gauges"]["l2_retry_pending"] == 3
        assert store.flush_l2(timeout_s=30) == 0
        st = store.stats()
        assert st["counters"]["l2_published"] == 5 and st["counters"]["l2_retried"] == 3
    assert len(_bucket_keys(s3_server, s3_prefix)) == 5


def test_a_sync_put_keeps_on_the_retry_list_only_the_blocks_l2_refused(s3_server, s3_profile, s3_prefix, proxy,
                                                                       tmp_path):
    """A sync put's uploads run in flight together, so one failing block does not stop
    the others: the blocks whose PUT the server refuses (503 for those objects only,
    every try) go on the retry list, the others are in L2, and the error says how
    many are not; flush_l2 publishes them once the server takes them."""
    ident, tokens, blocks = make_case(36, 6)
    opts = dict(endpoint_url=proxy.endpoint, profile=s3_profile,
                retry=RetryPolicy(max_tries=2, total_s=5.0, base_delay_s=0.01))
    with BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}", s3_options=opts,
                         l2_mode="sync", ram_bytes=0, index="flat") as store:
        refused = [store._chain(ident, tokens, 6)[1][i].hex() for i in (1, 4)]
        for name in refused:
            proxy.inject("status", method="PUT", path=name, status=503, times=1000)
        with pytest.raises(ObjectStoreUnreachableError, match="2 block\\(s\\) are durable in L1 but not yet in L2"):
            store.put(ident, tokens, blocks)
        in_l2 = _bucket_keys(s3_server, s3_prefix)
        assert len(in_l2) == 4 and not any(name in key for key in in_l2 for name in refused)
        assert store.stats()["gauges"]["l2_retry_pending"] == 2
        proxy.reset()
        assert store.flush_l2(timeout_s=30) == 0
    assert len(_bucket_keys(s3_server, s3_prefix)) == 6
