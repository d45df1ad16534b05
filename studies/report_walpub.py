"""Report section of walpub (studies/bench_walpub.py, studies/walpub_campaign.py): durable
publish beside the fsync'd disk, write amplification against RocksDB, recovery after
SIGKILL and the crash campaign."""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, _absent, _div, _ex, _is_num, _ms, _plot_line, _section_head, _size, _x, fmt,
                            pyplot, reproduce_line, save_plot, table)

GROUPS = ["walpub-publish", "walpub-amplification", "walpub-recovery", "walpub-campaign"]


def walpub_section(mode: str, groups: dict, plots) -> list[str]:
    lines = _section_head("walpub", "walpub: durable publish, write amplification, recovery, crash campaign")
    pub = groups.get("walpub-publish", [])
    if pub:
        base = next((_ex(b) for b in pub if _ex(b).get("store") == "fsync'd sequential write"), {})
        base_mb = base.get("mb_per_s")
        lines += [
            "### Publish throughput (group `walpub-publish`)", "",
            "`publish` of one block is durable on return. `disk MB/s` is the fsync'd sequential write bandwidth "
            "(1 MiB write + fsync into one file, same directory) measured right before each case, and `× disk` the "
            f"publish MB/s over it; `× baseline` compares with the longer baseline run of the same write pattern "
            f"({fmt(base_mb)} MB/s, {_size(base.get('payload_bytes'))}). 1 MB = 1e6 bytes. `fsyncs/block warm` "
            "leaves out the first-use fsyncs of the 256 `objects/ab/` directories of a fresh volume.", "",
        ]
        rows = []
        cases = sorted((b for b in pub if _ex(b).get("store") == "walpub"),
                       key=lambda b: (_ex(b).get("block_bytes") or 0, _ex(b).get("threads") or 0))
        for b in cases:
            e = _ex(b)
            rows.append([_size(e.get("block_bytes")), fmt(e.get("threads"), "int"), fmt(e.get("blocks"), "int"),
                         fmt(e.get("blocks_per_s"), "rate"), fmt(e.get("mb_per_s")), fmt(e.get("disk_mb_per_s")),
                         _x(e.get("ratio_to_disk")), _x(_div(e.get("mb_per_s"), base_mb)),
                         fmt(e.get("fsyncs_per_block")), fmt(e.get("fsyncs_per_block_warm")),
                         fmt(e.get("wal_fsyncs_per_block")), fmt(e.get("commits"), "int")])
        lines += table(["block", "threads", "blocks", "blocks/s", "MB/s", "disk MB/s", "× disk", "× baseline",
                        "fsyncs/block", "fsyncs/block warm", "WAL fsyncs/block", "group commits"], rows)
        lines += [reproduce_line(mode, pub), ""] + _plot_line(plots, "walpub-publish.png")
    amp = groups.get("walpub-amplification", [])
    if amp:
        by = {}
        for b in amp:
            e = _ex(b)
            by.setdefault(e.get("block_bytes"), {})[e.get("store")] = e
        rows = []
        for size in sorted(k for k in by if k is not None):
            w, r = by[size].get("walpub", {}), by[size].get("rocksdb", {})
            rows.append([_size(size), fmt(w.get("blocks", r.get("blocks")), "int"),
                         fmt(w.get("write_amplification")), fmt(r.get("write_amplification")),
                         _x(_div(r.get("write_amplification"), w.get("write_amplification"))),
                         fmt(w.get("disk_bytes_per_payload_byte")), fmt(r.get("disk_bytes_per_payload_byte")),
                         fmt(w.get("mb_per_s")), fmt(r.get("mb_per_s"))])
        lines += [
            "### Write amplification: walpub vs RocksDB (group `walpub-amplification`)", "",
            "The same random blocks, one per call, durable on return in both stores (walpub `publish`; RocksDB "
            "`put` with `WriteOptions.sync`, then a memtable flush). Written = `/proc/self/io` write_bytes per "
            "payload byte (page-granular: a re-dirtied 4 KiB page counts each time); on disk = file bytes left per "
            "payload byte.", "",
        ]
        lines += table(["block", "blocks", "walpub written/payload", "RocksDB written/payload", "RocksDB ÷ walpub",
                        "walpub on disk/payload", "RocksDB on disk/payload", "walpub MB/s", "RocksDB MB/s"], rows)
        lines += [reproduce_line(mode, amp), ""]
    rec = groups.get("walpub-recovery", [])
    if rec:
        rows = []
        for b in rec:
            e = _ex(b)
            rows.append([fmt(e.get("base_blocks"), "int"), fmt(e.get("backend")), fmt(e.get("verify")),
                         fmt(e.get("blocks"), "int"), fmt(_ms(e.get("recovery_s"))), fmt(e.get("blocks_per_s"), "rate"),
                         fmt(e.get("index_mode")), fmt(e.get("tail_blocks"), "int"), fmt(e.get("segments"), "int"),
                         fmt(e.get("truncated"), "int"), fmt(e.get("orphans_removed"), "int")])
        lines += [
            "### Recovery after SIGKILL (group `walpub-recovery`)", "",
            "`Volume.open` after a child published a tail of blocks and SIGKILLed itself; page cache warm. "
            "`verify` crc reads every object, size only stats it. The base volume is shared by the rows in turn, "
            "so `live blocks` grows by the tail per row.", "",
        ]
        lines += table(["base blocks", "index backend", "verify", "live blocks", "recovery ms", "blocks/s",
                        "index mode", "tail blocks", "WAL segments", "truncated", "orphans removed"], rows)
        lines += [reproduce_line(mode, rec), ""]
    camp = groups.get("walpub-campaign", [])
    if camp:
        lines += campaign_lines(camp) + [reproduce_line(mode, camp), ""]
    return lines


def campaign_totals(camp: list[dict]) -> dict:
    """Crash states, kills, flips and violations summed over the campaign's parts (None when a part is absent)."""
    states = kills = flips = None
    violations = 0
    seen = False
    for b in camp:
        e = _ex(b)
        if _is_num(e.get("distinct_states")):
            states = e["distinct_states"]
        if _is_num(e.get("kills")):
            kills = e["kills"]
        if _is_num(e.get("flips")):
            flips = e["flips"]
        if _is_num(e.get("violations")):
            violations += e["violations"]
            seen = True
    return {"states": states, "kills": kills, "flips": flips, "violations": violations if seen else None}


def campaign_lines(camp: list[dict]) -> list[str]:
    parts = {}
    for b in camp:
        name = b.get("name", "")
        key = "states" if "crash_states" in name else "kills" if "sigkill" in name else "flips" if "bitflip" in name else name
        parts[key] = _ex(b)
    s, k, f = parts.get("states", {}), parts.get("kills", {}), parts.get("flips", {})
    rows = [
        ["crash states (walpub.crashsim)", fmt(s.get("distinct_states"), "int"),
         f"{fmt(s.get('states_explored'), 'int')} explored, {fmt(s.get('checked'), 'int')} checked, "
         f"{fmt(s.get('recovery_crash_states'), 'int')} inside recovery, {fmt(s.get('crash_points'), 'int')} crash points, "
         f"{fmt(s.get('workloads'), 'int')} workloads", fmt(s.get("seconds")), fmt(s.get("violations"), "int")],
        ["SIGKILL (real processes)", fmt(k.get("kills"), "int"),
         f"per backend {fmt(k.get('kills_per_backend'))}; {fmt(k.get('random_kills'), 'int')} random, "
         f"{fmt(k.get('crash_point_kills'), 'int')} at {fmt(k.get('crash_points_hit'), 'int')} crash points, "
         f"{fmt(k.get('recovery_kills'), 'int')} inside recovery; {fmt(k.get('torn_tails'), 'int')} torn tails; "
         f"{fmt(k.get('acked_blocks'), 'int')} acked blocks and {fmt(k.get('acked_deletes'), 'int')} acked deletes "
         f"checked over {fmt(k.get('recoveries_checked'), 'int')} recoveries", fmt(k.get("seconds")),
         fmt(k.get("violations"), "int")],
        ["bit flips (real files)", fmt(f.get("flips"), "int"),
         f"{fmt(f.get('object_flips'), 'int')} in objects ({fmt(f.get('object_detected_at_recovery'), 'int')} caught "
         f"at recovery, {fmt(f.get('object_detected_at_read'), 'int')} at read); {fmt(f.get('wal_flips'), 'int')} in "
         f"the WAL ({fmt(f.get('wal_cut_lost_records'), 'int')} cut the log losing records, "
         f"{fmt(f.get('wal_cut_no_loss'), 'int')} cut without loss, {fmt(f.get('undetected_no_effect'), 'int')} no "
         f"observable effect); wrong bytes served {fmt(f.get('wrong_bytes_served'), 'int')}",
         fmt(f.get("seconds")), fmt(f.get("violations"), "int")],
    ]
    t = campaign_totals(camp)
    return (["### Crash campaign (group `walpub-campaign`)", "",
             "Every recovered state is checked against the model: an acknowledged block is readable and exact, "
             "nothing unacknowledged is served as data. Violations must be 0.", ""]
            + table(["part", "count", "detail", "seconds", "violations"], rows)
            + [f"Totals: {fmt(t['states'], 'int')} distinct crash states, {fmt(t['kills'], 'int')} SIGKILLs, "
               f"{fmt(t['flips'], 'int')} bit flips, **{fmt(t['violations'], 'int')} violations**.", ""])


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return walpub_section(mode, groups, plots)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Durable publish vs the fsync'd write per block size, write amplification, the crash campaign."""
    rows = []
    pub = [_ex(b) for b in groups.get("walpub-publish", []) if _ex(b).get("store") == "walpub"]
    if pub:
        for size in sorted({e.get("block_bytes") for e in pub if _is_num(e.get("block_bytes"))}):
            best = max((e for e in pub if e.get("block_bytes") == size),
                       key=lambda e: e.get("mb_per_s") if _is_num(e.get("mb_per_s")) else -1)
            rows.append([f"walpub durable publish, {_size(size)} blocks",
                         f"{fmt(best.get('mb_per_s'))} MB/s = {_x(best.get('ratio_to_disk'))} the fsync'd sequential "
                         f"write ({fmt(best.get('disk_mb_per_s'))} MB/s); {fmt(best.get('fsyncs_per_block'))} fsyncs/block",
                         f"{fmt(best.get('threads'), 'int')} threads (best of the run), {fmt(best.get('blocks'), 'int')} blocks",
                         "[walpub](#walpub)"])
    else:
        rows.append(["walpub durable publish vs fsync'd write", _absent("walpub-publish"), DASH, "[walpub](#walpub)"])
    amp = [_ex(b) for b in groups.get("walpub-amplification", [])]
    if amp:
        small = min(e.get("block_bytes") for e in amp if _is_num(e.get("block_bytes")))
        w = next((e for e in amp if e.get("block_bytes") == small and e.get("store") == "walpub"), {})
        r = next((e for e in amp if e.get("block_bytes") == small and e.get("store") == "rocksdb"), {})
        rows.append(["Write amplification, walpub vs RocksDB",
                     f"{fmt(w.get('write_amplification'))} vs {fmt(r.get('write_amplification'))} bytes written per payload byte",
                     f"{_size(small)} blocks, durable on return", "[walpub](#walpub)"])
    camp = groups.get("walpub-campaign", [])
    if camp:
        t = campaign_totals(camp)
        rows.append(["Crash campaign", f"{fmt(t['states'], 'int')} crash states, {fmt(t['kills'], 'int')} SIGKILLs, "
                     f"{fmt(t['flips'], 'int')} bit flips: **{fmt(t['violations'], 'int')} violations**",
                     "every recovered state checked", "[walpub](#walpub)"])
    else:
        rows.append(["Crash campaign", _absent("walpub-campaign"), DASH, "[walpub](#walpub)"])
    return rows


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """Publish MB/s vs block size, one line per thread count, beside the fsync'd write."""
    pub = [b.get("extra_info") or {} for b in groups.get("walpub-publish", [])]
    cases = [e for e in pub if e.get("store") == "walpub" and _is_num(e.get("mb_per_s")) and _is_num(e.get("block_bytes"))]
    if not cases:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in sorted({e.get("threads") for e in cases}):
        pts = sorted((e["block_bytes"], e["mb_per_s"]) for e in cases if e.get("threads") == t)
        ax.plot([x / 1024 for x, _ in pts], [y for _, y in pts], marker="o", label=f"publish, {t} thread{'s' if t != 1 else ''}")
    disk = sorted((e["block_bytes"], e["disk_mb_per_s"]) for e in cases
                  if e.get("threads") == 1 and _is_num(e.get("disk_mb_per_s")))
    if disk:
        ax.plot([x / 1024 for x, _ in disk], [y for _, y in disk], "k:", marker="x",
                label="fsync'd 1 MiB writes, before each case")
    base = next((e.get("mb_per_s") for e in pub if e.get("store") == "fsync'd sequential write"), None)
    if _is_num(base):
        ax.axhline(base, color="k", linestyle="--", label="fsync'd sequential write (baseline run)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({e["block_bytes"] for e in cases})
    ax.set_xticks([t / 1024 for t in ticks])
    ax.set_xticklabels([_size(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("block size")
    ax.set_ylabel("MB/s (1e6 B/s), durable on return")
    ax.set_title("walpub publish throughput vs block size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return [save_plot(fig, plots_dir, "walpub-publish.png", "walpub publish MB/s vs block size")]
