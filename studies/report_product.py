"""Report section of the index study through the product, issue 9 (studies/bench_product.py):
``BlockStore`` open, lookup, memory and builds per index backend, each beside its goal."""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, _absent, _div, _ex, _is_num, _ms, _plot_line, _section_head, _size, _txt,
                            _verdict, _x, fmt, pyplot, reproduce_line, save_plot, table)

PRODUCT_GROUPS = ["product-build", "product-open", "product-open-bytes"]
GROUPS = PRODUCT_GROUPS
PRODUCT_PERSISTENT = ("art", "lmdb", "lsm")
# Goals (issue 9), not results: each is compared with figures of this run.
PRODUCT_OPEN_GOAL_S = 1.0            # open + first get of a 1M-block store, warm, art/lmdb/lsm
PRODUCT_OPEN_GOAL_N = 1_000_000
PRODUCT_BYTES_GOAL_RATIO = 1.5       # "independent of the bytes stored": largest store ÷ small-payload store
PRODUCT_MISS_GOAL_MS = 0.1           # lookup, nothing cached
PRODUCT_HIT_GOAL_RATIO = 1.5         # lookup all-hit ÷ hashing the same prompt
PRODUCT_RSS_GOAL_B = 200.0           # RSS per resident block beyond the index's own files, at 1M


def _product_rows(groups: dict, group: str) -> dict:
    """{(backend, n): extra_info} of one product group (bytes rows: n = target bytes)."""
    out = {}
    for b in groups.get(group, []):
        e = _ex(b)
        key = e.get("target_bytes") if group == "product-open-bytes" else e.get("n")
        if e.get("backend") is not None and key is not None:
            out[(e["backend"], key)] = e
    return out


def _product_backends(groups: dict, available: list[str]) -> list[str]:
    seen = [_ex(b).get("backend") for g in PRODUCT_GROUPS for b in groups.get(g, [])]
    names = [b for b in available if b in seen] + [b for b in dict.fromkeys(seen) if b and b not in available]
    return sorted(names, key=lambda b: (b not in PRODUCT_PERSISTENT, PRODUCT_PERSISTENT.index(b)
                                        if b in PRODUCT_PERSISTENT else 0))


def _measured(e) -> bool:
    return bool(e) and not e.get("skipped")


def _skip_cell(e) -> str:
    if not e:
        return DASH
    return f"skipped: {e['skipped']}" if e.get("skipped") else ""


def _open_goal(n, backend, value, largest=None) -> str:
    """The verdict at N = 1M; at the backend's largest N when 1M was not measured, marked indicative."""
    if backend not in PRODUCT_PERSISTENT:
        return "n/a (memory-only)"
    if n != PRODUCT_OPEN_GOAL_N:
        if largest is not None and n == largest and largest < PRODUCT_OPEN_GOAL_N:
            return f"{_verdict(value, PRODUCT_OPEN_GOAL_S, False)} (indicative: N = {n:,}, not {PRODUCT_OPEN_GOAL_N:,})"
        return f"goal is at N = {PRODUCT_OPEN_GOAL_N:,}"
    return _verdict(value, PRODUCT_OPEN_GOAL_S, False)


def _rss_goal(n, backend, excess, largest=None) -> str:
    """RSS per block ≤ the index's files per block + 200 B: verdict at 1M (or indicative at the largest N)."""
    if backend not in PRODUCT_PERSISTENT:
        return "n/a (memory-only)"
    if n != PRODUCT_OPEN_GOAL_N and not (largest is not None and n == largest):
        return f"goal is at N = {PRODUCT_OPEN_GOAL_N:,}"
    v = ("met (RSS below the index files)" if _is_num(excess) and excess <= 0
         else _verdict(excess, PRODUCT_RSS_GOAL_B, False))
    return v if n == PRODUCT_OPEN_GOAL_N else f"{v} (indicative: N = {n:,})"


def product_open_summary(groups: dict, available: list[str]) -> dict:
    """The figures the headline and the section share: largest N measured per backend, etc."""
    opens = _product_rows(groups, "product-open")
    backends = _product_backends(groups, available)
    top = {}
    for b in backends:
        ns = [n for (bb, n), e in opens.items() if bb == b and _measured(e) and _is_num(e.get("open_get_s"))]
        if ns:
            top[b] = max(ns)
    return {"opens": opens, "backends": backends, "top": top}


def _open_lines(mode: str, groups: dict, t: dict) -> list[str]:
    """Open + first get vs blocks stored (group `product-open`)."""
    sm, opens, backends, builds, sizes = t["sm"], t["opens"], t["backends"], t["builds"], t["sizes"]
    if "product-open" not in groups:
        return []
    rows = []
    for n in sizes:
        for b in backends:
            e = opens.get((b, n))
            if not _measured(e):
                if e is not None or (b, n) in builds:
                    rows.append([f"{n:,}", b] + [DASH] * 8 + [_skip_cell(e or builds.get((b, n)))])
                continue
            rows.append([f"{n:,}", b, fmt(_ms(e.get("open_get_s"))), fmt(_ms(e.get("open_get_min_s"))),
                         fmt(_ms(e.get("open_s"))), fmt(_ms(e.get("get_s"))), fmt(e.get("reps"), "int"),
                         f"{fmt(_ms(e.get('first_open_s')))} ({_txt(e.get('first_open_note'))})",
                         fmt(_ms(e.get("code_load_s"))), _open_goal(n, b, e.get("open_get_s"), sm["top"].get(b)),
                         _txt(e.get("store_built_by"))])
    lines = ["### Open + first get vs blocks stored (group `product-open`)", "",
              f"`open + get` = `BlockStore.open` + one `get` of one stored block, median of `reps` processes. "
              f"Goal: ≤ {PRODUCT_OPEN_GOAL_S:g} s at N = {PRODUCT_OPEN_GOAL_N:,} for art, lmdb and lsm.", ""]
    lines += table(["N", "backend", "open + get ms", "min ms", "open ms", "get ms", "reps", "first open ms", "code load ms",
                    f"goal ≤ {PRODUCT_OPEN_GOAL_S:g} s at 1M", "built by / note"], rows)
    missing = [b for b in backends if b in PRODUCT_PERSISTENT and sm["top"].get(b) != PRODUCT_OPEN_GOAL_N]
    if missing:
        largest = ", ".join(f"{b} {sm['top'][b]:,}" for b in missing if b in sm["top"]) or DASH
        lines += [f"Not measured at N = {PRODUCT_OPEN_GOAL_N:,} in this run: {', '.join(missing)} "
                  f"(largest N measured: {largest}); "
                  "the skipped rows give the reason. Memory-only backends (flat, sorted) rebuild from the WAL at "
                  "every open, O(N) by design.", ""]
    lines += [reproduce_line(mode, groups["product-open"]), ""]
    return lines


def _bytes_lines(mode: str, groups: dict, t: dict) -> list[str]:
    """Open + first get vs bytes stored (group `product-open-bytes`)."""
    opens, backends, builds, byts = t["opens"], t["backends"], t["builds"], t["byts"]
    if "product-open-bytes" not in groups:
        return []
    rows = []
    targets = sorted({t for (_b, t) in byts})
    for b in backends:
        n0 = next((e.get("n") for (bb, _t), e in byts.items() if bb == b), None)
        small = opens.get((b, n0)) if n0 is not None else None
        small_build = builds.get((b, n0)) if n0 is not None else None
        if _measured(small):
            rows.append([b, f"{fmt(n0, 'int')}", _size(small.get("payload_bytes_per_block")),
                         fmt((small.get("store_bytes") or (small_build or {}).get("store_bytes") or 0) / 1e9),
                         fmt(_ms(small.get("open_get_s"))), fmt(_ms(small.get("open_get_min_s"))),
                         fmt(small.get("reps"), "int"), "×1.00 (reference)", DASH, ""])
        ref = small.get("open_get_s") if _measured(small) else None
        for t in targets:
            e = byts.get((b, t))
            if e is None:
                continue
            if not _measured(e):
                rows.append([b, fmt(e.get("n"), "int"), _size(e.get("payload_bytes_per_block")),
                             fmt(e.get("target_bytes", 0) / 1e9), DASH, DASH, DASH, DASH, DASH, _skip_cell(e)])
                continue
            r = _div(e.get("open_get_s"), ref)
            goal = _verdict(r, PRODUCT_BYTES_GOAL_RATIO, False) if t == targets[-1] and b in PRODUCT_PERSISTENT else ""
            rows.append([b, fmt(e.get("blocks"), "int"), _size(e.get("payload_bytes_per_block")),
                         fmt(e.get("stored_gb")), fmt(_ms(e.get("open_get_s"))), fmt(_ms(e.get("open_get_min_s"))),
                         fmt(e.get("reps"), "int"), _x(r), goal,
                         ""])
    lines = ["### Open + first get vs bytes stored (group `product-open-bytes`)", "",
              "The same block count as the sweep's smallest N, payloads scaled (1 layer × 2 × 16 tokens × k heads × "
              "head_dim 128) so the store holds about the stated bytes; one shared store per size, built by the "
              "first backend. `× small` = open + get ÷ the same backend's open of the small-payload store with the "
              "same N (group `product-open`). Goal (issue 9: open \"independent of the bytes stored\", made a "
              f"number here): the largest store ≤ ×{PRODUCT_BYTES_GOAL_RATIO:g} the small one, for art, lmdb and lsm.",
              ""]
    lines += table(["backend", "blocks", "payload/block", "stored GB", "open + get ms", "min ms", "reps", "× small",
                    f"goal ≤ ×{PRODUCT_BYTES_GOAL_RATIO:g}", "note"], rows)
    lines += [reproduce_line(mode, groups["product-open-bytes"]), ""]
    return lines


def _lookup_lines(mode: str, groups: dict, t: dict) -> list[str]:
    """Lookup through the store (the lookup columns of `product-open`)."""
    backends, looks, sizes = t["backends"], t["looks"], t["sizes"]
    if not any(_measured(e) and "hit_ms" in e for e in looks.values()):
        return []
    rows = []
    for n in sizes:
        for b in backends:
            e = looks.get((b, n))
            if e is None:
                continue
            if not _measured(e):
                continue      # the open table above gives the reason
            rows.append([f"{n:,}", b, fmt(e.get("lookup_tokens"), "int"), fmt(e.get("hash_ms")), fmt(e.get("hit_ms")),
                         f"{_x(e.get('hit_over_hash'))} — {_verdict(e.get('hit_over_hash'), PRODUCT_HIT_GOAL_RATIO, False)}",
                         fmt(e.get("miss_ms")), _verdict(e.get("miss_ms"), PRODUCT_MISS_GOAL_MS, False), ""])
    lines = ["### Lookup through the store (group `product-open`, the lookup columns)", "",
              "In the last timed open's process, after its figures were taken: "
              "`lookup(ident, tokens)` of the lookup prompt stored in every store: all-hit, and all-miss (its first "
              "token changed, so no block is cached), beside `engine.keys.chain_keys` of the same tokens (hashing "
              "alone); tokens as a numpy uint32 array; medians in ms (hashing and all-hit interleaved). Goals: "
              f"all-hit ≤ ×{PRODUCT_HIT_GOAL_RATIO:g} hashing, all-miss ≤ {PRODUCT_MISS_GOAL_MS:g} ms.", ""]
    lines += table(["N", "backend", "prompt tokens", "hashing ms", "all-hit ms",
                    f"hit ÷ hashing (goal ≤ ×{PRODUCT_HIT_GOAL_RATIO:g})", "all-miss ms",
                    f"all-miss goal ≤ {PRODUCT_MISS_GOAL_MS:g} ms", "note"], rows)
    lines += [reproduce_line(mode, groups["product-open"]), ""]
    return lines


def _memory_lines(mode: str, groups: dict, t: dict) -> list[str]:
    """Memory per resident block (groups `product-open`, `product-build`)."""
    sm, opens, backends, sizes = t["sm"], t["opens"], t["backends"], t["sizes"]
    if "product-open" not in groups:
        return []
    rows = []
    for n in sizes:
        for b in backends:
            e = opens.get((b, n))
            if not _measured(e):
                continue
            goal = _rss_goal(n, b, e.get("rss_excess_per_block"), sm["top"].get(b))
            rows.append([f"{n:,}", b, fmt(e.get("blocks"), "int"), fmt(e.get("rss_per_block")),
                         fmt(e.get("rss_anon_per_block")), fmt(e.get("rss_file_per_block")),
                         fmt(e.get("index_disk_per_block")), fmt(e.get("rss_excess_per_block")), goal,
                         fmt(e.get("rss_after_put_per_block"))])
    lines = ["### Memory per resident block (groups `product-open`, `product-build`)", "",
              "Bytes per block: process RSS (`/proc/self/status` VmRSS) after open + first get minus the same "
              "process's RSS before the open (after the tiny store that loads the backend's code, gc and "
              "malloc_trim), divided by the blocks stored; RssAnon and RssFile split it (an mmap'd index, LMDB, "
              "shows as RssFile). `index files` = the index's own directory (`<store>/l1/index*`) per block; "
              "`beyond index files` = RSS − index files, the figure the goal "
              f"(≤ {PRODUCT_RSS_GOAL_B:g} B/block on top of the index's own files at N = {PRODUCT_OPEN_GOAL_N:,}, "
              "art/lmdb/lsm) is about, read literally: RSS per block ≤ index files per block + "
              f"{PRODUCT_RSS_GOAL_B:g} B (an index whose files are not all resident, LMDB or RocksDB, can come out "
              "negative). Where N = 1M was not measured the verdict at the largest N is marked indicative. "
              "`after put` = RSS growth of the building process over its puts (only for the backend that built "
              "the store). At small N the fixed costs dominate: read the largest N.", ""]
    lines += table(["N", "backend", "blocks", "RSS B/block", "RssAnon B/block", "RssFile B/block",
                    "index files B/block", "beyond index files B/block",
                    f"goal ≤ {PRODUCT_RSS_GOAL_B:g} B at 1M", "after put (in-process) B/block"], rows)
    return lines


def _build_lines(mode: str, groups: dict, t: dict) -> list[str]:
    """Builds and index bytes per put (group `product-build`)."""
    backends, builds, sizes, any_e = t["backends"], t["builds"], t["sizes"], t["any_e"]
    if "product-build" not in groups:
        return []
    rows = []
    for n in sizes:
        for b in backends:
            e = builds.get((b, n))
            if e is None:
                continue
            if not _measured(e):
                rows.append([f"{n:,}", b] + [DASH] * 10 + [_skip_cell(e)])
                continue
            rows.append([f"{n:,}", b, fmt(e.get("blocks"), "int"), fmt(e.get("put_calls"), "int"),
                         fmt(e.get("put_blocks_per_s"), "rate"), fmt(e.get("index_tail_puts"), "int"),
                         fmt(e.get("index_bytes_per_put"), "int"), fmt(e.get("index_bytes_per_block")),
                         _txt(e.get("index_bytes_source")), fmt(e.get("index_disk_per_block")),
                         fmt(e.get("store_bytes"), "mib"), fmt(e.get("rss_after_put_per_block")), ""])
    srcs = {e.get("index_bytes_source") for e in builds.values() if _measured(e)}
    lines = ["### Builds and index bytes per put (group `product-build`)", "",
              f"Each `put` call stores {fmt(any_e.get('batch'), 'int')} blocks, after a first one that stores the "
              "lookup prompt. `index bytes/put`: what the index's files grew by over the build's last "
              f"{fmt(any_e.get('index_tail_puts') or 8, 'int')} puts (fewer when the build has fewer) ÷ those puts; "
              "`/block` ÷ their blocks; `index files` = the index's directory after close, per block stored"
              + (" — `store.stats()[\"l1\"]` does not expose the index's own `bytes_written`, so this is the net "
                 "growth of its directory (os.walk), not the bytes it wrote (a compaction or snapshot rewrite is "
                 "not counted)" if "stats" not in srcs else "") + "; memory-only backends write no index file. "
              "Build rates are with fsync masked (not durable put rates).", ""]
    lines += table(["N", "backend", "blocks", "put calls", "blocks/s (fsync masked)", "measured puts",
                    "index bytes/put", "index bytes/block", "measured by", "index files B/block", "store MiB",
                    "RSS after put B/block", "note"], rows)
    lines += [reproduce_line(mode, groups["product-build"]), ""]
    return lines


def product_section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    available = q.get("index_backends") or []
    sm = product_open_summary(groups, available)
    opens, backends = sm["opens"], sm["backends"]
    builds = _product_rows(groups, "product-build")
    looks = opens     # lookup is measured in the last open process of each row
    byts = _product_rows(groups, "product-open-bytes")
    sizes = sorted({n for (_b, n) in opens} | {n for (_b, n) in builds})
    lines = _section_head("product", "Index through the product: `BlockStore` per backend (issue 9)")
    any_e = next((e for e in list(opens.values()) + list(builds.values()) if e), {})
    lines += [
        "The index study measured where the product uses it: `BlockStore.open(path, index=…)`, `lookup`, `put` and "
        "`get` (public API only), one backend per row, each figure taken in a fresh Python process. Blocks of "
        f"the block-count sweep: 1 layer × 2 × 16 tokens × 1 head × head_dim 8, float16 "
        f"({_size(any_e.get('payload_bytes_per_block'))} payload), stored {fmt(any_e.get('batch'), 'int')} per "
        "`put` call; `ram_bytes=0` (no L0: every get is served by L1, as after a restart). Stores are built with "
        "`os.fsync` made a no-op in the building process (then one `os.sync()`), so build rates are not durable "
        "put rates. Above the smallest N one *shared* store is built by the first backend (`built by`); another "
        "backend's first open of it rebuilds its index from the WAL (`first open`, untimed in the figures), the "
        "timed opens are the steady state. Page cache warm: a warm-up open in its own process precedes the timed "
        "ones, so the ART's Numba cache on disk is warm too; `code load` is the first open + put + get + close of "
        "a tiny store in the same process, before the timed open, so the timed figure is the store's own cost. "
        f"Machine: {q.get('cpu_count', DASH)} cores (see the header). Goals are constants (issue 9); every figure "
        "and verdict is from this run.",
        "",
    ]
    t = dict(sm=sm, opens=opens, backends=backends, builds=builds, looks=looks, byts=byts, sizes=sizes, any_e=any_e,
             available=available)
    lines += _open_lines(mode, groups, t) + _bytes_lines(mode, groups, t)
    lines += _plot_line(plots, "product-open.png")
    for part in (_lookup_lines, _memory_lines, _build_lines):
        lines += part(mode, groups, t)
    # -- how much the index choice matters
    spread = product_spread(groups, available)
    if spread:
        lines += ["### How much the index choice changes the product", ""]
        lines += [f"- {s}" for s in spread] + [""]
    return lines


def product_spread(groups: dict, available: list[str]) -> list[str]:
    """Slowest ÷ fastest backend for open and lookup, at the largest N where ≥ 2 backends were measured."""
    out = []
    for group, key, what in (("product-open", "open_get_s", "open + first get"),
                             ("product-open", "hit_ms", "lookup all-hit"),
                             ("product-open", "miss_ms", "lookup all-miss")):
        rows = _product_rows(groups, group)
        by_n: dict = {}
        for (b, n), e in rows.items():
            if _measured(e) and _is_num(e.get(key)) and e[key] > 0:
                by_n.setdefault(n, {})[b] = e[key]
        ns = [n for n, v in by_n.items() if len(v) >= 2]
        if not ns:
            continue
        n = max(ns)
        v = by_n[n]
        lo, hi = min(v, key=v.get), max(v, key=v.get)
        if key.endswith("_s"):
            v = {b: x * 1e3 for b, x in v.items()}
        unit = "ms"
        out.append(f"{what} at N = {n:,}: fastest {lo} {fmt(v[lo])} {unit}, slowest {hi} {fmt(v[hi])} {unit} "
                   f"({_x(v[hi] / v[lo])}); " + ", ".join(f"{b} {fmt(x)}" for b, x in sorted(v.items(), key=lambda t: t[1])))
    return out


def product_headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """The index headline, product-level: open at the largest N, open vs bytes, lookup, memory."""
    link = "[product](#product)"
    if not any(g in groups for g in PRODUCT_GROUPS):
        return [["BlockStore open / lookup per index backend", _absent("product-open"), DASH, DASH]]
    sm = product_open_summary(groups, available)
    opens, top = sm["opens"], sm["top"]
    rows = []
    pers = [b for b in sm["backends"] if b in PRODUCT_PERSISTENT]
    if top:
        parts = []
        for b in pers + [b for b in sm["backends"] if b not in pers]:
            if b not in top:
                continue
            e = opens[(b, top[b])]
            v = _open_goal(top[b], b, e.get("open_get_s"), top[b]) if b in PRODUCT_PERSISTENT else "memory-only"
            parts.append(f"{b} {fmt(_ms(e.get('open_get_s')))} ms at {top[b]:,} blocks: {v}")
        rows.append([f"BlockStore open + first get (goal ≤ {PRODUCT_OPEN_GOAL_S:g} s at {PRODUCT_OPEN_GOAL_N:,} blocks, "
                     "art/lmdb/lsm)", "; ".join(parts),
                     "largest N measured per backend, 512 B payloads, page cache warm", link])
    byts = _product_rows(groups, "product-open-bytes")
    parts = []
    for b in pers:
        ms = [(t, e) for (bb, t), e in byts.items() if bb == b and _measured(e)]
        if not ms:
            continue
        t, e = max(ms, key=lambda x: x[0])
        small = opens.get((b, e.get("n")))
        r = _div(e.get("open_get_s"), small.get("open_get_s")) if _measured(small) else None
        parts.append(f"{b} {fmt(_ms(small.get('open_get_s')) if small else None)} ms → {fmt(_ms(e.get('open_get_s')))} ms at "
                     f"{fmt(e.get('stored_gb'))} GB ({_x(r)}: {_verdict(r, PRODUCT_BYTES_GOAL_RATIO, False)})")
    if parts:
        n0 = next((e.get("n") for e in byts.values()), None)
        rows.append([f"Open vs bytes stored (goal: independent, ≤ ×{PRODUCT_BYTES_GOAL_RATIO:g})", "; ".join(parts),
                     f"{fmt(n0, 'int')} blocks, small payload → the largest store", link])
    elif "product-open-bytes" in groups:
        rows.append(["Open vs bytes stored", f"{DASH} (every size skipped: see the section)", DASH, link])
    looks = opens
    ln = [n for (b, n), e in looks.items() if _measured(e) and _is_num(e.get("hit_ms"))]
    if ln:
        n = max(ln)
        parts = []
        for b in sm["backends"]:
            e = looks.get((b, n))
            if _measured(e):
                parts.append(f"{b} hit {_x(e.get('hit_over_hash'))} hashing "
                             f"({'met' if _is_num(e.get('hit_over_hash')) and e['hit_over_hash'] <= PRODUCT_HIT_GOAL_RATIO else '**missed**'}), "
                             f"miss {fmt(e.get('miss_ms'))} ms "
                             f"({'met' if _is_num(e.get('miss_ms')) and e['miss_ms'] <= PRODUCT_MISS_GOAL_MS else '**missed**'})")
        tok = next((looks[(b, n)].get("lookup_tokens") for b in sm["backends"] if _measured(looks.get((b, n)))), None)
        rows.append([f"lookup through the store: all-hit ÷ hashing (goal ≤ ×{PRODUCT_HIT_GOAL_RATIO:g}), all-miss "
                     f"(goal ≤ {PRODUCT_MISS_GOAL_MS:g} ms)", "; ".join(parts),
                     f"{fmt(tok, 'int')}-token prompt, store of {n:,} blocks", link])
    mem = []
    for b in pers:
        if b in top:
            e = opens[(b, top[b])]
            v = _rss_goal(top[b], b, e.get("rss_excess_per_block"), top[b])
            mem.append(f"{b} {fmt(e.get('rss_per_block'))} B at {top[b]:,} ({fmt(e.get('rss_excess_per_block'))} B beyond "
                       f"its index files: {v})")
    if mem:
        rows.append([f"RSS per resident block (goal ≤ {PRODUCT_RSS_GOAL_B:g} B beyond the index files at 1M)",
                     "; ".join(mem), "after open + first get, largest N measured", link])
    spread = product_spread(groups, available)
    if spread:
        rows.append(["How much the index choice changes open and lookup (slowest ÷ fastest)",
                     "; ".join(s.split(";")[0] for s in spread), "same N, same store", link])
    return rows


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return product_section(mode, groups, plots, q)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    return product_headline_rows(groups, available)


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """Open + first get vs blocks stored and vs bytes stored, one figure of two panels."""
    p_open = _product_rows(groups, "product-open")
    p_bytes = _product_rows(groups, "product-open-bytes")
    p_backends = _product_backends(groups, available)
    if not any(_measured(e) and _is_num(e.get("open_get_s")) and e["open_get_s"] > 0 for e in p_open.values()):
        return []
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {}
    for b in p_backends:
        pts = sorted((n, e["open_get_s"]) for (bb, n), e in p_open.items()
                     if bb == b and _measured(e) and _is_num(e.get("open_get_s")) and e["open_get_s"] > 0)
        if pts:
            line = ax1.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=b)
            colors[b] = line[0].get_color()
        gb = []
        for (bb, _t), e in p_bytes.items():
            if bb == b and _measured(e) and _is_num(e.get("open_get_s")) and _is_num(e.get("stored_gb")):
                gb.append((e["stored_gb"], e["open_get_s"], e.get("n")))
        if gb:
            small = p_open.get((b, gb[0][2]))
            if _measured(small) and _is_num(small.get("store_bytes")) and _is_num(small.get("open_get_s")):
                gb.append((small["store_bytes"] / 1e9, small["open_get_s"], gb[0][2]))
            gb.sort()
            ax2.plot([x for x, _, _ in gb], [y for _, y, _ in gb], marker="s", label=b, color=colors.get(b))
    for ax in (ax1, ax2):
        ax.axhline(PRODUCT_OPEN_GOAL_S, color="k", linestyle="--", linewidth=0.8,
                   label=f"goal {PRODUCT_OPEN_GOAL_S:g} s (art/lmdb/lsm, 1M blocks)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_xlabel("blocks stored (512 B payloads)")
    ax1.set_ylabel("open + first get, s (median, warm)")
    ax1.set_title("vs blocks stored")
    n0 = next((e.get("n") for e in p_bytes.values()), None)
    ax2.set_xlabel(f"GB stored ({n0:,} blocks)" if _is_num(n0) else "GB stored")
    ax2.set_title("vs bytes stored, same block count")
    ax1.legend(fontsize=7)
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.suptitle("BlockStore open + first get, per index backend")
    return [save_plot(fig, plots_dir, "product-open.png", "BlockStore open + first get vs blocks and vs bytes stored")]
