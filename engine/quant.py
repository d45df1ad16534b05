"""Lossy int8 KV codec (envelope codec id 3): symmetric, one scale per channel.

A block payload ``[L, 2, T, H, D]`` (layers, K/V, tokens, kv heads, head dim)
is quantized with one float32 scale per **channel = (layer, K/V, head, dim)**,
shared by the block's ``T`` tokens::

    scale[l,k,h,d] = max_t |x[l,k,t,h,d]| / 127          (0 for an all-zero channel)
    q[l,k,t,h,d]   = clip(round_half_even(x / scale), -127, 127)   as int8
    x'             = q * scale   (float32, then rounded to the payload dtype)

so ``|x - q*scale| <= scale/2`` in each channel (plus the float32 rounding of
the division, and the final rounding to float16/bfloat16).  Per-dim channels
follow the known structure of KV: key outliers sit in fixed dimensions (KIVI,
KVQuant), so a per-head or per-token scale would be set by the outliers.  The
price is the scale table: ``4 * L*2*H*D`` bytes beside ``L*2*T*H*D`` int8
bytes, i.e. 4/T bytes per element; with T = 16 a float16 block shrinks
``2 / (1 + 4/16) = 1.6x``.

Envelope body (codec 3): the scales, float32 little-endian, C order ``[L, 2, H,
D]``, then the int8 values, C order ``[L, 2, T, H, D]``.  The header keeps the
*original* dtype and shape (``raw_len`` is the decoded size); decode returns
the original dtype.  Non-finite payloads are refused (no scale represents them).

Lossy bytes are a different cache identity: ``CacheIdentity.kv_quant`` must be
:data:`KV_QUANT_INT8` for int8 blocks and None for exact ones
(:func:`check_identity_codec`).  The envelope records the lossiness in its
codec id, and every decoder refuses codec 3 unless the caller passes
``allow_lossy=True`` (:class:`~engine.codecs.LossyCodecError`).
"""

from __future__ import annotations

import numpy as np

from quiver.engine.codecs import CODEC_INT8, LossyCodecError
from quiver.engine.errors import CorruptEnvelopeError, DTypeMismatchError, InvalidPayloadError, ShapeMismatchError

#: The ``CacheIdentity.kv_quant`` value of blocks stored with this codec.
KV_QUANT_INT8 = "int8-channel"
QMAX = 127
#: Payload dtypes the codec accepts (the envelope's dtype names).
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
_FMAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": float(np.finfo(np.float32).max)}


def scales_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale table of a ``[L, 2, T, H, D]`` payload: ``[L, 2, H, D]``."""
    if len(shape) != 5:
        raise ShapeMismatchError(f"int8 codec needs a [L, 2, T, H, D] payload, got shape {shape}")
    return (shape[0], shape[1], shape[3], shape[4])


def body_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of a codec-3 body: float32 scales then int8 values."""
    return 4 * int(np.prod(scales_shape(shape))) + int(np.prod(shape))


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """The payload as float32 (bfloat16 arrives as 2-byte integers)."""
    if dtype == "bfloat16":
        return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype not in FLOAT_DTYPES:
        raise DTypeMismatchError(f"int8 codec quantizes float16/bfloat16/float32, not {dtype}")
    return arr.astype(np.float32, copy=False)


def from_float32_into(x: np.ndarray, dst: np.ndarray, dtype: str) -> None:
    """Round float32 ``x`` to ``dtype`` (nearest even) into flat uint8 ``dst``."""
    x = np.clip(x, -_FMAX[dtype], _FMAX[dtype])  # 127 * (amax/127) may round past the dtype's max
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    else:
        out = x.astype(np.float16 if dtype == "float16" else np.float32)
    dst[:] = out.reshape(-1).view(np.uint8)


def check_finite(arr: np.ndarray, dtype: str) -> None:
    """InvalidPayloadError if the payload (carried dtype) holds NaN or +-Inf.

    BlockStore.put calls this for every block of a lossy identity before
    anything is written; :func:`quantize` checks again (defence in depth)."""
    if dtype == "bfloat16":  # exponent bits all ones: Inf or NaN
        bad = np.any((arr.view(np.uint16) & 0x7F80) == 0x7F80)
    elif dtype in FLOAT_DTYPES:
        bad = not np.all(np.isfinite(arr))
    else:
        raise DTypeMismatchError(f"int8 codec quantizes float16/bfloat16/float32, not {dtype}")
    if bad:
        raise InvalidPayloadError("int8 codec: payload holds NaN or Inf, which no scale can represent")


def quantize(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values ``[L,2,T,H,D]``, float32 scales ``[L,2,H,D]``) of a payload.

    InvalidPayloadError (a ValueError) if it holds NaN or Inf."""
    scales_shape(arr.shape)
    x = to_float32(arr, dtype)
    amax = np.max(np.abs(x), axis=2)
    if not np.all(np.isfinite(amax)):
        raise InvalidPayloadError("int8 codec: payload holds NaN or Inf, which no scale can represent")
    scales = (amax / np.float32(QMAX)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))[:, :, None]
    q = np.clip(np.rint(x / safe), -QMAX, QMAX).astype(np.int8)
    return q, scales


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 ``q * scale`` (broadcast over the token axis)."""
    return q.astype(np.float32) * scales[:, :, None]


def encode_body(arr: np.ndarray, dtype: str) -> list:
    """Body parts of a payload (C-contiguous, carried dtype) for codec 3."""
    q, scales = quantize(arr, dtype)
    return [scales.astype("<f4", copy=False).reshape(-1).view(np.uint8), q.reshape(-1).view(np.uint8)]


def decode_body_into(body: memoryview, dst: np.ndarray, shape: tuple[int, ...], dtype: str) -> None:
    """Decode a codec-3 body into flat uint8 ``dst`` (the original dtype's bytes)."""
    sshape = scales_shape(shape)
    if dtype not in FLOAT_DTYPES:
        raise CorruptEnvelopeError(f"int8 codec with payload dtype {dtype}")
    ns = 4 * int(np.prod(sshape))
    if len(body) != ns + int(np.prod(shape)):
        raise CorruptEnvelopeError(f"int8 body is {len(body)} bytes, expected {body_nbytes(shape)}")
    scales = np.frombuffer(body, dtype="<f4", count=ns // 4).reshape(sshape)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise CorruptEnvelopeError("int8 body: a scale is negative or not finite")
    q = np.frombuffer(body, dtype=np.int8, offset=ns).reshape(shape)
    if np.any(q == -128):
        raise CorruptEnvelopeError("int8 body: value -128 is outside the symmetric range")
    from_float32_into(dequantize(q, scales), dst, dtype)


def check_identity_codec(ident, codec: int) -> None:
    """Refuse an envelope whose lossiness disagrees with the identity's ``kv_quant``."""
    lossy = codec == CODEC_INT8
    if ident.kv_quant is None and lossy:
        raise LossyCodecError("lossy int8 block, but the identity expects exact KV (kv_quant is None)")
    if ident.kv_quant is not None and ident.kv_quant != KV_QUANT_INT8:
        raise LossyCodecError(f"identity kv_quant {ident.kv_quant!r} is not {KV_QUANT_INT8!r}")
    if ident.kv_quant == KV_QUANT_INT8 and not lossy:
        raise LossyCodecError(f"identity expects {KV_QUANT_INT8} blocks, envelope codec is {codec}")


__all__ = [
    "KV_QUANT_INT8",
    "QMAX",
    "scales_shape",
    "body_nbytes",
    "check_finite",
    "quantize",
    "dequantize",
    "encode_body",
    "decode_body_into",
    "check_identity_codec",
]
