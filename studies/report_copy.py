"""Report section of copy-in/out beside memcpy (studies/bench_copy.py, group ``copy``)."""

from __future__ import annotations

from .report_common import DASH, _absent, _ex, _section_head, _size, _verdict, fmt, reproduce_line, table

GROUPS = ["copy"]
# Goal, not a result.
COPY_GOAL_RATIO = 0.7


def copy_section(mode: str, benches: list[dict]) -> list[str]:
    lines = _section_head("copy", "Copy-in/out bandwidth beside memcpy (group `copy`)")
    cpu = [b for b in benches if not str(_ex(b).get("op", "")).startswith("cuda")]
    cuda = [b for b in benches if str(_ex(b).get("op", "")).startswith("cuda")]
    if cpu:
        e0 = _ex(cpu[0])
        rows = []
        for b in cpu:
            e = _ex(b)
            rows.append([fmt(e.get("blocks"), "int"), fmt(e.get("op")), fmt(e.get("payload_bytes"), "mib"),
                         fmt(e.get("mb_per_s")), fmt(e.get("memcpy_mb_per_s")), fmt(e.get("ratio_to_memcpy")),
                         _verdict(e.get("ratio_to_memcpy"), COPY_GOAL_RATIO, True),
                         fmt(e.get("memcpy_runs_mb_per_s")), fmt(e.get("ratio_to_memcpy_runs")),
                         fmt(e.get("ratio_to_memcpy_fresh")), fmt(e.get("copy_ops"), "int")])
        lines += [
            f"Blocks of shape {fmt(e0.get('block_shape'))} {fmt(e0.get('dtype'))}, torch intra-op threads "
            f"{fmt(e0.get('torch_threads'))}, device {fmt(e0.get('device'))}. `memcpy` = numpy copyto of the same "
            "bytes in the same test; `memcpy runs` copies them in pieces of one block-layer-K/V run "
            f"({_size(e0.get('run_bytes'))}); `memcpy fresh` (restore only) allocates the tensors a restore "
            "allocates and memcpys the same bytes into them, paying the same page faults (whether a restore's "
            "pages are fresh or recycled depends on the heap, so restore figures vary between runs). "
            "Paged ops take a random block table out of a pool of n + n/4 blocks (a busy engine's); "
            "`-consecutive` ones take blocks 0 .. n-1 (a fresh engine's). "
            "`cpu-paged` ops copy vLLM's CPU layout (`[blocks, H, T, 2*D]`, K stored transposed: what the "
            "vLLM connector copies on a CPU engine) through the same random block table. "
            "`dynamic-scatter`, `dynamic-restore` and the `cpu-paged` ops without `-torch` run compiled kernels "
            "(engine/copy_kernels.py, Numba); `-torch` is the same copy in torch (`QUIVER_COPY_JIT=off`), and the "
            "other ops are torch copies. "
            f"Goal: ≥ {COPY_GOAL_RATIO:g} of memcpy (the pre-faulted one, for every op). 1 MB = 1e6 B.", "",
        ]
        lines += table(["blocks", "op", "MiB", "MB/s", "memcpy MB/s", "÷ memcpy", f"goal ≥ {COPY_GOAL_RATIO:g}",
                        "memcpy runs MB/s", "÷ memcpy runs", "÷ memcpy fresh", "copy ops"], rows)
        lines += _misses([_ex(b) for b in cpu])
    if cuda:
        rows = [[fmt(_ex(b).get("op")), fmt(_ex(b).get("host")), fmt(_ex(b).get("copier")),
                 fmt(_ex(b).get("blocks"), "int"),
                 fmt(_ex(b).get("mb_per_s")), fmt(_ex(b).get("pinned_mb_per_s")), fmt(_ex(b).get("ratio_to_pinned")),
                 _verdict(_ex(b).get("ratio_to_pinned"), COPY_GOAL_RATIO, True),
                 fmt(_ex(b).get("ratio_to_pageable")), fmt(_ex(b).get("device"))]
                for b in cuda]
        lines += ["CUDA: engine tensors on the device, host buffer pinned or pageable, beside one raw "
                  "non-blocking copy of the same bytes to or from a pinned host tensor (and, for pageable "
                  "rows, torch's own pageable copy):", ""]
        lines += table(["op", "host", "device pass", "blocks", "MB/s", "raw pinned MB/s", "÷ pinned", f"goal ≥ {COPY_GOAL_RATIO:g}",
                        "÷ raw pageable", "device"], rows)
    return lines + [reproduce_line(mode, benches), ""]


def _misses(cases: list[dict]) -> list[str]:
    """Why each missed op missed, from its own row: how much of memcpy the same bytes
    reach when copied in the layout's pieces (``memcpy runs``), and the op against that."""
    said = []
    for e in cases:
        ratio, runs, op_runs = e.get("ratio_to_memcpy"), e.get("memcpy_runs_mb_per_s"), e.get("ratio_to_memcpy_runs")
        mem = e.get("memcpy_mb_per_s")
        if not (isinstance(ratio, (int, float)) and ratio < COPY_GOAL_RATIO) or str(e.get("op")).endswith("-torch"):
            continue  # -torch: the baseline without the compiled kernels, not the path a copy takes
        text = f"{fmt(e.get('blocks'), 'int')} blocks {e.get('op')} ×{fmt(ratio)} of memcpy"
        if isinstance(runs, (int, float)) and isinstance(mem, (int, float)) and mem > 0:
            text += (f": a memcpy of the same bytes in the layout's pieces reached ×{fmt(runs / mem)} of one memcpy, "
                     f"the op ×{fmt(op_runs)} of that")
        said.append(text)
    if not said:
        return []
    return ["**Misses** (the `-torch` rows, the baseline without the compiled kernels, aside). " + "; ".join(said)
            + ". Where the pieces' memcpy is itself near or under the goal, the layout's pieces (one run per block, "
            "layer and K/V) bound the op; the rest is the op's own cost (its setup per call, its gather or "
            "transpose).", ""]


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return copy_section(mode, groups["copy"])


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    cp = [_ex(b) for b in groups.get("copy", []) if not str(_ex(b).get("op", "")).startswith("cuda")]
    if not cp:
        return [["Copy-in/out ÷ memcpy", _absent("copy"), DASH, "[copy](#copy)"]]
    top = max(e.get("blocks") or 0 for e in cp)
    parts = [f"{e.get('op')} {fmt(e.get('ratio_to_memcpy'))}" for e in cp if e.get("blocks") == top]
    return [["Copy-in/out ÷ memcpy (goal ≥ 0.7)", "; ".join(parts), f"{top:,} blocks", "[copy](#copy)"]]
