"""No stall on the first request (issue 12, part A): the ART's kernels and their compile cache.

* The first put and get of a fresh process run the interpreted kernels while a
  background thread compiles (or loads) the compiled ones; the interpreted and
  compiled kernels leave bit-identical arrays.
* The compile cache goes to the configured directory (QUIVER_NUMBA_CACHE_DIR,
  else XDG_CACHE_HOME/quiver/numba, else ~/.cache/quiver/numba), never into the
  package directory, and Numba's global configuration is left alone.
* With no writable cache directory the store still works (kernels compiled in
  memory) and says so once, on logger ``quiver.index_backends``.

No timing asserts here: studies/bench_firstreq.py measures the first request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from quiver.index_backends import _art_kernels as kern

REPO = Path(__file__).resolve().parent.parent
PKG_DIR = Path(kern.__file__).resolve().parent  # the installed (here: editable) package directory


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUIVER_NUMBA_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "QUIVER_ART_JIT")}
    env.update(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", HOME=str(tmp_path / "home"))
    env.update(extra)
    return env


def _child(code: str, env: dict, timeout: float = 300) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# A fresh process: open an ART, first put and get, note what was compiled by
# then; then wait for the `get` kernel only (compiled or loaded, a few seconds
# cold) so the cache has something in it.
FIRST_REQUEST = """
    import json, sys, tempfile
    from quiver.index_backends import _art_kernels as kern
    from quiver.index_backends.art import ArtIndex
    numba_at_import = "numba" in sys.modules
    d = tempfile.mkdtemp()
    ix = ArtIndex(d)
    ix.put(b"k" * 48, b"v" * 16)
    got = ix.get(b"k" * 48)
    compiled_then = kern.jit_status()["compiled"]
    ix.close()
    kern.require("get")
    st = kern.jit_status()
    print(json.dumps({"numba_at_import": numba_at_import, "got": got.decode(), "compiled_then": compiled_then,
                      "cache_dir": st["cache_dir"], "get_from_cache": st["from_cache"].get("get"),
                      "failed": st["failed"]}))
"""


def test_cache_goes_where_configured_and_never_into_the_package(tmp_path):
    old_repo_cache = REPO / ".numba_cache"  # where the kernels were cached before
    before = _files(PKG_DIR)
    before_old = _files(old_repo_cache) if old_repo_cache.is_dir() else set()
    xdg = tmp_path / "xdg"
    env = _env(tmp_path, XDG_CACHE_HOME=str(xdg))
    cold = _child(FIRST_REQUEST, env)
    assert cold["got"] == "v" * 16 and cold["failed"] is None
    assert not cold["numba_at_import"], "importing the ART must not import numba"
    # The first request did not wait for a compilation: nothing was compiled yet
    # (the background thread was still importing numba or compiling `get`).
    assert cold["compiled_then"] == []
    assert cold["cache_dir"] == str(xdg / "quiver" / "numba")
    assert cold["get_from_cache"] is False  # empty cache: compiled
    assert list((xdg / "quiver" / "numba").rglob("*.nbi")), "no cache index written"
    warm = _child(FIRST_REQUEST, env)  # a restart: loaded, not compiled
    assert warm["get_from_cache"] is True and warm["cache_dir"] == cold["cache_dir"]
    assert _files(PKG_DIR) == before, "files appeared in the package directory"
    assert (_files(old_repo_cache) if old_repo_cache.is_dir() else set()) == before_old
    assert not (tmp_path / "home" / ".cache").exists()  # XDG_CACHE_HOME wins over ~/.cache


def test_cache_dir_named_by_the_caller(tmp_path):
    named = tmp_path / "named-cache"
    st = _child(FIRST_REQUEST, _env(tmp_path, QUIVER_NUMBA_CACHE_DIR=str(named),
                                     XDG_CACHE_HOME=str(tmp_path / "xdg")))
    assert st["cache_dir"] == str(named) and list(named.rglob("*.nbi"))
    assert not (tmp_path / "xdg").exists()


def test_home_cache_when_no_xdg(tmp_path):
    st = _child(FIRST_REQUEST, _env(tmp_path))
    assert st["cache_dir"] == str(tmp_path / "home" / ".cache" / "quiver" / "numba")


UNWRITABLE = """
    import json, logging, tempfile
    import numpy as np
    records = []
    class H(logging.Handler):
        def emit(self, r):
            records.append((r.name, r.levelname, r.getMessage()))
    logging.getLogger("quiver").addHandler(H())
    from quiver.engine.identity import CacheIdentity
    from quiver.engine.store import BlockStore
    from quiver.index_backends import _art_kernels as kern
    ident = CacheIdentity(model="org/m", model_revision="r1", tokenizer="t", tokenizer_revision="t1",
                          tenant="acme", kv_dtype="float16", block_tokens=16, num_layers=2, num_kv_heads=2,
                          head_dim=16)
    tokens = list(range(32))
    blocks = np.random.default_rng(0).standard_normal((2, *ident.block_shape)).astype(np.float16)
    d = tempfile.mkdtemp()
    with BlockStore.open(d + "/s", ram_bytes=0) as st:
        index = st.index
        st.put(ident, tokens, blocks)
        ok1 = bool((st.get(ident, tokens) == blocks).all())
    kern.require("get", "longest_prefix")   # two kernels compiled in memory: still one warning
    with BlockStore.open(d + "/s", ram_bytes=0) as st:
        ok2 = bool((st.get(ident, tokens) == blocks).all())
    s = kern.jit_status()
    print(json.dumps({"index": index, "ok": ok1 and ok2, "cache_dir": s["cache_dir"], "failed": s["failed"],
                      "compiled": s["compiled"],
                      "warnings": [r for r in records if r[1] == "WARNING" and r[0] == "quiver.index_backends"]}))
"""


def test_unwritable_cache_dir_still_works_and_logs_once(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"x")
    env = _env(tmp_path, HOME=str(blocker), XDG_CACHE_HOME=str(blocker))
    out = _child(UNWRITABLE, env)
    assert out["index"] == "art" and out["ok"]
    assert out["cache_dir"] is None and out["failed"] is None
    assert {"get", "longest_prefix"} <= set(out["compiled"])
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "no writable compile-cache directory" in out["warnings"][0][2]


def test_numba_config_is_left_alone(tmp_path):
    code = """
        import json, sys
        import numba
        before = numba.config.CACHE_DIR
        from quiver.index_backends import art
        from quiver.index_backends import _art_kernels as kern
        kern.require("get")
        print(json.dumps({"before": before, "after": numba.config.CACHE_DIR}))
    """
    out = _child(code, _env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg")))
    assert out["before"] == out["after"]


def test_interpreted_only_mode(tmp_path):
    """QUIVER_ART_JIT=off: the ART works on the interpreted kernels alone, numba
    never imported (so the kernels' logic is testable without a compiler)."""
    code = """
        import json, sys, tempfile
        from quiver.index_backends.art import ArtIndex
        d = tempfile.mkdtemp()
        keys = [b"ns/%04d" % i for i in range(300)]
        ix = ArtIndex(d)
        ix.put_many(keys, [k[::-1] for k in keys])
        for k in keys[::3]:
            ix.delete(k)
        ix.close()
        ix = ArtIndex(d)
        live = [k for i, k in enumerate(keys) if i % 3]
        ok = (ix.get_many(keys) == [None if i % 3 == 0 else k[::-1] for i, k in enumerate(keys)]
              and [k for k, _ in ix.scan_prefix(b"ns/")] == live and ix.longest_prefix(keys[1:3]) == 2)
        census = ix.node_census()
        ix.close()
        print(json.dumps({"ok": ok, "leaves": census["leaves"], "numba": "numba" in sys.modules}))
    """
    out = _child(code, _env(tmp_path, QUIVER_ART_JIT="off"))
    assert out == {"ok": True, "leaves": 200, "numba": False}


# -- the interpreted kernels compute exactly what the compiled ones do -------------------


def _keyset(rng: np.random.Generator, n: int) -> list[bytes]:
    """Keys that exercise every node type and long compressed prefixes: a
    namespace with a long shared stem (prefixes past MAXP), fan-outs of about
    40 (N48) and 256 (N256), short ones (N4/N16), keys that are prefixes of
    others (term leaves), and random keys."""
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(b"model/" + b"s" * 20 + bytes([i % 251]) + rng.bytes(int(rng.integers(0, 8))))
        elif kind == 1:
            out.append(b"t%d/" % (i % 3) + rng.bytes(int(rng.integers(1, 40))))
        elif kind == 2:
            out.append(b"n48/" + bytes([(i // 5) % 40]) + b"y" * int(rng.integers(0, 3)))
        elif kind == 3:
            out.append(bytes([int(rng.integers(0, 256))]) + b"x" * int(rng.integers(0, 30)))
        else:
            out.append(rng.bytes(int(rng.integers(1, 64))))
    return out


def _pack(keys):
    return b"".join(keys), np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))


@pytest.mark.parametrize("seed", [1, 2])
def test_interpreted_and_compiled_kernels_agree(seed):
    kern.warmup()
    st = kern.jit_status()
    if st["failed"] or st["mode"] == "off":
        pytest.skip(f"no compiled kernels: {st}")
    C = {n: kern._jit.ready[n] for n in kern.ENTRIES}
    P = kern._PY
    rng = np.random.default_rng(seed)
    keys = _keyset(rng, 1500)
    a = kern.new_arrays(1 << 17, 1 << 17, 1 << 17)
    b = tuple(x.copy() for x in a)

    def same(tag):
        for x, y in zip(a, b):
            assert np.array_equal(x, y), tag

    def both(name, args_of):
        ra = P[name](*args_of(a))
        rb = C[name](*args_of(b))
        return ra, rb

    seen = np.zeros(6, dtype=np.int64)  # the most of each node type the tree ever had
    for step in range(60):
        op = 2 if step < 3 else rng.integers(0, 6)
        size = 400 if step < 3 else int(rng.integers(1, 60))
        pick = [keys[i] for i in rng.integers(0, len(keys), size=size)]
        if op == 0:
            for k in pick:
                v = rng.bytes(int(rng.integers(0, 20)))
                ra, rb = both("put", lambda t: (t[0], t[1], t[2], k, v))
                assert ra == rb
        elif op == 1:
            for k in pick:
                ra, rb = both("delete", lambda t: (t[0], t[1], k))
                assert ra == rb
        elif op == 2:
            kb, kl = _pack(pick)
            vals = [rng.bytes(8) for _ in pick]
            vb, vl = _pack(vals)
            ra, rb = both("put_many", lambda t: (t[0], t[1], t[2], kb, kl, vb, vl, 0, 0, 0))
            assert ra == rb == 4 * len(pick)
        elif op == 3:
            kb, kl = _pack(pick)
            ra, rb = both("get_many", lambda t: (t[0], t[1], t[2], kb, kl))
            for x, y in zip(ra, rb):
                assert np.array_equal(x, y)
            for k in pick[:5]:
                ra, rb = both("get", lambda t: (t[0], t[1], k))
                assert ra == rb
            ra, rb = both("longest_prefix", lambda t: (t[0], t[1], kb, kl))
            assert ra == rb
            cl = np.array([len(pick) // 2, len(pick) - len(pick) // 2], dtype=np.int64)
            ra, rb = both("longest_prefix_many", lambda t: (t[0], t[1], kb, kl, cl))
            assert np.array_equal(ra, rb)
        elif op == 4:
            prefix = pick[0][: int(rng.integers(0, 4))]
            out_a, out_b = np.zeros(4096, dtype=np.int64), np.zeros(4096, dtype=np.int64)
            na = P["scan_leaves"](a[0], a[1], prefix, out_a)
            nb = C["scan_leaves"](b[0], b[1], prefix, out_b)
            assert na == nb and np.array_equal(out_a, out_b)
            ga = P["gather_pairs"](a[0], a[1], a[2], out_a, min(na, 4096))
            gb = C["gather_pairs"](b[0], b[1], b[2], out_b, min(nb, 4096))
            for x, y in zip(ga, gb):
                assert np.array_equal(x, y)
            assert np.array_equal(P["node_census"](a[0]), C["node_census"](b[0]))
        else:
            na, nb = np.zeros_like(a[0]), np.zeros_like(b[0])
            assert P["defrag"](a[0], na) == C["defrag"](b[0], nb)
            a, b = (na, a[1], a[2]), (nb, b[1], b[2])
            count = int(a[0][kern.M_COUNT])
            la, lb = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
            P["scan_leaves"](a[0], a[1], b"", la)
            C["scan_leaves"](b[0], b[1], b"", lb)
            ka, va = np.zeros_like(a[1]), np.zeros_like(a[2])
            kb_, vb_ = np.zeros_like(b[1]), np.zeros_like(b[2])
            P["compact_arenas"](a[0], a[1], a[2], la, count, ka, va)
            C["compact_arenas"](b[0], b[1], b[2], lb, count, kb_, vb_)
            a, b = (a[0], ka, va), (b[0], kb_, vb_)
        same(f"step {step} op {op}")
        seen = np.maximum(seen, P["node_census"](a[0]))
    assert seen[1:5].min() > 0, f"not every node type was built: {seen}"


def test_no_kernel_calls_an_entry_point():
    """Entry points are rebound to compiled dispatchers one by one; a kernel that
    called one by name would mix the two worlds."""
    for name, (fn, _inline) in kern._KERNELS.items():
        assert not set(fn.__code__.co_names) & set(kern.ENTRIES), name
