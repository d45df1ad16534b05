"""Metrics of a BlockStore: cheap latency histograms and a Prometheus collector.

``BlockStore.stats()`` is the one source of numbers (plain, JSON-serialisable
data; docs/STORE.md, "Stats and metrics").  Recording a latency costs one
bisect and two increments under the store's existing lock: the buckets are
fixed and log-spaced, so nothing is allocated per call and nothing is sorted
or summarised until someone reads ``stats()``.

:class:`QuiverCollector` turns ``stats()`` into Prometheus metric families at
scrape time (``registry.register(QuiverCollector(store))``), so an engine that
already serves Prometheus adds the store to its own registry.
``BlockStore.open(..., metrics_port=N)`` instead serves a registry of its own
over HTTP.  prometheus_client is optional (extra ``metrics``): it is imported
only when a collector is scraped or a server is started, never by
``import quiver``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

#: Upper bounds (seconds) of the latency buckets: 4 us x 2^k, up to ~33.6 s
#: (L0 hits are microseconds, an L2 try may wait out a 20 s budget), then +Inf.
BOUNDS_S: tuple[float, ...] = tuple(4e-6 * 2**k for k in range(24))

#: The operations timed, and the tiers each one is timed for ("all": the whole call).
#: lookup: l1 = one residency-index query, l2 = one HEAD.  get: l0/l1/l2 = one
#: block served (read + verify) by that tier.  put: l1 = one group commit,
#: l2 = one object published.
LATENCY_OPS: dict[str, tuple[str, ...]] = {
    "lookup": ("all", "l1", "l2"),
    "get": ("all", "l0", "l1", "l2"),
    "put": ("all", "l1", "l2"),
}


class Histogram:
    """Counts per fixed bucket plus the sum; the caller holds the lock that guards it."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_S) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        """``count`` events of ``seconds`` each (a batch's blocks share one per-block time)."""
        self.counts[bisect_left(BOUNDS_S, seconds)] += count
        self.sum += seconds * count

    def snapshot(self) -> dict[str, Any]:
        """``{"counts": [per bucket, not cumulative], "sum": seconds, "count": n}``."""
        return {"counts": list(self.counts), "sum": self.sum, "count": sum(self.counts)}


def new_latency() -> dict[str, dict[str, Histogram]]:
    """One histogram per (operation, tier) of LATENCY_OPS."""
    return {op: {tier: Histogram() for tier in tiers} for op, tiers in LATENCY_OPS.items()}


def latency_snapshot(lat: dict[str, dict[str, Histogram]]) -> dict[str, Any]:
    """``stats()["latency"]``: the bucket bounds once, then op -> tier -> snapshot."""
    out: dict[str, Any] = {"bounds_s": list(BOUNDS_S)}
    for op, tiers in lat.items():
        out[op] = {tier: h.snapshot() for tier, h in tiers.items()}
    return out


# --------------------------------------------------------------------------- Prometheus
# Counters of stats()["counters"] that become one labelled family instead of
# a family each: name -> (family, label name, label value).
_LABELLED_COUNTERS = {
    "l0_hits": ("quiver_blocks_served", "tier", "l0"),
    "l1_hits": ("quiver_blocks_served", "tier", "l1"),
    "l2_hits": ("quiver_blocks_served", "tier", "l2"),
    "corrupt_l0": ("quiver_corrupt_blocks", "tier", "l0"),
    "corrupt_l1": ("quiver_corrupt_blocks", "tier", "l1"),
    "corrupt_l2": ("quiver_corrupt_blocks", "tier", "l2"),
}
_RENAMED_COUNTERS = {"identity_mismatches": "quiver_guard_mismatches", "misses": "quiver_block_misses"}
_HELP = {
    "quiver_blocks_served": "Blocks a get served, by the tier that held them (verified)",
    "quiver_corrupt_blocks": "Block copies that failed verification, by tier",
    "quiver_guard_mismatches": "Gets refused by the identity guard",
    "quiver_block_misses": "Blocks a get asked for that no tier held",
}
# Per-tier numbers of stats()["tiers"][t] exported as counters (key -> family).
_TIER_COUNTERS = {
    "hits": "quiver_tier_hits", "misses": "quiver_tier_misses", "bytes_out": "quiver_tier_read_bytes",
    "bytes_in": "quiver_tier_written_bytes", "evictions": "quiver_tier_evictions",
}
_TIER_GAUGES = {"used_bytes": "quiver_tier_used_bytes", "capacity_bytes": "quiver_tier_capacity_bytes"}


def _prometheus():
    try:
        import prometheus_client.core as core
    except ImportError as exc:  # typed, with the fix in the message
        from quiver.engine.errors import StoreConfigError

        raise StoreConfigError("Prometheus metrics need prometheus_client: pip install 'quiver-kv[metrics]'") from exc
    return core


class QuiverCollector:
    """A prometheus_client collector for one store: ``registry.register(QuiverCollector(store))``.

    Reads ``store.stats()`` at each scrape (nothing is kept between scrapes).
    Families, all named ``quiver_*``: the store's counters (``*_total``;
    per-tier ones labelled ``tier``), its gauges, each tier's own counters and
    sizes (``quiver_tier_*{tier=...}``), L2's requests, errors and retries, and
    ``quiver_latency_seconds{op, tier}`` histograms.  ``labels`` are added to
    every sample (e.g. ``{"store": "rank0"}`` to tell stores apart in one registry
    -- but one registry takes one collector per family name, so give each store
    its own registry, as ``metrics_port`` does)."""

    def __init__(self, store, labels: dict[str, str] | None = None) -> None:
        self.store = store
        self.labels = dict(labels or {})
        _prometheus()  # fail at registration, not at the first scrape

    def collect(self) -> Iterator[Any]:
        core = _prometheus()
        st = self.store.stats()
        extra = list(self.labels)
        extra_v = [self.labels[k] for k in extra]
        fams: dict[str, Any] = {}

        def counter(name: str, doc: str, label: str | None = None):
            if name not in fams:
                fams[name] = core.CounterMetricFamily(name, doc, labels=extra + ([label] if label else []))
            return fams[name]

        def gauge(name: str, doc: str, label: str | None = None):
            if name not in fams:
                fams[name] = core.GaugeMetricFamily(name, doc, labels=extra + ([label] if label else []))
            return fams[name]

        for key, value in st["counters"].items():
            if key in _LABELLED_COUNTERS:
                name, label, lv = _LABELLED_COUNTERS[key]
                counter(name, _HELP[name], label).add_metric(extra_v + [lv], value)
            else:
                name = _RENAMED_COUNTERS.get(key, f"quiver_{key}")
                counter(name, _HELP.get(name, f"BlockStore counter {key}")).add_metric(extra_v, value)
        for key, value in st["gauges"].items():
            gauge(f"quiver_{key}", f"BlockStore gauge {key}").add_metric(extra_v, value)
        for tier, n in st["residency"].items():
            gauge("quiver_tier_blocks", "Blocks each tier holds (L2: keys known to be there)",
                  "tier").add_metric(extra_v + [tier], n)
        for tier, ts in st["tiers"].items():
            if ts is None:
                continue
            for key, name in _TIER_COUNTERS.items():
                if ts.get(key) is not None:
                    counter(name, f"Tier {key}, by tier", "tier").add_metric(extra_v + [tier], ts[key])
            for key, name in _TIER_GAUGES.items():
                if ts.get(key) is not None:
                    gauge(name, f"Tier {key}, by tier", "tier").add_metric(extra_v + [tier], ts[key])
        l2 = st["tiers"].get("l2")
        if l2 is not None:
            for key, doc in (("ops", "L2 operations asked, by op"), ("errors", "L2 operations that failed, by op"),
                             ("requests", "L2 requests sent (S3: HTTP requests, retries included), by op")):
                fam = counter(f"quiver_l2_{key}", doc, "op")
                for op, n in sorted(l2[key].items()):
                    fam.add_metric(extra_v + [op], n)
            counter("quiver_l2_retries", "L2 tries retried").add_metric(extra_v, l2["retries"])
            br = l2["breaker"]
            counter("quiver_l2_outages", "L2 outages (circuit breaker opened)").add_metric(extra_v, br["outages"])
            counter("quiver_l2_refused", "L2 calls refused by the open circuit breaker").add_metric(
                extra_v, br["refused"])
            gauge("quiver_l2_breaker_open", "1 while L2's circuit breaker is not closed").add_metric(
                extra_v, 0 if br["state"] == "closed" else 1)
        lat = st["latency"]
        bounds = lat["bounds_s"]
        hist = core.HistogramMetricFamily("quiver_latency_seconds", "BlockStore call latency by op and tier "
                                          "(tier all: the whole call)", labels=extra + ["op", "tier"])
        for op, tiers in lat.items():
            if op == "bounds_s":
                continue
            for tier, h in tiers.items():
                cum, buckets = 0, []
                for le, c in zip([*map(repr, bounds), "+Inf"], h["counts"]):
                    cum += c
                    buckets.append((le, cum))
                hist.add_metric(extra_v + [op, tier], buckets, h["sum"])
        yield from fams.values()
        yield hist


def serve(store, port: int, addr: str = "0.0.0.0") -> tuple[Any, Any, Any]:
    """Serve ``store``'s metrics at http://addr:port/metrics from a registry of its own.

    Returns (registry, server, thread); ``server.server_port`` is the port
    bound (useful with port 0).  Close with ``server.shutdown(); server.server_close()``."""
    _prometheus()
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)
    registry.register(QuiverCollector(store))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return registry, server, thread


__all__ = ["BOUNDS_S", "LATENCY_OPS", "Histogram", "QuiverCollector", "latency_snapshot", "new_latency", "serve"]
