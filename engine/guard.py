"""The identity guard: a stored block is served only to the request it was made for.

A block's key already binds it to an identity (the chain root hashes the
identity fingerprint), so in a correct store a key lookup can only find the
right bytes.  The guard does not trust that: before any payload byte reaches a
caller, the envelope header read from the tier is compared with what the
request expects -- identity fingerprint, block key, parent key, token count,
dtype and shape.  Any difference raises :class:`IdentityMismatchError` and no
byte is copied out.  It is defence in depth against a truncated or colliding
hash, an index that points at the wrong object, and a foreign writer on a
shared bucket (anyone who can write to the bucket can put any bytes under any
name; only the header, covered by its own CRC, says what they are).

The destination check runs before anything is read: a caller's ``out`` array
must have the shape ``[n, *identity.block_shape]`` and a dtype that can hold
the identity's ``kv_dtype``.

Fast path: the request's expectation is packed once into the header's own
byte layout (byte 7 and bytes 16..144 of docs/FORMAT.md: dtype code,
fingerprint, key, parent, token count, ndim, reserved zeros, shape), and a
stored header is accepted by comparing those bytes -- no parse.  The comparison runs before the
envelope's CRC32C is verified, which is safe: ``decode_block_into`` checks
the header's CRC (and, unless the body was verified on its way into the tier,
the CRC over header and body) before one payload byte is copied, so a header
that matched here and is damaged is still refused.  Only when the bytes differ
is the header parsed (``decode_header``, which checks the header CRC: damage is
reported as a checksum error) and compared field by field for the error
message.  ``studies/bench_identity.py`` measures the cost (a full parse per
block cost ~10 % of a 512 KiB RAM hit; the byte compare is what meets the 1 %
goal).
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from quiver.engine import envelope as _envelope
from quiver.engine.envelope import EnvelopeHeader, decode_header
from quiver.engine.errors import DTypeMismatchError, IdentityMismatchError, ShapeMismatchError
from quiver.engine.identity import CacheIdentity

#: numpy dtypes that carry each kv dtype (bfloat16 travels as a 2-byte integer view).
CARRIERS: dict[str, tuple[np.dtype, ...]] = {
    "float16": (np.dtype("float16"),),
    "bfloat16": (np.dtype("uint16"), np.dtype("int16")),
    "float32": (np.dtype("float32"),),
    "int8": (np.dtype("int8"),),
}


# Where the guarded fields sit in the envelope header (docs/FORMAT.md): the
# dtype code at byte 7, and bytes 16..144 = fingerprint, key, parent (3 x 32),
# token_count u32, ndim u8, 3 reserved zero bytes, shape 6 x u32.  Checked
# against the envelope's struct at import, so a format change cannot silently
# make the fast path compare the wrong bytes.
_DTYPE_AT = 7
_REGION_AT, _REGION_END = 16, 144
assert _envelope._FIXED.format == "<4sHBBII32s32s32sIB3s6IQQII", "envelope header layout changed"
assert struct.calcsize("<4sHB") == _DTYPE_AT and struct.calcsize("<4sHBBII") == _REGION_AT
assert struct.calcsize("<4sHBBII32s32s32sIB3s6I") == _REGION_END


class Expected:
    """What the request says a block must be (and the same, as header bytes).

    A plain slotted class built once per block of a get: the constant part of
    the header bytes (token count, ndim, shape) is packed once per identity."""

    __slots__ = ("fingerprint", "key", "parent", "token_count", "dtype", "shape", "region", "dtype_code")

    def __init__(self, fingerprint: bytes, key: bytes, parent: bytes, token_count: int, dtype: str,
                 shape: tuple[int, ...]) -> None:
        self.fingerprint, self.key, self.parent = fingerprint, key, parent
        self.token_count, self.dtype, self.shape = token_count, dtype, tuple(shape)
        self.region = fingerprint + key + parent + _region_tail(token_count, self.shape)  # bytes 16..144
        assert len(self.region) == _REGION_END - _REGION_AT
        self.dtype_code = _envelope.DTYPES[dtype][0]

    def __repr__(self) -> str:
        return (f"Expected(key={self.key[:8].hex()}, parent={self.parent[:8].hex()}, tokens={self.token_count}, "
                f"dtype={self.dtype}, shape={self.shape})")


@functools.lru_cache(maxsize=256)
def _region_tail(token_count: int, shape: tuple[int, ...]) -> bytes:
    """Header bytes 112..144: token count, ndim, 3 reserved zeros, shape (6 dims)."""
    shape6 = shape + (0,) * (_envelope.MAX_NDIM - len(shape))
    return struct.pack("<IB3x6I", token_count, len(shape), *shape6)


def expected_for(ident: CacheIdentity, key: bytes, parent: bytes) -> Expected:
    """The expectation for chain key ``key`` (with ``parent``) under ``ident``."""
    return Expected(ident.fingerprint, key, parent, ident.block_tokens, ident.kv_dtype, ident.block_shape)


def guard_envelope(buf, want: Expected) -> None:
    """Refuse ``buf`` (a whole envelope) unless its header is the block asked for.

    Fast path: one 128-byte compare and one byte.  On any difference the
    header is parsed and compared field by field, which is authoritative:
    IdentityMismatchError (or a checksum/format error if the header is damaged)."""
    mv = memoryview(buf)
    if len(mv) >= _REGION_END and mv[_DTYPE_AT] == want.dtype_code and bytes(mv[_REGION_AT:_REGION_END]) == want.region:
        return
    # allow_lossy: this parse only explains the difference.  Whether a lossy
    # (int8) block may be served is decided by the store's codec check and the
    # decode; refusing it here would report a header of another block as a
    # codec error (an EnvelopeError, i.e. corruption) instead of a mismatch.
    check_header(decode_header(buf, allow_lossy=True), want)


def check_header(h: EnvelopeHeader, want: Expected) -> None:
    """Raise IdentityMismatchError unless the stored header is exactly the block asked for.

    The message names the fields that differ (and short hex prefixes of keys),
    never payload bytes or a tenant secret."""
    bad = []
    if h.fingerprint != want.fingerprint:
        bad.append(f"identity {h.fingerprint[:6].hex()} != {want.fingerprint[:6].hex()}")
    if h.key != want.key:
        bad.append(f"key {h.key[:6].hex()} != {want.key[:6].hex()}")
    if h.parent != want.parent:
        bad.append(f"parent {h.parent[:6].hex()} != {want.parent[:6].hex()}")
    if h.token_count != want.token_count:
        bad.append(f"token count {h.token_count} != {want.token_count}")
    if h.dtype != want.dtype:
        bad.append(f"dtype {h.dtype} != {want.dtype}")
    if tuple(h.shape) != tuple(want.shape):
        bad.append(f"shape {tuple(h.shape)} != {tuple(want.shape)}")
    if bad:
        raise IdentityMismatchError(f"stored block {want.key[:8].hex()} refused: " + "; ".join(bad))


def check_destination(out, ident: CacheIdentity, n: int) -> "list | PerBlock":
    """Per-block destinations of a caller's ``out``, checked before any read
    (a sequence's own items, or a ``PerBlock`` over one array).

    ``out`` is a numpy array or CPU torch tensor of shape ``[n, *block_shape]``
    (dtype matching ``kv_dtype``; bfloat16 as torch.bfloat16 or a 2-byte
    integer view), or a sequence of ``n`` per-block arrays/tensors."""
    if isinstance(out, (list, tuple)):
        if len(out) != n:
            raise ShapeMismatchError(f"out holds {len(out)} blocks, {n} requested")
        items = list(out)
        for item in items:
            _check_one(item, ident, ident.block_shape)
        return items
    _check_one(out, ident, (n, *ident.block_shape))
    return PerBlock(out, n)


class PerBlock:
    """``out[i]``, block ``i``'s destination in one array, made when asked: a get
    served by its batch paths (whole rows) asks for none (indexing a torch
    tensor costs ~2 µs a block: 1 ms of a 512-block restore)."""

    __slots__ = ("_out", "_n")

    def __init__(self, out, n: int) -> None:
        self._out, self._n = out, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        if not 0 <= i < self._n:
            raise IndexError(f"block {i} of {self._n}")
        return self._out[i]


def _check_one(arr, ident: CacheIdentity, shape: tuple[int, ...]) -> None:
    if type(arr).__module__.split(".")[0] == "torch":
        import torch

        if arr.device.type != "cpu":
            raise DTypeMismatchError(f"destination tensor is on {arr.device}; pass a host (CPU) tensor")
        ok = (arr.dtype == torch.bfloat16 and ident.kv_dtype == "bfloat16") or (
            arr.dtype != torch.bfloat16 and _np_dtype_of_torch(arr) in CARRIERS[ident.kv_dtype]
        )
        actual_shape, contiguous = tuple(arr.shape), arr.is_contiguous()
    elif isinstance(arr, np.ndarray):
        ok = arr.dtype in CARRIERS[ident.kv_dtype]
        actual_shape, contiguous = arr.shape, arr.flags.c_contiguous
        if not arr.flags.writeable:
            raise ShapeMismatchError("destination array is read-only")
    else:
        raise DTypeMismatchError(f"destination must be a numpy array or torch tensor, got {type(arr).__name__}")
    if not ok:  # the dtype's name only for the message (str(dtype) costs ~3 us per get)
        raise DTypeMismatchError(f"destination dtype {arr.dtype} cannot hold kv_dtype {ident.kv_dtype}")
    if tuple(actual_shape) != tuple(shape):
        raise ShapeMismatchError(f"destination shape {tuple(actual_shape)} != expected {tuple(shape)}")
    if not contiguous:
        raise ShapeMismatchError("destination must be C-contiguous")


def _np_dtype_of_torch(t) -> np.dtype | None:
    import torch

    table = {torch.float16: "float16", torch.float32: "float32", torch.int8: "int8",
             torch.int16: "int16", torch.uint16: "uint16"} if hasattr(torch, "uint16") else {
        torch.float16: "float16", torch.float32: "float32", torch.int8: "int8", torch.int16: "int16"}
    name = table.get(t.dtype)
    return None if name is None else np.dtype(name)


__all__ = ["CARRIERS", "Expected", "PerBlock", "expected_for", "check_header", "guard_envelope", "check_destination"]
