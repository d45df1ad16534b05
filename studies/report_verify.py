"""Report section of `quiver verify` beside the raw read of the same files
(studies/bench_verify.py, group ``cli-verify``).

extra_info per cache state: ``blocks``, ``block_bytes``, ``stored_bytes``, ``files``,
``index``, ``cache`` (as measured: "cold" | "warm"), ``cache_method``,
``resident_before_raw`` / ``resident_before_verify`` (page-cache share before each read),
``raw_read_bytes_per_s``, ``verify_s`` and ``verify_bytes_per_s`` (subprocess wall time),
``ratio``, ``cli_start_s``, ``verify_net_bytes_per_s`` / ``ratio_net`` (without the
start), ``cli_pass_s`` / ``cli_bytes_per_s`` (the command's own figure of its pass).  The
physical limits beside it: the raw read of the same files in the same cache state, and
the CRC32C rate of the ``limits`` group.
"""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, _absent, _div, _ex, _is_num, _limit, _plot_line, _section_head, _size, _txt, _x,
                            fmt, pyplot, reproduce_line, save_plot, table)

GROUPS = ["cli-verify"]
CACHES = ["cold", "warm"]


def _cases(groups: dict) -> list[dict]:
    """extra_info per case, cold first."""
    es = [_ex(b) for b in groups.get("cli-verify", [])]
    order = {c: i for i, c in enumerate(CACHES)}
    return sorted(es, key=lambda e: (order.get(e.get("cache_requested", e.get("cache")), 99), str(e.get("cache"))))


def _mbps(bps):
    return bps / 1e6 if _is_num(bps) else None


def _serial_bound(raw_bps, crc_gbps):
    """Bytes/s of reading and then checksumming once, one thread: 1 / (1/raw + 1/crc)."""
    if not (_is_num(raw_bps) and _is_num(crc_gbps)) or raw_bps <= 0 or crc_gbps <= 0:
        return None
    return 1 / (1 / raw_bps + 1 / (crc_gbps * 1e9))


def _row(e: dict, crc_gbps) -> list[str]:
    pct = lambda v: fmt(v, "pct") if _is_num(v) else DASH  # noqa: E731
    cache = fmt(e.get("cache"))
    if e.get("cache_requested") not in (None, e.get("cache")):
        cache += f" (asked: {e['cache_requested']})"
    return [cache, f"{pct(e.get('resident_before_raw'))} / {pct(e.get('resident_before_verify'))}",
            fmt(_mbps(e.get("raw_read_bytes_per_s"))), fmt(_mbps(_serial_bound(e.get("raw_read_bytes_per_s"), crc_gbps))),
            fmt(e.get("verify_s")), fmt(_mbps(e.get("verify_bytes_per_s"))), _x(e.get("ratio")),
            fmt(e.get("cli_start_s")), fmt(_mbps(e.get("verify_net_bytes_per_s"))), _x(e.get("ratio_net")),
            fmt(e.get("cli_pass_s")), fmt(_mbps(e.get("cli_bytes_per_s"))),
            _x(_div(e.get("cli_bytes_per_s"), e.get("raw_read_bytes_per_s")))]


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    benches = groups["cli-verify"]
    cases = _cases(groups)
    e0 = cases[0] if cases else {}
    crc = _limit(groups, "test_crc32c")
    lines = _section_head("cli-verify", "`quiver verify` beside the raw read of the same files (group `cli-verify`)")
    lines += [
        f"A store of {fmt(e0.get('blocks'), 'int')} blocks of {_size(e0.get('block_bytes'))} (random float16, codec "
        f"none, index {fmt(e0.get('index'))}): {fmt(e0.get('files'), 'int')} object files, "
        f"{_size(e0.get('stored_bytes'))} stored. `verify` = the wall time of `{_txt(e0.get('command'))}` as a "
        "subprocess (start, imports, recovery, reading every object, CRC32C and envelope checks, exit), its MB/s = "
        "the object files' bytes / that time; `raw read` = the same files read whole, in order, into one reusable "
        "buffer (`readinto`, one thread), in the same cache state: the physical limit of the read. `read + CRC32C` "
        "= reading and then checksumming once in one thread, 1 / (1/raw + 1/CRC32C), with this run's CRC32C rate "
        f"({fmt(_mbps(crc * 1e9) if _is_num(crc) else None)} MB/s, group `limits`). `without start` subtracts the "
        "wall time of `python -m quiver.cli --help`; `pass` is the command's own figure (`--json`: the read-and-check "
        "loop, after open and recovery). `resident` = the files' pages in the page cache just before the raw read / "
        "the verify (mincore). 1 MB = 1e6 B.", "",
    ]
    lines += [f"- {fmt(e.get('cache'))}: {_txt(e.get('cache_method'))}" for e in cases] + [""]
    lines += table(["cache", "resident before raw / verify", "raw read MB/s", "read + CRC32C MB/s", "verify s (wall)",
                    "verify MB/s", "÷ raw read", "CLI start s", "verify MB/s without start", "÷ raw read",
                    "pass s (CLI's own)", "pass MB/s", "pass ÷ raw read"], [_row(e, crc) for e in cases])
    return lines + [reproduce_line(mode, benches), ""] + _plot_line(plots, "cli-verify.png")


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    link = "[cli-verify](#cli-verify)"
    label = "`quiver verify` ÷ raw read of the same files"
    cases = _cases(groups)
    if not cases:
        return [[label, _absent("cli-verify"), DASH, link]]
    parts = [f"{fmt(e.get('cache'))}: {fmt(_mbps(e.get('verify_bytes_per_s')))} MB/s wall ({_x(e.get('ratio'))} of "
             f"{fmt(_mbps(e.get('raw_read_bytes_per_s')))} MB/s), pass alone {fmt(_mbps(e.get('cli_bytes_per_s')))} MB/s "
             f"({_x(_div(e.get('cli_bytes_per_s'), e.get('raw_read_bytes_per_s')))})" for e in cases]
    e0 = cases[0]
    return [[label, "; ".join(parts), f"{fmt(e0.get('blocks'), 'int')} blocks × {_size(e0.get('block_bytes'))} = "
             f"{_size(e0.get('stored_bytes'))}, index {fmt(e0.get('index'))}; wall includes process start", link]]


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """MB/s per cache state: raw read, verify's pass, verify's wall time."""
    cases = [e for e in _cases(groups) if _is_num(e.get("raw_read_bytes_per_s"))]
    if not cases:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = [("raw read (limit)", "raw_read_bytes_per_s"), ("verify pass (CLI's own)", "cli_bytes_per_s"),
            ("verify, wall (start included)", "verify_bytes_per_s")]
    xs = range(len(cases))
    for i, (name, key) in enumerate(bars):
        vals = [_mbps(e.get(key)) if _is_num(e.get(key)) else float("nan") for e in cases]
        ax.bar([x + (i - 1) * 0.27 for x in xs], vals, width=0.27, label=name)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"page cache {e.get('cache')}" for e in cases])
    ax.set_yscale("log")
    ax.set_ylabel("MB/s (1e6 B/s)")
    ax.set_title(f"quiver verify vs raw read, {_size(cases[0].get('stored_bytes'))}")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return [save_plot(fig, plots_dir, "cli-verify.png", "quiver verify vs the raw read of the same files")]
