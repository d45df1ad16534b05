"""The ``quiver`` command, run as a subprocess against real stores (docs/CLI.md).

Every store here is built with BlockStore (small blocks), then the CLI is run
as ``python -m quiver.cli`` from a directory outside the repository, and what
it prints (``--json``) is checked against what was stored and what is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from quiver import BlockStore, CacheIdentity
from quiver.engine.keys import chain_keys

REPO = Path(__file__).resolve().parent.parent
BT = 4  # tokens per block
SHAPE = (2, 2, BT, 1, 8)  # layers, K/V, tokens, kv heads, head dim: 256 payload bytes per block
LAYOUT = ("quiver", "engine", "tier", "walpub", "index_backends", "studies")


def ident(tenant: str, model: str) -> CacheIdentity:
    return CacheIdentity(model=model, model_revision="r1", tokenizer="tok", tokenizer_revision="r1",
                         tenant=tenant, kv_dtype="float16", block_tokens=BT, num_layers=SHAPE[0],
                         num_kv_heads=SHAPE[3], head_dim=SHAPE[4])


IDENTS = [ident("acme", "m1"), ident("acme", "m2"), ident("globex", "m1")]
COUNTS = [3, 5, 2]


def tokens_of(i: int) -> np.ndarray:
    return (np.arange(COUNTS[i] * BT, dtype=np.uint32) + 1000 * i)


def blocks_of(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal((COUNTS[i], *SHAPE)).astype(np.float16)


def build_store(path: Path, **opts) -> Path:
    """IDENTS with COUNTS blocks each, closed cleanly."""
    with BlockStore.open(str(path), ram_bytes=0, **opts) as s:
        for i, idn in enumerate(IDENTS):
            assert s.put(idn, tokens_of(i), blocks_of(i)) == COUNTS[i]
    return path


def store_keys(i: int) -> list[bytes]:
    return [IDENTS[i].namespace + k for k in chain_keys(IDENTS[i], tokens_of(i))]


def object_path(store: Path, key: bytes) -> Path:
    h = key.hex()
    return store / "l1" / "objects" / h[-2:] / f"{h}.blk"


def on_disk(store: Path) -> dict[bytes, int]:
    """{namespace: bytes} of the object files under l1/objects."""
    out: dict[bytes, int] = {}
    for f in (store / "l1" / "objects").glob("*/*.blk"):
        ns = bytes.fromhex(f.name[:32])
        out[ns] = out.get(ns, 0) + f.stat().st_size
    return out


def env(**extra: str) -> dict[str, str]:
    """The environment without the developer's QUIVER_* configuration."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    e.update(extra)
    return e


def quiver(*args, cwd: Path, check_rc: int | None = None, extra_env: dict | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "quiver.cli", *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, env=env(**(extra_env or {})), timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    if check_rc is not None:
        assert r.returncode == check_rc, (args, r.returncode, r.stdout, r.stderr)
    return r


def quiver_json(*args, cwd: Path, rc: int = 0) -> dict:
    r = quiver(*args, "--json", cwd=cwd, check_rc=rc)
    return json.loads(r.stdout)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working directory outside the repository."""
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return build_store(tmp_path / "store")


def ns_rows(info: dict) -> dict[bytes, dict]:
    return {bytes.fromhex(r["namespace"]): r for r in info["identities"]}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- help and bad input
@pytest.mark.parametrize("cmd", ["", "inspect", "stats", "verify", "gc", "evict", "l2", "l2 compact", "warmup",
                                 "study", "study run", "study report", "report"])
def test_help_of_every_subcommand(cmd, work):
    r = quiver(*cmd.split(), "--help", cwd=work, check_rc=0)
    assert r.stdout.startswith("usage: quiver") and r.stderr == ""


def test_warmup_fills_the_named_cache_dir(tmp_path, work):
    """`quiver warmup` compiles the ART's kernels into the cache directory the
    caller names (a fresh one here), and reports every kernel ready."""
    cache = tmp_path / "numba-cache"
    r = quiver("warmup", "--json", cwd=work, check_rc=0, extra_env={"QUIVER_NUMBA_CACHE_DIR": str(cache)})
    st = json.loads(r.stdout)
    assert st["pending"] == [] and not st["failed"] and st["compiled"]
    assert st["cache_dir"] and Path(st["cache_dir"]).is_relative_to(cache)
    assert any(p.suffix == ".nbi" for p in cache.rglob("*"))  # numba's cache index files


def test_report_without_the_study_extra_names_the_extra(tmp_path, work):
    """A core-only install has no matplotlib: `quiver report` says which extra to
    install, one line, exit 2.  (Its absence is simulated by an import hook in the
    child: building a second venv without matplotlib would cost minutes.)"""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from quiver.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    results = Path(__file__).resolve().parent.parent / "bench_results" / "results.json"  # the committed run: it has plots
    r = subprocess.run([sys.executable, "-c", code, "report", "--input", str(results), "--out", str(tmp_path / "o")],
                       cwd=work, capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("quiver: this command needs the 'study' extra: pip install 'quiver-kv[study]'")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_path_not_a_store_and_bad_flags_are_one_line_and_exit_2(tmp_path, work, store):
    missing = tmp_path / "nope"
    for cmd in (["inspect"], ["stats"], ["verify"], ["gc"], ["evict", "--to-bytes", "1"]):
        r = quiver(*cmd, missing, cwd=work, check_rc=2)
        assert r.stderr == f"quiver: no such store directory: {missing}\n", r.stderr
        assert not missing.exists()  # never created
    empty = tmp_path / "empty"
    empty.mkdir()
    r = quiver("verify", empty, cwd=work, check_rc=2)
    assert r.stderr == f"quiver: not a Quiver store (no l1/wal inside): {empty}\n"
    assert list(empty.iterdir()) == []
    r = quiver("inspect", store, "--bogus", cwd=work, check_rc=2)
    assert "unrecognized arguments: --bogus" in r.stderr
    r = quiver("evict", store, cwd=work, check_rc=2)  # no selection
    assert r.stderr == "quiver: say what to evict: --to-bytes N, --namespace HEX, --tenant T or --model M\n"
    r = quiver("evict", store, "--to-bytes", "1", "--namespace", "00" * 16, cwd=work, check_rc=2)
    assert "not allowed with argument" in r.stderr
    assert "not a byte count" in quiver("evict", store, "--to-bytes", "12X", cwd=work, check_rc=2).stderr
    r = quiver("evict", store, "--namespace", "abc", cwd=work, check_rc=2)
    assert r.stderr.count("\n") == 1 and "32 hex digits" in r.stderr
    r = quiver("inspect", cwd=work, check_rc=2)  # no PATH, nothing configured
    assert r.stderr.count("\n") == 1 and "no store path" in r.stderr
    assert quiver(cwd=work, check_rc=2).stderr.startswith("usage: quiver")


def test_a_store_open_in_another_process_is_one_line_and_exit_3(store, work):
    before = on_disk(store)
    with BlockStore.open(str(store), ram_bytes=0):
        for cmd in (["inspect"], ["stats", "--json"], ["verify"], ["gc"], ["evict", "--to-bytes", "0"]):
            r = quiver(*cmd[:1], store, *cmd[1:], cwd=work, check_rc=3)
            assert r.stderr == f"quiver: store is locked by another process: {store}\n", (cmd, r.stderr)
            assert r.stdout == ""
    assert on_disk(store) == before  # nothing was evicted or dropped


# --------------------------------------------------------------------------- inspect and stats
def test_inspect_reports_what_was_stored_and_changes_nothing(store, tmp_path, work):
    ids = tmp_path / "identities.jsonl"
    ids.write_text("".join(json.dumps(i.to_dict()) + "\n" for i in IDENTS))
    before = snapshot(store)
    info = quiver_json("inspect", store, "--identities", ids, cwd=work)
    assert snapshot(store) == before  # read only: not one file written, renamed or touched
    rows = ns_rows(info)
    disk = on_disk(store)
    assert set(rows) == {i.namespace for i in IDENTS} == set(disk)
    for i, idn in enumerate(IDENTS):
        r = rows[idn.namespace]
        assert r["l1"] == {"blocks": COUNTS[i], "bytes": disk[idn.namespace]}
        assert r["label"]["tenant"] == idn.tenant and r["label"]["model"] == idn.model
        assert r["l0"] is None and r["l2"] is None
    assert info["totals"]["l1"] == {"blocks": sum(COUNTS), "bytes": sum(disk.values())}
    assert info["l1"]["orphans"] == info["l1"]["missing"] == info["l1"]["tmp_files"] == 0
    assert info["recovery"]["clean"] is True and info["recovery"]["orphan_scan_at_next_open"] is False
    assert info["wal"]["last_seq"] >= sum(COUNTS) and info["wal"]["segments"] >= 1
    if info["index"]["persistent"]:
        assert info["index"]["applied_seq"] == info["wal"]["last_seq"]
        assert info["index"]["records"] == sum(COUNTS)
    assert info["l2"]["pending_l2_keys"] == 0 and info["l2"]["object_store"] is None
    text = quiver("inspect", store, "--identities", ids, cwd=work, check_rc=0).stdout
    for idn in IDENTS:
        assert idn.namespace.hex() in text and f"{idn.tenant}/{idn.model}@r1" in text


@pytest.mark.parametrize("index", ["lmdb", "flat"])
def test_inspect_reads_each_kind_of_index(tmp_path, work, index):
    store = build_store(tmp_path / "s", index=index)
    info = quiver_json("inspect", store, cwd=work)
    assert info["index"]["backend"] == index
    assert info["totals"]["l1"]["blocks"] == sum(COUNTS)
    if index == "lmdb":
        assert info["index"]["applied_seq"] == info["wal"]["last_seq"]
    else:
        assert "rebuild" in info["recovery"]["next_open"]


def test_stats_prints_the_stores_stats_as_json(store, work):
    stats = quiver_json("stats", store, cwd=work)
    assert stats["residency"]["l1"] == sum(COUNTS)
    text = quiver("stats", store, cwd=work, check_rc=0).stdout
    assert f"residency.l1 = {sum(COUNTS)}" in text
    assert ns_rows(quiver_json("inspect", store, cwd=work))  # still there, nothing evicted
    assert sum(on_disk(store).values()) > 0


# --------------------------------------------------------------------------- verify
def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def test_verify_drops_exactly_the_corrupt_blocks(store, work):
    flipped = [store_keys(0)[1], store_keys(2)[0]]
    for k in flipped:
        p = object_path(store, k)
        flip(p, p.stat().st_size // 2)
    # Sound walpub objects whose envelope is not the key's: one names another
    # block, one carries another identity's fingerprint (its namespace is acme/m2's).
    from quiver.walpub import Volume

    good = object_path(store, store_keys(1)[0]).read_bytes()
    other_block = IDENTS[1].namespace + b"\x11" * 32
    other_ident = IDENTS[0].namespace + store_keys(1)[0][16:]
    from quiver.engine.admin import detect_index

    with Volume(str(store / "l1"), index=detect_index(str(store))) as vol:
        assert vol.publish(other_block, good) and vol.publish(other_ident, good)

    res = quiver_json("verify", store, cwd=work, rc=1)
    why = {bytes.fromhex(c["key"]): c["why"] for c in res["corrupt"]}
    assert set(why) == {*flipped, other_block, other_ident}
    assert all("bad crc" in why[k] for k in flipped)
    assert "names another block" in why[other_block]
    assert "fingerprint" in why[other_ident]
    assert res["blocks"] == sum(COUNTS) + 2 and res["dropped"] == 4
    assert res["remaining"]["blocks"] == sum(COUNTS) - 2
    assert res["bytes_per_s"] > 0
    for k in (*flipped, other_block, other_ident):
        assert not object_path(store, k).exists()

    with BlockStore.open(str(store), ram_bytes=0) as s:  # the others still get()
        assert s.lookup(IDENTS[0], tokens_of(0)) == 1
        assert s.lookup(IDENTS[2], tokens_of(2)) == 0
        assert s.lookup(IDENTS[1], tokens_of(1)) == COUNTS[1]
        assert np.array_equal(s.get(IDENTS[1], tokens_of(1)), blocks_of(1))
        assert np.array_equal(s.get(IDENTS[0], tokens_of(0), n_blocks=1), blocks_of(0)[:1])
    r = quiver("verify", store, cwd=work, check_rc=0)
    assert "corrupt: none" in r.stdout and "MB/s" in r.stdout


# --------------------------------------------------------------------------- gc
def test_gc_removes_tmp_files_and_orphans_only(store, work):
    good = object_path(store, store_keys(0)[0]).read_bytes()
    orphan_key = IDENTS[0].namespace + b"\x22" * 32
    orphan = object_path(store, orphan_key)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(good)
    (store / "l1" / "tmp" / "leftover").write_bytes(b"x" * 100)
    (store / "PENDING_L2.tmp").write_bytes(b"\0" * 48)
    info = quiver_json("inspect", store, cwd=work)
    assert info["l1"]["orphans"] == 1 and info["l1"]["tmp_files"] == 1

    res = quiver_json("gc", store, cwd=work)
    assert res["tmp_removed"] == 1 and res["orphans_removed"] == 1 and res["journal_tmp_removed"] is True
    assert not orphan.exists() and not (store / "PENDING_L2.tmp").exists()
    assert list((store / "l1" / "tmp").iterdir()) == []
    info = quiver_json("inspect", store, cwd=work)
    assert info["totals"]["l1"]["blocks"] == sum(COUNTS) and info["l1"]["orphans"] == 0
    assert quiver("gc", store, cwd=work, check_rc=0).stdout.startswith(f"gc {store}: removed 0 tmp file(s), 0 orphan")


# --------------------------------------------------------------------------- evict
def test_evict_to_bytes_leaves_at_most_n_and_survives_reopen(store, work):
    used = sum(on_disk(store).values())
    n = used // 2
    res = quiver_json("evict", store, "--to-bytes", n, cwd=work)
    assert res["after"]["bytes"] <= n < res["before"]["bytes"] == used
    assert res["evicted"] == res["before"]["blocks"] - res["after"]["blocks"] > 0
    assert sum(on_disk(store).values()) == res["after"]["bytes"]
    with BlockStore.open(str(store), ram_bytes=0) as s:  # reopened: the WAL agrees
        assert s.stats()["residency"]["l1"] == res["after"]["blocks"]
        for i, idn in enumerate(IDENTS):
            k = s.lookup(idn, tokens_of(i))
            if k:
                assert np.array_equal(s.get(idn, tokens_of(i), n_blocks=k), blocks_of(i)[:k])
    assert quiver_json("inspect", store, cwd=work)["totals"]["l1"]["bytes"] <= n
    quiver("verify", store, cwd=work, check_rc=0)
    r = quiver("evict", store, "--to-bytes", "0", cwd=work, check_rc=0)
    assert "-> 0 block(s)" in r.stdout
    assert on_disk(store) == {}


def test_evict_by_tenant_removes_only_that_tenants_blocks(store, tmp_path, work):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([i.to_dict() for i in IDENTS]))
    r = quiver("evict", store, "--tenant", "acme", cwd=work, check_rc=2)  # no identities: cannot map
    assert r.stderr.count("\n") == 1 and "cannot map tenant 'acme'" in r.stderr and "--identities" in r.stderr
    r = quiver("evict", store, "--tenant", "nobody", "--identities", ids, cwd=work, check_rc=2)
    assert r.stderr == "quiver: no identity in the identities file(s) has tenant 'nobody'\n"
    dry = quiver_json("evict", store, "--tenant", "acme", "--model", "m2", "--identities", ids, "--dry-run",
                      cwd=work)
    assert dry["evicted"] == COUNTS[1] and dry["namespaces"] == [IDENTS[1].namespace.hex()]
    disk = on_disk(store)
    assert len(disk) == 3  # the dry run deleted nothing

    res = quiver_json("evict", store, "--tenant", "acme", "--identities", ids, cwd=work)
    assert res["evicted"] == COUNTS[0] + COUNTS[1]
    assert res["bytes_freed"] == disk[IDENTS[0].namespace] + disk[IDENTS[1].namespace]
    assert on_disk(store) == {IDENTS[2].namespace: disk[IDENTS[2].namespace]}
    with BlockStore.open(str(store), ram_bytes=0) as s:
        assert s.lookup(IDENTS[0], tokens_of(0)) == s.lookup(IDENTS[1], tokens_of(1)) == 0
        assert np.array_equal(s.get(IDENTS[2], tokens_of(2)), blocks_of(2))
    res = quiver_json("evict", store, "--namespace", IDENTS[2].namespace.hex(), cwd=work)
    assert res["evicted"] == COUNTS[2] and on_disk(store) == {}


# --------------------------------------------------------------------------- L2
def test_l2_compact_merges_a_directory_stores_manifests(tmp_path, work):
    l2 = tmp_path / "l2"
    store = build_store(tmp_path / "store", object_store=str(l2), manifest_batch=2)
    manifests = sorted((l2 / "manifests").iterdir())
    assert len(manifests) >= 3
    from quiver.tier.objectstore import LocalDirObjectStore

    with LocalDirObjectStore(str(l2)) as o:
        keys = o.read_manifests()
    assert len(keys) == sum(COUNTS)

    info = quiver_json("inspect", store, "--object-store", l2, "--l2-sizes", cwd=work)
    disk = on_disk(store)
    for i, idn in enumerate(IDENTS):
        assert ns_rows(info)[idn.namespace]["l2"] == {"blocks": COUNTS[i], "bytes": disk[idn.namespace]}
    assert info["totals"]["l2"]["blocks"] == sum(COUNTS)

    res = quiver_json("l2", "compact", l2, cwd=work)
    assert res["merged"] == len(manifests) and res["keys"] == sum(COUNTS)
    assert len(list((l2 / "manifests").iterdir())) == 1
    with LocalDirObjectStore(str(l2)) as o:
        assert o.read_manifests() == keys
    assert "nothing to merge" in quiver("l2", "compact", l2, cwd=work, check_rc=0).stdout

    r = quiver("l2", "compact", store, cwd=work, check_rc=2)  # a store, not its L2
    assert r.stderr.count("\n") == 1 and "is a Quiver store, not an object store" in r.stderr
    r = quiver("l2", "compact", tmp_path / "none", cwd=work, check_rc=2)
    assert r.stderr == f"quiver: no such object store directory: {tmp_path / 'none'}\n"
    assert not (tmp_path / "none").exists()
    # The configured L2 is read by default (the store records none itself).
    import importlib.util

    if importlib.util.find_spec("quiver.engine.config") is None:
        return  # a build without engine.config: only --object-store names an L2
    info = json.loads(quiver("inspect", store, "--json", cwd=work, check_rc=0,
                             extra_env={"QUIVER_OBJECT_STORE": str(l2)}).stdout)
    assert info["l2"]["configured"]["source"] == "env QUIVER_OBJECT_STORE"
    assert info["totals"]["l2"]["blocks"] == sum(COUNTS)


# --------------------------------------------------------------------------- studies
def _results(path: Path) -> Path:
    data = {
        "machine_info": {"quiver": {"mode": "quick", "index_backends": ["flat"]}},
        "benchmarks": [
            {"group": "example-study", "name": "test_example[4]",
             "fullname": "studies/bench_example.py::test_example[4]", "params": {"blocks": 4},
             "stats": {"median": 0.002, "rounds": 3}, "extra_info": {"mb_per_s": 123.0}},
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_report_reads_and_writes_under_the_current_directory(work, tmp_path):
    r = quiver("report", cwd=work, check_rc=2)
    assert r.stderr == f"quiver: no results JSON at {work / 'bench_results' / 'results.json'} " \
                       f"(run `quiver study run` first, or give --input)\n"
    _results(work / "bench_results" / "results.json")
    r = quiver("report", cwd=work, check_rc=0)
    assert (work / "bench_results" / "REPORT.md").is_file()
    src = _results(tmp_path / "elsewhere" / "r.json")
    quiver("study", "report", "--input", src, "--out", tmp_path / "out", cwd=work, check_rc=0)
    assert "example-study" in (tmp_path / "out" / "REPORT.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = quiver("report", "--input", bad, cwd=work, check_rc=2)
    assert r.stderr.startswith(f"quiver: {bad} is not a results JSON") and r.stderr.count("\n") == 1


def test_study_paths_default_to_the_current_directory(tmp_path, monkeypatch):
    from quiver.studies import cli as study_cli

    monkeypatch.chdir(tmp_path)
    assert study_cli.results_path(Namespace(json=None, out=None)) == tmp_path / "bench_results" / "results.json"
    assert study_cli.results_path(Namespace(json=None, out="x")) == tmp_path / "x" / "results.json"
    assert study_cli.results_path(Namespace(json="y/r.json", out=None)) == tmp_path / "y" / "r.json"
    assert study_cli.source_root() == REPO  # this checkout: `study run` runs its studies/
    # The Makefile runs `python -m quiver.studies.cli run` then `report` from the repository
    # root: the results land in the repository's bench_results/, as before.
    monkeypatch.chdir(REPO)
    assert study_cli.results_path(Namespace(json=None, out=None)) == REPO / "bench_results" / "results.json"


# --------------------------------------------------------------------------- the installed wheel
def test_wheel_installs_under_quiver_and_writes_nothing_into_site_packages(tmp_path, store):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".numba_cache")
    for d in LAYOUT:
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(dist), str(src)], capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = dist.glob("quiver_kv-*.whl")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr
    top = set(os.listdir(site))
    assert "quiver" in top and not top & {"engine", "tier", "walpub", "studies", "index_backends"}, top

    outside = tmp_path / "outside"
    outside.mkdir()
    # -P: the current directory is not put on sys.path; the repository is nowhere on it.
    run_env = env(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"))

    def py(*args, rc=0):
        r = subprocess.run([sys.executable, "-P", *map(str, args)], cwd=outside, capture_output=True, text=True,
                           env=run_env, timeout=600)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == rc, (args, r.returncode, r.stdout, r.stderr)
        return r

    r = py("-c", "import json, sys, quiver, quiver.engine, quiver.cli, quiver.tier.disk; "
                 "from quiver import BlockStore; "
                 "print(json.dumps([quiver.__file__, quiver.engine.__file__, quiver.cli.__file__, "
                 "quiver.tier.disk.__file__, sys.modules[BlockStore.__module__].__file__, "
                 "[p for p in sys.path if p and 'site' not in p]]))")
    files = json.loads(r.stdout)
    for f in files[:5]:
        assert Path(f).resolve().is_relative_to(site.resolve()), f
    assert str(REPO) not in files[5]

    before = snapshot(site)
    info = json.loads(py("-m", "quiver.cli", "inspect", store, "--json").stdout)
    assert info["totals"]["l1"]["blocks"] == sum(COUNTS)
    res = json.loads(py("-m", "quiver.cli", "verify", store, "--json").stdout)
    assert res["dropped"] == 0 and res["blocks"] == sum(COUNTS)
    stats = json.loads(py("-m", "quiver.cli", "stats", store, "--json").stdout)
    assert stats["residency"]["l1"] == sum(COUNTS)
    script = site / "bin" / "quiver"
    if script.exists():  # the console script pip made, run as an operator would
        r = subprocess.run([str(script), "gc", str(store)], cwd=outside, capture_output=True, text=True,
                           env=run_env, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = py("-m", "quiver.cli", "study", "run", rc=2)
    assert "source checkout" in r.stderr and r.stderr.count("\n") == 1
    py("-m", "quiver.cli", "report", "--input", _results(outside / "r.json"), "--out", outside / "rep")
    assert (outside / "rep" / "REPORT.md").is_file()
    assert snapshot(site) == before  # nothing written into site-packages
