"""Lossy int8 codec (envelope codec 3): error bounds, lossy refusal, damaged envelopes typed."""

from __future__ import annotations

import struct

import crc32c
import numpy as np
import pytest
import torch

from quiver.engine import codecs, quant
from quiver.engine.envelope import decode_block, decode_block_into, decode_header, encode_block
from quiver.engine.errors import (
    ChecksumMismatchError,
    CorruptEnvelopeError,
    DTypeMismatchError,
    EnvelopeError,
    ShapeMismatchError,
    TruncatedEnvelopeError,
    UnknownCodecError,
)
from quiver.engine.identity import CacheIdentity

IDS = dict(fingerprint=b"\1" * 32, key=b"\2" * 32, parent=b"\3" * 32, token_count=16)
SHAPE = (3, 2, 16, 2, 8)  # [L, 2, T, H, D]
OFF_HLEN, OFF_NDIM, OFF_SHAPE, OFF_BODY = 12, 116, 120, 152


def _kv(seed: int = 0) -> np.ndarray:
    """KV-like float32: normal values with a few outlier dims (as in real keys)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    x[:, 0, :, :, 3] *= 40.0
    x[1, 1, :, 1, :] = 0.0  # an all-zero channel group
    return x


def _as(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.astype(dtype)


def _reseal(buf: bytearray) -> bytearray:
    hlen = struct.unpack_from("<I", buf, OFF_HLEN)[0]
    struct.pack_into("<I", buf, hlen - 4, crc32c.crc32c(bytes(buf[:hlen - 4])))
    struct.pack_into("<I", buf, len(buf) - 4, crc32c.crc32c(bytes(buf[:-4])))
    return buf


def test_quantize_error_is_at_most_half_a_scale_per_channel():
    x = _kv()
    q, scales = quant.quantize(x, "float32")
    assert q.dtype == np.int8 and q.shape == SHAPE and scales.shape == (3, 2, 2, 8)
    err = np.abs(quant.dequantize(q, scales) - x)
    bound = scales[:, :, None] / 2
    assert np.all(err <= bound * (1 + 1e-5) + 1e-30)
    assert np.all(np.abs(q) <= 127) and np.max(np.abs(q)) == 127
    assert np.all(scales[1, 1, 1] == 0) and np.all(quant.dequantize(q, scales)[1, 1, :, 1] == 0)
    # per-dim channels: the outlier dim does not coarsen its neighbours
    assert scales[0, 0, 0, 3] > 10 * scales[0, 0, 0, 2]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_envelope_round_trip_returns_original_dtype_within_bound(dtype):
    x = _kv(1)
    payload = _as(x, dtype)
    env = encode_block(payload, **IDS, codec="int8", dtype=dtype)
    h, out = decode_block(env, allow_lossy=True)
    assert h.lossy and h.codec == codecs.CODEC_INT8 and h.codec_name == "int8"
    assert h.dtype == dtype and h.shape == SHAPE and out.dtype == payload.dtype
    assert h.body_len == quant.body_nbytes(SHAPE) == 4 * 3 * 2 * 2 * 8 + int(np.prod(SHAPE))
    exact = quant.to_float32(payload, dtype)
    got = quant.to_float32(out, dtype)
    _, scales = quant.quantize(payload, dtype)
    rel = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}[dtype]  # output rounding
    assert np.all(np.abs(got - exact) <= scales[:, :, None] / 2 * (1 + 1e-5) + np.abs(exact) * rel * 1.01)
    assert not np.array_equal(got, exact)  # it is lossy
    dst = torch.empty(SHAPE, dtype={"float16": torch.float16, "bfloat16": torch.bfloat16,
                                    "float32": torch.float32}[dtype])
    decode_block_into(env, dst, allow_lossy=True)
    assert np.array_equal(quant.to_float32((dst.view(torch.int16) if dtype == "bfloat16" else dst).numpy(), dtype), got)


def test_ratio_for_a_16_token_float16_block_is_1_6():
    x = np.random.default_rng(2).standard_normal((4, 2, 16, 8, 128)).astype(np.float16)
    env = encode_block(x, **IDS, codec="int8")
    assert abs(x.nbytes / decode_header(env, allow_lossy=True).body_len - 1.6) < 1e-9


def test_exact_readers_refuse_lossy_envelopes():
    env = encode_block(_kv().astype(np.float16), **IDS, codec="int8")
    for call in (lambda: decode_block(env), lambda: decode_header(env),
                 lambda: decode_block_into(env, np.empty(SHAPE, np.float16))):
        with pytest.raises(codecs.LossyCodecError, match="lossy"):
            call()
    assert issubclass(codecs.LossyCodecError, UnknownCodecError)


def test_identity_decides_exact_or_lossy():
    base = dict(model="m", model_revision="r", tokenizer="t", tokenizer_revision="r", tenant="a",
                kv_dtype="float16", block_tokens=16, num_layers=3, num_kv_heads=2, head_dim=8)
    exact = CacheIdentity(**base)
    lossy = CacheIdentity(**base, kv_quant=quant.KV_QUANT_INT8)
    assert exact.fingerprint != lossy.fingerprint
    quant.check_identity_codec(exact, codecs.CODEC_NONE)
    quant.check_identity_codec(lossy, codecs.CODEC_INT8)
    with pytest.raises(codecs.LossyCodecError):
        quant.check_identity_codec(exact, codecs.CODEC_INT8)
    with pytest.raises(codecs.LossyCodecError):
        quant.check_identity_codec(lossy, codecs.CODEC_ZSTD)
    with pytest.raises(codecs.LossyCodecError):
        quant.check_identity_codec(CacheIdentity(**base, kv_quant="fp8"), codecs.CODEC_INT8)


def test_encode_refuses_what_int8_cannot_hold():
    with pytest.raises(ShapeMismatchError):
        encode_block(np.zeros((4, 8), np.float16), **IDS, codec="int8")
    with pytest.raises(DTypeMismatchError):
        encode_block(np.zeros(SHAPE, np.int8), **IDS, codec="int8")
    bad = _kv().astype(np.float16)
    bad[0, 0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_block(bad, **IDS, codec="int8")
    with pytest.raises(ValueError):
        encode_block(_kv(), **IDS, codec="int8", shuffle=True)


def test_damaged_lossy_envelopes_are_typed():
    env = encode_block(_kv().astype(np.float16), **IDS, codec="int8")
    h = decode_header(env, allow_lossy=True)
    # every single-bit flip is refused (sampled bytes: header, scales, int8 values, trailer)
    for byte in list(range(0, h.header_len, 7)) + [h.header_len + 1, h.header_len + 200, len(env) - 40, len(env) - 1]:
        buf = bytearray(env)
        buf[byte] ^= 0x10
        with pytest.raises(EnvelopeError):
            decode_block(bytes(buf), allow_lossy=True)
    for cut in (10, h.header_len, len(env) - 1):
        with pytest.raises(TruncatedEnvelopeError):
            decode_block(env[:cut], allow_lossy=True)
    with pytest.raises(ChecksumMismatchError):
        decode_block(env[:-1] + bytes([env[-1] ^ 1]), allow_lossy=True)

    def crafted(offset, fmt, value) -> bytes:
        buf = bytearray(env)
        struct.pack_into(fmt, buf, offset, value)
        return bytes(_reseal(buf))

    with pytest.raises(CorruptEnvelopeError, match="int8 codec"):  # body length disagrees with shape
        decode_block(crafted(OFF_BODY, "<Q", h.body_len - 1), allow_lossy=True)
    with pytest.raises(CorruptEnvelopeError):  # 4-d payload cannot be int8 (shape changed, raw_len follows)
        decode_block(crafted(OFF_NDIM, "<B", 4), allow_lossy=True)
    with pytest.raises(CorruptEnvelopeError, match="scale"):  # a NaN scale
        decode_block(crafted(h.header_len, "<f", float("nan")), allow_lossy=True)
    with pytest.raises(CorruptEnvelopeError, match="scale"):
        decode_block(crafted(h.header_len, "<f", -1.0), allow_lossy=True)
    with pytest.raises(CorruptEnvelopeError, match="-128"):
        decode_block(crafted(h.header_len + 4 * 96, "<b", -128), allow_lossy=True)
