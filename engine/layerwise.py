"""Layerwise blocks: fetch layer i+1 while layer i is being consumed (the ObjectCache idea).

Format: one object per block, the ordinary envelope with codec ``none``, a
uniform per-layer offset table and a **per-layer CRC32C table** in the header
(flag bit 2; docs/FORMAT.md).  With codec none the body is the raw payload,
so layer ``i`` of a block is one ranged GET of
``header_len + [offsets[i], offsets[i+1])``.

Integrity of a ranged read: the header is fetched first and checked by its
own CRC (and by the identity guard against the request); each layer's bytes
are then checked against that layer's CRC32C in the verified header before a
byte is copied out.  The envelope's trailing CRC covers the whole object and is
never read by a layerwise reader.  Without the per-layer table (an envelope
written with ``layer_crcs=False``) a ranged read would be covered by nothing:
the loader refuses such objects.

Loader: :class:`LayerwiseLoader` reads the n headers of a request, then
fetches layer by layer.  Layer ``i`` is n ranged GETs (one per block) run on a
thread pool; at most ``depth`` layers are in flight ahead of the one being
consumed (``depth * n`` requests), and each fetched layer is verified and
copied once into its place in the destination ``[n, L, 2, T, H, D]``.
``depth=0`` is the serial baseline: fetch a layer, consume it, fetch the next.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np

from quiver.engine.envelope import EnvelopeHeader, decode_header, encode_block, header_size, uniform_layer_offsets, verify_layer
from quiver.engine.errors import BlockNotFoundError, CorruptEnvelopeError, ShapeMismatchError
from quiver.engine.guard import Expected, check_header, expected_for
from quiver.engine.identity import CacheIdentity

#: Upper bounds (TIGER_STYLE: every queue bounded).
MAX_DEPTH = 64
MAX_WORKERS = 64

GetRange = Callable[[bytes, int, int], "bytes | None"]


def encode_layerwise(payload, *, fingerprint: bytes, key: bytes, parent: bytes, token_count: int,
                     dtype: str | None = None) -> bytes:
    """The envelope of a ``[L, ...]`` payload with per-layer offsets and CRCs (codec none)."""
    if hasattr(payload, "element_size"):  # torch tensor
        nbytes = payload.numel() * payload.element_size()
    else:
        nbytes = np.asarray(payload).nbytes
    return encode_block(payload, fingerprint=fingerprint, key=key, parent=parent, token_count=token_count,
                        dtype=dtype, layer_offsets=uniform_layer_offsets(payload.shape[0], nbytes), layer_crcs=True)


def expected_chain(ident: CacheIdentity, keys: Sequence[bytes], root: bytes) -> list[Expected]:
    """Expectations for consecutive chain keys ``keys`` whose first parent is ``root``."""
    parents = [root, *keys[:-1]]
    return [expected_for(ident, k, p) for k, p in zip(keys, parents)]


class LayerwiseLoader:
    """Iterate the layers of n layerwise block objects with fetches overlapped.

    ``get_range(object_key, start, length)`` is an object store's ranged read
    (``tier.objectstore.ObjectStore.get_range``).  ``expected[j]`` is what
    block ``j`` must be (:func:`expected_chain`).  Iterating yields layer
    indices in order; when ``i`` is yielded, ``out[:, i]`` holds layer ``i`` of
    every block, verified.  Errors: BlockNotFoundError (object missing),
    IdentityMismatchError (header is another block), envelope errors (CRC,
    corrupt header), ShapeMismatchError (destination).
    """

    def __init__(self, get_range: GetRange, object_keys: Sequence[bytes], expected: Sequence[Expected], *,
                 depth: int = 2, workers: int | None = None, out: np.ndarray | None = None) -> None:
        if len(object_keys) != len(expected) or not object_keys:
            raise ValueError(f"{len(object_keys)} object keys for {len(expected)} expectations")
        if not 0 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth {depth} outside [0, {MAX_DEPTH}]")
        self.get_range = get_range
        self.object_keys = list(object_keys)
        self.expected = list(expected)
        self.depth = depth
        n = len(self.object_keys)
        self.workers = workers or min(MAX_WORKERS, max(1, depth) * n)
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers {self.workers} outside [1, {MAX_WORKERS}]")
        self.headers: list[EnvelopeHeader] = []
        self.out = out
        self.fetch_seconds = 0.0  # summed wall time of the per-layer waits (for studies)

    def _header(self, j: int) -> EnvelopeHeader:
        want = self.expected[j]
        num_layers = want.shape[0]
        buf = self.get_range(self.object_keys[j], 0, header_size(num_layers, True))
        if buf is None:
            raise BlockNotFoundError(f"layerwise object {self.object_keys[j][:8].hex()} not found")
        h = decode_header(buf)
        check_header(h, want)
        if not h.layer_crcs or len(h.layer_offsets) != num_layers:
            raise CorruptEnvelopeError(f"block {j} is not a layerwise object ({len(h.layer_crcs)} layer CRCs, "
                                       f"{len(h.layer_offsets)} layers, want {num_layers})")
        return h

    def _destination(self) -> np.ndarray:
        h = self.headers[0]
        shape = (len(self.headers), *h.shape)
        if self.out is None:
            self.out = np.empty(shape, dtype=h.np_dtype)
        if tuple(self.out.shape) != shape or self.out.dtype.itemsize != h.itemsize or not self.out.flags.c_contiguous:
            raise ShapeMismatchError(f"destination {self.out.shape} {self.out.dtype} cannot hold {shape} of {h.dtype}")
        return self.out

    def _fetch(self, j: int, i: int, dst: np.ndarray) -> None:
        h = self.headers[j]
        start, stop = h.layer_body_range(i)
        data = self.get_range(self.object_keys[j], start, stop - start)
        if data is None:
            raise BlockNotFoundError(f"layerwise object {self.object_keys[j][:8].hex()} vanished")
        verify_layer(h, i, data)
        dst[j, i].reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)

    def __iter__(self) -> Iterator[int]:
        n = len(self.object_keys)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="quiver-layerwise") as pool:
            pending: deque[list[Future]] = deque()
            try:
                self.headers = list(pool.map(self._header, range(n)))
                dst = self._destination()
                num_layers = self.headers[0].shape[0]

                def submit(i: int) -> None:
                    pending.append([pool.submit(self._fetch, j, i, dst) for j in range(n)])

                nxt = 0
                for i in range(num_layers):
                    while nxt < num_layers and nxt <= i + self.depth:  # layers i .. i+depth in flight
                        submit(nxt)
                        nxt += 1
                    assert len(pending) <= self.depth + 1
                    t0 = time.perf_counter()
                    for f in pending.popleft():
                        f.result()
                    self.fetch_seconds += time.perf_counter() - t0
                    yield i
            finally:
                for futs in pending:
                    for f in futs:
                        f.cancel()


def load_layers(get_range: GetRange, object_keys: Sequence[bytes], expected: Sequence[Expected],
                consume: Callable[[int, np.ndarray], None], **kw) -> np.ndarray:
    """Run a :class:`LayerwiseLoader`, calling ``consume(i, out[:, i])`` per layer; returns ``out``."""
    loader = LayerwiseLoader(get_range, object_keys, expected, **kw)
    for i in loader:
        consume(i, loader.out[:, i])
    return loader.out


__all__ = ["encode_layerwise", "expected_chain", "LayerwiseLoader", "load_layers", "MAX_DEPTH"]
