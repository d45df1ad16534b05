"""Report section of the ART targets of issue 4 (groups ``art-compile``, ``art-reopen``
and the ``art`` rows of the index groups)."""

from __future__ import annotations

from .report_common import DASH, _absent, _div, _ex, _is_num, _ms, _section_head, _verdict, _x, fmt, reproduce_line, table
from .report_index import _index_cells

GROUPS = ["art-compile", "art-reopen"]

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


def present(groups: dict) -> bool:
    return any(g in groups for g in GROUPS) or any(k[1] == "art" for k in _index_cells(groups)[2])


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return art_section(mode, groups, plots)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """ART vs RocksDB vs LMDB at the largest N (index micro-benchmarks), and the targets met."""
    rows = []
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
    return rows
