"""Compiled kernels for the copies torch runs slowly: host blocks into a DynamicCache
(Numba, below), both directions of vLLM's CPU paged layout (Numba, after it), and on
CUDA the paged layout's device pass (Triton, at the end).

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
load after that: the ART kernels' compile cache, index_backends/_art_kernels.py;
engine/jit.py).
Without Numba (or with ``QUIVER_COPY_JIT=off``) ``scatter_rows`` and
``paged_cpu_copy`` return False and the caller copies with torch: same bytes,
slower.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

from quiver.engine.jit import compiled, once


def _scatter_rows_py(src, rows, blocks, layer, kv, dst):
    """``dst[h, blocks[j]*T + i, :] = src[rows[j], layer, kv, i, h, :]`` for every
    j, token i and head h, in source order (the Numba subset; ``src``
    ``[m, L, 2, T, H, w]`` of any strides, e.g. L0's arena seen slot by slot;
    ``dst`` a C-contiguous ``[H, seq, w]``, both of one integer dtype)."""
    t, h, w = src.shape[3], src.shape[4], src.shape[5]
    for j in range(rows.shape[0]):
        r = rows[j]
        s0 = blocks[j] * t
        for i in range(t):
            for hh in range(h):
                for k in range(w):
                    dst[hh, s0 + i, k] = src[r, layer, kv, i, hh, k]


def _kernel():
    """The compiled kernel, or None (no Numba, or turned off)."""
    return once("scatter_rows", lambda: compiled(_scatter_rows_py), logging.WARNING,
                 "copy kernel unavailable, DynamicCache copies stay in torch")


def _nt_kernel():
    """The non-temporal variant (engine/_vector_kernels.py), or None (no Numba, or turned off)."""
    def make():
        from quiver.engine._vector_kernels import scatter_rows_nt_py

        return compiled(scatter_rows_nt_py)

    return once("scatter_rows_nt", make, logging.WARNING,
                 "non-temporal copy kernel unavailable, DynamicCache copies use the plain one")


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
    target = dynamic_target(pairs, tuple(src.shape[1:]), src.dtype)
    if target is None:
        return False
    n = src.shape[0]
    rows = np.arange(n, dtype=np.int64)
    return scatter_block_rows(src.detach().view(torch.uint8).numpy().reshape(n, -1), 0, rows, rows, target)


class DynamicTarget(NamedTuple):
    """A DynamicCache's tensors as the kernel writes them, checked once
    (:func:`dynamic_target`), for any number of :func:`scatter_block_rows`."""

    block_shape: tuple  # [L, 2, T, H, D]
    row: int            # bytes of one head's D elements: the run both layouts share
    width: int          # bytes of the kernel's word; 16: the non-temporal kernel's 16-byte moves
    words: list         # per (layer, K/V), layer-major: [H, seq, row // width] of width-byte
    #                     integers; for width 16 the tensor's bytes, flat
    seq: int            # tokens every tensor holds


def dynamic_target(pairs, block_shape: tuple, dtype: torch.dtype) -> DynamicTarget | None:
    """Batch row 0 of each layer's (keys, values) ``[batch, H, seq, D]`` ready
    for the kernel, or None when it cannot write them (kernel unavailable, a
    tensor not C-contiguous in that row, another dtype or shape): the caller
    copies with torch."""
    layers, _, t, h, d = block_shape
    dsts = [tensor[0] for pair in pairs for tensor in pair]
    if _kernel() is None or len(dsts) != 2 * layers or not all(
            x.device.type == "cpu" and x.is_contiguous() and x.dtype == dtype and x.dim() == 3
            and x.shape[0] == h and x.shape[2] == d for x in dsts):
        return None
    row = d * torch.tensor([], dtype=dtype).element_size()
    seq = min(x.shape[1] for x in dsts)
    # Rows on 16-byte boundaries: written non-temporally (engine/_vector_kernels.py), as a
    # restore's tensors are fresh, their lines in no cache.
    if row % 16 == 0 and all(x.data_ptr() % 16 == 0 for x in dsts) and _nt_kernel() is not None:
        return DynamicTarget(tuple(block_shape), row, 16, [_words(x, 1).reshape(-1) for x in dsts], seq)
    # Else the widest word a row divides into.  The source may sit at any byte (an arena slot's
    # body follows a 268 B header for 8 layers): x86 loads it unaligned, 14.6-15.1 ms for a
    # 128 MiB restore against 16.6-17.0 with 4-byte words (8 layers, D=64, float32).
    width = next(w for w in (8, 4, 2, 1) if row % w == 0 and all(x.data_ptr() % w == 0 for x in dsts))
    return DynamicTarget(tuple(block_shape), row, width, [_words(x, width) for x in dsts], seq)


def scatter_block_rows(src: np.ndarray, offset: int, rows, blocks, target: DynamicTarget) -> bool:
    """Copy block payloads out of the rows of a 2-D ``uint8`` array into a
    DynamicCache's tensors (``target``): the payload of block ``blocks[j]``
    (tokens ``[blocks[j]*T, (blocks[j]+1)*T)``) is ``src[rows[j], offset:offset +
    nbytes]``, ``[L, 2, T, H, D]``.  ``src`` is a staging array of whole blocks
    (offset 0), a chunk buffer, or L0's arena seen as ``[slots, slot_bytes]``
    (offset: the envelope's header), so a RAM hit is copied once, straight into
    the cache (engine/sink.py).  True when done; False (nothing copied) when an
    index would fall outside ``src`` or the cache."""
    layers, _, t, h, _ = target.block_shape
    row, width = target.row, target.width
    nbytes = layers * 2 * t * h * row
    rows, blocks = np.asarray(rows, dtype=np.int64), np.asarray(blocks, dtype=np.int64)
    # The kernel runs without bounds checks: every index it takes is checked here.
    if (src.dtype != np.uint8 or src.ndim != 2 or src.strides[1] != 1 or not 0 <= offset <= src.shape[1] - nbytes
            or len(rows) != len(blocks)):
        return False
    if len(rows) and (rows.min() < 0 or rows.max() >= src.shape[0] or blocks.min() < 0
                      or (int(blocks.max()) + 1) * t > target.seq):
        return False
    if width == 16:
        kernel, part = _nt_kernel(), t * h * row  # one layer's K (or V) of a payload
        for i, x in enumerate(target.words):
            kernel(src, offset + i * part, rows, blocks, t, h, row, x, len(x) // (h * row))
        return True
    word = {8: np.int64, 4: np.int32, 2: np.int16, 1: np.int8}[width]
    s = np.ndarray((src.shape[0], layers, 2, t, h, row // width), dtype=word, buffer=src, offset=offset,
                   strides=(src.strides[0], 2 * t * h * row, t * h * row, h * row, row, width))
    kernel = _kernel()
    for i, x in enumerate(target.words):
        kernel(s, rows, blocks, i // 2, i % 2, x)
    return True


# --- vLLM's CPU paged layout: a chunk's blocks of one layer in one call (Numba) -------------
#
# A vLLM CPU KV tensor per layer is [num_blocks, H, T, 2*D], and the bytes of one (block,
# head) are K stored transposed, [D, T], then V, [T, D] (engine/torch_io.py).  torch moves
# them with one strided ``copy_`` per run of consecutive block ids, layer and K/V, each
# ~12 us of setup: a block table fragmented as vLLM's is (~4.75 runs per 16 blocks) took
# 1.45-1.78 ms per 16 x 256 KiB blocks to scatter.  The kernel (engine/_vector_kernels.py)
# moves every block of a chunk for one layer in one call, whatever the block ids: K in 8 x 8
# tiles transposed by vector shuffles, both K and V written with non-temporal stores.


def _paged_cpu_kernel():
    """The compiled kernel, or None (no Numba, or turned off)."""
    def make():
        from quiver.engine._vector_kernels import paged_cpu_py

        return compiled(paged_cpu_py)

    return once("paged_cpu", make, logging.WARNING, "copy kernel unavailable, vLLM CPU paged copies stay in torch")


def _u16(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous tensor's bytes as a flat array of 2-byte integers (zero-copy)."""
    return t.detach().view(torch.uint8).numpy().view(np.uint16).reshape(-1)


def paged_cpu_copy(blocks: torch.Tensor, kv_caches, ids: np.ndarray, gather: bool) -> bool:
    """Copy between host block payloads ``blocks`` ``[m, L, 2, T, H, D]`` and
    blocks ``ids`` of vLLM-CPU paged layers ``kv_caches`` (each ``[num_blocks,
    H, T, 2*D]``, already checked against the layout by the caller): ``gather``
    copies the layers' blocks into ``blocks``, else ``blocks`` into the layers.
    True when done; False (nothing copied) when the kernel does not apply --
    unavailable, elements not 2 bytes, T or D not a multiple of 8, a tensor
    not C-contiguous, the destination not on a 16-byte boundary, an id out of
    range: the caller copies with torch."""
    m, layers, _, t, h, d = blocks.shape
    ids = np.asarray(ids, dtype=np.int64)
    dsts = [blocks] if gather else list(kv_caches)
    if (blocks.element_size() != 2 or t % 8 or d % 8 or len(kv_caches) != layers or len(ids) != m
            or not all(x.device.type == "cpu" and x.dtype == blocks.dtype and x.is_contiguous()
                       for x in [blocks, *kv_caches])
            or any(x.data_ptr() % 16 for x in dsts)):  # the kernel's non-temporal stores need it
        return False
    num_blocks = kv_caches[0].shape[0]
    if any(tuple(x.shape) != (num_blocks, h, t, 2 * d) for x in kv_caches):
        return False
    if len(ids) and (ids.min() < 0 or ids.max() >= num_blocks):
        return False
    kernel = _paged_cpu_kernel()
    if kernel is None:
        return False
    payloads, shape = _u16(blocks), np.array(blocks.shape, dtype=np.int64)
    for layer, x in enumerate(kv_caches):
        kernel(payloads, _u16(x), ids, layer, shape, gather)
    return True


# --- CUDA: the paged layout's runs of all layers in one launch (Triton) -------------------
#
# A vLLM paged KV tensor per layer is [2, num_blocks, T, H, D]: one block's K (or V) of
# one layer is a contiguous run of T*H*D elements.  torch needs one ``index_select`` /
# ``index_copy_`` per layer and K/V (2 x 32 for a 32-layer model), each ~20 us of host
# time to issue: on an H200 a 16-block copy paid 1.3 ms of launches against 0.6 ms for
# its transfer (docs/ENGINES.md).  This kernel moves every run of a chunk in one launch,
# addressing the layers by their element offsets from the first layer's tensor.

def _triton_paged_runs():
    from quiver.engine._triton_copy import paged_runs

    return paged_runs


def _triton_kernel():
    """The Triton kernel, or None (no Triton, or turned off)."""
    return once("paged_runs", _triton_paged_runs, logging.INFO,
                 "Triton unavailable, CUDA paged copies stay in torch")


_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
_RUN_BLOCK = 1024  # words per Triton program


def paged_runs(kv_caches, run_elems: int):
    """For CUDA paged tensors ``[2, num_blocks, T, H, D]`` (``run_elems = T*H*D``), a
    function ``copy(ids, buf, gather)`` that moves the runs of blocks ``ids`` (a device
    int64 tensor) between the layers and ``buf`` ``[m, L, 2, T, H, D]`` (C-contiguous, on
    the same device) in one launch, on the current stream: ``gather`` True copies
    layers -> buf, False buf -> layers.  None when the kernel cannot be used (no Triton,
    ``QUIVER_COPY_JIT=off``, a tensor not contiguous, offsets not word-aligned): the
    caller copies with torch."""
    first = kv_caches[0]
    if first.device.type != "cuda" or not all(t.is_contiguous() for t in kv_caches):
        return None
    kernel = _triton_kernel()
    if kernel is None:
        return None
    size = first.element_size()
    base = first.data_ptr()
    nbytes = run_elems * size
    width = next(w for w in (8, 4, 2, 1)
                 if nbytes % w == 0 and all((t.data_ptr() - base) % w == 0 for t in kv_caches) and base % w == 0)
    run = nbytes // width
    half = first.shape[1] * run  # words from a layer's K region to its V region
    offs = torch.tensor([(t.data_ptr() - base) // width + kv * half for t in kv_caches for kv in range(2)],
                        dtype=torch.int64).to(first.device)
    engine = first.view(-1).view(torch.uint8).view(_WORDS[width])
    n_pairs = 2 * len(kv_caches)

    def copy(ids: torch.Tensor, buf: torch.Tensor, gather: bool) -> None:
        offs.record_stream(torch.cuda.current_stream(first.device))  # freed only after this stream's use
        words = buf.view(-1).view(torch.uint8).view(_WORDS[width])
        grid = (ids.numel() * n_pairs, -(-run // _RUN_BLOCK))
        kernel[grid](engine, words, offs, ids, n_pairs, run, GATHER=gather, BLOCK=_RUN_BLOCK)

    return copy
