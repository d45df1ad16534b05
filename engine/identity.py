"""CacheIdentity: everything that makes a KV block's bytes valid.

Two requests may share a cached block only if every field here is equal, so the
identity is validated strictly (a typo must not silently become a new, empty
cache, and a malformed value must not alias another identity) and is encoded
canonically: tagged, length-prefixed fields in a fixed order, so no field can
bleed into its neighbour.  The BLAKE3 fingerprint of that encoding is what the
block envelope header and the chain keys carry.  docs/IDENTITY.md gives the
byte layout.

``tenant_secret`` is deliberately outside the encoding, the fingerprint,
equality and repr: it changes who can *compute* a tenant's keys (keyed chain
mode, see :mod:`engine.keys`), not what the KV bytes mean.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

import blake3

from quiver.engine.errors import InvalidIdentityError

# KV element types and their sizes in bytes: the one place the allowed set lives.
KV_DTYPES: Mapping[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1}

ENCODING_MAGIC = b"QVID"
ENCODING_VERSION = 1
NONE_LENGTH = 0xFFFFFFFF  # length field of an absent (None) value; "" would be 0.

MAX_STR_BYTES = 1024
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
# Upper bounds on the shape: far above any real model, low enough that a
# garbage value (a token count passed as head_dim, say) is refused.
MAX_BLOCK_TOKENS = 1 << 16
MAX_NUM_LAYERS = 1 << 12
MAX_NUM_KV_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 14
MAX_PARALLEL = 1 << 16
MAX_BLOCK_NBYTES = 1 << 31

# (tag, name, kind) in encoding order.  Tags are never reused or renumbered:
# adding a field means a new tag and a new ENCODING_VERSION.
_STR, _OPT_STR, _INT = "str", "opt_str", "int"
_FIELDS: tuple[tuple[int, str, str], ...] = (
    (1, "model", _STR),
    (2, "model_revision", _STR),
    (3, "tokenizer", _STR),
    (4, "tokenizer_revision", _STR),
    (5, "adapter", _OPT_STR),
    (6, "adapter_revision", _OPT_STR),
    (7, "tenant", _STR),
    (8, "kv_dtype", _STR),
    (9, "kv_quant", _OPT_STR),
    (10, "block_tokens", _INT),
    (11, "num_layers", _INT),
    (12, "num_kv_heads", _INT),
    (13, "head_dim", _INT),
    (14, "tp_rank", _INT),
    (15, "tp_size", _INT),
    (16, "pp_rank", _INT),
    (17, "pp_size", _INT),
)
_INT_BOUNDS = {
    "block_tokens": (1, MAX_BLOCK_TOKENS),
    "num_layers": (1, MAX_NUM_LAYERS),
    "num_kv_heads": (1, MAX_NUM_KV_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "tp_rank": (0, MAX_PARALLEL - 1),
    "tp_size": (1, MAX_PARALLEL),
    "pp_rank": (0, MAX_PARALLEL - 1),
    "pp_size": (1, MAX_PARALLEL),
}


class _Required:
    """Default of a required field, so a missing one is a typed error, not TypeError."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()


def _bad(name: str, why: str) -> InvalidIdentityError:
    return InvalidIdentityError(f"CacheIdentity.{name}: {why}")


def _check_str(name: str, value: Any) -> None:
    """Refuse what would make two spellings of one identity (or garbage) look valid."""
    if not isinstance(value, str):
        raise _bad(name, f"must be a str, got {type(value).__name__}")
    if not value:
        raise _bad(name, "must not be empty")
    if value != value.strip():
        raise _bad(name, f"has leading or trailing whitespace: {value!r}")
    for ch in value:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs"):
            raise _bad(name, f"contains a control or surrogate character {ch!r}")
    if unicodedata.normalize("NFC", value) != value:
        raise _bad(name, "must be in Unicode NFC form")
    if len(value.encode("utf-8")) > MAX_STR_BYTES:
        raise _bad(name, f"longer than {MAX_STR_BYTES} UTF-8 bytes")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an int, got {type(value).__name__}")
    lo, hi = _INT_BOUNDS[name]
    if not lo <= value <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {value}")


@dataclass(frozen=True, kw_only=True)
class CacheIdentity:
    """What a KV block was computed under; equal identities may share blocks.

    Equality, hashing and :meth:`encode` cover every field except
    ``tenant_secret``.
    """

    model: str = REQUIRED
    model_revision: str = REQUIRED
    tokenizer: str = REQUIRED
    tokenizer_revision: str = REQUIRED
    adapter: str | None = None
    adapter_revision: str | None = None
    tenant: str = REQUIRED
    kv_dtype: str = REQUIRED
    kv_quant: str | None = None
    block_tokens: int = REQUIRED
    num_layers: int = REQUIRED
    num_kv_heads: int = REQUIRED
    head_dim: int = REQUIRED
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tenant_secret: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is REQUIRED]
        if missing:
            raise InvalidIdentityError(f"CacheIdentity: missing field(s) {missing}")
        for _tag, name, kind in _FIELDS:
            value = getattr(self, name)
            if kind == _INT:
                _check_int(name, value)
            elif kind == _STR or value is not None:
                _check_str(name, value)
        if (self.adapter is None) != (self.adapter_revision is None):
            raise _bad(
                "adapter_revision",
                "adapter and adapter_revision must be given together (both or neither)",
            )
        if self.kv_dtype not in KV_DTYPES:
            raise _bad("kv_dtype", f"{self.kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
        if self.tp_rank >= self.tp_size:
            raise _bad("tp_rank", f"{self.tp_rank} must be < tp_size {self.tp_size}")
        if self.pp_rank >= self.pp_size:
            raise _bad("pp_rank", f"{self.pp_rank} must be < pp_size {self.pp_size}")
        if self.block_nbytes > MAX_BLOCK_NBYTES:
            raise _bad("block_tokens", f"block of {self.block_nbytes} bytes exceeds {MAX_BLOCK_NBYTES}")
        secret = self.tenant_secret
        if secret is not None:
            if not isinstance(secret, bytes):
                raise _bad("tenant_secret", f"must be bytes or None, got {type(secret).__name__}")
            if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
                raise _bad(
                    "tenant_secret",
                    f"must be {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes, got {len(secret)}",
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheIdentity":
        """Build from a mapping (config file, JSON); unknown or missing fields are refused."""
        if not isinstance(d, Mapping):
            raise InvalidIdentityError(f"CacheIdentity.from_dict: expected a mapping, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise InvalidIdentityError(f"CacheIdentity: unknown field(s) {unknown}")
        missing = sorted(
            name
            for name, f in known.items()
            if name not in d and f.default is REQUIRED
        )
        if missing:
            raise InvalidIdentityError(f"CacheIdentity: missing field(s) {missing}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The encoded fields as a plain dict (without ``tenant_secret``)."""
        return {name: getattr(self, name) for _tag, name, _kind in _FIELDS}

    def encode(self) -> bytes:
        """Canonical bytes: magic, version, then (tag u8, length u32 LE, value) per field."""
        return self._encoding

    @cached_property
    def _encoding(self) -> bytes:
        parts = [ENCODING_MAGIC, bytes([ENCODING_VERSION])]
        for tag, name, kind in _FIELDS:
            value = getattr(self, name)
            if value is None:
                parts.append(struct.pack("<BI", tag, NONE_LENGTH))
                continue
            raw = struct.pack("<Q", value) if kind == _INT else value.encode("utf-8")
            parts.append(struct.pack("<BI", tag, len(raw)))
            parts.append(raw)
        return b"".join(parts)

    @cached_property
    def fingerprint(self) -> bytes:
        """BLAKE3 of :meth:`encode`, 32 bytes: carried in every block header."""
        return blake3.blake3(self._encoding).digest()

    @property
    def namespace(self) -> bytes:
        """First 16 bytes of the fingerprint: the residency-index key prefix."""
        return self.fingerprint[:16]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block's payload: [layers, K/V, tokens, kv heads, head dim]."""
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return KV_DTYPES[self.kv_dtype]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block's raw payload."""
        return math.prod(self.block_shape) * self.itemsize
