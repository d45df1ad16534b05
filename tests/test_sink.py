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
from store_child import make_case, make_ident  # noqa: E402


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
    (READ_CHUNK_BYTES; three blocks here, so 11 blocks take four chunks).  A
    block whose L1 copy was damaged at rest is never handed over from the
    chunk: its L2 copy is (l2), or the get stops there with the blocks before
    it delivered (no L2)."""
    import quiver.engine.store as store_mod
    from quiver.engine.errors import EnvelopeError
    from test_store import _flip_l1_object

    ident, tokens, blocks = make_case(25, 11)
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 3 * ident.block_nbytes)
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
            assert st._chunks and all(buf.nbytes == 3 * ident.block_nbytes for buf in st._chunks)  # chunks of 3
        else:
            with pytest.raises(EnvelopeError) as err:
                st.get(ident, tokens, 11, out=sink)
            assert err.value.block_index == 7
            T = ident.block_tokens
            for (k, v), (wk, wv) in zip(sink.pairs, want):
                assert torch.equal(k[:, :, :7 * T], wk[:, :, :7 * T]) and torch.equal(v[:, :, :7 * T], wv[:, :, :7 * T])
                assert not k[:, :, 7 * T:8 * T].eq(wk[:, :, 7 * T:8 * T]).all()  # the damaged block: not delivered


def _two_thread_store(tmp_path, monkeypatch, n: int):
    """A store holding ``n`` blocks in L1 only, chunks of two blocks, and a spy on
    L1's batch read whose first call on the get's own thread waits until the
    read helper's first call has begun: both threads then read chunks of the
    get (an ordering by events, not by timing)."""
    import threading

    import quiver.engine.store as store_mod

    ident, tokens, blocks = make_case(27, n)
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 2 * ident.block_nbytes)
    st = BlockStore.open(tmp_path / "s", index="flat", ram_bytes=0)
    st.put(ident, tokens, blocks)
    real, caller = st._disk.get_many_into, threading.get_ident()
    helper_began = threading.Event()
    calls: list[int] = []

    def spy(keys, buffers_fors):
        calls.append(threading.get_ident())
        if threading.get_ident() == caller:
            assert helper_began.wait(60), "the read helper never took a chunk"
        else:
            helper_began.set()
        return real(keys, buffers_fors)
    st._disk.get_many_into = spy
    return st, ident, tokens, blocks, calls


def test_a_sinks_chunks_are_read_on_two_threads_and_taken_one_at_a_time(tmp_path, monkeypatch):
    """The get's thread and the store's read helper each read and check chunks
    of the same get; every chunk is handed to the sink, never two takes at once
    (a sink need not be thread-safe), and the cache holds every block."""
    import threading

    st, ident, tokens, blocks, calls = _two_thread_store(tmp_path, monkeypatch, 10)
    layout = KVLayout.from_identity(ident)

    class Watched(DynamicCacheSink):
        def __init__(self, *a):
            super().__init__(*a)
            self.inside, self.overlaps, self.takers, self.blocks = 0, 0, set(), []

        def take(self, src, offset, rows, blocks):
            self.inside += 1
            self.overlaps += self.inside > 1
            self.takers.add(threading.get_ident())
            self.blocks += list(blocks)
            super().take(src, offset, rows, blocks)
            self.inside -= 1

    with st:
        sink = Watched(layout, host_blocks(10, layout))
        st.get(ident, tokens, 10, out=sink)
        assert _same(sink.pairs, _expected(blocks, layout))
        assert len(set(calls)) == 2 and len(sink.takers) == 2 and sink.overlaps == 0
        assert sorted(sink.blocks) == list(range(10)) and st.stats()["counters"]["l1_hits"] == 10


def test_prepare_reads_makes_the_chunk_buffers_a_sink_get_uses(tmp_path, monkeypatch):
    """After ``prepare_reads`` a sink get read on two threads makes no buffer
    (both threads take prepared ones, touched) and gives them back; blocks
    larger than the prepared buffers get a new one, the bytes right either way."""
    import quiver.engine.store as store_mod

    st, ident, tokens, blocks, calls = _two_thread_store(tmp_path, monkeypatch, 10)
    layout = KVLayout.from_identity(ident)
    made = []
    real_empty = store_mod.empty_huge
    monkeypatch.setattr(store_mod, "empty_huge", lambda shape: made.append(shape) or real_empty(shape))
    with st:
        st.prepare_reads(ident.block_nbytes)
        assert len(made) == 1 + store_mod.READ_HELPERS and len(st._chunks) == len(made)
        prepared = {id(buf) for buf in st._chunks}
        sink = _sink(ident, 10)
        st.get(ident, tokens, 10, out=sink)
        assert _same(sink.pairs, _expected(blocks, layout)) and len(set(calls)) == 2  # both threads read
        assert len(made) == 1 + store_mod.READ_HELPERS  # none made by the get
        assert {id(buf) for buf in st._chunks} == prepared  # and every one given back
        big, big_tokens, big_blocks = make_case(28, 4, make_ident(num_kv_heads=8))  # 4x the block: none fits
        st.put(big, big_tokens, big_blocks)
        big_sink = _sink(big, 4)
        st.get(big, big_tokens, 4, out=big_sink)
        assert len(made) > 1 + store_mod.READ_HELPERS  # one per thread that read a chunk of it
        assert _same(big_sink.pairs, _expected(big_blocks, KVLayout.from_identity(big)))
        assert len(st._chunks) == 1 + store_mod.READ_HELPERS  # the idle ones: one per reading thread
        assert max(buf.nbytes for buf in st._chunks) == big.block_nbytes  # the larger kept
        st.prepare_reads(8 * ident.block_nbytes)  # replaces the smaller idle buffers
        assert [buf.nbytes for buf in st._chunks] == [8 * ident.block_nbytes] * (1 + store_mod.READ_HELPERS)


def test_prepare_reads_refuses_a_bad_size_and_a_closed_store(tmp_path):
    from quiver.engine.errors import StoreClosedError, StoreConfigError

    st = BlockStore.open(tmp_path / "s", index="flat", ram_bytes=0)
    for bad in (0, -1, 1.5, True, "4096", None):
        with pytest.raises(StoreConfigError):
            st.prepare_reads(bad)
    assert st._chunks == []
    st.close()
    with pytest.raises(StoreClosedError):
        st.prepare_reads(4096)


def test_a_get_into_an_array_reads_its_chunks_on_two_threads(tmp_path, monkeypatch):
    """Without a sink the two threads read their chunks straight into the
    caller's rows: every block lands in its own row, verified."""
    st, ident, tokens, blocks, calls = _two_thread_store(tmp_path, monkeypatch, 9)
    with st:
        out = np.zeros_like(blocks)
        assert st.get(ident, tokens, 9, out=out) is out
        assert out.tobytes() == blocks.tobytes() and len(set(calls)) == 2
        assert st.stats()["counters"]["l1_hits"] == 9


def test_a_tier_failure_on_the_read_helper_ends_the_get(tmp_path, monkeypatch):
    """L1 failing as a whole under the helper's read (a closed tier, raised on
    that thread only: a real tier cannot fail on one chosen thread) comes out
    of the get as the store's typed error.  Its ``block_index`` is 0: the
    batch failed as a whole, so no block of it counts as delivered (its first
    chunks may have reached the sink, verified, but a caller may not rely on
    them)."""
    import threading

    from quiver.engine.errors import StoreClosedError
    from quiver.tier.errors import TierClosedError

    st, ident, tokens, blocks, calls = _two_thread_store(tmp_path, monkeypatch, 10)
    checked = st._disk.get_many_into
    caller = threading.get_ident()

    def failing(keys, buffers_fors):
        if threading.get_ident() != caller:
            checked(keys, buffers_fors)  # lets the get's thread go on (the spy's event), then fails
            raise TierClosedError("closed under the get")
        return checked(keys, buffers_fors)
    st._disk.get_many_into = failing
    with st:
        with pytest.raises(StoreClosedError) as err:
            st.get(ident, tokens, 10, out=_sink(ident, 10))
        assert err.value.block_index == 0 and len(set(calls)) == 2


def _paged_kv(kind: str, layout: KVLayout, num_blocks: int) -> list[torch.Tensor]:
    """Paged KV tensors of ``kind`` (vLLM's CPU layout, or the flash one on the host), filled with a marker."""
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_dim
    shape = (num_blocks, H, T, 2 * D) if kind == "cpu" else (2, num_blocks, T, H, D)
    return [torch.full(shape, 7.0, dtype=layout.dtype) for _ in range(layout.num_layers)]


@pytest.mark.parametrize("kind", ["cpu", "flash"])
def test_a_paged_sink_gets_the_bytes_of_every_tier(tmp_path, monkeypatch, kind):
    """Blocks 0-3 in L0, 4-11 only in L1 (chunks of two blocks, on both
    threads), 12-14 only in L2, scattered into a shuffled block table of host
    paged KV: the same bytes as a get into an array and scatter_paged_any, and
    no block outside the table written."""
    import quiver.engine.store as store_mod
    from quiver.engine.torch_io import PagedSink, scatter_paged_any

    ident, tokens, blocks = make_case(29, 15)
    layout = KVLayout.from_identity(ident)
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 2 * ident.block_nbytes)
    table = list(np.random.default_rng(3).permutation(20)[:15])
    want = _paged_kv(kind, layout, 20)
    scatter_paged_any(kind, torch.from_numpy(blocks), want, table, layout)
    l2 = tmp_path / "l2"
    with BlockStore.open(tmp_path / "writer", index="flat", ram_bytes=0, object_store=l2) as st:
        st.put(ident, tokens, blocks)
        assert st.flush_l2(timeout_s=60) == 0
    with BlockStore.open(tmp_path / "reader", index="flat", ram_bytes=1 << 20, object_store=l2) as st:
        st.put(ident, tokens[:12 * ident.block_tokens], blocks[:12])
        for k in [ident.namespace + k for k in chain_keys(ident, tokens, 12)][4:]:
            st._ram.delete(k)  # 4-11: L1 only
        kv = _paged_kv(kind, layout, 20)
        sink = PagedSink(kind, kv, table, layout, host_blocks(15, layout))
        assert st.get(ident, tokens, 15, out=sink) is sink
        c = st.stats()["counters"]
        assert (c["l0_hits"], c["l1_hits"], c["l2_hits"]) == (4, 8, 3)
        assert all(torch.equal(a, b) for a, b in zip(kv, want))


def test_a_paged_sink_refuses_a_bad_table_or_layout_before_the_get():
    """A block table naming a block twice or past the cache, or KV tensors of
    another layout: refused when the sink is made, not half-way through a get."""
    from quiver.engine.errors import BlockTableError
    from quiver.engine.torch_io import PagedSink, UnsupportedKVLayoutError

    ident, _tokens, _blocks = make_case(30, 2)
    layout = KVLayout.from_identity(ident)
    kv = _paged_kv("cpu", layout, 4)
    with pytest.raises(BlockTableError):
        PagedSink("cpu", kv, [1, 1], layout, host_blocks(2, layout))
    with pytest.raises(BlockTableError):
        PagedSink("cpu", kv, [0, 4], layout, host_blocks(2, layout))
    with pytest.raises(UnsupportedKVLayoutError):
        PagedSink("cpu", _paged_kv("flash", layout, 4), [0, 1], layout, host_blocks(2, layout))
    with pytest.raises(UnsupportedKVLayoutError):
        PagedSink("tiles", kv, [0, 1], layout, host_blocks(2, layout))


def test_a_paged_sink_after_every_l0_slot_was_refused(tmp_path):
    """Every L0 hit's header damaged: the L0 batch hands the sink nothing,
    each block comes from L1 through the per-block path's staging rows, and
    vLLM's CPU-layout blocks hold the right bytes."""
    from quiver.engine.torch_io import PagedSink, scatter_paged_any

    ident, tokens, blocks = make_case(31, 3)
    layout = KVLayout.from_identity(ident)
    keys = [ident.namespace + k for k in chain_keys(ident, tokens, 3)]
    want = _paged_kv("cpu", layout, 6)
    scatter_paged_any("cpu", torch.from_numpy(blocks), want, [5, 0, 3], layout)
    with BlockStore.open(tmp_path / "s", index="flat", ram_bytes=1 << 20) as st:
        st.put(ident, tokens, blocks)
        for k in keys:
            slot, _ = st._ram._where[k]
            st._ram.arena[slot * st._ram.slot_bytes + 40] ^= 0x01  # inside the header's key field
        kv = _paged_kv("cpu", layout, 6)
        st.get(ident, tokens, 3, out=PagedSink("cpu", kv, [5, 0, 3], layout, host_blocks(3, layout)))
        assert all(torch.equal(a, b) for a, b in zip(kv, want))
        c = st.stats()["counters"]
        assert c["corrupt_l0"] == 3 and c["l0_hits"] == 0 and c["l1_hits"] == 3
