"""The identity guard (engine/guard.py) alone and inside the BlockStore.

A foreign writer on a shared object store plants another identity's block
under a victim's key; the guarded store refuses it (typed error, counted, no
byte copied out), the unguarded one would have served it.  The naive mode
(keys from tokens alone) serves other identities' bytes: that is why it is
study-only.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest

from quiver.engine.envelope import decode_header, encode_block, uniform_layer_offsets
from quiver.engine.errors import ChecksumMismatchError, DTypeMismatchError, IdentityMismatchError, ShapeMismatchError
from quiver.engine.guard import check_destination, check_header, expected_for, guard_envelope
from quiver.engine.keys import chain_keys, root_key
from quiver.engine.store import BlockStore
from quiver.tier.objectstore import LocalDirObjectStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from store_child import make_case, make_ident  # noqa: E402


def _envelope(ident, key, parent, payload, **over):
    fields = dict(fingerprint=ident.fingerprint, key=key, parent=parent, token_count=ident.block_tokens)
    fields.update(over)
    return encode_block(payload, **fields, layer_offsets=uniform_layer_offsets(ident.num_layers, payload.nbytes))


def test_header_matching_the_request_passes():
    ident, tokens, blocks = make_case(20, 2)
    keys = chain_keys(ident, tokens, 2)
    env = _envelope(ident, keys[1], keys[0], blocks[1])
    check_header(decode_header(env), expected_for(ident, keys[1], keys[0]))  # no exception
    guard_envelope(env, expected_for(ident, keys[1], keys[0]))
    # another codec (other flag bytes) for the same block: the fast compare
    # misses, the authoritative field compare accepts it
    zenv = _envelope(ident, keys[1], keys[0], blocks[1], codec="zstd", shuffle=True)
    guard_envelope(zenv, expected_for(ident, keys[1], keys[0]))


def test_damaged_header_is_a_checksum_error_not_bytes():
    ident, tokens, blocks = make_case(24, 1)
    keys = chain_keys(ident, tokens, 1)
    env = bytearray(_envelope(ident, keys[0], root_key(ident), blocks[0]))
    env[60] ^= 0x01  # inside the key field
    with pytest.raises(ChecksumMismatchError):
        guard_envelope(bytes(env), expected_for(ident, keys[0], root_key(ident)))


@pytest.mark.parametrize("field", ["fingerprint", "key", "parent", "token_count", "dtype", "shape"])
def test_each_header_field_mismatch_is_refused(field):
    ident, tokens, blocks = make_case(21, 2)
    keys = chain_keys(ident, tokens, 2)
    payload, over = blocks[1], {}
    if field == "fingerprint":
        over["fingerprint"] = make_ident(tenant="other").fingerprint
    elif field == "key":
        over["key"] = keys[0]
    elif field == "parent":
        over["parent"] = root_key(ident)
    elif field == "token_count":
        over["token_count"] = ident.block_tokens - 1
    elif field == "dtype":
        payload = payload.view(np.int8).reshape(*payload.shape[:-1], -1)[..., : payload.shape[-1]].copy()
    elif field == "shape":
        payload = payload.reshape(ident.num_layers, 2, ident.block_tokens, -1).copy()
    key, parent = over.pop("key", keys[1]), over.pop("parent", keys[0])
    env = _envelope(ident, key, parent, payload, **over)
    want = expected_for(ident, keys[1], keys[0])
    with pytest.raises(IdentityMismatchError) as ei:
        check_header(decode_header(env), want)
    assert {"fingerprint": "identity", "token_count": "token count"}.get(field, field) in str(ei.value)
    with pytest.raises(IdentityMismatchError):
        guard_envelope(env, want)  # the store's path: byte compare, then the same refusal


def test_lossy_envelope_of_another_block_is_a_mismatch_not_a_codec_error():
    """The guard's slow path parses an int8 header too: another block's lossy envelope is an
    IdentityMismatchError (a refusal), not a LossyCodecError (which the store treats as
    corruption and deletes).  Whether lossy bytes may be served is the codec check's call."""
    ident = make_ident(kv_quant="int8-channel")
    _, tokens, blocks = make_case(28, 2, ident)
    keys = chain_keys(ident, tokens, 2)
    env = _envelope(ident, keys[1], keys[0], blocks[1], codec="int8")
    guard_envelope(env, expected_for(ident, keys[1], keys[0]))  # its own block: accepted
    with pytest.raises(IdentityMismatchError, match="key"):
        guard_envelope(env, expected_for(ident, keys[0], root_key(ident)))
    exact = make_ident()  # an exact request that finds it: refused by the identity fields
    with pytest.raises(IdentityMismatchError, match="identity"):
        guard_envelope(env, expected_for(exact, keys[1], keys[0]))


def test_destination_checks():
    ident = make_ident()
    good = np.zeros((2, *ident.block_shape), np.float16)
    per_block = check_destination(good, ident, 2)
    assert len(per_block) == 2 and per_block[1].shape == ident.block_shape
    per_block[1][...] = 1  # a view: block 1's rows of the caller's array, made when asked
    assert good[1].all() and not good[0].any()
    with pytest.raises(IndexError):
        per_block[2]
    with pytest.raises(ShapeMismatchError):
        check_destination(good, ident, 3)
    with pytest.raises(DTypeMismatchError):
        check_destination(good.astype(np.float32), ident, 2)
    with pytest.raises(ShapeMismatchError):
        check_destination(np.zeros((2, *ident.block_shape), np.float16)[:, :, :, ::2], ident, 2)
    with pytest.raises(DTypeMismatchError):
        check_destination(b"\0" * good.nbytes, ident, 2)


def _plant_foreign(l2_dir, victim, tokens, n, foreign):
    """A foreign writer puts its own (validly enveloped) blocks under the victim's keys."""
    objs = LocalDirObjectStore(l2_dir)
    vkeys = chain_keys(victim, tokens, n)
    fkeys = chain_keys(foreign, tokens, n)
    marker = np.full(victim.block_shape, 7.0, np.float16)
    for i in range(n):
        env = _envelope(foreign, fkeys[i], fkeys[i - 1] if i else root_key(foreign), marker)
        assert objs.put(victim.namespace + vkeys[i], env)
    objs.close()
    return marker


def test_guarded_store_refuses_a_planted_foreign_block(tmp_path):
    victim = make_ident(tenant="victim")
    foreign = dataclasses.replace(victim, tenant="attacker")
    _, tokens, _ = make_case(22, 2, victim)
    l2 = tmp_path / "l2"
    marker = _plant_foreign(l2, victim, tokens, 2, foreign)
    with BlockStore.open(tmp_path / "s", object_store=l2, ram_bytes=1 << 20, index="flat") as store:
        assert store.lookup(victim, tokens) == 2  # the objects exist under the victim's keys...
        out = np.zeros((2, *victim.block_shape), np.float16)
        with pytest.raises(IdentityMismatchError):
            store.get(victim, tokens, 2, out=out)  # ...but are never served
        assert not out.any()  # not one byte copied out
        st = store.stats()
        assert st["counters"]["identity_mismatches"] == 1 and st["counters"]["l2_hits"] == 0
        assert st["residency"]["l0"] == 0 and st["residency"]["l1"] == 0  # nor promoted
    with BlockStore.open(tmp_path / "u", object_store=l2, ram_bytes=1 << 20, index="flat", guard=False) as store:
        got = store.get(victim, tokens, 2)  # what the guard prevents: the attacker's bytes
        assert got.tobytes() == np.stack([marker, marker]).tobytes()


def test_naive_mode_serves_another_identity_and_the_keyed_store_does_not(tmp_path):
    a, b = make_ident(tenant="a"), make_ident(tenant="b", adapter="lora-x", adapter_revision="1")
    _, tokens, blocks_a = make_case(23, 2, a)
    with BlockStore.open(tmp_path / "naive", naive=True, ram_bytes=1 << 20, index="flat") as store:
        assert not store.guard
        store.put(a, tokens, blocks_a)
        assert store.lookup(b, tokens) == 2  # same tokens, another identity: a "hit"
        assert store.get(b, tokens, 2).tobytes() == blocks_a.tobytes()  # A's bytes served to B
    with BlockStore.open(tmp_path / "safe", ram_bytes=1 << 20, index="flat") as store:
        store.put(a, tokens, blocks_a)
        assert store.lookup(b, tokens) == 0
