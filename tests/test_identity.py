"""CacheIdentity: strict validation, canonical encoding, fingerprint."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quiver.engine.errors import InvalidIdentityError, QuiverError
from quiver.engine.identity import (
    ENCODING_MAGIC,
    KV_DTYPES,
    MAX_STR_BYTES,
    CacheIdentity,
)

BASE = dict(
    model="meta-llama/Llama-3.1-8B",
    model_revision="0e9e39f",
    tokenizer="llama3",
    tokenizer_revision="0e9e39f",
    adapter=None,
    tenant="acme",
    kv_dtype="float16",
    block_tokens=16,
    num_layers=32,
    num_kv_heads=8,
    head_dim=128,
)


def make(**over) -> CacheIdentity:
    return CacheIdentity(**{**BASE, **over})


def test_design_example_constructs_as_written():
    ident = CacheIdentity(model="meta-llama/Llama-3.1-8B", model_revision="0e9e39f",
                          tokenizer="llama3", tokenizer_revision="0e9e39f",
                          adapter=None, tenant="acme", kv_dtype="float16",
                          block_tokens=16, num_layers=32, num_kv_heads=8, head_dim=128)
    assert ident.adapter_revision is None and ident.kv_quant is None
    assert (ident.tp_rank, ident.tp_size, ident.pp_rank, ident.pp_size) == (0, 1, 0, 1)
    assert ident.block_shape == (32, 2, 16, 8, 128)
    assert ident.block_nbytes == 32 * 2 * 16 * 8 * 128 * 2


def test_block_nbytes_follows_dtype():
    for dtype, size in KV_DTYPES.items():
        assert make(kv_dtype=dtype).block_nbytes == 32 * 2 * 16 * 8 * 128 * size


def test_frozen():
    ident = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.tenant = "other"  # type: ignore[misc]


def test_encoding_layout():
    """Magic, version, then per field: tag, u32 LE length, bytes (None -> 0xFFFFFFFF, no bytes)."""
    enc = make().encode()
    assert enc[:4] == ENCODING_MAGIC and enc[4] == 1
    pos, tags, values = 5, [], {}
    while pos < len(enc):
        tag, length = struct.unpack_from("<BI", enc, pos)
        pos += 5
        if length == 0xFFFFFFFF:
            values[tag] = None
        else:
            values[tag] = enc[pos : pos + length]
            pos += length
        tags.append(tag)
    assert pos == len(enc)
    assert tags == list(range(1, 18))
    assert values[1] == b"meta-llama/Llama-3.1-8B"
    assert values[5] is None and values[6] is None and values[9] is None
    assert values[10] == struct.pack("<Q", 16)


def test_fingerprint_and_namespace():
    import blake3

    ident = make()
    assert ident.fingerprint == blake3.blake3(ident.encode()).digest()
    assert len(ident.fingerprint) == 32
    assert ident.namespace == ident.fingerprint[:16]
    assert make().fingerprint == ident.fingerprint  # deterministic across instances


# One alternative value per field; each must change the encoding and fingerprint.
ALTERNATIVES = dict(
    model="meta-llama/Llama-3.1-70B",
    model_revision="1111111",
    tokenizer="llama3-instruct",
    tokenizer_revision="2222222",
    tenant="globex",
    kv_dtype="bfloat16",
    kv_quant="int8-per-channel",
    block_tokens=32,
    num_layers=80,
    num_kv_heads=16,
    head_dim=64,
    tp_size=2,
    pp_size=4,
)


def test_every_field_changes_the_fingerprint():
    base = make()
    seen = {base.fingerprint}
    variants = [make(**{k: v}) for k, v in ALTERNATIVES.items()]
    variants.append(make(adapter="sql-lora", adapter_revision="r1"))
    variants.append(make(adapter="sql-lora", adapter_revision="r2"))
    variants.append(make(tp_size=2, tp_rank=1))
    variants.append(make(pp_size=4, pp_rank=3))
    for v in variants:
        assert v != base
        seen.add(v.fingerprint)
    assert len(seen) == len(variants) + 1
    # Every encoded field was varied at least once.
    from quiver.engine.identity import _FIELDS

    varied = set(ALTERNATIVES) | {"adapter", "adapter_revision", "tp_rank", "pp_rank"}
    assert varied == {name for _t, name, _k in _FIELDS}


def test_tenant_secret_outside_encoding_repr_and_equality():
    secret = b"s" * 32
    keyed = make(tenant_secret=secret)
    assert keyed.encode() == make().encode()
    assert keyed.fingerprint == make().fingerprint
    assert keyed == make()
    assert "tenant_secret" not in repr(keyed) and repr(secret) not in repr(keyed)
    assert "tenant_secret" not in keyed.to_dict()


def test_none_is_not_empty_and_fields_do_not_bleed():
    # Moving characters across a field boundary must change the encoding.
    a = make(model="ab", model_revision="c")
    b = make(model="a", model_revision="bc")
    assert a.encode() != b.encode()
    # An adapter named like the tenant is not the same as no adapter.
    c = make(adapter="acme", adapter_revision="acme")
    assert c.encode() != make().encode()


def test_from_dict_roundtrip_and_refusals():
    ident = make(adapter="lora", adapter_revision="v2", kv_quant="int8-per-channel")
    assert CacheIdentity.from_dict(ident.to_dict()) == ident
    with pytest.raises(InvalidIdentityError, match="unknown field.*colour"):
        CacheIdentity.from_dict({**BASE, "colour": "red"})
    d = dict(BASE)
    del d["tenant"]
    with pytest.raises(InvalidIdentityError, match="missing field.*tenant"):
        CacheIdentity.from_dict(d)
    with pytest.raises(InvalidIdentityError, match="missing field.*tenant"):
        CacheIdentity(**d)
    with pytest.raises(InvalidIdentityError, match="mapping"):
        CacheIdentity.from_dict([("model", "x")])  # type: ignore[arg-type]
    keyed = CacheIdentity.from_dict({**BASE, "tenant_secret": b"k" * 16})
    assert keyed.tenant_secret == b"k" * 16


BAD = [
    ("model", "", "empty"),
    ("model", 123, "str"),
    ("model", None, "str"),
    ("model", b"bytes", "str"),
    ("model_revision", "abc\x00", "control"),
    ("tokenizer", "llama\n3", "control"),
    ("tokenizer_revision", "x\x7f", "control"),
    ("tenant", " acme", "whitespace"),
    ("tenant", "acme\t", "whitespace"),
    ("tenant", "e\u0301", "NFC"),
    ("tenant", "\ud800", "surrogate"),
    ("tenant", "x" * (MAX_STR_BYTES + 1), "longer"),
    ("kv_dtype", "float64", "not one of"),
    ("kv_dtype", "FLOAT16", "not one of"),
    ("kv_quant", "", "empty"),
    ("block_tokens", True, "int"),
    ("block_tokens", 16.0, "int"),
    ("block_tokens", "16", "int"),
    ("block_tokens", 0, "must be in"),
    ("block_tokens", -16, "must be in"),
    ("block_tokens", 1 << 17, "must be in"),
    ("num_layers", False, "int"),
    ("num_layers", 0, "must be in"),
    ("num_kv_heads", 1 << 13, "must be in"),
    ("head_dim", 1 << 15, "must be in"),
    ("tp_size", 0, "must be in"),
    ("tp_rank", -1, "must be in"),
    ("tp_rank", 1, "tp_size"),
    ("pp_rank", 2, "pp_size"),
    ("tenant_secret", "a-string-secret-of-enough-len", "bytes"),
    ("tenant_secret", b"short", "bytes"),
    ("tenant_secret", bytearray(32), "bytes"),
]


@pytest.mark.parametrize("name,value,why", BAD, ids=[f"{n}-{i}" for i, (n, _v, _w) in enumerate(BAD)])
def test_validation_errors_are_typed_and_name_the_field(name, value, why):
    with pytest.raises(InvalidIdentityError, match=why) as info:
        make(**{name: value})
    assert isinstance(info.value, QuiverError)
    assert f"CacheIdentity.{name}" in str(info.value)


def test_half_specified_adapter_refused():
    with pytest.raises(InvalidIdentityError, match="adapter_revision"):
        make(adapter="sql-lora")
    with pytest.raises(InvalidIdentityError, match="adapter_revision"):
        make(adapter_revision="r1")
    assert make(adapter="sql-lora", adapter_revision="r1").adapter == "sql-lora"


def test_absurd_block_size_refused():
    with pytest.raises(InvalidIdentityError, match="exceeds"):
        make(block_tokens=1 << 16, num_layers=1 << 12, num_kv_heads=8, head_dim=128)


def test_non_ascii_names_accepted():
    ident = make(tenant="société-générale", model="örg/modèl")
    assert "société".encode() in ident.encode()


# --- property: encodings are equal exactly when identities are equal ----------------
# Small alphabets make near-collisions (shared prefixes, shifted boundaries) likely.
_names = st.sampled_from(["a", "b", "ab", "ba", "a/b", "é", "aa"])
_opt_names = st.one_of(st.none(), _names)


@st.composite
def identities(draw):
    adapter = draw(_opt_names)
    tp_size = draw(st.sampled_from([1, 2, 256]))
    pp_size = draw(st.sampled_from([1, 2]))
    return CacheIdentity(
        model=draw(_names),
        model_revision=draw(_names),
        tokenizer=draw(_names),
        tokenizer_revision=draw(_names),
        adapter=adapter,
        adapter_revision=None if adapter is None else draw(_names),
        tenant=draw(_names),
        kv_dtype=draw(st.sampled_from(sorted(KV_DTYPES))),
        kv_quant=draw(_opt_names),
        block_tokens=draw(st.sampled_from([1, 16, 256])),
        num_layers=draw(st.sampled_from([1, 16, 256])),
        num_kv_heads=draw(st.sampled_from([1, 8])),
        head_dim=draw(st.sampled_from([1, 128])),
        tp_rank=draw(st.integers(0, tp_size - 1)),
        tp_size=tp_size,
        pp_rank=draw(st.integers(0, pp_size - 1)),
        pp_size=pp_size,
    )


@settings(max_examples=300, deadline=None)
@given(identities(), identities())
def test_encoding_is_injective(a, b):
    assert (a.encode() == b.encode()) == (a == b)
    assert (a.fingerprint == b.fingerprint) == (a == b)


@settings(max_examples=100, deadline=None)
@given(identities())
def test_dict_roundtrip_preserves_encoding(a):
    assert CacheIdentity.from_dict(a.to_dict()).encode() == a.encode()
