"""Report section of layerwise loading: overlap of fetch and compute (studies/bench_layerwise.py,
group ``layerwise``)."""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, _absent, _ex, _is_num, _ms, _plot_line, _section_head, _size, _txt, _x, fmt,
                            pyplot, reproduce_line, save_plot, table)

GROUPS = ["layerwise"]


def layerwise_section(mode: str, benches: list[dict], plots) -> list[str]:
    rows = []
    order = sorted(benches, key=lambda b: (_ex(b).get("compute_ms_target") or 0, _ex(b).get("latency_ms") or 0))
    for b in order:
        e = _ex(b)
        rows.append([fmt(e.get("latency_ms")), fmt(e.get("compute_ms_target")), fmt(e.get("fetch_ms_per_layer")),
                     fmt(e.get("compute_ms_measured")), fmt(_ms(e.get("serial_s"))), fmt(_ms(e.get("overlapped_s"))),
                     fmt(_ms(e.get("bound_s"))), fmt(e.get("efficiency"), "pct"), _x(e.get("speedup")),
                     fmt(e.get("hidden_fraction"), "pct"), fmt(_ms(e.get("overlapped_d4_s"))),
                     fmt(e.get("efficiency_d4"), "pct"), _x(e.get("speedup_d4"))])
    e0 = _ex(benches[0]) if benches else {}
    return (_section_head("layerwise", "Layerwise loading: overlap of fetch and compute (group `layerwise`)")
            + [f"{fmt(e0.get('blocks'), 'int')} blocks, {fmt(e0.get('layers'), 'int')} layers, "
               f"{_size(e0.get('layer_bytes'))} per layer; latency injected: {_txt(e0.get('latency_model'))}. "
               "bound = header + max(fetch, compute); efficiency = bound / overlapped (100% = at the bound; above "
               "100% with depth 4 means deeper prefetch beat the one-fetch bound); hidden = share of the smaller "
               "side hidden.", ""]
            + table(["injected latency ms", "compute ms/layer (target)", "fetch ms/layer", "compute ms/layer",
                     "serial ms", "overlapped ms (depth 1)", "bound ms", "efficiency", "speedup", "hidden",
                     "overlapped ms (depth 4)", "efficiency d4", "speedup d4"], rows)
            + [reproduce_line(mode, benches), ""] + _plot_line(plots, "layerwise-efficiency.png"))


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return layerwise_section(mode, groups["layerwise"], plots)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    lw = [_ex(b) for b in groups.get("layerwise", [])]
    if not lw:
        return [["Layerwise overlap", _absent("layerwise"), DASH, "[layerwise](#layerwise)"]]
    effs = [e.get("efficiency") for e in lw if _is_num(e.get("efficiency"))]
    return [["Layerwise overlap efficiency (depth 1)",
             (f"{fmt(min(effs), 'pct')}–{fmt(max(effs), 'pct')} of the bound" if len(effs) > 1 else
              f"{fmt(effs[0], 'pct')} of the bound") if effs else DASH,
             f"{len(lw)} (latency, compute) cases", "[layerwise](#layerwise)"]]


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """Efficiency vs injected fetch latency, one line per compute time and prefetch depth."""
    lw = [b.get("extra_info") or {} for b in groups.get("layerwise", [])]
    lw = [e for e in lw if _is_num(e.get("latency_ms")) and _is_num(e.get("efficiency"))]
    if not lw:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in sorted({e.get("compute_ms_target") for e in lw}, key=lambda v: v if _is_num(v) else 0):
        pts = sorted((e["latency_ms"], e["efficiency"], e.get("efficiency_d4")) for e in lw
                     if e.get("compute_ms_target") == c)
        line = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=f"depth 1, compute {c} ms/layer")
        d4 = [(x, z) for x, _, z in pts if _is_num(z)]
        if d4:
            ax.plot([x for x, _ in d4], [z for _, z in d4], marker="s", linestyle="--", color=line[0].get_color(),
                    label=f"depth 4, compute {c} ms/layer")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("injected fetch latency, ms")
    ax.set_ylabel("efficiency = bound / overlapped")
    ax.set_title("Layerwise overlap efficiency vs fetch latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return [save_plot(fig, plots_dir, "layerwise-efficiency.png", "layerwise overlap efficiency vs injected latency")]
