"""The compiled DynamicCache scatter (engine/copy_kernels.py): the same bytes as torch's copy, or no copy."""

from __future__ import annotations

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
