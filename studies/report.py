"""``quiver report``: bench_results/REPORT.md and plots/*.png from one results JSON.

Everything printed comes from the JSON that ``quiver run`` wrote (pytest-benchmark's
format plus ``machine_info["quiver"]`` and ``["quiver"]`` added by
studies/conftest.py): no measured figure is typed in here.  Goals (the ART
targets of issue 4, the guard's ≤ 1 %, copy ≥ 0.7 of memcpy, TTFT store share
≤ 10 %) are constants, marked as goals; every comparison with them is computed
from the run.  A figure the JSON lacks is printed as "—"; a group the JSON
lacks gets no section and a "—" in the headline figures.

Layout: header (machine, sizes, command) → headline figures (each linking to
its section; the index rows first, measured through BlockStore) → contents →
physical limits → the index through the product → residency indexes → ART targets →
Mooncake → keys → walpub → tiers → identity → object store → copy → KV codecs →
layerwise → TTFT; any other group (codecs, a new study) gets a generic table,
so a new study shows up without changes here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

DASH = "—"

# group -> (title, [(column, extra_info key, kind)], headline key, higher_is_better)
INDEX_GROUPS: list[tuple[str, str, list[tuple[str, str, str]], str | None, bool]] = [
    ("index-insert", "Bulk insert: put_many in batches, then flush",
     [("records/s", "records_per_s", "rate"), ("total s", "insert_s", "num"),
      ("written MB/s", "_write_mb_s", "num"), ("RSS Δ MiB", "rss_delta_bytes", "mib")], "records_per_s", True),
    ("index-get", "Point get: single calls on random present keys",
     [("p50 µs", "p50_us", "num"), ("p99 µs", "p99_us", "num"), ("mean µs", "mean_us", "num"), ("calls", "calls", "int")],
     "p50_us", False),
    ("index-get_many", "get_many: batches of 1,000 random present keys",
     [("keys/s", "keys_per_s", "rate"), ("µs/key", "per_key_us", "num"), ("batch p50 µs", "batch_p50_us", "num"),
      ("batch p99 µs", "batch_p99_us", "num")], "keys_per_s", True),
    ("index-scan", "scan_prefix of one namespace, fully consumed",
     [("p50 µs", "p50_us", "num"), ("p99 µs", "p99_us", "num"), ("records/scan", "records_per_scan", "num"),
      ("calls", "calls", "int")], "p50_us", False),
    ("index-replica-scan", "Replica scan: scan_prefix with one block's full 48-byte key",
     [("p50 µs", "p50_us", "num"), ("p99 µs", "p99_us", "num"), ("records/scan", "records_per_scan", "num"),
      ("calls", "calls", "int")], "p50_us", False),
    ("index-longest-prefix", "longest_prefix over request chains of the shared-prefix workload",
     [("p50 µs", "p50_us", "num"), ("p99 µs", "p99_us", "num"), ("chains/s", "chains_per_s", "rate"),
      ("blocks/chain", "mean_chain_blocks", "num"), ("hit ratio", "hit_ratio", "pct")], "p50_us", False),
    ("index-footprint", "Footprint after the bulk insert",
     [("on disk MiB", "bytes_on_disk", "mib"), ("written MiB", "bytes_written", "mib"),
      ("write amp.", "write_amplification", "num"), ("stats() memory MiB", "memory_bytes", "mib"),
      ("RSS Δ MiB", "rss_delta_bytes", "mib"), ("disk B/record", "_disk_per_record", "num")], "bytes_on_disk", False),
    ("index-reopen", "Reopen: close, open, len() (persistent backends)",
     [("reopen ms", "_median_ms", "num"), ("records", "records", "int"),
      ("on disk MiB", "bytes_on_disk_after_reopen", "mib")], "_median_ms", False),
]

LATENCY_PLOTS = [
    ("index-insert", "_insert_us_per_record", "bulk insert, µs per record"),
    ("index-get", "p50_us", "get p50, µs"),
    ("index-get", "p99_us", "get p99, µs"),
    ("index-get_many", "per_key_us", "get_many, µs per key"),
    ("index-scan", "p50_us", "namespace scan p50, µs"),
    ("index-replica-scan", "p50_us", "replica scan p50, µs"),
    ("index-longest-prefix", "p50_us", "longest_prefix p50, µs"),
    ("index-longest-prefix", "p99_us", "longest_prefix p99, µs"),
    ("index-reopen", "_median_ms", "reopen, ms"),
]


# --- formatting -----------------------------------------------------------------------


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x, kind: str = "num") -> str:
    """One cell; "—" for anything missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not _is_num(x):
        s = json.dumps(x) if isinstance(x, (dict, list)) else str(x)
        return (s[:60] + "…") if len(s) > 61 else s
    if kind == "mib":
        return f"{x / 2**20:,.1f}"
    if kind == "pct":
        return f"{100 * x:.2f}%"
    if kind == "rate":
        return f"{x:,.0f}"
    if kind == "int" or isinstance(x, int) or (float(x).is_integer() and abs(x) >= 10):
        return f"{int(x):,}"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.01:
        return f"{x:.3g}" if ax < 1 else f"{x:.2f}"
    return f"{x:.2e}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


# --- reading the JSON -----------------------------------------------------------------


def _groups(data: dict) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    return groups


def _test_ids(benches: list[dict]) -> list[str]:
    """file::function of each benchmark, without parameters, in first-seen order."""
    seen: OrderedDict[str, None] = OrderedDict()
    for b in benches:
        seen[re.sub(r"\[.*\]$", "", b.get("fullname", b.get("name", "")))] = None
    return list(seen)


def _run_prefix(mode: str) -> str:
    return {"smoke": "QUIVER_SMOKE=1 python -m quiver.studies.cli run", "full": "python -m quiver.studies.cli run --full"}.get(
        mode, "python -m quiver.studies.cli run"
    )


def reproduce_line(mode: str, benches: list[dict]) -> str:
    return f"Reproduce: `{_run_prefix(mode)} -- {' '.join(_test_ids(benches))}`"


def _derived(b: dict) -> dict:
    """extra_info plus the figures computed from it and the benchmark's own stats."""
    e = dict(b.get("extra_info") or {})
    stats = b.get("stats") or {}
    med = stats.get("median")
    e["_median_s"] = med
    e["_median_ms"] = med * 1e3 if _is_num(med) else None
    rps = e.get("records_per_s")
    e["_insert_us_per_record"] = 1e6 / rps if _is_num(rps) and rps > 0 else None
    bw, secs = e.get("bytes_written"), e.get("insert_s")
    e["_write_mb_s"] = bw / secs / 1e6 if _is_num(bw) and _is_num(secs) and secs > 0 and bw > 0 else None
    disk, n = e.get("bytes_on_disk"), e.get("n")
    e["_disk_per_record"] = disk / n if _is_num(disk) and _is_num(n) and n > 0 and disk > 0 else None
    return e


def _ratio(value, best, higher_is_better: bool) -> str:
    if not (_is_num(value) and _is_num(best)) or value <= 0 or best <= 0:
        return DASH
    r = best / value if higher_is_better else value / best
    return f"×{r:.2f}"


# --- sections ---------------------------------------------------------------------------


def header_section(data: dict, input_path: Path) -> list[str]:
    mi = data.get("machine_info") or {}
    q = mi.get("quiver") or {}
    run = data.get("quiver") or {}
    cpu = mi.get("cpu") or {}
    ci = data.get("commit_info") or {}
    mem = q.get("memory_total_bytes")
    libs = q.get("libraries") or {}
    lines = [
        "# Quiver study report",
        "",
        "Generated by `python -m quiver.studies.cli report` from "
        f"`{input_path.name}` alone; every figure below comes from that one run.",
        "",
        f"- **Run date:** {data.get('datetime', DASH)}",
        f"- **Mode:** {q.get('mode', run.get('mode', DASH))}; sizes: {sizes_line(data)}",
        f"- **Command:** `{q.get('command', DASH)}`",
        f"- **pytest command:** `{q.get('pytest_command', DASH)}`",
        f"- **Run time:** {fmt(run.get('elapsed_s'))} s",
        f"- **Machine:** {cpu.get('brand_raw', mi.get('processor') or DASH)}, "
        f"{q.get('cpu_count', cpu.get('count', DASH))} cores, "
        f"{fmt(mem / 2**30) + ' GiB' if _is_num(mem) else DASH} memory, {q.get('platform', mi.get('system', DASH))}",
        f"- **Python:** {mi.get('python_implementation', '')} {mi.get('python_version', q.get('python', DASH))}",
        f"- **Scratch disk:** {q.get('scratch_disk', DASH)} (`{q.get('scratch_dir', DASH)}`)",
        f"- **Libraries:** " + (", ".join(f"{k} {v}" for k, v in libs.items() if v) or DASH),
        f"- **Index backends available:** {', '.join(q.get('index_backends') or []) or DASH}",
        f"- **Commit:** {ci.get('id', DASH)}{' (dirty tree)' if ci.get('dirty') else ''}",
        "",
    ]
    failed = run.get("failed") or []
    if failed:
        lines += ["**Studies that failed in this run (their figures are absent):**", ""]
        lines += [f"- `{f}`" for f in failed] + [""]
    return lines


def sizes_line(data: dict) -> str:
    """The sizes this run used, read back from the results."""
    groups = _groups(data)
    parts = []
    ns = sorted({(b.get("extra_info") or {}).get("n") for g, bs in groups.items() if g.startswith("index-") for b in bs} - {None})
    if ns:
        parts.append("index N = " + ", ".join(f"{n:,}" for n in ns))
    mc = [(b.get("extra_info") or {}).get("requests") for b in groups.get("mooncake", [])]
    if mc and mc[0] is not None:
        parts.append(f"Mooncake requests = {mc[0]:,}")
    pn = sorted({(b.get("extra_info") or {}).get("n") for b in groups.get("product-open", [])} - {None})
    if pn:
        parts.append("BlockStore N = " + ", ".join(f"{n:,}" for n in pn))
    lim = sorted({(b.get("extra_info") or {}).get("bytes") for b in groups.get("limits", [])} - {None})
    if lim:
        parts.append("limits buffers = " + ", ".join(f"{x / 2**20:g} MiB" for x in lim))
    return "; ".join(parts) or "see the tables"


def limits_section(mode: str, benches: list[dict]) -> list[str]:
    rows = []
    for b in benches:
        e = b.get("extra_info") or {}
        rows.append(
            [
                b.get("name", DASH),
                fmt(e.get("what")),
                fmt(e.get("bytes"), "mib"),
                fmt(b.get("stats", {}).get("rounds"), "int"),
                fmt(_ms(e.get("median_s"))),
                fmt(e.get("gb_per_s")),
                fmt(e.get("fsync_p50_us")),
                fmt(e.get("fsync_p99_us")),
            ]
        )
    return (
        ["## Physical limits (group `limits`)", "", "Measured in this run; GB = 1e9 bytes.", ""]
        + table(["test", "what", "MiB/round", "rounds", "median ms", "GB/s", "fsync p50 µs", "fsync p99 µs"], rows)
        + [reproduce_line(mode, benches), ""]
    )


def _ms(s):
    return s * 1e3 if _is_num(s) else None


def _limit(groups: dict, test_name: str):
    for b in groups.get("limits", []):
        if b.get("name") == test_name:
            return (b.get("extra_info") or {}).get("gb_per_s")
    return None


def _index_cells(groups: dict) -> tuple[list[int], list[str], dict]:
    """Sizes, backends, and {(group, backend, n): derived extra_info}."""
    cells, sizes, backends = {}, set(), []
    for g, benches in groups.items():
        if not g.startswith("index-"):
            continue
        for b in benches:
            e = _derived(b)
            name, n = e.get("backend"), e.get("n")
            if name is None or n is None:
                continue
            cells[(g, name, n)] = e
            sizes.add(n)
            if name not in backends:
                backends.append(name)
    return sorted(sizes), backends, cells


def index_sections(mode: str, groups: dict, available: list[str]) -> list[str]:
    sizes, backends, cells = _index_cells(groups)
    if not cells:
        return []
    # every available backend gets a row, so one whose studies failed shows dashes, not nothing
    backends = list(available) + [b for b in backends if b not in available]
    lines = [
        "## Residency indexes",
        "",
        f"Backends: {', '.join(backends)}. Sizes N: {', '.join(f'{n:,}' for n in sizes)} records of a 48-byte key "
        "(16-byte namespace + 32-byte block key, 64 namespaces, from the shared-prefix workload) and a 16-byte value. "
        "`× best` compares the table's first figure with the best backend at the same N (×1.00 = best). "
        "Memory: `stats() memory` is the backend's own estimate; `RSS Δ` is the process RSS after the build minus "
        "before it (after gc + malloc_trim), so it includes C libraries' heaps and mapped pages; the key and value "
        "objects already exist in the dataset, so a backend that keeps references to them (flat, sorted) shows "
        "only its own structure, while one that copies them shows the copies too.",
        "",
    ]
    fsync_64k = _limit(groups, "test_fsync_write[64]")
    fsync_1m = _limit(groups, "test_fsync_write[1024]")
    for g, title, cols, headline, higher in INDEX_GROUPS:
        if g not in groups:
            continue
        lines += [f"### {title} (group `{g}`)", ""]
        rows = []
        for n in sizes:
            vals = [cells.get((g, b, n), {}).get(headline) for b in backends]
            nums = [v for v in vals if _is_num(v) and v > 0]
            best = (max(nums) if higher else min(nums)) if nums else None
            for b in backends:
                e = cells.get((g, b, n))
                if e is None:
                    notes = [DASH] * len(cols)
                    fp = cells.get(("index-footprint", b, n))
                    if g == "index-reopen" and fp is not None and fp.get("persistent") is False:
                        notes = ["n/a (memory-only)"] + ["n/a"] * (len(cols) - 1)
                    rows.append([f"{n:,}", b] + notes + [DASH])
                    continue
                rows.append([f"{n:,}", b] + [fmt(e.get(k), kind) for _, k, kind in cols] + [_ratio(e.get(headline), best, higher)])
        lines += table(["N", "backend"] + [c for c, _, _ in cols] + ["× best"], rows)
        if g == "index-insert":
            lines += [
                "Limit measured in this run: sequential write + fsync "
                f"{fmt(_mb(fsync_64k))} MB/s in 64 KiB writes, {fmt(_mb(fsync_1m))} MB/s in 1 MiB writes "
                "(`written MB/s` = the backend's bytes written / insert time).",
                "",
            ]
        if g == "index-footprint":
            lines += ["Write amplification = bytes written / (records × 64 bytes); memory-only backends write nothing (—).", ""]
        lines += [reproduce_line(mode, groups[g]), ""]
    return lines


def _mb(gb):
    return gb * 1e3 if _is_num(gb) else None


def mooncake_section(mode: str, benches: list[dict], groups: dict) -> list[str]:
    es = [_derived(b) for b in benches]
    totals = [e.get("total_s") for e in es if _is_num(e.get("total_s"))]
    best = min(totals) if totals else None
    ratios = {e.get("hit_ratio") for e in es if e.get("hit_ratio") is not None}
    first = es[0] if es else {}
    rows = [
        [
            fmt(e.get("backend")), fmt(e.get("hit_ratio"), "pct"), fmt(e.get("request_p50_us")), fmt(e.get("request_p99_us")),
            fmt(e.get("request_mean_us")), fmt(e.get("total_s")), fmt(e.get("requests_per_s"), "rate"),
            fmt(e.get("bytes_written"), "mib"), fmt(e.get("bytes_on_disk"), "mib"), _ratio(e.get("total_s"), best, False),
        ]
        for e in es
    ]
    lines = [
        "## Mooncake trace replay (group `mooncake`)",
        "",
        f"The FAST'25 Mooncake trace, {fmt(first.get('requests'), 'int')} requests, "
        f"{fmt(first.get('block_references'), 'int')} block references, {fmt(first.get('distinct_blocks'), 'int')} distinct blocks, "
        "replayed in file order into an empty index: per request `longest_prefix`, then `put_many` of the missing blocks, "
        "then one flush at the end. Latency is per request (both calls).",
        "",
        "Hit ratio (blocks found / blocks referenced): "
        + ("identical across backends, as it must be." if len(ratios) == 1 else "**differs across backends — a bug.**")
        + "",
        "",
    ]
    lines += table(["backend", "hit ratio", "p50 µs", "p99 µs", "mean µs", "total s", "requests/s", "written MiB",
                    "on disk MiB", "× best (total)"], rows)
    fsync = next((b.get("extra_info") or {} for b in groups.get("limits", []) if b.get("name") == "test_fsync_write[64]"), {})
    lines += [
        f"Limit measured in this run: one 64 KiB write + fsync takes {fmt(fsync.get('fsync_p50_us'))} µs at p50, "
        f"{fmt(fsync.get('fsync_p99_us'))} µs at p99; a backend that syncs every put_many pays at least that per request "
        "that inserts.",
        "",
    ]
    return lines + [reproduce_line(mode, benches), "", "![Mooncake per-request latency](plots/mooncake-latency.png)", ""]


def _flatten(e: dict) -> dict:
    out = {}
    for k, v in e.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if not isinstance(v2, (dict, list)):
                    out[f"{k}.{k2}"] = v2
        elif not isinstance(v, list):
            out[k] = v
    return out


def generic_section(mode: str, group: str, benches: list[dict]) -> list[str]:
    keys: OrderedDict[str, None] = OrderedDict()
    flat = [_flatten(b.get("extra_info") or {}) for b in benches]
    for f in flat:
        for k in f:
            keys[k] = None
    rows = []
    for b, f in zip(benches, flat):
        params = b.get("params")
        p = ", ".join(f"{k}={v}" for k, v in params.items()) if isinstance(params, dict) else DASH
        st = b.get("stats") or {}
        rows.append([b.get("name", DASH), p or DASH, fmt(_us(st.get("median"))), fmt(st.get("rounds"), "int")]
                    + [fmt(f.get(k)) for k in keys])
    return (
        [_anchor(group), "", f"## Group `{group}`", "", "Generic table: the benchmark's median time per round and every figure it recorded.", ""]
        + table(["test", "params", "median µs per timed round", "timed rounds"] + list(keys), rows)
        + [reproduce_line(mode, benches), ""]
    )


def _us(s):
    return s * 1e6 if _is_num(s) else None


# --- shared helpers for the dedicated study sections ------------------------------------------


def _ex(b: dict) -> dict:
    return b.get("extra_info") or {}


def _div(a, b):
    """a / b, or None when either is missing or b is 0."""
    if _is_num(a) and _is_num(b) and b != 0:
        return a / b
    return None


def _x(r) -> str:
    """A ratio as "×1.23" (three significant digits below 0.1); "—" when absent."""
    if not _is_num(r):
        return DASH
    return f"×{r:.2f}" if abs(r) >= 0.1 or r == 0 else f"×{r:.2g}"


def _txt(x) -> str:
    """A prose string from the JSON, untruncated; "—" when absent."""
    return DASH if x is None or x == "" else str(x)


def _budget(pct) -> str:
    return f"{pct:g}%" if _is_num(pct) else DASH


def _size(nbytes) -> str:
    """A byte count as KiB / MiB / GiB."""
    if not _is_num(nbytes):
        return DASH
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            v = nbytes / scale
            return f"{v:g} {unit}" if float(v).is_integer() else f"{v:.1f} {unit}"
    return f"{int(nbytes)} B"


def _pct(x) -> str:
    return f"{x:.2f}%" if _is_num(x) else DASH


def _anchor(name: str) -> str:
    return f'<a id="{name}"></a>'


def _section_head(anchor: str, title: str) -> list[str]:
    return [_anchor(anchor), "", f"## {title}", ""]


def _verdict(measured, goal, higher_is_better: bool) -> str:
    """"met" / "**missed by ×N**" for a measured value against a goal constant."""
    if not _is_num(measured) or not _is_num(goal) or measured <= 0 or goal <= 0:
        return DASH
    if higher_is_better:
        return f"met (×{measured / goal:.2f} of the target)" if measured >= goal else f"**missed by ×{goal / measured:.2f}**"
    return f"met (×{goal / measured:.2f} under the target)" if measured <= goal else f"**missed by ×{measured / goal:.2f}**"


def _plot_line(plots: list[tuple[str, str]], name: str) -> list[str]:
    """The image line of plots/<name>, if it was drawn."""
    for title, path in plots:
        if path == f"plots/{name}":
            return [f"![{title}]({path})", ""]
    return []


# --- ART targets (issue 4) ----------------------------------------------------------------------

# Goals, not results: each is compared with figures of this run.
ART_TARGET_N = 1_000_000
ART_TARGETS = [
    # (target text, how it is computed, goal, higher_is_better)
    ("single get p50 ≤ 2 µs", "get_p50", 2.0, False),
    ("get_many ≥ 5 M keys/s", "get_many", 5e6, True),
    ("put_many ≥ 1 M records/s", "put_many", 1e6, True),
    ("≥ 5× RocksDB (lsm) on get_many", "lsm_get_many", 5.0, True),
    ("≥ 5× RocksDB (lsm) on scan_prefix", "lsm_scan", 5.0, True),
    ("≥ 5× RocksDB (lsm) on longest_prefix", "lsm_longest", 5.0, True),
    ("≥ 2× LMDB on get_many", "lmdb_get_many", 2.0, True),
    ("≥ 2× LMDB on longest_prefix", "lmdb_longest", 2.0, True),
    ("no slower than LMDB on single get (p50)", "lmdb_get", 1.0, True),
    ("memory ≤ 2× the raw key + value bytes", "memory", 2.0, False),
]


def art_target_rows(groups: dict) -> tuple[int | None, list[tuple[str, object, str, float, bool]]]:
    """(N used, [(target, measured value, how it was measured, goal, higher_is_better)])."""
    sizes, _backends, cells = _index_cells(groups)
    art_ns = [n for n in sizes if any(k[1] == "art" and k[2] == n for k in cells)]
    if not art_ns:
        return None, []
    n = max(art_ns)

    def v(group, backend, key):
        return cells.get((group, backend, n), {}).get(key)

    get_art, get_lmdb = v("index-get", "art", "p50_us"), v("index-get", "lmdb", "p50_us")
    gm = {b: v("index-get_many", b, "keys_per_s") for b in ("art", "lsm", "lmdb")}
    scan = {b: v("index-scan", b, "p50_us") for b in ("art", "lsm")}
    lp = {b: v("index-longest-prefix", b, "p50_us") for b in ("art", "lsm", "lmdb")}
    mem, raw = v("index-footprint", "art", "memory_bytes"), v("index-footprint", "art", "logical_bytes")
    rows = []
    for text, how, goal, higher in ART_TARGETS:
        if how == "get_p50":
            m, note = get_art, f"{fmt(get_art)} µs"
        elif how == "get_many":
            m, note = gm["art"], f"{fmt(gm['art'], 'rate')} keys/s"
        elif how == "put_many":
            m = v("index-insert", "art", "records_per_s")
            note = f"{fmt(m, 'rate')} records/s (batches of 10,000, flush included)"
        elif how == "lsm_get_many":
            m = _div(gm["art"], gm["lsm"])
            note = f"{_x(m)}: ART {fmt(gm['art'], 'rate')} vs RocksDB {fmt(gm['lsm'], 'rate')} keys/s"
        elif how == "lsm_scan":
            m = _div(scan["lsm"], scan["art"])
            note = f"{_x(m)}: p50 ART {fmt(scan['art'])} vs RocksDB {fmt(scan['lsm'])} µs per namespace scan"
        elif how == "lsm_longest":
            m = _div(lp["lsm"], lp["art"])
            note = f"{_x(m)}: p50 ART {fmt(lp['art'])} vs RocksDB {fmt(lp['lsm'])} µs per chain"
        elif how == "lmdb_get_many":
            m = _div(gm["art"], gm["lmdb"])
            note = f"{_x(m)}: ART {fmt(gm['art'], 'rate')} vs LMDB {fmt(gm['lmdb'], 'rate')} keys/s"
        elif how == "lmdb_longest":
            m = _div(lp["lmdb"], lp["art"])
            note = f"{_x(m)}: p50 ART {fmt(lp['art'])} vs LMDB {fmt(lp['lmdb'])} µs per chain"
        elif how == "lmdb_get":
            m = _div(get_lmdb, get_art)
            note = f"{_x(m)}: p50 ART {fmt(get_art)} vs LMDB {fmt(get_lmdb)} µs"
        else:  # memory
            m = _div(mem, raw)
            note = (f"{_x(m)}: stats() memory {fmt(mem, 'mib')} MiB after the bulk insert / raw {fmt(raw, 'mib')} MiB "
                    "(`index-footprint`)")
            reopened = next((_ex(r).get("memory_over_raw_reopened") for r in groups.get("art-reopen", [])
                             if _ex(r).get("n") == n), None)
            if _is_num(reopened):
                note += f"; after snapshot + reopen {_x(reopened)} (`art-reopen`)"
        rows.append((text, m, note, goal, higher))
    return n, rows


def art_section(mode: str, groups: dict, plots) -> list[str]:
    n, rows = art_target_rows(groups)
    lines = _section_head("art-targets", "ART targets (issue 4; groups `art-compile`, `art-reopen` and the index groups)")
    if n is None:
        lines += [f"No `art` results in the index groups of this run: every target is {DASH}.", ""]
    else:
        scale = "" if n == ART_TARGET_N else (
            f" **The targets are set for N = {ART_TARGET_N:,}; this run's largest N is {n:,}, so the comparison is "
            "indicative only.**")
        lines += [
            f"Measured at N = {n:,} records (the largest N of this run), 48-byte keys, 16-byte values, in the index "
            f"groups above; the goals are constants, every measured figure and ratio is from this run.{scale}",
            "",
        ]
        body = [[text, note, _verdict(m, goal, higher)] for text, m, note, goal, higher in rows]
        lines += table(["target", "measured", "met / missed"], body)
        if any(_is_num(m) and ((m < goal) if higher else (m > goal)) for _t, m, _n, goal, higher in rows):
            lines += ["Why the misses: see [docs/ART.md, “Targets” → “Why the misses”](../docs/ART.md#targets).", ""]
        idx_groups = {g: groups[g] for g in ("index-get", "index-get_many", "index-insert", "index-scan",
                                                 "index-longest-prefix", "index-footprint") if g in groups}
        lines += [reproduce_line(mode, [b for bs in idx_groups.values() for b in bs]), ""]
        _s, _b, cells = _index_cells(groups)
        ro = cells.get(("index-reopen", "art", n), {})
        lm = cells.get(("index-reopen", "lmdb", n), {})
        lines += [f"Reopen at N = {n:,} (`index-reopen`: close, open, len): ART {fmt(ro.get('_median_ms'))} ms, "
                  f"LMDB {fmt(lm.get('_median_ms'))} ms.", ""]
    comp = {(_ex(b).get("case")): b for b in groups.get("art-compile", [])}
    if comp:
        lines += ["### Numba compile: cold (empty cache) vs warm (cache loaded) (group `art-compile`)", "",
                  "A fresh Python process calls every ArtIndex operation once (`ops` = all) or only the get kernel "
                  "(`ops` = minimal, smoke mode).", ""]
        crow = []
        for case in ("cold", "warm"):
            e = _ex(comp[case]) if case in comp else {}
            crow.append([case, fmt(e.get("ops")), fmt(e.get("import_s")), fmt(e.get("first_calls_s")),
                         fmt(e.get("total_s"))])
        cold, warm = _ex(comp.get("cold", {})), _ex(comp.get("warm", {}))
        lines += table(["cache", "ops", "import s", "first calls s", "process total s"], crow)
        lines += [f"First calls, cold / warm: {_x(_div(cold.get('first_calls_s'), warm.get('first_calls_s')))}.", "",
                  reproduce_line(mode, groups["art-compile"]), ""]
    reo = groups.get("art-reopen", [])
    if reo:
        lines += ["### Snapshot and reopen (group `art-reopen`)", ""]
        rrow = []
        for b in reo:
            e = _ex(b)
            rrow.append([fmt(e.get("n"), "int"), fmt(e.get("snapshot_bytes"), "mib"), fmt(e.get("snapshot_bytes_per_record")),
                         fmt(_ms(e.get("snapshot_s"))), fmt(_ms((b.get("stats") or {}).get("median"))),
                         _x(e.get("memory_over_raw_built")), _x(e.get("memory_over_raw_reopened"))])
        lines += table(["N", "snapshot MiB", "snapshot B/record", "snapshot ms", "reopen (open + len) ms",
                        "memory / raw, built", "memory / raw, reopened"], rrow)
        lines += [reproduce_line(mode, reo), ""]
    return lines


# --- keys ---------------------------------------------------------------------------------------


def keys_section(mode: str, benches: list[dict]) -> list[str]:
    rows = []
    for b in benches:
        e = _ex(b)
        rows.append([fmt(e.get("tokens"), "int"), fmt(e.get("blocks"), "int"), fmt(e.get("input")),
                     "keyed (tenant secret)" if e.get("keyed") else "unkeyed", fmt(e.get("ms_per_prompt")),
                     fmt(e.get("ns_per_block"))])
    return (_section_head("keys", "Keying a prompt: `chain_keys` (group `keys`)")
            + ["One BLAKE3 call per 16-token block; the median of the benchmark's rounds.", ""]
            + table(["prompt tokens", "blocks", "input", "mode", "ms per prompt", "ns per block"], rows)
            + [reproduce_line(mode, benches), ""])


# --- walpub -------------------------------------------------------------------------------------


def walpub_section(mode: str, groups: dict, plots) -> list[str]:
    lines = _section_head("walpub", "walpub: durable publish, write amplification, recovery, crash campaign")
    pub = groups.get("walpub-publish", [])
    if pub:
        base = next((_ex(b) for b in pub if _ex(b).get("store") == "fsync'd sequential write"), {})
        base_mb = base.get("mb_per_s")
        lines += [
            "### Publish throughput (group `walpub-publish`)", "",
            "`publish` of one block is durable on return. `disk MB/s` is the fsync'd sequential write bandwidth "
            "(1 MiB write + fsync into one file, same directory) measured right before each case, and `× disk` the "
            f"publish MB/s over it; `× baseline` compares with the longer baseline run of the same write pattern "
            f"({fmt(base_mb)} MB/s, {_size(base.get('payload_bytes'))}). 1 MB = 1e6 bytes. `fsyncs/block warm` "
            "leaves out the first-use fsyncs of the 256 `objects/ab/` directories of a fresh volume.", "",
        ]
        rows = []
        cases = sorted((b for b in pub if _ex(b).get("store") == "walpub"),
                       key=lambda b: (_ex(b).get("block_bytes") or 0, _ex(b).get("threads") or 0))
        for b in cases:
            e = _ex(b)
            rows.append([_size(e.get("block_bytes")), fmt(e.get("threads"), "int"), fmt(e.get("blocks"), "int"),
                         fmt(e.get("blocks_per_s"), "rate"), fmt(e.get("mb_per_s")), fmt(e.get("disk_mb_per_s")),
                         _x(e.get("ratio_to_disk")), _x(_div(e.get("mb_per_s"), base_mb)),
                         fmt(e.get("fsyncs_per_block")), fmt(e.get("fsyncs_per_block_warm")),
                         fmt(e.get("wal_fsyncs_per_block")), fmt(e.get("commits"), "int")])
        lines += table(["block", "threads", "blocks", "blocks/s", "MB/s", "disk MB/s", "× disk", "× baseline",
                        "fsyncs/block", "fsyncs/block warm", "WAL fsyncs/block", "group commits"], rows)
        lines += [reproduce_line(mode, pub), ""] + _plot_line(plots, "walpub-publish.png")
    amp = groups.get("walpub-amplification", [])
    if amp:
        by = {}
        for b in amp:
            e = _ex(b)
            by.setdefault(e.get("block_bytes"), {})[e.get("store")] = e
        rows = []
        for size in sorted(k for k in by if k is not None):
            w, r = by[size].get("walpub", {}), by[size].get("rocksdb", {})
            rows.append([_size(size), fmt(w.get("blocks", r.get("blocks")), "int"),
                         fmt(w.get("write_amplification")), fmt(r.get("write_amplification")),
                         _x(_div(r.get("write_amplification"), w.get("write_amplification"))),
                         fmt(w.get("disk_bytes_per_payload_byte")), fmt(r.get("disk_bytes_per_payload_byte")),
                         fmt(w.get("mb_per_s")), fmt(r.get("mb_per_s"))])
        lines += [
            "### Write amplification: walpub vs RocksDB (group `walpub-amplification`)", "",
            "The same random blocks, one per call, durable on return in both stores (walpub `publish`; RocksDB "
            "`put` with `WriteOptions.sync`, then a memtable flush). Written = `/proc/self/io` write_bytes per "
            "payload byte (page-granular: a re-dirtied 4 KiB page counts each time); on disk = file bytes left per "
            "payload byte.", "",
        ]
        lines += table(["block", "blocks", "walpub written/payload", "RocksDB written/payload", "RocksDB ÷ walpub",
                        "walpub on disk/payload", "RocksDB on disk/payload", "walpub MB/s", "RocksDB MB/s"], rows)
        lines += [reproduce_line(mode, amp), ""]
    rec = groups.get("walpub-recovery", [])
    if rec:
        rows = []
        for b in rec:
            e = _ex(b)
            rows.append([fmt(e.get("base_blocks"), "int"), fmt(e.get("backend")), fmt(e.get("verify")),
                         fmt(e.get("blocks"), "int"), fmt(_ms(e.get("recovery_s"))), fmt(e.get("blocks_per_s"), "rate"),
                         fmt(e.get("index_mode")), fmt(e.get("tail_blocks"), "int"), fmt(e.get("segments"), "int"),
                         fmt(e.get("truncated"), "int"), fmt(e.get("orphans_removed"), "int")])
        lines += [
            "### Recovery after SIGKILL (group `walpub-recovery`)", "",
            "`Volume.open` after a child published a tail of blocks and SIGKILLed itself; page cache warm. "
            "`verify` crc reads every object, size only stats it. The base volume is shared by the rows in turn, "
            "so `live blocks` grows by the tail per row.", "",
        ]
        lines += table(["base blocks", "index backend", "verify", "live blocks", "recovery ms", "blocks/s",
                        "index mode", "tail blocks", "WAL segments", "truncated", "orphans removed"], rows)
        lines += [reproduce_line(mode, rec), ""]
    camp = groups.get("walpub-campaign", [])
    if camp:
        lines += campaign_lines(camp) + [reproduce_line(mode, camp), ""]
    return lines


def campaign_totals(camp: list[dict]) -> dict:
    """Crash states, kills, flips and violations summed over the campaign's parts (None when a part is absent)."""
    states = kills = flips = None
    violations = 0
    seen = False
    for b in camp:
        e = _ex(b)
        if _is_num(e.get("distinct_states")):
            states = e["distinct_states"]
        if _is_num(e.get("kills")):
            kills = e["kills"]
        if _is_num(e.get("flips")):
            flips = e["flips"]
        if _is_num(e.get("violations")):
            violations += e["violations"]
            seen = True
    return {"states": states, "kills": kills, "flips": flips, "violations": violations if seen else None}


def campaign_lines(camp: list[dict]) -> list[str]:
    parts = {}
    for b in camp:
        name = b.get("name", "")
        key = "states" if "crash_states" in name else "kills" if "sigkill" in name else "flips" if "bitflip" in name else name
        parts[key] = _ex(b)
    s, k, f = parts.get("states", {}), parts.get("kills", {}), parts.get("flips", {})
    rows = [
        ["crash states (walpub.crashsim)", fmt(s.get("distinct_states"), "int"),
         f"{fmt(s.get('states_explored'), 'int')} explored, {fmt(s.get('checked'), 'int')} checked, "
         f"{fmt(s.get('recovery_crash_states'), 'int')} inside recovery, {fmt(s.get('crash_points'), 'int')} crash points, "
         f"{fmt(s.get('workloads'), 'int')} workloads", fmt(s.get("seconds")), fmt(s.get("violations"), "int")],
        ["SIGKILL (real processes)", fmt(k.get("kills"), "int"),
         f"per backend {fmt(k.get('kills_per_backend'))}; {fmt(k.get('random_kills'), 'int')} random, "
         f"{fmt(k.get('crash_point_kills'), 'int')} at {fmt(k.get('crash_points_hit'), 'int')} crash points, "
         f"{fmt(k.get('recovery_kills'), 'int')} inside recovery; {fmt(k.get('torn_tails'), 'int')} torn tails; "
         f"{fmt(k.get('acked_blocks'), 'int')} acked blocks and {fmt(k.get('acked_deletes'), 'int')} acked deletes "
         f"checked over {fmt(k.get('recoveries_checked'), 'int')} recoveries", fmt(k.get("seconds")),
         fmt(k.get("violations"), "int")],
        ["bit flips (real files)", fmt(f.get("flips"), "int"),
         f"{fmt(f.get('object_flips'), 'int')} in objects ({fmt(f.get('object_detected_at_recovery'), 'int')} caught "
         f"at recovery, {fmt(f.get('object_detected_at_read'), 'int')} at read); {fmt(f.get('wal_flips'), 'int')} in "
         f"the WAL ({fmt(f.get('wal_cut_lost_records'), 'int')} cut the log losing records, "
         f"{fmt(f.get('wal_cut_no_loss'), 'int')} cut without loss, {fmt(f.get('undetected_no_effect'), 'int')} no "
         f"observable effect); wrong bytes served {fmt(f.get('wrong_bytes_served'), 'int')}",
         fmt(f.get("seconds")), fmt(f.get("violations"), "int")],
    ]
    t = campaign_totals(camp)
    return (["### Crash campaign (group `walpub-campaign`)", "",
             "Every recovered state is checked against the model: an acknowledged block is readable and exact, "
             "nothing unacknowledged is served as data. Violations must be 0.", ""]
            + table(["part", "count", "detail", "seconds", "violations"], rows)
            + [f"Totals: {fmt(t['states'], 'int')} distinct crash states, {fmt(t['kills'], 'int')} SIGKILLs, "
               f"{fmt(t['flips'], 'int')} bit flips, **{fmt(t['violations'], 'int')} violations**.", ""])


# --- fault study (issue 13) -----------------------------------------------------------------------

FAULT_GROUPS = ["faults-index", "faults-wal", "faults-enospc", "faults-l2"]
# Goals, not results (issue 13, "A fault study in the report").
FAULT_WAL_GOAL_BLOCKS = 1        # acknowledged blocks lost per WAL flip: the records in the damaged frame
FAULT_L2_LOOKUP_GOAL_MS = 50.0   # a lookup while L2 is down and the breaker is open


def _zero(v) -> str:
    """A count whose goal is 0: the count with its verdict."""
    if not _is_num(v):
        return DASH
    return f"{fmt(v, 'int')} (met)" if v == 0 else f"**{fmt(v, 'int')} (missed)**"


def _at_most(v, goal) -> str:
    if not _is_num(v):
        return DASH
    return f"{fmt(v)} (met)" if v <= goal else f"**{fmt(v)} (missed: goal ≤ {goal:g})**"


def _ok(v) -> str:
    if v is None:
        return DASH
    return "yes (met)" if v else "**no (missed)**"


def _flip_stats(groups: dict) -> dict:
    """The walpub campaign's bit-flip part (FlipStats), or {}."""
    return next((_ex(b) for b in groups.get("walpub-campaign", []) if "bitflip" in b.get("name", "")), {})


def _index_missed(e: dict) -> int:
    return sum(e.get(k) or 0 for k in ("lost", "wrong", "open_failed", "died"))


def _l2_rows(groups: dict) -> dict:
    return {(_ex(b).get("onset"), _ex(b).get("breaker")): _ex(b) for b in groups.get("faults-l2", [])}


def _s(x) -> str:
    """Seconds as "N ms" below a second, "N s" above."""
    if not _is_num(x):
        return DASH
    return f"{fmt(x * 1e3)} ms" if x < 1 else f"{fmt(x)} s"


def _err_short(msg) -> str:
    """An error line as its class and, when there is one, its errno text."""
    if not msg:
        return DASH
    m = re.search(r"\[Errno \d+\][^:;\n]*", str(msg))
    name = str(msg).split(":", 1)[0]
    return f"{name} ({m.group(0).strip()})" if m else str(msg)[:80]


def faults_section(mode: str, groups: dict) -> list[str]:
    lines = _section_head("faults", "Fault study: damaged index, WAL flips, full disks, a hung L2 (issue 13)")
    lines += [
        "Faults beyond crashes, through `BlockStore` only (studies/bench_faults.py). Every goal is a constant "
        "from the issue, shown beside the figure with its verdict; the crash campaign (walpub section) is the "
        "crash-consistency check.", "",
    ]
    idx = groups.get("faults-index", [])
    if idx:
        rows = []
        for b in idx:
            e = _ex(b)
            kinds = e.get("by_kind") or {}
            detail = "; ".join(
                f"{k} {fmt(v.get('trials'), 'int')}: lost {fmt(v.get('lost'), 'int')}, failed opens "
                f"{fmt(v.get('open_failed'), 'int')}, index discarded at open {fmt(v.get('index_reset'), 'int')}"
                for k, v in sorted(kinds.items()) if isinstance(v, dict))
            rows.append([fmt(e.get("backend")), fmt(e.get("trials"), "int"), fmt(e.get("blocks"), "int"),
                         _zero(e.get("lost")), _zero(e.get("wrong")), _zero(e.get("open_failed")),
                         _zero(e.get("died")), fmt(e.get("index_reset"), "int"), fmt(e.get("index_repairs"), "int"),
                         detail or DASH, fmt(e.get("seconds"))])
        lines += [
            "### Index corruption campaign (group `faults-index`)", "",
            "One closed store per backend; each trial damages its index files in a copy (a single-bit flip at a "
            "random offset of a random index file, a truncation at a random length, or the deletion of a file), "
            "then a checker process opens the store and gets every block. `lost` counts blocks that were not "
            "themselves damaged (only the index was) and no longer come back. Goals: 0 blocks lost, 0 wrong bytes, "
            "0 failed opens, 0 checker processes killed by a signal.", "",
        ]
        lines += table(["backend", "trials", "blocks per trial", "blocks lost (goal 0)", "wrong bytes (goal 0)",
                        "failed opens (goal 0)", "deaths (goal 0)", "index discarded at open", "index rebuilt while open",
                        "by damage kind", "seconds"], rows)
        ex = [f"- {_ex(b).get('backend')}: {x}" for b in idx for x in (_ex(b).get("examples") or [])]
        if ex:
            lines += ["Errors seen (first per trial, up to 5 per backend):", ""] + ex + [""]
        lines += [reproduce_line(mode, idx), ""]
    wal = groups.get("faults-wal", [])
    fs = _flip_stats(groups)
    if wal or fs:
        rows = []
        for b in wal:
            e = _ex(b)
            rows.append([f"BlockStore ({fmt(e.get('backend'))} index deleted: the whole log replayed)",
                         fmt(e.get("flips"), "int"), fmt(e.get("blocks"), "int"),
                         _at_most(e.get("max_lost_per_flip"), FAULT_WAL_GOAL_BLOCKS), fmt(e.get("lost"), "int"),
                         fmt(e.get("flips_with_loss"), "int"), _zero(e.get("wrong")), _zero(e.get("open_failed")),
                         fmt(e.get("adopted"), "int")])
        if fs:
            rows.append(["walpub volume (group `walpub-campaign`, bit-flip part)", fmt(fs.get("wal_flips"), "int"),
                         DASH, _at_most(fs.get("max_blocks_lost_per_flip"), FAULT_WAL_GOAL_BLOCKS),
                         fmt(fs.get("acked_blocks_lost"), "int"), fmt(fs.get("wal_cut_lost_records"), "int"),
                         _zero(fs.get("wrong_bytes_served")), DASH, DASH])
        lines += [
            "### WAL bit flips (group `faults-wal`)", "",
            "Each trial flips one random bit of the L1 WAL of a closed store, reopens it and gets every "
            f"acknowledged block. Goal: acknowledged blocks lost per flip ≤ {FAULT_WAL_GOAL_BLOCKS} (the records in "
            "the damaged frame); with adoption (an object whose envelope verifies and names its key is kept) "
            "usually 0. The walpub crash campaign's own WAL flips (on the volume, below the store) are quoted "
            "beside it.", "",
        ]
        lines += table(["where", "WAL flips", "blocks", "max blocks lost per flip", "blocks lost in all",
                        "flips that lost blocks", "wrong bytes (goal 0)", "failed opens (goal 0)", "adopted"], rows)
        lines += [reproduce_line(mode, wal), ""] if wal else []
    en = groups.get("faults-enospc", [])
    if en:
        rows = []
        for b in sorted(en, key=lambda b: (_ex(b).get("disk_bytes") or 0, str(_ex(b).get("budget")))):
            e = _ex(b)
            budget = ("default (½ of free + held: " + _size(e.get("l1_capacity")) + ")" if e.get("budget") == "default"
                      else f"{_size(e.get('budget_bytes'))} (4× the disk)")
            if e.get("skipped"):
                rows.append([_size(e.get("disk_bytes")), budget] + [DASH] * 9 + [f"skipped: {e['skipped']}"])
                continue
            refused = (f"put {fmt(e.get('refused_at'), 'int')}: {_err_short(e.get('first_error'))}"
                       if e.get("refused_at") is not None else "never")
            reads = (f"{fmt(e.get('reads_after_enospc'), 'int')} of {fmt(e.get('acked'), 'int')} "
                     f"({fmt(e.get('read_errors_after_enospc'), 'int')} failed)" if e.get("refused_at") is not None
                     else DASH)
            small = (f"{_ok(e.get('small_reopen_ok'))}; freed {_size(e.get('freed_bytes'))} "
                     f"({_size(e.get('used_before'))} → {_size(e.get('used_after_small_open'))} used); new put "
                     f"{'ok' if e.get('small_put_ok') else '**failed**'}")
            reopen = e.get("reopen_ok") and e.get("final_reopen_ok")
            closes = ", ".join(e.get("close_errors") or []) or "none"
            names = e.get("typed_error_names") or {}
            typed = f"{fmt(e.get('typed_errors'), 'int')}" + (
                f" ({', '.join(f'{k} {v}' for k, v in sorted(names.items()))})" if names else "")
            missed = [what for what, bad in (
                ("untyped errors", (e.get("untyped_errors") or 0) > 0), ("acked blocks lost", (e.get("lost") or 0) > 0),
                ("wrong bytes", (e.get("wrong") or 0) > 0), ("a reopen failed", not reopen),
                ("the smaller-budget reopen", not (e.get("small_reopen_ok") and e.get("small_put_ok"))))
                if bad]
            rows.append([_size(e.get("disk_bytes")), budget,
                         f"{fmt(e.get('acked'), 'int')} of {fmt(e.get('offered'), 'int')}", refused, typed,
                         _zero(e.get("untyped_errors")), _zero(e.get("lost")) + f"; {fmt(e.get('evicted'), 'int')} evicted",
                         _zero(e.get("wrong")), reads, _ok(reopen) + f"; close errors: {closes}", small,
                         "met" if not missed else "**missed: " + ", ".join(missed) + "**"])
        e0 = _ex(en[0])
        lines += [
            "### Full disk (group `faults-enospc`)", "",
            "A real tmpfs of each size, mounted by the study (no injected fault). One store (default index) is "
            f"sent distinct {_size(e0.get('block_bytes'))} blocks, one per put, until a put is refused or 2× (default "
            "budget) / 4× (explicit budget) the disk was offered; three more puts follow a refusal. Then, in the "
            "same process: a reopen with the same budget (the lock was released) reads every acknowledged block, "
            "and a reopen with a quarter-disk budget must free space and take a new put. `lost` = acknowledged "
            "blocks not readable after the reopen, less the blocks the budget evicted. Goals: 0 untyped errors, 0 "
            "acknowledged blocks lost, 0 wrong bytes, every reopen succeeds.", "",
        ]
        lines += table(["disk", "L1 budget", "puts acked", "first refusal", "typed errors", "untyped (goal 0)",
                        "acked lost (goal 0)", "wrong bytes (goal 0)", "reads served after the refusal",
                        "reopen, same process", "reopen with ¼-disk budget", "verdict"], rows)
        lines += [reproduce_line(mode, en), ""]
    l2 = groups.get("faults-l2", [])
    if l2:
        cells = _l2_rows(groups)
        rows = []
        for onset in ("at-open", "after-open"):
            for br in ("default", "off"):
                e = cells.get((onset, br))
                if e is None:
                    continue
                label = [onset, "default (3 failed tries)" if br == "default" else "off (failures=10⁹)"]
                if e.get("skipped"):
                    rows.append(label + [DASH] * 7 + [f"skipped: {e['skipped']}"])
                    continue
                look = (f"{fmt(e.get('lookup_down_ms'))} ms (max {fmt(e.get('lookup_down_max_ms'))}; "
                        f"without L2 {fmt(e.get('lookup_no_l2_ms'))} ms)")
                if any(st != "closed" for st in e.get("lookup_breaker_state") or []):
                    look_v = _verdict(e.get("lookup_down_ms"), FAULT_L2_LOOKUP_GOAL_MS, False)
                else:
                    look_v = "the breaker never opened: no goal, for comparison"
                first = f"{fmt(e.get('lookup_first_ms'))} ms; {fmt(e.get('lookups_waiting'), 'int')} of " \
                        f"{fmt(len(e.get('lookup_ms') or []), 'int')} waited > {FAULT_L2_LOOKUP_GOAL_MS:g} ms"
                put = f"{_s(e.get('put_s'))} ({e.get('put_error') or 'stored'}; L1 kept: " \
                      f"{'yes' if e.get('put_l1_kept') else 'no'})"
                flush = f"{_s(e.get('flush_s'))} ({fmt(e.get('flush_owed'), 'int')} owed)"
                how = ("L2 attached" if e.get("attached_at_open")
                       else f"L2 unattached, breaker {e.get('breaker_after_open')}")
                rows.append(label + [
                    f"{_s(e.get('open_s'))}: {'opened' if e.get('open_ok') else '**failed**'} ({how})",
                    first, f"{look}: {look_v}", put, flush, _s(e.get("close_s")),
                    f"{fmt(e.get('requests_dropped'), 'int')}", _ok(e.get("open_ok"))])
        e0 = next((_ex(b) for b in l2 if not _ex(b).get("skipped")), {})
        r = e0.get("retry") or {}
        lines += [
            "### L2 hung: accepts connections, never answers (group `faults-l2`)", "",
            "The endpoint is a listening socket written in the study (`SilentServer`): it accepts and reads, and "
            "never answers. `at-open`: silent from the start. `after-open`: it forwards to a real moto server "
            "while the store opens and stores a block (L2 attached), then goes silent. Breaker `default` = "
            "`BreakerPolicy()` (opens after 3 consecutive failed tries); `off` = `BreakerPolicy(failures=10⁹)`, "
            "which never opens on failures — but open's own L2 check trips the breaker whatever `failures` says, "
            "so the at-open rows are alike and the after-open rows show the difference. Every row: "
            f"`RetryPolicy(max_tries={fmt(r.get('max_tries'))}, total_s={fmt(r.get('total_s'))}, "
            f"connect_timeout_s={fmt(r.get('connect_timeout_s'))}, read_timeout_s={fmt(r.get('read_timeout_s'))})`, "
            f"lookups bounded by the store's own {fmt(e0.get('lookup_budget_s'))} s L2 budget; `flush_l2(timeout_s="
            f"{fmt(e0.get('budget_s'))})`, `close(l2_timeout_s={fmt(e0.get('budget_s'))})`. Each lookup is of an "
            "unknown prompt (an L1 miss, so it asks L2). `while down` = median over lookups that began with the "
            "breaker open (all lookups where it never opened). Goals: open succeeds; a lookup adds ≤ "
            f"{FAULT_L2_LOOKUP_GOAL_MS:g} ms while L2 is down (breaker open).", "",
        ]
        lines += table(["L2 goes silent", "breaker", "open", "first lookup", "lookup while down (goal ≤ 50 ms)",
                        "sync put", "flush_l2(2 s)", "close(2 s)", "requests left unanswered", "open succeeds"], rows)
        lines += [reproduce_line(mode, l2), ""]
    return lines


def faults_headline_rows(groups: dict) -> list[list[str]]:
    link = "[faults](#faults)"
    rows = []
    idx = [_ex(b) for b in groups.get("faults-index", [])]
    if idx:
        parts = [f"{e.get('backend')} {fmt(e.get('lost'), 'int')}" for e in idx]
        bad = sum(_index_missed(e) for e in idx)
        rows.append(["Blocks lost to index damage (goal 0; wrong bytes and failed opens 0 too)",
                     "; ".join(parts) + (": met" if bad == 0 else f": **missed** ({bad} lost/wrong/failed/died)"),
                     f"{fmt(sum(e.get('trials') or 0 for e in idx), 'int')} trials (flips, truncations, deletions of "
                     f"index files) over {len(idx)} backends", link])
    else:
        rows.append(["Blocks lost to index damage", _absent("faults-index"), DASH, link])
    wal = [_ex(b) for b in groups.get("faults-wal", [])]
    fs = _flip_stats(groups)
    if wal or fs:
        parts = []
        vals = []
        for e in wal:
            parts.append(f"store {fmt(e.get('max_lost_per_flip'), 'int')} ({fmt(e.get('flips'), 'int')} flips)")
            vals.append(e.get("max_lost_per_flip"))
        if fs:
            parts.append(f"walpub campaign {fmt(fs.get('max_blocks_lost_per_flip'), 'int')} "
                         f"({fmt(fs.get('wal_flips'), 'int')} WAL flips)")
            vals.append(fs.get("max_blocks_lost_per_flip"))
        nums = [v for v in vals if _is_num(v)]
        verdict = DASH if not nums else ("met" if max(nums) <= FAULT_WAL_GOAL_BLOCKS else "**missed**")
        rows.append([f"Max acknowledged blocks lost per WAL flip (goal ≤ {FAULT_WAL_GOAL_BLOCKS}, the records in the "
                     "damaged frame)", "; ".join(parts) + f": {verdict}", "one random bit per trial", link])
    else:
        rows.append(["Max blocks lost per WAL flip", _absent("faults-wal"), DASH, link])
    cells = _l2_rows(groups)
    d = cells.get(("after-open", "default")) or {}
    if d.get("skipped") or not d:
        d = cells.get(("at-open", "default")) or {}
    off = cells.get(("after-open", "off")) or {}
    at_open = cells.get(("at-open", "default")) or {}
    if d and not d.get("skipped"):
        cmp = (f"; {fmt(off.get('lookup_down_ms'))} ms each with the breaker off"
               if off and not off.get("skipped") else "")
        opened = (f"; open against a silent L2 {_s(at_open.get('open_s'))} "
                  f"({'opened: met' if at_open.get('open_ok') else '**failed: missed**'})"
                  if at_open and not at_open.get("skipped") else "")
        rows.append([f"lookup while L2 hangs, breaker open (goal ≤ {FAULT_L2_LOOKUP_GOAL_MS:g} ms); open must not fail",
                     f"{fmt(d.get('lookup_down_ms'))} ms: {_verdict(d.get('lookup_down_ms'), FAULT_L2_LOOKUP_GOAL_MS, False)}"
                     f"{cmp}{opened}",
                     f"L2 silent {d.get('onset')}, lookup of an unknown prompt", link])
    else:
        rows.append(["lookup while L2 hangs", _absent("faults-l2"), DASH, link])
    return rows


# --- tiers --------------------------------------------------------------------------------------


def tiers_section(mode: str, groups: dict, plots) -> list[str]:
    lines = _section_head("tiers", "Tiers: L0 RAM + L1 disk on the Mooncake trace; restore latency")
    mc = groups.get("tiers-mooncake", [])
    if mc:
        first = _ex(mc[0])
        lru = {(_ex(b).get("l0_budget_pct"), _ex(b).get("l1_budget_pct")): _ex(b) for b in mc
               if _ex(b).get("policy") == "lru"}
        rows = []
        order = sorted(mc, key=lambda b: (_ex(b).get("l1_budget_pct") or 0, _ex(b).get("l0_budget_pct") or 0,
                                          str(_ex(b).get("policy"))))
        for b in order:
            e = _ex(b)
            hit = None
            if _is_num(e.get("l0_hit_ratio")) and _is_num(e.get("l1_hit_ratio")):
                hit = e["l0_hit_ratio"] + e["l1_hit_ratio"]
            vs = DASH
            ref = lru.get((e.get("l0_budget_pct"), e.get("l1_budget_pct")))
            if e.get("policy") != "lru" and ref and _is_num(ref.get("l0_hit_ratio")) and _is_num(e.get("l0_hit_ratio")):
                vs = f"{100 * (e['l0_hit_ratio'] - ref['l0_hit_ratio']):+.2f} pp"
            rows.append([_budget(e.get("l1_budget_pct")), _budget(e.get("l0_budget_pct")), fmt(e.get("policy")),
                         fmt(e.get("l0_hit_ratio"), "pct"), vs, fmt(e.get("l1_hit_ratio"), "pct"), fmt(hit, "pct"),
                         fmt(e.get("miss_ratio"), "pct"), fmt(e.get("bytes_into_l0"), "mib"),
                         fmt(e.get("bytes_into_l1"), "mib"), fmt(e.get("bytes_promoted_l1_to_l0"), "mib"),
                         fmt(e.get("l0_evictions"), "int"), fmt(e.get("l1_evictions"), "int"),
                         fmt(e.get("replay_s"))])
        lines += [
            "### Hit ratio per tier and bytes moved (group `tiers-mooncake`)", "",
            f"The Mooncake trace, {fmt(first.get('requests'), 'int')} requests in file order, "
            f"{fmt(first.get('block_references'), 'int')} block references, {fmt(first.get('distinct_blocks'), 'int')} "
            f"distinct blocks of {_size(first.get('payload_bytes'))}, through a real RamTier (L0) and DiskTier (L1). "
            "Budgets are shares of the distinct-block bytes; L1 is always LRU. Ratios are per block reference. "
            f"L1 ran on `{fmt(first.get('l1_medium'))}`, so `replay s` is not a disk figure.", "",
        ]
        lines += table(["L1 budget", "L0 budget", "L0 policy", "L0 hit", "L0 hit vs LRU", "L1 hit", "L0+L1 hit",
                        "miss", "into L0 MiB", "into L1 MiB", "promoted L1→L0 MiB", "L0 evictions", "L1 evictions",
                        "replay s"], rows)
        lines += [reproduce_line(mode, mc), ""]
    rs = groups.get("tiers-restore", [])
    if rs:
        memcpy = {_ex(b).get("payload_bytes"): _ex(b).get("p50_us") for b in rs if _ex(b).get("tier") == "memcpy"}
        tier_order = ["memcpy", "l0", "l1-warm", "l1-cold", "l2-warm", "l2-cold"]
        rows = []
        order = sorted(rs, key=lambda b: (_ex(b).get("payload_bytes") or 0,
                                          tier_order.index(_ex(b).get("tier")) if _ex(b).get("tier") in tier_order else 99))
        for b in order:
            e = _ex(b)
            rows.append([_size(e.get("payload_bytes")), fmt(e.get("tier")), fmt(e.get("calls"), "int"),
                         fmt(e.get("p50_us")), fmt(e.get("p99_us")), fmt(e.get("mean_us")),
                         fmt(e.get("mb_per_s_at_p50")), _x(_div(e.get("p50_us"), memcpy.get(e.get("payload_bytes"))))])
        lines += [
            "### Restore latency of one block per tier (group `tiers-restore`)", "",
            "L0 = `get_into` a host buffer; L1 = walpub read + CRC32C; L2 = local-directory object store read + "
            "CRC32C; cold drops the file's pages first (outside the timing). `× memcpy` = p50 over the p50 of a plain "
            "memcpy of the same size in the same run.", "",
        ]
        lines += table(["block", "tier", "samples", "p50 µs", "p99 µs", "mean µs", "MB/s at p50", "× memcpy p50"], rows)
        lines += [reproduce_line(mode, rs), ""]
    return lines


# --- identity -----------------------------------------------------------------------------------

GUARD_OVERHEAD_GOAL_PCT = 1.0
TTFT_STORE_SHARE_GOAL_PCT = 10.0


def identity_section(mode: str, benches: list[dict]) -> list[str]:
    lines = _section_head("identity", "Identity safety: cross-identity bytes and the guard's cost (group `identity`)")
    coll = {_ex(b).get("mode"): _ex(b) for b in benches if _ex(b).get("mode") is not None}
    if coll:
        first = next(iter(coll.values()))
        rows = []
        for m in ("naive", "naive+guard", "guarded"):
            e = coll.get(m, {})
            rows.append([m, fmt(e.get("blocks_requested"), "int"), fmt(e.get("blocks_served"), "int"),
                         fmt(e.get("cross_identity_blocks"), "int"), fmt(e.get("cross_identity_bytes"), "mib"),
                         fmt(e.get("right_blocks"), "int"), fmt(e.get("hit_ratio"), "pct"),
                         fmt(e.get("true_hit_ratio"), "pct"), fmt(e.get("guard_refusals"), "int")])
        lines += [
            "### Collision workload", "",
            f"{fmt(first.get('identities'), 'int')} identities (tenants × adapter × model revision, plus tokenizer "
            f"revisions) ask for the same {fmt(first.get('prompts'), 'int')} prompts of "
            f"{fmt(first.get('blocks_per_prompt'), 'int')} blocks ({_size(first.get('block_bytes'))} each), "
            f"{fmt(first.get('passes'), 'int')} passes. `naive` keys by tokens alone (unsafe, study only). "
            "`hit ratio` = served / requested; `right` = served and the block's true origin.", "",
        ]
        lines += table(["store", "requested", "served", "cross-identity blocks", "cross-identity MiB",
                        "right blocks", "hit ratio", "right-block hit ratio", "guard refusals"], rows)
        n, g = coll.get("naive", {}), coll.get("guarded", {})
        lines += [
            f"Naive → guarded: cross-identity bytes {fmt(n.get('cross_identity_bytes'), 'int')} → "
            f"{fmt(g.get('cross_identity_bytes'), 'int')}; hit ratio {fmt(n.get('hit_ratio'), 'pct')} → "
            f"{fmt(g.get('hit_ratio'), 'pct')}; right-block hit ratio {fmt(n.get('true_hit_ratio'), 'pct')} → "
            f"{fmt(g.get('true_hit_ratio'), 'pct')}. The naive store's extra hits are other identities' bytes.", "",
        ]
    ov = next((_ex(b) for b in benches if "guard_on" in _ex(b)), None)
    if ov is not None:
        on, off = ov.get("guard_on") or {}, ov.get("guard_off") or {}
        rows = [["guard on"] + [fmt(on.get(k)) for k in ("p50_us", "p99_us", "mean_us")],
                ["guard off"] + [fmt(off.get(k)) for k in ("p50_us", "p99_us", "mean_us")]]
        lines += [
            "### Cost of the guard", "",
            f"Lookup + get of {fmt(ov.get('blocks_per_request'), 'int')} blocks of {_size(ov.get('block_bytes'))} "
            f"(shape {fmt(ov.get('block_shape'))}) per request, warm in RAM, {fmt(ov.get('requests'), 'int')} requests "
            f"({fmt(ov.get('hot_share'), 'pct')} from one of {fmt(ov.get('identities'), 'int')} identities), guard on and "
            "off interleaved request by request.", "",
        ]
        lines += table(["store", "p50 µs/request", "p99 µs/request", "mean µs/request"], rows)
        lines += table(["figure", "measured", f"goal ≤ {GUARD_OVERHEAD_GOAL_PCT:g}%"], [
            ["overhead at p50", _pct(ov.get("overhead_pct_p50")),
             _verdict(ov.get("overhead_pct_p50"), GUARD_OVERHEAD_GOAL_PCT, False)
             if _is_num(ov.get("overhead_pct_p50")) and ov["overhead_pct_p50"] > 0 else
             ("met (no measurable overhead)" if _is_num(ov.get("overhead_pct_p50")) else DASH)],
            ["overhead at mean", _pct(ov.get("overhead_pct_mean")),
             _verdict(ov.get("overhead_pct_mean"), GUARD_OVERHEAD_GOAL_PCT, False)
             if _is_num(ov.get("overhead_pct_mean")) and ov["overhead_pct_mean"] > 0 else
             ("met (no measurable overhead)" if _is_num(ov.get("overhead_pct_mean")) else DASH)],
            ["guard check per block", f"{fmt(ov.get('guard_check_us'))} µs ({_pct(ov.get('guard_check_pct_of_block'))} "
             "of a block's share of the p50 request)", DASH],
            ["full header parse + compare instead", f"{fmt(ov.get('guard_full_parse_us'))} µs", DASH],
        ])
    return lines + [reproduce_line(mode, benches), ""]


# --- objectstore --------------------------------------------------------------------------------


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


# --- copy ---------------------------------------------------------------------------------------

COPY_GOAL_RATIO = 0.7


def copy_section(mode: str, benches: list[dict]) -> list[str]:
    lines = _section_head("copy", "Copy-in/out bandwidth beside memcpy (group `copy`)")
    cpu = [b for b in benches if not str(_ex(b).get("op", "")).startswith("cuda")]
    cuda = [b for b in benches if str(_ex(b).get("op", "")).startswith("cuda")]
    if cpu:
        e0 = _ex(cpu[0])
        rows = []
        for b in cpu:
            e = _ex(b)
            rows.append([fmt(e.get("blocks"), "int"), fmt(e.get("op")), fmt(e.get("payload_bytes"), "mib"),
                         fmt(e.get("mb_per_s")), fmt(e.get("memcpy_mb_per_s")), fmt(e.get("ratio_to_memcpy")),
                         _verdict(e.get("ratio_to_memcpy"), COPY_GOAL_RATIO, True),
                         fmt(e.get("memcpy_runs_mb_per_s")), fmt(e.get("ratio_to_memcpy_runs")),
                         fmt(e.get("copy_ops"), "int")])
        lines += [
            f"Blocks of shape {fmt(e0.get('block_shape'))} {fmt(e0.get('dtype'))}, torch intra-op threads "
            f"{fmt(e0.get('torch_threads'))}, device {fmt(e0.get('device'))}. `memcpy` = numpy copyto of the same "
            "bytes in the same test; `memcpy runs` copies them in pieces of one block-layer-K/V run "
            f"({_size(e0.get('run_bytes'))}). Goal: ≥ {COPY_GOAL_RATIO:g} of memcpy. 1 MB = 1e6 B.", "",
        ]
        lines += table(["blocks", "op", "MiB", "MB/s", "memcpy MB/s", "÷ memcpy", f"goal ≥ {COPY_GOAL_RATIO:g}",
                        "memcpy runs MB/s", "÷ memcpy runs", "copy ops"], rows)
    if cuda:
        rows = [[fmt(_ex(b).get("op")), fmt(_ex(b).get("blocks"), "int"), fmt(_ex(b).get("mb_per_s")),
                 fmt(_ex(b).get("pinned_mb_per_s")), fmt(_ex(b).get("ratio_to_pinned")), fmt(_ex(b).get("device"))]
                for b in cuda]
        lines += ["CUDA, through pinned staging, beside a raw pinned copy:", ""]
        lines += table(["op", "blocks", "MB/s", "raw pinned MB/s", "÷ pinned", "device"], rows)
    return lines + [reproduce_line(mode, benches), ""]


# --- kv codecs ----------------------------------------------------------------------------------


def kv_codecs_section(mode: str, benches: list[dict], groups: dict) -> list[str]:
    lines = _section_head("kv-codecs", "Codecs on model KV, and int8's error in the model (group `kv-codecs`)")
    codecs = [b for b in benches if "codec" in _ex(b)]
    model = next((_ex(b) for b in benches if "exact_perplexity" in _ex(b)), None)
    crc = _limit(groups, "test_crc32c")
    if codecs:
        e0 = _ex(codecs[0])
        rows = []
        for b in codecs:
            e = _ex(b)
            name = f"{e.get('codec')}{'+shuffle' if e.get('shuffle') else ''}"
            rows.append([name, "lossy" if e.get("lossy") else "lossless", _x(e.get("ratio")),
                         fmt(e.get("encode_mb_per_s")), fmt(e.get("decode_mb_per_s")), fmt(e.get("blocks"), "int"),
                         fmt(e.get("payload_bytes"), "mib")])
        pub = e0.get("published_reference") or {}
        if pub:
            rows.append([f"{pub.get('codec', DASH)} — published, not measured here", "lossless",
                         f"×{pub.get('ratio_low', DASH)}–{pub.get('ratio_high', DASH)}", DASH, DASH, DASH, DASH])
        lines += [
            f"KV source: {_txt(e0.get('kv_source'))}; blocks {fmt(e0.get('block_shape'))} {fmt(e0.get('dtype'))}. "
            "Random weights, not trained: no outlier channels, so the ratios are this model's, not a promise. "
            f"Ratio = raw / envelope bytes. CRC32C in this run: {fmt(_mb(crc))} MB/s (no envelope codes faster than "
            f"its checksum). Published row: {_txt(pub.get('source'))}.", "",
        ]
        lines += table(["codec", "kind", "ratio", "encode MB/s", "decode MB/s", "blocks", "MiB"], rows)
        lz4 = next((_ex(b).get("ratio") for b in codecs if _ex(b).get("codec") == "lz4" and not _ex(b).get("shuffle")), None)
        if pub and _is_num(lz4) and _is_num(pub.get("ratio_low")):
            lines += [f"LZ4 here: ×{lz4:.2f}, against the published ×{pub['ratio_low']}–{pub.get('ratio_high')} "
                      f"({_x(_div(lz4, pub['ratio_low']))} of the published low end).", ""]
    if model is not None:
        rows = []
        for name in ("int8", "float16"):
            rows.append([name if name == "int8" else "float16 rounding (yardstick)",
                         fmt(model.get(f"logit_max_abs_diff_{name}")), fmt(model.get(f"logit_max_abs_{name}")),
                         fmt(model.get(f"teacher_forced_argmax_agreement_{name}"), "pct"),
                         fmt(model.get(f"greedy_agreement_{name}"), "pct"),
                         fmt(model.get(f"greedy_first_divergence_{name}"), "int"),
                         fmt(model.get(f"perplexity_{name}")), fmt(model.get(f"perplexity_delta_{name}"))])
        m = model.get("model") or {}
        lines += [
            "### int8 inside the model", "",
            f"Prefix of {fmt(m.get('prefix'), 'int')} tokens restored from int8 blocks vs the exact float32 KV, "
            f"same model ({fmt(m.get('layers'), 'int')} layers): {fmt(model.get('continuation_tokens'), 'int')}-token "
            f"teacher-forced continuation, {fmt(model.get('greedy_steps'), 'int')} greedy steps. Exact perplexity "
            f"{fmt(model.get('exact_perplexity'))}; max |KV error| {fmt(model.get('kv_max_abs_error'))}. "
            f"{_txt(model.get('note'))}.", "",
        ]
        lines += table(["KV", "max |logit Δ|", "max |logit|", "teacher-forced argmax agreement", "greedy agreement",
                        "first greedy divergence", "perplexity", "Δ perplexity"], rows)
    return lines + [reproduce_line(mode, benches), ""]


# --- layerwise ----------------------------------------------------------------------------------


def layerwise_section(mode: str, benches: list[dict], plots) -> list[str]:
    rows = []
    order = sorted(benches, key=lambda b: (_ex(b).get("compute_ms_target") or 0, _ex(b).get("latency_ms") or 0))
    for b in order:
        e = _ex(b)
        rows.append([fmt(e.get("latency_ms")), fmt(e.get("compute_ms_target")), fmt(e.get("fetch_ms_per_layer")),
                     fmt(e.get("compute_ms_measured")), fmt(_ms(e.get("serial_s"))), fmt(_ms(e.get("overlapped_s"))),
                     fmt(_ms(e.get("bound_s"))), fmt(e.get("efficiency"), "pct"), _x(e.get("speedup")),
                     fmt(e.get("hidden_fraction"), "pct"), fmt(_ms(e.get("overlapped_d4_s"))),
                     fmt(e.get("efficiency_d4"), "pct"), _x(e.get("speedup_d4"))])
    e0 = _ex(benches[0]) if benches else {}
    return (_section_head("layerwise", "Layerwise loading: overlap of fetch and compute (group `layerwise`)")
            + [f"{fmt(e0.get('blocks'), 'int')} blocks, {fmt(e0.get('layers'), 'int')} layers, "
               f"{_size(e0.get('layer_bytes'))} per layer; latency injected: {_txt(e0.get('latency_model'))}. "
               "bound = header + max(fetch, compute); efficiency = bound / overlapped (100% = at the bound; above "
               "100% with depth 4 means deeper prefetch beat the one-fetch bound); hidden = share of the smaller "
               "side hidden.", ""]
            + table(["injected latency ms", "compute ms/layer (target)", "fetch ms/layer", "compute ms/layer",
                     "serial ms", "overlapped ms (depth 1)", "bound ms", "efficiency", "speedup", "hidden",
                     "overlapped ms (depth 4)", "efficiency d4", "speedup d4"], rows)
            + [reproduce_line(mode, benches), ""] + _plot_line(plots, "layerwise-efficiency.png"))


# --- ttft ---------------------------------------------------------------------------------------

TTFT_PATHS = ["full", "l0", "l1", "l2"]


def _ttft_cells(benches: list[dict]) -> tuple[list[int], dict]:
    """Prefix lengths, and {(prefix_tokens, path): extra_info}."""
    cells = {}
    for b in benches:
        e = _ex(b)
        if _is_num(e.get("prefix_tokens")) and e.get("path") is not None:
            cells[(e["prefix_tokens"], e["path"])] = e
    return sorted({p for p, _ in cells}), cells


def ttft_section(mode: str, benches: list[dict], plots) -> list[str]:
    prefixes, cells = _ttft_cells(benches)
    e0 = _ex(benches[0]) if benches else {}
    m = e0.get("model") or {}
    goal = TTFT_STORE_SHARE_GOAL_PCT / 100
    rows = []
    for P in prefixes:
        for path in TTFT_PATHS:
            e = cells.get((P, path))
            if e is None:
                rows.append([f"{P:,}", path] + [DASH] * 11)
                continue
            share = e.get("store_share")
            if path == "full":  # no store on the miss path
                rows.append([f"{P:,}", path, fmt(_ms(e.get("ttft_s"))), "×1.00"] + ["n/a"] * 8 + [_size(e.get("kv_bytes"))])
                continue
            rows.append([f"{P:,}", path, fmt(_ms(e.get("ttft_s"))), _x(e.get("speedup")),
                         fmt(_ms(e.get("store_s"))), fmt(_ms(e.get("lookup_s"))), fmt(_ms(e.get("get_s"))),
                         fmt(_ms(e.get("scatter_s"))), fmt(_ms(e.get("suffix_prefill_s"))), fmt(share, "pct"),
                         _verdict(share, goal, False), fmt(e.get("get_mb_per_s")), _size(e.get("kv_bytes"))])
    lines = _section_head("ttft", "Time to first token: full prefill vs restore from L0 / L1 / L2 (group `ttft`)")
    lines += [
        f"Model: {fmt(m.get('arch'))}, {fmt(e0.get('params'), 'int')} parameters ({fmt(m.get('layers'), 'int')} layers, "
        f"hidden {fmt(m.get('hidden'), 'int')}, {fmt(m.get('kv_heads'), 'int')} KV heads × head_dim "
        f"{fmt(m.get('head_dim'), 'int')}), {fmt(m.get('dtype'))}, weights {_txt(m.get('weights'))}; torch intra-op "
        f"threads {fmt(e0.get('torch_threads'))}. Prompt = P prefix tokens + {fmt(e0.get('suffix_tokens'), 'int')} "
        "new ones. `full` = prefill with no cache (a miss); `l0`/`l1`/`l2` = the prefix restored from that tier "
        "(L1 as served by the page cache; L2 from a local-directory object store, promoted into a fresh L1 and L0), "
        "then the suffix forward. store = lookup + get + scatter into the model's cache; store share = store / suffix "
        f"prefill (goal ≤ {TTFT_STORE_SHARE_GOAL_PCT:g}%); speedup = full TTFT / this TTFT, same P, same run.", "",
    ]
    lines += table(["prefix tokens", "path", "TTFT ms", "speedup", "store ms", "lookup ms", "get ms", "scatter ms",
                    "suffix prefill ms", "store share", f"goal ≤ {TTFT_STORE_SHARE_GOAL_PCT:g}%", "get MB/s",
                    "prefix KV"], rows)
    puts = [f"P = {P:,}: {fmt(_ms(cells[(P, 'full')].get('populate_put_s')))} ms "
            f"({fmt(cells[(P, 'full')].get('populate_put_mb_per_s'))} MB/s)" for P in prefixes if (P, "full") in cells]
    if puts:
        lines += ["Storing the prefix after the full prefill (`BlockStore.put`, after the first token, so not in its "
                  "TTFT): " + "; ".join(puts) + ".", ""]
    return lines + [reproduce_line(mode, benches), ""] + _plot_line(plots, "ttft.png")


# --- headline figures ---------------------------------------------------------------------------


# --- the index study through the product (issue 9) -------------------------------------------------

PRODUCT_GROUPS = ["product-build", "product-open", "product-open-bytes"]
PRODUCT_PERSISTENT = ("art", "lmdb", "lsm")
# Goals (issue 9), not results: each is compared with figures of this run.
PRODUCT_OPEN_GOAL_S = 1.0            # open + first get of a 1M-block store, warm, art/lmdb/lsm
PRODUCT_OPEN_GOAL_N = 1_000_000
PRODUCT_BYTES_GOAL_RATIO = 1.5       # "independent of the bytes stored": largest store ÷ small-payload store
PRODUCT_MISS_GOAL_MS = 0.1           # lookup, nothing cached
PRODUCT_HIT_GOAL_RATIO = 1.5         # lookup all-hit ÷ hashing the same prompt
PRODUCT_RSS_GOAL_B = 200.0           # RSS per resident block beyond the index's own files, at 1M


def _product_rows(groups: dict, group: str) -> dict:
    """{(backend, n): extra_info} of one product group (bytes rows: n = target bytes)."""
    out = {}
    for b in groups.get(group, []):
        e = _ex(b)
        key = e.get("target_bytes") if group == "product-open-bytes" else e.get("n")
        if e.get("backend") is not None and key is not None:
            out[(e["backend"], key)] = e
    return out


def _product_backends(groups: dict, available: list[str]) -> list[str]:
    seen = [_ex(b).get("backend") for g in PRODUCT_GROUPS for b in groups.get(g, [])]
    names = [b for b in available if b in seen] + [b for b in dict.fromkeys(seen) if b and b not in available]
    return sorted(names, key=lambda b: (b not in PRODUCT_PERSISTENT, PRODUCT_PERSISTENT.index(b)
                                        if b in PRODUCT_PERSISTENT else 0))


def _measured(e) -> bool:
    return bool(e) and not e.get("skipped")


def _skip_cell(e) -> str:
    if not e:
        return DASH
    return f"skipped: {e['skipped']}" if e.get("skipped") else ""


def _open_goal(n, backend, value, largest=None) -> str:
    """The verdict at N = 1M; at the backend's largest N when 1M was not measured, marked indicative."""
    if backend not in PRODUCT_PERSISTENT:
        return "n/a (memory-only)"
    if n != PRODUCT_OPEN_GOAL_N:
        if largest is not None and n == largest and largest < PRODUCT_OPEN_GOAL_N:
            return f"{_verdict(value, PRODUCT_OPEN_GOAL_S, False)} (indicative: N = {n:,}, not {PRODUCT_OPEN_GOAL_N:,})"
        return f"goal is at N = {PRODUCT_OPEN_GOAL_N:,}"
    return _verdict(value, PRODUCT_OPEN_GOAL_S, False)


def _rss_goal(n, backend, excess, largest=None) -> str:
    """RSS per block ≤ the index's files per block + 200 B: verdict at 1M (or indicative at the largest N)."""
    if backend not in PRODUCT_PERSISTENT:
        return "n/a (memory-only)"
    if n != PRODUCT_OPEN_GOAL_N and not (largest is not None and n == largest):
        return f"goal is at N = {PRODUCT_OPEN_GOAL_N:,}"
    v = ("met (RSS below the index files)" if _is_num(excess) and excess <= 0
         else _verdict(excess, PRODUCT_RSS_GOAL_B, False))
    return v if n == PRODUCT_OPEN_GOAL_N else f"{v} (indicative: N = {n:,})"


def product_open_summary(groups: dict, available: list[str]) -> dict:
    """The figures the headline and the section share: largest N measured per backend, etc."""
    opens = _product_rows(groups, "product-open")
    backends = _product_backends(groups, available)
    top = {}
    for b in backends:
        ns = [n for (bb, n), e in opens.items() if bb == b and _measured(e) and _is_num(e.get("open_get_s"))]
        if ns:
            top[b] = max(ns)
    return {"opens": opens, "backends": backends, "top": top}


def product_section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    available = q.get("index_backends") or []
    sm = product_open_summary(groups, available)
    opens, backends = sm["opens"], sm["backends"]
    builds = _product_rows(groups, "product-build")
    looks = opens     # lookup is measured in the last open process of each row
    byts = _product_rows(groups, "product-open-bytes")
    sizes = sorted({n for (_b, n) in opens} | {n for (_b, n) in builds})
    lines = _section_head("product", "Index through the product: `BlockStore` per backend (issue 9)")
    any_e = next((e for e in list(opens.values()) + list(builds.values()) if e), {})
    lines += [
        "The index study measured where the product uses it: `BlockStore.open(path, index=…)`, `lookup`, `put` and "
        "`get` (public API only), one backend per row, each figure taken in a fresh Python process. Blocks of "
        f"the block-count sweep: 1 layer × 2 × 16 tokens × 1 head × head_dim 8, float16 "
        f"({_size(any_e.get('payload_bytes_per_block'))} payload), stored {fmt(any_e.get('batch'), 'int')} per "
        "`put` call; `ram_bytes=0` (no L0: every get is served by L1, as after a restart). Stores are built with "
        "`os.fsync` made a no-op in the building process (then one `os.sync()`), so build rates are not durable "
        "put rates. Above the smallest N one *shared* store is built by the first backend (`built by`); another "
        "backend's first open of it rebuilds its index from the WAL (`first open`, untimed in the figures), the "
        "timed opens are the steady state. Page cache warm: a warm-up open in its own process precedes the timed "
        "ones, so the ART's Numba cache on disk is warm too; `code load` is the first open + put + get + close of "
        "a tiny store in the same process, before the timed open, so the timed figure is the store's own cost. "
        f"Machine: {q.get('cpu_count', DASH)} cores (see the header). Goals are constants (issue 9); every figure "
        "and verdict is from this run.",
        "",
    ]
    # -- open vs blocks
    if "product-open" in groups:
        rows = []
        for n in sizes:
            for b in backends:
                e = opens.get((b, n))
                if not _measured(e):
                    if e is not None or (b, n) in builds:
                        rows.append([f"{n:,}", b] + [DASH] * 8 + [_skip_cell(e or builds.get((b, n)))])
                    continue
                rows.append([f"{n:,}", b, fmt(_ms(e.get("open_get_s"))), fmt(_ms(e.get("open_get_min_s"))),
                             fmt(_ms(e.get("open_s"))), fmt(_ms(e.get("get_s"))), fmt(e.get("reps"), "int"),
                             f"{fmt(_ms(e.get('first_open_s')))} ({_txt(e.get('first_open_note'))})",
                             fmt(_ms(e.get("code_load_s"))), _open_goal(n, b, e.get("open_get_s"), sm["top"].get(b)),
                             _txt(e.get("store_built_by"))])
        lines += ["### Open + first get vs blocks stored (group `product-open`)", "",
                  f"`open + get` = `BlockStore.open` + one `get` of one stored block, median of `reps` processes. "
                  f"Goal: ≤ {PRODUCT_OPEN_GOAL_S:g} s at N = {PRODUCT_OPEN_GOAL_N:,} for art, lmdb and lsm.", ""]
        lines += table(["N", "backend", "open + get ms", "min ms", "open ms", "get ms", "reps", "first open ms", "code load ms",
                        f"goal ≤ {PRODUCT_OPEN_GOAL_S:g} s at 1M", "built by / note"], rows)
        missing = [b for b in backends if b in PRODUCT_PERSISTENT and sm["top"].get(b) != PRODUCT_OPEN_GOAL_N]
        if missing:
            largest = ", ".join(f"{b} {sm['top'][b]:,}" for b in missing if b in sm["top"]) or DASH
            lines += [f"Not measured at N = {PRODUCT_OPEN_GOAL_N:,} in this run: {', '.join(missing)} "
                      f"(largest N measured: {largest}); "
                      "the skipped rows give the reason. Memory-only backends (flat, sorted) rebuild from the WAL at "
                      "every open, O(N) by design.", ""]
        lines += [reproduce_line(mode, groups["product-open"]), ""]
    # -- open vs bytes
    if "product-open-bytes" in groups:
        rows = []
        targets = sorted({t for (_b, t) in byts})
        for b in backends:
            n0 = next((e.get("n") for (bb, _t), e in byts.items() if bb == b), None)
            small = opens.get((b, n0)) if n0 is not None else None
            small_build = builds.get((b, n0)) if n0 is not None else None
            if _measured(small):
                rows.append([b, f"{fmt(n0, 'int')}", _size(small.get("payload_bytes_per_block")),
                             fmt((small.get("store_bytes") or (small_build or {}).get("store_bytes") or 0) / 1e9),
                             fmt(_ms(small.get("open_get_s"))), fmt(_ms(small.get("open_get_min_s"))),
                             fmt(small.get("reps"), "int"), "×1.00 (reference)", DASH, ""])
            ref = small.get("open_get_s") if _measured(small) else None
            for t in targets:
                e = byts.get((b, t))
                if e is None:
                    continue
                if not _measured(e):
                    rows.append([b, fmt(e.get("n"), "int"), _size(e.get("payload_bytes_per_block")),
                                 fmt(e.get("target_bytes", 0) / 1e9), DASH, DASH, DASH, DASH, DASH, _skip_cell(e)])
                    continue
                r = _div(e.get("open_get_s"), ref)
                goal = _verdict(r, PRODUCT_BYTES_GOAL_RATIO, False) if t == targets[-1] and b in PRODUCT_PERSISTENT else ""
                rows.append([b, fmt(e.get("blocks"), "int"), _size(e.get("payload_bytes_per_block")),
                             fmt(e.get("stored_gb")), fmt(_ms(e.get("open_get_s"))), fmt(_ms(e.get("open_get_min_s"))),
                             fmt(e.get("reps"), "int"), _x(r), goal,
                             ""])
        lines += ["### Open + first get vs bytes stored (group `product-open-bytes`)", "",
                  "The same block count as the sweep's smallest N, payloads scaled (1 layer × 2 × 16 tokens × k heads × "
                  "head_dim 128) so the store holds about the stated bytes; one shared store per size, built by the "
                  "first backend. `× small` = open + get ÷ the same backend's open of the small-payload store with the "
                  "same N (group `product-open`). Goal (issue 9: open \"independent of the bytes stored\", made a "
                  f"number here): the largest store ≤ ×{PRODUCT_BYTES_GOAL_RATIO:g} the small one, for art, lmdb and lsm.",
                  ""]
        lines += table(["backend", "blocks", "payload/block", "stored GB", "open + get ms", "min ms", "reps", "× small",
                        f"goal ≤ ×{PRODUCT_BYTES_GOAL_RATIO:g}", "note"], rows)
        lines += [reproduce_line(mode, groups["product-open-bytes"]), ""]
    lines += _plot_line(plots, "product-open.png")
    # -- lookup
    if any(_measured(e) and "hit_ms" in e for e in looks.values()):
        rows = []
        for n in sizes:
            for b in backends:
                e = looks.get((b, n))
                if e is None:
                    continue
                if not _measured(e):
                    continue      # the open table above gives the reason
                rows.append([f"{n:,}", b, fmt(e.get("lookup_tokens"), "int"), fmt(e.get("hash_ms")), fmt(e.get("hit_ms")),
                             f"{_x(e.get('hit_over_hash'))} — {_verdict(e.get('hit_over_hash'), PRODUCT_HIT_GOAL_RATIO, False)}",
                             fmt(e.get("miss_ms")), _verdict(e.get("miss_ms"), PRODUCT_MISS_GOAL_MS, False), ""])
        lines += ["### Lookup through the store (group `product-open`, the lookup columns)", "",
                  "In the last timed open's process, after its figures were taken: "
                  "`lookup(ident, tokens)` of the lookup prompt stored in every store: all-hit, and all-miss (its first "
                  "token changed, so no block is cached), beside `engine.keys.chain_keys` of the same tokens (hashing "
                  "alone); tokens as a numpy uint32 array; medians in ms (hashing and all-hit interleaved). Goals: "
                  f"all-hit ≤ ×{PRODUCT_HIT_GOAL_RATIO:g} hashing, all-miss ≤ {PRODUCT_MISS_GOAL_MS:g} ms.", ""]
        lines += table(["N", "backend", "prompt tokens", "hashing ms", "all-hit ms",
                        f"hit ÷ hashing (goal ≤ ×{PRODUCT_HIT_GOAL_RATIO:g})", "all-miss ms",
                        f"all-miss goal ≤ {PRODUCT_MISS_GOAL_MS:g} ms", "note"], rows)
        lines += [reproduce_line(mode, groups["product-open"]), ""]
    # -- memory
    if "product-open" in groups:
        rows = []
        for n in sizes:
            for b in backends:
                e = opens.get((b, n))
                if not _measured(e):
                    continue
                goal = _rss_goal(n, b, e.get("rss_excess_per_block"), sm["top"].get(b))
                rows.append([f"{n:,}", b, fmt(e.get("blocks"), "int"), fmt(e.get("rss_per_block")),
                             fmt(e.get("rss_anon_per_block")), fmt(e.get("rss_file_per_block")),
                             fmt(e.get("index_disk_per_block")), fmt(e.get("rss_excess_per_block")), goal,
                             fmt(e.get("rss_after_put_per_block"))])
        lines += ["### Memory per resident block (groups `product-open`, `product-build`)", "",
                  "Bytes per block: process RSS (`/proc/self/status` VmRSS) after open + first get minus the same "
                  "process's RSS before the open (after the tiny store that loads the backend's code, gc and "
                  "malloc_trim), divided by the blocks stored; RssAnon and RssFile split it (an mmap'd index, LMDB, "
                  "shows as RssFile). `index files` = the index's own directory (`<store>/l1/index*`) per block; "
                  "`beyond index files` = RSS − index files, the figure the goal "
                  f"(≤ {PRODUCT_RSS_GOAL_B:g} B/block on top of the index's own files at N = {PRODUCT_OPEN_GOAL_N:,}, "
                  "art/lmdb/lsm) is about, read literally: RSS per block ≤ index files per block + "
                  f"{PRODUCT_RSS_GOAL_B:g} B (an index whose files are not all resident, LMDB or RocksDB, can come out "
                  "negative). Where N = 1M was not measured the verdict at the largest N is marked indicative. "
                  "`after put` = RSS growth of the building process over its puts (only for the backend that built "
                  "the store). At small N the fixed costs dominate: read the largest N.", ""]
        lines += table(["N", "backend", "blocks", "RSS B/block", "RssAnon B/block", "RssFile B/block",
                        "index files B/block", "beyond index files B/block",
                        f"goal ≤ {PRODUCT_RSS_GOAL_B:g} B at 1M", "after put (in-process) B/block"], rows)
    # -- builds and index bytes per put
    if "product-build" in groups:
        rows = []
        for n in sizes:
            for b in backends:
                e = builds.get((b, n))
                if e is None:
                    continue
                if not _measured(e):
                    rows.append([f"{n:,}", b] + [DASH] * 10 + [_skip_cell(e)])
                    continue
                rows.append([f"{n:,}", b, fmt(e.get("blocks"), "int"), fmt(e.get("put_calls"), "int"),
                             fmt(e.get("put_blocks_per_s"), "rate"), fmt(e.get("index_tail_puts"), "int"),
                             fmt(e.get("index_bytes_per_put"), "int"), fmt(e.get("index_bytes_per_block")),
                             _txt(e.get("index_bytes_source")), fmt(e.get("index_disk_per_block")),
                             fmt(e.get("store_bytes"), "mib"), fmt(e.get("rss_after_put_per_block")), ""])
        srcs = {e.get("index_bytes_source") for e in builds.values() if _measured(e)}
        lines += ["### Builds and index bytes per put (group `product-build`)", "",
                  f"Each `put` call stores {fmt(any_e.get('batch'), 'int')} blocks, after a first one that stores the "
                  "lookup prompt. `index bytes/put`: what the index's files grew by over the build's last "
                  f"{fmt(any_e.get('index_tail_puts') or 8, 'int')} puts (fewer when the build has fewer) ÷ those puts; "
                  "`/block` ÷ their blocks; `index files` = the index's directory after close, per block stored"
                  + (" — `store.stats()[\"l1\"]` does not expose the index's own `bytes_written`, so this is the net "
                     "growth of its directory (os.walk), not the bytes it wrote (a compaction or snapshot rewrite is "
                     "not counted)" if "stats" not in srcs else "") + "; memory-only backends write no index file. "
                  "Build rates are with fsync masked (not durable put rates).", ""]
        lines += table(["N", "backend", "blocks", "put calls", "blocks/s (fsync masked)", "measured puts",
                        "index bytes/put", "index bytes/block", "measured by", "index files B/block", "store MiB",
                        "RSS after put B/block", "note"], rows)
        lines += [reproduce_line(mode, groups["product-build"]), ""]
    # -- how much the index choice matters
    spread = product_spread(groups, available)
    if spread:
        lines += ["### How much the index choice changes the product", ""]
        lines += [f"- {s}" for s in spread] + [""]
    return lines


def product_spread(groups: dict, available: list[str]) -> list[str]:
    """Slowest ÷ fastest backend for open and lookup, at the largest N where ≥ 2 backends were measured."""
    out = []
    for group, key, what in (("product-open", "open_get_s", "open + first get"),
                             ("product-open", "hit_ms", "lookup all-hit"),
                             ("product-open", "miss_ms", "lookup all-miss")):
        rows = _product_rows(groups, group)
        by_n: dict = {}
        for (b, n), e in rows.items():
            if _measured(e) and _is_num(e.get(key)) and e[key] > 0:
                by_n.setdefault(n, {})[b] = e[key]
        ns = [n for n, v in by_n.items() if len(v) >= 2]
        if not ns:
            continue
        n = max(ns)
        v = by_n[n]
        lo, hi = min(v, key=v.get), max(v, key=v.get)
        if key.endswith("_s"):
            v = {b: x * 1e3 for b, x in v.items()}
        unit = "ms"
        out.append(f"{what} at N = {n:,}: fastest {lo} {fmt(v[lo])} {unit}, slowest {hi} {fmt(v[hi])} {unit} "
                   f"({_x(v[hi] / v[lo])}); " + ", ".join(f"{b} {fmt(x)}" for b, x in sorted(v.items(), key=lambda t: t[1])))
    return out


def product_headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """The index headline, product-level: open at the largest N, open vs bytes, lookup, memory."""
    link = "[product](#product)"
    if not any(g in groups for g in PRODUCT_GROUPS):
        return [["BlockStore open / lookup per index backend", _absent("product-open"), DASH, DASH]]
    sm = product_open_summary(groups, available)
    opens, top = sm["opens"], sm["top"]
    rows = []
    pers = [b for b in sm["backends"] if b in PRODUCT_PERSISTENT]
    if top:
        parts = []
        for b in pers + [b for b in sm["backends"] if b not in pers]:
            if b not in top:
                continue
            e = opens[(b, top[b])]
            v = _open_goal(top[b], b, e.get("open_get_s"), top[b]) if b in PRODUCT_PERSISTENT else "memory-only"
            parts.append(f"{b} {fmt(_ms(e.get('open_get_s')))} ms at {top[b]:,} blocks: {v}")
        rows.append([f"BlockStore open + first get (goal ≤ {PRODUCT_OPEN_GOAL_S:g} s at {PRODUCT_OPEN_GOAL_N:,} blocks, "
                     "art/lmdb/lsm)", "; ".join(parts),
                     "largest N measured per backend, 512 B payloads, page cache warm", link])
    byts = _product_rows(groups, "product-open-bytes")
    parts = []
    for b in pers:
        ms = [(t, e) for (bb, t), e in byts.items() if bb == b and _measured(e)]
        if not ms:
            continue
        t, e = max(ms, key=lambda x: x[0])
        small = opens.get((b, e.get("n")))
        r = _div(e.get("open_get_s"), small.get("open_get_s")) if _measured(small) else None
        parts.append(f"{b} {fmt(_ms(small.get('open_get_s')) if small else None)} ms → {fmt(_ms(e.get('open_get_s')))} ms at "
                     f"{fmt(e.get('stored_gb'))} GB ({_x(r)}: {_verdict(r, PRODUCT_BYTES_GOAL_RATIO, False)})")
    if parts:
        n0 = next((e.get("n") for e in byts.values()), None)
        rows.append([f"Open vs bytes stored (goal: independent, ≤ ×{PRODUCT_BYTES_GOAL_RATIO:g})", "; ".join(parts),
                     f"{fmt(n0, 'int')} blocks, small payload → the largest store", link])
    elif "product-open-bytes" in groups:
        rows.append(["Open vs bytes stored", f"{DASH} (every size skipped: see the section)", DASH, link])
    looks = opens
    ln = [n for (b, n), e in looks.items() if _measured(e) and _is_num(e.get("hit_ms"))]
    if ln:
        n = max(ln)
        parts = []
        for b in sm["backends"]:
            e = looks.get((b, n))
            if _measured(e):
                parts.append(f"{b} hit {_x(e.get('hit_over_hash'))} hashing "
                             f"({'met' if _is_num(e.get('hit_over_hash')) and e['hit_over_hash'] <= PRODUCT_HIT_GOAL_RATIO else '**missed**'}), "
                             f"miss {fmt(e.get('miss_ms'))} ms "
                             f"({'met' if _is_num(e.get('miss_ms')) and e['miss_ms'] <= PRODUCT_MISS_GOAL_MS else '**missed**'})")
        tok = next((looks[(b, n)].get("lookup_tokens") for b in sm["backends"] if _measured(looks.get((b, n)))), None)
        rows.append([f"lookup through the store: all-hit ÷ hashing (goal ≤ ×{PRODUCT_HIT_GOAL_RATIO:g}), all-miss "
                     f"(goal ≤ {PRODUCT_MISS_GOAL_MS:g} ms)", "; ".join(parts),
                     f"{fmt(tok, 'int')}-token prompt, store of {n:,} blocks", link])
    mem = []
    for b in pers:
        if b in top:
            e = opens[(b, top[b])]
            v = _rss_goal(top[b], b, e.get("rss_excess_per_block"), top[b])
            mem.append(f"{b} {fmt(e.get('rss_per_block'))} B at {top[b]:,} ({fmt(e.get('rss_excess_per_block'))} B beyond "
                       f"its index files: {v})")
    if mem:
        rows.append([f"RSS per resident block (goal ≤ {PRODUCT_RSS_GOAL_B:g} B beyond the index files at 1M)",
                     "; ".join(mem), "after open + first get, largest N measured", link])
    spread = product_spread(groups, available)
    if spread:
        rows.append(["How much the index choice changes open and lookup (slowest ÷ fastest)",
                     "; ".join(s.split(";")[0] for s in spread), "same N, same store", link])
    return rows


def _absent(group: str) -> str:
    return f"{DASH} (group `{group}` has no results in this run)"


def headline_section(groups: dict, available: list[str] | None = None) -> list[str]:
    """The figures the study exists for, each computed from this run, each linking to its section."""
    rows: list[list[str]] = []

    # the index headline is the product-level one: BlockStore per backend (issue 9)
    rows += product_headline_rows(groups, available or [])

    # ART vs RocksDB vs LMDB at the largest N (index micro-benchmarks)
    n, art_rows = art_target_rows(groups)
    if n is None:
        rows.append(["ART vs RocksDB (lsm) vs LMDB", _absent("index-*"), DASH, "[ART targets](#art-targets)"])
    else:
        by = {how: (m, note) for (_t, m, note, _g, _h), (_t2, how, _g2, _h2) in zip(art_rows, ART_TARGETS)}
        for label, how in (("ART ÷ RocksDB (lsm), get_many keys/s", "lsm_get_many"),
                           ("ART ÷ LMDB, get_many keys/s", "lmdb_get_many"),
                           ("RocksDB (lsm) ÷ ART, longest_prefix p50", "lsm_longest"),
                           ("LMDB ÷ ART, longest_prefix p50", "lmdb_longest"),
                           ("RocksDB (lsm) ÷ ART, namespace scan p50", "lsm_scan"),
                           ("ART single get p50", "get_p50")):
            m, note = by[how]
            rows.append([label, note, f"N = {n:,}, 48-byte keys, 16-byte values", "[ART targets](#art-targets)"])
        missed = sum(1 for _t, m, _n, goal, higher in art_rows
                     if _is_num(m) and ((m < goal) if higher else (m > goal)))
        known = sum(1 for _t, m, *_ in art_rows if _is_num(m))
        rows.append(["ART targets met", f"{known - missed} of {known} measured ({len(art_rows)} targets)",
                     f"N = {n:,}", "[ART targets](#art-targets)"])

    # keying a long prompt
    keys = [_ex(b) for b in groups.get("keys", [])]
    if keys:
        top = max((e.get("tokens") or 0) for e in keys)
        for keyed in (False, True):
            cands = [e for e in keys if e.get("tokens") == top and bool(e.get("keyed")) == keyed]
            best = min(cands, key=lambda e: e.get("ms_per_prompt") if _is_num(e.get("ms_per_prompt")) else math.inf,
                       default={})
            rows.append([f"Time to key a {top:,}-token prompt ({'keyed' if keyed else 'unkeyed'})",
                         f"{fmt(best.get('ms_per_prompt'))} ms ({fmt(best.get('ns_per_block'))} ns/block)",
                         f"{fmt(best.get('blocks'), 'int')} blocks of 16 tokens, {fmt(best.get('input'))} input",
                         "[keys](#keys)"])
    else:
        rows.append(["Time to key a long prompt", _absent("keys"), DASH, "[keys](#keys)"])

    # walpub durable publish vs fsync'd write bandwidth
    pub = [_ex(b) for b in groups.get("walpub-publish", []) if _ex(b).get("store") == "walpub"]
    if pub:
        for size in sorted({e.get("block_bytes") for e in pub if _is_num(e.get("block_bytes"))}):
            best = max((e for e in pub if e.get("block_bytes") == size),
                       key=lambda e: e.get("mb_per_s") if _is_num(e.get("mb_per_s")) else -1)
            rows.append([f"walpub durable publish, {_size(size)} blocks",
                         f"{fmt(best.get('mb_per_s'))} MB/s = {_x(best.get('ratio_to_disk'))} the fsync'd sequential "
                         f"write ({fmt(best.get('disk_mb_per_s'))} MB/s); {fmt(best.get('fsyncs_per_block'))} fsyncs/block",
                         f"{fmt(best.get('threads'), 'int')} threads (best of the run), {fmt(best.get('blocks'), 'int')} blocks",
                         "[walpub](#walpub)"])
    else:
        rows.append(["walpub durable publish vs fsync'd write", _absent("walpub-publish"), DASH, "[walpub](#walpub)"])
    amp = [_ex(b) for b in groups.get("walpub-amplification", [])]
    if amp:
        small = min(e.get("block_bytes") for e in amp if _is_num(e.get("block_bytes")))
        w = next((e for e in amp if e.get("block_bytes") == small and e.get("store") == "walpub"), {})
        r = next((e for e in amp if e.get("block_bytes") == small and e.get("store") == "rocksdb"), {})
        rows.append(["Write amplification, walpub vs RocksDB",
                     f"{fmt(w.get('write_amplification'))} vs {fmt(r.get('write_amplification'))} bytes written per payload byte",
                     f"{_size(small)} blocks, durable on return", "[walpub](#walpub)"])
    camp = groups.get("walpub-campaign", [])
    if camp:
        t = campaign_totals(camp)
        rows.append(["Crash campaign", f"{fmt(t['states'], 'int')} crash states, {fmt(t['kills'], 'int')} SIGKILLs, "
                     f"{fmt(t['flips'], 'int')} bit flips: **{fmt(t['violations'], 'int')} violations**",
                     "every recovered state checked", "[walpub](#walpub)"])
    else:
        rows.append(["Crash campaign", _absent("walpub-campaign"), DASH, "[walpub](#walpub)"])

    # fault study (issue 13)
    rows += faults_headline_rows(groups)

    # identity
    ident = groups.get("identity", [])
    coll = {_ex(b).get("mode"): _ex(b) for b in ident if _ex(b).get("mode") is not None}
    ov = next((_ex(b) for b in ident if "guard_on" in _ex(b)), None)
    if coll:
        nv, gd = coll.get("naive", {}), coll.get("guarded", {})
        rows.append(["Cross-identity bytes served, naive vs guarded",
                     f"{fmt(nv.get('cross_identity_bytes'), 'int')} B vs {fmt(gd.get('cross_identity_bytes'), 'int')} B",
                     f"{fmt(nv.get('identities'), 'int')} identities, {fmt(nv.get('blocks_requested'), 'int')} blocks requested",
                     "[identity](#identity)"])
    if ov is not None:
        rows.append(["Guard overhead (p50 per request)",
                     f"{_pct(ov.get('overhead_pct_p50'))} (goal ≤ {GUARD_OVERHEAD_GOAL_PCT:g}%: "
                     f"{'met' if _is_num(ov.get('overhead_pct_p50')) and ov['overhead_pct_p50'] <= GUARD_OVERHEAD_GOAL_PCT else ('**missed**' if _is_num(ov.get('overhead_pct_p50')) else DASH)}); "
                     f"{fmt(ov.get('guard_check_us'))} µs per block",
                     f"{fmt(ov.get('blocks_per_request'), 'int')} × {_size(ov.get('block_bytes'))} blocks, "
                     f"{fmt(ov.get('requests'), 'int')} requests", "[identity](#identity)"])
    if not ident:
        rows.append(["Identity safety", _absent("identity"), DASH, "[identity](#identity)"])

    # tiers
    mc = [_ex(b) for b in groups.get("tiers-mooncake", [])]
    if mc:
        l1 = max(e.get("l1_budget_pct") or 0 for e in mc)
        l0 = max(e.get("l0_budget_pct") or 0 for e in mc)
        parts = []
        for e in mc:
            if e.get("l1_budget_pct") == l1 and e.get("l0_budget_pct") == l0:
                hit = (e["l0_hit_ratio"] + e["l1_hit_ratio"]) if _is_num(e.get("l0_hit_ratio")) and _is_num(e.get("l1_hit_ratio")) else None
                parts.append(f"{e.get('policy')}: L0 {fmt(e.get('l0_hit_ratio'), 'pct')}, L0+L1 {fmt(hit, 'pct')}")
        rows.append(["Mooncake hit ratio through L0 + L1", "; ".join(parts) or DASH,
                     f"L0 {_budget(l0)}, L1 {_budget(l1)} of the distinct bytes, {fmt(mc[0].get('requests'), 'int')} requests",
                     "[tiers](#tiers)"])
    rs = [_ex(b) for b in groups.get("tiers-restore", [])]
    if rs:
        size = max(e.get("payload_bytes") or 0 for e in rs)
        p50 = {e.get("tier"): e.get("p50_us") for e in rs if e.get("payload_bytes") == size}
        rows.append(["Restore one block: L0 / L1 warm / L2 warm (p50)",
                     f"{fmt(p50.get('l0'))} / {fmt(p50.get('l1-warm'))} / {fmt(p50.get('l2-warm'))} µs "
                     f"(memcpy {fmt(p50.get('memcpy'))} µs)", f"{_size(size)} block", "[tiers](#tiers)"])
    if not mc and not rs:
        rows.append(["Tiers", _absent("tiers-*"), DASH, "[tiers](#tiers)"])

    # copy
    cp = [_ex(b) for b in groups.get("copy", []) if not str(_ex(b).get("op", "")).startswith("cuda")]
    if cp:
        top = max(e.get("blocks") or 0 for e in cp)
        parts = [f"{e.get('op')} {fmt(e.get('ratio_to_memcpy'))}" for e in cp if e.get("blocks") == top]
        rows.append(["Copy-in/out ÷ memcpy (goal ≥ 0.7)", "; ".join(parts), f"{top:,} blocks", "[copy](#copy)"])
    else:
        rows.append(["Copy-in/out ÷ memcpy", _absent("copy"), DASH, "[copy](#copy)"])

    # kv codecs
    kv = [_ex(b) for b in groups.get("kv-codecs", []) if "codec" in _ex(b)]
    if kv:
        parts = [f"{e.get('codec')}{'+shuffle' if e.get('shuffle') else ''} {_x(e.get('ratio'))}"
                 for e in kv if e.get("codec") != "none"]
        pub = kv[0].get("published_reference") or {}
        rows.append(["Compression ratio on model KV", "; ".join(parts),
                     f"published ds4 LZ4 ×{pub.get('ratio_low', DASH)}–{pub.get('ratio_high', DASH)} (not measured here)",
                     "[kv-codecs](#kv-codecs)"])
    else:
        rows.append(["Compression ratio on model KV", _absent("kv-codecs"), DASH, "[kv-codecs](#kv-codecs)"])

    # layerwise
    lw = [_ex(b) for b in groups.get("layerwise", [])]
    if lw:
        effs = [e.get("efficiency") for e in lw if _is_num(e.get("efficiency"))]
        rows.append(["Layerwise overlap efficiency (depth 1)",
                     (f"{fmt(min(effs), 'pct')}–{fmt(max(effs), 'pct')} of the bound" if len(effs) > 1 else
                      f"{fmt(effs[0], 'pct')} of the bound") if effs else DASH,
                     f"{len(lw)} (latency, compute) cases", "[layerwise](#layerwise)"])
    else:
        rows.append(["Layerwise overlap", _absent("layerwise"), DASH, "[layerwise](#layerwise)"])

    # object store bootstrap
    boot = [_ex(b) for b in groups.get("objectstore-bootstrap", [])]
    if boot:
        top = max(e.get("blocks") or 0 for e in boot)
        parts = [f"{e.get('backend')} {_x(e.get('listing_over_manifests'))}" for e in boot if e.get("blocks") == top]
        rows.append(["Bootstrap: listing ÷ manifests", "; ".join(parts), f"{top:,} blocks", "[objectstore](#objectstore)"])

    # ttft
    tt = groups.get("ttft", [])
    if tt:
        rows += ttft_headline_rows(tt)
    else:
        rows.append(["TTFT speedup", _absent("ttft"), DASH, "[ttft](#ttft)"])

    for row in rows:  # no link to a section that is not in the report
        if row[1].startswith(f"{DASH} (group"):
            row[3] = DASH
    return (["## Headline figures", "",
             "Each computed from this run's results (goals are constants, marked as goals); the link leads to the "
             "table it comes from, with its sizes and the command that reproduces it.", ""]
            + table(["figure", "value", "sizes / conditions", "section"], rows))


def ttft_headline_rows(benches: list[dict]) -> list[list[str]]:
    """TTFT at the largest prefix: each restore path's speedup over the full prefill, and the store's share."""
    prefixes, cells = _ttft_cells(benches)
    if not prefixes:
        return [["TTFT speedup", f"{DASH} (no ttft result with prefix_tokens and path)", DASH, "[ttft](#ttft)"]]
    P = max(prefixes)
    full = cells.get((P, "full"), {})
    speed = "; ".join(f"{p.upper()} {fmt(_ms(cells.get((P, p), {}).get('ttft_s')))} ms "
                      f"({_x(cells.get((P, p), {}).get('speedup'))})" for p in TTFT_PATHS[1:])
    share = "; ".join(f"{p.upper()} {fmt(cells.get((P, p), {}).get('store_share'), 'pct')}" for p in TTFT_PATHS[1:])
    return [
        ["TTFT: full prefill vs restored prefix", f"full {fmt(_ms(full.get('ttft_s')))} ms; {speed}",
         f"{P:,}-token prefix + {fmt(full.get('suffix_tokens'), 'int')} new tokens", "[ttft](#ttft)"],
        [f"Store share of the suffix prefill (goal ≤ {TTFT_STORE_SHARE_GOAL_PCT:g}%)", share,
         f"{P:,}-token prefix", "[ttft](#ttft)"],
    ]


# --- plots ----------------------------------------------------------------------------------


def make_plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """PNG files written: [(title, relative path)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    sizes, backends, cells = _index_cells(groups)
    backends = [b for b in available if b in backends] + [b for b in backends if b not in available]
    written = []

    def save(fig, name: str, title: str):
        path = plots_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append((title, f"plots/{name}"))

    def by_n(group: str, key: str, fig_name: str, title: str, ylabel: str, logy: bool = True):
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for b in backends:
            pts = [(n, cells[(group, b, n)].get(key)) for n in sizes if (group, b, n) in cells]
            pts = [(n, v) for n, v in pts if _is_num(v) and (v > 0 or not logy)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
                drawn = True
        if not drawn:
            plt.close(fig)
            return
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("records N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, fig_name, title)

    for group, key, label in LATENCY_PLOTS:
        if group in groups:
            by_n(group, key, f"{group}-{key.strip('_')}.png", label + " vs N", label)
    if "index-footprint" in groups:
        by_n("index-footprint", "write_amplification", "index-write-amplification.png",
             "write amplification vs N", "bytes written / logical bytes")
        by_n("index-footprint", "bytes_on_disk", "index-bytes-on-disk.png", "bytes on disk vs N", "bytes")
        by_n("index-footprint", "rss_delta_bytes", "index-rss-delta.png", "RSS growth of the build vs N", "bytes")

    mc = groups.get("mooncake")
    if mc:
        es = [b.get("extra_info") or {} for b in mc]
        names = [str(e.get("backend", b.get("name"))) for e, b in zip(es, mc)]
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(len(es))
        for off, key, label in [(-0.2, "request_p50_us", "p50"), (0.2, "request_p99_us", "p99")]:
            vals = [e.get(key) if _is_num(e.get(key)) else float("nan") for e in es]
            ax.bar([x + off for x in xs], vals, width=0.4, label=label)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names)
        ax.set_yscale("log")
        ax.set_ylabel("µs per request")
        ax.set_title("Mooncake replay: per-request latency")
        ax.legend()
        save(fig, "mooncake-latency.png", "Mooncake per-request latency")

    pub = [b.get("extra_info") or {} for b in groups.get("walpub-publish", [])]
    cases = [e for e in pub if e.get("store") == "walpub" and _is_num(e.get("mb_per_s")) and _is_num(e.get("block_bytes"))]
    if cases:
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in sorted({e.get("threads") for e in cases}):
            pts = sorted((e["block_bytes"], e["mb_per_s"]) for e in cases if e.get("threads") == t)
            ax.plot([x / 1024 for x, _ in pts], [y for _, y in pts], marker="o", label=f"publish, {t} thread{'s' if t != 1 else ''}")
        disk = sorted((e["block_bytes"], e["disk_mb_per_s"]) for e in cases
                      if e.get("threads") == 1 and _is_num(e.get("disk_mb_per_s")))
        if disk:
            ax.plot([x / 1024 for x, _ in disk], [y for _, y in disk], "k:", marker="x",
                    label="fsync'd 1 MiB writes, before each case")
        base = next((e.get("mb_per_s") for e in pub if e.get("store") == "fsync'd sequential write"), None)
        if _is_num(base):
            ax.axhline(base, color="k", linestyle="--", label="fsync'd sequential write (baseline run)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({e["block_bytes"] for e in cases})
        ax.set_xticks([t / 1024 for t in ticks])
        ax.set_xticklabels([_size(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("block size")
        ax.set_ylabel("MB/s (1e6 B/s), durable on return")
        ax.set_title("walpub publish throughput vs block size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "walpub-publish.png", "walpub publish MB/s vs block size")

    lw = [b.get("extra_info") or {} for b in groups.get("layerwise", [])]
    lw = [e for e in lw if _is_num(e.get("latency_ms")) and _is_num(e.get("efficiency"))]
    if lw:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in sorted({e.get("compute_ms_target") for e in lw}, key=lambda v: v if _is_num(v) else 0):
            pts = sorted((e["latency_ms"], e["efficiency"], e.get("efficiency_d4")) for e in lw
                         if e.get("compute_ms_target") == c)
            line = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=f"depth 1, compute {c} ms/layer")
            d4 = [(x, z) for x, _, z in pts if _is_num(z)]
            if d4:
                ax.plot([x for x, _ in d4], [z for _, z in d4], marker="s", linestyle="--", color=line[0].get_color(),
                        label=f"depth 4, compute {c} ms/layer")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("injected fetch latency, ms")
        ax.set_ylabel("efficiency = bound / overlapped")
        ax.set_title("Layerwise overlap efficiency vs fetch latency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "layerwise-efficiency.png", "layerwise overlap efficiency vs injected latency")

    # issue 9: open + first get vs blocks stored and vs bytes stored, one figure
    p_open = _product_rows(groups, "product-open")
    p_bytes = _product_rows(groups, "product-open-bytes")
    p_backends = _product_backends(groups, available)
    if any(_measured(e) and _is_num(e.get("open_get_s")) and e["open_get_s"] > 0 for e in p_open.values()):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        colors = {}
        for b in p_backends:
            pts = sorted((n, e["open_get_s"]) for (bb, n), e in p_open.items()
                         if bb == b and _measured(e) and _is_num(e.get("open_get_s")) and e["open_get_s"] > 0)
            if pts:
                line = ax1.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=b)
                colors[b] = line[0].get_color()
            gb = []
            for (bb, _t), e in p_bytes.items():
                if bb == b and _measured(e) and _is_num(e.get("open_get_s")) and _is_num(e.get("stored_gb")):
                    gb.append((e["stored_gb"], e["open_get_s"], e.get("n")))
            if gb:
                small = p_open.get((b, gb[0][2]))
                if _measured(small) and _is_num(small.get("store_bytes")) and _is_num(small.get("open_get_s")):
                    gb.append((small["store_bytes"] / 1e9, small["open_get_s"], gb[0][2]))
                gb.sort()
                ax2.plot([x for x, _, _ in gb], [y for _, y, _ in gb], marker="s", label=b, color=colors.get(b))
        for ax in (ax1, ax2):
            ax.axhline(PRODUCT_OPEN_GOAL_S, color="k", linestyle="--", linewidth=0.8,
                       label=f"goal {PRODUCT_OPEN_GOAL_S:g} s (art/lmdb/lsm, 1M blocks)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        ax1.set_xlabel("blocks stored (512 B payloads)")
        ax1.set_ylabel("open + first get, s (median, warm)")
        ax1.set_title("vs blocks stored")
        n0 = next((e.get("n") for e in p_bytes.values()), None)
        ax2.set_xlabel(f"GB stored ({n0:,} blocks)" if _is_num(n0) else "GB stored")
        ax2.set_title("vs bytes stored, same block count")
        ax1.legend(fontsize=7)
        if ax2.lines:
            ax2.legend(fontsize=7)
        fig.suptitle("BlockStore open + first get, per index backend")
        save(fig, "product-open.png", "BlockStore open + first get vs blocks and vs bytes stored")

    tt = [b.get("extra_info") or {} for b in groups.get("ttft", [])]
    tt = [e for e in tt if _is_num(e.get("prefix_tokens")) and _is_num(e.get("ttft_s")) and e["ttft_s"] > 0]
    if tt:
        fig, ax = plt.subplots(figsize=(6, 4))
        for path in ("full", "l0", "l1", "l2"):
            pts = sorted((e["prefix_tokens"], e["ttft_s"] * 1e3) for e in tt if e.get("path") == path)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                        label="full prefill" if path == "full" else f"restored from {path.upper()}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({e["prefix_tokens"] for e in tt})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("prefix tokens")
        ax.set_ylabel("TTFT, ms")
        ax.set_title("Time to first token vs prefix length")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "ttft.png", "TTFT vs prefix length")
    return written


# --- entry point ------------------------------------------------------------------------------


# Groups with a dedicated section: (anchor, groups).  Any other group gets the generic table.
DEDICATED = [
    ("keys", ["keys"]),
    ("art-targets", ["art-compile", "art-reopen"]),
    ("walpub", ["walpub-publish", "walpub-amplification", "walpub-recovery", "walpub-campaign"]),
    ("tiers", ["tiers-mooncake", "tiers-restore"]),
    ("identity", ["identity"]),
    ("objectstore", ["objectstore", "objectstore-bootstrap"]),
    ("copy", ["copy"]),
    ("kv-codecs", ["kv-codecs"]),
    ("layerwise", ["layerwise"]),
    ("ttft", ["ttft"]),
    ("product", PRODUCT_GROUPS),
    ("faults", FAULT_GROUPS),
]
# Groups the studies write; one missing from the JSON is named as absent in the contents.
EXPECTED_GROUPS = ["limits", *(g for g, *_ in INDEX_GROUPS), "mooncake", "codecs"] + [
    g for _a, gs in DEDICATED for g in gs]


def render(data: dict, input_path: Path, plots: list[tuple[str, str]]) -> str:
    groups = _groups(data)
    q = (data.get("machine_info") or {}).get("quiver") or {}
    mode = q.get("mode") or (data.get("quiver") or {}).get("mode") or "quick"
    available = q.get("index_backends") or []
    lines = header_section(data, input_path)
    lines += headline_section(groups, available)
    lines += ["## Contents", ""] + [f"- `{g}` ({len(b)} results)" for g, b in groups.items()]
    absent = [g for g in EXPECTED_GROUPS if g not in groups]
    if absent:
        lines += ["", "Not in this run (no results; their figures are absent): " + ", ".join(f"`{g}`" for g in absent)]
    lines += [""]
    if "limits" in groups:
        lines += limits_section(mode, groups["limits"])
    if any(g in groups for g in PRODUCT_GROUPS):
        lines += product_section(mode, groups, plots, q)
    lines += index_sections(mode, groups, available)
    index_plots = [(t, p) for t, p in plots if p.startswith("plots/index-")]
    if index_plots:
        lines += ["### Index plots", ""] + [f"![{t}]({p})" for t, p in index_plots] + [""]
    if any(g in groups for g in ("art-compile", "art-reopen")) or any(k[1] == "art" for k in _index_cells(groups)[2]):
        lines += art_section(mode, groups, plots)
    if "mooncake" in groups:
        lines += mooncake_section(mode, groups["mooncake"], groups)
    if "keys" in groups:
        lines += keys_section(mode, groups["keys"])
    if any(g in groups for g in DEDICATED[2][1]):
        lines += walpub_section(mode, groups, plots)
    if any(g in groups for g in FAULT_GROUPS):
        lines += faults_section(mode, groups)
    if any(g in groups for g in DEDICATED[3][1]):
        lines += tiers_section(mode, groups, plots)
    if "identity" in groups:
        lines += identity_section(mode, groups["identity"])
    if any(g in groups for g in DEDICATED[5][1]):
        lines += objectstore_section(mode, groups)
    if "copy" in groups:
        lines += copy_section(mode, groups["copy"])
    if "kv-codecs" in groups:
        lines += kv_codecs_section(mode, groups["kv-codecs"], groups)
    if "layerwise" in groups:
        lines += layerwise_section(mode, groups["layerwise"], plots)
    if "ttft" in groups:
        lines += ttft_section(mode, groups["ttft"], plots)
    handled = {"limits", "mooncake"} | {g for g, *_ in INDEX_GROUPS} | {g for _a, gs in DEDICATED for g in gs}
    for g, benches in groups.items():
        if g not in handled:
            lines += generic_section(mode, g, benches)
    lines += [f"_Report written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}._", ""]
    return "\n".join(lines)


def write_report(input_path: Path, out_dir: Path) -> Path:
    """Read the results JSON, write ``out_dir``/REPORT.md and ``out_dir``/plots/*.png."""
    data = json.loads(Path(input_path).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    q = (data.get("machine_info") or {}).get("quiver") or {}
    plots = make_plots(_groups(data), out_dir / "plots", q.get("index_backends") or [])
    path = out_dir / "REPORT.md"
    path.write_text(render(data, Path(input_path), plots))
    return path
