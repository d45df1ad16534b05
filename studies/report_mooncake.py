"""Report section of the Mooncake trace replay through each index (studies/bench_mooncake.py,
group ``mooncake``)."""

from __future__ import annotations

from pathlib import Path

from .report_common import _derived, _is_num, _ratio, fmt, pyplot, reproduce_line, save_plot, table

GROUPS = ["mooncake"]


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


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return mooncake_section(mode, groups["mooncake"], groups)


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    mc = groups.get("mooncake")
    if not mc:
        return []
    plt = pyplot()
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
    return [save_plot(fig, plots_dir, "mooncake-latency.png", "Mooncake per-request latency")]
