"""A get's L0 hits copied into the caller's array: numpy, or for a large get
non-temporal stores (a Numba kernel, engine/_vector_kernels.py).

A store to a line no cache holds reads the line first, and a get of more bytes than
the cache holds evicts what it wrote before anyone reads it; non-temporal stores write
whole lines without reading them and without keeping them.  The kernel is loaded on a
background thread at the first get that large (engine/jit.py): no get waits for it
(that one and any until it is loaded copy with numpy), and a store's open and small
gets never compete with its loading for the CPU.  Torch-free, like the store.
"""

from __future__ import annotations

import logging

import numpy as np

from quiver.engine.jit import compiled, once, once_in_background

#: A get copies its L0 hits with non-temporal stores from this many bytes on.  Into an
#: array the caller reuses (lines still cached), numpy was faster up to 8 MiB (4 x 2 MiB:
#: 233 against 300 us; 16 x 256 KiB: 111 against 150 us), even at 16 MiB (682 against 627
#: us) and behind above it (64 x 256 KiB: 1.06 against 0.62-0.70 ms; 64 x 2 MiB: 8.5-9.7
#: against 5.5-5.9 ms); this machine's L3 is 32 MiB (one thread, 2026-12-05).
NT_MIN_BYTES = 16 << 20

_NAME = "copy_rows_nt"
_WHAT = "non-temporal copy kernel unavailable, L0 hits are copied with numpy"


def _make():
    from quiver.engine._vector_kernels import copy_rows_nt_py

    return compiled(copy_rows_nt_py)


def wait_loaded() -> bool:
    """Load the kernel now (studies and tests: timings and checks of the steady state).
    True when it is in use."""
    return once(_NAME, _make, logging.WARNING, _WHAT) is not None


def copy_rows(src: np.ndarray, offset: int, src_rows: list[int], dst: np.ndarray, dst_rows: list[int]) -> None:
    """``dst[dst_rows[j]] = src[src_rows[j], offset:offset + dst.shape[1]]`` for every
    j (``src`` and ``dst`` 2-D ``uint8``, every index in range: the caller's).  With
    non-temporal stores where the rows come to :data:`NT_MIN_BYTES` or more, the
    kernel is loaded and ``dst``'s rows are on 16-byte boundaries; else numpy."""
    row = dst.shape[1]
    if (len(src_rows) and len(src_rows) * row >= NT_MIN_BYTES and row % 16 == 0 and dst.strides[1] == 1
            and dst.strides[0] % 16 == 0 and dst.ctypes.data % 16 == 0 and src.strides[1] == 1
            and 0 <= offset <= src.shape[1] - row):
        kernel = once_in_background(_NAME, _make, logging.WARNING, _WHAT)
        if kernel is not None:
            s, d = np.asarray(src_rows, dtype=np.int64), np.asarray(dst_rows, dtype=np.int64)
            # The kernel runs without bounds checks: the rows are checked here too.
            if 0 <= s.min() and s.max() < src.shape[0] and 0 <= d.min() and d.max() < dst.shape[0]:
                kernel(src, offset, s, dst, d, row)
                return
    for r, d in zip(src_rows, dst_rows):
        dst[d] = src[r, offset:offset + row]
