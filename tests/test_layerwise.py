"""Layerwise objects: per-layer CRCs, ranged reads from a local object store, bounded overlapped loader."""

from __future__ import annotations

import os
import struct
import threading

import crc32c
import numpy as np
import pytest

from quiver.engine.envelope import (
    FLAG_LAYER_CRC,
    decode_block,
    decode_header,
    encode_block,
    header_size,
    uniform_layer_offsets,
    verify_layer,
)
from quiver.engine.errors import (
    BlockNotFoundError,
    ChecksumMismatchError,
    CorruptEnvelopeError,
    IdentityMismatchError,
    TruncatedEnvelopeError,
)
from quiver.engine.identity import CacheIdentity
from quiver.engine.keys import chain_keys, root_key
from quiver.engine.layerwise import LayerwiseLoader, encode_layerwise, expected_chain, load_layers
from quiver.tier.objectstore import LocalDirObjectStore, object_name

IDENT = CacheIdentity(model="m", model_revision="r", tokenizer="t", tokenizer_revision="r", tenant="a",
                      kv_dtype="float16", block_tokens=4, num_layers=5, num_kv_heads=2, head_dim=8)
N = 3


def _blocks() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, *IDENT.block_shape)).astype(np.float16)


@pytest.fixture
def stored(tmp_path):
    store = LocalDirObjectStore(tmp_path / "l2")
    blocks = _blocks()
    keys = chain_keys(IDENT, list(range(N * IDENT.block_tokens)))
    want = expected_chain(IDENT, keys, root_key(IDENT))
    for b, w in zip(blocks, want):
        store.put(w.key, encode_layerwise(b, fingerprint=w.fingerprint, key=w.key, parent=w.parent,
                                          token_count=w.token_count))
    yield store, keys, want, blocks
    store.close()


def test_layer_crc_table_in_header_and_whole_decode_still_works():
    b = _blocks()[0]
    env = encode_layerwise(b, fingerprint=b"\1" * 32, key=b"\2" * 32, parent=b"\3" * 32, token_count=4)
    h = decode_header(env[: header_size(5, True)])
    assert h.flags & FLAG_LAYER_CRC and h.header_len == 172 + 12 * 5 and len(h.layer_crcs) == 5
    for i in range(5):
        lo, hi = h.layer_body_range(i)
        assert h.layer_crcs[i] == crc32c.crc32c(b[i].tobytes())
        verify_layer(h, i, env[lo:hi])
    _, whole = decode_block(env)
    assert np.array_equal(whole, b)
    bad = bytearray(env[h.layer_body_range(2)[0]:h.layer_body_range(2)[1]])
    bad[5] ^= 4
    with pytest.raises(ChecksumMismatchError, match="layer 2"):
        verify_layer(h, 2, bytes(bad))
    with pytest.raises(TruncatedEnvelopeError):
        verify_layer(h, 2, bytes(bad[:-1]))
    with pytest.raises(ValueError):  # layer CRCs only protect ranged reads of codec none
        encode_block(b, fingerprint=b"\1" * 32, key=b"\2" * 32, parent=b"\3" * 32, token_count=4,
                     codec="zstd", layer_offsets=uniform_layer_offsets(5, b.nbytes), layer_crcs=True)
    plain = encode_block(b, fingerprint=b"\1" * 32, key=b"\2" * 32, parent=b"\3" * 32, token_count=4)
    with pytest.raises(ValueError):
        verify_layer(decode_header(plain), 0, b"")
    # flag set on an envelope without layers: refused after the header CRC
    buf = bytearray(plain)
    struct.pack_into("<I", buf, 8, FLAG_LAYER_CRC)
    struct.pack_into("<I", buf, 168, crc32c.crc32c(bytes(buf[:168])))
    with pytest.raises(CorruptEnvelopeError, match="layer CRC"):
        decode_header(bytes(buf))


@pytest.mark.parametrize("depth", [0, 1, 2, 8])
def test_loader_returns_every_layer_verified(stored, depth):
    store, keys, want, blocks = stored
    seen = []

    def consume(i, layer):
        assert layer.shape == (N, 2, 4, 2, 8)
        assert np.array_equal(layer, blocks[:, i])
        seen.append(i)

    out = load_layers(store.get_range, keys, want, consume, depth=depth)
    assert seen == list(range(5)) and np.array_equal(out, blocks)


def test_loader_refuses_wrong_block_missing_object_and_corrupt_layer(stored, tmp_path):
    store, keys, want, blocks = stored
    swapped = [want[1], want[0], want[2]]
    with pytest.raises(IdentityMismatchError):
        list(LayerwiseLoader(store.get_range, keys, swapped))
    with pytest.raises(BlockNotFoundError):
        list(LayerwiseLoader(store.get_range, [b"\x09" * 32, *keys[1:]], want))
    # flip one byte of layer 3 of block 1 on disk: only that layer's CRC can see it
    h = decode_header(store.get_range(keys[1], 0, header_size(5, True)))
    path = os.path.join(store.root, object_name(keys[1]))
    with open(path, "r+b") as f:
        f.seek(h.layer_body_range(3)[0] + 10)
        c = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([c[0] ^ 0x40]))
    got = []
    with pytest.raises(ChecksumMismatchError, match="layer 3"):
        for i in LayerwiseLoader(store.get_range, keys, want, depth=1):
            got.append(i)
    assert got == [0, 1, 2]  # layers before the damaged one were served, verified


def test_loader_refuses_objects_without_layer_crcs(tmp_path):
    store = LocalDirObjectStore(tmp_path / "l2")
    b = _blocks()[0]
    keys = chain_keys(IDENT, list(range(IDENT.block_tokens)))
    (w,) = expected_chain(IDENT, keys, root_key(IDENT))
    store.put(w.key, encode_block(b, fingerprint=w.fingerprint, key=w.key, parent=w.parent, token_count=4,
                                  layer_offsets=uniform_layer_offsets(5, b.nbytes)))
    with pytest.raises((CorruptEnvelopeError, TruncatedEnvelopeError)):
        list(LayerwiseLoader(store.get_range, keys, [w]))


def test_fetches_overlap_consumption_and_stay_bounded(stored):
    """With depth 2, layers i+1, i+2 are fetched while i is consumed, and never more.

    An ordering by events, not a wall-clock bound: while the consumer holds
    layer i it waits until every fetch of layers i+1 and i+2 has finished.  A
    loader that fetched only after the consumer moved on (serial, depth 0)
    never sets those events, and the wait fails (its timeout only detects the
    hang; nothing is asserted about how fast anything ran)."""
    store, keys, want, blocks = stored
    lock = threading.Lock()
    header_len = header_size(5, True)
    layer_of = {}
    for k in keys:
        h = decode_header(store.get_range(k, 0, header_len))
        for i in range(5):
            layer_of[(k, h.layer_body_range(i)[0])] = i
    fetched = {i: set() for i in range(5)}           # keys whose layer i has been fetched
    layer_done = {i: threading.Event() for i in range(5)}
    consumed: list[int] = []
    max_ahead = [0]

    def get_range(key, start, length):
        if start:  # a layer, not a header
            i = layer_of[(key, start)]
            with lock:  # a fetch of layer i may start only while layer i - depth - 1 or later is consumed
                ahead = i - (consumed[-1] if consumed else -1)
                max_ahead[0] = max(max_ahead[0], ahead)
        data = store.get_range(key, start, length)
        if start:
            with lock:
                fetched[i].add(key)
                if len(fetched[i]) == len(keys):
                    layer_done[i].set()
        return data

    overlapped = []  # (layer consumed, layer whose fetches all finished during that consumption)
    for i in LayerwiseLoader(get_range, keys, want, depth=2):
        for j in (i + 1, i + 2):
            if j < 5:
                assert layer_done[j].wait(timeout=60), f"layer {j} was not fetched while layer {i} was consumed"
                overlapped.append((i, j))
        with lock:
            consumed.append(i)
    assert consumed == list(range(5))
    assert overlapped == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]
    assert max_ahead[0] <= 3  # a fetch of layer j starts only once j <= consumed + depth + 1
