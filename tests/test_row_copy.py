"""A get's L0 hits into the caller's array (engine/row_copy.py): non-temporal stores for a
large get, numpy otherwise, the same bytes either way; the kernel loads off the get's path."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from quiver import BlockStore, CacheIdentity
from quiver.engine import jit, row_copy


@pytest.fixture
def kernel_calls(monkeypatch):
    """The loaded kernel, wrapped to count its calls (the path a copy took)."""
    assert row_copy.wait_loaded()  # numba is a dependency: the kernel must load here
    real, calls = jit._made[row_copy._NAME], []

    def counted(*args):
        calls.append(len(args[2]))
        return real(*args)

    monkeypatch.setitem(jit._made, row_copy._NAME, counted)
    monkeypatch.setattr(row_copy, "NT_MIN_BYTES", 0)  # small arrays take the large get's path
    return calls


def _src(rows: int, width: int) -> np.ndarray:
    return np.random.default_rng(rows * width).integers(0, 256, size=(rows, width), dtype=np.uint8)


@pytest.mark.parametrize("row", [16, 4096 + 48])
def test_rows_land_in_place_and_nothing_else_is_written(kernel_calls, row):
    src = _src(6, 5 + row + 3)  # each row's bytes 5 bytes in: a header before them, as in L0's slots
    dst = np.zeros((5, row), dtype=np.uint8)
    row_copy.copy_rows(src, 5, [4, 0, 2], dst, [1, 4, 0])
    assert kernel_calls == [3]
    for s, d in [(4, 1), (0, 4), (2, 0)]:
        assert dst[d].tobytes() == src[s, 5:5 + row].tobytes()
    assert not dst[[2, 3]].any()


def test_rows_off_16_byte_boundaries_are_copied_by_numpy(kernel_calls):
    src = _src(3, 64)
    odd_row = np.zeros((2, 24), dtype=np.uint8)                  # a row not a multiple of 16
    shifted = np.zeros(2 * 32 + 8, dtype=np.uint8)[8:].reshape(2, 32)  # rows 8 bytes off a boundary
    for dst in (odd_row, shifted):
        row_copy.copy_rows(src, 1, [2, 0], dst, [0, 1])
        assert dst[0].tobytes() == src[2, 1:1 + dst.shape[1]].tobytes()
        assert dst[1].tobytes() == src[0, 1:1 + dst.shape[1]].tobytes()
    assert kernel_calls == []


def test_a_small_copy_stays_in_numpy(kernel_calls, monkeypatch):
    monkeypatch.setattr(row_copy, "NT_MIN_BYTES", 2 * 4096 + 1)
    src, dst = _src(2, 4096), np.zeros((2, 4096), dtype=np.uint8)
    row_copy.copy_rows(src, 0, [0, 1], dst, [0, 1])
    assert kernel_calls == [] and np.array_equal(src, dst)


def test_turned_off_it_copies_with_numpy(kernel_calls, monkeypatch):
    monkeypatch.setenv(jit.JIT_ENV, "off")
    src, dst = _src(2, 4096), np.zeros((2, 4096), dtype=np.uint8)
    row_copy.copy_rows(src, 0, [1, 0], dst, [0, 1])
    assert kernel_calls == [] and np.array_equal(src[::-1], dst)


def test_a_large_get_from_l0_returns_its_blocks_through_the_kernel(kernel_calls, tmp_path):
    ident = CacheIdentity(model="m", model_revision="1", tokenizer="t", tokenizer_revision="1", tenant="x",
                          kv_dtype="float16", block_tokens=16, num_layers=2, num_kv_heads=2, head_dim=64)
    n = 6
    tokens = np.arange(n * 16, dtype=np.uint32)
    blocks = np.random.default_rng(3).standard_normal((n, *ident.block_shape)).astype(np.float16)
    with BlockStore.open(tmp_path / "s", ram_bytes=8 << 20) as st:
        st.put(ident, tokens, blocks)
        assert st.stats()["residency"]["l0"] == n
        out = np.zeros_like(blocks)
        st.get(ident, tokens, out=out)
        assert kernel_calls == [n]
        assert out.tobytes() == blocks.tobytes()
        part = np.zeros_like(blocks[:4])
        st.get(ident, tokens, 5, out=part, start_block=1)  # blocks 1..4: rows 0..3 of the destination
        assert part.tobytes() == blocks[1:5].tobytes()


def test_the_background_load_runs_once_and_the_caller_never_waits():
    """once_in_background returns None at once while the kernel is being made, starts
    one maker however often it is asked, and returns the kernel once it is made."""
    gate, made = threading.Event(), []

    def make():
        made.append(1)
        gate.wait()
        return "kernel"

    name = "test-background-kernel"
    try:
        assert jit.once_in_background(name, make, 0, "test") is None
        assert jit.once_in_background(name, make, 0, "test") is None  # still being made: not again
        gate.set()
        for t in threading.enumerate():
            if t.name == f"quiver-jit-{name}":
                t.join()
        assert jit.once_in_background(name, make, 0, "test") == "kernel"
        assert made == [1]
    finally:
        jit._made.pop(name, None)
        jit._making.discard(name)
