"""Study: the cost of keying a prompt (engine.keys.chain_keys).

Every lookup and put starts by turning the prompt into chain keys, so this is
a floor under the latency of every cache hit.  One BLAKE3 call per block is the
whole cost; the study reports ns/block for a short (8k-token) and a long
(128k-token) prompt, given as a Python list (what engines usually hold) and as
a numpy array, unkeyed and in keyed (tenant-secret) mode.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from quiver.engine.identity import CacheIdentity
from quiver.engine.keys import chain_keys
from .config import pick

BLOCK_TOKENS = 16
PROMPT_TOKENS = pick(smoke=[256], quick=[8192, 131072], full=[8192, 131072])


def _identity(keyed: bool) -> CacheIdentity:
    return CacheIdentity(
        model="meta-llama/Llama-3.1-8B", model_revision="0e9e39f",
        tokenizer="llama3", tokenizer_revision="0e9e39f",
        adapter=None, tenant="acme", kv_dtype="float16",
        block_tokens=BLOCK_TOKENS, num_layers=32, num_kv_heads=8, head_dim=128,
        tenant_secret=b"bench-secret-0123456789abcdef" if keyed else None,
    )


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("kind", ["list", "numpy"])
@pytest.mark.parametrize("tokens", PROMPT_TOKENS)
def test_chain_keys(benchmark, tokens, kind, keyed):
    benchmark.group = "keys"
    ident = _identity(keyed)
    rng = np.random.default_rng(tokens)
    arr = rng.integers(0, 128_256, size=tokens, dtype=np.int64)  # Llama-3 vocabulary
    prompt = arr.tolist() if kind == "list" else arr
    blocks = tokens // BLOCK_TOKENS

    keys = benchmark(chain_keys, ident, prompt)
    assert len(keys) == blocks and len(set(keys)) == blocks

    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
    else:  # --benchmark-disable (smoke): time one call so the number is still real
        t0 = time.perf_counter()
        chain_keys(ident, prompt)
        seconds = time.perf_counter() - t0
    benchmark.extra_info.update(
        tokens=tokens,
        blocks=blocks,
        block_tokens=BLOCK_TOKENS,
        input=kind,
        keyed=keyed,
        ns_per_block=round(seconds * 1e9 / blocks, 1),
        ms_per_prompt=round(seconds * 1e3, 3),
    )
