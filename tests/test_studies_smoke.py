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


@pytest.mark.timeout(110)
def test_studies_pipeline_smoke(tmp_path):
    env = dict(os.environ, QUIVER_SMOKE="1", QUIVER_BENCH_TMP=str(tmp_path / "scratch"))
    env.pop("QUIVER_FULL", None)
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "studies.cli", "run", "--json", str(results), "--", *FAST],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=100,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    data = json.loads(results.read_text())
    assert data["machine_info"]["quiver"]["mode"] == "smoke"
    assert data["quiver"]["failed"] == []
    groups = {b["group"] for b in data["benchmarks"]}
    assert {"limits", "index-insert", "index-get", "index-get_many", "index-scan", "index-replica-scan",
            "index-longest-prefix", "index-footprint", "index-reopen", "mooncake"} <= groups

    out = tmp_path / "out"
    rep = subprocess.run(
        [sys.executable, "-m", "studies.cli", "report", "--input", str(results), "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert rep.returncode == 0, rep.stdout[-4000:] + rep.stderr[-4000:]
    report = (out / "REPORT.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("#")]
    for g in groups:
        assert any(f"`{g}`" in h for h in headings), f"no section for group {g}"
    assert "smoke" in report and data["machine_info"]["quiver"]["command"] in report
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "mooncake-latency.png" in plots and "index-get-p50_us.png" in plots
    assert "index-write-amplification.png" in plots and "index-bytes-on-disk.png" in plots
    for name in plots:
        assert f"plots/{name}" in report
        assert (out / "plots" / name).stat().st_size > 1000


def test_report_renders_unknown_groups_and_missing_figures(tmp_path):
    """A group with no dedicated renderer gets a generic table; absent figures print as a dash."""
    from studies.report import DASH, write_report

    data = {
        "machine_info": {"quiver": {"mode": "quick", "index_backends": ["flat", "lmdb"]}},
        "benchmarks": [
            {"group": "walpub-publish", "name": "test_publish[4]", "fullname": "studies/bench_walpub.py::test_publish[4]",
             "params": {"blocks": 4}, "stats": {"median": 0.002, "rounds": 3},
             "extra_info": {"mb_per_s": 123.0, "nested": {"fsyncs": 2}}},
            {"group": "index-get", "name": "test_get[flat-10]", "fullname": "studies/bench_index.py::test_get[case0]",
             "stats": {"median": 0.001, "rounds": 1},
             "extra_info": {"backend": "flat", "n": 10, "p50_us": 0.5, "p99_us": None}},
        ],
    }
    src = tmp_path / "results.json"
    src.write_text(json.dumps(data))
    report = write_report(src, tmp_path / "out").read_text()
    assert "## Group `walpub-publish`" in report and "nested.fsyncs" in report
    assert "studies/bench_walpub.py::test_publish" in report
    get_rows = [line for line in report.splitlines() if line.startswith("| 10 |")]
    assert any("| flat | 0.5 | " + DASH in r for r in get_rows)  # p99 absent
    assert any(r.startswith("| 10 | lmdb | " + DASH) for r in get_rows)  # backend without a result
