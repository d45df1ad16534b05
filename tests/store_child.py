"""Child program for the BlockStore cross-process tests (tests/test_store*.py).

    python tests/store_child.py put   PATH L2SPEC SEED N   -> puts N blocks, prints JSON, exits
    python tests/store_child.py get   PATH L2SPEC SEED N   -> lookup + get, compares, prints JSON
    python tests/store_child.py race  PATH L2SPEC SEED N -> opens, prints "ready", waits for a line on stdin, puts
    python tests/store_child.py hold  PATH                 -> opens the store, prints "ready", waits for stdin EOF

L2SPEC is a directory, "s3://bucket/prefix" (AWS settings from the environment:
the standard chain, as an engine would use it) or "-" for none.  The data is a
pure function of SEED (``make_case``), so parent and child agree on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from quiver.engine.identity import CacheIdentity  # noqa: E402
from quiver.engine.store import BlockStore  # noqa: E402


def make_ident(tenant: str = "acme", **kw) -> CacheIdentity:
    fields = dict(model="org/model-7b", model_revision="r1", tokenizer="tok", tokenizer_revision="t1",
                  tenant=tenant, kv_dtype="float16", block_tokens=16, num_layers=2, num_kv_heads=2, head_dim=16)
    fields.update(kw)
    return CacheIdentity(**fields)


def make_case(seed: int, n: int, ident: CacheIdentity | None = None):
    """(identity, token ids, blocks [n, *block_shape]) determined by ``seed``."""
    ident = ident or make_ident()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50_000, size=n * ident.block_tokens + 5).tolist()
    blocks = rng.standard_normal((n, *ident.block_shape)).astype(np.float16)
    return ident, tokens, blocks


def race(paths: list[str], spec: str, seed: int, n: int, env: dict | None = None, timeout: float = 120) -> list[dict]:
    """Run one ``race`` child per path and release them together (parent side).

    The barrier is a pipe, not a clock: each child opens its store and says
    "ready"; once every child has, each is sent "go".  Returns their JSON results."""
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "race", p, spec, str(seed), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for p in paths]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                p.kill()
                raise AssertionError(f"race child did not open: {line!r} {p.communicate()[1][-2000:]}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise AssertionError(err[-2000:])
            outs.append(json.loads(out.strip().splitlines()[-1]))
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _open(path: str, spec: str) -> BlockStore:
    return BlockStore.open(path, object_store=None if spec == "-" else spec, ram_bytes=1 << 20)


def main(argv: list[str]) -> int:
    op, path = argv[0], argv[1]
    if op == "hold":
        with BlockStore.open(path, ram_bytes=0):
            print("ready", flush=True)
            sys.stdin.read()
        return 0
    spec, seed, n = argv[2], int(argv[3]), int(argv[4])
    ident, tokens, blocks = make_case(seed, n)
    if op == "race":  # a pipe barrier: the parent releases every child once all have opened
        with _open(path, spec) as store:
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("race: the parent closed the barrier without 'go'")
            store.put(ident, tokens, blocks)
            st = store.stats()
        print(json.dumps({"published": st["counters"]["l2_published"], "existing": st["counters"]["l2_existing"]}), flush=True)
        return 0
    with _open(path, spec) as store:
        if op == "put":
            written = store.put(ident, tokens, blocks)
            print(json.dumps({"written": written}), flush=True)
        elif op == "get":
            found = store.lookup(ident, tokens)
            got = store.get(ident, tokens, found)
            st = store.stats()
            equal = found == n and got.tobytes() == blocks.tobytes()
            print(json.dumps({"lookup": found, "equal": equal, "l2_hits": st["counters"]["l2_hits"],
                              "bootstrap_keys": st["gauges"]["bootstrap_keys"], "l2_heads": st["counters"]["l2_heads"]}), flush=True)
        else:
            raise SystemExit(f"unknown op {op!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
