"""Report section of the first request (studies/bench_firstreq.py, group ``first-request``):
what a fresh process pays before its first block comes back, per index backend and case,
beside the goal of ≤ 1 s.

extra_info per result: ``case`` ("cold-install" | "restart"), ``backend`` ("default" =
``BlockStore.open`` without ``index=``; ``index`` says which it took), ``import_s``,
``open_s``, ``first_put_s``, ``first_get_s``, ``total_s`` (their sum), ``process_s`` (the
child's wall time as the parent saw it), ``compiled_at_first_get`` (ART kernels compiled
by then), ``torch_imported``, ``blocks``/``block_bytes`` of the put, and for ``restart``
``compile_all_s``/``compile_all_from_cache`` of the previous process (a ``skipped``
reason instead of figures where a case could not run).  The goal is a constant; every
verdict is computed from the run.
"""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, _absent, _ex, _is_num, _plot_line, _section_head, _size, _txt, _verdict, fmt,
                            pyplot, reproduce_line, save_plot, table)

GROUPS = ["first-request"]
CASES = ["cold-install", "restart"]
PARTS = [("import_s", "import"), ("open_s", "open"), ("first_put_s", "first put"), ("first_get_s", "first get")]
# Goal, not a result: import + open + first put + first get of a fresh process.
FIRSTREQ_GOAL_S = 1.0


def _cells(groups: dict) -> tuple[list[str], list[str], dict]:
    """Backends and cases in first-seen order (known cases first), and {(backend, case): extra_info}."""
    cells, backends, cases = {}, [], []
    for b in groups.get("first-request", []):
        e = _ex(b)
        be, case = e.get("backend"), e.get("case")
        if be is None or case is None:
            continue
        cells[(be, case)] = e
        if be not in backends:
            backends.append(be)
        if case not in cases:
            cases.append(case)
    cases = [c for c in CASES if c in cases] + [c for c in cases if c not in CASES]
    return backends, cases, cells


def _label(be: str, e: dict) -> str:
    """The backend, with the index ``default`` took."""
    idx = e.get("index")
    return f"{be} ({idx})" if idx and idx != be else str(be)


def _prepared(e: dict, case: str) -> str:
    """The compile cache the timed process found: what the previous process spent filling or loading it."""
    if case == "cold-install":
        return "empty"
    secs = e.get("compile_all_s")
    if not _is_num(secs):
        return DASH
    how = "loaded from the cache" if e.get("compile_all_from_cache") else "compiled"
    return f"previous process: every kernel {how} in {fmt(secs)} s"


def _met(e: dict) -> bool | None:
    t = e.get("total_s")
    return (t <= FIRSTREQ_GOAL_S) if _is_num(t) and not e.get("skipped") else None


def _row(case: str, be: str, e: dict) -> list[str]:
    if e.get("skipped"):
        return [case, _label(be, e)] + [DASH] * 9 + [f"skipped: {_txt(e['skipped'])}"]
    compiled = e.get("compiled_at_first_get")
    return [case, _label(be, e)] + [fmt(e.get(k)) for k, _ in PARTS] + [
        fmt(e.get("total_s")), _verdict(e.get("total_s"), FIRSTREQ_GOAL_S, False), fmt(e.get("process_s")),
        fmt(len(compiled), "int") if isinstance(compiled, list) else DASH,
        "**yes**" if e.get("torch_imported") else fmt(e.get("torch_imported")), _prepared(e, case)]


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    benches = groups["first-request"]
    backends, cases, cells = _cells(groups)
    rows = [_row(case, be, cells[(be, case)]) for case in cases for be in backends if (be, case) in cells]
    measured = [e for e in cells.values() if _met(e) is not None]
    met = sum(1 for e in measured if _met(e))
    e0 = next((e for e in cells.values() if _is_num(e.get("block_bytes"))), {})
    lines = _section_head("first-request", "First request of a fresh process (group `first-request`)")
    lines += [
        "A new Python process per row: `import quiver`, `BlockStore.open`, its first `put` "
        f"({fmt(e0.get('blocks'), 'int')} blocks of {_size(e0.get('block_bytes'))}) and its first `get`, each timed "
        "inside that process (seconds); `total` = their sum, `process` = the child's wall time as the parent saw it "
        "(interpreter start and exit included). `cold-install` = the first process after an installation: an empty "
        "compile cache and a new store; `restart` = a later process on the same installation and store, after a "
        "previous process filled the compile cache and stored the block the timed `get` reads (from L1, through the "
        "index). `default` = `BlockStore.open` without `index=` (the index it took in brackets). `kernels compiled` "
        "= ART kernels compiled when the first get returned; `torch imported` must be no. Setup: "
        f"studies/bench_firstreq.py. Goal (a constant): total ≤ {FIRSTREQ_GOAL_S:g} s; met in {met} of "
        f"{len(measured)} measured cases.", "",
    ]
    lines += table(["case", "backend", "import s", "open s", "first put s", "first get s", "total s",
                    f"goal ≤ {FIRSTREQ_GOAL_S:g} s", "process s", "kernels compiled", "torch imported",
                    "compile cache"], rows)
    return lines + [reproduce_line(mode, benches), ""] + _plot_line(plots, "first-request.png")


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Per case: every backend's total, and how many met the goal."""
    link = "[first-request](#first-request)"
    label = f"First request of a fresh process: import + open + first put + first get (goal ≤ {FIRSTREQ_GOAL_S:g} s)"
    backends, cases, cells = _cells(groups)
    if not cells:
        return [[label, _absent("first-request"), DASH, link]]
    parts = []
    for case in cases:
        es = [(be, cells[(be, case)]) for be in backends if (be, case) in cells]
        measured = [(be, e) for be, e in es if _met(e) is not None]
        if not measured:
            parts.append(f"{case}: {DASH}")
            continue
        missed = [_label(be, e) for be, e in measured if not _met(e)]
        verdict = "met" if not missed else f"**missed**: {', '.join(missed)}"
        parts.append(f"{case}: " + ", ".join(f"{_label(be, e)} {fmt(e.get('total_s'))} s" for be, e in measured)
                     + f": {verdict}")
    return [[label, "; ".join(parts), f"{len(backends)} index backend{'s' if len(backends) != 1 else ''}, one fresh process per case", link]]


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """Stacked bars per (case, backend): import, open, first put, first get; the goal as a line."""
    backends, cases, cells = _cells(groups)
    bars = [(f"{_label(be, cells[(be, case)])}\n{case}", cells[(be, case)]) for case in cases for be in backends
            if (be, case) in cells and not cells[(be, case)].get("skipped")
            and any(_is_num(cells[(be, case)].get(k)) for k, _ in PARTS)]
    if not bars:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(bars) + 2), 4))
    xs = list(range(len(bars)))
    bottom = [0.0] * len(bars)
    for key, name in PARTS:
        vals = [e.get(key) if _is_num(e.get(key)) else 0.0 for _, e in bars]
        ax.bar(xs, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(FIRSTREQ_GOAL_S, color="k", linestyle="--", linewidth=0.8, label=f"goal {FIRSTREQ_GOAL_S:g} s")
    ax.set_xticks(xs)
    ax.set_xticklabels([name for name, _ in bars], fontsize=7)
    ax.set_ylabel("seconds in the new process")
    ax.set_title("First request of a fresh process")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return [save_plot(fig, plots_dir, "first-request.png", "first request of a fresh process, per backend and case")]
