"""The store's CRC32C (walpub/checksum.py) against the crc32c package, its combine against the CRC
of the joined bytes, and the envelope CRC the combine makes."""

from __future__ import annotations

import crc32c
import numpy as np
import pytest

from quiver.engine.envelope import decode_block, prepare_envelope, uniform_layer_offsets
from quiver.walpub import checksum


@pytest.mark.parametrize("len_a, len_b", [(0, 0), (0, 5), (7, 0), (1, 1), (168, 3), (33, 65536), (4096, 1 << 21),
                                          (5, checksum.COMBINE_MIN_BYTES - 1)])
def test_combine_is_the_crc_of_the_concatenation(len_a, len_b):
    rng = np.random.default_rng(len_a * 31 + len_b)
    a, b = rng.bytes(len_a), rng.bytes(len_b)
    assert checksum.crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len_b) == crc32c.crc32c(a + b)


@pytest.mark.parametrize("layers, heads, dim", [(1, 4, 128), (3, 4, 128), (32, 4, 128), (3, 1, 128), (3, 1, 32)])
def test_an_envelope_with_layer_crcs_has_the_crc_of_its_bytes(layers, heads, dim):
    """Layers above and below COMBINE_MIN_BYTES: the trailing CRC is the one a reader computes."""
    rng = np.random.default_rng(layers)
    payload = rng.integers(0, 2**16, (layers, 2, 16, heads, dim), dtype=np.uint16).view(np.float16)
    layer_bytes = payload.nbytes // layers  # 32 KiB, 8 KiB (combined), 2 KiB (under COMBINE_MIN_BYTES: CRC'd again)
    assert (layer_bytes >= checksum.COMBINE_MIN_BYTES) == (dim == 128)  # both sides of the threshold are covered
    z = bytes(32)
    enc = prepare_envelope(payload, fingerprint=z, key=z, parent=z, token_count=16,
                           layer_offsets=uniform_layer_offsets(layers, payload.nbytes), layer_crcs=True)
    data = enc.tobytes()
    assert data[-4:] == crc32c.crc32c(data[:-4]).to_bytes(4, "little")
    assert np.array_equal(decode_block(data)[1].view(np.uint16), payload.view(np.uint16))


@pytest.mark.parametrize("nbytes", [0, 1, 3, 180, 4095, 65537, 1 << 21])
def test_the_stores_crc32c_is_the_crc32c_packages(nbytes):
    """quiver.walpub.checksum (awscrt) gives the values of the format's reference
    (the ``crc32c`` package) for every buffer kind a read or put hands it, whole
    and continued from a previous value."""
    rng = np.random.default_rng(nbytes)
    data = rng.bytes(nbytes)
    want = crc32c.crc32c(data)
    half = nbytes // 2
    arr = np.frombuffer(data, np.uint8).copy()
    for buf in (data, bytearray(data), memoryview(data), arr, memoryview(arr)):
        assert checksum.crc32c(buf) == want
    if nbytes % 2 == 0:
        assert checksum.crc32c(arr.view(np.float16).reshape(2, -1) if nbytes else arr) == want
    assert checksum.crc32c(memoryview(data)[half:], checksum.crc32c(memoryview(data)[:half])) == want
    assert checksum.crc32c_of([data[:half], memoryview(data)[half:]]) == want
    assert checksum.crc32c(data, 0x12345678) == crc32c.crc32c(data, 0x12345678)


def test_the_stores_crc32c_refuses_a_strided_buffer():
    """A non-contiguous view is refused (typed), never checksummed as other bytes."""
    with pytest.raises((ValueError, BufferError, TypeError)):
        checksum.crc32c(np.arange(64, dtype=np.uint8)[::2])
