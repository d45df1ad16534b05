"""Quiver's public API: what an inference engine imports.

``engine`` owns the cache identity (:class:`CacheIdentity`, its canonical
encoding and BLAKE3 fingerprint), the chain keys that name KV blocks, the block
envelope (header + body + CRC32C) with its codecs, the identity guard, the
:class:`BlockStore` facade over the tiers, and the typed errors
(:mod:`engine.errors`, one base class :class:`QuiverError`).  The torch
copy-in/out (:mod:`engine.torch_io`), the layerwise loader
(:mod:`engine.layerwise`) and the int8 codec (:mod:`engine.quant`) are imported
from their modules, so ``import engine`` does not need torch.
"""

from quiver.engine.envelope import (
    EnvelopeHeader,
    decode_block,
    decode_block_into,
    decode_header,
    encode_block,
    uniform_layer_offsets,
    verify_layer,
)
from quiver.engine.errors import (
    BlockNotFoundError,
    BlockTableError,
    ChecksumMismatchError,
    DTypeMismatchError,
    EnvelopeError,
    IdentityMismatchError,
    InvalidIdentityError,
    InvalidTokensError,
    LossyCodecError,
    ObjectStoreAuthError,
    ObjectStoreRequestError,
    ObjectStoreUnreachableError,
    QuiverError,
    ShapeMismatchError,
    StoreClosedError,
    StoreConfigError,
    StoreIOError,
    StoreLockedError,
)
from quiver.engine.identity import KV_DTYPES, CacheIdentity
from quiver.engine.keys import chain_keys, parent_of, root_key
from quiver.engine.store import BlockStore

__all__ = [
    "BlockStore",
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
    "verify_layer",
    "QuiverError",
    "InvalidIdentityError",
    "InvalidTokensError",
    "IdentityMismatchError",
    "ShapeMismatchError",
    "DTypeMismatchError",
    "BlockTableError",
    "EnvelopeError",
    "ChecksumMismatchError",
    "LossyCodecError",
    "BlockNotFoundError",
    "StoreLockedError",
    "StoreClosedError",
    "StoreConfigError",
    "StoreIOError",
    "ObjectStoreUnreachableError",
    "ObjectStoreAuthError",
    "ObjectStoreRequestError",
]
