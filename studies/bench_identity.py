"""Identity safety: what a key without identity serves, and what the guard costs.

Everything goes through the real BlockStore (RAM arena, walpub disk tier), with
real bytes.

1. Collision workload (``test_collision_*``): 20 identities -- 4 tenants x
   {no adapter, a LoRA adapter} x 2 model revisions, plus 4 with a new
   tokenizer revision -- all asking for the *same* token blocks, in two passes
   (each identity asks for each prompt, then asks again).  Each identity's
   payload carries a marker (its index, the prompt and the block) so every
   served block's true origin is checked.  Three stores:

   - ``naive``: key = hash of the tokens alone, no guard (UNSAFE, study only);
   - ``naive+guard``: the same keys, with the identity guard on;
   - ``guarded``: Quiver's store (identity in the key and the guard).

   ``extra_info``: blocks requested/served, ``cross_identity_blocks`` and
   ``cross_identity_bytes`` (served blocks whose origin is another identity),
   ``hit_ratio`` (served / requested), ``true_hit_ratio`` (served and right /
   requested), ``guard_refusals``.

2. Cost of the guard (``test_guard_overhead``): lookup + get latency with and
   without the guard on a realistic, mostly-one-identity workload (90 % of
   requests from one identity, the rest from 15 others; Llama-3.2-1B-shaped
   blocks, 16 layers x 8 KV heads x 64 head dim x 16 tokens, float16 = 512 KiB
   per block, 8 blocks per request, warm in RAM).  The two stores hold the same
   blocks and are timed request-by-request interleaved, so drift hits both.
   ``extra_info``: p50/p99 per request for each, ``overhead_pct`` (p50 and
   mean), ``guard_check_us`` (the guard's own per-block cost: a byte compare
   of the header fields) and ``guard_full_parse_us`` (what a header parse +
   field compare would cost instead).  Goal: <= 1 %.
"""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import pytest

from quiver.engine.envelope import decode_header
from quiver.engine.errors import IdentityMismatchError
from quiver.engine.guard import check_header, expected_for, guard_envelope
from quiver.engine.identity import CacheIdentity
from quiver.engine.keys import chain_keys, root_key
from quiver.engine.store import BlockStore, envelope_bound
from .config import pick
from .workloads import latency_summary

MiB = 1 << 20

# --- 1. collision workload ---------------------------------------------------------------

SMALL_SHAPE = dict(block_tokens=16, num_layers=2, num_kv_heads=2, head_dim=32)  # 8 KiB blocks
PROMPTS = pick(smoke=2, quick=12, full=48)
BLOCKS_PER_PROMPT = pick(smoke=2, quick=4, full=8)
PASSES = 2


def collision_identities() -> list[CacheIdentity]:
    """>= 16 identities that differ only in what makes KV bytes incompatible."""
    base = CacheIdentity(model="meta-llama/Llama-3.2-1B", model_revision="rev-a", tokenizer="llama3",
                         tokenizer_revision="tok-1", tenant="t0", kv_dtype="float16", **SMALL_SHAPE)
    out = []
    for tenant in ("t0", "t1", "t2", "t3"):
        for adapter in (None, "lora-support"):
            for rev in ("rev-a", "rev-b"):
                out.append(dataclasses.replace(base, tenant=tenant, adapter=adapter,
                                               adapter_revision=None if adapter is None else "1",
                                               model_revision=rev))
    for tenant in ("t0", "t1", "t2", "t3"):
        out.append(dataclasses.replace(base, tenant=tenant, tokenizer_revision="tok-2"))
    assert len(set(out)) == len(out) >= 16
    return out


def _marked_blocks(ident: CacheIdentity, who: int, prompt: int, n: int) -> np.ndarray:
    blocks = np.random.default_rng([who, prompt]).standard_normal((n, *ident.block_shape)).astype(np.float16)
    flat = blocks.reshape(n, -1)
    flat[:, 0], flat[:, 1], flat[:, 2] = who, prompt, np.arange(n)  # small ints: exact in float16
    return blocks


def _origin(block: np.ndarray) -> tuple[int, int, int]:
    flat = block.reshape(-1)
    return int(flat[0]), int(flat[1]), int(flat[2])


def _collision_run(root, mode: str) -> dict:
    opts = {"naive": dict(naive=True), "naive+guard": dict(naive=True, guard=True), "guarded": {}}[mode]
    idents = collision_identities()
    rng = random.Random(7)
    prompts = [[rng.randrange(128_000) for _ in range(BLOCKS_PER_PROMPT * 16)] for _ in range(PROMPTS)]
    block_bytes = idents[0].block_nbytes
    n = dict(requested=0, served=0, cross_blocks=0, right_blocks=0, refusals=0, puts=0)
    ram = (len(idents) * PROMPTS * BLOCKS_PER_PROMPT + 8) * envelope_bound(idents[0], "none")
    t0 = time.perf_counter()
    with BlockStore.open(root / mode.replace("+", "_"), index="flat", ram_bytes=ram, **opts) as store:
        for _ in range(PASSES):
            order = [(w, p) for p in range(PROMPTS) for w in range(len(idents))]
            rng.shuffle(order)
            for who, p in order:
                ident, tokens = idents[who], prompts[p]
                n["requested"] += BLOCKS_PER_PROMPT
                hits = store.lookup(ident, tokens)
                served = None
                if hits:
                    try:
                        served = store.get(ident, tokens, hits)
                    except IdentityMismatchError:
                        n["refusals"] += 1  # the engine recomputes, as on a miss
                if served is not None:
                    n["served"] += len(served)
                    for i, block in enumerate(served):
                        if _origin(block) == (who, p, i):
                            n["right_blocks"] += 1
                        else:
                            assert _origin(block)[0] != who
                            n["cross_blocks"] += 1
                if served is None or len(served) < BLOCKS_PER_PROMPT:
                    n["puts"] += store.put(ident, tokens, _marked_blocks(ident, who, p, BLOCKS_PER_PROMPT))
        st = store.stats()
    elapsed = time.perf_counter() - t0
    assert st["counters"]["identity_mismatches"] == n["refusals"]
    return dict(
        mode=mode, identities=len(idents), prompts=PROMPTS, blocks_per_prompt=BLOCKS_PER_PROMPT, passes=PASSES,
        block_bytes=block_bytes, blocks_requested=n["requested"], blocks_served=n["served"],
        cross_identity_blocks=n["cross_blocks"], cross_identity_bytes=n["cross_blocks"] * block_bytes,
        right_blocks=n["right_blocks"], guard_refusals=n["refusals"], blocks_written=n["puts"],
        hit_ratio=n["served"] / n["requested"], true_hit_ratio=n["right_blocks"] / n["requested"],
        elapsed_s=elapsed,
    )


@pytest.mark.parametrize("mode", ["naive", "naive+guard", "guarded"])
def test_collision(benchmark, bench_dir, mode):
    benchmark.group = "identity"
    results = []
    benchmark.pedantic(lambda: results.append(_collision_run(bench_dir / f"r{len(results)}", mode)),
                       rounds=1, iterations=1)
    r = results[-1]
    benchmark.extra_info.update(r)
    if mode == "naive":
        assert r["cross_identity_bytes"] > 0  # the unsafe mode does serve other identities' bytes
    else:
        assert r["cross_identity_bytes"] == 0 and r["cross_identity_blocks"] == 0
    if mode == "guarded":  # every identity finds its own blocks on the second pass
        assert r["true_hit_ratio"] == pytest.approx((PASSES - 1) / PASSES)
    if mode == "naive+guard":
        assert r["guard_refusals"] > 0


# --- 2. cost of the guard -----------------------------------------------------------------

REAL_SHAPE = pick(smoke=dict(block_tokens=16, num_layers=2, num_kv_heads=2, head_dim=32),
                  quick=dict(block_tokens=16, num_layers=16, num_kv_heads=8, head_dim=64),
                  full=dict(block_tokens=16, num_layers=16, num_kv_heads=8, head_dim=64))
REQ_BLOCKS = 8
HOT_PROMPTS = pick(smoke=2, quick=4, full=8)
COLD_IDENTITIES = 15
REQUESTS = pick(smoke=20, quick=600, full=2000)
HOT_SHARE = 0.9


def _overhead_setup(root):
    base = CacheIdentity(model="meta-llama/Llama-3.2-1B", model_revision="4e20de3", tokenizer="llama3",
                         tokenizer_revision="4e20de3", tenant="main", kv_dtype="float16", **REAL_SHAPE)
    others = [dataclasses.replace(base, tenant=f"tenant-{i}") for i in range(COLD_IDENTITIES)]
    rng = random.Random(11)
    tok = lambda: [rng.randrange(128_000) for _ in range(REQ_BLOCKS * 16 + 7)]  # noqa: E731
    work = [(base, tok()) for _ in range(HOT_PROMPTS)] + [(o, tok()) for o in others]
    n_blocks = len(work) * REQ_BLOCKS
    ram = (n_blocks + 4) * envelope_bound(base, "none")
    stores = {g: BlockStore.open(root / f"g{int(g)}", index="flat", ram_bytes=ram, guard=g) for g in (True, False)}
    for i, (ident, tokens) in enumerate(work):
        blocks = np.random.default_rng(i).standard_normal((REQ_BLOCKS, *base.block_shape)).astype(np.float16)
        for s in stores.values():
            s.put(ident, tokens, blocks)
    plan = [rng.randrange(HOT_PROMPTS) if rng.random() < HOT_SHARE else rng.randrange(HOT_PROMPTS, len(work))
            for _ in range(REQUESTS)]
    return base, work, stores, plan


def test_guard_overhead(benchmark, bench_dir):
    benchmark.group = "identity"
    base, work, stores, plan = _overhead_setup(bench_dir)
    try:
        out = np.empty((REQ_BLOCKS, *base.block_shape), np.float16)  # the engine's reused host buffer

        def request(store, j):
            ident, tokens = work[j]
            n = store.lookup(ident, tokens)
            store.get(ident, tokens, n, out=out[:n])

        for s in stores.values():  # warm: every block in RAM, buffers touched
            for j in range(len(work)):
                request(s, j)
        lat = {True: [], False: []}
        pc = time.perf_counter_ns
        for j in plan:
            for g in ((True, False) if j % 2 else (False, True)):  # alternate which goes first
                t0 = pc()
                request(stores[g], j)
                lat[g].append(pc() - t0)
        benchmark.pedantic(lambda: [request(stores[True], j) for j in plan[:50]], rounds=1, iterations=1)

        # the guard's own cost per block: the byte compare it does, and the full
        # header parse + field compare it falls back to on a mismatch
        keys = chain_keys(base, work[0][1], REQ_BLOCKS)
        env = stores[True]._disk.get(base.namespace + keys[0])
        want = expected_for(base, keys[0], root_key(base))
        reps = pick(smoke=200, quick=20_000, full=100_000)
        t0 = pc()
        for _ in range(reps):
            guard_envelope(env, want)
        guard_us = (pc() - t0) / reps / 1e3
        t0 = pc()
        for _ in range(reps):
            check_header(decode_header(env), want)
        parse_us = (pc() - t0) / reps / 1e3
        on, off = latency_summary(lat[True]), latency_summary(lat[False])
        st_on = stores[True].stats()
        assert st_on["counters"]["l0_hits"] >= len(plan) * REQ_BLOCKS and st_on["counters"]["identity_mismatches"] == 0
        assert stores[False].stats()["config"]["guard"] is False
    finally:
        for s in stores.values():
            s.close()
    benchmark.extra_info.update(
        block_shape=list(base.block_shape), block_bytes=base.block_nbytes, blocks_per_request=REQ_BLOCKS,
        requests=len(plan), hot_share=HOT_SHARE, identities=1 + COLD_IDENTITIES,
        guard_on=on, guard_off=off,
        overhead_pct_p50=(on["p50_us"] - off["p50_us"]) / off["p50_us"] * 100,
        overhead_pct_mean=(on["mean_us"] - off["mean_us"]) / off["mean_us"] * 100,
        guard_check_us=guard_us, guard_full_parse_us=parse_us,
        guard_check_pct_of_block=guard_us / (off["p50_us"] / REQ_BLOCKS) * 100,
    )
