"""LMCache's storage layer and Quiver side by side (group ``lmcache``; issue 10).

The measuring runs in a child process with ``.venv-lmcache``'s interpreter (``make
setup-lmcache`` builds it: torch 2.13.0, lmcache 0.5.6, and this project, editable), where
both stores live in one process and are timed in the same rounds: see
studies/lmcache_child.py for what each figure includes and the semantics of each side.
Where that venv is missing or LMCache does not import, the case is recorded as skipped
with the reason (the report shows it) instead of failing the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from .config import pick
from .conftest import REPO_ROOT, make_bench_dir, run_once

KiB, MiB = 1 << 10, 1 << 20
LMCACHE_PY = REPO_ROOT / ".venv-lmcache" / "bin" / "python"
LMCACHE_LOG = REPO_ROOT / ".venv-lmcache.log"
CHUNKS = pick(smoke=[256 * KiB], quick=[256 * KiB, 2 * MiB], full=[256 * KiB, 2 * MiB])
REQUEST_BYTES = pick(smoke=2 * MiB, quick=8 * MiB, full=8 * MiB)
ROUNDS = pick(smoke=2, quick=15, full=31)
TIERS = ["ram", "disk"]


def _unavailable() -> str | None:
    """Why the LMCache side cannot run here, or None."""
    if os.environ.get("QUIVER_SMOKE") == "1" and not LMCACHE_PY.exists():
        return "smoke mode: .venv-lmcache is built by `make report` (make setup-lmcache), not by the tests"
    if not LMCACHE_PY.exists():
        tail = LMCACHE_LOG.read_text()[-400:] if LMCACHE_LOG.exists() else "no install log"
        return f"{LMCACHE_PY} is missing (make setup-lmcache failed or did not run): {tail}"
    r = subprocess.run([str(LMCACHE_PY), "-c", "import lmcache, quiver"], capture_output=True, text=True,
                       timeout=300, cwd=REPO_ROOT)
    if r.returncode != 0:
        return f"lmcache or quiver does not import in .venv-lmcache: {r.stderr[-400:]}"
    return None


def _run_child(root) -> dict:
    args = {"request_bytes": REQUEST_BYTES, "rounds": ROUNDS, "root": str(root), "tiers": TIERS,
            "chunk_bytes": CHUNKS}
    env = dict(os.environ, LMCACHE_LOG_LEVEL="WARNING")
    r = subprocess.run([str(LMCACHE_PY), "-m", "quiver.studies.lmcache_child", json.dumps(args)], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"lmcache child failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_lmcache_side_by_side(benchmark):
    benchmark.group = "lmcache"
    why = _unavailable()
    if why:
        print(f"!!! LMCACHE STUDY NOT RUN: {why} !!!", file=sys.stderr)
        benchmark.extra_info.update(skipped=why)
        run_once(benchmark, lambda: None)
        return
    root = make_bench_dir("lmcache")
    try:
        out = run_once(benchmark, lambda: _run_child(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    benchmark.extra_info.update(out)
    assert out["cases"], "the child measured nothing"
    for case in out["cases"]:
        assert all(v > 0 for v in case["medians_s"].values()), case
