"""The compiled copies (engine/copy_kernels.py): the same bytes as torch's copy, or no copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quiver.engine.copy_kernels import scatter_rows
from quiver.engine.jit import JIT_ENV
from quiver.engine.torch_io import KVLayout, _host_slices, _seq_strided

L, T, H = 3, 4, 2


def _torch_scatter(src: torch.Tensor, pairs, layout: KVLayout) -> None:
    """The torch path of scatter_dynamic_tensors: the reference."""
    srcs = _host_slices(src, layout)
    for layer, pair in enumerate(pairs):
        for kv in range(2):
            _seq_strided(pair[kv], 0, 0, src.shape[0], layout).copy_(srcs[2 * layer + kv])


def _pairs(batch: int, seq: int, d: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(batch, H, seq, d, generator=g).to(dtype) for _ in range(2)) for _ in range(L)]


# head_dim * itemsize picks the kernel: rows of 16 B and 256 B (16-byte non-temporal moves),
# 6 B (2-byte words), 12 B (4), 3 B (1)
@pytest.mark.parametrize("dtype, d", [(torch.float16, 8), (torch.bfloat16, 8), (torch.float32, 64),
                                      (torch.float16, 3), (torch.float32, 3), (torch.int8, 3)])
def test_the_kernel_writes_what_torch_writes_and_nothing_else(dtype, d):
    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=d, dtype=dtype)
    n = 3
    src = torch.randint(-100, 100, (n + 1, *layout.block_shape), dtype=torch.int32).to(dtype)[1:]  # at an offset
    ours, ref = _pairs(2, n * T + 5, d, dtype, 1), _pairs(2, n * T + 5, d, dtype, 1)
    assert scatter_rows(src, ours)  # numba is a dependency: the kernel must run here
    _torch_scatter(src, ref, layout)
    for (k, v), (rk, rv) in zip(ours, ref):
        assert torch.equal(k, rk) and torch.equal(v, rv)  # tokens past n*T and batch row 1 untouched too


def test_rows_off_16_byte_boundaries_take_the_word_kernel_with_the_same_result():
    """16-byte rows on 16-byte boundaries go to the non-temporal kernel (movntdq faults
    elsewhere); tensors 8 bytes off one take 8-byte words, and both write the same."""
    from quiver.engine.copy_kernels import dynamic_target

    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=8, dtype=torch.float16)
    n = 3
    src = torch.randint(-100, 100, (n, *layout.block_shape), dtype=torch.int32).to(torch.float16)
    aligned = _pairs(1, n * T, 8, torch.float16, 8)
    shifted = []
    for pair in _pairs(1, n * T, 8, torch.float16, 8):
        moved = []
        for t in pair:
            room = torch.empty(t.numel() + 4, dtype=torch.float16)[4:].view(t.shape)  # 8 bytes in
            room.copy_(t)
            moved.append(room)
        shifted.append(tuple(moved))
    assert dynamic_target(aligned, layout.block_shape, torch.float16).width == 16
    assert dynamic_target(shifted, layout.block_shape, torch.float16).width == 8
    assert scatter_rows(src, aligned) and scatter_rows(src, shifted)
    ref = _pairs(1, n * T, 8, torch.float16, 8)
    _torch_scatter(src, ref, layout)
    for a, b, r in zip(aligned, shifted, ref):
        assert all(torch.equal(x, z) and torch.equal(y, z) for x, y, z in zip(a, b, r))


def test_non_contiguous_destinations_are_left_to_torch():
    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=8, dtype=torch.float16)
    src = torch.ones(2, *layout.block_shape, dtype=torch.float16)
    sliced = [tuple(t[:, :, 1:, :] for t in p) for p in _pairs(1, 2 * T + 1, 8, torch.float16, 2)]
    before = [tuple(t.clone() for t in p) for p in sliced]
    assert not scatter_rows(src, sliced)
    assert all(torch.equal(t, b) for p, q in zip(sliced, before) for t, b in zip(p, q))


def test_turned_off_it_copies_nothing(monkeypatch):
    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=8, dtype=torch.float16)
    src = torch.ones(2, *layout.block_shape, dtype=torch.float16)
    pairs = _pairs(1, 2 * T, 8, torch.float16, 3)
    before = [tuple(t.clone() for t in p) for p in pairs]
    monkeypatch.setenv(JIT_ENV, "off")
    assert not scatter_rows(src, pairs)
    assert all(torch.equal(t, b) for p, q in zip(pairs, before) for t, b in zip(p, q))


def test_shapes_that_do_not_fit_are_left_to_torch():
    """The kernel runs without bounds checks, so scatter_rows checks every shape it would index."""
    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=8, dtype=torch.float16)
    src = torch.ones(2, *layout.block_shape, dtype=torch.float16)
    short = _pairs(1, 2 * T - 1, 8, torch.float16, 4)       # one token too few
    missing = _pairs(1, 2 * T, 8, torch.float16, 5)[:-1]    # a layer missing
    other = _pairs(1, 2 * T, 8, torch.float32, 6)           # another dtype
    for pairs in (short, missing, other):
        before = [tuple(t.clone() for t in p) for p in pairs]
        assert not scatter_rows(src, pairs)
        assert all(torch.equal(t, b) for p, q in zip(pairs, before) for t, b in zip(p, q))


@pytest.mark.parametrize("offset, stride_pad", [(0, 0), (268, 12), (3, 1)])  # whole rows; an arena's slots; odd
def test_block_rows_from_slots_land_where_their_blocks_belong(offset, stride_pad):
    """scatter_block_rows: block blocks[j]'s payload is row rows[j] of a 2-D
    byte array at ``offset`` (L0's arena: a header before each body, slots
    ``stride_pad`` bytes longer than an envelope); any order, any subset."""
    from quiver.engine.copy_kernels import dynamic_target, scatter_block_rows

    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=8, dtype=torch.float16)
    n = 5
    src = torch.randint(-100, 100, (n, *layout.block_shape), dtype=torch.int32).to(torch.float16)
    width = offset + layout.block_nbytes + stride_pad
    slots = np.zeros((7, width), dtype=np.uint8)
    rows, blocks = [6, 0, 3], [4, 1, 2]  # slot of each block, blocks out of order, 0 and 3 not taken
    for r, b in zip(rows, blocks):
        slots[r, offset:offset + layout.block_nbytes] = src[b].view(torch.uint8).reshape(-1).numpy()
    ours, ref = _pairs(1, n * T, 8, torch.float16, 7), _pairs(1, n * T, 8, torch.float16, 7)
    assert scatter_block_rows(slots, offset, rows, blocks, dynamic_target(ours, layout.block_shape, torch.float16))
    _torch_scatter(src, ref, layout)
    for (k, v), (rk, rv), (ok, ov) in zip(ours, ref, _pairs(1, n * T, 8, torch.float16, 7)):
        for b in range(n):
            span = slice(b * T, (b + 1) * T)
            want_k, want_v = (rk, rv) if b in blocks else (ok, ov)  # a block not taken is untouched
            assert torch.equal(k[:, :, span], want_k[:, :, span]) and torch.equal(v[:, :, span], want_v[:, :, span])


def test_block_rows_out_of_bounds_copy_nothing():
    from quiver.engine.copy_kernels import dynamic_target, scatter_block_rows

    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=8, dtype=torch.float16)
    slots = np.ones((2, layout.block_nbytes + 4), dtype=np.uint8)
    for offset, rows, blocks, seq in [(0, [2], [0], T), (0, [-1], [0], T), (5, [0], [0], T),  # row, offset
                                      (0, [0], [1], T), (0, [0, 1], [0], T)]:  # past the cache; lengths differ
        pairs = _pairs(1, seq, 8, torch.float16, 8)
        before = [tuple(t.clone() for t in p) for p in pairs]
        target = dynamic_target(pairs, layout.block_shape, torch.float16)
        assert not scatter_block_rows(slots, offset, rows, blocks, target)
        assert all(torch.equal(t, b) for p, q in zip(pairs, before) for t, b in zip(p, q))


# --- vLLM's CPU paged layout (paged_cpu_copy) -------------------------------------------

def _torch_paged_cpu(blocks: torch.Tensor, kv_caches, ids, layout: KVLayout, gather: bool) -> None:
    """The torch path of gather/scatter_paged_cpu, block by block: the reference."""
    from quiver.engine.torch_io import _cpu_blocks

    for j, b in enumerate(ids):
        for layer, t in enumerate(kv_caches):
            for kv, view in enumerate(_cpu_blocks(t, b, 1, layout)):
                if gather:
                    blocks[j:j + 1, layer, kv].copy_(view)
                else:
                    view.copy_(blocks[j:j + 1, layer, kv])


def _paged_cpu_case(dtype, t, d, n_blocks=12, seed=0):
    layout = KVLayout(num_layers=L, block_tokens=t, num_kv_heads=H, head_dim=d, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randint(-30000, 30000, (n_blocks, H, t, 2 * d), generator=g, dtype=torch.int32).to(dtype)
          for _ in range(L)]
    return layout, kv


@pytest.mark.parametrize("dtype, t, d", [(torch.bfloat16, 32, 64), (torch.float16, 16, 80), (torch.bfloat16, 8, 8),
                                         (torch.float16, 128, 64)])
def test_paged_cpu_kernel_moves_what_torch_moves_and_nothing_else(dtype, t, d):
    from quiver.engine.copy_kernels import paged_cpu_copy

    layout, kv = _paged_cpu_case(dtype, t, d)
    ids = [7, 1, 2, 3, 11, 0]  # a run and singletons, out of order
    ours, ref = torch.empty(len(ids), *layout.block_shape, dtype=dtype), torch.empty(len(ids), *layout.block_shape,
                                                                                      dtype=dtype)
    assert paged_cpu_copy(ours, kv, np.array(ids), gather=True)  # numba is a dependency: the kernel must run here
    _torch_paged_cpu(ref, kv, ids, layout, gather=True)
    assert torch.equal(ours, ref)
    src = torch.randint(-30000, 30000, ours.shape, dtype=torch.int32).to(dtype)
    mine, theirs = [x.clone() for x in kv], [x.clone() for x in kv]
    assert paged_cpu_copy(src, mine, np.array(ids), gather=False)
    _torch_paged_cpu(src, theirs, ids, layout, gather=False)
    for a, b, before in zip(mine, theirs, kv):
        assert torch.equal(a, b)  # the blocks written alike, and every other block untouched
        assert not torch.equal(a[ids], before[ids])
    # A source at any byte (the loads are unaligned; only the destination must be on 16 bytes).
    odd = torch.empty(src.numel() + 1, dtype=dtype)[1:].view(src.shape)
    odd.copy_(src)
    again = [x.clone() for x in kv]
    assert paged_cpu_copy(odd, again, np.array(ids), gather=False)
    assert all(torch.equal(a, b) for a, b in zip(again, theirs))


def test_paged_cpu_copies_the_kernel_cannot_do_are_left_to_torch(monkeypatch):
    """paged_cpu_copy returns False, having copied nothing, where its kernel does not
    apply (it runs without bounds checks, so every index is checked first)."""
    from quiver.engine.copy_kernels import paged_cpu_copy

    cases = []
    layout, kv = _paged_cpu_case(torch.float32, 32, 64)  # 4-byte elements
    cases.append((torch.zeros(2, *layout.block_shape), kv, [0, 1]))
    layout, kv = _paged_cpu_case(torch.bfloat16, 12, 64)  # T not a multiple of 8
    cases.append((torch.zeros(2, *layout.block_shape, dtype=torch.bfloat16), kv, [0, 1]))
    layout, kv = _paged_cpu_case(torch.bfloat16, 16, 20)  # D not a multiple of 8
    cases.append((torch.zeros(2, *layout.block_shape, dtype=torch.bfloat16), kv, [0, 1]))
    layout, kv = _paged_cpu_case(torch.bfloat16, 32, 64)
    blocks = torch.zeros(2, *layout.block_shape, dtype=torch.bfloat16)
    cases.append((blocks, kv, [0, 12]))  # an id past the last block
    cases.append((blocks, kv, [-1, 0]))
    cases.append((blocks, kv[:-1], [0, 1]))  # a layer missing
    cases.append((blocks, [*kv[:-1], kv[-1][:6]], [0, 1]))  # a layer with fewer blocks
    cases.append((blocks, [*kv[:-1], kv[-1].to(torch.float16)], [0, 1]))  # another dtype
    # Destinations off a 16-byte boundary (the kernel's non-temporal stores would fault there):
    # a layer 8 bytes in for a scatter, the blocks 2 bytes in for a gather.
    shifted = torch.zeros(kv[0].numel() + 4, dtype=torch.bfloat16)[4:].view(kv[0].shape)
    shifted.copy_(kv[0])
    cases.append((blocks, [shifted, *kv[1:]], [0, 1]))
    for src, layers, ids in cases:
        before = [x.clone() for x in layers]
        assert not paged_cpu_copy(src, layers, np.array(ids), gather=False)
        assert all(torch.equal(a, b) for a, b in zip(layers, before))
    odd = torch.zeros(blocks.numel() + 1, dtype=torch.bfloat16)[1:].view(blocks.shape)
    assert not paged_cpu_copy(odd, kv, np.array([0, 1]), gather=True)
    assert torch.equal(odd, torch.zeros_like(odd))
    monkeypatch.setenv(JIT_ENV, "off")
    before = [x.clone() for x in kv]
    assert not paged_cpu_copy(blocks, kv, np.array([0, 1]), gather=False)
    assert all(torch.equal(a, b) for a, b in zip(kv, before))


def test_warm_paged_cpu_copies_leaves_the_blocks_as_they_were():
    from quiver.engine.torch_io import warm_paged_cpu_copies

    layout, kv = _paged_cpu_case(torch.bfloat16, 32, 64)
    before = [x.clone() for x in kv]
    assert warm_paged_cpu_copies(kv, layout)
    assert all(torch.equal(a, b) for a, b in zip(kv, before))
