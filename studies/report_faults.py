"""Report section of the fault study of issue 13 (studies/bench_faults.py): a damaged index,
WAL bit flips, full disks and a hung L2, each figure beside its goal."""

from __future__ import annotations

import re

from .report_common import DASH, _absent, _ex, _is_num, _section_head, _size, _verdict, fmt, reproduce_line, table

FAULT_GROUPS = ["faults-index", "faults-wal", "faults-enospc", "faults-l2"]
GROUPS = FAULT_GROUPS
# Goals, not results (issue 13, "A fault study in the report").
FAULT_WAL_GOAL_BLOCKS = 1        # acknowledged blocks lost per WAL flip: the records in the damaged frame
FAULT_L2_LOOKUP_GOAL_MS = 50.0   # a lookup while L2 is down and the breaker is open


def _zero(v) -> str:
    """A count whose goal is 0: the count with its verdict."""
    if not _is_num(v):
        return DASH
    return f"{fmt(v, 'int')} (met)" if v == 0 else f"**{fmt(v, 'int')} (missed)**"


def _at_most(v, goal) -> str:
    if not _is_num(v):
        return DASH
    return f"{fmt(v)} (met)" if v <= goal else f"**{fmt(v)} (missed: goal ≤ {goal:g})**"


def _ok(v) -> str:
    if v is None:
        return DASH
    return "yes (met)" if v else "**no (missed)**"


def _flip_stats(groups: dict) -> dict:
    """The walpub campaign's bit-flip part (FlipStats), or {}."""
    return next((_ex(b) for b in groups.get("walpub-campaign", []) if "bitflip" in b.get("name", "")), {})


def _index_missed(e: dict) -> int:
    return sum(e.get(k) or 0 for k in ("lost", "wrong", "open_failed", "died"))


def _l2_rows(groups: dict) -> dict:
    return {(_ex(b).get("onset"), _ex(b).get("breaker")): _ex(b) for b in groups.get("faults-l2", [])}


def _s(x) -> str:
    """Seconds as "N ms" below a second, "N s" above."""
    if not _is_num(x):
        return DASH
    return f"{fmt(x * 1e3)} ms" if x < 1 else f"{fmt(x)} s"


def _err_short(msg) -> str:
    """An error line as its class and, when there is one, its errno text."""
    if not msg:
        return DASH
    m = re.search(r"\[Errno \d+\][^:;\n]*", str(msg))
    name = str(msg).split(":", 1)[0]
    return f"{name} ({m.group(0).strip()})" if m else str(msg)[:80]


def _index_lines(mode: str, groups: dict) -> list[str]:
    """The index corruption campaign (group `faults-index`)."""
    idx = groups.get("faults-index", [])
    if not idx:
        return []
    rows = []
    for b in idx:
        e = _ex(b)
        kinds = e.get("by_kind") or {}
        detail = "; ".join(
            f"{k} {fmt(v.get('trials'), 'int')}: lost {fmt(v.get('lost'), 'int')}, failed opens "
            f"{fmt(v.get('open_failed'), 'int')}, index discarded at open {fmt(v.get('index_reset'), 'int')}"
            for k, v in sorted(kinds.items()) if isinstance(v, dict))
        rows.append([fmt(e.get("backend")), fmt(e.get("trials"), "int"), fmt(e.get("blocks"), "int"),
                     _zero(e.get("lost")), _zero(e.get("wrong")), _zero(e.get("open_failed")),
                     _zero(e.get("died")), fmt(e.get("index_reset"), "int"), fmt(e.get("index_repairs"), "int"),
                     detail or DASH, fmt(e.get("seconds"))])
    lines = [
        "### Index corruption campaign (group `faults-index`)", "",
        "One closed store per backend; each trial damages its index files in a copy (a single-bit flip at a "
        "random offset of a random index file, a truncation at a random length, or the deletion of a file), "
        "then a checker process opens the store and gets every block. `lost` counts blocks that were not "
        "themselves damaged (only the index was) and no longer come back. Goals: 0 blocks lost, 0 wrong bytes, "
        "0 failed opens, 0 checker processes killed by a signal.", "",
    ]
    lines += table(["backend", "trials", "blocks per trial", "blocks lost (goal 0)", "wrong bytes (goal 0)",
                    "failed opens (goal 0)", "deaths (goal 0)", "index discarded at open", "index rebuilt while open",
                    "by damage kind", "seconds"], rows)
    ex = [f"- {_ex(b).get('backend')}: {x}" for b in idx for x in (_ex(b).get("examples") or [])]
    if ex:
        lines += ["Errors seen (first per trial, up to 5 per backend):", ""] + ex + [""]
    lines += [reproduce_line(mode, idx), ""]
    return lines


def _wal_lines(mode: str, groups: dict) -> list[str]:
    """WAL bit flips (group `faults-wal`), beside the walpub campaign's own."""
    wal = groups.get("faults-wal", [])
    fs = _flip_stats(groups)
    if not (wal or fs):
        return []
    rows = []
    for b in wal:
        e = _ex(b)
        rows.append([f"BlockStore ({fmt(e.get('backend'))} index deleted: the whole log replayed)",
                     fmt(e.get("flips"), "int"), fmt(e.get("blocks"), "int"),
                     _at_most(e.get("max_lost_per_flip"), FAULT_WAL_GOAL_BLOCKS), fmt(e.get("lost"), "int"),
                     fmt(e.get("flips_with_loss"), "int"), _zero(e.get("wrong")), _zero(e.get("open_failed")),
                     fmt(e.get("adopted"), "int")])
    if fs:
        rows.append(["walpub volume (group `walpub-campaign`, bit-flip part)", fmt(fs.get("wal_flips"), "int"),
                     DASH, _at_most(fs.get("max_blocks_lost_per_flip"), FAULT_WAL_GOAL_BLOCKS),
                     fmt(fs.get("acked_blocks_lost"), "int"), fmt(fs.get("wal_cut_lost_records"), "int"),
                     _zero(fs.get("wrong_bytes_served")), DASH, DASH])
    lines = [
        "### WAL bit flips (group `faults-wal`)", "",
        "Each trial flips one random bit of the L1 WAL of a closed store, reopens it and gets every "
        f"acknowledged block. Goal: acknowledged blocks lost per flip ≤ {FAULT_WAL_GOAL_BLOCKS} (the records in "
        "the damaged frame); with adoption (an object whose envelope verifies and names its key is kept) "
        "usually 0. The walpub crash campaign's own WAL flips (on the volume, below the store) are quoted "
        "beside it.", "",
    ]
    lines += table(["where", "WAL flips", "blocks", "max blocks lost per flip", "blocks lost in all",
                    "flips that lost blocks", "wrong bytes (goal 0)", "failed opens (goal 0)", "adopted"], rows)
    lines += [reproduce_line(mode, wal), ""] if wal else []
    return lines


def _enospc_lines(mode: str, groups: dict) -> list[str]:
    """Full disks (group `faults-enospc`)."""
    en = groups.get("faults-enospc", [])
    if not en:
        return []
    rows = []
    for b in sorted(en, key=lambda b: (_ex(b).get("disk_bytes") or 0, str(_ex(b).get("budget")))):
        e = _ex(b)
        budget = ("default (½ of free + held: " + _size(e.get("l1_capacity")) + ")" if e.get("budget") == "default"
                  else f"{_size(e.get('budget_bytes'))} (4× the disk)")
        if e.get("skipped"):
            rows.append([_size(e.get("disk_bytes")), budget] + [DASH] * 9 + [f"skipped: {e['skipped']}"])
            continue
        refused = (f"put {fmt(e.get('refused_at'), 'int')}: {_err_short(e.get('first_error'))}"
                   if e.get("refused_at") is not None else "never")
        reads = (f"{fmt(e.get('reads_after_enospc'), 'int')} of {fmt(e.get('acked'), 'int')} "
                 f"({fmt(e.get('read_errors_after_enospc'), 'int')} failed)" if e.get("refused_at") is not None
                 else DASH)
        small = (f"{_ok(e.get('small_reopen_ok'))}; freed {_size(e.get('freed_bytes'))} "
                 f"({_size(e.get('used_before'))} → {_size(e.get('used_after_small_open'))} used); new put "
                 f"{'ok' if e.get('small_put_ok') else '**failed**'}")
        reopen = e.get("reopen_ok") and e.get("final_reopen_ok")
        closes = ", ".join(e.get("close_errors") or []) or "none"
        names = e.get("typed_error_names") or {}
        typed = f"{fmt(e.get('typed_errors'), 'int')}" + (
            f" ({', '.join(f'{k} {v}' for k, v in sorted(names.items()))})" if names else "")
        missed = [what for what, bad in (
            ("untyped errors", (e.get("untyped_errors") or 0) > 0), ("acked blocks lost", (e.get("lost") or 0) > 0),
            ("wrong bytes", (e.get("wrong") or 0) > 0), ("a reopen failed", not reopen),
            ("the smaller-budget reopen", not (e.get("small_reopen_ok") and e.get("small_put_ok"))))
            if bad]
        rows.append([_size(e.get("disk_bytes")), budget,
                     f"{fmt(e.get('acked'), 'int')} of {fmt(e.get('offered'), 'int')}", refused, typed,
                     _zero(e.get("untyped_errors")), _zero(e.get("lost")) + f"; {fmt(e.get('evicted'), 'int')} evicted",
                     _zero(e.get("wrong")), reads, _ok(reopen) + f"; close errors: {closes}", small,
                     "met" if not missed else "**missed: " + ", ".join(missed) + "**"])
    e0 = _ex(en[0])
    lines = [
        "### Full disk (group `faults-enospc`)", "",
        "A real tmpfs of each size, mounted by the study (no injected fault). One store (default index) is "
        f"sent distinct {_size(e0.get('block_bytes'))} blocks, one per put, until a put is refused or 2× (default "
        "budget) / 4× (explicit budget) the disk was offered; three more puts follow a refusal. Then, in the "
        "same process: a reopen with the same budget (the lock was released) reads every acknowledged block, "
        "and a reopen with a quarter-disk budget must free space and take a new put. `lost` = acknowledged "
        "blocks not readable after the reopen, less the blocks the budget evicted. Goals: 0 untyped errors, 0 "
        "acknowledged blocks lost, 0 wrong bytes, every reopen succeeds.", "",
    ]
    lines += table(["disk", "L1 budget", "puts acked", "first refusal", "typed errors", "untyped (goal 0)",
                    "acked lost (goal 0)", "wrong bytes (goal 0)", "reads served after the refusal",
                    "reopen, same process", "reopen with ¼-disk budget", "verdict"], rows)
    lines += [reproduce_line(mode, en), ""]
    return lines


def _l2_lines(mode: str, groups: dict) -> list[str]:
    """A hung L2 (group `faults-l2`)."""
    l2 = groups.get("faults-l2", [])
    if not l2:
        return []
    cells = _l2_rows(groups)
    rows = []
    for onset in ("at-open", "after-open"):
        for br in ("default", "off"):
            e = cells.get((onset, br))
            if e is None:
                continue
            label = [onset, "default (3 failed tries)" if br == "default" else "off (failures=10⁹)"]
            if e.get("skipped"):
                rows.append(label + [DASH] * 7 + [f"skipped: {e['skipped']}"])
                continue
            look = (f"{fmt(e.get('lookup_down_ms'))} ms (max {fmt(e.get('lookup_down_max_ms'))}; "
                    f"without L2 {fmt(e.get('lookup_no_l2_ms'))} ms)")
            if any(st != "closed" for st in e.get("lookup_breaker_state") or []):
                look_v = _verdict(e.get("lookup_down_ms"), FAULT_L2_LOOKUP_GOAL_MS, False)
            else:
                look_v = "the breaker never opened: no goal, for comparison"
            first = f"{fmt(e.get('lookup_first_ms'))} ms; {fmt(e.get('lookups_waiting'), 'int')} of " \
                    f"{fmt(len(e.get('lookup_ms') or []), 'int')} waited > {FAULT_L2_LOOKUP_GOAL_MS:g} ms"
            put = f"{_s(e.get('put_s'))} ({e.get('put_error') or 'stored'}; L1 kept: " \
                  f"{'yes' if e.get('put_l1_kept') else 'no'})"
            flush = f"{_s(e.get('flush_s'))} ({fmt(e.get('flush_owed'), 'int')} owed)"
            how = ("L2 attached" if e.get("attached_at_open")
                   else f"L2 unattached, breaker {e.get('breaker_after_open')}")
            rows.append(label + [
                f"{_s(e.get('open_s'))}: {'opened' if e.get('open_ok') else '**failed**'} ({how})",
                first, f"{look}: {look_v}", put, flush, _s(e.get("close_s")),
                f"{fmt(e.get('requests_dropped'), 'int')}", _ok(e.get("open_ok"))])
    e0 = next((_ex(b) for b in l2 if not _ex(b).get("skipped")), {})
    r = e0.get("retry") or {}
    lines = [
        "### L2 hung: accepts connections, never answers (group `faults-l2`)", "",
        "The endpoint is a listening socket written in the study (`SilentServer`): it accepts and reads, and "
        "never answers. `at-open`: silent from the start. `after-open`: it forwards to a real moto server "
        "while the store opens and stores a block (L2 attached), then goes silent. Breaker `default` = "
        "`BreakerPolicy()` (opens after 3 consecutive failed tries); `off` = `BreakerPolicy(failures=10⁹)`, "
        "which never opens on failures — but open's own L2 check trips the breaker whatever `failures` says, "
        "so the at-open rows are alike and the after-open rows show the difference. Every row: "
        f"`RetryPolicy(max_tries={fmt(r.get('max_tries'))}, total_s={fmt(r.get('total_s'))}, "
        f"connect_timeout_s={fmt(r.get('connect_timeout_s'))}, read_timeout_s={fmt(r.get('read_timeout_s'))})`, "
        f"lookups bounded by the store's own {fmt(e0.get('lookup_budget_s'))} s L2 budget; `flush_l2(timeout_s="
        f"{fmt(e0.get('budget_s'))})`, `close(l2_timeout_s={fmt(e0.get('budget_s'))})`. Each lookup is of an "
        "unknown prompt (an L1 miss, so it asks L2). `while down` = median over lookups that began with the "
        "breaker open (all lookups where it never opened). Goals: open succeeds; a lookup adds ≤ "
        f"{FAULT_L2_LOOKUP_GOAL_MS:g} ms while L2 is down (breaker open).", "",
    ]
    lines += table(["L2 goes silent", "breaker", "open", "first lookup", "lookup while down (goal ≤ 50 ms)",
                    "sync put", "flush_l2(2 s)", "close(2 s)", "requests left unanswered", "open succeeds"], rows)
    lines += [reproduce_line(mode, l2), ""]
    return lines


def faults_section(mode: str, groups: dict) -> list[str]:
    lines = _section_head("faults", "Fault study: damaged index, WAL flips, full disks, a hung L2 (issue 13)")
    lines += [
        "Faults beyond crashes, through `BlockStore` only (studies/bench_faults.py). Every goal is a constant "
        "from the issue, shown beside the figure with its verdict; the crash campaign (walpub section) is the "
        "crash-consistency check.", "",
    ]
    for part in (_index_lines, _wal_lines, _enospc_lines, _l2_lines):
        lines += part(mode, groups)
    return lines


def faults_headline_rows(groups: dict) -> list[list[str]]:
    link = "[faults](#faults)"
    rows = []
    idx = [_ex(b) for b in groups.get("faults-index", [])]
    if idx:
        parts = [f"{e.get('backend')} {fmt(e.get('lost'), 'int')}" for e in idx]
        bad = sum(_index_missed(e) for e in idx)
        rows.append(["Blocks lost to index damage (goal 0; wrong bytes and failed opens 0 too)",
                     "; ".join(parts) + (": met" if bad == 0 else f": **missed** ({bad} lost/wrong/failed/died)"),
                     f"{fmt(sum(e.get('trials') or 0 for e in idx), 'int')} trials (flips, truncations, deletions of "
                     f"index files) over {len(idx)} backends", link])
    else:
        rows.append(["Blocks lost to index damage", _absent("faults-index"), DASH, link])
    wal = [_ex(b) for b in groups.get("faults-wal", [])]
    fs = _flip_stats(groups)
    if wal or fs:
        parts = []
        vals = []
        for e in wal:
            parts.append(f"store {fmt(e.get('max_lost_per_flip'), 'int')} ({fmt(e.get('flips'), 'int')} flips)")
            vals.append(e.get("max_lost_per_flip"))
        if fs:
            parts.append(f"walpub campaign {fmt(fs.get('max_blocks_lost_per_flip'), 'int')} "
                         f"({fmt(fs.get('wal_flips'), 'int')} WAL flips)")
            vals.append(fs.get("max_blocks_lost_per_flip"))
        nums = [v for v in vals if _is_num(v)]
        verdict = DASH if not nums else ("met" if max(nums) <= FAULT_WAL_GOAL_BLOCKS else "**missed**")
        rows.append([f"Max acknowledged blocks lost per WAL flip (goal ≤ {FAULT_WAL_GOAL_BLOCKS}, the records in the "
                     "damaged frame)", "; ".join(parts) + f": {verdict}", "one random bit per trial", link])
    else:
        rows.append(["Max blocks lost per WAL flip", _absent("faults-wal"), DASH, link])
    cells = _l2_rows(groups)
    d = cells.get(("after-open", "default")) or {}
    if d.get("skipped") or not d:
        d = cells.get(("at-open", "default")) or {}
    off = cells.get(("after-open", "off")) or {}
    at_open = cells.get(("at-open", "default")) or {}
    if d and not d.get("skipped"):
        cmp = (f"; {fmt(off.get('lookup_down_ms'))} ms each with the breaker off"
               if off and not off.get("skipped") else "")
        opened = (f"; open against a silent L2 {_s(at_open.get('open_s'))} "
                  f"({'opened: met' if at_open.get('open_ok') else '**failed: missed**'})"
                  if at_open and not at_open.get("skipped") else "")
        rows.append([f"lookup while L2 hangs, breaker open (goal ≤ {FAULT_L2_LOOKUP_GOAL_MS:g} ms); open must not fail",
                     f"{fmt(d.get('lookup_down_ms'))} ms: {_verdict(d.get('lookup_down_ms'), FAULT_L2_LOOKUP_GOAL_MS, False)}"
                     f"{cmp}{opened}",
                     f"L2 silent {d.get('onset')}, lookup of an unknown prompt", link])
    else:
        rows.append(["lookup while L2 hangs", _absent("faults-l2"), DASH, link])
    return rows


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return faults_section(mode, groups)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    return faults_headline_rows(groups)
