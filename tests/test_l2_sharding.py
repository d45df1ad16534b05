"""Issue 13, finding 12: L2 object names spread by block, not by model.

A store key is ``identity namespace (16 B) + chain key (32 B)``, so naming a
block ``blocks/<first byte>/...`` put every block of one model under one prefix
(S3 throttles per prefix).  Names are now sharded on the key's *last* byte, as
walpub shards its objects; blocks published under the old (legacy) name are
still read (a HEAD/GET miss under the new name falls back to the legacy name),
publishes use the new name only, and ``migrate_legacy_layout`` moves old
objects.  Run over the local directory store and a real moto server.

Which assertion fails on the code before the fix (commit 9cde9a7):
test_one_models_blocks_spread_over_many_prefixes: ``prefixes ==
{tail bytes}`` (all 200 blocks were under one prefix); the others use the new
names (legacy_object_name, migrate_legacy_layout, legacy_names).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from urllib.parse import urlsplit

import pytest

from conftest import BUCKET
from quiver.engine.keys import chain_keys
from quiver.engine.store import BlockStore
from s3servers import LOOPBACK, FaultProxy
from store_child import make_case
from quiver.tier.objectstore import (
    BLOCKS_DIR,
    BreakerPolicy,
    LAYOUT_MARKER,
    LocalDirObjectStore,
    key_from_name,
    legacy_object_name,
    object_name,
    object_names,
)
from quiver.tier.s3 import RetryPolicy, S3ObjectStore


def model_keys(n: int, seed: int = 7) -> list[bytes]:
    """``n`` store keys of one model: one namespace, random chain keys."""
    rng = random.Random(seed)
    ns = bytes(rng.getrandbits(8) for _ in range(16))
    return [ns + bytes(rng.getrandbits(8) for _ in range(32)) for _ in range(n)]


@pytest.fixture(params=["local", "moto"])
def store(request, tmp_path, s3_prefix):
    if request.param == "local":
        s = LocalDirObjectStore(tmp_path / "l2")
    else:
        request.getfixturevalue("creds")
        server = request.getfixturevalue("moto_server")
        s = S3ObjectStore(BUCKET, s3_prefix, endpoint_url=server.endpoint, profile="q",
                          retry=RetryPolicy(max_tries=3, total_s=10.0))
    yield s
    s.close()


def raw_names(s) -> list[str]:
    """The block objects' names as stored, relative to the store's root/prefix."""
    if isinstance(s, LocalDirObjectStore):
        out = []
        for d, _, files in os.walk(os.path.join(s.root, "blocks")):
            out += [os.path.relpath(os.path.join(d, f), s.root).replace(os.sep, "/") for f in files]
        return sorted(out)
    c = s._client
    page = c.list_objects_v2(Bucket=s.bucket, Prefix=s.prefix + BLOCKS_DIR)
    return sorted(o["Key"][len(s.prefix):] for o in page.get("Contents", ()))


def put_legacy(s, key: bytes, data: bytes) -> None:
    """Publish as the code before the tail sharding did (the legacy name)."""
    assert s._put_named(legacy_object_name(key), data) is True


def test_object_names_shard_on_the_key_tail():
    key = bytes(range(48))
    h = key.hex()
    assert object_name(key) == f"blocks/2f/{h}" and legacy_object_name(key) == f"blocks/00/{h}"
    assert object_names(key) == [f"blocks/2f/{h}", f"blocks/00/{h}"]
    assert object_names(key, legacy=False) == [f"blocks/2f/{h}"]
    same = b"\xab" * 32  # first byte == last byte: one name only
    assert object_names(same) == [object_name(same)] == [legacy_object_name(same)]
    for name in (object_name(key), legacy_object_name(key)):
        assert key_from_name(name) == key
    for junk in (f"blocks/11/{h}", f"blocks/2f/{h}x", "blocks/2f", f"manifests/2f/{h}"):
        assert key_from_name(junk) is None


def test_one_models_blocks_spread_over_many_prefixes(store):
    keys = model_keys(200)
    for k in keys:
        assert store.put(k, b"v" + k) is True
    names = raw_names(store)
    assert len(names) == 200
    prefixes = {n.split("/")[1] for n in names}
    assert prefixes == {k.hex()[-2:] for k in keys}  # before the fix: {keys[0].hex()[:2]}
    assert len(prefixes) > 100
    assert sorted(store.list_keys()) == sorted(keys)


def test_legacy_names_are_read_and_publishes_use_the_new_name(store):
    old, new = model_keys(2, seed=8)
    data = os.urandom(3000)
    put_legacy(store, old, data)
    assert store.head(old) == 3000
    assert store.get(old) == data
    assert store.get_range(old, 100, 50) == data[100:150]
    assert store.get_range(old, 3000, 0) == b""
    assert list(store.list_keys()) == [old]
    # publishes: the new name only
    assert store.put(new, data) is True
    assert object_name(new) in raw_names(store) and legacy_object_name(new) not in raw_names(store)
    # without the fallback the legacy object is invisible
    store.legacy_names = False
    assert store.head(old) is None and store.get(old) is None and store.get_range(old, 0, 10) is None
    assert store.get(new) == data
    store.legacy_names = True
    # delete removes the key under every name
    store.delete(old)
    assert store.head(old) is None and raw_names(store) == [object_name(new)]


def test_migrate_legacy_layout(store):
    keys = model_keys(25, seed=9)
    legacy = [k for k in keys if legacy_object_name(k) != object_name(k)][:20]
    rest = [k for k in keys if k not in legacy]
    for k in legacy:
        put_legacy(store, k, b"L" + k)
    for k in rest:
        store.put(k, b"N" + k)
    assert store.migrate_legacy_layout() == len(legacy)
    assert raw_names(store) == sorted(object_name(k) for k in keys)
    store.legacy_names = False
    for k in legacy:
        assert store.get(k) == b"L" + k
    for k in rest:
        assert store.get(k) == b"N" + k
    assert store.migrate_legacy_layout() == 0  # idempotent


def test_a_miss_costs_one_head_per_name(moto_server, creds, s3_prefix):
    proxy = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    s = S3ObjectStore(BUCKET, s3_prefix, endpoint_url=proxy.endpoint, profile=creds,
                      retry=RetryPolicy(max_tries=3, total_s=10.0))
    try:
        key = model_keys(1, seed=10)[0]
        proxy.reset()
        assert s.head(key) is None
        assert proxy.count("HEAD") == 2  # new name, then the legacy name
        s.legacy_names = False
        assert s.head(key) is None
        assert proxy.count("HEAD") == 3
        assert s.put(key, b"x") is True
        proxy.reset()
        assert s.head(key) == 1 and proxy.count("HEAD") == 1  # a hit under the new name: one request
    finally:
        s.close()
        proxy.close()


def test_block_store_reads_a_store_published_in_the_legacy_layout(tmp_path):
    """An L2 directory written by the old code (blocks under the legacy names,
    manifests as before) is read by a new store: lookup, bootstrap and get."""
    ident, tokens, blocks = make_case(91, 4)
    l2 = tmp_path / "l2"
    with BlockStore.open(tmp_path / "a", object_store=l2, ram_bytes=0, index="flat") as a:
        assert a.put(ident, tokens, blocks) == 4
    skeys = [ident.namespace + k for k in chain_keys(ident, tokens, 4)]
    for sk in skeys:  # move each object to where the old code put it
        src, dst = l2 / object_name(sk), l2 / legacy_object_name(sk)
        if src != dst:
            dst.parent.mkdir(exist_ok=True)
            shutil.move(src, dst)
    assert all(not (l2 / object_name(sk)).exists() or object_name(sk) == legacy_object_name(sk) for sk in skeys)
    (l2 / LAYOUT_MARKER).unlink()  # written when `a` found the directory empty; the old code wrote none
    with BlockStore.open(tmp_path / "b", object_store=l2, ram_bytes=0, index="flat") as b:
        assert b.stats()["gauges"]["bootstrap_keys"] == 4
        assert b.lookup(ident, tokens) == 4
        assert b.get(ident, tokens, 4).tobytes() == blocks.tobytes()
        assert b.stats()["counters"]["l2_hits"] == 4
    with BlockStore.open(tmp_path / "c", object_store=l2, ram_bytes=0, index="flat", bootstrap=False) as c:
        assert c.lookup(ident, tokens) == 4  # found by HEAD under the legacy names
        assert c.get(ident, tokens, 4).tobytes() == blocks.tobytes()


def _again(s):
    """A second handle on the same store (another process's view of it)."""
    if isinstance(s, LocalDirObjectStore):
        return LocalDirObjectStore(s.root)
    return S3ObjectStore(s.bucket, s.prefix, endpoint_url=s._endpoint_url, profile="q",
                         retry=RetryPolicy(max_tries=3, total_s=10.0))


def test_an_empty_store_is_marked_and_a_miss_then_asks_one_name(store):
    """settle_naming on a store holding nothing writes the layout marker and turns the
    legacy fallback off; another handle finds the marker and turns it off too, without
    writing; a handle told legacy_names=True keeps it and writes nothing."""
    assert store.legacy_names is None and store._head_named(LAYOUT_MARKER) is None
    assert store.settle_naming() is False and store.legacy_names is False
    assert store._head_named(LAYOUT_MARKER) is not None
    other = _again(store)
    try:
        assert other.legacy_names is None and other.settle_naming() is False
        key = model_keys(1, seed=11)[0]
        assert other._names(key) == [object_name(key)]  # a miss: one name
        other.legacy_names = True
        assert other.settle_naming() is True and other._names(key) == object_names(key)
    finally:
        other.close()


def test_a_store_with_blocks_but_no_marker_keeps_the_fallback_until_migrated(store):
    """Blocks published before the marker existed may be legacy-named: the fallback
    stays on (and the legacy block is found) until migrate_legacy_layout has moved
    them and written the marker; a later handle then asks one name."""
    old = model_keys(1, seed=12)[0]
    assert legacy_object_name(old) != object_name(old)
    put_legacy(store, old, b"L" + old)
    assert store.settle_naming() is True and store._head_named(LAYOUT_MARKER) is None
    assert store.get(old) == b"L" + old
    assert store.migrate_legacy_layout() == 1 and store.legacy_names is False
    other = _again(store)
    try:
        assert other.settle_naming() is False and other.get(old) == b"L" + old
        assert raw_names(other) == [object_name(old)]
    finally:
        other.close()


def test_a_blockstore_lookup_miss_on_a_fresh_s3_prefix_is_one_head(moto_server, creds, s3_prefix, tmp_path):
    """Through BlockStore: L2 attaches to an empty prefix (marker written), so the
    lookup of a prompt no tier holds asks S3 once, not once per name (the vLLM
    connector's scheduler waits for every lookup)."""
    proxy = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    ident, tokens, _ = make_case(62, 3)
    try:
        with BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}", ram_bytes=0, index="flat",
                             s3_options=dict(endpoint_url=proxy.endpoint, profile=creds)) as st:
            proxy.reset()
            assert st.lookup(ident, tokens) == 0
            assert proxy.count("HEAD") == 1
    finally:
        proxy.close()


def test_a_store_that_may_not_write_the_marker_opens_and_keeps_the_fallback(moto_server, creds, s3_prefix, tmp_path):
    """The server refuses the marker's PUT (403, what read-only credentials get; the
    proxy answers it): the store still opens, and a miss asks both names."""
    proxy = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    proxy.inject("status", method="PUT", path="/layout/", status=403, times=10)
    ident, tokens, _ = make_case(63, 2)
    try:
        with BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}", ram_bytes=0, index="flat",
                             s3_options=dict(endpoint_url=proxy.endpoint, profile=creds)) as st:
            assert st._l2.legacy_names is True
            proxy.reset()
            assert st.lookup(ident, tokens) == 0 and proxy.count("HEAD") == 2
    finally:
        proxy.close()


def test_a_marker_write_that_gets_no_answer_does_not_keep_l2_detached(moto_server, creds, s3_prefix, tmp_path):
    """The marker's PUT hangs while everything else answers: the write is bounded by
    the probe's budget (its silent tries open the circuit breaker, as any silent L2
    does), the open returns, the prober attaches L2 with the fallback on once the
    breaker's cool-down ends, the store's blocks reach L2 and another store reads
    them there."""
    proxy = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    proxy.inject("hang", method="PUT", path="/layout/", hang_s=3600, times=10)
    ident, tokens, blocks = make_case(64, 2)
    spec = f"s3://{BUCKET}/{s3_prefix}"
    try:
        with BlockStore.open(tmp_path / "w", object_store=spec, ram_bytes=0, index="flat",
                             s3_options=dict(endpoint_url=proxy.endpoint, profile=creds)) as w:
            assert proxy.count("PUT", path="/layout/") >= 1  # tried (within the 2 s probe budget), no answer
            end = time.monotonic() + 120  # a cap against a hang only: the prober's attach is the event
            while not w.l2_health()["attached"] and time.monotonic() < end:
                time.sleep(0.05)
            assert w.l2_health()["attached"] is True and w._l2.legacy_names is True
            assert w.put(ident, tokens, blocks) == 2 and w.stats()["counters"]["l2_published"] == 2
    finally:
        proxy.close()
    with BlockStore.open(tmp_path / "r", object_store=spec, ram_bytes=0, index="flat",
                         s3_options=dict(endpoint_url=moto_server.endpoint, profile=creds)) as r:
        assert r.get(ident, tokens, 2).tobytes() == blocks.tobytes()
        assert r.stats()["counters"]["l2_hits"] == 2


def test_a_slow_answer_while_the_layout_is_decided_does_not_detach_l2(moto_server, creds, s3_prefix, tmp_path):
    """The marker's HEAD answers after longer than the probe's 2 s budget (RGW's first
    request on a new bucket did, in a loaded study run): L2 answered the probe, so the
    layout is decided under the manifests read's budget, the open attaches L2 with the
    marker written, and a put publishes at once (it was refused with the breaker open)."""
    proxy = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    probe_s = BreakerPolicy().probe_timeout_s
    proxy.inject("delay", method="HEAD", path="/layout/", hang_s=probe_s + 0.5, times=1)
    ident, tokens, blocks = make_case(65, 2)
    try:
        with BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}", ram_bytes=0, index="flat",
                             s3_options=dict(endpoint_url=proxy.endpoint, profile=creds)) as st:
            assert proxy.count("HEAD", path="/layout/") == 1  # answered late, not retried
            assert st.l2_health()["attached"] is True and st._l2.legacy_names is False
            assert proxy.count("PUT", path="/layout/") == 1
            assert st.put(ident, tokens, blocks) == 2 and st.stats()["counters"]["l2_published"] == 2
    finally:
        proxy.close()
