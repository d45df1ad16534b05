"""The block envelope: one byte format on disk, in the object store and in memory.

    header (172 + 8 * layer_count [+ 4 * layer_count] bytes, ends with its own CRC32C)
    body   (body_len bytes, the payload through a codec; see engine.codecs, engine.quant)
    CRC32C (4 bytes) over header and body

The exact layout is in docs/FORMAT.md.  The header carries everything that
makes the bytes meaningful (identity fingerprint, block and parent key, token
count, dtype, shape), so a reader can check a block against its request
without trusting an index.  The header has its own CRC so a header read alone
(a ranged GET, a HEAD-like peek) is already verified; the trailing CRC covers
the whole envelope and is checked before any payload byte is returned.

Payloads are numpy arrays (or torch CPU tensors, or any buffer-protocol object)
of float16, bfloat16, float32 or int8.  numpy has no bfloat16: such payloads are
carried and returned as 2-byte integer arrays (``uint16``), tagged "bfloat16";
a torch bfloat16 tensor is accepted directly.  A non-C-contiguous payload is
copied once to make it contiguous.

One encoder, three ways out: :func:`prepare_envelope` computes an envelope
(header, body parts, CRCs) without laying it out; :func:`encode_block_into`
writes it into a caller's buffer (an L0 arena slot: with codec none each
payload byte is copied once, into its final place), :func:`encode_block`
returns it as ``bytes``.  :func:`envelope_size` sizes the buffer beforehand
(exact for codecs none and int8, an upper bound for lz4/zstd).

Layerwise envelopes (flag bit 2, ``layer_crcs=True``) also carry one CRC32C
per layer in the header, so a ranged read of one layer is verified on its own
(:func:`verify_layer`; engine.layerwise).  The lossy int8 codec (id 3,
``codec="int8"``) is decoded only by callers that pass ``allow_lossy=True``.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np

from quiver.engine import codecs, quant
from quiver.engine.errors import (
    BadMagicError,
    ChecksumMismatchError,
    CorruptEnvelopeError,
    DTypeMismatchError,
    ShapeMismatchError,
    TruncatedEnvelopeError,
    UnknownCodecError,
    UnsupportedVersionError,
)
from quiver.walpub.checksum import COMBINE_MIN_BYTES, crc32c, crc32c_combine

MAGIC = b"QVKB"
VERSION = 1
MAX_NDIM = 6
MAX_LAYERS = 4096
#: Largest payload an envelope may carry (raw_len): engine.identity.MAX_BLOCK_NBYTES, 2 GiB.
#: A reader refuses a larger claim before sizing any allocation by it.
MAX_RAW_LEN = 1 << 31
#: Most raw bytes one body byte of a compressed codec can stand for (raw_len <= body_len * this).
#: Generous bounds on the formats: an lz4 block expands at most ~255x; a zstd frame at most
#: ~32768x (a 4-byte RLE block per 128 KiB), counted here without the frame words.
MAX_EXPANSION = {codecs.CODEC_LZ4: 1 << 10, codecs.CODEC_ZSTD: 1 << 16}
FLAG_SHUFFLE = 0x1
#: Bit 1 is unassigned (refused).  Bit 2: a per-layer CRC32C table follows the offsets.
FLAG_LAYER_CRC = 0x4
KNOWN_FLAGS = FLAG_SHUFFLE | FLAG_LAYER_CRC

# magic, version, codec, dtype, flags, header_len, fingerprint, key, parent,
# token_count, ndim, reserved(3), shape[6], raw_len, body_len, chunk_size, layer_count
_FIXED = struct.Struct("<4sHBBII32s32s32sIB3s6IQQII")
assert _FIXED.size == 168
_U32 = struct.Struct("<I")
_CRC_SIZE = 4

#: dtype name -> (code, numpy dtype used to carry it)
DTYPES = {
    "float16": (1, np.dtype("<f2")),
    "bfloat16": (2, np.dtype("<u2")),
    "float32": (3, np.dtype("<f4")),
    "int8": (4, np.dtype("i1")),
}
_DTYPE_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}
_NATIVE = {np.dtype("<f2"): "float16", np.dtype("<f4"): "float32", np.dtype("i1"): "int8"}


def header_size(layer_count: int, layer_crcs: bool = False) -> int:
    """Bytes of a header with ``layer_count`` layer offsets (and CRCs), its own CRC included."""
    return _FIXED.size + (12 if layer_crcs else 8) * layer_count + _CRC_SIZE


@dataclass(frozen=True)
class EnvelopeHeader:
    """A decoded, validated envelope header."""

    version: int
    codec: int
    flags: int
    fingerprint: bytes
    key: bytes
    parent: bytes
    token_count: int
    dtype: str
    shape: tuple[int, ...]
    raw_len: int
    body_len: int
    chunk_size: int
    layer_offsets: tuple[int, ...]
    header_len: int
    layer_crcs: tuple[int, ...] = ()

    @property
    def lossy(self) -> bool:
        """True for the int8 codec: the payload is an approximation of what was stored."""
        return self.codec == codecs.CODEC_INT8

    @property
    def codec_name(self) -> str:
        return codecs.CODEC_NAMES[self.codec]

    @property
    def shuffle(self) -> bool:
        return bool(self.flags & FLAG_SHUFFLE)

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype the payload is returned as (uint16 for bfloat16)."""
        return DTYPES[self.dtype][1]

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    @property
    def total_len(self) -> int:
        """Bytes of the whole envelope: header, body and trailing CRC."""
        return self.header_len + self.body_len + _CRC_SIZE

    def layer_range(self, i: int) -> tuple[int, int]:
        """[start, stop) of layer ``i`` within the raw payload."""
        offs = self.layer_offsets
        if not 0 <= i < len(offs):
            raise IndexError(f"layer {i} out of range for {len(offs)} layers")
        return offs[i], offs[i + 1] if i + 1 < len(offs) else self.raw_len

    def layer_body_range(self, i: int) -> tuple[int, int]:
        """[start, stop) of layer ``i`` within the envelope, for a ranged read.

        Only codec ``none`` stores layers contiguously.  A ranged read is not
        covered by the trailing CRC; with ``layer_crcs`` (flag bit 2) it is
        checked by :func:`verify_layer`, otherwise only the header is verified.
        """
        if self.codec != codecs.CODEC_NONE:
            raise ValueError(f"layer ranges need codec none, envelope uses {self.codec_name}")
        start, stop = self.layer_range(i)
        return self.header_len + start, self.header_len + stop


# --- payload normalisation -----------------------------------------------------


def _payload_array(payload, dtype: str | None) -> tuple[np.ndarray, str]:
    """(C-contiguous numpy array, dtype name) for a numpy / torch / buffer payload."""
    if type(payload).__module__.split(".")[0] == "torch":
        payload, dtype = _torch_to_numpy(payload, dtype)
    arr = payload if isinstance(payload, np.ndarray) else np.asarray(memoryview(payload))
    if not arr.dtype.isnative:
        raise DTypeMismatchError(f"payload dtype {arr.dtype} is not native byte order")
    native = _NATIVE.get(arr.dtype)
    if dtype is None:
        if native is None:
            raise DTypeMismatchError(
                f"payload dtype {arr.dtype} is not float16/float32/int8; pass dtype= (bfloat16 as a uint16 view)"
            )
        dtype = native
    if dtype not in DTYPES:
        raise DTypeMismatchError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    carrier = DTYPES[dtype][1]
    if native is not None and native != dtype:
        raise DTypeMismatchError(f"payload is {native} but dtype={dtype!r} was given")
    if native is None and not (dtype == "bfloat16" and arr.dtype.kind in "ui" and arr.dtype.itemsize == 2):
        raise DTypeMismatchError(f"payload dtype {arr.dtype} cannot carry {dtype}")
    if not 1 <= arr.ndim <= MAX_NDIM:  # before ascontiguousarray, which turns 0-d into 1-d
        raise ShapeMismatchError(f"payload must have 1..{MAX_NDIM} dimensions, has {arr.ndim}")
    arr = np.ascontiguousarray(arr).view(carrier)
    return arr, dtype


def _torch_to_numpy(t, dtype: str | None):
    import torch  # lazily: the envelope itself does not need torch

    if t.device.type != "cpu":
        raise ValueError(f"payload tensor is on {t.device}; copy it to host memory first")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        if dtype not in (None, "bfloat16"):
            raise DTypeMismatchError(f"payload is bfloat16 but dtype={dtype!r} was given")
        return t.contiguous().view(torch.int16).numpy(), "bfloat16"
    return t.contiguous().numpy(), dtype


def _out_array(out, header: EnvelopeHeader) -> np.ndarray:
    """Flat writable uint8 view of a caller's destination, checked against the header."""
    if type(out).__module__.split(".")[0] == "torch":
        import torch

        if out.device.type != "cpu":
            raise ValueError(f"destination tensor is on {out.device}; decode into host memory")
        if out.dtype == torch.bfloat16:
            if header.dtype != "bfloat16":
                raise DTypeMismatchError(f"destination is bfloat16, envelope holds {header.dtype}")
            out = out.view(torch.int16)
        out = out.numpy()
    if isinstance(out, np.ndarray) and not (out.dtype == np.uint8 and out.ndim == 1):
        if tuple(out.shape) != header.shape:
            raise ShapeMismatchError(f"destination shape {tuple(out.shape)} != envelope shape {header.shape}")
        native = _NATIVE.get(out.dtype)
        ok = native == header.dtype or (
            header.dtype == "bfloat16" and native is None and out.dtype.kind in "ui" and out.dtype.itemsize == 2
        )
        if not ok:
            raise DTypeMismatchError(f"destination dtype {out.dtype} cannot hold {header.dtype}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("destination must be a writable C-contiguous array")
        return raw_view(out)
    mv = memoryview(out)
    if mv.readonly or not mv.c_contiguous:
        raise ValueError("destination buffer must be writable and C-contiguous")
    if mv.nbytes != header.raw_len:
        raise ShapeMismatchError(f"destination holds {mv.nbytes} bytes, envelope payload is {header.raw_len}")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


def raw_view(out) -> np.ndarray:
    """The bytes of a C-contiguous numpy array or CPU torch tensor as a flat uint8
    array (a view, no copy): where a reader puts an envelope's body in place."""
    if type(out).__module__.split(".")[0] == "torch":
        import torch

        out = (out.view(torch.int16) if out.dtype == torch.bfloat16 else out).numpy()
    return out.reshape(-1).view(np.uint8)


def _check_key(name: str, value) -> bytes:
    value = bytes(value)
    if len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes, got {len(value)}")
    return value


# --- encode --------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedEnvelope:
    """An envelope computed but not yet laid out: its header, body parts and CRCs.

    :func:`prepare_envelope` does all the work an envelope needs (validation,
    compression or quantization, both CRCs) without copying a codec-``none``
    payload: its one body part is a view of the caller's payload.  The bytes
    land in memory exactly once, in :meth:`write_into` (a caller's buffer,
    such as an L0 arena slot) or :meth:`tobytes`.  Write it before the payload
    changes: the CRCs were computed from the payload as it was, so a payload
    modified in between gives an envelope that fails its CRC (never one that
    passes with other bytes).
    """

    head: bytes            # fixed header + layer tables + header CRC
    parts: tuple           # body parts (bytes-like; codec none: a view of the payload)
    crc: bytes             # the trailing CRC32C, 4 bytes
    nbytes: int            # total_len: header + body + CRC

    def pieces(self) -> tuple:
        """Everything in envelope order: header, body parts, trailing CRC."""
        return (self.head, *self.parts, self.crc)

    @property
    def object_crc(self) -> int:
        """CRC32C of the whole envelope as stored (header, body, trailing CRC),
        continued from the trailing CRC over its own 4 bytes: what walpub
        records for these bytes, with no pass over them (``Volume.publish_many``)."""
        return crc32c(self.crc, _U32.unpack(self.crc)[0])

    def write_into(self, dest) -> int:
        """Copy the envelope to the start of ``dest`` (a writable C-contiguous
        buffer of at least :attr:`nbytes`); returns the bytes written."""
        try:
            dst = memoryview(dest)
        except TypeError as exc:
            raise ValueError(f"destination must be a writable buffer, got {type(dest).__name__}") from exc
        if dst.readonly or not dst.c_contiguous:
            raise ValueError("destination buffer must be writable and C-contiguous")
        dst = dst.cast("B") if (dst.format != "B" or dst.ndim != 1) else dst
        if dst.nbytes < self.nbytes:
            raise ShapeMismatchError(f"destination holds {dst.nbytes} bytes, the envelope needs {self.nbytes}")
        pos = 0
        for piece in self.pieces():
            src = memoryview(piece).cast("B")
            dst[pos:pos + src.nbytes] = src
            pos += src.nbytes
        assert pos == self.nbytes, (pos, self.nbytes)
        return pos

    def tobytes(self) -> bytes:
        """The envelope as one new ``bytes`` (one copy of each piece)."""
        return b"".join(self.pieces())


def prepare_envelope(
    payload,
    *,
    fingerprint: bytes,
    key: bytes,
    parent: bytes,
    token_count: int,
    codec: str = "none",
    shuffle: bool = False,
    layer_offsets=None,
    dtype: str | None = None,
    level: int = codecs.DEFAULT_ZSTD_LEVEL,
    chunk_size: int = codecs.DEFAULT_CHUNK_SIZE,
    layer_crcs: bool = False,
) -> PreparedEnvelope:
    """The envelope of ``payload``, computed but not laid out (the one encoder).

    ``dtype`` is inferred from the array unless given; bfloat16 needs it when
    the payload is a uint16/int16 view.  ``layer_offsets`` lists the raw byte
    offset where each layer starts (first 0, non-decreasing); pass
    ``uniform_layer_offsets(...)`` for an evenly split payload.
    ``layer_crcs=True`` (codec none, layer offsets given) adds a CRC32C per
    layer to the header, for verified ranged reads.  ``codec="int8"`` is the
    lossy int8 codec (engine.quant): the payload must be ``[L, 2, T, H, D]``
    float; the identity the block is stored under must say so (kv_quant).
    :attr:`PreparedEnvelope.nbytes` is the exact size; :func:`encode_block`
    and :func:`encode_block_into` are this plus the one copy.
    """
    arr, dtype = _payload_array(payload, dtype)
    if any(d >= 2**32 for d in arr.shape):
        raise ShapeMismatchError(f"payload dimension too large: {arr.shape}")
    if arr.nbytes > MAX_RAW_LEN:  # a reader would refuse it (decode_header)
        raise ShapeMismatchError(f"payload of {arr.nbytes} bytes exceeds the limit of {MAX_RAW_LEN}")
    if not 0 <= token_count < 2**32:
        raise ValueError(f"token_count {token_count} out of uint32 range")
    fingerprint = _check_key("fingerprint", fingerprint)
    key = _check_key("key", key)
    parent = _check_key("parent", parent)
    cid = _codec_id(codec)
    itemsize = arr.itemsize
    raw = arr.reshape(-1).view(np.uint8)
    offsets = () if layer_offsets is None else tuple(int(o) for o in layer_offsets)
    _check_layer_offsets(offsets, raw.size, ValueError)
    if layer_crcs and (cid != codecs.CODEC_NONE or not offsets):
        raise ValueError("layer_crcs needs codec none and layer offsets (it protects ranged layer reads)")

    if cid == codecs.CODEC_INT8:
        if shuffle:
            raise ValueError("byte shuffle does not apply to the int8 codec")
        chunk_size = 0
        parts = quant.encode_body(arr, dtype)
    else:
        if cid == codecs.CODEC_NONE:
            if shuffle:
                raise ValueError("byte shuffle needs a compressing codec (lz4 or zstd)")
            chunk_size = 0
        parts = codecs.encode_body(raw, cid, chunk_size=chunk_size, shuffle_bytes=shuffle, itemsize=itemsize,
                                   level=level)
    body_len = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)

    flags = (FLAG_SHUFFLE if shuffle else 0) | (FLAG_LAYER_CRC if layer_crcs else 0)
    shape6 = tuple(arr.shape) + (0,) * (MAX_NDIM - arr.ndim)
    fixed = _FIXED.pack(
        MAGIC, VERSION, cid, DTYPES[dtype][0], flags, header_size(len(offsets), layer_crcs),
        fingerprint, key, parent, token_count, arr.ndim, b"\0\0\0", *shape6,
        raw.size, body_len, chunk_size, len(offsets),
    )
    head = fixed + struct.pack(f"<{len(offsets)}Q", *offsets)
    spans = list(zip(offsets, offsets[1:] + (raw.size,))) if layer_crcs else []
    layer_crc_values = [crc32c(raw[a:b]) for a, b in spans]
    if layer_crcs:
        head += struct.pack(f"<{len(offsets)}I", *layer_crc_values)
    head += _U32.pack(crc32c(head))
    crc = crc32c(head)
    if layer_crcs:  # codec none: the body is raw, which the layers tile (first offset 0): one pass, not two
        for (a, b), layer_crc in zip(spans, layer_crc_values):
            crc = crc32c_combine(crc, layer_crc, b - a) if b - a >= COMBINE_MIN_BYTES else crc32c(raw[a:b], crc)
    else:
        for p in parts:
            crc = crc32c(p, crc)
    return PreparedEnvelope(head=head, parts=tuple(parts), crc=_U32.pack(crc),
                            nbytes=len(head) + body_len + _CRC_SIZE)


def encode_block(payload, **kw) -> bytes:
    """The envelope of ``payload`` as bytes; keywords as :func:`prepare_envelope`."""
    return prepare_envelope(payload, **kw).tobytes()


def encode_block_into(dest, payload, **kw) -> int:
    """Build the envelope of ``payload`` at the start of ``dest``; returns its length.

    ``dest`` is a writable C-contiguous buffer (an L0 arena slot, a bytearray,
    a uint8 array) of at least the envelope's size: :func:`envelope_size`
    gives it exactly for codecs none and int8 and as an upper bound for lz4
    and zstd.  Keywords as :func:`prepare_envelope`.  With codec none each
    payload byte is copied once, straight into ``dest``; a compressing codec
    compresses chunk by chunk into scratch first, then copies the result.
    A too-small ``dest`` is a ShapeMismatchError and nothing is written.
    """
    return prepare_envelope(payload, **kw).write_into(dest)


def envelope_size(
    shape,
    dtype: str,
    *,
    codec: str = "none",
    layer_count: int = 0,
    layer_crcs: bool = False,
    chunk_size: int = codecs.DEFAULT_CHUNK_SIZE,
) -> int:
    """Bytes of the envelope of a ``shape``/``dtype`` payload with ``layer_count`` layer offsets.

    Exact for codecs none and int8 (the body size does not depend on the
    data); for lz4 and zstd an upper bound: a chunk that does not shrink is
    stored as is, so the body is at most the raw bytes plus one 4-byte frame
    word per chunk."""
    if dtype not in DTYPES:
        raise DTypeMismatchError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    shape = tuple(int(d) for d in shape)
    raw = math.prod(shape) * DTYPES[dtype][1].itemsize
    cid = _codec_id(codec)
    if cid == codecs.CODEC_NONE:
        body = raw
    elif cid == codecs.CODEC_INT8:
        if dtype not in quant.FLOAT_DTYPES:
            raise DTypeMismatchError(f"int8 codec quantizes float16/bfloat16/float32, not {dtype}")
        body = quant.body_nbytes(shape)
    else:
        body = raw + 4 * (-(-raw // chunk_size))
    return header_size(layer_count, layer_crcs) + body + _CRC_SIZE


def _codec_id(codec: str) -> int:
    return codecs.LOSSY_CODEC_IDS[codec] if codec in codecs.LOSSY_CODEC_IDS else codecs.codec_id(codec)


def uniform_layer_offsets(num_layers: int, raw_len: int) -> tuple[int, ...]:
    """Start offsets of ``num_layers`` equal slices of a payload of ``raw_len`` bytes."""
    if num_layers <= 0 or raw_len % num_layers:
        raise ValueError(f"{raw_len} bytes do not split into {num_layers} equal layers")
    step = raw_len // num_layers
    return tuple(i * step for i in range(num_layers))


def _check_layer_offsets(offsets, raw_len: int, error) -> None:
    if len(offsets) > MAX_LAYERS:
        raise error(f"{len(offsets)} layers exceed the limit of {MAX_LAYERS}")
    if offsets and offsets[0] != 0:
        raise error(f"first layer offset must be 0, is {offsets[0]}")
    for a, b in zip(offsets, offsets[1:]):
        if b < a:
            raise error(f"layer offsets must be non-decreasing: {a} then {b}")
    if offsets and offsets[-1] > raw_len:
        raise error(f"last layer offset {offsets[-1]} beyond raw length {raw_len}")


# --- decode --------------------------------------------------------------------


def decode_header(buf, *, allow_lossy: bool = False) -> EnvelopeHeader:
    """Parse and validate the header at the start of ``buf`` (a prefix is enough).

    Checks magic, version, the header's own CRC, codec, flags and every length;
    does not read the body or its CRC (``decode_block`` does).  A lossy (int8)
    envelope is refused with LossyCodecError unless ``allow_lossy``.
    """
    mv = memoryview(buf).cast("B")
    if len(mv) < 4:
        raise TruncatedEnvelopeError(f"{len(mv)} bytes cannot hold the magic")
    if bytes(mv[:4]) != MAGIC:
        raise BadMagicError(f"bad magic {bytes(mv[:4])!r}, expected {MAGIC!r}")
    if len(mv) < 6:
        raise TruncatedEnvelopeError(f"{len(mv)} bytes cannot hold the version")
    (version,) = struct.unpack_from("<H", mv, 4)
    if version != VERSION:
        raise UnsupportedVersionError(f"envelope version {version}; this build reads version {VERSION}")
    if len(mv) < _FIXED.size:
        raise TruncatedEnvelopeError(f"{len(mv)} bytes cannot hold the {_FIXED.size}-byte fixed header")
    (_, _, cid, dcode, flags, header_len, fingerprint, key, parent, token_count, ndim, reserved,
     *shape6, raw_len, body_len, chunk_size, layer_count) = _FIXED.unpack_from(mv, 0)
    has_crcs = bool(flags & FLAG_LAYER_CRC)
    if layer_count > MAX_LAYERS or header_len != header_size(layer_count, has_crcs):
        raise CorruptEnvelopeError(f"header length {header_len} inconsistent with {layer_count} layers")
    if len(mv) < header_len:
        raise TruncatedEnvelopeError(f"{len(mv)} bytes cannot hold the {header_len}-byte header")
    (stored_crc,) = _U32.unpack_from(mv, header_len - _CRC_SIZE)
    if crc32c(mv[:header_len - _CRC_SIZE]) != stored_crc:
        raise ChecksumMismatchError("header CRC32C mismatch")

    codecs.check_codec_id(cid, allow_lossy=allow_lossy)
    if flags & ~KNOWN_FLAGS:
        raise UnknownCodecError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if dcode not in _DTYPE_BY_CODE:
        raise CorruptEnvelopeError(f"unknown dtype code {dcode}")
    dtype = _DTYPE_BY_CODE[dcode]
    itemsize = DTYPES[dtype][1].itemsize
    if reserved != b"\0\0\0":
        raise CorruptEnvelopeError("reserved header bytes are not zero")
    if not 1 <= ndim <= MAX_NDIM or any(shape6[ndim:]):
        raise CorruptEnvelopeError(f"bad shape: ndim {ndim}, dims {shape6}")
    shape = tuple(shape6[:ndim])
    if raw_len != math.prod(shape) * itemsize:
        raise CorruptEnvelopeError(f"raw length {raw_len} != prod{shape} * {itemsize}")
    if raw_len > MAX_RAW_LEN:
        raise CorruptEnvelopeError(f"raw length {raw_len} exceeds the limit of {MAX_RAW_LEN}")
    if cid in MAX_EXPANSION and raw_len > body_len * MAX_EXPANSION[cid]:
        raise CorruptEnvelopeError(f"raw length {raw_len} from a {body_len}-byte body exceeds the codec's "
                                   f"maximum expansion of {MAX_EXPANSION[cid]}x")
    if has_crcs and (cid != codecs.CODEC_NONE or layer_count == 0):
        raise CorruptEnvelopeError("layer CRC flag needs codec none and at least one layer")
    if cid == codecs.CODEC_NONE:
        if flags & FLAG_SHUFFLE:
            raise CorruptEnvelopeError("shuffle flag set with codec none")
        if chunk_size != 0 or body_len != raw_len:
            raise CorruptEnvelopeError(f"codec none: chunk size {chunk_size}, body {body_len} != raw {raw_len}")
    elif cid == codecs.CODEC_INT8:
        if flags & FLAG_SHUFFLE or chunk_size != 0:
            raise CorruptEnvelopeError(f"int8 codec: shuffle flag or chunk size {chunk_size} set")
        if ndim != 5 or dtype not in quant.FLOAT_DTYPES:
            raise CorruptEnvelopeError(f"int8 codec needs a 5-d float payload, got {dtype} of {ndim} dims")
        if body_len != quant.body_nbytes(shape):
            raise CorruptEnvelopeError(f"int8 codec: body {body_len} != {quant.body_nbytes(shape)} for {shape}")
    elif not (0 < chunk_size <= codecs.MAX_CHUNK_SIZE) or chunk_size % itemsize:
        raise CorruptEnvelopeError(f"chunk size {chunk_size} invalid for itemsize {itemsize}")
    offsets = struct.unpack_from(f"<{layer_count}Q", mv, _FIXED.size)
    _check_layer_offsets(offsets, raw_len, CorruptEnvelopeError)
    crcs = struct.unpack_from(f"<{layer_count}I", mv, _FIXED.size + 8 * layer_count) if has_crcs else ()
    return EnvelopeHeader(
        version=version, codec=cid, flags=flags, fingerprint=fingerprint, key=key, parent=parent,
        token_count=token_count, dtype=dtype, shape=shape, raw_len=raw_len, body_len=body_len,
        chunk_size=chunk_size, layer_offsets=offsets, header_len=header_len, layer_crcs=crcs,
    )


def verify_layer(h: EnvelopeHeader, i: int, data) -> None:
    """Check a ranged read of layer ``i`` (bytes ``h.layer_body_range(i)``) against its CRC32C.

    Needs an envelope written with ``layer_crcs=True``; ChecksumMismatchError
    on a mismatch, TruncatedEnvelopeError on a wrong length.
    """
    if not h.layer_crcs:
        raise ValueError("this envelope has no per-layer CRCs (written without layer_crcs=True)")
    start, stop = h.layer_body_range(i)
    if memoryview(data).nbytes != stop - start:
        raise TruncatedEnvelopeError(f"layer {i}: {memoryview(data).nbytes} bytes, expected {stop - start}")
    if crc32c(data) != h.layer_crcs[i]:
        raise ChecksumMismatchError(f"layer {i}: CRC32C mismatch")


def _verified(buf, allow_lossy: bool, verify_body: bool = True) -> tuple[EnvelopeHeader, memoryview]:
    """Header and body of a whole envelope whose trailing CRC32C matches
    (header CRC and lengths always; the trailing CRC only if ``verify_body``)."""
    mv = memoryview(buf).cast("B")
    h = decode_header(mv, allow_lossy=allow_lossy)
    if len(mv) < h.total_len:
        raise TruncatedEnvelopeError(f"envelope is {len(mv)} bytes, header says {h.total_len}")
    if len(mv) > h.total_len:
        raise CorruptEnvelopeError(f"{len(mv) - h.total_len} bytes after the envelope's CRC")
    end = h.header_len + h.body_len
    (stored,) = _U32.unpack_from(mv, end)
    if verify_body and crc32c(mv[:end]) != stored:
        raise ChecksumMismatchError("envelope CRC32C mismatch")
    return h, mv[h.header_len:end]


def _decode_body(h: EnvelopeHeader, body: memoryview, dst: np.ndarray) -> None:
    if h.codec == codecs.CODEC_INT8:
        quant.decode_body_into(body, dst, h.shape, h.dtype)
    else:
        codecs.decode_body_into(body, dst, h.codec, chunk_size=h.chunk_size, shuffle_bytes=h.shuffle,
                                itemsize=h.itemsize)


def body_in_place(head, out, *, allow_lossy: bool = False, layout: RawLayout | None = None) -> bool:
    """For an envelope read in pieces, its body straight into ``out``
    (``raw_view(out)``) and its header into ``head``: True when ``out`` now
    holds the payload (codec none, no shuffle), False when the body needs
    decoding (the caller decodes the joined pieces instead).

    Checks the header (its CRC, fields, lengths) and ``out`` against it, as
    ``decode_block_into(..., verify_body=False)`` does; the trailing CRC is not
    checked, so the pieces must have passed a CRC over the whole object on
    their way in (docs/FORMAT.md, "What each read verifies").  With ``layout``
    (the one ``out`` was checked against), a header of that layout is accepted
    without a parse (:class:`RawLayout`)."""
    mv = _bytes_view(head)
    if layout is not None and len(mv) == layout.header_len and raw_view(out).nbytes == layout.raw_len \
            and layout.matches(mv):
        return True
    h = decode_header(head, allow_lossy=allow_lossy)
    if len(memoryview(head)) != h.header_len:
        raise CorruptEnvelopeError(f"header is {h.header_len} bytes, {len(memoryview(head))} were read as one")
    dst = _out_array(out, h)
    return h.codec == codecs.CODEC_NONE and not h.shuffle and h.body_len == dst.nbytes


# Header bytes 16..112 (fingerprint, key, parent) may hold any bytes in a valid header.
_PER_BLOCK_AT, _PER_BLOCK_END = 16, 112
# RawLayout.matching_rows: below this many headers a loop over their bytes beats numpy's
# fixed cost (8 headers: 6 vs 14 us; 32: about even, 22 us; 64: numpy 32 vs 44 us; 256: 92 vs 164 us).
_NUMPY_ROWS = 32


@dataclass(frozen=True)
class RawLayout:
    """The header bytes that every codec-none envelope of one layout (dtype,
    shape, token count, uniform layer offsets with layer CRCs: what BlockStore
    writes for one identity) has in common: all but the fingerprint, keys,
    layer CRCs and header CRC.

    A header equal to them there, with a right header CRC, is one that
    :func:`decode_header` accepts with this layout, so :func:`decode_raw_into`
    skips the parse (~6 us of field checks per block: issue 10's fixed cost).
    Build with :func:`raw_layout` (cached)."""

    header_len: int
    raw_len: int
    lead: bytes     # header bytes 0..16: magic, version, codec, dtype, flags, header_len
    rest: bytes     # header bytes 112..(168 + 8 * layers): token count .. layer offsets

    @property
    def total_len(self) -> int:
        return self.header_len + self.raw_len + _CRC_SIZE

    def matching_rows(self, heads: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """:meth:`matches` for many headers at once, each also naming its block:
        ``heads`` is ``[m, header_len]`` uint8, ``ids`` ``[m, 96]`` the
        fingerprint, key and parent each header must hold (the guard's
        identity fields; None: not compared).  A bool per row: the bytes
        compare in numpy comparisons over all rows, then each row's header CRC."""
        n, at, end = self.header_len, _PER_BLOCK_END, _PER_BLOCK_END + len(self.rest)
        if len(heads) < _NUMPY_ROWS:
            return self._rows_by_bytes(heads, ids)
        ok = ((heads[:, :_PER_BLOCK_AT] == np.frombuffer(self.lead, np.uint8)).all(axis=1)
              & (heads[:, at:end] == np.frombuffer(self.rest, np.uint8)).all(axis=1))
        if ids is not None:
            ok &= (heads[:, _PER_BLOCK_AT:at] == ids).all(axis=1)
        # Each header's CRC over slices of one bytes copy: indexing the array row by row cost 2x.
        rows = memoryview(heads.tobytes())
        crcs = np.array([crc32c(rows[o:o + n - _CRC_SIZE]) for o in range(0, len(rows), n)], dtype=np.uint32)
        return ok & (crcs == heads[:, n - _CRC_SIZE:n].copy().view("<u4")[:, 0])

    def _rows_by_bytes(self, heads: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """:meth:`matching_rows` by a loop over the rows' bytes: the same compares."""
        n, at, end = self.header_len, _PER_BLOCK_END, _PER_BLOCK_END + len(self.rest)
        rows = heads.tobytes()
        want = None if ids is None else ids.tobytes()
        width = at - _PER_BLOCK_AT
        ok = []
        for j in range(len(heads)):
            o = j * n
            ok.append(rows[o:o + _PER_BLOCK_AT] == self.lead and rows[o + at:o + end] == self.rest
                      and (want is None or rows[o + _PER_BLOCK_AT:o + at] == want[j * width:(j + 1) * width])
                      and crc32c(rows[o:o + n - _CRC_SIZE]) == _U32.unpack_from(rows, o + n - _CRC_SIZE)[0])
        return np.array(ok, dtype=bool)

    def matches(self, head: memoryview) -> bool:
        """True if ``head`` (a 'B' memoryview) starts with a header of this layout
        and that header's CRC32C is right."""
        n = self.header_len
        return (len(head) >= n and head[:_PER_BLOCK_AT] == self.lead
                and head[_PER_BLOCK_END:_PER_BLOCK_END + len(self.rest)] == self.rest
                and crc32c(head[:n - _CRC_SIZE]) == _U32.unpack_from(head, n - _CRC_SIZE)[0])


@functools.lru_cache(maxsize=256)
def raw_layout(shape: tuple[int, ...], dtype: str, layer_count: int, token_count: int) -> RawLayout:
    """The :class:`RawLayout` of codec-none envelopes with layer CRCs of ``shape``
    and ``dtype`` split into ``layer_count`` equal layers (taken from one such
    header, built by :func:`prepare_envelope`)."""
    payload = np.zeros(shape, dtype=DTYPES[dtype][1])
    zero = bytes(32)
    head = prepare_envelope(payload, fingerprint=zero, key=zero, parent=zero, token_count=token_count,
                            dtype=dtype, layer_offsets=uniform_layer_offsets(layer_count, payload.nbytes),
                            layer_crcs=True).head
    return RawLayout(header_len=len(head), raw_len=payload.nbytes, lead=head[:_PER_BLOCK_AT],
                     rest=head[_PER_BLOCK_END:_FIXED.size + 8 * layer_count])


def _bytes_view(buf) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def decode_raw_into(buf, out, layout: RawLayout, *, verify_body: bool = True) -> bool:
    """:func:`decode_block_into`'s fast path for an envelope of a known layout:
    True when ``buf`` is one (``RawLayout.matches``, exact length) and its
    payload is now in ``out``; False, with ``out`` untouched, when it is not
    (the caller then decodes it with ``decode_block_into``, which says why).

    ``out`` must already be checked to hold exactly this layout's payload
    (BlockStore's ``check_destination``); a size mismatch also returns False.
    The trailing CRC is checked only when ``verify_body``, as in decode_block_into."""
    mv = _bytes_view(buf)
    dst = raw_view(out)
    if len(mv) != layout.total_len or dst.nbytes != layout.raw_len or not layout.matches(mv):
        return False
    end = layout.header_len + layout.raw_len
    if verify_body and crc32c(mv[:end]) != _U32.unpack_from(mv, end)[0]:
        raise ChecksumMismatchError("envelope CRC32C mismatch")
    dst[:] = np.frombuffer(mv, dtype=np.uint8, count=layout.raw_len, offset=layout.header_len)
    return True


def decode_block(buf, *, allow_lossy: bool = False) -> tuple[EnvelopeHeader, np.ndarray]:
    """Verify and decode a whole envelope; the payload comes back as a new array.

    ``buf`` must be exactly one envelope (slice an arena slot to ``total_len``).
    bfloat16 payloads come back as uint16 arrays.  A lossy (int8) envelope is
    refused with LossyCodecError unless ``allow_lossy``.
    """
    h, body = _verified(buf, allow_lossy)
    if h.codec not in (codecs.CODEC_NONE, codecs.CODEC_INT8):  # framing sound before raw_len is allocated
        codecs.scan_chunks(body, h.raw_len, h.chunk_size)
    out = np.empty(h.shape, dtype=h.np_dtype)
    _decode_body(h, body, out.reshape(-1).view(np.uint8))
    return h, out


def decode_block_into(buf, out, *, allow_lossy: bool = False, verify_body: bool = True) -> EnvelopeHeader:
    """Verify an envelope, then decode its payload straight into ``out``.

    ``out`` is a writable C-contiguous numpy array (shape and dtype must match
    the header), a CPU torch tensor, or raw bytes of exactly ``raw_len``: a
    writable buffer or a 1-D uint8 array such as an arena slot (uint8 is no
    payload dtype, so it always means raw bytes; no dtype check is possible).  Scratch memory is one chunk.
    On any error ``out`` may hold partial data and must not be used.
    A lossy (int8) envelope is refused with LossyCodecError unless ``allow_lossy``.
    ``verify_body=False`` skips the trailing (whole-envelope) CRC32C, never the
    header's: only for bytes already verified on their way into the tier they
    are read from (docs/FORMAT.md, "What each read verifies").
    """
    h, body = _verified(buf, allow_lossy, verify_body)
    dst = _out_array(out, h)
    _decode_body(h, body, dst)
    return h


__all__ = [
    "MAGIC",
    "VERSION",
    "EnvelopeHeader",
    "PreparedEnvelope",
    "prepare_envelope",
    "encode_block",
    "encode_block_into",
    "envelope_size",
    "decode_header",
    "decode_block",
    "decode_block_into",
    "body_in_place",
    "decode_raw_into",
    "RawLayout",
    "raw_layout",
    "raw_view",
    "header_size",
    "uniform_layer_offsets",
    "verify_layer",
    "FLAG_LAYER_CRC",
]
