"""Report section of keying a prompt with ``chain_keys`` (studies/bench_keys.py, group ``keys``)."""

from __future__ import annotations

import math

from .report_common import DASH, _absent, _ex, _is_num, _section_head, fmt, reproduce_line, table

GROUPS = ["keys"]


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


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return keys_section(mode, groups["keys"])


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Keying the longest prompt of the run, unkeyed and keyed per tenant."""
    keys = [_ex(b) for b in groups.get("keys", [])]
    if not keys:
        return [["Time to key a long prompt", _absent("keys"), DASH, "[keys](#keys)"]]
    rows = []
    top = max((e.get("tokens") or 0) for e in keys)
    for keyed in (False, True):
        cands = [e for e in keys if e.get("tokens") == top and bool(e.get("keyed")) == keyed]
        best = min(cands, key=lambda e: e.get("ms_per_prompt") if _is_num(e.get("ms_per_prompt")) else math.inf,
                   default={})
        rows.append([f"Time to key a {top:,}-token prompt ({'keyed' if keyed else 'unkeyed'})",
                     f"{fmt(best.get('ms_per_prompt'))} ms ({fmt(best.get('ns_per_block'))} ns/block)",
                     f"{fmt(best.get('blocks'), 'int')} blocks of 16 tokens, {fmt(best.get('input'))} input",
                     "[keys](#keys)"])
    return rows
