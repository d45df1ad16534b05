"""Finding 9 (issue 13): per-key memory is freed when a key leaves every tier.

The store used to give every key it ever saw a residency-bitmap id (~210 bytes
in ``tier/residency.py``'s KeyIds, never freed), so a long-lived server grew
without bound.  L1 membership is now the residency index alone, L0's the RAM
tier's slot map: with fixed budgets, Python memory stays flat however many
distinct keys pass through.  tracemalloc counts allocations, so the check does
not depend on timing or on the allocator's page reuse.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from quiver.engine import BlockStore, CacheIdentity

IDENT = CacheIdentity(model="m", model_revision="r", tokenizer="t", tokenizer_revision="r", adapter=None,
                      tenant="a", kv_dtype="float16", block_tokens=16, num_layers=1, num_kv_heads=1, head_dim=8)
BLOCK = np.zeros((1, 1, 2, 16, 1, 8), np.float16)


def _put_distinct(store: BlockStore, start: int, n: int) -> None:
    for i in range(start, start + n):
        store.put(IDENT, [i] * 16, BLOCK)  # one distinct one-block prompt each


def test_memory_stays_flat_over_distinct_keys_with_fixed_budgets(tmp_path):
    with BlockStore.open(str(tmp_path / "s"), index="flat", ram_bytes=64 * 1024, disk_bytes=64 * 1024) as store:
        _put_distinct(store, 0, 600)             # budgets full: every further put evicts
        tracemalloc.start()
        try:
            _put_distinct(store, 600, 200)
            before = tracemalloc.take_snapshot()
            _put_distinct(store, 800, 1500)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        # 1,500 more distinct keys: ~315 KB at the old 210 B per key; flat now.
        assert grown < 1500 * 20, f"{grown} bytes grew over 1,500 distinct keys"
        assert len(store._disk) * 512 <= 64 * 1024
