"""A get into a BlockSink (engine/sink.py): a transformers DynamicCache filled straight
from L0's slots, and through the staging array from L1 and L2, with the same checks
and the same bytes as a get into an array followed by scatter_dynamic."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from quiver.engine.errors import BlockNotFoundError, ShapeMismatchError
from quiver.engine.keys import chain_keys
from quiver.engine.store import BlockStore
from quiver.engine.torch_io import DynamicCacheSink, KVLayout, host_blocks, scatter_dynamic_tensors

sys.path.insert(0, os.path.dirname(__file__))
from store_child import make_case  # noqa: E402


def _expected(blocks: np.ndarray, layout: KVLayout):
    return scatter_dynamic_tensors(torch.from_numpy(blocks), layout)[0]


def _same(pairs, want) -> bool:
    return all(torch.equal(k, wk) and torch.equal(v, wv) for (k, v), (wk, wv) in zip(pairs, want))


def _sink(ident, n: int) -> DynamicCacheSink:
    layout = KVLayout.from_identity(ident)
    return DynamicCacheSink(layout, host_blocks(n, layout))


@pytest.mark.parametrize("copy_jit", ["on", "off"])  # off: the torch copies, no compiled kernel
def test_a_sink_gets_the_bytes_of_every_tier(tmp_path, monkeypatch, copy_jit):
    """Blocks 0-3 in L0, 4-7 only in L1, 8-11 only in L2: one get hands L0's
    straight from their slots and the rest through the staging array; the
    cache equals scatter_dynamic of a plain get."""
    if copy_jit == "off":
        monkeypatch.setenv("QUIVER_COPY_JIT", "off")
    ident, tokens, blocks = make_case(21, 12)
    layout = KVLayout.from_identity(ident)
    l2 = tmp_path / "l2"
    with BlockStore.open(tmp_path / "writer", index="flat", ram_bytes=0, object_store=l2) as st:
        st.put(ident, tokens, blocks)
        assert st.flush_l2(timeout_s=60) == 0
    with BlockStore.open(tmp_path / "reader", index="flat", ram_bytes=1 << 20, object_store=l2) as st:
        st.put(ident, tokens[:8 * ident.block_tokens], blocks[:8])  # blocks 0-7 in L1 and L0
        keys = [ident.namespace + k for k in chain_keys(ident, tokens, 8)]
        for k in keys[4:]:
            st._ram.delete(k)  # 4-7: L1 only
        sink = _sink(ident, 12)
        assert st.get(ident, tokens, 12, out=sink) is sink
        assert _same(sink.pairs, _expected(blocks, layout))
        c = st.stats()["counters"]
        assert (c["l0_hits"], c["l1_hits"], c["l2_hits"]) == (4, 4, 4)
        cache = sink.cache()
        assert len(cache.layers) == ident.num_layers and cache.get_seq_length() == 12 * ident.block_tokens


def test_a_damaged_l0_slot_is_not_handed_to_the_sink(tmp_path):
    """The sink sees only checked bytes: a slot whose header was damaged is
    refused and the block is read from L1 into the staging array instead."""
    ident, tokens, blocks = make_case(22, 4)
    keys = [ident.namespace + k for k in chain_keys(ident, tokens, 4)]
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=1 << 20) as st:
        st.put(ident, tokens, blocks)
        slot, _ = st._ram._where[keys[2]]
        st._ram.arena[slot * st._ram.slot_bytes + 40] ^= 0x01  # inside the header's key field
        sink = _sink(ident, 4)
        st.get(ident, tokens, 4, out=sink)
        assert _same(sink.pairs, _expected(blocks, KVLayout.from_identity(ident)))
        c = st.stats()["counters"]
        assert c["corrupt_l0"] == 1 and c["l0_hits"] == 3 and c["l1_hits"] == 1


def test_a_missing_block_leaves_the_ones_before_it_delivered(tmp_path):
    """block_index says where the get stopped; the blocks before it are in the
    cache (L0 hits and staged ones alike), as with a get into an array."""
    ident, tokens, blocks = make_case(23, 6)
    keys = [ident.namespace + k for k in chain_keys(ident, tokens, 6)]
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=1 << 20) as st:
        st.put(ident, tokens, blocks)
        for k in keys[2:4]:
            st._ram.delete(k)  # 2, 3: from L1
        st._disk.delete(keys[4])
        st._ram.delete(keys[4])  # 4: nowhere
        sink = _sink(ident, 6)
        with pytest.raises(BlockNotFoundError) as err:
            st.get(ident, tokens, 6, out=sink)
        assert err.value.block_index == 4
        T = ident.block_tokens
        want = _expected(blocks, KVLayout.from_identity(ident))
        for (k, v), (wk, wv) in zip(sink.pairs, want):
            assert torch.equal(k[:, :, :4 * T], wk[:, :, :4 * T]) and torch.equal(v[:, :, :4 * T], wv[:, :, :4 * T])


def test_a_sink_of_another_size_or_a_staging_list_is_refused(tmp_path):
    ident, tokens, blocks = make_case(24, 3)

    class ListStaging(DynamicCacheSink):
        def staging(self, n):
            return [self._staging[i] for i in range(n)]

    layout = KVLayout.from_identity(ident)
    with BlockStore.open(tmp_path / "s", index="flat") as st:
        st.put(ident, tokens, blocks)
        with pytest.raises(ShapeMismatchError):
            st.get(ident, tokens, 3, out=_sink(ident, 2))
        with pytest.raises(ShapeMismatchError):
            st.get(ident, tokens, 3, out=ListStaging(layout, host_blocks(3, layout)))


@pytest.mark.parametrize("l2", [False, True])
def test_chunked_reads_hand_over_only_checked_blocks(tmp_path, monkeypatch, l2):
    """With a sink, L1 batches go through a small buffer a chunk at a time
    (SINK_CHUNK_BYTES; three blocks here, so 11 blocks take four chunks).  A
    block whose L1 copy was damaged at rest is never handed over from the
    chunk: its L2 copy is (l2), or the get stops there with the blocks before
    it delivered (no L2)."""
    import quiver.engine.store as store_mod
    from quiver.engine.errors import EnvelopeError
    from test_store import _flip_l1_object

    ident, tokens, blocks = make_case(25, 11)
    monkeypatch.setattr(store_mod, "SINK_CHUNK_BYTES", 3 * ident.block_nbytes)
    skeys = [ident.namespace + k for k in chain_keys(ident, tokens, 11)]
    want = _expected(blocks, KVLayout.from_identity(ident))
    path = tmp_path / "s"
    with BlockStore.open(path, index="flat", ram_bytes=0, object_store=tmp_path / "l2" if l2 else None) as st:
        st.put(ident, tokens, blocks)
        assert l2 is False or st.flush_l2(timeout_s=60) == 0
        _flip_l1_object(path, skeys[7])  # inside the third chunk
        sink = _sink(ident, 11)
        if l2:
            st.get(ident, tokens, 11, out=sink)
            assert _same(sink.pairs, want)
            c = st.stats()["counters"]
            assert (c["l1_hits"], c["corrupt_l1"], c["l2_hits"]) == (10, 1, 1)
            assert len(st._sink_chunks.rows) == 3
        else:
            with pytest.raises(EnvelopeError) as err:
                st.get(ident, tokens, 11, out=sink)
            assert err.value.block_index == 7
            T = ident.block_tokens
            for (k, v), (wk, wv) in zip(sink.pairs, want):
                assert torch.equal(k[:, :, :7 * T], wk[:, :, :7 * T]) and torch.equal(v[:, :, :7 * T], wv[:, :, :7 * T])
                assert not k[:, :, 7 * T:8 * T].eq(wk[:, :, 7 * T:8 * T]).all()  # the damaged block: not delivered
