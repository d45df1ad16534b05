"""Report section of identity safety (studies/bench_identity.py, group ``identity``): bytes of
other identities a naive store serves, and the cost of the guard."""

from __future__ import annotations

from .report_common import DASH, _absent, _ex, _is_num, _pct, _section_head, _size, _verdict, fmt, reproduce_line, table

GROUPS = ["identity"]
# Goal, not a result.
GUARD_OVERHEAD_GOAL_PCT = 1.0


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


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return identity_section(mode, groups["identity"])


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Cross-identity bytes naive vs guarded, and the guard's overhead against its goal."""
    rows = []
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
    return rows
