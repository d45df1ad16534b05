"""Issue 12 (operable): stats() as plain data, Prometheus exposition, S3 logging, lazy boto3.

Everything runs against real things: a real store on disk (with a directory
L2, or S3 on the moto server through the fault proxy of tests/s3servers.py),
prometheus_client's own exposition and parser, a real HTTP scrape, and the
silent TCP server of tests/test_l2_hung.py for an L2 that never answers.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from conftest import BUCKET
from quiver.engine.errors import StoreConfigError
from quiver.engine.metrics import BOUNDS_S, LATENCY_OPS, QuiverCollector
from quiver.engine.store import BlockStore
from s3servers import LOOPBACK, FaultProxy
from store_child import make_case
from test_l2_hung import SilentServer

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(store) -> dict[tuple[str, tuple], float]:
    registry = prometheus_client.CollectorRegistry()
    registry.register(QuiverCollector(store))
    return samples(prometheus_client.generate_latest(registry).decode())


def lat(op: str, tier: str) -> tuple:
    return (("op", op), ("tier", tier))


# --- stats() --------------------------------------------------------------------------------


def test_stats_is_plain_data_with_latency_per_op_and_tier(tmp_path):
    ident, tokens, blocks = make_case(1, 4)
    with BlockStore.open(tmp_path / "s", index="flat", object_store=tmp_path / "l2") as store:
        assert store.put(ident, tokens, blocks) == 4
        assert store.lookup(ident, tokens) == 4
        assert store.get(ident, tokens, 4).tobytes() == blocks.tobytes()
        st = json.loads(json.dumps(store.stats()))  # was a TypeError (dataclasses, a repr for L2)
    assert set(st) == {"counters", "gauges", "residency", "config", "tiers", "latency"}
    c = st["counters"]
    assert c["put_blocks"] == 4 and c["lookups"] == 1 and c["get_blocks"] == 4 and c["l0_hits"] == 4
    assert c["l2_published"] == 4 and c["identity_mismatches"] == 0
    assert st["gauges"]["l2_retry_pending"] == 0 and st["residency"] == {"l0": 4, "l1": 4, "l2": 4}
    assert st["config"]["index"] == "flat" and st["config"]["sources"]["index"] == "keyword"
    assert st["config"]["sources"]["codec"] == "default" and st["config"]["guard"] is True
    l0, l1, l2 = (st["tiers"][t] for t in ("l0", "l1", "l2"))
    assert l0["hits"] == 4 and l0["blocks"] == 4
    assert l1["blocks"] == 4 and l1["bytes_in"] > 0 and l1["volume"]["commits"] >= 1
    assert l2["ops"]["put"] == 4 and l2["bytes_in"] == l1["bytes_in"] and l2["errors"] == {}
    assert l2["requests"] == {} and l2["breaker"]["state"] == "closed" and l2["attached"] is True
    latency = st["latency"]
    assert latency["bounds_s"] == list(BOUNDS_S)
    counts = {op: {t: h["count"] for t, h in latency[op].items()} for op in LATENCY_OPS}
    assert counts == {"lookup": {"all": 1, "l1": 1, "l2": 0}, "get": {"all": 1, "l0": 4, "l1": 0, "l2": 0},
                      "put": {"all": 1, "l1": 1, "l2": 4}}
    for op in LATENCY_OPS:
        for h in latency[op].values():
            assert len(h["counts"]) == len(BOUNDS_S) + 1 and sum(h["counts"]) == h["count"]
            assert h["sum"] >= 0 and (h["count"] == 0) == (h["sum"] == 0)


# --- Prometheus --------------------------------------------------------------------------------


def test_collector_exposes_what_was_done(tmp_path):
    ident, tokens, blocks = make_case(2, 5)
    with BlockStore.open(tmp_path / "a", index="flat", object_store=tmp_path / "l2", ram_bytes=0) as a:
        assert a.put(ident, tokens, blocks) == 5
        assert a.lookup(ident, tokens) == 5
        assert a.lookup(ident, tokens[:40]) == 2
        a.get(ident, tokens, 3)
        m = scrape(a)
    assert m[("quiver_put_blocks_total", ())] == 5
    assert m[("quiver_lookups_total", ())] == 2
    assert m[("quiver_get_blocks_total", ())] == 3
    assert m[("quiver_blocks_served_total", (("tier", "l1"),))] == 3
    assert m[("quiver_blocks_served_total", (("tier", "l0"),))] == 0
    assert m[("quiver_guard_mismatches_total", ())] == 0
    assert m[("quiver_tier_blocks", (("tier", "l1"),))] == 5
    assert m[("quiver_tier_hits_total", (("tier", "l1"),))] == 3
    assert m[("quiver_l2_ops_total", (("op", "put"),))] == 5
    assert m[("quiver_l2_retries_total", ())] == 0
    assert m[("quiver_l2_breaker_open", ())] == 0
    assert m[("quiver_latency_seconds_count", lat("put", "all"))] == 1
    assert m[("quiver_latency_seconds_count", lat("put", "l2"))] == 5
    assert m[("quiver_latency_seconds_count", lat("lookup", "all"))] == 2
    assert m[("quiver_latency_seconds_count", lat("get", "l1"))] == 3
    assert m[("quiver_latency_seconds_count", lat("get", "l0"))] == 0
    buckets = [v for (name, labels), v in m.items()
               if name == "quiver_latency_seconds_bucket" and dict(labels).get("op") == "get"
               and dict(labels).get("tier") == "l1"]
    assert len(buckets) == len(BOUNDS_S) + 1 and max(buckets) == 3  # cumulative, +Inf = count

    # another process's view: a fresh L1, the blocks come from L2
    with BlockStore.open(tmp_path / "b", index="flat", object_store=tmp_path / "l2", ram_bytes=0) as b:
        assert b.get(ident, tokens, 5).tobytes() == blocks.tobytes()
        b.drain_promotions()  # the promoter reads them from L2 again, after the get: counted once done
        m = scrape(b)
    assert m[("quiver_blocks_served_total", (("tier", "l2"),))] == 5
    assert m[("quiver_l2_ops_total", (("op", "get"),))] == 10  # the get's 5 reads + the promoter's 5
    assert m[("quiver_tier_read_bytes_total", (("tier", "l2"),))] > 0
    assert m[("quiver_latency_seconds_count", lat("get", "l2"))] == 5
    assert m[("quiver_bootstrap_keys", ())] == 5


def test_metrics_port_serves_the_store_over_http(tmp_path):
    ident, tokens, blocks = make_case(3, 2)
    store = BlockStore.open(tmp_path / "s", index="flat", metrics_port=0)
    try:
        port = store.metrics_port
        assert isinstance(port, int) and port > 0
        store.put(ident, tokens, blocks)
        store.get(ident, tokens, 2)
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as r:
            m = samples(r.read().decode())
        assert m[("quiver_put_blocks_total", ())] == 2
        assert m[("quiver_blocks_served_total", (("tier", "l0"),))] == 2
        assert m[("quiver_latency_seconds_count", lat("get", "all"))] == 1
        assert store.stats()["config"]["metrics_port"] == 0
    finally:
        store.close()
    with pytest.raises(urllib.error.URLError):  # closed with the store
        urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5)


@pytest.mark.parametrize("port", [-1, 70000, True, 1.5, "9100"])
def test_metrics_port_is_validated_before_anything_is_created(tmp_path, port):
    with pytest.raises(StoreConfigError, match="metrics_port"):
        BlockStore.open(tmp_path / "s", metrics_port=port)
    assert not (tmp_path / "s").exists()


def test_metrics_port_without_prometheus_client_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(StoreConfigError, match=r"quiver-kv\[metrics\]"):
        BlockStore.open(tmp_path / "s", metrics_port=0)
    assert not (tmp_path / "s").exists()


# --- S3 logging and L2 counts ----------------------------------------------------------------


@pytest.fixture
def proxy(moto_server):
    p = FaultProxy((LOOPBACK, urlsplit(moto_server.endpoint).port))
    yield p
    p.close()


def quiver_records(caplog, level: int, endpoint: str) -> list[logging.LogRecord]:
    """This test's records: a store left behind by an earlier test (a background
    worker still waiting on its L2) may log meanwhile, about its own endpoint."""
    return [r for r in caplog.records if r.levelno == level and r.name.split(".")[0] == "quiver"
            and endpoint in r.getMessage()]


def test_s3_outage_logs_one_warning_then_one_info_and_counts_retries(proxy, creds, s3_prefix, caplog):
    from quiver.tier.s3 import RetryPolicy, S3ObjectStore

    caplog.set_level(logging.DEBUG)
    s = S3ObjectStore(BUCKET, s3_prefix, endpoint_url=proxy.endpoint, profile=creds,
                      retry=RetryPolicy(base_delay_s=0.01, max_delay_s=0.05))
    ep = urlsplit(proxy.endpoint).netloc
    try:
        assert s.put(b"a" * 48, b"x")
        assert quiver_records(caplog, logging.WARNING, ep) == []
        proxy.inject("status", method="PUT", status=503, times=3)
        assert s.put(b"b" * 48, b"y")  # three 503s, then the fourth try succeeds
        warnings = quiver_records(caplog, logging.WARNING, ep)
        assert len(warnings) == 1 and "failing" in warnings[0].getMessage()
        assert "HTTP 503" in warnings[0].getMessage()
        infos = [r for r in quiver_records(caplog, logging.INFO, ep) if "answers again" in r.getMessage()]
        assert len(infos) == 1 and "3 failed tries" in infos[0].getMessage()
        assert len([r for r in quiver_records(caplog, logging.DEBUG, s3_prefix) if "retrying in" in r.getMessage()]) == 3
        st = s.stats()
        assert st["ops"]["put"] == 2 and st["errors"] == {} and st["retries"] == 3
        assert st["requests"]["put"] == 1 + 4 and st["breaker"]["state"] == "closed"
        assert s.head(b"c" * 48) is None  # a 404 is an answer: no new outage
        proxy.inject("status", method="PUT", status=503, times=1)
        assert s.put(b"d" * 48, b"z")  # a second outage: a second WARNING, a second INFO
        assert len(quiver_records(caplog, logging.WARNING, ep)) == 2
        assert len([r for r in quiver_records(caplog, logging.INFO, ep) if "answers again" in r.getMessage()]) == 2
        assert s.stats()["misses"] == 1 and s.stats()["retries"] == 4
    finally:
        s.close()


def test_silent_s3_logs_one_warning_for_many_failed_operations(creds, caplog):
    from quiver.tier.errors import ObjectStoreUnreachableError
    from quiver.tier.objectstore import BreakerPolicy
    from quiver.tier.s3 import RetryPolicy, S3ObjectStore

    caplog.set_level(logging.DEBUG)
    silent = SilentServer()
    s = S3ObjectStore(BUCKET, "silent", endpoint_url=silent.endpoint, profile=creds, check_bucket=False,
                      retry=RetryPolicy(max_tries=2, total_s=2.0, base_delay_s=0.01, connect_timeout_s=0.2,
                                        read_timeout_s=0.2),
                      breaker=BreakerPolicy(failures=5))
    ep = urlsplit(silent.endpoint).netloc
    try:
        for _ in range(4):  # 2 tries each; the breaker opens at the 5th failed try
            with pytest.raises(ObjectStoreUnreachableError):
                s.head(b"k" * 48)
        warnings = quiver_records(caplog, logging.WARNING, ep)
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert s.breaker.state == "open"  # its own open is INFO: the outage was announced already
        assert any("circuit breaker open" in r.getMessage() for r in quiver_records(caplog, logging.INFO, ep))
        st = s.stats()
        assert st["errors"]["head"] == 4 and st["breaker"]["outages"] == 1 and st["breaker"]["refused"] >= 1
        assert st["requests"]["head"] == 5 and st["retries"] == 2
    finally:
        s.close()
        silent.close()


def test_blockstore_stats_of_an_s3_l2_are_plain_data(proxy, creds, s3_prefix, tmp_path):
    ident, tokens, blocks = make_case(4, 2)
    with BlockStore.open(tmp_path / "s", index="flat", object_store=f"s3://{BUCKET}/{s3_prefix}",
                         s3_options=dict(endpoint_url=proxy.endpoint, profile=creds)) as store:
        marker = store.stats()["tiers"]["l2"]["requests"]["put"]  # the layout marker's, at attach (1)
        proxy.inject("status", method="PUT", status=503, times=1)
        assert store.put(ident, tokens, blocks) == 2
        st = json.loads(json.dumps(store.stats()))
        m = scrape(store)
    l2 = st["tiers"]["l2"]
    assert marker == 1 and l2["retries"] == 1 and l2["ops"]["put"] == 2 and l2["requests"]["put"] == 3 + marker
    assert "S3ObjectStore" in l2["store"] and st["counters"]["l2_published"] == 2
    assert m[("quiver_l2_requests_total", (("op", "put"),))] == 3 + marker
    assert m[("quiver_l2_retries_total", ())] == 1


# --- boto3 is imported only for S3 -------------------------------------------------------------


def test_import_and_open_without_s3_do_not_import_boto3(tmp_path):
    code = (
        "import sys\n"
        "import quiver, quiver.tier, quiver.engine\n"
        "from quiver import BlockStore\n"
        "with BlockStore.open(sys.argv[1], index='flat', object_store=sys.argv[2]) as s:\n"
        "    s.stats()\n"
        "boto = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore'))\n"
        "assert not boto, boto\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), str(tmp_path / "l2")],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_s3_object_store_is_still_reachable_from_the_tier_package():
    import quiver.tier
    from quiver.tier.s3 import S3ObjectStore

    assert quiver.tier.S3ObjectStore is S3ObjectStore
    with pytest.raises(AttributeError):
        quiver.tier.NoSuchThing  # noqa: B018
