"""S3 faults: 5xx, resets, hangs, truncated and damaged bodies, dead endpoints.

A real server cannot be made to fail on demand, so these go through FaultProxy
(tests/s3servers.py): a small HTTP proxy on 127.0.0.1 in front of the real moto
server that forwards requests unchanged (signatures included) and injects the
fault.  The proxy is the only fake here, and it only adds the fault.  Each test
counts the requests that reached it, so the retry bounds are checked, not assumed.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlsplit

import blake3
import pytest

from conftest import BUCKET
from s3servers import LOOPBACK, FaultProxy, free_port
from quiver.tier.errors import ObjectCorruptError, ObjectStoreError, ObjectStoreUnreachableError
from quiver.tier.s3 import RetryPolicy, S3ObjectStore

FAST = RetryPolicy(max_tries=4, total_s=10.0, base_delay_s=0.01, max_delay_s=0.05,
                   connect_timeout_s=1.0, read_timeout_s=1.0)


def key_of(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


@pytest.fixture
def proxy(moto_server):
    p = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    yield p
    p.close()


@pytest.fixture
def open_store(moto_server, proxy, tmp_path, monkeypatch, s3_prefix):
    """Open an S3ObjectStore that talks to moto through the proxy."""
    creds = tmp_path / "credentials"
    creds.write_text(f"[q]\naws_access_key_id = {moto_server.access_key}\n"
                     f"aws_secret_access_key = {moto_server.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    opened = []

    def make(retry: RetryPolicy = FAST, endpoint: str | None = None, **kw) -> S3ObjectStore:
        s = S3ObjectStore(BUCKET, s3_prefix, endpoint_url=endpoint or proxy.endpoint, profile="q",
                          retry=retry, **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store, proxy):
    s = open_store()
    proxy.reset()  # forget the bucket check at open
    return s


def test_5xx_is_retried_within_bounds(store, proxy):
    data = os.urandom(10_000)
    key = key_of(data)
    proxy.inject("status", method="PUT", status=503, times=2)
    assert store.put(key, data) is True
    assert proxy.count("PUT") == 3  # two refused, the third stored
    proxy.inject("status", method="GET", status=500, times=1)
    assert store.get(key) == data
    assert proxy.count("GET") == 2


def test_5xx_forever_gives_unreachable_after_max_tries(store, proxy):
    proxy.inject("status", method="PUT", status=503, times=100)
    t0 = time.monotonic()
    with pytest.raises(ObjectStoreUnreachableError) as info:
        store.put(key_of(b"x"), b"x")
    assert proxy.count("PUT") == FAST.max_tries == info.value.attempts
    assert time.monotonic() - t0 < FAST.total_s
    assert "503" in str(info.value)


def test_total_time_bounds_the_retries(open_store, proxy):
    policy = RetryPolicy(max_tries=1000, total_s=1.0, base_delay_s=0.05, max_delay_s=0.2,
                         connect_timeout_s=1.0, read_timeout_s=1.0)
    s = open_store(policy)
    proxy.reset()
    proxy.inject("status", method="GET", status=503, times=10_000)
    t0 = time.monotonic()
    with pytest.raises(ObjectStoreUnreachableError) as info:
        s.get(key_of(b"y"))
    elapsed = time.monotonic() - t0
    assert elapsed <= policy.total_s + 0.5
    assert 3 <= info.value.attempts == proxy.count("GET") < 1000


def test_connection_reset_is_retried(store, proxy):
    data = os.urandom(10_000)
    key = key_of(data)
    store.put(key, data)
    proxy.reset()
    proxy.inject("reset", method="GET", times=1)
    assert store.get(key) == data
    assert proxy.count("GET") == 2


def test_lost_answer_to_a_put_is_still_a_success(store, proxy, moto_server):
    """The server stored the object but the answer was lost: the retry gets 412,
    which is success (put says False: it cannot know its first try won)."""
    data = os.urandom(10_000)
    key = key_of(data)
    proxy.inject("reset_after", method="PUT", times=1)
    assert store.put(key, data) is False
    assert proxy.count("PUT") == 2
    assert store.get(key) == data


def test_hang_is_a_timeout_and_retried(store, proxy):
    data = os.urandom(1000)
    key = key_of(data)
    store.put(key, data)
    proxy.reset()
    proxy.inject("hang", method="GET", times=1, hang_s=3.0)
    t0 = time.monotonic()
    assert store.get(key) == data
    assert FAST.read_timeout_s <= time.monotonic() - t0 < 3.0
    assert proxy.count("GET") == 2


def test_truncated_body_is_retried_then_served_whole(store, proxy):
    data = os.urandom(200_000)
    key = key_of(data)
    store.put(key, data)
    proxy.reset()
    proxy.inject("truncate", method="GET", times=1)
    assert store.get(key) == data
    assert proxy.count("GET") == 2


def test_truncated_body_forever_is_never_served(store, proxy):
    data = os.urandom(200_000)
    key = key_of(data)
    store.put(key, data)
    proxy.reset()
    proxy.inject("truncate", method="GET", times=100)
    with pytest.raises(ObjectStoreUnreachableError):  # a cut connection: a network failure
        store.get(key)
    assert proxy.count("GET") == FAST.max_tries
    proxy.inject("truncate", method="GET", times=100)
    with pytest.raises(ObjectStoreUnreachableError):
        store.get_range(key, 1000, 50_000)


def test_damaged_body_is_never_served(store, proxy):
    """Same length, one bit flipped in transit: only our CRC32C can tell."""
    data = os.urandom(200_000)
    key = key_of(data)
    store.put(key, data)
    proxy.reset()
    proxy.inject("flip", method="GET", times=1)
    assert store.get(key) == data  # retried
    assert proxy.count("GET") == 2
    proxy.inject("flip", method="GET", times=100)
    with pytest.raises(ObjectCorruptError):
        store.get(key)
    assert proxy.count("GET") == 2 + FAST.max_tries


def test_consistent_but_short_body_is_never_served(store, proxy):
    """A body cut short with a Content-Length that matches the cut: only the CRC32C
    (whole GET) or the Content-Range (ranged GET) can tell."""
    data = os.urandom(200_000)
    key = key_of(data)
    store.put(key, data)
    proxy.reset()
    proxy.inject("short", method="GET", times=100)
    with pytest.raises(ObjectCorruptError):
        store.get(key)
    with pytest.raises(ObjectCorruptError):
        store.get_range(key, 1000, 50_000)
    assert proxy.count("GET") == 2 * FAST.max_tries
    proxy.reset()
    proxy.inject("short", method="GET", times=1)
    assert store.get_range(key, 1000, 50_000) == data[1000:51_000]


def test_bootstrap_reads_manifests_only(store, proxy):
    """Bootstrap lists manifests/ and fetches manifests; it never touches blocks/."""
    keys = []
    for i in range(30):
        data = b"block %d" % i
        keys.append(key_of(data))
        store.put(keys[-1], data)
    store.write_manifest(keys)
    proxy.reset()
    assert store.read_manifests() == set(keys)
    assert proxy.count() == proxy.count(path="manifests") == 2  # one LIST, one GET
    # ...and a block missing from every manifest is still found by its key.
    stray = b"published by someone who wrote no manifest"
    store.put(key_of(stray), stray)
    assert store.get(key_of(stray)) == stray


def test_unreachable_endpoint_refused(open_store):
    """Nothing listens on the port: connection refused on every try."""
    policy = RetryPolicy(max_tries=4, total_s=2.0, base_delay_s=0.05, max_delay_s=0.2,
                         connect_timeout_s=0.5, read_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(ObjectStoreUnreachableError) as info:
        open_store(policy, endpoint=f"http://{LOOPBACK}:{free_port()}")
    assert time.monotonic() - t0 <= policy.total_s
    assert info.value.attempts == 4


def test_unreachable_endpoint_silent(open_store):
    """A listener that accepts TCP but never answers: each try times out; the whole
    operation ends within total_s plus one try's timeouts."""
    policy = RetryPolicy(max_tries=50, total_s=1.5, base_delay_s=0.05, max_delay_s=0.2,
                         connect_timeout_s=0.5, read_timeout_s=0.5)
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(64)
        t0 = time.monotonic()
        with pytest.raises(ObjectStoreUnreachableError) as info:
            open_store(policy, endpoint=f"http://{LOOPBACK}:{silent.getsockname()[1]}")
        elapsed = time.monotonic() - t0
    assert elapsed <= policy.total_s + policy.connect_timeout_s + policy.read_timeout_s + 0.3
    assert 2 <= info.value.attempts < 50


def test_errors_are_typed(store, proxy):
    proxy.inject("reset", times=100)
    with pytest.raises(ObjectStoreError):
        store.head(key_of(b"z"))
    with pytest.raises(ObjectStoreError):
        store.list_keys().__next__()
    with pytest.raises(ObjectStoreError):
        store.write_manifest([key_of(b"z")])


def test_multipart_part_failure_is_retried(open_store, proxy, moto_server):
    s = open_store(multipart_threshold=5 << 20, part_size=5 << 20)
    proxy.reset()
    data = os.urandom(11 << 20)
    key = key_of(data)
    proxy.inject("status", method="PUT", path="partNumber=2", status=503, times=1)
    assert s.put(key, data) is True
    assert proxy.count("PUT", path="partNumber=2") == 2
    assert s.get(key) == data
    uploads = moto_server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=s.prefix)
    assert not uploads.get("Uploads")
