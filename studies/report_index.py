"""Report sections of the residency-index micro-benchmarks (studies/bench_index.py,
groups ``index-*``): one table per operation, every backend at every N, and the
index plots (one line per backend vs N)."""

from __future__ import annotations

from pathlib import Path

from .report_common import DASH, _derived, _is_num, _limit, _mb, _ratio, fmt, pyplot, reproduce_line, save_plot, table

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

GROUPS = [g for g, *_ in INDEX_GROUPS]


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


def present(groups: dict) -> bool:
    return any(g.startswith("index-") for g in groups)


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    lines = index_sections(mode, groups, q.get("index_backends") or [])
    index_plots = [(t, p) for t, p in plots if p.startswith("plots/index-")]
    if index_plots:
        lines += ["### Index plots", ""] + [f"![{t}]({p})" for t, p in index_plots] + [""]
    return lines


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """One figure per (group, figure): a line per backend against N."""
    sizes, backends, cells = _index_cells(groups)
    backends = [b for b in available if b in backends] + [b for b in backends if b not in available]
    written = []

    def by_n(group: str, key: str, fig_name: str, title: str, ylabel: str, logy: bool = True):
        plt = pyplot()
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
        written.append(save_plot(fig, plots_dir, fig_name, title))

    for group, key, label in LATENCY_PLOTS:
        if group in groups:
            by_n(group, key, f"{group}-{key.strip('_')}.png", label + " vs N", label)
    if "index-footprint" in groups:
        by_n("index-footprint", "write_amplification", "index-write-amplification.png",
             "write amplification vs N", "bytes written / logical bytes")
        by_n("index-footprint", "bytes_on_disk", "index-bytes-on-disk.png", "bytes on disk vs N", "bytes")
        by_n("index-footprint", "rss_delta_bytes", "index-rss-delta.png", "RSS growth of the build vs N", "bytes")
    return written
