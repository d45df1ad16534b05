"""What every section of the study report shares: cell formatting, tables, reading the
results JSON, goal verdicts, anchors and plot files.

The study modules (``studies/report_<study>.py``) import from here; studies/report.py
assembles them.  Nothing here knows a study.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

DASH = "—"


# --- formatting -----------------------------------------------------------------------


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x, kind: str = "num") -> str:
    """One cell; "—" for anything missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not _is_num(x):
        s = json.dumps(x) if isinstance(x, (dict, list)) else str(x)
        return (s[:60] + "…") if len(s) > 61 else s
    if kind == "mib":
        return f"{x / 2**20:,.1f}"
    if kind == "pct":
        return f"{100 * x:.2f}%"
    if kind == "rate":
        return f"{x:,.0f}"
    if kind == "int" or isinstance(x, int) or (float(x).is_integer() and abs(x) >= 10):
        return f"{int(x):,}"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.01:
        return f"{x:.3g}" if ax < 1 else f"{x:.2f}"
    return f"{x:.2e}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


# --- reading the JSON -----------------------------------------------------------------


def _groups(data: dict) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    return groups


def _test_ids(benches: list[dict]) -> list[str]:
    """file::function of each benchmark, without parameters, in first-seen order."""
    seen: OrderedDict[str, None] = OrderedDict()
    for b in benches:
        seen[re.sub(r"\[.*\]$", "", b.get("fullname", b.get("name", "")))] = None
    return list(seen)


def _run_prefix(mode: str) -> str:
    return {"smoke": "QUIVER_SMOKE=1 python -m quiver.studies.cli run", "full": "python -m quiver.studies.cli run --full"}.get(
        mode, "python -m quiver.studies.cli run"
    )


def reproduce_line(mode: str, benches: list[dict]) -> str:
    return f"Reproduce: `{_run_prefix(mode)} -- {' '.join(_test_ids(benches))}`"


def _derived(b: dict) -> dict:
    """extra_info plus the figures computed from it and the benchmark's own stats."""
    e = dict(b.get("extra_info") or {})
    stats = b.get("stats") or {}
    med = stats.get("median")
    e["_median_s"] = med
    e["_median_ms"] = med * 1e3 if _is_num(med) else None
    rps = e.get("records_per_s")
    e["_insert_us_per_record"] = 1e6 / rps if _is_num(rps) and rps > 0 else None
    bw, secs = e.get("bytes_written"), e.get("insert_s")
    e["_write_mb_s"] = bw / secs / 1e6 if _is_num(bw) and _is_num(secs) and secs > 0 and bw > 0 else None
    disk, n = e.get("bytes_on_disk"), e.get("n")
    e["_disk_per_record"] = disk / n if _is_num(disk) and _is_num(n) and n > 0 and disk > 0 else None
    return e


def _ratio(value, best, higher_is_better: bool) -> str:
    if not (_is_num(value) and _is_num(best)) or value <= 0 or best <= 0:
        return DASH
    r = best / value if higher_is_better else value / best
    return f"×{r:.2f}"


def _ms(s):
    return s * 1e3 if _is_num(s) else None


def _mb(gb):
    return gb * 1e3 if _is_num(gb) else None


def _us(s):
    return s * 1e6 if _is_num(s) else None


def _limit(groups: dict, test_name: str):
    for b in groups.get("limits", []):
        if b.get("name") == test_name:
            return (b.get("extra_info") or {}).get("gb_per_s")
    return None


# --- shared helpers for the dedicated study sections ------------------------------------------


def _ex(b: dict) -> dict:
    return b.get("extra_info") or {}


def prefix_path_cells(benches: list[dict]) -> tuple[list[int], dict]:
    """Of the studies keyed by prompt prefix and path (ttft, vllm): prefix lengths, and {(prefix_tokens, path): extra_info}."""
    cells = {}
    for b in benches:
        e = _ex(b)
        if _is_num(e.get("prefix_tokens")) and e.get("path") is not None:
            cells[(e["prefix_tokens"], e["path"])] = e
    return sorted({p for p, _ in cells}), cells


def _div(a, b):
    """a / b, or None when either is missing or b is 0."""
    if _is_num(a) and _is_num(b) and b != 0:
        return a / b
    return None


def mb_per_s(nbytes, seconds):
    """Bytes over seconds in MB/s (1e6 B), or None when either is missing or seconds is not positive."""
    return nbytes / seconds / 1e6 if _is_num(nbytes) and _is_num(seconds) and seconds > 0 else None


def _x(r) -> str:
    """A ratio as "×1.23" (three significant digits below 0.1); "—" when absent."""
    if not _is_num(r):
        return DASH
    return f"×{r:.2f}" if abs(r) >= 0.1 or r == 0 else f"×{r:.2g}"


def _txt(x) -> str:
    """A prose string from the JSON, untruncated; "—" when absent."""
    return DASH if x is None or x == "" else str(x)


def _budget(pct) -> str:
    return f"{pct:g}%" if _is_num(pct) else DASH


def _size(nbytes) -> str:
    """A byte count as KiB / MiB / GiB."""
    if not _is_num(nbytes):
        return DASH
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            v = nbytes / scale
            return f"{v:g} {unit}" if float(v).is_integer() else f"{v:.1f} {unit}"
    return f"{int(nbytes)} B"


def _pct(x) -> str:
    return f"{x:.2f}%" if _is_num(x) else DASH


def _anchor(name: str) -> str:
    return f'<a id="{name}"></a>'


def _section_head(anchor: str, title: str) -> list[str]:
    return [_anchor(anchor), "", f"## {title}", ""]


def _verdict(measured, goal, higher_is_better: bool) -> str:
    """"met" / "**missed by ×N**" for a measured value against a goal constant."""
    if not _is_num(measured) or not _is_num(goal) or measured <= 0 or goal <= 0:
        return DASH
    if higher_is_better:
        return f"met (×{measured / goal:.2f} of the target)" if measured >= goal else f"**missed by ×{goal / measured:.2f}**"
    return f"met (×{goal / measured:.2f} under the target)" if measured <= goal else f"**missed by ×{measured / goal:.2f}**"


def _plot_line(plots: list[tuple[str, str]], name: str) -> list[str]:
    """The image line of plots/<name>, if it was drawn."""
    for title, path in plots:
        if path == f"plots/{name}":
            return [f"![{title}]({path})", ""]
    return []


def _absent(group: str) -> str:
    return f"{DASH} (group `{group}` has no results in this run)"


# --- plots ----------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, plots_dir: Path, name: str, title: str) -> tuple[str, str]:
    """Write ``plots_dir``/``name`` and close the figure: (title, path relative to the report)."""
    fig.tight_layout()
    fig.savefig(plots_dir / name, dpi=110)
    pyplot().close(fig)
    return (title, f"plots/{name}")
