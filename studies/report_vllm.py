"""Report section of vLLM's time to first token: recompute vs vLLM's own prefix cache vs
Quiver after a restart and from the object store (studies/bench_vllm.py, group ``vllm``).

Every figure is read from the group's extra_info: ``ttft_s``, ``speedup`` (recompute
TTFT / this TTFT), ``recompute_ttft_s``, ``prefix_tokens``, ``suffix_tokens``,
``block_tokens``, ``loaded_tokens``, ``store_s`` and ``store_share`` (the connector's
load, BlockStore.get + scatter into vLLM's paged tensors), ``tiers`` (which tier served
the blocks), ``first_token_equal`` and ``reference_tied_tokens``, and the model
(``params``, ``model``, ``engine``).  The KV bytes of a token are computed from the
model's shape as recorded.  The study skips itself in smoke mode and without the vLLM
venv; then the section says so.
"""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, prefix_path_cells, _absent, _div, _ex, _is_num, _ms, _plot_line, _section_head, _txt, _x, fmt,
                            pyplot, reproduce_line, save_plot, table)

GROUPS = ["vllm"]
PATHS = ["recompute", "vllm_prefix", "quiver_l1", "quiver_l2"]
LABELS = {
    "recompute": "recompute (no cache)",
    "vllm_prefix": "vLLM prefix cache (same process)",
    "quiver_l1": "Quiver L1, after a restart",
    "quiver_l2": "Quiver from the object store, another process",
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "fp8": 1}


def _speedup(e: dict):
    s = e.get("speedup")
    return s if _is_num(s) else _div(e.get("recompute_ttft_s"), e.get("ttft_s"))


def _kv_bytes_per_token(e: dict):
    """K and V of every layer for one token, from the model shape the study recorded."""
    m = e.get("model") or {}
    width = DTYPE_BYTES.get(str(m.get("dtype")))
    dims = [m.get("layers"), m.get("kv_heads"), m.get("head_dim")]
    if width is None or not all(_is_num(d) for d in dims):
        return None
    return dims[0] * 2 * dims[1] * dims[2] * width


def _served_by(e: dict) -> str:
    t = e.get("tiers")
    if not isinstance(t, dict):
        return DASH
    parts = [f"{tier.upper()} {t[f'{tier}_hits']:,}" for tier in ("l0", "l1", "l2") if t.get(f"{tier}_hits")]
    bad = [f"{k} {v:,}" for k, v in sorted(t.items()) if not k.endswith("_hits") and _is_num(v) and v]
    return (", ".join(parts) + " blocks" if parts else "none") + (f"; **{', '.join(bad)}**" if bad else "")


def _first_token(e: dict, path: str) -> str:
    if path == "recompute":
        return "n/a (the reference)"
    eq = e.get("first_token_equal")
    if eq is None:
        return DASH
    if eq:
        return "yes"
    tied = e.get("reference_tied_tokens") or []
    if len(tied) > 1:
        return f"one of the reference's {len(tied)} tied tokens"
    return "**no**"


def _row(P: int, path: str, e: dict | None, prefix_cache: dict | None) -> list[str]:
    if e is None:
        return [f"{P:,}", LABELS.get(path, path)] + [DASH] * 10
    tokens = P + e["suffix_tokens"] if _is_num(e.get("suffix_tokens")) else None
    per_tok = _kv_bytes_per_token(e)
    loaded = e.get("loaded_tokens")
    load_mb_s = _div(loaded * per_tok / 1e6, e.get("store_s")) if _is_num(loaded) and _is_num(per_tok) else None
    quiver = path.startswith("quiver")
    vs_prefix = _x(_div(e.get("ttft_s"), (prefix_cache or {}).get("ttft_s"))) if quiver else "n/a"
    return [f"{P:,}", LABELS.get(path, path), fmt(_ms(e.get("ttft_s"))), _x(_speedup(e)),
            fmt(_div(tokens, e.get("ttft_s")), "rate"), vs_prefix,
            fmt(loaded, "int") if quiver else "n/a", _served_by(e) if quiver else "n/a",
            fmt(_ms(e.get("store_s"))) if quiver else "n/a", fmt(e.get("store_share"), "pct") if quiver else "n/a",
            fmt(load_mb_s) if quiver else "n/a", _first_token(e, path)]


def _conditions(e0: dict) -> list[str]:
    m = e0.get("model") or {}
    params = e0.get("params")
    size = f"{params / 1e6:.1f} M parameters ({params:,})" if _is_num(params) else f"{DASH} parameters"
    per_tok = _kv_bytes_per_token(e0)
    return [
        f"Engine: {_txt(e0.get('engine'))}. Model: {fmt(m.get('arch'))}, {size}: {fmt(m.get('layers'), 'int')} "
        f"layers, hidden {fmt(m.get('hidden'), 'int')}, {fmt(m.get('heads'), 'int')} query heads, "
        f"{fmt(m.get('kv_heads'), 'int')} KV heads × head_dim {fmt(m.get('head_dim'), 'int')}, MLP "
        f"{fmt(m.get('mlp'), 'int')}, vocabulary {fmt(m.get('vocab'), 'int')}, {fmt(m.get('dtype'))}, weights "
        f"{_txt(m.get('weights'))}; KV {fmt(per_tok, 'int')} B per token; vLLM block "
        f"{fmt(e0.get('block_tokens'), 'int')} tokens. Prompt = P prefix tokens + {fmt(e0.get('suffix_tokens'), 'int')} "
        "new ones; TTFT = wall time of `llm.generate([prompt], max_tokens=1)` in the engine process (prefill + one "
        "token, vLLM's scheduling included), after a warm-up request.",
        "",
        "Paths, one engine process each: `recompute` — vLLM prefix cache off, no connector; `vLLM prefix cache` — "
        "the second prompt right after the first in the same process (vLLM's own in-memory reuse: no restart); "
        "`Quiver L1, after a restart` — a process with the Quiver connector stored the prefix and exited, a fresh "
        "process loads it from Quiver's L1 (local disk, through the page cache); `Quiver from the object store` — a "
        "fresh process on a new store directory loads it from the shared object store (a local directory), "
        "verified and promoted to L1. `× recompute` = recompute TTFT / this TTFT at the same P; `tokens/s` = the "
        "prompt's tokens / TTFT (for recompute, the prefill throughput); `store` = the connector's load "
        "(BlockStore.get + scatter into vLLM's paged KV), its share of the TTFT, and its rate in KV bytes. "
        "`first token` = the greedy first token equals the same prompt's true recompute (a fresh `cache_salt`).",
        "",
    ]


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    lines = _section_head("vllm", "vLLM time to first token: recompute, vLLM's prefix cache, Quiver (group `vllm`)")
    benches = groups.get("vllm", [])
    prefixes, cells = prefix_path_cells(benches)
    if not prefixes:
        why = ("This is a smoke run, and the study skips itself in smoke mode (QUIVER_VLLM_SMOKE=1 runs it)."
               if mode == "smoke" else "The study skips itself where the vLLM venv is missing (`make setup-vllm` "
               "makes it).")
        return lines + [f"The vLLM study did not run: no `vllm` results in this run. {why} The run's pytest output "
                        "gives the reason.", ""]
    lines += _conditions(_ex(benches[0]))
    rows = [_row(P, path, cells.get((P, path)), cells.get((P, "vllm_prefix"))) for P in prefixes for path in PATHS]
    lines += table(["prefix tokens", "path", "TTFT ms", "× recompute", "tokens/s", "÷ vLLM prefix cache TTFT",
                    "tokens loaded from Quiver", "served by", "store ms", "store share of TTFT", "store MB/s",
                    "first token"], rows)
    return lines + [reproduce_line(mode, benches), ""] + _plot_line(plots, "vllm-ttft.png")


def present(groups: dict) -> bool:
    return True  # the section says when the study did not run


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Quiver after a restart vs recompute at the largest prompt, beside the other paths."""
    link = "[vllm](#vllm)"
    prefixes, cells = prefix_path_cells(groups.get("vllm", []))
    if not prefixes:
        return [["vLLM TTFT: Quiver after a restart vs recompute", _absent("vllm"), DASH, link]]
    P = max(prefixes)
    rec, l1 = cells.get((P, "recompute"), {}), cells.get((P, "quiver_l1"), {})
    others = "; ".join(f"{LABELS[p]} {fmt(_ms(cells[(P, p)].get('ttft_s')))} ms ({_x(_speedup(cells[(P, p)]))})"
                       for p in ("quiver_l2", "vllm_prefix") if (P, p) in cells)
    e0 = next(iter(cells.values()))
    params = e0.get("params")
    model = f"{params / 1e6:.1f}M-param {fmt((e0.get('model') or {}).get('arch'))}" if _is_num(params) else DASH
    return [["vLLM TTFT: Quiver after a restart vs recompute",
             f"{fmt(_ms(l1.get('ttft_s')))} ms vs {fmt(_ms(rec.get('ttft_s')))} ms: {_x(_speedup(l1))}"
             + (f"; {others}" if others else ""),
             f"{P:,}-token prefix + {fmt(e0.get('suffix_tokens'), 'int')} new tokens, {model}, "
             f"{_txt(e0.get('engine'))}", link]]


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    """TTFT vs prefix length, one line per path."""
    _prefixes, cells = prefix_path_cells(groups.get("vllm", []))
    pts = {path: sorted((P, e["ttft_s"] * 1e3) for (P, p), e in cells.items()
                        if p == path and _is_num(e.get("ttft_s")) and e["ttft_s"] > 0) for path in PATHS}
    if not any(pts.values()):
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for path in PATHS:
        if pts[path]:
            ax.plot([x for x, _ in pts[path]], [y for _, y in pts[path]], marker="o", label=LABELS[path])
    ticks = sorted({P for v in pts.values() for P, _ in v})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("prefix tokens")
    ax.set_ylabel("TTFT, ms")
    ax.set_title("vLLM time to first token vs prefix length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return [save_plot(fig, plots_dir, "vllm-ttft.png", "vLLM TTFT vs prefix length, per path")]
