"""``quiver report``: bench_results/REPORT.md and plots/*.png from one results JSON.

Everything printed comes from the JSON that ``quiver run`` wrote (pytest-benchmark's
format plus ``machine_info["quiver"]`` and ``["quiver"]`` added by
studies/conftest.py): nothing is typed in here.  A figure the JSON lacks is
printed as "—".  Groups without a dedicated table below (keys, codecs, art-*,
walpub-*, ...) get a generic one, so a new study shows up without changes here.
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
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
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
    return {"smoke": "QUIVER_SMOKE=1 python -m studies.cli run", "full": "python -m studies.cli run --full"}.get(
        mode, "python -m studies.cli run"
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
        "Generated by `python -m studies.cli report` from "
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
        [f"## Group `{group}`", "", "Generic table: the benchmark's median time per round and every figure it recorded.", ""]
        + table(["test", "params", "median µs per timed round", "timed rounds"] + list(keys), rows)
        + [reproduce_line(mode, benches), ""]
    )


def _us(s):
    return s * 1e6 if _is_num(s) else None


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
    return written


# --- entry point ------------------------------------------------------------------------------


def render(data: dict, input_path: Path, plots: list[tuple[str, str]]) -> str:
    groups = _groups(data)
    q = (data.get("machine_info") or {}).get("quiver") or {}
    mode = q.get("mode") or (data.get("quiver") or {}).get("mode") or "quick"
    available = q.get("index_backends") or []
    lines = header_section(data, input_path)
    lines += ["## Contents", ""] + [f"- `{g}` ({len(b)} results)" for g, b in groups.items()] + [""]
    if "limits" in groups:
        lines += limits_section(mode, groups["limits"])
    lines += index_sections(mode, groups, available)
    index_plots = [(t, p) for t, p in plots if p.startswith("plots/index-")]
    if index_plots:
        lines += ["### Index plots", ""] + [f"![{t}]({p})" for t, p in index_plots] + [""]
    if "mooncake" in groups:
        lines += mooncake_section(mode, groups["mooncake"], groups)
    handled = {"limits", "mooncake"} | {g for g, *_ in INDEX_GROUPS}
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
