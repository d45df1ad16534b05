"""Envelope codecs: encode and decode throughput and compression ratio.

One float16 KV block of normal-distributed values (``[32, 2, 16, 8, 128]``,
2 MiB, in quick and full modes) through every codec, with and without the
byte-shuffle pre-filter.  Encode is ``encode_block`` (payload -> envelope
bytes, CRC included); decode is ``decode_block_into`` (verify CRC, decompress
into a preallocated destination: the engine's path into an arena slot).
CRC32C over the same number of bytes is the physical reference: no envelope
can be encoded or decoded faster than its checksum.

``extra_info``: ``payload_bytes`` (raw bytes per round), ``encoded_bytes``,
``ratio`` (payload / envelope bytes), ``mb_per_s`` (payload bytes / median round
time, 1 MB = 1e6 bytes), codec, shuffle, shape, chunk size.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from quiver.engine import codecs
from quiver.engine.envelope import decode_block_into, encode_block
from quiver.walpub.checksum import crc32c
from .config import pick

SHAPE = pick(smoke=(2, 2, 16, 8, 128), quick=(32, 2, 16, 8, 128), full=(32, 2, 16, 8, 128))
ROUNDS = pick(smoke=1, quick=30, full=100)
WARMUP = pick(smoke=0, quick=2, full=5)
IDS = dict(fingerprint=b"\x01" * 32, key=b"\x02" * 32, parent=b"\x03" * 32, token_count=16)
CASES = [("none", False), ("lz4", False), ("lz4", True), ("zstd", False), ("zstd", True)]


def _payload() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float16)


def _run(benchmark, fn, *args, **kwargs) -> float:
    """Run ``fn`` under the benchmark; the median seconds per call.

    With ``--benchmark-disable`` (smoke) pytest-benchmark keeps no stats, so
    one extra call is timed here instead: a real number, just not a stable one.
    """
    benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    if benchmark.stats is not None:
        return benchmark.stats.stats.median
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _record(benchmark, seconds: float, payload_bytes: int, **extra) -> None:
    benchmark.extra_info.update(
        {
            "payload_bytes": payload_bytes,
            "median_s": seconds,
            "mb_per_s": payload_bytes / seconds / 1e6 if seconds > 0 else None,
            "shape": list(SHAPE),
            "dtype": "float16",
            **extra,
        }
    )


@pytest.mark.parametrize("codec, shuffle", CASES, ids=[f"{c}{'+shuffle' if s else ''}" for c, s in CASES])
def test_encode(benchmark, codec, shuffle):
    benchmark.group = "codecs"
    arr = _payload()
    env = encode_block(arr, **IDS, codec=codec, shuffle=shuffle)
    seconds = _run(benchmark, encode_block, arr, **IDS, codec=codec, shuffle=shuffle)
    dst = np.empty_like(arr)
    decode_block_into(env, dst)
    assert np.array_equal(dst.view(np.uint16), arr.view(np.uint16))
    _record(benchmark, seconds, arr.nbytes, op="encode", codec=codec, shuffle=shuffle,
            encoded_bytes=len(env), ratio=arr.nbytes / len(env),
            chunk_size=0 if codec == "none" else codecs.DEFAULT_CHUNK_SIZE)


@pytest.mark.parametrize("codec, shuffle", CASES, ids=[f"{c}{'+shuffle' if s else ''}" for c, s in CASES])
def test_decode(benchmark, codec, shuffle):
    benchmark.group = "codecs"
    arr = _payload()
    env = encode_block(arr, **IDS, codec=codec, shuffle=shuffle)
    dst = np.empty_like(arr)
    decode_block_into(env, dst)  # first touch of dst outside the timing
    dst[:] = 0
    seconds = _run(benchmark, decode_block_into, env, dst)
    assert np.array_equal(dst.view(np.uint16), arr.view(np.uint16))
    _record(benchmark, seconds, arr.nbytes, op="decode", codec=codec, shuffle=shuffle,
            encoded_bytes=len(env), ratio=arr.nbytes / len(env),
            chunk_size=0 if codec == "none" else codecs.DEFAULT_CHUNK_SIZE)


def test_crc32c_reference(benchmark):
    """CRC32C over as many bytes as one payload: the floor under every codec's cost."""
    benchmark.group = "codecs"
    buf = _payload().tobytes()
    seconds = _run(benchmark, crc32c, buf)
    half = len(buf) // 2  # the incremental form the envelope uses agrees with one pass
    assert crc32c(buf[half:], crc32c(buf[:half])) == crc32c(buf)
    _record(benchmark, seconds, len(buf), op="crc32c", codec="crc32c only", shuffle=False)
