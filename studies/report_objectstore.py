"""Report section of the L2 object store (studies/bench_objectstore.py): PUT / GET throughput
and latency per backend, and bootstrapping from manifests vs a listing."""

from __future__ import annotations

from .report_common import _div, _ex, _ms, _section_head, _size, _x, fmt, reproduce_line, table

GROUPS = ["objectstore", "objectstore-bootstrap"]


def objectstore_section(mode: str, groups: dict) -> list[str]:
    lines = _section_head("objectstore", "L2 object store: throughput, latency, bootstrap")
    tp = groups.get("objectstore", [])
    if tp:
        rows = []
        for b in sorted(tp, key=lambda b: (str(_ex(b).get("backend")), _ex(b).get("object_bytes") or 0,
                                           _ex(b).get("concurrency") or 0)):
            e = _ex(b)
            put, get = e.get("put") or {}, e.get("get") or {}
            rows.append([fmt(e.get("backend")), _size(e.get("object_bytes")), fmt(e.get("concurrency"), "int"),
                         fmt(e.get("objects"), "int"), fmt(e.get("put_mb_s")), fmt(e.get("get_mb_s")),
                         fmt(_div(put.get("p50_us"), 1e3)), fmt(_div(put.get("p99_us"), 1e3)),
                         fmt(_div(get.get("p50_us"), 1e3)), fmt(_div(get.get("p99_us"), 1e3))])
        present = sorted({str(_ex(b).get("backend")) for b in tp})
        lines += [
            "### PUT / GET throughput and latency (group `objectstore`)", "",
            "Servers on loopback; PUT is first-writer-wins with Content-MD5 and CRC32C metadata, GET is verified. "
            f"MB/s = batch bytes / batch wall time (1 MB = 1e6 B). Backends in this run: {', '.join(present)}; "
            "a backend not listed was skipped or failed (the run's pytest output says why).", "",
        ]
        lines += table(["backend", "object", "threads", "objects", "PUT MB/s", "GET MB/s", "PUT p50 ms", "PUT p99 ms",
                        "GET p50 ms", "GET p99 ms"], rows)
        lines += [reproduce_line(mode, tp), ""]
    bs = groups.get("objectstore-bootstrap", [])
    if bs:
        rows = []
        for b in sorted(bs, key=lambda b: (str(_ex(b).get("backend")), _ex(b).get("blocks") or 0)):
            e = _ex(b)
            rows.append([fmt(e.get("backend")), fmt(e.get("blocks"), "int"), fmt(e.get("manifests"), "int"),
                         fmt(_ms(e.get("manifests_s"))), fmt(_ms(e.get("listing_s"))), _x(e.get("listing_over_manifests")),
                         fmt(_ms(e.get("store_open_s"))), fmt(_ms(e.get("import_s")))])
        lines += [
            "### Bootstrap: manifests vs a full listing (group `objectstore-bootstrap`)", "",
            "A new process finds the n published keys of a prefix by reading the manifests (one per 1,024 keys) "
            "and, for comparison, by listing; both must find all n.", "",
        ]
        lines += table(["backend", "blocks", "manifests", "read manifests ms", "list keys ms", "listing ÷ manifests",
                        "BlockStore.open ms", "process import ms"], rows)
        lines += [reproduce_line(mode, bs), ""]
    return lines


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return objectstore_section(mode, groups)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Bootstrap: listing ÷ manifests at the largest block count (no row when the group is absent)."""
    boot = [_ex(b) for b in groups.get("objectstore-bootstrap", [])]
    if not boot:
        return []
    top = max(e.get("blocks") or 0 for e in boot)
    parts = [f"{e.get('backend')} {_x(e.get('listing_over_manifests'))}" for e in boot if e.get("blocks") == top]
    return [["Bootstrap: listing ÷ manifests", "; ".join(parts), f"{top:,} blocks", "[objectstore](#objectstore)"]]
