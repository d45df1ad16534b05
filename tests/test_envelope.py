"""Block envelope: round trips, and every damaged or crafted envelope refused with a typed error."""

from __future__ import annotations

import struct
import tracemalloc

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quiver.engine import codecs
from quiver.engine.envelope import (
    MAGIC,
    decode_block,
    decode_block_into,
    decode_header,
    encode_block,
    header_size,
    uniform_layer_offsets,
)
from quiver.engine.errors import (
    BadMagicError,
    ChecksumMismatchError,
    CorruptEnvelopeError,
    DTypeMismatchError,
    EnvelopeError,
    ShapeMismatchError,
    TruncatedEnvelopeError,
    UnknownCodecError,
    UnsupportedVersionError,
)

FP, KEY, PARENT = bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))
IDS = dict(fingerprint=FP, key=KEY, parent=PARENT, token_count=16)
RNG = np.random.default_rng(11)

# Field offsets (docs/FORMAT.md), for crafting headers.
OFF_VERSION, OFF_CODEC, OFF_DTYPE, OFF_FLAGS, OFF_HLEN = 4, 6, 7, 8, 12
OFF_NDIM, OFF_RESERVED, OFF_SHAPE, OFF_RAW, OFF_BODY, OFF_CHUNK, OFF_LAYERS = 116, 117, 120, 144, 152, 160, 164


def _payload(dtype: str, shape) -> np.ndarray:
    x = RNG.standard_normal(shape)
    if dtype == "int8":
        return (x * 40).clip(-127, 127).astype(np.int8)
    if dtype == "bfloat16":
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.astype(dtype)


def _reseal(buf: bytearray) -> bytearray:
    """Recompute both CRCs, so a crafted header reaches the structural checks."""
    hlen = struct.unpack_from("<I", buf, OFF_HLEN)[0]
    if 172 <= hlen <= len(buf):
        struct.pack_into("<I", buf, hlen - 4, crc32c.crc32c(bytes(buf[:hlen - 4])))
    struct.pack_into("<I", buf, len(buf) - 4, crc32c.crc32c(bytes(buf[:-4])))
    return buf


def _crafted(fmt: str, offset: int, value, **enc) -> bytearray:
    buf = bytearray(encode_block(_payload("float16", (4, 8)), **IDS, **enc))
    struct.pack_into(fmt, buf, offset, value)
    return _reseal(buf)


CASES = [(c, s) for c in ("none", "lz4", "zstd") for s in (False, True) if not (c == "none" and s)]


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("codec, shuffle", CASES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
@pytest.mark.parametrize("shape", [(1,), (3, 0, 2), (2, 2, 16, 2, 8), (5, 1021)])
def test_roundtrip(codec, shuffle, dtype, shape):
    arr = _payload(dtype, shape)
    # A 1 KiB chunk makes the larger shapes multi-chunk with a partial tail.
    env = encode_block(arr, **IDS, codec=codec, shuffle=shuffle, dtype=dtype, chunk_size=1024)
    h, out = decode_block(env)
    assert (h.codec_name, h.shuffle, h.dtype, h.shape) == (codec, shuffle, dtype, shape)
    assert (h.fingerprint, h.key, h.parent, h.token_count) == (FP, KEY, PARENT, 16)
    assert h.raw_len == arr.nbytes and h.total_len == len(env)
    assert out.dtype == arr.dtype and out.tobytes() == arr.tobytes()
    dst = np.full_like(arr, 0x55 if arr.dtype.kind != "f" else 7)
    assert decode_block_into(env, dst) == h
    assert dst.tobytes() == arr.tobytes()


def test_multichunk_default_chunk_size():
    arr = _payload("float16", (4, 2, 16, 8, 128 + 3))  # 540 KiB: 3 chunks of 256 KiB
    for codec in ("lz4", "zstd"):
        h, out = decode_block(encode_block(arr, **IDS, codec=codec, shuffle=True))
        assert h.chunk_size == codecs.DEFAULT_CHUNK_SIZE and np.array_equal(out, arr)


def test_torch_bfloat16_in_and_out():
    t = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    env = encode_block(t, **IDS, codec="zstd", shuffle=True)
    h, out = decode_block(env)
    assert h.dtype == "bfloat16" and out.dtype == np.uint16
    assert torch.equal(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16), t)
    dst = torch.zeros(2, 3, 16, dtype=torch.bfloat16)
    decode_block_into(env, dst)
    assert torch.equal(dst, t)


def test_torch_float16_and_buffer_protocol_payloads():
    t = torch.randn(4, 5).half()
    assert np.array_equal(decode_block(encode_block(t, **IDS))[1], t.numpy())
    a = _payload("float32", (3, 7))
    h, out = decode_block(encode_block(memoryview(a), **IDS, codec="lz4"))
    assert h.dtype == "float32" and np.array_equal(out, a)


def test_non_contiguous_payload_is_copied():
    a = _payload("float16", (8, 6))
    view = a[:, ::2]
    assert not view.flags.c_contiguous
    _, out = decode_block(encode_block(view, **IDS))
    assert np.array_equal(out, view)


def test_layer_offsets_allow_range_read_of_one_layer():
    arr = _payload("float16", (4, 2, 16, 8))
    offs = uniform_layer_offsets(4, arr.nbytes)
    env = encode_block(arr, **IDS, layer_offsets=np.array(offs))  # any int sequence
    h = decode_header(env[: header_size(4)])  # a header prefix is enough
    assert h.layer_offsets == offs and h.header_len == header_size(4)
    lo, hi = h.layer_body_range(2)
    assert env[lo:hi] == arr[2].tobytes()
    assert h.layer_range(3) == (offs[3], arr.nbytes)
    with pytest.raises(IndexError):
        h.layer_range(4)
    with pytest.raises(ValueError):
        decode_header(encode_block(arr, **IDS, codec="zstd", layer_offsets=offs)).layer_body_range(0)


# --- encoder input errors --------------------------------------------------------


def test_encoder_refuses_bad_input():
    f16 = _payload("float16", (2, 4))
    with pytest.raises(DTypeMismatchError):
        encode_block(np.zeros(4, np.float64), **IDS)
    with pytest.raises(DTypeMismatchError):
        encode_block(f16, **IDS, dtype="bfloat16")  # a float16 array is not bfloat16
    with pytest.raises(DTypeMismatchError):
        encode_block(np.zeros(4, np.uint16), **IDS)  # ambiguous without dtype=
    with pytest.raises(DTypeMismatchError):
        encode_block(f16, **IDS, dtype="float64")
    with pytest.raises(DTypeMismatchError):
        encode_block(f16.astype(">f2"), **IDS)
    with pytest.raises(ShapeMismatchError):
        encode_block(np.float16(1.0), **IDS)
    with pytest.raises(ShapeMismatchError):
        encode_block(np.zeros((1,) * 7, np.float16), **IDS)
    with pytest.raises(ValueError):
        encode_block(f16, **{**IDS, "key": b"short"})
    with pytest.raises(ValueError):
        encode_block(f16, **{**IDS, "token_count": -1})
    with pytest.raises(ValueError):
        encode_block(f16, **IDS, codec="int8")
    with pytest.raises(ValueError):
        encode_block(f16, **IDS, shuffle=True)  # shuffle needs a compressing codec
    with pytest.raises(ValueError):
        encode_block(f16, **IDS, layer_offsets=(0, 100))
    with pytest.raises(ValueError):
        encode_block(f16, **IDS, layer_offsets=(4, 8))


# --- damaged envelopes -----------------------------------------------------------


def _small_envelopes():
    arr = _payload("float16", (2, 3, 4))
    return [
        encode_block(arr, **IDS, layer_offsets=uniform_layer_offsets(2, arr.nbytes)),
        encode_block(arr, **IDS, codec="zstd", shuffle=True, chunk_size=16),  # 3 chunks
        encode_block(_payload("int8", (64,)), **IDS, codec="lz4", chunk_size=32),
    ]


@pytest.mark.parametrize("i", range(3))
def test_every_truncation_is_typed(i):
    env = _small_envelopes()[i]
    for n in range(len(env)):
        with pytest.raises(TruncatedEnvelopeError):
            decode_block(env[:n])
    with pytest.raises(CorruptEnvelopeError, match="after"):
        decode_block(env + b"\0")


@pytest.mark.parametrize("i", range(3))
def test_every_single_bit_flip_is_detected(i):
    env = _small_envelopes()[i]
    h = decode_header(env)
    buf = bytearray(env)
    for byte in range(len(buf)):
        for bit in range(8):
            buf[byte] ^= 1 << bit
            with pytest.raises(EnvelopeError) as exc:
                decode_block(bytes(buf))
            if byte >= h.header_len:  # body or trailing CRC: only the CRC can see it
                assert exc.type is ChecksumMismatchError
            buf[byte] ^= 1 << bit


def test_bad_magic_version_codec_flags():
    env = _small_envelopes()[1]
    with pytest.raises(BadMagicError):
        decode_block(b"QVKX" + env[4:])
    with pytest.raises(BadMagicError):
        decode_header(b"\0" * 200)
    with pytest.raises(UnsupportedVersionError):
        decode_block(_crafted("<H", OFF_VERSION, 2))
    with pytest.raises(UnknownCodecError, match="reserved"):
        decode_block(_crafted("<B", OFF_CODEC, codecs.CODEC_INT8_RESERVED))
    with pytest.raises(UnknownCodecError):
        decode_block(_crafted("<B", OFF_CODEC, 77))
    with pytest.raises(UnknownCodecError, match="flag"):
        decode_block(_crafted("<I", OFF_FLAGS, 0x3, codec="lz4"))


@pytest.mark.parametrize(
    "fmt, offset, value, enc, error, match",
    [
        ("<Q", OFF_RAW, 4 * 8 * 2 + 2, {}, CorruptEnvelopeError, "raw length"),
        ("<Q", OFF_RAW, 2**63, {"codec": "lz4"}, CorruptEnvelopeError, "raw length"),
        ("<Q", OFF_BODY, 2**60, {"codec": "zstd"}, TruncatedEnvelopeError, "header says"),
        ("<Q", OFF_BODY, 63, {}, CorruptEnvelopeError, "codec none"),
        ("<I", OFF_SHAPE, 2**32 - 1, {}, CorruptEnvelopeError, "raw length"),
        ("<B", OFF_NDIM, 7, {}, CorruptEnvelopeError, "ndim"),
        ("<B", OFF_NDIM, 0, {}, CorruptEnvelopeError, "ndim"),
        ("<B", OFF_NDIM, 1, {}, CorruptEnvelopeError, "shape"),  # dim 2 non-zero beyond ndim
        ("<B", OFF_RESERVED, 1, {}, CorruptEnvelopeError, "reserved"),
        ("<B", OFF_DTYPE, 0, {}, CorruptEnvelopeError, "dtype"),
        ("<B", OFF_DTYPE, 3, {}, CorruptEnvelopeError, "raw length"),  # float32 doubles raw length
        ("<I", OFF_CHUNK, 0, {"codec": "lz4"}, CorruptEnvelopeError, "chunk size"),
        ("<I", OFF_CHUNK, 3, {"codec": "lz4"}, CorruptEnvelopeError, "chunk size"),  # not a multiple of 2
        ("<I", OFF_CHUNK, 2**31, {"codec": "lz4"}, CorruptEnvelopeError, "chunk size"),
        ("<I", OFF_CHUNK, 8, {}, CorruptEnvelopeError, "codec none"),
        ("<I", OFF_FLAGS, 1, {}, CorruptEnvelopeError, "shuffle"),
        ("<I", OFF_HLEN, 176, {}, CorruptEnvelopeError, "header length"),
        ("<I", OFF_LAYERS, 1, {}, CorruptEnvelopeError, "header length"),
        ("<I", OFF_LAYERS, 2**31, {}, CorruptEnvelopeError, "header length"),
        ("<I", 168, 5, {"layer_offsets": (0, 8)}, CorruptEnvelopeError, "first layer"),
        ("<Q", 176, 2**40, {"layer_offsets": (0, 8)}, CorruptEnvelopeError, "beyond"),
        ("<Q", 184, 4, {"layer_offsets": (0, 8, 16)}, CorruptEnvelopeError, "non-decreasing"),
    ],
)
def test_crafted_headers_are_refused(fmt, offset, value, enc, error, match):
    with pytest.raises(error, match=match):
        decode_block(_crafted(fmt, offset, value, **enc))


def test_chunk_frame_overrun_with_valid_crc_is_corrupt():
    buf = bytearray(encode_block(_payload("float16", (4, 64)), **IDS, codec="lz4", chunk_size=128))
    hlen = decode_header(buf).header_len
    struct.pack_into("<I", buf, hlen, 10_000)  # first chunk claims more than the body holds
    with pytest.raises(CorruptEnvelopeError, match="overruns"):
        decode_block(_reseal(buf))


def test_header_checksum_is_checked_by_decode_header():
    buf = bytearray(_small_envelopes()[0])
    buf[112] ^= 1  # token count
    with pytest.raises(ChecksumMismatchError, match="header"):
        decode_header(bytes(buf))


# --- decode_block_into -----------------------------------------------------------


def test_decode_into_checks_destination():
    arr = _payload("float16", (4, 8))
    env = encode_block(arr, **IDS, codec="lz4")
    with pytest.raises(ShapeMismatchError):
        decode_block_into(env, np.empty((8, 4), np.float16))
    with pytest.raises(DTypeMismatchError):
        decode_block_into(env, np.empty((4, 8), np.float32))
    with pytest.raises(DTypeMismatchError):
        decode_block_into(env, np.empty((4, 8), np.uint16))  # uint16 carries bfloat16 only
    with pytest.raises(DTypeMismatchError):
        decode_block_into(env, torch.empty(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ShapeMismatchError):
        decode_block_into(env, bytearray(arr.nbytes - 2))
    with pytest.raises(ValueError):
        decode_block_into(env, bytes(arr.nbytes))  # read-only
    with pytest.raises(ValueError):
        decode_block_into(env, np.empty((4, 16), np.float16)[:, ::2])
    raw = bytearray(arr.nbytes)
    decode_block_into(env, raw)
    assert bytes(raw) == arr.tobytes()
    arena = np.zeros(3 * arr.nbytes, np.uint8)
    decode_block_into(env, arena[arr.nbytes:2 * arr.nbytes])  # a 1-D uint8 slot is raw bytes
    assert arena[arr.nbytes:2 * arr.nbytes].tobytes() == arr.tobytes()
    assert not arena[:arr.nbytes].any() and not arena[2 * arr.nbytes:].any()
    with pytest.raises(ShapeMismatchError):
        decode_block_into(env, arena[:arr.nbytes + 1])
    decode_block_into(env, memoryview(raw))
    assert bytes(raw) == arr.tobytes()


def test_decode_into_never_writes_when_crc_fails():
    arr = _payload("float16", (4, 8))
    env = bytearray(encode_block(arr, **IDS))
    env[-10] ^= 0x40
    dst = np.zeros_like(arr)
    with pytest.raises(ChecksumMismatchError):
        decode_block_into(bytes(env), dst)
    assert not dst.any()


def test_decode_into_without_body_crc_still_checks_the_header():
    """verify_body=False (bytes a tier verified on their way in) skips the
    trailing CRC only: a damaged header is still a checksum error, no byte written."""
    arr = _payload("float16", (4, 8))
    env = bytearray(encode_block(arr, **IDS))
    env[-10] ^= 0x40  # body damage: the pass that verify_body=False leaves to the tier
    dst = np.zeros_like(arr)
    decode_block_into(bytes(env), dst, verify_body=False)
    assert not np.array_equal(dst, arr)
    with pytest.raises(ChecksumMismatchError):
        decode_block_into(bytes(env), dst)  # the default still checks it
    env = bytearray(encode_block(arr, **IDS))
    env[40] ^= 0x01  # inside the key field of the header
    dst = np.zeros_like(arr)
    with pytest.raises(ChecksumMismatchError):
        decode_block_into(bytes(env), dst, verify_body=False)
    assert not dst.any()


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_decode_scratch_is_bounded_by_one_chunk(codec):
    # 4 MiB of compressible int8 (so chunks really decompress), 16 chunks of 256 KiB.
    arr = (np.arange(4 << 20) % 13).astype(np.int8)
    env = encode_block(arr, **IDS, codec=codec)
    assert len(env) < arr.nbytes // 4
    dst = np.empty_like(arr)
    tracemalloc.start()
    try:
        decode_block_into(env, dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(dst, arr)
    # python-lz4 decompresses into a temporary, then copies it into the bytes it
    # returns, so one chunk costs up to two chunk sizes at its peak; still 8x
    # below the 4 MiB payload and independent of its size.
    assert peak < 2 * codecs.DEFAULT_CHUNK_SIZE + 64 * 1024, peak


# --- fuzzing ----------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_VALID = [bytes(e) for e in _small_envelopes()]
_VALID_DECODED = [decode_block(e) for e in _VALID]


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_never_decode(data):
    with pytest.raises(EnvelopeError):
        decode_block(data)


@FUZZ
@given(st.binary(min_size=160, max_size=400))
def test_random_bytes_after_magic_never_decode(data):
    with pytest.raises(EnvelopeError):
        decode_block(MAGIC + b"\x01\x00" + data)


@FUZZ
@given(
    which=st.integers(0, len(_VALID) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    reseal=st.booleans(),
)
def test_mutated_envelopes_fail_typed_or_decode_consistently(which, edits, cut, reseal):
    buf = bytearray(_VALID[which])
    for pos, val in edits:
        buf[pos % len(buf)] = val
    if cut is not None:
        del buf[cut % len(buf):]
    if reseal and len(buf) > 176:
        _reseal(buf)
    try:
        h, out = decode_block(bytes(buf))
    except EnvelopeError:
        return
    # Whatever decodes is self-consistent; without resealing it must be the original.
    assert out.shape == h.shape and out.dtype == h.np_dtype and out.nbytes == h.raw_len
    if not reseal:
        h0, out0 = _VALID_DECODED[which]
        assert h == h0 and out.tobytes() == out0.tobytes()


def test_decode_from_mmapped_file(tmp_path):
    """A file's envelope decodes through mmap: the body is paged in, never read whole into Python."""
    import mmap

    arr = _payload("float16", (4, 2, 16, 8, 64))
    path = tmp_path / "blk"
    path.write_bytes(encode_block(arr, **IDS, codec="zstd", shuffle=True, chunk_size=8192))
    dst = np.empty_like(arr)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        h = decode_block_into(m, dst)  # closing the mmap after proves no view of it leaked
    assert h.shape == arr.shape and np.array_equal(dst, arr)


def test_huge_raw_length_with_valid_crc_fails_before_allocating():
    """A crafted header claiming a 2**40-byte payload in a tiny body allocates nothing big."""
    buf = bytearray(encode_block(_payload("int8", (64,)), **IDS, codec="zstd", chunk_size=32))
    struct.pack_into("<I", buf, OFF_SHAPE, 2**32 - 1)
    struct.pack_into("<I", buf, OFF_SHAPE + 4, 256)
    struct.pack_into("<B", buf, OFF_NDIM, 2)
    struct.pack_into("<Q", buf, OFF_RAW, (2**32 - 1) * 256)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptEnvelopeError, match="raw length .* exceeds"):  # 1 TiB > MAX_RAW_LEN
            decode_block(bytes(_reseal(buf)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def _minimal_frames_envelope(codec: str, n_chunks: int) -> bytes:
    """A CRC-valid envelope whose body is ``n_chunks`` minimal frames (a word and one byte),
    each standing for a full MAX_CHUNK_SIZE chunk: sound framing, raw_len = n_chunks * 16 MiB."""
    from quiver.engine.envelope import _FIXED, VERSION

    chunk = codecs.MAX_CHUNK_SIZE
    body = (struct.pack("<I", 1) + b"\0") * n_chunks
    shape6 = (n_chunks, chunk // 2, 0, 0, 0, 0)  # float16
    head = _FIXED.pack(MAGIC, VERSION, codecs.codec_id(codec), 1, 0, header_size(0), FP, KEY, PARENT, 16, 2,
                       b"\0\0\0", *shape6, n_chunks * chunk, len(body), chunk, 0)
    head += struct.pack("<I", crc32c.crc32c(head))
    return head + body + struct.pack("<I", crc32c.crc32c(head + body))


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_raw_length_beyond_the_maximum_block_is_refused_before_allocating(codec):
    """65536 minimal frames (320 KiB) claim 1 TiB: refused as corrupt by decode_header,
    never a MemoryError from allocating raw_len."""
    env = _minimal_frames_envelope(codec, 1 << 16)
    assert codecs.scan_chunks(memoryview(env)[172:-4], (1 << 16) * codecs.MAX_CHUNK_SIZE,
                              codecs.MAX_CHUNK_SIZE)  # the framing alone is sound
    with pytest.raises(CorruptEnvelopeError, match="exceeds the limit"):
        decode_header(env)
    with pytest.raises(CorruptEnvelopeError, match="exceeds the limit"):
        decode_block(env)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_raw_length_beyond_the_codecs_expansion_is_refused_before_allocating(codec):
    """64 minimal frames (320 bytes) claim 1 GiB, under MAX_RAW_LEN but far past what
    320 bytes of lz4/zstd can expand to: refused before anything is sized by raw_len."""
    env = _minimal_frames_envelope(codec, 64)
    with pytest.raises(CorruptEnvelopeError, match="expansion"):
        decode_header(env)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptEnvelopeError, match="expansion"):
            decode_block(env)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_most_compressible_payloads_stay_within_the_expansion_bound(codec):
    """Zeros at the largest chunk size: the best ratio either codec reaches still decodes."""
    arr = np.zeros(4 * codecs.MAX_CHUNK_SIZE, np.int8)
    env = encode_block(arr, **IDS, codec=codec, chunk_size=codecs.MAX_CHUNK_SIZE)
    assert np.array_equal(decode_block(env)[1], arr)


# --- building in place: encode_block_into, envelope_size -------------------------------

from quiver.engine.envelope import encode_block_into, envelope_size, prepare_envelope  # noqa: E402

ALL_CODECS = ["none", "lz4", "zstd", "int8"]


def _block(dtype="float16", shape=(2, 2, 16, 2, 8)):
    return _payload(dtype, shape)


@pytest.mark.parametrize("codec", ALL_CODECS)
def test_encode_into_is_encode_block_byte_for_byte(codec):
    arr = _block()
    kw = dict(IDS, codec=codec, layer_offsets=uniform_layer_offsets(2, arr.nbytes), layer_crcs=codec == "none")
    ref = encode_block(arr, **kw)
    dest = bytearray(b"\xee" * (len(ref) + 100))  # a slot larger than the envelope
    n = encode_block_into(dest, arr, **kw)
    assert n == len(ref) == prepare_envelope(arr, **kw).nbytes
    assert bytes(dest[:n]) == ref
    assert dest[n:] == b"\xee" * 100  # nothing written past the envelope
    h, out = decode_block(memoryview(dest)[:n], allow_lossy=codec == "int8")
    assert h.codec_name == codec
    if codec != "int8":
        assert out.tobytes() == arr.tobytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
@pytest.mark.parametrize("codec", ALL_CODECS)
def test_envelope_size_is_exact_or_a_tight_upper_bound(codec, dtype):
    if codec == "int8" and dtype == "int8":
        with pytest.raises(DTypeMismatchError):
            envelope_size((2, 2, 16, 2, 8), dtype, codec=codec)
        return
    shape = (2, 2, 16, 2, 8)
    arr = _block(dtype, shape)
    crcs = codec == "none"
    size = envelope_size(shape, dtype, codec=codec, layer_count=2, layer_crcs=crcs, chunk_size=512)
    kw = dict(IDS, codec=codec, dtype=dtype, layer_offsets=uniform_layer_offsets(2, arr.nbytes), layer_crcs=crcs)
    if codec in ("lz4", "zstd"):
        kw["chunk_size"] = 512
    got = len(encode_block(arr, **kw))
    if codec in ("none", "int8"):
        assert got == size
    else:
        assert got <= size
        # incompressible bytes hit the bound exactly: every chunk stored as is, plus its frame word
        noise = np.frombuffer(RNG.bytes(arr.size), dtype=np.int8).reshape(shape)
        kw.update(dtype="int8", layer_offsets=uniform_layer_offsets(2, noise.nbytes))
        assert len(encode_block(noise, **kw)) == envelope_size(
            shape, "int8", codec=codec, layer_count=2, chunk_size=512)


def test_encode_into_refuses_a_small_or_readonly_destination_and_writes_nothing():
    arr = _block()
    size = envelope_size(arr.shape, "float16")
    small = bytearray(size - 1)
    with pytest.raises(ShapeMismatchError):
        encode_block_into(small, arr, **IDS)
    assert small == bytearray(size - 1)
    with pytest.raises(ValueError):
        encode_block_into(bytes(size), arr, **IDS)
    with pytest.raises(ValueError):
        encode_block_into(np.zeros((size, 2), np.uint8)[:, 0], arr, **IDS)  # not contiguous
    assert encode_block_into(np.zeros(size, np.uint8), arr, **IDS) == size  # a uint8 array is a buffer


def test_encode_into_copies_a_codec_none_payload_once():
    """encode_block_into allocates nothing payload-sized: the payload goes straight into dest.

    encode_block by contrast must allocate the whole envelope, which the
    tracemalloc peak shows; the same measurement bounds encode_block_into."""
    arr = RNG.standard_normal((4, 2, 16, 8, 128)).astype(np.float16)  # 256 KiB
    kw = dict(IDS, layer_offsets=uniform_layer_offsets(4, arr.nbytes), layer_crcs=True)
    dest = np.zeros(envelope_size(arr.shape, "float16", layer_count=4, layer_crcs=True), np.uint8)
    encode_block_into(dest, arr, **kw)  # warm up (imports, caches)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        encode_block_into(dest, arr, **kw)
        into_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        env = encode_block(arr, **kw)
        bytes_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert bytes(dest) == env
    assert bytes_peak >= arr.nbytes  # the measurement sees a payload-sized allocation
    assert into_peak < arr.nbytes // 16, into_peak


# --------------------------------------------------------------------------- known layouts (issue 10)


def _layout_case(dtype="float16", shape=(2, 2, 16, 4, 8), layers=2):
    from quiver.engine.envelope import raw_layout

    arr = _payload(dtype, shape)
    env = encode_block(arr, **IDS, dtype=dtype, layer_offsets=uniform_layer_offsets(layers, arr.nbytes),
                       layer_crcs=True)
    return arr, env, raw_layout(shape, dtype, layers, IDS["token_count"])


def test_decode_raw_into_takes_a_header_of_the_layout_without_a_parse():
    from quiver.engine.envelope import decode_raw_into

    arr, env, layout = _layout_case()
    assert layout.header_len == decode_header(env).header_len and layout.total_len == len(env)
    dst = np.zeros_like(arr)
    assert decode_raw_into(env, dst, layout) and np.array_equal(dst, arr)


@pytest.mark.parametrize("change", ["token_count", "layers", "codec", "shape"])
def test_decode_raw_into_leaves_any_other_layout_to_decode_block_into(change):
    """A header that differs from the layout anywhere outside fingerprint, keys and
    CRCs is not taken by the fast path (False, out untouched)."""
    from quiver.engine.envelope import decode_raw_into

    arr, _, layout = _layout_case()
    kw = dict(IDS, dtype="float16", layer_offsets=uniform_layer_offsets(2, arr.nbytes), layer_crcs=True)
    if change == "token_count":
        kw["token_count"] = 15
    elif change == "layers":
        kw["layer_offsets"] = uniform_layer_offsets(4, arr.nbytes)
    elif change == "codec":
        kw.update(codec="lz4", layer_crcs=False)
    else:
        arr = arr.reshape(2, 2, 16, 8, 4)
    env = encode_block(arr, **kw)
    dst = np.zeros_like(arr)
    assert not decode_raw_into(env, dst, layout) and not dst.any()
    decode_block_into(env, dst)  # the general path decodes it
    assert np.array_equal(dst, arr)


def test_decode_raw_into_checks_the_header_crc_and_on_request_the_body_crc():
    from quiver.engine.envelope import decode_raw_into

    arr, env, layout = _layout_case()
    bad = bytearray(env)
    bad[50] ^= 0x01  # the key field: outside the compared bytes, inside the header CRC
    dst = np.zeros_like(arr)
    assert not decode_raw_into(bytes(bad), dst, layout) and not dst.any()
    with pytest.raises(ChecksumMismatchError):
        decode_block_into(bytes(bad), dst, verify_body=False)
    bad = bytearray(env)
    bad[-10] ^= 0x01  # the body
    with pytest.raises(ChecksumMismatchError):
        decode_raw_into(bytes(bad), dst, layout)
    assert decode_raw_into(bytes(bad), dst, layout, verify_body=False)  # a tier verified it on the way in


def test_body_in_place_accepts_the_layout_or_parses():
    from quiver.engine.envelope import body_in_place, raw_layout

    arr, env, layout = _layout_case()
    head = env[:layout.header_len]
    assert body_in_place(head, arr, layout=layout) and body_in_place(head, arr)
    other = raw_layout((2, 2, 16, 4, 8), "float16", 2, 99)  # another token count: the parse decides
    assert body_in_place(head, arr, layout=other)
    with pytest.raises(CorruptEnvelopeError):
        body_in_place(env[:layout.header_len + 1], arr)  # the header read as more bytes than it has
    lz4 = encode_block(arr, **IDS, codec="lz4")
    assert not body_in_place(lz4[:decode_header(lz4).header_len], arr)


@pytest.mark.parametrize("copies", [1, 10], ids=["by-bytes", "numpy"])  # 4 or 40 headers: both ways
def test_matching_rows_checks_layout_identity_fields_and_header_crc_per_row(copies):
    arr, env, layout = _layout_case()
    hl = layout.header_len
    other = encode_block(arr, **dict(IDS, key=bytes(32)), layer_offsets=uniform_layer_offsets(2, arr.nbytes),
                         layer_crcs=True)
    damaged = bytearray(env)
    damaged[hl - 1] ^= 0x01  # the header CRC itself
    lz4 = encode_block(arr, **IDS, codec="lz4").ljust(hl, b"\0")
    heads = np.stack([np.frombuffer(e[:hl], np.uint8) for e in (env, other, bytes(damaged), lz4)] * copies)
    ids = np.frombuffer((FP + KEY + PARENT) * 4 * copies, np.uint8).reshape(4 * copies, 96)
    assert layout.matching_rows(heads, ids).tolist() == [True, False, False, False] * copies
    assert layout.matching_rows(heads, None).tolist() == [True, True, False, False] * copies  # no identity compare
