"""Body codecs of the block envelope: none, chunked lz4, chunked zstd, byte shuffle.

A compressed body is a sequence of chunks.  The raw payload is cut into chunks
of ``chunk_size`` bytes (the last one may be shorter); each chunk is stored as a
little-endian ``uint32`` frame word followed by its bytes.  The low 31 bits of
the word are the stored length; bit 31 set means the chunk is stored raw
(compression did not make it smaller), so incompressible data costs a copy,
not a decompression.  Chunks are independent, so a decoder needs one chunk of
scratch beyond its destination, whatever the payload size.

The byte-shuffle pre-filter transposes each chunk's bytes by element size
(all first bytes, then all second bytes, ...), which groups the slowly varying
exponent bytes of floats and helps the codec.  It is applied per chunk, for the
same bounded-memory reason, and only with a compressing codec: with codec
``none`` it would cost two transposes and break range reads of one layer for
no size gain.

Every malformed body is a typed :class:`~engine.errors.EnvelopeError`; the
framing is fully validated (:func:`scan_chunks`) before anything is decoded.

Codec id 3 is the lossy int8 codec.  It is not a byte codec (it needs the
payload's shape and dtype) and lives in :mod:`engine.quant`; here it only has
its id, and :func:`check_codec_id` refuses it with :class:`LossyCodecError`
unless the caller passes ``allow_lossy=True``.
"""

from __future__ import annotations

import struct

import lz4.block
import numpy as np
import zstandard

from quiver.engine.errors import CorruptEnvelopeError, LossyCodecError, UnknownCodecError  # noqa: F401 (LossyCodecError re-exported)

CODEC_NONE = 0
CODEC_LZ4 = 1
CODEC_ZSTD = 2
#: The lossy int8 codec (per-channel scales, engine.quant).  Its body is not
#: chunked; decoders refuse it unless the caller expects lossy KV.
CODEC_INT8 = 3
CODEC_INT8_RESERVED = CODEC_INT8  # the id's name before the codec existed

#: Lossless byte codecs: what ``codec_id`` and ``encode_body`` accept.
CODEC_IDS = {"none": CODEC_NONE, "lz4": CODEC_LZ4, "zstd": CODEC_ZSTD}
LOSSY_CODEC_IDS = {"int8": CODEC_INT8}
CODEC_NAMES = {v: k for k, v in {**CODEC_IDS, **LOSSY_CODEC_IDS}.items()}


DEFAULT_CHUNK_SIZE = 256 * 1024
#: Upper bound a decoder accepts; keeps per-chunk scratch bounded on crafted input.
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_ZSTD_LEVEL = 1

_FRAME = struct.Struct("<I")
_STORED_BIT = 0x8000_0000
_LEN_MASK = 0x7FFF_FFFF


def codec_id(name: str) -> int:
    """The codec id of a lossless byte codec ("none", "lz4", "zstd").

    The lossy "int8" codec is not a byte codec: ``encode_block(codec="int8")``
    routes it to :mod:`engine.quant`.
    """
    try:
        return CODEC_IDS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; expected one of {sorted(CODEC_IDS)}") from None


def check_codec_id(cid: int, *, allow_lossy: bool = False) -> None:
    """Refuse a codec id this build cannot decode, and the lossy one unless allowed."""
    if cid == CODEC_INT8:
        if not allow_lossy:
            raise LossyCodecError(
                f"codec id {cid} is lossy int8, reserved for readers that expect lossy KV "
                "(kv_quant set; pass allow_lossy=True)"
            )
        return
    if cid not in CODEC_NAMES:
        raise UnknownCodecError(f"unknown codec id {cid}")


# --- byte shuffle --------------------------------------------------------------


def shuffle(chunk: np.ndarray, itemsize: int) -> np.ndarray:
    """Bytes of ``chunk`` (flat uint8, length a multiple of itemsize) grouped by byte position."""
    if itemsize == 1:
        return chunk
    return np.ascontiguousarray(chunk.reshape(-1, itemsize).T).reshape(-1)


def unshuffle_into(dst: np.ndarray, shuffled, itemsize: int) -> None:
    """Inverse of :func:`shuffle`, written straight into ``dst`` (flat uint8)."""
    src = np.frombuffer(shuffled, dtype=np.uint8)
    if itemsize == 1:
        dst[:] = src
        return
    # One strided column write per byte plane: ~10x faster than copyto of a transpose.
    planes = src.reshape(itemsize, -1)
    cols = dst.reshape(-1, itemsize)
    for j in range(itemsize):
        cols[:, j] = planes[j]


# --- encode --------------------------------------------------------------------


def encode_body(
    raw: np.ndarray,
    codec: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    shuffle_bytes: bool = False,
    itemsize: int = 1,
    level: int = DEFAULT_ZSTD_LEVEL,
) -> list:
    """The body of ``raw`` (flat C-contiguous uint8) as a list of bytes-like parts.

    Parts are returned rather than joined so the caller builds the envelope with
    a single copy.
    """
    if codec == CODEC_NONE:
        if shuffle_bytes:
            raise ValueError("byte shuffle needs a compressing codec (lz4 or zstd)")
        return [memoryview(raw)]
    if codec not in (CODEC_LZ4, CODEC_ZSTD):
        raise ValueError(f"cannot encode codec id {codec}")
    if not (0 < chunk_size <= MAX_CHUNK_SIZE) or chunk_size % itemsize:
        raise ValueError(f"chunk_size {chunk_size} must be in (0, {MAX_CHUNK_SIZE}] and a multiple of {itemsize}")
    if codec == CODEC_ZSTD:
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        compress = cctx.compress
    else:
        def compress(b):
            return lz4.block.compress(b, store_size=False)

    parts = []
    for start in range(0, raw.size, chunk_size):
        chunk = raw[start:start + chunk_size]
        src = shuffle(chunk, itemsize) if shuffle_bytes else chunk
        packed = compress(src)
        if len(packed) < len(chunk):
            parts.append(_FRAME.pack(len(packed)))
            parts.append(packed)
        else:  # incompressible: store as is (shuffled or not, as the flag says)
            parts.append(_FRAME.pack(len(chunk) | _STORED_BIT))
            parts.append(memoryview(src))
    return parts


# --- decode --------------------------------------------------------------------


def scan_chunks(body: memoryview, raw_len: int, chunk_size: int) -> list[tuple[int, int, bool]]:
    """Validate a chunked body's framing; return (offset, length, stored) per chunk.

    The body must hold exactly ceil(raw_len / chunk_size) frames and nothing
    else; this runs before any allocation sized by ``raw_len``.
    """
    if not (0 < chunk_size <= MAX_CHUNK_SIZE):
        raise CorruptEnvelopeError(f"chunk size {chunk_size} out of range (0, {MAX_CHUNK_SIZE}]")
    n_chunks = -(-raw_len // chunk_size)
    # Each non-empty chunk costs at least a frame word and one byte.
    if n_chunks * (_FRAME.size + 1) > len(body):
        raise CorruptEnvelopeError(f"{n_chunks} chunks cannot fit in a body of {len(body)} bytes")
    out = []
    pos = 0
    for i in range(n_chunks):
        want = min(chunk_size, raw_len - i * chunk_size)
        if pos + _FRAME.size > len(body):
            raise CorruptEnvelopeError(f"chunk {i}: frame word overruns the body")
        (word,) = _FRAME.unpack_from(body, pos)
        pos += _FRAME.size
        length, stored = word & _LEN_MASK, bool(word & _STORED_BIT)
        if stored and length != want:
            raise CorruptEnvelopeError(f"chunk {i}: stored length {length} != raw chunk length {want}")
        if length == 0 or pos + length > len(body):
            raise CorruptEnvelopeError(f"chunk {i}: length {length} overruns the body")
        out.append((pos, length, stored))
        pos += length
    if pos != len(body):
        raise CorruptEnvelopeError(f"{len(body) - pos} trailing bytes after the last chunk")
    return out


def _lz4_chunk(data: memoryview, want: int) -> bytes:
    try:
        return lz4.block.decompress(data, uncompressed_size=want)
    except lz4.block.LZ4BlockError as e:
        raise CorruptEnvelopeError(f"lz4 chunk does not decompress: {e}") from e


def _zstd_chunk(dctx: zstandard.ZstdDecompressor, data: memoryview, want: int) -> bytes:
    try:
        # Check the frame's declared size before zstd allocates for it.
        declared = zstandard.frame_content_size(data)
        if declared != want:
            raise CorruptEnvelopeError(f"zstd frame declares {declared} bytes, chunk has {want}")
        return dctx.decompress(data, max_output_size=want)
    except zstandard.ZstdError as e:
        raise CorruptEnvelopeError(f"zstd chunk does not decompress: {e}") from e


def decode_body_into(
    body: memoryview,
    dst: np.ndarray,
    codec: int,
    *,
    chunk_size: int,
    shuffle_bytes: bool,
    itemsize: int,
) -> None:
    """Decode ``body`` into ``dst`` (flat writable uint8 of exactly raw length).

    Scratch is one decompressed chunk at a time.  On error ``dst`` holds partial
    data and must not be used.
    """
    raw_len = dst.size
    if codec == CODEC_NONE:
        if len(body) != raw_len:
            raise CorruptEnvelopeError(f"codec none: body length {len(body)} != raw length {raw_len}")
        dst[:] = np.frombuffer(body, dtype=np.uint8)
        return
    check_codec_id(codec)
    frames = scan_chunks(body, raw_len, chunk_size)
    dctx = zstandard.ZstdDecompressor() if codec == CODEC_ZSTD else None
    for i, (pos, length, stored) in enumerate(frames):
        start = i * chunk_size
        want = min(chunk_size, raw_len - start)
        data = body[pos:pos + length]
        if stored:
            chunk = data
        elif codec == CODEC_LZ4:
            chunk = _lz4_chunk(data, want)
        else:
            chunk = _zstd_chunk(dctx, data, want)
        if len(chunk) != want:
            raise CorruptEnvelopeError(f"chunk {i} decodes to {len(chunk)} bytes, expected {want}")
        out = dst[start:start + want]
        if shuffle_bytes:
            unshuffle_into(out, chunk, itemsize)
        else:
            out[:] = np.frombuffer(chunk, dtype=np.uint8)
        del chunk  # free this chunk's scratch before the next one is allocated


__all__ = [
    "CODEC_NONE",
    "CODEC_LZ4",
    "CODEC_ZSTD",
    "CODEC_INT8",
    "CODEC_INT8_RESERVED",
    "LOSSY_CODEC_IDS",
    "LossyCodecError",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "DEFAULT_ZSTD_LEVEL",
    "codec_id",
    "check_codec_id",
    "encode_body",
    "scan_chunks",
    "decode_body_into",
    "shuffle",
    "unshuffle_into",
]
