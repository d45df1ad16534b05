"""Report section of time to first token with a transformers model: full prefill vs the
prefix restored from L0 / L1 / L2 (studies/bench_ttft.py, group ``ttft``)."""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, mb_per_s, prefix_path_cells, _absent, _ex, _is_num, _ms, _plot_line, _section_head, _size,
                            _txt, _verdict, _x, fmt, pyplot, reproduce_line, save_plot, table)

GROUPS = ["ttft"]
# Goal, not a result.
TTFT_STORE_SHARE_GOAL_PCT = 10.0
TTFT_PATHS = ["full", "l0", "l1", "l2"]


def _misses(prefixes: list[int], cells: dict, goal: float, paths_cases: list[dict]) -> list[str]:
    """Why each missed share missed, from the run's own figures: the get rate the goal
    asks for beside the one measured, and what the get's three passes over the bytes cost
    at the rates the same run measured for them (engine-paths study, at the block size
    nearest this study's: the l1-batch floor = a page-cache read + one CRC pass, read as a
    get reads a batch; the l0-batch limit = a memcpy)."""
    out, sizes, blocks = [], [], []
    for P in prefixes:
        for path in TTFT_PATHS[1:]:
            e = cells.get((P, path)) or {}
            share, prefill, kv = e.get("store_share"), e.get("suffix_prefill_s"), e.get("kv_bytes")
            if _is_num(share) and share > goal and _is_num(prefill):
                out.append(e)
                sizes += [kv] if _is_num(kv) else []
                blocks += [kv / e["blocks"]] if _is_num(kv) and _is_num(e.get("blocks")) and e["blocks"] else []
    if not out:
        return []
    sizes_measured = [c["block_bytes"] for c in paths_cases if _is_num(c.get("block_bytes"))]
    size = min(sizes_measured, key=lambda b: abs(b - blocks[0]) if blocks else 0, default=None)

    def case(path: str) -> dict:
        return next((c for c in paths_cases if c.get("path") == path and c.get("block_bytes") == size), {})
    l1, l0 = case("l1-batch"), case("l0-batch")
    read_check, copy = mb_per_s(l1.get("bytes"), l1.get("floor_s")), mb_per_s(l0.get("bytes"), l0.get("limit_s"))
    said = []
    for e in out:
        share, prefill, kv = e["store_share"], e["suffix_prefill_s"], e.get("kv_bytes")
        left = goal * prefill - sum(e.get(k) or 0.0 for k in ("lookup_s", "scatter_s"))
        need = mb_per_s(kv, left) if left > 0 else None
        passes = kv / 1e6 / read_check + kv / 1e6 / copy if read_check and copy and _is_num(kv) else None
        said.append(f"P = {e['prefix_tokens']:,} from {e['path'].upper()}: store {fmt(_ms(e.get('store_s')))} ms "
                    f"against {fmt(_ms(goal * prefill))} ms ({TTFT_STORE_SHARE_GOAL_PCT:g}% of the suffix prefill), "
                    f"missed by {_x(share / goal)}; the get moved {fmt(e.get('get_mb_per_s'))} MB/s "
                    f"({fmt(_ms(e.get('get_s')))} ms) where the goal asks {fmt(need)} MB/s"
                    + (f", and its passes one after another at this run's rates take {fmt(_ms(passes))} ms"
                       if passes else ""))
    why = (" A get from L1 or L2 reads every byte from the page cache, checks it (one CRC32C pass) and copies it "
           "into the model's cache.")
    if read_check and copy:
        why += (f" This run's engine-paths study measured the read and check at {fmt(read_check)} MB/s (`l1-batch` "
                f"floor) and a copy at {fmt(copy)} MB/s (`l0-batch` memcpy), blocks of {_size(size)}, in batches "
                f"of {_span([l1.get('bytes'), l0.get('bytes')])}, most of whose bytes stay in the CPU caches; a "
                f"restore of {_span(sizes)} streams each pass through memory, so part of the gap between the get and "
                "its passes is memory bandwidth and part the get's own cost: this run does not separate the two.")
    return ["**Misses.** " + "; ".join(said) + "." + why, ""]


def _span(sizes: list) -> str:
    """The sizes' range as "32 MiB–128 MiB" (one size: itself)."""
    lo, hi = _size(min(sizes, default=None)), _size(max(sizes, default=None))
    return lo if lo == hi else f"{lo}–{hi}"


def ttft_section(mode: str, benches: list[dict], plots, paths_cases: list[dict] | None = None) -> list[str]:
    prefixes, cells = prefix_path_cells(benches)
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
        "then the suffix forward. store = lookup + get + scatter: the get writes the model's cache itself (a "
        "`DynamicCacheSink`: an L0 hit is copied once, from its slot into the cache; L1/L2 blocks are read 4 MiB at a "
        "time into a reused buffer and copied from there), so `scatter` is only the cache's assembly; store share = store / suffix "
        f"prefill (goal ≤ {TTFT_STORE_SHARE_GOAL_PCT:g}%); speedup = full TTFT / this TTFT, same P, same run.", "",
    ]
    lines += table(["prefix tokens", "path", "TTFT ms", "speedup", "store ms", "lookup ms", "get ms", "scatter ms",
                    "suffix prefill ms", "store share", f"goal ≤ {TTFT_STORE_SHARE_GOAL_PCT:g}%", "get MB/s",
                    "prefix KV"], rows)
    lines += _misses(prefixes, cells, goal, paths_cases or [])
    puts = [f"P = {P:,}: {fmt(_ms(cells[(P, 'full')].get('populate_put_s')))} ms "
            f"({fmt(cells[(P, 'full')].get('populate_put_mb_per_s'))} MB/s)" for P in prefixes if (P, "full") in cells]
    if puts:
        lines += ["Storing the prefix after the full prefill (`BlockStore.put`, after the first token, so not in its "
                  "TTFT): " + "; ".join(puts) + ".", ""]
    return lines + [reproduce_line(mode, benches), ""] + _plot_line(plots, "ttft.png")


def ttft_headline_rows(benches: list[dict]) -> list[list[str]]:
    """TTFT at the largest prefix: each restore path's speedup over the full prefill, and the store's share."""
    prefixes, cells = prefix_path_cells(benches)
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


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return ttft_section(mode, groups["ttft"], plots, [_ex(b) for b in groups.get("engine-paths", [])])


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    tt = groups.get("ttft", [])
    if not tt:
        return [["TTFT speedup", _absent("ttft"), DASH, "[ttft](#ttft)"]]
    return ttft_headline_rows(tt)


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """TTFT vs prefix length, one line per path."""
    tt = [b.get("extra_info") or {} for b in groups.get("ttft", [])]
    tt = [e for e in tt if _is_num(e.get("prefix_tokens")) and _is_num(e.get("ttft_s")) and e["ttft_s"] > 0]
    if not tt:
        return []
    plt = pyplot()
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
    return [save_plot(fig, plots_dir, "ttft.png", "TTFT vs prefix length")]
