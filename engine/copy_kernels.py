"""A compiled kernel for the one host copy torch runs slowly: blocks into a DynamicCache.

Quiver's payload is ``[n, L, 2, T, H, D]`` (tokens before heads); a
transformers DynamicCache layer is ``[batch, H, seq, D]``.  The only run both
share is one head's ``D`` elements (256 B for D = 128), so the copy is
millions of short rows.  torch's ``copy_`` (and numpy's ``copyto``) iterate in
the destination's order, head by head, reading every block's rows 2 KiB apart
on each of H passes, and pay their per-row loop overhead: studies/bench_copy.py
measured 0.44-0.57 of memcpy for ``dynamic-scatter``.  This kernel walks the
source in order instead (block, token, head: each block-layer read once,
sequentially, while H destination streams advance 256 B at a time), with the
row copy compiled: 0.6-0.98 of memcpy in the same measurement over three runs
(docs/ENGINES.md).
The gather direction (cache to blocks) gained nothing this way and stays in
torch.

Compiled by Numba at the first call in a process (about 0.7 s cold, a cache
load after that: the ART kernels' compile cache, index_backends/_art_kernels.py).
Without Numba (or with ``QUIVER_COPY_JIT=off``) ``scatter_rows`` returns False
and the caller copies with torch: same bytes, slower.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch

log = logging.getLogger("quiver.engine")

#: ``off`` keeps every copy in torch (a baseline for studies and tests).
JIT_ENV = "QUIVER_COPY_JIT"

_lock = threading.Lock()
_compiled = None   # the Numba dispatcher, once made
_failed = False    # Numba missing or failed: torch copies from then on


def _scatter_rows_py(src, layer, kv, dst):
    """``dst[h, b*T + i, :] = src[b, layer, kv, i, h, :]`` for every block b,
    token i and head h, in source order (the Numba subset; ``src`` and
    ``dst`` are C-contiguous arrays of one integer dtype)."""
    n, t, h, w = src.shape[0], src.shape[3], src.shape[4], src.shape[5]
    for b in range(n):
        for i in range(t):
            s = b * t + i
            for hh in range(h):
                for k in range(w):
                    dst[hh, s, k] = src[b, layer, kv, i, hh, k]


def _kernel():
    """The compiled kernel, or None (no Numba, or turned off)."""
    global _compiled, _failed
    if os.environ.get(JIT_ENV, "").lower() == "off":
        return None
    if _compiled is not None or _failed:
        return _compiled
    with _lock:
        if _compiled is None and not _failed:
            try:
                from numba import njit

                from quiver.index_backends._art_kernels import attach_cache

                disp = njit(nogil=True, boundscheck=False)(_scatter_rows_py)
                attach_cache(disp, _scatter_rows_py)
                _compiled = disp
            except Exception as exc:  # noqa: BLE001 - any failure: torch copies instead
                _failed = True
                log.warning("copy kernel unavailable, DynamicCache copies stay in torch: %s", exc)
    return _compiled


def _words(t: torch.Tensor, width: int) -> np.ndarray:
    """A C-contiguous tensor's bytes as a numpy array of ``width``-byte integers,
    same shape but the last dimension (zero-copy)."""
    return t.detach().view(torch.uint8).numpy().view({8: np.int64, 4: np.int32, 2: np.int16, 1: np.int8}[width])


def scatter_rows(src: torch.Tensor, pairs) -> bool:
    """Copy host blocks ``src`` ``[n, L, 2, T, H, D]`` into tokens ``[0, n*T)`` of
    batch row 0 of each layer's (keys, values) ``[batch, H, seq, D]``, on the
    CPU.  True when done; False (nothing copied) when the kernel is unavailable,
    a tensor is not C-contiguous or the shapes do not fit (the caller's own
    checks raise for those): the caller copies with torch."""
    if src.device.type != "cpu" or not src.is_contiguous() or src.dim() != 6:
        return False
    n, layers, _, t, h, d = src.shape
    dsts = [tensor[0] for pair in pairs for tensor in pair]
    # The kernel runs without bounds checks: every shape it indexes is checked here.
    if len(dsts) != 2 * layers or not all(
            x.device.type == "cpu" and x.is_contiguous() and x.dtype == src.dtype and x.dim() == 3
            and x.shape[0] == h and x.shape[1] >= n * t and x.shape[2] == d for x in dsts):
        return False
    row = src.shape[-1] * src.element_size()
    ptrs = [src.data_ptr()] + [x.data_ptr() for x in dsts]
    width = next(w for w in (8, 4, 2, 1) if row % w == 0 and all(p % w == 0 for p in ptrs))
    kernel = _kernel()
    if kernel is None:
        return False
    s = _words(src, width)
    for i, x in enumerate(dsts):
        kernel(s, i // 2, i % 2, _words(x, width))
    return True
