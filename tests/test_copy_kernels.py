"""The compiled DynamicCache scatter (engine/copy_kernels.py): the same bytes as torch's copy, or no copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quiver.engine.copy_kernels import JIT_ENV, scatter_rows
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


# head_dim * itemsize picks the kernel's word: 16 B (8-byte words), 6 B (2), 12 B (4), 3 B (1)
@pytest.mark.parametrize("dtype, d", [(torch.float16, 8), (torch.bfloat16, 8), (torch.float16, 3),
                                      (torch.float32, 3), (torch.int8, 3)])
def test_the_kernel_writes_what_torch_writes_and_nothing_else(dtype, d):
    layout = KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=d, dtype=dtype)
    n = 3
    src = torch.randint(-100, 100, (n + 1, *layout.block_shape), dtype=torch.int32).to(dtype)[1:]  # at an offset
    ours, ref = _pairs(2, n * T + 5, d, dtype, 1), _pairs(2, n * T + 5, d, dtype, 1)
    assert scatter_rows(src, ours)  # numba is a dependency: the kernel must run here
    _torch_scatter(src, ref, layout)
    for (k, v), (rk, rv) in zip(ours, ref):
        assert torch.equal(k, rk) and torch.equal(v, rv)  # tokens past n*T and batch row 1 untouched too


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
