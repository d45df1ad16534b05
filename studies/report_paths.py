"""Report section of the engine paths through BlockStore beside their limits
(studies/bench_paths.py, group ``engine-paths``; issue 10).

extra_info per case: ``path`` (l0-batch | l0-single | l0-fixed | l1-batch | put-durable),
``block_bytes``, ``blocks``, ``bytes``, ``rounds``, ``threads``, ``store_s`` and ``limit_s``
(medians of interleaved rounds), ``limit`` (what the limit is), ``ratio`` (the path's
goal metric: ÷ memcpy for L0, × its objects' raw read for L1, ÷ raw fsync'd write for put),
``per_block_s``; put also ``lmdb_s``, ``vs_lmdb``, ``*_bytes_per_s``, ``fsyncs_per_block``; L0, L1, L2
and put also ``floor_s``, ``floor`` (what it is) and ``floor_ratio`` (in the ratio's metric), put
``floor_vs_lmdb``.
"""

from __future__ import annotations

from pathlib import Path

from .report_common import (DASH, mb_per_s, _absent, _ex, _section_head, _size, _txt, _us, _verdict, _x, fmt,
                            reproduce_line, table)

GROUPS = ["engine-paths"]
ORDER = ["l0-batch", "l0-cold", "l0-single", "l0-fixed", "l0-threads-1", "l0-threads-2", "l0-threads-4", "l1-batch", "l2-batch",
         "l2-s3", "l2-rgw", "put-durable"]
MiB = 1 << 20
_METRIC = {"l0": " of memcpy", "l1": " raw read", "l2": " of raw read"}  # what a get's ratio is of


def _cases(groups: dict) -> list[dict]:
    order = {p: i for i, p in enumerate(ORDER)}
    es = [_ex(b) for b in groups.get("engine-paths", []) if _ex(b).get("path")]
    return sorted(es, key=lambda e: (order.get(e["path"], 99), e.get("block_bytes") or 0))


def _goal(e: dict) -> tuple[str, str]:
    """(goal text, verdict) of a case against issue 10's targets."""
    path, ratio = e.get("path"), e.get("ratio")
    if path in ("l0-batch", "l0-cold"):
        return "≥ ×0.8 memcpy", _verdict(ratio, 0.8, True)
    if path == "l0-single":
        return "≥ ×0.5 memcpy (2 MiB)", _verdict(ratio, 0.5, True) if e.get("block_bytes") == 2 * MiB else "(goal is at 2 MiB)"
    if path == "l0-fixed":
        return "≤ 10 µs per block, batch of 64", _verdict(_us(e.get("per_block_s")), 10.0, False)
    if path == "l1-batch":
        return "≤ ×1.5 raw read", _verdict(ratio, 1.5, False)
    if path == "l2-batch":
        return "≥ ×0.7 the directory's raw read", _verdict(ratio, 0.7, True)
    if path in ("l2-s3", "l2-rgw"):
        return "≈ one round trip + the bytes (≤ ×2 one GET), not n round trips", _verdict(ratio, 2.0, False)
    if path.startswith("l0-threads-"):
        return "(scaling with threads: no lock around the bytes)", DASH
    if path == "put-durable":
        if e.get("block_bytes") == 256 * 1024:
            return "≥ LMDB (sync=True)", _verdict(e.get("vs_lmdb"), 1.0, True)
        if e.get("block_bytes") == 2 * MiB:
            return "≥ ×0.8 raw fsync'd write", _verdict(ratio, 0.8, True)
        return "(goals at 256 KiB and 2 MiB)", DASH
    return DASH, DASH


def _cold(cases: list[dict]) -> dict:
    """The run's first l0-cold case ({} where it has none): its turns and bytes per get."""
    return next((e for e in cases if e.get("path") == "l0-cold"), {})


def _nt_min(e: dict) -> str:
    """The get size from which L0 hits were copied with non-temporal stores in that run."""
    return _size(e["nt_min_bytes"]) if "nt_min_bytes" in e else "`row_copy.NT_MIN_BYTES`"


def _floor(e: dict) -> str:
    """The case's floor (a measured contender in the same rounds: the limit plus only
    what the path cannot skip) in the ratio's metric, and the store's time above it per
    block: why a goal is missed (by the floor itself, or by per-block cost above it)."""
    if e.get("floor_s") is None:
        return DASH
    above = (e["store_s"] - e["floor_s"]) / max(1, e.get("blocks") or 1)
    where = f"store {fmt(_us(above))} µs/block above it" if above > 0 else "store at or under it"
    return f"{_x(e.get('floor_ratio'))}{_METRIC.get(e['path'][:2], '')}; {where}"


def _get_row(e: dict) -> list[str]:
    goal, verdict = _goal(e)
    ratio = _x(e.get("ratio")) + _METRIC.get(e["path"][:2], "") + (" (store: non-temporal stores)" if e.get("nt") else "")
    if e["path"] in ("l2-s3", "l2-rgw"):
        ratio = (f"{_x(e.get('ratio'))} one GET; the same objects fetched one after another took "
                 f"{fmt(_us(e.get('sequential_s')))} µs ({_x(e.get('vs_sequential'))} the get)")
        if e.get("parallel_s") is not None:
            ratio += (f", from {fmt(e.get('in_flight'), 'int')} threads {fmt(_us(e.get('parallel_s')))} µs "
                      f"({_x(e.get('vs_parallel'))} the get)")
    return [e["path"], _size(e.get("block_bytes")), fmt(e.get("threads"), "int"), fmt(e.get("blocks"), "int"),
            fmt(_us(e.get("store_s"))),
            fmt(_us(e.get("limit_s"))), fmt(mb_per_s(e.get("bytes"), e.get("store_s"))),
            fmt(mb_per_s(e.get("block_bytes") if e["path"] in ("l2-s3", "l2-rgw") else e.get("bytes"), e.get("limit_s"))), ratio, fmt(_us(e.get("per_block_s"))), goal, verdict,
            _floor(e), _txt(e.get("limit")) + _one_thread(e)]


def _one_thread(e: dict) -> str:
    """The L1/L2 limit read on one thread, where the case has it (the get and its limit use two)."""
    if e.get("one_thread_limit_s") is None:
        return ""
    return f" (one thread read them in {fmt(_us(e['one_thread_limit_s']))} µs)"


def _put_row(e: dict) -> list[str]:
    goal, verdict = _goal(e)
    return [_size(e.get("block_bytes")), fmt(e.get("blocks"), "int"), fmt(_us(e.get("store_s"))),
            fmt(_us(e.get("lmdb_s"))), fmt(_us(e.get("limit_s"))), fmt(mb_per_s(e.get("bytes"), e.get("store_s"))),
            fmt(mb_per_s(e.get("bytes"), e.get("lmdb_s"))), fmt(mb_per_s(e.get("bytes"), e.get("limit_s"))),
            _x(e.get("vs_lmdb")), _x(e.get("ratio")), fmt(e.get("fsyncs_per_block")), goal, verdict,
            fmt(_us(e.get("floor_s"))), _x(e.get("floor_vs_lmdb"))]


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    benches = groups["engine-paths"]
    cases = _cases(groups)
    e0 = cases[0] if cases else {}
    lines = _section_head("engine-paths", "Engine paths through `BlockStore` beside their limits (group `engine-paths`)")
    lines += [
        "What a user pays through the public API, one calling thread (an L1 or L2 batch is read by the get's "
        "thread and the store's read helper, in 4 MiB chunks: `threads` 2, and its limit and floor read their "
        "files with the same two threads and chunks, like with like; the limit column adds the same read on one "
        "thread), each contender timed in the same rounds, interleaved "
        f"in an order that rotates with the round and is reversed every other pass, so no contender always follows the same one (`l2-s3` and `l2-rgw`: the get first after each round's fresh open, then the three fetches; medians of {fmt(e0.get('rounds'), 'int')} rounds; "
        "each ratio is the median of the rounds' own ratios, so it need not equal the ratio of the two medians shown). Blocks: one layer of float16 "
        "K and V, 16 tokens, random payloads, codec none. L0 cases hold every block in RAM and decode into the "
        "caller's `out`; `l0-fixed` uses 512 B payloads, so its time per block is the get's fixed cost; "
        f"`l0-cold` is what an engine restoring a prefix pays: gets of {_size(_cold(cases).get('bytes'))} into KV "
        f"memory not touched lately ({fmt(_cold(cases).get('turns'), 'int')} prefixes, each with its own `out`, got in turn: more bytes than "
        "the CPU caches hold between one get of a prefix and the next), beside `np.copyto` of the same sources into "
        "the same outs in the same turns, times per get. `l1-batch` "
        "runs with `ram_bytes=0` (every get an L1 read, as after a restart), page cache warm, beside the store's own "
        "object files read raw (open, one `preadv`: header into a scratch, body into `out`, CRC; close: the body lands "
        "where the get puts it, from the same offset; docs/STORE.md says why not a copy read from offset 0); `l2-batch` reads blocks only a local-directory L2 holds (a fresh store directory per round: the L2 reads straight into `out` on the get's two threads, verification, and the promotion into L1, queued to the background writer, which reads the objects again), beside the same raw read of the L2's own object files; `l2-s3` does the same against moto over loopback HTTP (SigV4 on), beside one GET, the same n GETs one after another through the store's own object store and the same n GETs from 8 threads (what reads in flight reach on this machine), and `l2-rgw` against Ceph RGW (a one-node cluster on loopback; absent where it cannot run); `l0-threads-T` runs T threads, each a get of its own blocks, beside T threads each copying the same bytes (aggregate). Goals are issue 10's constants. What a RAM or L1 hit verifies "
        "(one CRC pass per byte per tier crossing) is in docs/FORMAT.md, \"What each read verifies\". "
        f"An L0 get of {_nt_min(e0)} or more copies with non-temporal stores (engine/row_copy.py: whole lines written "
        "without reading them first, and not kept in the cache); `np.copyto`, the limit, and the floor write "
        "through the cache, so on those rows (marked) the store can pass ×1.0 of the limit: there the limit "
        "is what a plain copy of the same bytes costs, not the memory's bound. 1 MB = 1e6 B.",
        "",
        "### Gets (L0 RAM, L1 disk)",
        "",
    ]
    lines += table(["path", "block", "threads", "blocks per round", "store µs", "limit µs", "store MB/s", "limit MB/s", "ratio",
                    "store µs per block", "goal", "verdict", "floor (why a goal is missed)", "limit"],
                   [_get_row(e) for e in cases if e["path"] != "put-durable"])
    lines += ["**Floors** (the profile of a miss, timed in the same rounds): `l0-*` copies each block's body from "
              "its own envelope-sized buffer into its row of `out` with no check (the memory cost of a per-block "
              "copy out of separate slots, without the get's Python); `l1-batch` and `l2-batch` read the same files "
              "as their limits and then run one CRC32C pass over each (the one check a read from disk needs: docs/FORMAT.md). "
              "A floor short of the goal means the goal cannot be met by removing overhead (the one verification "
              "pass is a CRC32C at the speed the `limits` section gives, beside a page-cache copy's); the "
              "µs per block above the floor are the get's own per-block cost (keying, index, guard, header checks, "
              "bookkeeping), the part a faster implementation would remove.", ""]
    lines += ["### Durable put (one thread, durable on return)", "",
              "`put` of new blocks with `ram_bytes=0` (no RAM copy, like the contenders); LMDB with `sync=True`, one "
              "write transaction per call; the limit is the call's bytes written to one new file and fsync'd once. "
              "`fsyncs/block` is walpub's own count over the store's puts. The floor of walpub's layout (a file "
              "per block) is timed beside them: each block written to its own new file and fsync'd, 8 at a time as "
              "walpub does, then one fsync of their one directory (walpub also fsyncs each touched `objects/<ab>/` "
              "and the WAL). Where the floor is short of LMDB, only packing a put's blocks into fewer files closes "
              "the gap.", ""]
    lines += table(["block", "blocks per put", "store µs", "LMDB µs", "raw µs", "store MB/s", "LMDB MB/s", "raw MB/s",
                    "store ÷ LMDB", "store ÷ raw", "fsyncs/block", "goal", "verdict", "file-per-block floor µs",
                    "floor ÷ LMDB"],
                   [_put_row(e) for e in cases if e["path"] == "put-durable"])
    lines += ["moto is a Python server on the same 2 cores: its own CPU, not the network round trip, bounds it, so "
              "reads in flight together gain little there; RGW is a C++ server on the same 2 cores (with its "
              "Ceph monitor and OSD). Where the get is near the same n GETs from 8 threads, reads in flight reach "
              "all they can on this machine and the server's share of the 2 cores, not the get, bounds it. "
              "The object-store study (group `objectstore`) has GET "
              "latency and throughput per request for both. LMCache side by side: its own section below.",
              ""]
    return lines + [reproduce_line(mode, benches), ""]


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    """Restore (get) and durable put through BlockStore, each beside its limit and goal."""
    link = "[engine-paths](#engine-paths)"
    cases = _cases(groups)
    if not cases:
        return [["Engine paths through BlockStore", _absent("engine-paths"), DASH, link]]

    def cell(e: dict) -> str:
        goal, verdict = _goal(e)
        if e["path"] == "l0-fixed":
            value = f"{fmt(_us(e.get('per_block_s')))} µs/block"
        elif e["path"] == "put-durable":
            value = (f"{fmt(mb_per_s(e.get('bytes'), e.get('store_s')))} MB/s = {_x(e.get('vs_lmdb'))} LMDB, "
                     f"{_x(e.get('ratio'))} raw fsync'd write, {fmt(e.get('fsyncs_per_block'))} fsyncs/block")
        else:
            value = (f"{fmt(_us(e.get('per_block_s')))} µs/block, {_x(e.get('ratio'))}"
                     + {"l0": " memcpy", "l1": " raw read", "l2": " raw read"}.get(e["path"][:2], ""))
        return f"{e['path']} {_size(e.get('block_bytes'))}: {value}" + (f" ({verdict})" if verdict != DASH else "")

    gets = [cell(e) for e in cases if e["path"] in ("l0-batch", "l0-single", "l0-fixed", "l1-batch", "l2-batch")]
    puts = [cell(e) for e in cases if e["path"] == "put-durable"]
    return [["Restore through `BlockStore.get` ÷ its limit (issue 10 goals)", "; ".join(gets) or DASH,
             "one calling thread (L1/L2 batches and their limits: two threads); L0 ÷ memcpy, L1 × its objects' raw "
             "read, L2 (directory) ÷ its raw read", link],
            ["Durable put through `BlockStore.put` (issue 10 goals)", "; ".join(puts) or DASH,
             "one thread, durable on return, beside LMDB (sync=True) and a raw fsync'd write", link]]


def plots(groups: dict, plots_dir: Path, available: list[str]) -> list[tuple[str, str]]:
    return []
