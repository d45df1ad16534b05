"""Codec layer: shuffle, chunk framing, and every malformed-body path typed."""

from __future__ import annotations

import struct

import lz4.block
import numpy as np
import pytest
import zstandard

from quiver.engine import codecs
from quiver.engine.errors import CorruptEnvelopeError, UnknownCodecError

RNG = np.random.default_rng(7)


def _kv_bytes(n_elems: int) -> np.ndarray:
    return RNG.standard_normal(n_elems).astype(np.float16).view(np.uint8)


def _roundtrip(raw, codec, *, chunk_size, shuffle, itemsize):
    body = b"".join(codecs.encode_body(raw, codec, chunk_size=chunk_size, shuffle_bytes=shuffle, itemsize=itemsize))
    dst = np.empty(raw.size, np.uint8)
    codecs.decode_body_into(memoryview(body), dst, codec, chunk_size=chunk_size, shuffle_bytes=shuffle,
                            itemsize=itemsize)
    return body, dst


@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_shuffle_inverts(itemsize):
    raw = RNG.integers(0, 256, 64 * itemsize, dtype=np.uint8)
    sh = codecs.shuffle(raw, itemsize)
    if itemsize > 1:
        # First plane is byte 0 of every element.
        assert np.array_equal(sh[:64], raw[::itemsize])
    back = np.empty_like(raw)
    codecs.unshuffle_into(back, sh.tobytes(), itemsize)
    assert np.array_equal(back, raw)


@pytest.mark.parametrize("codec", [codecs.CODEC_LZ4, codecs.CODEC_ZSTD])
@pytest.mark.parametrize("shuffle", [False, True])
def test_multichunk_roundtrip_with_tail(codec, shuffle):
    raw = _kv_bytes(5 * 1024 + 3)  # 10 KiB + 6 bytes: 3 chunks of 4 KiB, the last partial
    body, dst = _roundtrip(raw, codec, chunk_size=4096, shuffle=shuffle, itemsize=2)
    assert np.array_equal(dst, raw)
    assert len(codecs.scan_chunks(memoryview(body), raw.size, 4096)) == 3


def test_compressible_data_shrinks_and_incompressible_is_stored():
    zeros = np.zeros(64 * 1024, np.uint8)
    body, _ = _roundtrip(zeros, codecs.CODEC_LZ4, chunk_size=16384, shuffle=False, itemsize=1)
    assert len(body) < zeros.size // 20
    noise = RNG.integers(0, 256, 64 * 1024, dtype=np.uint8)
    body, dst = _roundtrip(noise, codecs.CODEC_LZ4, chunk_size=16384, shuffle=False, itemsize=1)
    frames = codecs.scan_chunks(memoryview(body), noise.size, 16384)
    assert all(stored for _, _, stored in frames)
    assert len(body) == noise.size + 4 * len(frames)
    assert np.array_equal(dst, noise)


def test_shuffle_helps_zstd_on_float16():
    raw = _kv_bytes(128 * 1024)
    plain, _ = _roundtrip(raw, codecs.CODEC_ZSTD, chunk_size=65536, shuffle=False, itemsize=2)
    shuf, _ = _roundtrip(raw, codecs.CODEC_ZSTD, chunk_size=65536, shuffle=True, itemsize=2)
    assert len(shuf) < len(plain) < raw.size


def test_empty_payload_has_empty_body():
    raw = np.zeros(0, np.uint8)
    body, dst = _roundtrip(raw, codecs.CODEC_ZSTD, chunk_size=4096, shuffle=True, itemsize=2)
    assert body == b"" and dst.size == 0


def test_codec_names_and_ids():
    assert codecs.codec_id("lz4") == codecs.CODEC_LZ4
    with pytest.raises(ValueError):
        codecs.codec_id("int8")
    with pytest.raises(UnknownCodecError, match="reserved"):
        codecs.check_codec_id(codecs.CODEC_INT8_RESERVED)
    with pytest.raises(UnknownCodecError):
        codecs.check_codec_id(200)


def test_encode_refuses_bad_arguments():
    raw = np.zeros(16, np.uint8)
    with pytest.raises(ValueError):
        codecs.encode_body(raw, codecs.CODEC_NONE, shuffle_bytes=True, itemsize=2)
    with pytest.raises(ValueError):
        codecs.encode_body(raw, codecs.CODEC_LZ4, chunk_size=3, itemsize=2)
    with pytest.raises(ValueError):
        codecs.encode_body(raw, codecs.CODEC_LZ4, chunk_size=codecs.MAX_CHUNK_SIZE + 2, itemsize=2)


# --- malformed bodies -----------------------------------------------------------

W = struct.Struct("<I")


def _decode(body: bytes, raw_len: int, codec=codecs.CODEC_LZ4, chunk_size=4096):
    dst = np.empty(raw_len, np.uint8)
    codecs.decode_body_into(memoryview(body), dst, codec, chunk_size=chunk_size, shuffle_bytes=False, itemsize=1)
    return dst


@pytest.mark.parametrize(
    "body, raw_len, match",
    [
        (W.pack(100) + b"x" * 10, 50, "overruns"),                    # length beyond body
        (W.pack(0) + b"xxxx", 50, "overruns"),                        # zero-length chunk
        (W.pack(50 | 0x8000_0000) + b"x" * 49, 50, "overruns"),       # stored, short
        (W.pack(49 | 0x8000_0000) + b"x" * 49, 50, "stored length"),  # stored, wrong length
        (W.pack(50 | 0x8000_0000) + b"x" * 51, 50, "trailing"),       # garbage after last chunk
        (W.pack(3) + b"abc", 10 * 4096, "cannot fit"),                # raw length claims 10 chunks
        (b"\x01\x00", 50, "cannot fit"),                              # half a frame word
    ],
)
def test_framing_errors_are_corrupt(body, raw_len, match):
    with pytest.raises(CorruptEnvelopeError, match=match):
        _decode(body, raw_len)


def test_absurd_raw_length_is_refused_before_allocation():
    with pytest.raises(CorruptEnvelopeError):
        codecs.scan_chunks(memoryview(W.pack(3) + b"abc"), 2**62, 4096)


@pytest.mark.parametrize("chunk_size", [0, codecs.MAX_CHUNK_SIZE + 1])
def test_chunk_size_out_of_range(chunk_size):
    with pytest.raises(CorruptEnvelopeError):
        codecs.scan_chunks(memoryview(b""), 0, chunk_size)


def test_lz4_garbage_and_wrong_size_are_corrupt():
    with pytest.raises(CorruptEnvelopeError, match="lz4"):
        _decode(W.pack(8) + b"\xff" * 8, 100)
    packed = lz4.block.compress(b"a" * 60, store_size=False)  # decodes to 60, chunk wants 100
    with pytest.raises(CorruptEnvelopeError):
        _decode(W.pack(len(packed)) + packed, 100)


def test_zstd_frame_size_must_match_chunk():
    big = zstandard.ZstdCompressor().compress(b"\0" * 8192)  # declares 8192, chunk wants 4096
    with pytest.raises(CorruptEnvelopeError, match="declares"):
        _decode(W.pack(len(big)) + big, 4096, codec=codecs.CODEC_ZSTD)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 4096)
    with pytest.raises(CorruptEnvelopeError):
        _decode(W.pack(len(no_size)) + no_size, 4096, codec=codecs.CODEC_ZSTD)
    with pytest.raises(CorruptEnvelopeError):
        _decode(W.pack(9) + b"\x28\xb5\x2f\xfd" + b"\xff" * 5, 4096, codec=codecs.CODEC_ZSTD)


def test_codec_none_body_length_must_equal_raw():
    with pytest.raises(CorruptEnvelopeError):
        _decode(b"abc", 4, codec=codecs.CODEC_NONE)
    assert bytes(_decode(b"abcd", 4, codec=codecs.CODEC_NONE)) == b"abcd"


def test_reserved_codec_refused_by_decoder():
    with pytest.raises(UnknownCodecError):
        _decode(b"", 0, codec=codecs.CODEC_INT8_RESERVED)
