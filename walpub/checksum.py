"""CRC32C, the one checksum of every format here (docs/FORMAT.md), from one place.

Every envelope, WAL frame, index record, manifest and L2 object is checked
with CRC32C (Castagnoli, reflected, initial value 0 as the caller sees it, the
value ``crc32c.crc32c(data)`` returns).  A read from disk or L2 verifies each
byte once, so the checksum's speed is a share of every such read: the
``crc32c`` package's SSE4.2 loop ran at 27 GB/s on a 256 KiB buffer here,
about the speed of a page-cache copy (the one check took as long as the read),
while aws-c-checksums (``awscrt``), which folds with AVX-512 carry-less
multiplies where the CPU has them, ran at 54-56 GB/s on the same buffers and
releases the GIL (2026-12-05, AMD EPYC, 2 cores).  The values are the same
function's: the tests check this module against the ``crc32c`` package.  Its
price is at import: loading ``_awscrt`` takes ~35 ms here (``import quiver``
0.20 -> 0.22-0.24 s in the first-request study), paid once per process; a lazy
import would not save it, since a store's open already checks WAL frames.

``crc32c(data, value)`` takes any C-contiguous buffer (bytes, memoryview,
numpy array, mmap) and continues from ``value``, the CRC of the bytes before.

``crc32c_combine(crc_a, crc_b, len_b)`` is the CRC32C of ``A || B`` from the
CRCs of its pieces and ``len(B)`` (CRC32C is linear), with no pass over the
bytes: an envelope with layer CRCs gets its whole CRC from its layers' (the
body read once, not twice: docs/FORMAT.md).  0.19 us a call here, against
0.25 us for a CRC32C pass over 4 KiB and 0.50 us over 16 KiB, so a caller
combines pieces of ``COMBINE_MIN_BYTES`` or more and runs the CRC over smaller
ones again (at 1 KiB the two were even).
"""

from __future__ import annotations

from awscrt.checksums import combine_crc32c as _aws_combine
from awscrt.checksums import crc32c as _aws_crc32c

#: CRC32C of a buffer, continuing from a previous value: ``crc32c(data, value=0)``.
crc32c = _aws_crc32c
#: CRC32C of ``A || B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``: ``crc32c_combine(crc_a, crc_b, len_b)``.
crc32c_combine = _aws_combine
#: Pieces at least this large are combined; smaller ones are cheaper to CRC again.
COMBINE_MIN_BYTES = 4 * 1024


def crc32c_of(pieces) -> int:
    """CRC32C of the pieces' bytes in order (an object read in pieces): one pass, no join."""
    crc = 0
    for piece in pieces:
        crc = _aws_crc32c(piece, crc)
    return crc


__all__ = ["COMBINE_MIN_BYTES", "crc32c", "crc32c_combine", "crc32c_of"]
