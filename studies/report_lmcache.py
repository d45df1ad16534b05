"""Report section of LMCache's storage layer beside Quiver (studies/bench_lmcache.py,
group ``lmcache``; issue 10).

extra_info: ``lmcache_version``, ``torch``, ``cases`` (each: ``tier`` ram|disk,
``chunk_bytes``, ``chunks``, ``request_bytes``, ``rounds``, ``threads``, ``medians_s`` with
``lmcache_store``, ``quiver_store``, ``lmcache_lookup``, ``quiver_lookup``,
``lmcache_retrieve``, ``quiver_retrieve``, and on disk ``lmcache_fsync`` /
``lmcache_store_fsync``; ``quiver_fsyncs``), or ``skipped`` with the reason.
"""

from __future__ import annotations

from pathlib import Path

from .report_common import DASH, mb_per_s, _absent, _div, _ex, _is_num, _section_head, _size, _txt, _us, _x, fmt, reproduce_line, table

GROUPS = ["lmcache"]


def _run(groups: dict) -> dict:
    bs = groups.get("lmcache", [])
    return _ex(bs[0]) if bs else {}


def _ahead(lm, q) -> str:
    """"Quiver ahead ×r" / "LMCache ahead ×r" from two times (lower is better)."""
    r = _div(lm, q)
    if r is None:
        return DASH
    return f"Quiver ahead {_x(r)}" if r >= 1 else f"**LMCache ahead {_x(1 / r)}**"


def _rows(cases: list[dict]) -> list[list[str]]:
    rows = []
    for c in cases:
        m = c.get("medians_s") or {}
        nb = c.get("request_bytes")
        size = f"{_size(c.get('chunk_bytes'))} × {fmt(c.get('chunks'), 'int')}"
        if c.get("tier") == "ram":
            rows.append([size, "RAM: retrieve (into the caller's buffer)", "LocalCPUBackend", fmt(_us(m.get("lmcache_retrieve"))),
                         "L0 `get(out=)`", fmt(_us(m.get("quiver_retrieve"))), fmt(mb_per_s(nb, m.get("lmcache_retrieve"))),
                         fmt(mb_per_s(nb, m.get("quiver_retrieve"))), _ahead(m.get("lmcache_retrieve"), m.get("quiver_retrieve"))])
            rows.append([size, "RAM: lookup", "batched_contains", fmt(_us(m.get("lmcache_lookup"))), "`lookup`",
                         fmt(_us(m.get("quiver_lookup"))), DASH, DASH, _ahead(m.get("lmcache_lookup"), m.get("quiver_lookup"))])
            rows.append([size, "store (not like for like: LMCache RAM only, Quiver durable in L1 too)", "batched_put",
                         fmt(_us(m.get("lmcache_store"))), "`put` (durable)", fmt(_us(m.get("quiver_store"))),
                         fmt(mb_per_s(nb, m.get("lmcache_store"))), fmt(mb_per_s(nb, m.get("quiver_store"))), "(not comparable)"])
        else:
            store_q, store_lm = m.get("quiver_store"), m.get("lmcache_store_fsync")
            rows.append([size, "disk: durable store", "batched_put, landed, + fsync of each file", fmt(_us(store_lm)),
                         "`put` (durable on return)", fmt(_us(store_q)), fmt(mb_per_s(nb, store_lm)), fmt(mb_per_s(nb, store_q)),
                         _ahead(store_lm, store_q)])
            rows.append([size, "disk: store as LMCache does it (asynchronous, no fsync) vs Quiver durable", "batched_put, landed",
                         fmt(_us(m.get("lmcache_store"))), "`put` (durable on return)", fmt(_us(store_q)),
                         fmt(mb_per_s(nb, m.get("lmcache_store"))), fmt(mb_per_s(nb, store_q)),
                         _ahead(m.get("lmcache_store"), store_q) + " (different durability)"])
            rows.append([size, "disk: retrieve (page cache warm)", "batched_get from LocalDiskBackend",
                         fmt(_us(m.get("lmcache_retrieve"))), "L1 `get(out=)`", fmt(_us(m.get("quiver_retrieve"))),
                         fmt(mb_per_s(nb, m.get("lmcache_retrieve"))), fmt(mb_per_s(nb, m.get("quiver_retrieve"))),
                         _ahead(m.get("lmcache_retrieve"), m.get("quiver_retrieve"))])
            both_lm = _sum(store_lm, m.get("lmcache_retrieve"))
            both_q = _sum(store_q, m.get("quiver_retrieve"))
            rows.append([size, "disk: durable store + retrieve", "the two above", fmt(_us(both_lm)), "the two above",
                         fmt(_us(both_q)), fmt(mb_per_s(nb, both_lm)), fmt(mb_per_s(nb, both_q)), _ahead(both_lm, both_q)])
            rows.append([size, "disk: lookup", "batched_contains", fmt(_us(m.get("lmcache_lookup"))), "`lookup`",
                         fmt(_us(m.get("quiver_lookup"))), DASH, DASH, _ahead(m.get("lmcache_lookup"), m.get("quiver_lookup"))])
    return rows


def _sum(a, b):
    return a + b if _is_num(a) and _is_num(b) else None


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    benches = groups["lmcache"]
    run = _run(groups)
    lines = _section_head("lmcache", "LMCache's storage layer beside Quiver (group `lmcache`)")
    if run.get("skipped"):
        return lines + [f"The LMCache comparison did not run: {_txt(run['skipped'])}", "",
                        reproduce_line(mode, benches), ""]
    cases = run.get("cases") or []
    c0 = cases[0] if cases else {}
    lines += [
        f"LMCache {fmt(run.get('lmcache_version'))} (torch {fmt(run.get('torch'))}, CPU, no vLLM) and Quiver in one "
        f"process, timed in the same rounds, interleaved (who stores first and who reads first alternate every "
        f"round; medians of {fmt(c0.get('rounds'), 'int')} rounds); requests "
        f"of {_size(c0.get('request_bytes'))} of random bytes, new keys every round; one caller thread (LMCache's disk "
        "backend uses its own 4 I/O threads, as it always does). RAM: LMCache's `StorageManager` with `local_cpu=True` "
        "(its `LocalCPUBackend`), Quiver's L0. Disk: LMCache with `local_cpu=False` and `LocalDiskBackend` (the CPU "
        "backend only stages), Quiver with `ram_bytes=0` (L1). Semantics, stated plainly: LMCache's disk store returns "
        "before the bytes are written and never fsyncs; the table times it until every chunk is in its file, and "
        "`durable store` adds an fsync of each file by the harness (no directory fsync: the files' names are still not "
        "durable, so this is a lower bound for a durable LMCache store). Quiver's `put` is durable on return (objects, "
        "their directories and the WAL fsync'd; it has no non-durable local mode). LMCache's files hold raw bytes (no "
        "checksum; its index is in RAM only, so a restart finds nothing); Quiver verifies every read (CRC32C, identity "
        "guard). Lookup is not like for like either: Quiver's `lookup` takes the prompt's tokens and hashes them into its chain keys (BLAKE3, one per 16-token block), while LMCache's `batched_contains` takes keys its caller already made (its cache engine hashes the tokens beforehand: untimed here). Retrieve copies into the caller's buffer on both sides and differs the same way: Quiver's `get` takes the tokens, "
        "keys them (BLAKE3 chain), pins its slots and checks every header (identity guard, header CRC32C) before it copies; "
        "LMCache's `batched_get` takes the keys and copies raw bytes. Both stores' bytes are checked after every "
        "retrieve. Harness: studies/lmcache_child.py. 1 MB = 1e6 B.", "",
    ]
    lines += table(["chunks", "operation", "LMCache", "LMCache µs", "Quiver", "Quiver µs", "LMCache MB/s",
                    "Quiver MB/s", "verdict"], _rows(cases))
    lines += ["Goal (issue 10): ahead of LocalCPUBackend on retrieve, and of LocalDiskBackend on durable store + "
              "retrieve, on the same chunks.", ""]
    return lines + [reproduce_line(mode, benches), ""]


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    link = "[lmcache](#lmcache)"
    label = "Quiver vs LMCache's storage layer (goal: ahead on RAM retrieve, and on durable disk store + retrieve)"
    run = _run(groups)
    if not run:
        return [[label, _absent("lmcache"), DASH, link]]
    if run.get("skipped"):
        return [[label, f"not run: {_txt(run['skipped'])[:160]}", DASH, link]]
    parts = []
    for c in run.get("cases") or []:
        m = c.get("medians_s") or {}
        if c.get("tier") == "ram":
            parts.append(f"RAM retrieve {_size(c.get('chunk_bytes'))}: {_ahead(m.get('lmcache_retrieve'), m.get('quiver_retrieve'))}")
        else:
            parts.append(f"disk durable store + retrieve {_size(c.get('chunk_bytes'))}: "
                         f"{_ahead(_sum(m.get('lmcache_store_fsync'), m.get('lmcache_retrieve')), _sum(m.get('quiver_store'), m.get('quiver_retrieve')))}")
    c0 = (run.get("cases") or [{}])[0]
    return [[label, "; ".join(parts), f"LMCache {fmt(run.get('lmcache_version'))}, requests of "
             f"{_size(c0.get('request_bytes'))}, one caller thread", link]]


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    return []
