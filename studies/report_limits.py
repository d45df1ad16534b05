"""Report section of the physical limits (studies/bench_limits.py, group ``limits``)."""

from __future__ import annotations

from .report_common import DASH, _ms, fmt, reproduce_line, table

GROUPS = ["limits"]


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


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return limits_section(mode, groups["limits"])
