"""Chain keys: the key rule, isolation between identities, keyed mode, golden vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quiver.engine.errors import InvalidIdentityError, InvalidTokensError
from quiver.engine.identity import CacheIdentity
from quiver.engine.keys import (
    ROOT_DOMAIN,
    TENANT_KEY_CONTEXT,
    chain_hash_key,
    chain_keys,
    parent_of,
    root_key,
    tokens_to_le_u32,
)

BASE = dict(
    model="meta-llama/Llama-3.1-8B",
    model_revision="0e9e39f",
    tokenizer="llama3",
    tokenizer_revision="0e9e39f",
    adapter=None,
    tenant="acme",
    kv_dtype="float16",
    block_tokens=4,
    num_layers=32,
    num_kv_heads=8,
    head_dim=128,
)
SECRET = bytes(range(32))


def make(**over) -> CacheIdentity:
    return CacheIdentity(**{**BASE, **over})


TOKENS = [(i * 7919 + 13) % 128_256 for i in range(64)]  # 16 full blocks of 4


def reference_chain(ident: CacheIdentity, tokens) -> list[bytes]:
    """The key rule written out the slow, obvious way."""
    key = None
    if ident.tenant_secret is not None:
        key = blake3.blake3(ident.tenant_secret, derive_key_context=TENANT_KEY_CONTEXT).digest()

    def h(data: bytes) -> bytes:
        return (blake3.blake3(data) if key is None else blake3.blake3(data, key=key)).digest()

    prev = h(b"quiver/v1/root" + ident.fingerprint)
    out = []
    bt = ident.block_tokens
    for i in range(len(tokens) // bt):
        block = b"".join(int(t).to_bytes(4, "little") for t in tokens[i * bt : (i + 1) * bt])
        prev = h(prev + block)
        out.append(prev)
    return out


def test_matches_reference_rule_unkeyed_and_keyed():
    for ident in (make(), make(tenant_secret=SECRET)):
        keys = chain_keys(ident, TOKENS)
        assert keys == reference_chain(ident, TOKENS)
        assert len(keys) == 16 and all(len(k) == 32 for k in keys)


def test_root_key_rule():
    ident = make()
    assert root_key(ident) == blake3.blake3(ROOT_DOMAIN + ident.fingerprint).digest()
    assert chain_hash_key(ident) is None
    keyed = make(tenant_secret=SECRET)
    assert len(chain_hash_key(keyed)) == 32
    assert root_key(keyed) != root_key(ident)


def test_parent_of():
    ident = make()
    keys = chain_keys(ident, TOKENS)
    assert parent_of(ident, keys, 0) == root_key(ident)
    assert parent_of(ident, keys, 5) == keys[4]
    # A block's key is its parent's key hashed with its tokens.
    block5 = np.asarray(TOKENS[20:24], dtype="<u4").tobytes()
    assert blake3.blake3(parent_of(ident, keys, 5) + block5).digest() == keys[5]
    for bad in (-1, 16, True, 1.0):
        with pytest.raises(InvalidTokensError):
            parent_of(ident, keys, bad)


def test_input_types_agree():
    ident = make()
    expected = chain_keys(ident, TOKENS)
    assert chain_keys(ident, tuple(TOKENS)) == expected
    for dtype in (np.int64, np.uint32, np.int32, ">u4", np.uint64):
        assert chain_keys(ident, np.asarray(TOKENS, dtype=dtype)) == expected
    assert chain_keys(ident, range(8)) == chain_keys(ident, list(range(8)))


def test_torch_tensor_accepted():
    torch = pytest.importorskip("torch")
    ident = make()
    assert chain_keys(ident, torch.tensor(TOKENS, dtype=torch.int64)) == chain_keys(ident, TOKENS)


def test_partial_trailing_block_ignored_and_n_blocks():
    ident = make()
    full = chain_keys(ident, TOKENS)
    assert chain_keys(ident, TOKENS + [1, 2, 3]) == full
    assert chain_keys(ident, TOKENS[:3]) == []
    assert chain_keys(ident, []) == []
    assert chain_keys(ident, TOKENS, n_blocks=5) == full[:5]
    assert chain_keys(ident, TOKENS, n_blocks=0) == []
    for bad in (17, -1, True, 2.0, "3"):
        with pytest.raises(InvalidTokensError):
            chain_keys(ident, TOKENS, n_blocks=bad)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=80),
    st.integers(0, 80),
)
def test_prefix_of_tokens_gives_prefix_of_keys(tokens, cut):
    ident = make()
    keys = chain_keys(ident, tokens)
    assert len(keys) == len(tokens) // 4
    assert chain_keys(ident, tokens[:cut]) == keys[: min(cut, len(tokens)) // 4]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=8), st.integers(0, 7), st.integers(0, 2**32 - 1))
def test_changing_one_token_changes_its_block_and_all_later(tokens, pos, new):
    if tokens[pos] == new:
        new = (new + 1) % 2**32
    ident = make()
    a = chain_keys(ident, tokens)
    changed = list(tokens)
    changed[pos] = new
    b = chain_keys(ident, changed)
    first = pos // 4
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:]))


def test_same_tokens_disjoint_keys_across_identities():
    variants = [
        make(),
        make(tenant="globex"),
        make(adapter="sql-lora", adapter_revision="r1"),
        make(adapter="sql-lora", adapter_revision="r2"),
        make(model_revision="1111111"),
        make(tokenizer_revision="2222222"),
        make(kv_quant="int8-per-channel"),
        make(tp_size=2, tp_rank=1),
    ]
    sets = [set(chain_keys(v, TOKENS)) for v in variants]
    assert all(len(s) == 16 for s in sets)
    union = set().union(*sets)
    assert len(union) == 16 * len(variants)


def test_keyed_chain_differs_from_unkeyed_and_per_secret():
    plain = set(chain_keys(make(), TOKENS))
    k1 = set(chain_keys(make(tenant_secret=SECRET), TOKENS))
    k2 = set(chain_keys(make(tenant_secret=SECRET[::-1]), TOKENS))
    assert not (plain & k1) and not (plain & k2) and not (k1 & k2)
    # Same secret, same keys: keyed mode is still a pure function.
    assert chain_keys(make(tenant_secret=bytes(SECRET)), TOKENS) == chain_keys(make(tenant_secret=SECRET), TOKENS)


def test_derived_keys_are_kept_per_instance_not_per_equal_identity():
    """Equal identities (equality ignores the secret) with other secrets, each
    keyed twice: the keys kept on the first never serve the second."""
    a, b = make(tenant_secret=SECRET), make(tenant_secret=SECRET[::-1])
    assert a == b and hash(a) == hash(b)
    first = [chain_keys(a, TOKENS), chain_keys(b, TOKENS)]
    assert first[0] != first[1]
    assert [chain_keys(a, TOKENS), chain_keys(b, TOKENS)] == first
    assert root_key(a) != root_key(b) and chain_hash_key(a) != chain_hash_key(b)


@pytest.mark.parametrize(
    "tokens",
    [
        [0, 1, 2, 2**32],
        [-1, 0, 0, 0],
        [2**70, 0, 0, 0],
        [-1, 2**64 - 1, 0, 0],
        [1.0, 2.0, 3.0, 4.0],
        np.asarray([True, False, True, False]),
        (1, 2, 3, "4"),
        [1, None, 2, 3],
        [[1, 2], [3, 4]],
        [[1, 2], [3]],
        "abcd",
        b"abcd",
        np.zeros((2, 4), dtype=np.int64),
        np.asarray([0, 1, 2, 2**32], dtype=np.int64),
        np.asarray([1.5, 2, 3, 4]),
        np.asarray([2**70, 0, 0, 0], dtype=object),
    ],
    ids=lambda t: type(t).__name__,
)
def test_bad_tokens_are_typed(tokens):
    with pytest.raises(InvalidTokensError):
        chain_keys(make(), tokens)


def test_bad_identity_is_typed():
    with pytest.raises(InvalidIdentityError):
        chain_keys(BASE, TOKENS)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentityError):
        root_key(None)  # type: ignore[arg-type]


def test_tokens_to_le_u32_is_little_endian():
    assert tokens_to_le_u32([1, 0x01020304]) == b"\x01\x00\x00\x00\x04\x03\x02\x01"
    assert tokens_to_le_u32(np.asarray([1], dtype=">u4")) == b"\x01\x00\x00\x00"


def test_long_prompt_matches_reference_tail():
    ident = make(block_tokens=16)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 2**32, size=16 * 1000, dtype=np.uint64)
    keys = chain_keys(ident, tokens)
    assert len(keys) == 1000
    # Check the last block against the rule applied to the key before it.
    last = blake3.blake3(keys[-2] + tokens[-16:].astype("<u4").tobytes()).digest()
    assert keys[-1] == last


# --- golden vectors: a format change must be noticed ---------------------------------

GOLDEN = Path(__file__).parent / "golden" / "keys_v1.json"
GOLDEN_TOKENS = [[], [0, 1, 2, 3, 4, 5, 6, 7], [128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13, 4294967295]]


def golden_identities() -> dict[str, CacheIdentity]:
    return {
        "design-example-bt4": make(),
        "adapter-quant-tp": make(
            adapter="sql-lora", adapter_revision="r1", kv_quant="int8-per-channel",
            kv_dtype="int8", tp_rank=1, tp_size=2, pp_rank=0, pp_size=2,
        ),
        "unicode-tenant": make(tenant="société-générale", kv_dtype="bfloat16", block_tokens=2),
        "keyed-tenant": make(tenant_secret=SECRET),
    }


def compute_golden() -> dict:
    out = {}
    for name, ident in golden_identities().items():
        out[name] = {
            "identity": ident.to_dict(),
            "tenant_secret_hex": None if ident.tenant_secret is None else ident.tenant_secret.hex(),
            "encoding_hex": ident.encode().hex(),
            "fingerprint_hex": ident.fingerprint.hex(),
            "root_key_hex": root_key(ident).hex(),
            "chains": [
                {"tokens": toks, "keys_hex": [k.hex() for k in chain_keys(ident, toks)]}
                for toks in GOLDEN_TOKENS
            ],
        }
    return out


def regen_golden() -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(compute_golden(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def test_golden_vectors():
    if os.environ.get("QUIVER_REGEN_GOLDEN") == "1":
        regen_golden()
    stored = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert stored == compute_golden()
    # The stored identities still decode to the same encodings (from_dict path).
    for entry in stored.values():
        secret = entry["tenant_secret_hex"]
        ident = CacheIdentity.from_dict(
            {**entry["identity"], "tenant_secret": None if secret is None else bytes.fromhex(secret)}
        )
        assert ident.encode().hex() == entry["encoding_hex"]
        assert [k.hex() for k in chain_keys(ident, entry["chains"][-1]["tokens"])] == entry["chains"][-1]["keys_hex"]
