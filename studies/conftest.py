"""pytest glue for the study suites (``studies/bench_<topic>.py``).

- Collects ``bench_*.py`` under studies/ even without ``-o python_files=...``,
  so ``pytest studies`` runs every study.
- Adds to pytest-benchmark's JSON what the report needs: the run mode, the
  command that produced it, machine memory, disk and library versions
  (``machine_info["quiver"]``), and the studies that failed (``["quiver"]``);
  a failed study's timing is dropped from ``benchmarks``.
- ``bench_dir``: a fresh directory on the same disk as the repository
  (``<repo>/tmp/``, git-ignored), removed afterwards.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from . import config as study_config

REPO_ROOT = Path(__file__).resolve().parent.parent
_FAILED: list[str] = []
_FAILED_IDS: set[str] = set()
_STARTED = time.time()

LIBRARIES = [
    "numpy", "numba", "blake3", "awscrt", "crc32c", "rocksdict", "lmdb", "sortedcontainers",
    "pyroaring", "lz4", "zstandard", "torch", "transformers", "boto3", "moto", "matplotlib", "pytest", "pytest-benchmark",
]


def bench_tmp_root() -> Path:
    """Parent of the studies' scratch directories: ``$QUIVER_BENCH_TMP`` or ``<repo>/tmp``."""
    root = Path(os.environ.get("QUIVER_BENCH_TMP") or REPO_ROOT / "tmp")
    root.mkdir(parents=True, exist_ok=True)
    return root


def make_bench_dir(tag: str) -> Path:
    """A fresh scratch directory on the repository's disk."""
    return Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=bench_tmp_root()))


def run_once(benchmark, fn):
    """Run ``fn`` once under the benchmark (it times itself); return its value.

    For studies whose cases take seconds and record their own figures in
    extra_info: one round, no warm-up, and the value comes back to the caller."""
    box = {}

    def call():
        box["v"] = fn()

    benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    return box["v"]


@pytest.fixture(scope="session", autouse=True)
def _compiled_art_kernels():
    """Studies time the ART's compiled kernels: the product serves first calls
    with interpreted ones while a thread compiles (index_backends/_art_kernels.py),
    so this process waits for them once, untimed.  Child processes a study
    starts keep the product's default (studies/bench_firstreq.py measures it)."""
    try:
        from quiver.index_backends import _art_kernels
    except ImportError:
        yield
        return
    _art_kernels.warmup()
    yield


@pytest.fixture
def bench_dir():
    d = make_bench_dir("study")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def pytest_collect_file(file_path, parent):
    """Collect studies/bench_*.py when python_files does not already match them."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's python plugin collects it
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_runtest_logreport(report):
    if report.failed:
        _FAILED.append(f"{report.nodeid} ({report.when})")
        _FAILED_IDS.add(report.nodeid)


def _memory_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _disk_of(path: Path) -> str | None:
    """The device and filesystem type holding ``path`` (from /proc/mounts)."""
    try:
        best = None
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
                if inside and (best is None or len(mnt) > len(best[1])):
                    best = (dev, mnt, fstype)
        return f"{best[0]} ({best[2]}) mounted at {best[1]}" if best else None
    except OSError:
        return None


def _versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import lmdb

        out["liblmdb"] = ".".join(map(str, lmdb.version()))
    except Exception:  # noqa: BLE001 - optional detail
        pass
    return out


def pytest_benchmark_update_machine_info(config, machine_info):
    from quiver import index_backends
    machine_info["quiver"] = {
        "mode": study_config.MODE,
        "command": os.environ.get("QUIVER_RUN_COMMAND") or " ".join([Path(sys.executable).name, "-m", "pytest", *sys.argv[1:]]),
        "pytest_command": " ".join([sys.executable, "-m", "pytest", *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": _memory_total(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "scratch_dir": str(bench_tmp_root()),
        "scratch_disk": _disk_of(bench_tmp_root().resolve()),
        "libraries": _versions(),
        "index_backends": index_backends.available(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # A study that failed after its timed call (a wrong answer, say) leaves a
    # timing behind: drop it, so the report shows no figure rather than a bad one.
    kept, dropped = [], []
    for b in output_json.get("benchmarks", []):
        (dropped if b.get("fullname") in _FAILED_IDS else kept).append(b)
    output_json["benchmarks"] = kept
    output_json["quiver"] = {
        "dropped_failed": [b.get("fullname") for b in dropped],
        "mode": study_config.MODE,
        "started_unix": _STARTED,
        "finished_unix": time.time(),
        "elapsed_s": time.time() - _STARTED,
        "failed": list(_FAILED),
    }
