"""BlockStore's range API: put blocks k..m without passing 0..k-1, get blocks k..m.

An engine (vLLM) already holds a prompt's first blocks in its own prefix cache:
it stores and loads only the rest.  Keys still name the whole prefix, so the
token ids always start at the prompt's first token."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from quiver.engine.errors import BlockNotFoundError, InvalidTokensError, ShapeMismatchError
from quiver.engine.store import BlockStore

sys.path.insert(0, os.path.dirname(__file__))
from store_child import make_case  # noqa: E402


@pytest.fixture
def store(tmp_path):
    with BlockStore.open(tmp_path / "s", ram_bytes=1 << 20, index="flat") as s:
        yield s


def test_put_in_two_ranges_equals_one_put(store, tmp_path):
    ident, tokens, blocks = make_case(1, 5)
    assert store.put(ident, tokens, blocks[:2]) == 2
    assert store.put(ident, tokens, blocks[2:], start_block=2) == 3
    assert store.lookup(ident, tokens) == 5
    assert store.get(ident, tokens).tobytes() == blocks.tobytes()
    # the same blocks written in one put land on the same keys: nothing new to write
    with BlockStore.open(tmp_path / "other", ram_bytes=0, index="flat") as one:
        assert one.put(ident, tokens, blocks) == 5
    assert store.put(ident, tokens, blocks) == 0


def test_get_a_range(store):
    ident, tokens, blocks = make_case(2, 6)
    store.put(ident, tokens, blocks)
    assert store.get(ident, tokens, 5, start_block=2).tobytes() == blocks[2:5].tobytes()
    assert store.get(ident, tokens, start_block=4).tobytes() == blocks[4:].tobytes()
    assert store.get(ident, tokens, 3, start_block=3).shape == (0, *ident.block_shape)
    out = torch.empty((3, *ident.block_shape), dtype=torch.float16)
    assert store.get(ident, tokens, 4, out=out, start_block=1) is out
    assert out.numpy().tobytes() == blocks[1:4].tobytes()


def test_range_put_of_torch_tensors(store):
    ident, tokens, blocks = make_case(3, 4)
    assert store.put(ident, tokens, torch.from_numpy(blocks[1:]), start_block=1) == 3
    assert store.lookup(ident, tokens) == 0  # block 0 was never stored: the prefix stops there
    assert store.get(ident, tokens, start_block=1).tobytes() == blocks[1:].tobytes()


def test_missing_block_reports_its_index_in_the_prompt(store):
    ident, tokens, blocks = make_case(4, 5)
    store.put(ident, tokens, blocks[:1])
    store.put(ident, tokens, blocks[3:], start_block=3)
    with pytest.raises(BlockNotFoundError) as info:
        store.get(ident, tokens)
    assert info.value.block_index == 1
    with pytest.raises(BlockNotFoundError) as info:
        store.get(ident, tokens, start_block=2)
    assert info.value.block_index == 2
    assert store.get(ident, tokens, start_block=3).tobytes() == blocks[3:].tobytes()


@pytest.mark.parametrize("start", [-1, 1.0, "1", True, None])
def test_bad_start_block_is_typed_and_writes_nothing(store, start):
    ident, tokens, blocks = make_case(5, 3)
    with pytest.raises(InvalidTokensError):
        store.put(ident, tokens, blocks, start_block=start)
    with pytest.raises(InvalidTokensError):
        store.get(ident, tokens, start_block=start)
    assert store.lookup(ident, tokens) == 0


def test_range_past_the_prompt_is_typed_and_writes_nothing(store):
    ident, tokens, blocks = make_case(6, 3)  # the tokens fill 3 full blocks
    with pytest.raises(InvalidTokensError):
        store.put(ident, tokens, blocks[:2], start_block=2)  # blocks 2..3: block 3 has no tokens
    with pytest.raises(InvalidTokensError):
        store.get(ident, tokens, 2, start_block=3)
    with pytest.raises(ShapeMismatchError):
        store.put(ident, tokens, blocks[0, 0], start_block=1)
    assert store.lookup(ident, tokens) == 0
    assert store.stats()["counters"]["put_blocks"] == 0
