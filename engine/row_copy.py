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

#: A get copies its L0 hits with non-temporal stores from this many bytes on.  What
#: decides is whether the destination's lines are still in the cache.  An engine restores
#: a prefix into KV memory it has not touched lately (cold): there non-temporal stores
#: won from 1 MiB on (256 KiB blocks, get of 1/2/4/8/16 MiB: x0.86/0.78/0.72/0.67/0.64 of
#: numpy's time; 2 MiB blocks, 4/8/16 MiB: x0.77/0.75/0.74).  Into an array copied to again
#: and again (hot) numpy won below 4 MiB (non-temporal x1.27-1.51 of its time), was about
#: even at 4-8 MiB (x0.95-1.17) and behind at 16 MiB (x0.72-0.90).  From 4 MiB on, a cold
#: get gains 83-300 us and a hot one loses at most 76 us (2 x 2 MiB).  Through
#: BlockStore.get, cold = 24 prefixes and outs in turn (> the 32 MiB L3), one thread,
#: interleaved, 2026-12-05 (docs/STORE.md).
NT_MIN_BYTES = 4 << 20

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
