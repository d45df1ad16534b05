"""CRC32C combine (engine/crcs.py) against the CRC of the joined bytes, and the envelope CRC it now makes."""

from __future__ import annotations

import crc32c
import numpy as np
import pytest

from quiver.engine import crcs
from quiver.engine.envelope import decode_block, prepare_envelope, uniform_layer_offsets


@pytest.mark.parametrize("len_a, len_b", [(0, 0), (0, 5), (7, 0), (1, 1), (168, 3), (33, 65536), (4096, 1 << 21),
                                          (5, crcs.COMBINE_MIN_BYTES - 1)])
def test_combine_is_the_crc_of_the_concatenation(len_a, len_b):
    rng = np.random.default_rng(len_a * 31 + len_b)
    a, b = rng.bytes(len_a), rng.bytes(len_b)
    assert crcs.combine(crc32c.crc32c(a), crc32c.crc32c(b), len_b) == crc32c.crc32c(a + b)


@pytest.mark.parametrize("layers, heads", [(1, 4), (3, 4), (32, 4), (3, 1)])  # 32 KiB layers; 8 KiB ones
def test_an_envelope_with_layer_crcs_has_the_crc_of_its_bytes(layers, heads):
    """Layers above and below COMBINE_MIN_BYTES: the trailing CRC is the one a reader computes."""
    rng = np.random.default_rng(layers)
    payload = rng.integers(0, 2**16, (layers, 2, 16, heads, 128), dtype=np.uint16).view(np.float16)
    z = bytes(32)
    enc = prepare_envelope(payload, fingerprint=z, key=z, parent=z, token_count=16,
                           layer_offsets=uniform_layer_offsets(layers, payload.nbytes), layer_crcs=True)
    data = enc.tobytes()
    assert data[-4:] == crc32c.crc32c(data[:-4]).to_bytes(4, "little")
    assert np.array_equal(decode_block(data)[1].view(np.uint16), payload.view(np.uint16))
