"""Torch copy-in/out: paged (vLLM-style) and DynamicCache layouts, copy counts, typed mismatches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from quiver.engine.envelope import decode_block_into, encode_block
from quiver.engine.errors import DTypeMismatchError, QuiverError, ShapeMismatchError
from quiver.engine.torch_io import (
    BlockTableError,
    KVLayout,
    block_view,
    cache_tensors,
    gather_dynamic,
    gather_paged,
    host_blocks,
    scatter_dynamic,
    scatter_paged,
)

L, T, H, D = 3, 4, 2, 8
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _layout(dtype=torch.float16) -> KVLayout:
    return KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=D, dtype=dtype)


def _paged(num_blocks: int, dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_blocks, T, H, D, generator=g).to(dtype) for _ in range(L)]


def _reference(kv, ids) -> torch.Tensor:
    """The payload by definition: block b, layer l = kv[l][:, ids[b]]."""
    return torch.stack([torch.stack([kv[layer][:, i] for layer in range(L)]) for i in ids])


def _large_allocations(fn, threshold: int) -> list[int]:
    """CPU allocations of at least ``threshold`` bytes made while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= threshold]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_paged_into_frombuffer_slot_is_one_copy(dtype):
    layout = _layout(dtype)
    kv = _paged(10, dtype)
    ids = [7, 2, 9, 0]
    slot = bytearray(len(ids) * layout.block_nbytes + 64)  # an arena slot with room for a header
    out = block_view(slot, layout, n=len(ids), offset=64)
    ptr = out.data_ptr()
    rep = gather_paged(kv, ids, out, layout)
    assert torch.equal(out, _reference(kv, ids))
    assert out.data_ptr() == ptr  # written in place: the buffer is the destination
    assert bytes(slot[64:64 + 16]) == out[0].reshape(-1).view(torch.uint8)[:16].numpy().tobytes()
    assert (rep.host_passes, rep.transfers, rep.device_passes) == (1, 0, 0)
    assert rep.copy_ops == 2 * L and rep.payload_bytes == len(ids) * layout.block_nbytes
    rep.wait()  # no event on CPU


def test_gather_and_scatter_allocate_no_temporaries():
    """The copy count is real: no payload-sized temporary exists on the way."""
    layout = KVLayout(num_layers=4, block_tokens=16, num_kv_heads=4, head_dim=64, dtype=torch.float16)
    kv = [torch.randn(2, 40, 16, 4, 64).half() for _ in range(4)]
    ids = list(range(0, 40, 2))
    out = host_blocks(len(ids), layout)
    one_layer = 2 * 16 * 4 * 64 * 2  # bytes of one layer of one block
    assert _large_allocations(lambda: gather_paged(kv, ids, out, layout), one_layer) == []
    assert _large_allocations(lambda: scatter_paged(out, kv, [i + 1 for i in ids], layout), one_layer) == []
    cache = scatter_dynamic(out, layout)
    assert _large_allocations(lambda: gather_dynamic(cache, out, layout), one_layer) == []
    # the check can fail: a copy through a temporary is seen
    assert _large_allocations(lambda: out.copy_(out.clone()), one_layer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_paged_round_trip_touches_only_its_blocks(dtype):
    layout = _layout(dtype)
    src_kv = _paged(6, dtype, seed=1)
    blocks = host_blocks(3, layout)
    gather_paged(src_kv, [5, 1, 3], blocks, layout)
    dst_kv = _paged(8, dtype, seed=2)
    before = [t.clone() for t in dst_kv]
    rep = scatter_paged(blocks, dst_kv, [0, 6, 2], layout)
    assert rep.host_passes == 1 and rep.copy_ops == 2 * L
    back = host_blocks(3, layout)
    gather_paged(dst_kv, [0, 6, 2], back, layout)
    assert torch.equal(back, blocks)
    for layer in range(L):
        for b in (1, 3, 4, 5, 7):
            assert torch.equal(dst_kv[layer][:, b], before[layer][:, b])


def test_payload_goes_through_the_envelope_unchanged_bf16():
    layout = _layout(torch.bfloat16)
    kv = _paged(5, torch.bfloat16)
    out = host_blocks(2, layout)
    gather_paged(kv, [4, 1], out, layout)
    env = encode_block(out[0], fingerprint=b"\1" * 32, key=b"\2" * 32, parent=b"\3" * 32, token_count=T)
    back = torch.empty(layout.block_shape, dtype=torch.bfloat16)
    decode_block_into(env, back)
    assert torch.equal(back, kv_block(kv, 4))


def kv_block(kv, i):
    return torch.stack([kv[layer][:, i] for layer in range(L)])


def test_mismatches_are_typed():
    layout = _layout()
    kv = _paged(4, torch.float16)
    out = host_blocks(2, layout)
    with pytest.raises(ShapeMismatchError):
        gather_paged(kv[:-1], [0, 1], out, layout)
    with pytest.raises(ShapeMismatchError):
        gather_paged([torch.zeros(2, 4, T, H, D + 1).half()] * L, [0, 1], out, layout)
    with pytest.raises(DTypeMismatchError):
        gather_paged([t.float() for t in kv], [0, 1], out, layout)
    with pytest.raises(DTypeMismatchError):
        gather_paged(kv, [0, 1], out.float(), layout)
    with pytest.raises(ShapeMismatchError):
        gather_paged(kv, [0, 1, 2], out, layout)
    with pytest.raises(ShapeMismatchError):
        gather_paged(kv, [0, 1], out.transpose(0, 1).contiguous().transpose(0, 1), layout)
    with pytest.raises(BlockTableError):
        gather_paged(kv, [0, 4], out, layout)
    with pytest.raises(BlockTableError):
        scatter_paged(out, kv, [1, 1], layout)
    with pytest.raises(ShapeMismatchError):
        block_view(bytearray(layout.block_nbytes - 1), layout)
    with pytest.raises(ValueError):
        block_view(bytes(layout.block_nbytes), layout)
    assert issubclass(BlockTableError, QuiverError)


def test_host_buffers_are_not_pinned_without_an_accelerator():
    layout = _layout()
    t = host_blocks(2, layout, for_device="cpu")
    assert not t.is_pinned() and tuple(t.shape) == (2, *layout.block_shape) and int(t.abs().sum()) == 0


# --- DynamicCache ---------------------------------------------------------------------


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=H, head_dim=D, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dynamic_cache_round_trip_restores_the_prefix_exactly(dtype):
    model = _tiny_llama(dtype)
    layout = _layout(dtype)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (1, 3 * T), generator=g)
    cont = torch.randint(0, 97, (1, 5), generator=g)
    with torch.no_grad():
        pre = model(prompt, use_cache=True).past_key_values
        blocks = host_blocks(3, layout)
        rep = gather_dynamic(pre, blocks, layout)
        assert rep.host_passes == 1
        k0 = cache_tensors(pre)[1][0]
        assert torch.equal(blocks[2, 1, 0], k0[0, :, 2 * T:3 * T].transpose(0, 1))  # tokens before heads
        want = model(cont, past_key_values=pre, use_cache=True).logits
        restored = scatter_dynamic(blocks, layout)
        assert restored.get_seq_length() == 3 * T
        got = model(cont, past_key_values=restored, use_cache=True).logits
    assert torch.equal(got, want)


def test_dynamic_gather_of_later_blocks_and_mismatches():
    model = _tiny_llama()
    layout = _layout(torch.float32)
    with torch.no_grad():
        cache = model(torch.arange(3 * T).view(1, -1), use_cache=True).past_key_values
    all3 = host_blocks(3, layout)
    gather_dynamic(cache, all3, layout)
    last2 = host_blocks(2, layout)
    gather_dynamic(cache, last2, layout, first_block=1)
    assert torch.equal(last2, all3[1:])
    with pytest.raises(ShapeMismatchError):  # asks for tokens the cache does not hold
        gather_dynamic(cache, host_blocks(3, layout), layout, first_block=1)
    with pytest.raises(DTypeMismatchError):
        gather_dynamic(cache, host_blocks(1, _layout(torch.float16)), _layout(torch.float16))
    with pytest.raises(ShapeMismatchError):
        gather_dynamic(cache, host_blocks(1, layout), KVLayout(L, T, H + 1, D, torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: needs a CUDA device (none on this machine)")
def test_cuda_paged_and_dynamic_round_trip():
    layout = _layout(torch.float16)
    kv = [t.cuda() for t in _paged(9, torch.float16)]
    out = host_blocks(4, layout, for_device="cuda")
    assert out.is_pinned()
    rep = gather_paged(kv, [8, 0, 3, 5], out, layout, chunk_blocks=3)
    rep.wait()
    assert torch.equal(out, _reference([t.cpu() for t in kv], [8, 0, 3, 5]))
    assert (rep.device_passes, rep.transfers, rep.host_passes) == (1, 1, 0)
    pageable = torch.zeros(tuple(out.shape), dtype=out.dtype)  # pageable (not pinned)
    rep = gather_paged(kv, [8, 0, 3, 5], pageable, layout, chunk_blocks=3)
    rep.wait()
    assert torch.equal(pageable, out) and rep.host_passes == 1
    dst = [torch.zeros_like(t) for t in kv]
    scatter_paged(pageable, dst, [1, 2, 4, 6], layout).wait()
    assert torch.equal(dst[1][:, 4].cpu(), kv[1][:, 3].cpu())
    cache = scatter_dynamic(pageable, layout, device="cuda")
    back = host_blocks(4, layout)
    gather_dynamic(cache, back, layout).wait()
    assert torch.equal(back, pageable)
    assert np.array_equal(back.numpy(), pageable.numpy())


# --- the CPU paths' cheap views (torch.as_strided) against their definitions -------------


def test_seq_strided_is_seq_view_on_sliced_batched_offset_tensors():
    from quiver.engine.torch_io import _seq_strided, _seq_view

    layout = _layout(torch.float32)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(3, H, 7 * T + 3, D, generator=g)
    cases = [
        big,                                              # contiguous
        big[:, :, 3:, :],                                 # a token slice: storage offset != 0
        big[1:],                                          # a batch slice
        torch.randn(2, 6 * T, H, D, generator=g).transpose(1, 2),  # heads outside tokens, head_dim still unit stride
    ]
    for t in cases:
        for b in range(t.shape[0]):
            for s0, n in ((0, 1), (T, 2), (2 * T, 4)):
                want = _seq_view(t, b, s0, n, layout)
                got = _seq_strided(t, b, s0, n, layout)
                assert got.shape == want.shape and got.stride() == want.stride()
                assert got.data_ptr() == want.data_ptr()  # a view of the same bytes, not a copy
                assert torch.equal(got, want)


def test_host_slices_are_the_layer_kv_views_even_at_a_storage_offset():
    from quiver.engine.torch_io import _host_slices

    layout = _layout(torch.float16)
    whole = host_blocks(5, layout)
    whole.copy_(torch.randn(whole.shape).half())
    out = whole[1:4]  # contiguous, storage offset one block in
    assert out.storage_offset() != 0
    views = _host_slices(out, layout)
    assert len(views) == 2 * L
    for layer in range(L):
        for kv in range(2):
            v = views[2 * layer + kv]
            assert v.data_ptr() == out[:, layer, kv].data_ptr() and v.stride() == out[:, layer, kv].stride()
            assert torch.equal(v, out[:, layer, kv])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_paged_scattered_and_repeated_ids_into_an_offset_buffer(dtype):
    layout = _layout(dtype)
    kv = _paged(16, dtype, seed=4)
    ids = [15, 3, 4, 5, 0, 9, 9, 2]  # a run (3, 4, 5), a repeat: a gather may name a block twice
    whole = host_blocks(len(ids) + 1, layout)
    out = whole[1:]
    rep = gather_paged(kv, ids, out, layout)
    assert torch.equal(out, _reference(kv, ids)) and int(whole[0].abs().sum()) == 0
    assert rep.copy_ops == 2 * L and rep.host_passes == 1
    dst = _paged(16, dtype, seed=5)
    with pytest.raises(BlockTableError):  # a scatter may not
        scatter_paged(out, dst, ids, layout)
    uniq = [15, 3, 4, 5, 0, 9, 1, 2]
    scatter_paged(out, dst, uniq, layout)
    for j, b in enumerate(uniq):
        assert torch.equal(kv_block(dst, b), out[j])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dynamic_copies_on_sliced_batched_caches_and_offset_buffers(dtype):
    from quiver.engine.torch_io import scatter_dynamic_tensors

    layout = _layout(dtype)
    g = torch.Generator().manual_seed(6)
    # keys/values that are views: batch of 2, a longer buffer sliced from token 1 (storage offset != 0)
    pairs = [tuple(torch.randn(2, H, 5 * T + 1, D, generator=g).to(dtype)[:, :, 1:, :] for _ in range(2))
             for _ in range(L)]

    class _C:
        layers = [type("Layer", (), {"keys": k, "values": v, "is_sliding": False})() for k, v in pairs]

    whole = host_blocks(4, layout)
    out = whole[1:]  # 3 blocks at a storage offset
    gather_dynamic(_C(), out, layout, first_block=2, batch_index=1)
    for j in range(3):
        for layer in range(L):
            for kv in range(2):
                want = pairs[layer][kv][1, :, (2 + j) * T:(3 + j) * T].transpose(0, 1)
                assert torch.equal(out[j, layer, kv], want)
    assert int(whole[0].abs().sum()) == 0
    # scatter into existing (sliced) tensors: writes tokens [0, 3T) of batch row 0, nothing else
    before = [tuple(t.clone() for t in p) for p in pairs]
    _, rep = scatter_dynamic_tensors(out, layout, into=pairs)
    assert rep.host_passes == 1 and rep.copy_ops == 2 * L
    for layer in range(L):
        for kv in range(2):
            t = pairs[layer][kv]
            assert torch.equal(t[0, :, :3 * T].unflatten(1, (3, T)).permute(1, 2, 0, 3), out[:, layer, kv])
            assert torch.equal(t[0, :, 3 * T:], before[layer][kv][0, :, 3 * T:])
            assert torch.equal(t[1], before[layer][kv][1])
    # and into fresh tensors
    fresh, _ = scatter_dynamic_tensors(out, layout)
    for layer in range(L):
        for kv in range(2):
            assert torch.equal(fresh[layer][kv][0], pairs[layer][kv][0, :, :3 * T])



def test_warm_paged_copies_does_nothing_on_cpu():
    """The CUDA copy kernel's warm-up (engine/torch_io.py) touches nothing on CPU tensors."""
    from quiver.engine.torch_io import warm_paged_copies

    kv = _paged(5, torch.float16)
    before = [t.clone() for t in kv]
    assert warm_paged_copies(kv, _layout(torch.float16)) is False
    assert all(torch.equal(a, b) for a, b in zip(kv, before))
