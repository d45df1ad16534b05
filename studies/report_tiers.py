"""Report section of the tiers (studies/bench_tiers.py): L0 + L1 on the Mooncake trace, and
restoring one block from each tier beside memcpy."""

from __future__ import annotations

from .report_common import (DASH, _absent, _budget, _div, _ex, _is_num, _section_head, _size, _x, fmt,
                            reproduce_line, table)

GROUPS = ["tiers-mooncake", "tiers-restore"]


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


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return tiers_section(mode, groups, plots)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Hit ratio through L0 + L1 at the largest budgets, and one block's restore p50 per tier
    (tier internals; the through-the-API figures are the engine-paths rows)."""
    rows = []
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
        rows.append(["Restore one block, tier internals (RamTier / DiskTier / ObjectStore, not BlockStore: see the engine-paths rows): L0 / L1 warm / L2 warm (p50)",
                     f"{fmt(p50.get('l0'))} / {fmt(p50.get('l1-warm'))} / {fmt(p50.get('l2-warm'))} µs "
                     f"(memcpy {fmt(p50.get('memcpy'))} µs)", f"{_size(size)} block", "[tiers](#tiers)"])
    if not mc and not rs:
        rows.append(["Tiers", _absent("tiers-*"), DASH, "[tiers](#tiers)"])
    return rows
