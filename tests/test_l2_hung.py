"""Issue 13, finding 8: time stays bounded when L2 hangs (accepts, never answers).

Two kinds of hung endpoint, both real TCP servers on 127.0.0.1:

- ``SilentServer`` (below): a listening socket that accepts every connection,
  reads the request and never answers.  No real S3 server can be made to do
  that on demand, so this small socket server is written here; it is the only
  fake in this file and it only *withholds* answers.  It counts the requests
  it was sent (one per connection: none is ever answered).
- ``FaultProxy`` (tests/s3servers.py) in front of the real moto server with a
  "hang" rule for every request: the store is opened while L2 answers, then L2
  goes silent; ``proxy.reset()`` makes it answer again.

What is asserted is counted, not timed: requests that reached the endpoint,
breaker state transitions, keys owed.  Where the time bound *is* the property
(flush_l2(timeout_s), close(l2_timeout_s), open), the bound asserted is 5x the
budget: a correctness-of-deadline check, not a speed test.  The breaker's own
transitions are tested with an injected clock (no waiting at all).

Which assertion fails on the code before the fix (commit 9cde9a7):
- test_policy_total_bounds_each_try_against_a_silent_server: ``elapsed <= 5``
  (a try's read timeout of 10 s ran past total_s=1).
- test_open_against_a_silent_l2_opens_on_local_tiers: ``BlockStore.open``
  raised ObjectStoreUnreachableError (after ~20 s).
- test_flush_and_close_honour_their_budget: ``elapsed <= 5`` (flush took ~40 s).
- test_close_does_not_wait_for_a_background_worker_stuck_on_l2: ``elapsed <=
  5`` (close joined the stuck worker for up to 30 s).
- test_breaker_opens_and_lookup_and_sync_put_fail_fast: ``requests <=
  failures`` (12 requests: every lookup made its own 20 s of tries).
- the other tests use the new API (BreakerPolicy, deadline, l2_health).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from conftest import BUCKET
from quiver.engine.errors import ObjectStoreUnreachableError
from quiver.engine.keys import chain_keys
from quiver.engine.store import PENDING_L2, BlockStore
from s3servers import LOOPBACK, FaultProxy
from store_child import make_case
from quiver.tier.errors import ObjectStoreUnavailableError
from quiver.tier.errors import ObjectStoreUnreachableError as TierUnreachable
from quiver.tier.objectstore import BreakerPolicy, CircuitBreaker, current_deadline, deadline
from quiver.tier.s3 import MIN_TRY_S, RetryPolicy, S3ObjectStore, try_timeouts

_REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/1\.1\r\n")


class SilentServer:
    """Accepts TCP connections on 127.0.0.1, reads, never answers (see the module doc)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(256)
        self.endpoint = f"http://{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.lines: list[tuple[str, str]] = []  # (method, path) of each request received
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        seen = 0
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf = (buf + data)[-65536:]
            found = _REQUEST_LINE.findall(buf)
            with self.lock:
                for m, p in found[seen:]:
                    self.lines.append((m.decode(), p.decode()))
            seen = len(found)

    def requests(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, p in self.lines if path is None or path in p)

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            for c in self.conns:
                c.close()


@pytest.fixture
def silent():
    s = SilentServer()
    yield s
    s.close()


@pytest.fixture
def proxy(moto_server):
    p = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    yield p
    p.close()


def hang_everything(proxy: FaultProxy) -> None:
    proxy.inject("hang", times=10**9, hang_s=3600.0)


def wait_until(cond, what: str, cap_s: float = 60.0) -> None:
    """Wait for an event (not a duration): ``cap_s`` only guards against a hang."""
    end = time.monotonic() + cap_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.split(".")[0] == "quiver"]


# --- the breaker, with an injected clock ------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_transitions_with_an_injected_clock(caplog):
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    b = CircuitBreaker(BreakerPolicy(failures=3, cooldown_s=5.0, max_cooldown_s=12.0),
                       name="L2", clock=clock, logger=logging.getLogger("quiver.tier.test"))
    opened = []
    b.on_open = lambda: opened.append(b.state)
    # closed: consecutive failures count; an answer resets the count
    assert b.acquire() == "pass"
    b.failure("t1"), b.failure("t2"), b.success()
    b.failure("t1"), b.failure("t2")
    assert b.state == "closed" and opened == []
    b.failure("t3")
    assert b.state == "open" and opened == ["open"]
    # open: everything refused, without waiting, until the cool-down passes
    assert b.acquire() is None and b.acquire(probe=True) is None
    assert b.retry_in() == pytest.approx(5.0)
    err = b.refusal("head x")
    assert isinstance(err, ObjectStoreUnavailableError) and isinstance(err, TierUnreachable)
    assert err.attempts == 0
    clock.t += 4.999
    assert b.state == "open"
    clock.t += 0.001
    assert b.state == "half-open" and b.retry_in() == 0
    # half-open: one trial; with caller_trials off only a probe may take it
    b.caller_trials = False
    assert b.acquire() is None
    assert b.acquire(probe=True) == "trial"
    assert b.acquire(probe=True) is None  # one trial at a time
    b.failure("probe")  # failed trial: open again, cool-down doubled
    assert b.state == "open" and b.retry_in() == pytest.approx(10.0) and opened == ["open", "open"]
    clock.t += 10.0
    assert b.acquire(probe=True) == "trial"
    b.end_trial()  # a trial that ended without a verdict frees the slot
    assert b.acquire(probe=True) == "trial"
    b.failure("probe")
    assert b.retry_in() == pytest.approx(12.0)  # capped at max_cooldown_s
    clock.t += 12.0
    assert b.acquire(probe=True) == "trial"
    b.success()
    assert b.state == "closed" and b.acquire() == "pass"
    assert list(b.history) == ["closed", "open", "half-open", "open", "half-open", "open", "half-open", "closed"]
    assert b.counts["outages"] == 1 and b.counts["refused"] == 4
    # one WARNING for the outage; the failed probes are DEBUG, the recovery INFO
    recs = [r for r in caplog.records if r.name == "quiver.tier.test"]
    assert [r.levelname for r in recs if r.levelno >= logging.WARNING] == ["WARNING"]
    assert any(r.levelname == "INFO" and "answers again" in r.getMessage() for r in recs)
    # a second outage: a second WARNING; trip() opens at once whatever the count
    b.trip("did not answer at open")
    assert b.state == "open" and b.counts["outages"] == 2
    assert len([r for r in caplog.records if r.name == "quiver.tier.test" and r.levelno >= logging.WARNING]) == 2


def test_try_timeouts_fit_the_budget():
    p = RetryPolicy()  # connect 2 s, read 10 s
    assert try_timeouts(p, 100.0) == (2.0, 10.0)
    assert try_timeouts(p, 12.0) == (2.0, 10.0)
    for left in [0.0, 0.01, MIN_TRY_S, 0.09, 0.1, 0.15, 0.3, 0.99, 1.0, 2.0, 3.7, 5.0, 11.99]:
        t = try_timeouts(p, left)
        if t is None:
            assert left < 2 * MIN_TRY_S
            continue
        connect, read = t
        assert MIN_TRY_S <= connect <= p.connect_timeout_s and MIN_TRY_S <= read <= p.read_timeout_s
        assert connect + read <= left + 1e-9, (left, t)
        assert read >= left / 4  # most of a small budget goes to waiting for the answer
    small = RetryPolicy(connect_timeout_s=0.5, read_timeout_s=0.5)
    assert try_timeouts(small, 0.6) == (0.1, 0.4)


def test_deadlines_nest_to_the_tighter():
    assert current_deadline() is None
    with deadline(10.0) as outer:
        with deadline(1.0) as inner:
            assert inner < outer and current_deadline() == inner
            with deadline(100.0) as again:
                assert again == inner
            with deadline(None) as same:
                assert same == inner
        assert current_deadline() == outer
    assert current_deadline() is None


# --- S3ObjectStore against a silent server -------------------------------------------------


def test_policy_total_bounds_each_try_against_a_silent_server(silent, creds):
    """total_s is the whole operation's bound: a try never outlives it (before the
    fix, a try started at 0 s ran its whole 10 s read timeout)."""
    policy = RetryPolicy(max_tries=50, total_s=1.0, base_delay_s=0.01, connect_timeout_s=2.0, read_timeout_s=10.0)
    t0 = time.monotonic()
    with pytest.raises(TierUnreachable) as info:
        S3ObjectStore(BUCKET, "x", endpoint_url=silent.endpoint, profile=creds, retry=policy)
    elapsed = time.monotonic() - t0
    assert elapsed <= 5 * policy.total_s
    wait_until(lambda: silent.requests() >= info.value.attempts, "every try's request received")
    assert 1 <= info.value.attempts == silent.requests() <= BreakerPolicy().failures


def test_caller_deadline_bounds_an_operation(silent, creds):
    s = S3ObjectStore(BUCKET, "x", endpoint_url=silent.endpoint, profile=creds, check_bucket=False,
                      breaker=BreakerPolicy(failures=1000))
    try:
        t0 = time.monotonic()
        with deadline(1.0), pytest.raises(TierUnreachable) as info:
            s.head(b"k" * 48)
        assert time.monotonic() - t0 <= 5.0
        wait_until(lambda: silent.requests() >= info.value.attempts, "every try's request received")
        assert info.value.attempts == silent.requests() >= 1
        # a budget already spent: no request at all
        n = silent.requests()
        with deadline(0.0), pytest.raises(TierUnreachable, match="budget was spent") as info:
            s.get(b"k" * 48)
        assert info.value.attempts == 0
        with deadline(0.0), pytest.raises(TierUnreachable):
            s.write_manifest([b"k" * 48])
        assert silent.requests() == n
    finally:
        s.close()


def test_breaker_refuses_without_a_request_and_a_probe_closes_it(silent, creds, moto_server, s3_prefix):
    s = S3ObjectStore(BUCKET, s3_prefix, endpoint_url=silent.endpoint, profile=creds, check_bucket=False,
                      retry=RetryPolicy(max_tries=2, total_s=1.0, connect_timeout_s=0.3, read_timeout_s=0.3),
                      breaker=BreakerPolicy(failures=2, cooldown_s=600.0, max_cooldown_s=600.0))
    try:
        for _ in range(2):
            with pytest.raises(TierUnreachable):
                s.head(b"k" * 48)
            if s.breaker.state == "open":
                break
        assert s.breaker.state == "open"
        wait_until(lambda: silent.requests() >= 2, "both tries' requests received")
        assert silent.requests() == 2
        for call in (lambda: s.head(b"k" * 48), lambda: s.put(b"k" * 48, b"x"), lambda: s.get(b"k" * 48),
                     lambda: s.read_manifests(), lambda: s.write_manifest([b"k" * 48])):
            with pytest.raises(ObjectStoreUnavailableError) as info:
                call()
            assert info.value.attempts == 0
        assert silent.requests() == 2  # refused: nothing sent
    finally:
        s.close()


# --- BlockStore ----------------------------------------------------------------------------


def test_open_against_a_silent_l2_opens_on_local_tiers(silent, creds, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    ident, tokens, blocks = make_case(81, 3)
    t0 = time.monotonic()
    store = BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/hung",
                            s3_options=dict(endpoint_url=silent.endpoint, profile=creds),
                            ram_bytes=0, index="flat")
    open_s = time.monotonic() - t0
    try:
        assert open_s <= 5 * BreakerPolicy().probe_timeout_s
        wait_until(lambda: silent.requests() >= 1, "the bucket probe received")
        assert silent.requests("/blocks/") == 0  # the bucket probe only
        h = store.l2_health()
        assert h["configured"] and not h["attached"] and h["breaker"] in ("open", "half-open")
        # sync put: typed, fast (no request), L1 keeps the blocks, the keys are owed
        with pytest.raises(ObjectStoreUnreachableError, match="durable in L1"):
            store.put(ident, tokens, blocks)
        assert store.get(ident, tokens, 3).tobytes() == blocks.tobytes()
        assert store.lookup(ident, tokens) == 3
        other, otokens, _ = make_case(82, 2)
        assert store.lookup(other, otokens) == 0  # L2 not asked: refused by the breaker
        assert silent.requests("/blocks/") == 0
        assert store.stats()["gauges"]["l2_retry_pending"] == 3
    finally:
        t0 = time.monotonic()
        store.close(l2_timeout_s=1.0)
        assert time.monotonic() - t0 <= 5.0
    assert os.path.getsize(tmp_path / "s" / PENDING_L2) == 3 * 48
    assert len(warnings_of(caplog)) == 1, [r.getMessage() for r in warnings_of(caplog)]


def test_flush_and_close_honour_their_budget(proxy, creds, s3_prefix, tmp_path):
    """Default RetryPolicy (10 s read timeout, 20 s per operation); flush_l2 and
    close are given 1 s each while L2 hangs."""
    i1, t1, b1 = make_case(83, 2)
    i2, t2, b2 = make_case(84, 2)
    store = BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}",
                            s3_options=dict(endpoint_url=proxy.endpoint, profile=creds),
                            ram_bytes=0, index="flat")
    try:
        assert store.put(i1, t1, b1) == 2  # published; their manifest is still pending
        # 10 quick 503s: the 5 tries of each of the 2 keys (in flight together): both on the retry list
        proxy.inject("status", method="PUT", status=503, times=10)
        with pytest.raises(ObjectStoreUnreachableError):
            store.put(i2, t2, b2)
        hang_everything(proxy)
        t0 = time.monotonic()
        assert store.flush_l2(timeout_s=1.0) == 2
        assert time.monotonic() - t0 <= 5.0
    finally:
        t0 = time.monotonic()
        store.close(l2_timeout_s=1.0)
        elapsed = time.monotonic() - t0
    assert elapsed <= 5.0
    assert os.path.getsize(tmp_path / "s" / PENDING_L2) == 2 * 48


def test_close_does_not_wait_for_a_background_worker_stuck_on_l2(proxy, creds, s3_prefix, tmp_path):
    """Background mode, default RetryPolicy: the worker's first publish waits on a
    silent L2 (up to 20 s).  close(l2_timeout_s=1) returns within its budget and
    every queued or in-flight key stays owed in PENDING_L2."""
    ident, tokens, blocks = make_case(90, 3)
    store = BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}",
                            s3_options=dict(endpoint_url=proxy.endpoint, profile=creds), l2_mode="background",
                            ram_bytes=0, index="flat")
    try:
        hang_everything(proxy)
        assert store.put(ident, tokens, blocks) == 3
        wait_until(lambda: proxy.count("PUT", path="/blocks/") >= 1, "the worker's first PUT reached L2")
    finally:
        t0 = time.monotonic()
        store.close(l2_timeout_s=1.0)
        elapsed = time.monotonic() - t0
    assert elapsed <= 5.0  # before the fix: the worker was joined for up to 30 s
    assert os.path.getsize(tmp_path / "s" / PENDING_L2) == 3 * 48
    with BlockStore.open(tmp_path / "s", ram_bytes=0, index="flat") as again:  # reopenable, L1 intact
        assert again.get(ident, tokens, 3).tobytes() == blocks.tobytes()


def test_breaker_opens_and_lookup_and_sync_put_fail_fast(proxy, creds, s3_prefix, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    i1, t1, b1 = make_case(85, 2)
    i2, t2, b2 = make_case(86, 2)
    store = BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}",
                            s3_options=dict(endpoint_url=proxy.endpoint, profile=creds),
                            ram_bytes=0, index="flat")
    try:
        store.put(i1, t1, b1)
        hang_everything(proxy)
        n0 = proxy.count(path="/blocks/")
        for _ in range(6):
            assert store.lookup(i2, t2) == 0  # unknown: L2 is asked until the breaker opens
        # each failed try counts; at the third the breaker opens and nobody tries again
        assert 1 <= proxy.count(path="/blocks/") - n0 <= BreakerPolicy().failures
        assert store.l2_health()["breaker"] in ("open", "half-open")
        n1 = proxy.count(path="/blocks/")
        for _ in range(20):
            assert store.lookup(i2, t2) == 0
            assert store.lookup(i1, t1) == 2  # from L1
        with pytest.raises(ObjectStoreUnreachableError, match="durable in L1"):
            store.put(i2, t2, b2)
        assert proxy.count(path="/blocks/") == n1  # refused without a request
        assert store.get(i2, t2, 2).tobytes() == b2.tobytes()
        st = store.stats()
        assert st["gauges"]["l2_retry_pending"] == 2 and st["counters"]["l2_lookup_errors"] >= 20
    finally:
        store.close(l2_timeout_s=1.0)
    assert os.path.getsize(tmp_path / "s" / PENDING_L2) == 2 * 48
    # retries at DEBUG, one WARNING for the outage
    assert len(warnings_of(caplog)) == 1, [r.getMessage() for r in warnings_of(caplog)]


FAST_PROBE = BreakerPolicy(failures=2, cooldown_s=0.05, max_cooldown_s=0.2, probe_timeout_s=1.0)


def test_half_open_probe_closes_the_breaker_and_owed_keys_reach_l2(proxy, creds, s3_prefix, tmp_path,
                                                                   moto_server):
    i1, t1, b1 = make_case(87, 2)
    i2, t2, b2 = make_case(88, 2)
    store = BlockStore.open(tmp_path / "s", object_store=f"s3://{BUCKET}/{s3_prefix}",
                            s3_options=dict(endpoint_url=proxy.endpoint, profile=creds, breaker=FAST_PROBE),
                            ram_bytes=0, index="flat")
    try:
        store.put(i1, t1, b1)
        hang_everything(proxy)
        while store.l2_health()["breaker"] == "closed":
            assert store.lookup(i2, t2) == 0
        with pytest.raises(ObjectStoreUnreachableError):
            store.put(i2, t2, b2)
        # the prober's trials keep failing: back to open each time, never closed
        wait_until(lambda: store._l2.breaker.counts["half_opened"] >= 2, "two half-open probes")
        assert store._l2.breaker.counts["closed"] == 0
        proxy.reset()  # L2 answers again: the next probe closes the breaker
        wait_until(lambda: store.l2_health()["breaker"] == "closed", "breaker closed")
        hist = list(store._l2.breaker.history)
        assert hist[-2:] == ["half-open", "closed"] and "open" in hist
        assert store.flush_l2(timeout_s=30) == 0  # the owed keys reach L2
        assert store.lookup(i2, t2) == 2
    finally:
        store.close()
    assert not (tmp_path / "s" / PENDING_L2).exists()
    skeys = {(i2.namespace + k).hex() for k in chain_keys(i2, t2, 2)}
    page = moto_server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{s3_prefix}/blocks/")
    assert skeys <= {o["Key"].rsplit("/", 1)[1] for o in page.get("Contents", ())}


def test_store_opened_while_l2_is_down_attaches_and_bootstraps_when_it_answers(proxy, creds, s3_prefix,
                                                                               tmp_path):
    i1, t1, b1 = make_case(89, 3)
    opts = dict(endpoint_url=proxy.endpoint, profile=creds, breaker=FAST_PROBE)
    spec = f"s3://{BUCKET}/{s3_prefix}"
    with BlockStore.open(tmp_path / "a", object_store=spec, s3_options=opts, ram_bytes=0, index="flat") as a:
        a.put(i1, t1, b1)  # published, manifest written at close
    hang_everything(proxy)
    store = BlockStore.open(tmp_path / "b", object_store=spec, s3_options=opts, ram_bytes=0, index="flat")
    try:
        assert not store.l2_health()["attached"]
        assert store.lookup(i1, t1) == 0  # L2 down: not found, not waited for
        proxy.reset()
        wait_until(lambda: store.l2_health()["attached"], "L2 attached")
        assert store.stats()["gauges"]["bootstrap_keys"] == 3
        n = proxy.count()
        assert store.lookup(i1, t1) == 3  # known from the manifests: no HEAD
        assert proxy.count() == n
        assert store.get(i1, t1, 3).tobytes() == b1.tobytes()
    finally:
        store.close()
