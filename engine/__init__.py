"""Quiver's public API: what an inference engine imports.

``engine`` owns the cache identity (:class:`CacheIdentity`, its canonical
encoding and BLAKE3 fingerprint), the chain keys that name KV blocks, the block
envelope (header + body + CRC32C) with its codecs, and the typed errors
(:mod:`engine.errors`).  The BlockStore facade, identity guard and torch
copy-in/out join it in later work; nothing here is a stub.
"""

from engine.envelope import (
    EnvelopeHeader,
    decode_block,
    decode_block_into,
    decode_header,
    encode_block,
    uniform_layer_offsets,
)
from engine.errors import InvalidTokensError, QuiverError
from engine.identity import KV_DTYPES, CacheIdentity
from engine.keys import chain_keys, parent_of, root_key

__all__ = [
    "CacheIdentity",
    "KV_DTYPES",
    "chain_keys",
    "parent_of",
    "root_key",
    "EnvelopeHeader",
    "encode_block",
    "decode_header",
    "decode_block",
    "decode_block_into",
    "uniform_layer_offsets",
    "QuiverError",
    "InvalidTokensError",
]
