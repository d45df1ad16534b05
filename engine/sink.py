"""A get's destination that is not one array of blocks: ``BlockStore.get(..., out=sink)``.

An engine's KV cache is rarely laid out as Quiver's blocks (a transformers
DynamicCache is ``[batch, H, seq, D]`` per layer and K/V; a block is
``[L, 2, T, H, D]``), so a restore into it is a get into host blocks and then a
transposing copy: every byte written twice.  A sink takes the transposing copy
straight from where the verified bytes already are.  A block served by L0 is
copied once, from its (pinned) slot in the arena into the cache.  Blocks
read together from L1 or L2 pass through one of the store's chunk buffers
(one per reading thread), a chunk at a time, and are taken from it while in the CPU cache; any
other block (decoded, or checked one at a time) lands in the sink's staging
array first, as a plain get's would, and is taken from there.

The get calls ``take`` only with bytes that passed every check a plain get
makes (identity guard, header CRC, the body's checks for a block read from disk
or L2): a sink sees nothing a get into an array would not deliver.  One get
path: the sink changes where the last copy goes, not what is verified.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class BlockSink:
    """What ``BlockStore.get`` needs of a destination that is not an array."""

    #: ``take`` may run on two threads at once (the get's and the store's read
    #: helper, each with its own blocks): set by a sink whose takes of distinct
    #: blocks write disjoint memory.  False: the get calls one ``take`` at a time.
    concurrent_take = False

    def staging(self, n: int):
        """An array (or CPU tensor) ``[n, *block_shape]`` of the identity's dtype,
        where the get puts the blocks of its per-block path (then takes them
        from there), checked like any ``out``."""
        raise NotImplementedError

    def take(self, src: np.ndarray, offset: int, rows: Sequence[int], blocks: Sequence[int]) -> None:
        """Copy block ``blocks[j]``'s payload, ``src[rows[j], offset:offset +
        block_nbytes]`` (``src`` a 2-D ``uint8`` array: the staging array's rows,
        a chunk buffer's, or L0's arena as ``[slots, slot_bytes]`` with the
        header's length as ``offset``), to where block ``blocks[j]`` of the get belongs (0: the get's
        ``start_block``).  ``src`` is only valid during the call; ``rows`` is never empty."""
        raise NotImplementedError
