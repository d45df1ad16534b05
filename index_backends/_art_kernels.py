"""Kernels of the adaptive radix tree (see docs/ART.md for the layout).

The whole tree lives in three NumPy arrays, never in Python objects:

``N`` (int64 words)
    words 0..META_W-1 are metadata (root ref, bump top, free-list heads, counts);
    after them, blocks of one of five size classes: a leaf (3 words) or an inner
    node N4 / N16 / N48 / N256.  A *ref* is a word offset: positive for an inner
    node, negative for a leaf, 0 for "empty".  ``N.view(uint8)`` addresses the
    byte fields (inline prefix, N4/N16 key bytes, N48 child index).
``K`` (uint8)  key arena: every leaf's full key, appended.
``V`` (uint8)  value arena: every leaf's value, appended (overwritten in place
    when an update keeps the length).

Kernels never allocate the arrays they write into: a caller checks ``room_*``
first (or a batch kernel returns a "need grow" code) and grows the arrays by
doubling outside compiled code.

Compilation (docs/INDEXES.md, "ART compile cache").  The kernels are plain
Python in the Numba subset, registered by ``@kernel``; importing this module
does not import Numba.  Each entry point (``ENTRIES``: what art.py calls) is
first a small dispatcher that runs the *interpreted* kernel for small work
(one key, a batch of up to SMALL_BATCH keys, a tree of up to SMALL_TREE
records) while a background thread imports Numba and compiles the entry points
(or loads them from the compile cache); each compiled entry then replaces its
dispatcher as the module attribute, so the steady state is one direct call into
machine code, as before.  Large work that arrives before its kernel is compiled
waits for it (the compile thread takes that kernel next).  So no request
stalls on a cold compile (30-50 s after a fresh install) or on loading the
cache after a restart (Numba's import and set-up, about a second).

``QUIVER_ART_JIT``: ``background`` (default), ``sync`` (compile each entry
point in the calling thread at its first call: the behaviour before, for
benchmarks of compiled code from the first call), ``off`` (interpreted only,
Numba never imported: tests of the kernels' logic).  ``warmup()`` compiles (or
loads) every entry point now and returns when they are all in place.

The compile cache lives in ``$QUIVER_NUMBA_CACHE_DIR`` when set (else
``$NUMBA_CACHE_DIR``), else ``$XDG_CACHE_HOME/quiver/numba``, else
``~/.cache/quiver/numba``; the first of these that is writable.  It is attached
to each of our dispatchers through their own cache locator: Numba's global
configuration (``numba.config.CACHE_DIR``) is never changed, and nothing is
written next to the package.  With no writable directory the kernels compile
in memory in each process (a warning is logged once, on logger
``quiver.index_backends``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
import threading
import time
import types as _pytypes

import numpy as np

log = logging.getLogger("quiver.index_backends")

# name -> (plain Python function, inline in callers when compiled)
_KERNELS: dict[str, tuple] = {}


def kernel(fn=None, *, inline: bool = False):
    """Register ``fn`` as a kernel: Numba-subset Python, compiled later (see the
    module docstring); until then it runs as it is."""
    def register(f):
        _KERNELS[f.__name__] = (f, inline)
        return f
    return register(fn) if fn is not None else register


# -- layout constants -------------------------------------------------------------

MAXP = 16  # prefix bytes kept inline in a node (the rest is read from a leaf below):
# 16 holds a whole identity namespace, so inserts rarely need the leaf

T_N4, T_N16, T_N48, T_N256 = 1, 2, 3, 4

# size classes: 0 leaf, 1..4 the node types (class == type)
C_LEAF = 0
LEAF_W = 2  # koff | klen << 48, voff | vlen << 44
KOFF_MASK = (1 << 48) - 1
VOFF_MASK = (1 << 44) - 1
HDR_W = 3 + MAXP // 8  # type | count << 8, prefix length, term leaf ref, inline prefix
N4_W = HDR_W + 1 + 4  # 4 key bytes in one word, 4 children
N16_W = HDR_W + 2 + 16  # 16 key bytes in two words, 16 children
N48_W = HDR_W + 32 + 48  # 256-byte child index, 48 children
N256_W = HDR_W + 256  # 256 children

# metadata words
M_ROOT = 0
M_TOP = 1  # bump allocator: first never-used word
M_FREE = 2  # M_FREE + class: head of that class's free list (0 = empty)
M_COUNT = 7  # live records
M_KUSED = 8
M_VUSED = 9
M_KDEAD = 10  # key-arena bytes no live leaf points to
M_VDEAD = 11
M_MAXK = 12  # longest key ever stored (bounds the scan stack)
M_FREEW = 13  # words held by the free lists
META_W = 16

# One insert allocates at most a leaf, a split N4 and one grown node.
INSERT_W = LEAF_W + N4_W + N256_W


def new_arrays(words: int = 4096, kbytes: int = 65536, vbytes: int = 65536):
    """Fresh, empty tree arrays."""
    N = np.zeros(max(words, META_W + INSERT_W), dtype=np.int64)
    N[M_TOP] = META_W
    return N, np.zeros(kbytes, dtype=np.uint8), np.zeros(vbytes, dtype=np.uint8)


def _prefetch(arr, idx):
    """``llvm.prefetch`` of ``arr[idx]`` (read, high locality) once compiled: lets
    a batch start the cache miss of one key's next node while it works on
    others.  Interpreted, nothing (the compiled namespace binds this name to
    the intrinsic made by ``_prefetch_intrinsic``)."""
    return None


# -- allocation ---------------------------------------------------------------------


@kernel(inline=True)
def _alloc(N, cls, size):
    h = N[M_FREE + cls]
    if h != 0:
        N[M_FREE + cls] = N[h]
        N[M_FREEW] -= size
    else:
        h = N[M_TOP]
        N[M_TOP] = h + size
    for i in range(size):
        N[h + i] = 0
    return h


@kernel(inline=True)
def _class_words(cls):
    if cls == C_LEAF:
        return LEAF_W
    if cls == T_N4:
        return N4_W
    if cls == T_N16:
        return N16_W
    if cls == T_N48:
        return N48_W
    return N256_W


@kernel(inline=True)
def _free(N, cls, off):
    N[off] = N[M_FREE + cls]
    N[M_FREE + cls] = off
    N[M_FREEW] += _class_words(cls)


# -- leaves -------------------------------------------------------------------------


@kernel(inline=True)
def _klen(N, leaf):
    return N[leaf] >> 48


@kernel(inline=True)
def _vlen(N, leaf):
    return N[leaf + 1] >> 44


@kernel(inline=True)
def _koff(N, leaf):
    return N[leaf] & KOFF_MASK


@kernel(inline=True)
def _voff(N, leaf):
    return N[leaf + 1] & VOFF_MASK


@kernel
def _leaf_eq(N, K, leaf, kb, ks, kl):
    if _klen(N, leaf) != kl:
        return False
    ko = _koff(N, leaf)
    for i in range(kl):
        if K[ko + i] != kb[ks + i]:
            return False
    return True


@kernel
def _new_leaf(N, K, V, kb, ks, kl, vb, vs, vl):
    leaf = _alloc(N, C_LEAF, LEAF_W)
    ko = N[M_KUSED]
    for i in range(kl):
        K[ko + i] = kb[ks + i]
    N[M_KUSED] = ko + kl
    vo = N[M_VUSED]
    for i in range(vl):
        V[vo + i] = vb[vs + i]
    N[M_VUSED] = vo + vl
    N[leaf] = ko | (kl << 48)
    N[leaf + 1] = vo | (vl << 44)
    if kl > N[M_MAXK]:
        N[M_MAXK] = kl
    return leaf


@kernel
def _set_value(N, V, leaf, vb, vs, vl):
    old = _vlen(N, leaf)
    if vl == old:
        vo = _voff(N, leaf)
    else:
        vo = N[M_VUSED]
        N[M_VUSED] = vo + vl
        N[M_VDEAD] += old
        N[leaf + 1] = vo | (vl << 44)
    for i in range(vl):
        V[vo + i] = vb[vs + i]


@kernel
def _free_leaf(N, leaf):
    N[M_KDEAD] += _klen(N, leaf)
    N[M_VDEAD] += _vlen(N, leaf)
    N[M_COUNT] -= 1
    _free(N, C_LEAF, leaf)


# -- node fields --------------------------------------------------------------------


@kernel(inline=True)
def _type(N, n):
    return N[n] & 0xFF


@kernel(inline=True)
def _count(N, n):
    return N[n] >> 8


@kernel(inline=True)
def _set_tc(N, n, t, c):
    N[n] = t | (c << 8)


@kernel
def _new_node(N, t, size):
    n = _alloc(N, t, size)
    _set_tc(N, n, t, 0)
    return n


@kernel
def _copy_header(N, src, dst):
    for i in range(1, HDR_W):
        N[dst + i] = N[src + i]


@kernel
def _find_slot(N, Nb, n, b):
    """Word index of the child pointer for byte ``b`` in node ``n``, or -1."""
    t = N[n] & 0xFF
    if t == T_N4 or t == T_N16:
        c = N[n] >> 8
        kbase = (n + HDR_W) * 8
        cbase = n + HDR_W + (1 if t == T_N4 else 2)
        for i in range(c):
            if Nb[kbase + i] == b:
                return cbase + i
        return -1
    if t == T_N48:
        s = Nb[(n + HDR_W) * 8 + b]
        if s == 0:
            return -1
        return n + HDR_W + 32 + s - 1
    s = n + HDR_W + b
    if N[s] == 0:
        return -1
    return s


@kernel
def _min_leaf(N, Nb, ref):
    """Any leaf below ``ref`` (the term leaf or the leftmost child): its key holds
    the node's full compressed prefix."""
    while ref > 0:
        if N[ref + 2] != 0:
            return -N[ref + 2]
        t = N[ref] & 0xFF
        if t == T_N4:
            ref = N[ref + HDR_W + 1]
        elif t == T_N16:
            ref = N[ref + HDR_W + 2]
        elif t == T_N48:
            kbase = (ref + HDR_W) * 8
            nxt = 0
            for b in range(256):
                s = Nb[kbase + b]
                if s != 0:
                    nxt = N[ref + HDR_W + 32 + s - 1]
                    break
            ref = nxt
        else:
            nxt = 0
            for b in range(256):
                if N[ref + HDR_W + b] != 0:
                    nxt = N[ref + HDR_W + b]
                    break
            ref = nxt
    return -ref


@kernel
def _prefix_match(N, Nb, K, n, kb, ks, kl, depth):
    """How many bytes of node ``n``'s prefix equal the key from ``depth`` on
    (pessimistic: bytes beyond the inline ones are read from a leaf)."""
    plen = N[n + 1]
    lim = min(plen, kl - depth)
    m = min(lim, MAXP)
    pb = (n + 3) * 8
    for i in range(m):
        if Nb[pb + i] != kb[ks + depth + i]:
            return i
    if lim > MAXP:
        ko = _koff(N, _min_leaf(N, Nb, n))
        for i in range(MAXP, lim):
            if K[ko + depth + i] != kb[ks + depth + i]:
                return i
    return lim


# -- child insertion / growth -----------------------------------------------------------


@kernel
def _insert_sorted(N, Nb, kbase, cbase, c, b, child):
    i = c
    while i > 0 and Nb[kbase + i - 1] > b:
        Nb[kbase + i] = Nb[kbase + i - 1]
        N[cbase + i] = N[cbase + i - 1]
        i -= 1
    Nb[kbase + i] = b
    N[cbase + i] = child


@kernel
def _add_child(N, Nb, slot, n, b, child):
    """Add ``child`` under byte ``b`` to node ``n`` (pointed to by word ``slot``),
    growing it to the next node type when full."""
    t = N[n] & 0xFF
    c = N[n] >> 8
    if t == T_N4:
        if c < 4:
            _insert_sorted(N, Nb, (n + HDR_W) * 8, n + HDR_W + 1, c, b, child)
            _set_tc(N, n, T_N4, c + 1)
            return
        g = _new_node(N, T_N16, N16_W)
        _copy_header(N, n, g)
        for i in range(4):
            Nb[(g + HDR_W) * 8 + i] = Nb[(n + HDR_W) * 8 + i]
            N[g + HDR_W + 2 + i] = N[n + HDR_W + 1 + i]
        _free(N, T_N4, n)
        N[slot] = g
        _insert_sorted(N, Nb, (g + HDR_W) * 8, g + HDR_W + 2, 4, b, child)
        _set_tc(N, g, T_N16, 5)
        return
    if t == T_N16:
        if c < 16:
            _insert_sorted(N, Nb, (n + HDR_W) * 8, n + HDR_W + 2, c, b, child)
            _set_tc(N, n, T_N16, c + 1)
            return
        g = _new_node(N, T_N48, N48_W)
        _copy_header(N, n, g)
        for i in range(16):
            Nb[(g + HDR_W) * 8 + Nb[(n + HDR_W) * 8 + i]] = i + 1
            N[g + HDR_W + 32 + i] = N[n + HDR_W + 2 + i]
        _free(N, T_N16, n)
        N[slot] = g
        Nb[(g + HDR_W) * 8 + b] = 17
        N[g + HDR_W + 32 + 16] = child
        _set_tc(N, g, T_N48, 17)
        return
    if t == T_N48:
        if c < 48:
            j = 0
            while N[n + HDR_W + 32 + j] != 0:
                j += 1
            N[n + HDR_W + 32 + j] = child
            Nb[(n + HDR_W) * 8 + b] = j + 1
            _set_tc(N, n, T_N48, c + 1)
            return
        g = _new_node(N, T_N256, N256_W)
        _copy_header(N, n, g)
        for k in range(256):
            s = Nb[(n + HDR_W) * 8 + k]
            if s != 0:
                N[g + HDR_W + k] = N[n + HDR_W + 32 + s - 1]
        _free(N, T_N48, n)
        N[slot] = g
        N[g + HDR_W + b] = child
        _set_tc(N, g, T_N256, 49)
        return
    N[n + HDR_W + b] = child
    _set_tc(N, n, T_N256, c + 1)


# -- child removal / shrinking ------------------------------------------------------------


@kernel
def _only_child(N, Nb, n):
    """(byte, ref) of the first child of ``n``."""
    t = N[n] & 0xFF
    if t == T_N4:
        return Nb[(n + HDR_W) * 8], N[n + HDR_W + 1]
    if t == T_N16:
        return Nb[(n + HDR_W) * 8], N[n + HDR_W + 2]
    if t == T_N48:
        for b in range(256):
            s = Nb[(n + HDR_W) * 8 + b]
            if s != 0:
                return b, N[n + HDR_W + 32 + s - 1]
    else:
        for b in range(256):
            if N[n + HDR_W + b] != 0:
                return b, N[n + HDR_W + b]
    return 0, 0


@kernel
def _collapse(N, Nb, slot, n):
    """Replace node ``n`` (one child, no term; or no child, a term) by what it holds."""
    t = N[n] & 0xFF
    if (N[n] >> 8) == 0:
        N[slot] = N[n + 2]
        _free(N, t, n)
        return
    b, child = _only_child(N, Nb, n)
    if child > 0:
        # path compression: child.prefix = n.prefix + b + child.prefix
        plen = N[n + 1]
        cplen = N[child + 1]
        tmp = np.empty(MAXP, dtype=np.uint8)
        k = 0
        for i in range(min(plen, MAXP)):
            tmp[k] = Nb[(n + 3) * 8 + i]
            k += 1
        if k < MAXP:
            tmp[k] = b
            k += 1
        i = 0
        while k < MAXP and i < cplen:
            tmp[k] = Nb[(child + 3) * 8 + i]
            k += 1
            i += 1
        for i in range(k):
            Nb[(child + 3) * 8 + i] = tmp[i]
        N[child + 1] = plen + 1 + cplen
    N[slot] = child
    _free(N, t, n)


@kernel
def _shrink(N, Nb, slot, n):
    """Move ``n`` to a smaller node type when it has become sparse (hysteresis:
    shrink well below the size that made it grow)."""
    t = N[n] & 0xFF
    c = N[n] >> 8
    if t == T_N16 and c <= 3:
        g = _new_node(N, T_N4, N4_W)
        _copy_header(N, n, g)
        for i in range(c):
            Nb[(g + HDR_W) * 8 + i] = Nb[(n + HDR_W) * 8 + i]
            N[g + HDR_W + 1 + i] = N[n + HDR_W + 2 + i]
    elif t == T_N48 and c <= 12:
        g = _new_node(N, T_N16, N16_W)
        _copy_header(N, n, g)
        j = 0
        for b in range(256):
            s = Nb[(n + HDR_W) * 8 + b]
            if s != 0:
                Nb[(g + HDR_W) * 8 + j] = b
                N[g + HDR_W + 2 + j] = N[n + HDR_W + 32 + s - 1]
                j += 1
    elif t == T_N256 and c <= 40:
        g = _new_node(N, T_N48, N48_W)
        _copy_header(N, n, g)
        j = 0
        for b in range(256):
            ch = N[n + HDR_W + b]
            if ch != 0:
                N[g + HDR_W + 32 + j] = ch
                Nb[(g + HDR_W) * 8 + b] = j + 1
                j += 1
    else:
        return
    _set_tc(N, g, N[g] & 0xFF, c)
    _free(N, t, n)
    N[slot] = g


@kernel
def _remove_child(N, Nb, slot, n, b):
    t = N[n] & 0xFF
    c = N[n] >> 8
    if t == T_N4 or t == T_N16:
        kbase = (n + HDR_W) * 8
        cbase = n + HDR_W + (1 if t == T_N4 else 2)
        i = 0
        while Nb[kbase + i] != b:
            i += 1
        for j in range(i, c - 1):
            Nb[kbase + j] = Nb[kbase + j + 1]
            N[cbase + j] = N[cbase + j + 1]
        N[cbase + c - 1] = 0
    elif t == T_N48:
        s = Nb[(n + HDR_W) * 8 + b]
        N[n + HDR_W + 32 + s - 1] = 0
        Nb[(n + HDR_W) * 8 + b] = 0
    else:
        N[n + HDR_W + b] = 0
    c -= 1
    _set_tc(N, n, t, c)
    if c + (1 if N[n + 2] != 0 else 0) <= 1:
        _collapse(N, Nb, slot, n)
    else:
        _shrink(N, Nb, slot, n)


# -- core operations ------------------------------------------------------------------


@kernel
def _lookup(N, Nb, K, kb, ks, kl):
    """Leaf offset holding the key, or 0.  Optimistic: prefix bytes past the
    inline ones are skipped and the full key is compared at the leaf."""
    ref = N[M_ROOT]
    depth = 0
    while ref != 0:
        if ref < 0:
            if _leaf_eq(N, K, -ref, kb, ks, kl):
                return -ref
            return 0
        plen = N[ref + 1]
        if plen != 0:
            if kl - depth < plen:
                return 0
            pb = (ref + 3) * 8
            for i in range(min(plen, MAXP)):
                if Nb[pb + i] != kb[ks + depth + i]:
                    return 0
            depth += plen
        if depth == kl:
            ref = N[ref + 2]
            continue
        s = _find_slot(N, Nb, ref, kb[ks + depth])
        if s < 0:
            return 0
        ref = N[s]
        depth += 1
    return 0


@kernel
def _insert(N, Nb, K, V, kb, ks, kl, vb, vs, vl):
    """Insert or overwrite; 1 if the key is new, 0 if it was updated.  The caller
    guarantees INSERT_W free words, kl key bytes and vl value bytes of room.

    One descent loop with a case per node kind, kept in one function on purpose:
    it is the insert hot path, and a call per case costs more than it reads."""
    slot = M_ROOT
    depth = 0
    while True:
        ref = N[slot]
        if ref == 0:
            N[slot] = -_new_leaf(N, K, V, kb, ks, kl, vb, vs, vl)
            N[M_COUNT] += 1
            return 1
        if ref < 0:
            leaf = -ref
            if _leaf_eq(N, K, leaf, kb, ks, kl):
                _set_value(N, V, leaf, vb, vs, vl)
                return 0
            # lazy expansion ends here: split the leaf into an N4 at the divergence
            ko = _koff(N, leaf)
            lkl = _klen(N, leaf)
            lim = min(lkl, kl)
            p = depth
            while p < lim and K[ko + p] == kb[ks + p]:
                p += 1
            n = _new_node(N, T_N4, N4_W)
            N[n + 1] = p - depth
            for i in range(min(p - depth, MAXP)):
                Nb[(n + 3) * 8 + i] = kb[ks + depth + i]
            new = -_new_leaf(N, K, V, kb, ks, kl, vb, vs, vl)
            if lkl == p:
                N[n + 2] = ref
            else:
                _add_child(N, Nb, slot, n, K[ko + p], ref)
            if kl == p:
                N[n + 2] = new
            else:
                _add_child(N, Nb, slot, n, kb[ks + p], new)
            N[slot] = n
            N[M_COUNT] += 1
            return 1
        n = ref
        plen = N[n + 1]
        if plen != 0:
            m = _prefix_match(N, Nb, K, n, kb, ks, kl, depth)
            if m < plen:
                # the key leaves the compressed path after m bytes: split it
                if plen > MAXP:
                    ko = _koff(N, _min_leaf(N, Nb, n)) + depth
                    ob = K[ko + m]
                    for i in range(min(plen - m - 1, MAXP)):
                        Nb[(n + 3) * 8 + i] = K[ko + m + 1 + i]
                else:
                    ob = Nb[(n + 3) * 8 + m]
                    for i in range(plen - m - 1):
                        Nb[(n + 3) * 8 + i] = Nb[(n + 3) * 8 + m + 1 + i]
                N[n + 1] = plen - m - 1
                g = _new_node(N, T_N4, N4_W)
                N[g + 1] = m
                for i in range(min(m, MAXP)):
                    Nb[(g + 3) * 8 + i] = kb[ks + depth + i]
                _add_child(N, Nb, slot, g, ob, n)
                new = -_new_leaf(N, K, V, kb, ks, kl, vb, vs, vl)
                if depth + m == kl:
                    N[g + 2] = new
                else:
                    _add_child(N, Nb, slot, g, kb[ks + depth + m], new)
                N[slot] = g
                N[M_COUNT] += 1
                return 1
            depth += plen
        if depth == kl:
            t = N[n + 2]
            if t != 0:
                _set_value(N, V, -t, vb, vs, vl)
                return 0
            N[n + 2] = -_new_leaf(N, K, V, kb, ks, kl, vb, vs, vl)
            N[M_COUNT] += 1
            return 1
        b = kb[ks + depth]
        s = _find_slot(N, Nb, n, b)
        if s < 0:
            _add_child(N, Nb, slot, n, b, -_new_leaf(N, K, V, kb, ks, kl, vb, vs, vl))
            N[M_COUNT] += 1
            return 1
        slot = s
        depth += 1


@kernel
def _delete(N, Nb, K, kb, ks, kl):
    """Remove the key; 1 if it was present.  Shrinks and collapses nodes."""
    ref = N[M_ROOT]
    if ref == 0:
        return 0
    if ref < 0:
        if not _leaf_eq(N, K, -ref, kb, ks, kl):
            return 0
        _free_leaf(N, -ref)
        N[M_ROOT] = 0
        return 1
    slot = M_ROOT
    depth = 0
    while True:
        n = ref
        plen = N[n + 1]
        if plen != 0:
            if kl - depth < plen:
                return 0
            for i in range(min(plen, MAXP)):
                if Nb[(n + 3) * 8 + i] != kb[ks + depth + i]:
                    return 0
            depth += plen
        if depth == kl:
            t = N[n + 2]
            if t == 0 or not _leaf_eq(N, K, -t, kb, ks, kl):
                return 0
            _free_leaf(N, -t)
            N[n + 2] = 0
            if (N[n] >> 8) <= 1:
                _collapse(N, Nb, slot, n)
            return 1
        b = kb[ks + depth]
        s = _find_slot(N, Nb, n, b)
        if s < 0:
            return 0
        child = N[s]
        if child < 0:
            if not _leaf_eq(N, K, -child, kb, ks, kl):
                return 0
            _free_leaf(N, -child)
            _remove_child(N, Nb, slot, n, b)
            return 1
        slot = s
        ref = child
        depth += 1


# -- ordered traversal ------------------------------------------------------------------


@kernel
def _emit_subtree(N, Nb, root, out, cnt):
    """Append the leaves below ``root`` to ``out`` in key order (counting past
    its end); returns the new count."""
    if root < 0:
        if cnt < out.shape[0]:
            out[cnt] = -root
        return cnt + 1
    depth_max = N[M_MAXK] + 2
    stack_n = np.empty(depth_max, dtype=np.int64)
    stack_i = np.empty(depth_max, dtype=np.int64)
    sp = 0
    stack_n[0] = root
    stack_i[0] = -1  # -1: the term leaf has not been emitted yet
    while sp >= 0:
        n = stack_n[sp]
        i = stack_i[sp]
        t = N[n] & 0xFF
        child = 0
        if i == -1:
            stack_i[sp] = 0
            if N[n + 2] != 0:
                if cnt < out.shape[0]:
                    out[cnt] = -N[n + 2]
                cnt += 1
            continue
        if t == T_N4 or t == T_N16:
            if i < (N[n] >> 8):
                child = N[n + HDR_W + (1 if t == T_N4 else 2) + i]
                i += 1
        elif t == T_N48:
            while i < 256:
                s = Nb[(n + HDR_W) * 8 + i]
                i += 1
                if s != 0:
                    child = N[n + HDR_W + 32 + s - 1]
                    break
        else:
            while i < 256:
                ch = N[n + HDR_W + i]
                i += 1
                if ch != 0:
                    child = ch
                    break
        stack_i[sp] = i
        if child == 0:
            sp -= 1
        elif child < 0:
            if cnt < out.shape[0]:
                out[cnt] = -child
            cnt += 1
        else:
            sp += 1
            stack_n[sp] = child
            stack_i[sp] = -1
    return cnt


@kernel
def scan_leaves(N, K, prefix, out):
    """Leaves whose key starts with ``prefix``, in key order, written to ``out``;
    returns the total count (call again with a larger ``out`` if it exceeds it)."""
    Nb = N.view(np.uint8)
    pl = len(prefix)
    ref = N[M_ROOT]
    depth = 0
    while True:
        if ref == 0:
            return 0
        if ref < 0:
            leaf = -ref
            if _klen(N, leaf) < pl:
                return 0
            ko = _koff(N, leaf)
            for i in range(pl):
                if K[ko + i] != prefix[i]:
                    return 0
            return _emit_subtree(N, Nb, ref, out, 0)
        if depth == pl:
            return _emit_subtree(N, Nb, ref, out, 0)
        plen = N[ref + 1]
        m = _prefix_match(N, Nb, K, ref, prefix, 0, pl, depth)
        if depth + m == pl:
            return _emit_subtree(N, Nb, ref, out, 0)
        if m < plen:
            return 0
        depth += plen
        s = _find_slot(N, Nb, ref, prefix[depth])
        if s < 0:
            return 0
        ref = N[s]
        depth += 1


@kernel
def gather_pairs(N, K, V, leaves, n):
    """Keys and values of ``leaves[:n]`` packed into two buffers, their end
    offsets, and the common key / value length (-1 when lengths differ), so
    Python can cut fixed-width records without reading the offsets."""
    kend = np.empty(n, dtype=np.int64)
    vend = np.empty(n, dtype=np.int64)
    kt = 0
    vt = 0
    kw = -2
    vw = -2
    for i in range(n):
        if i + 8 < n:
            _prefetch(N, leaves[i + 8])
        leaf = leaves[i]
        kl = _klen(N, leaf)
        vl = _vlen(N, leaf)
        _prefetch(K, _koff(N, leaf))
        _prefetch(V, _voff(N, leaf))
        kt += kl
        vt += vl
        kend[i] = kt
        vend[i] = vt
        kw = kl if kw == -2 or kw == kl else -1
        vw = vl if vw == -2 or vw == vl else -1
    kout = np.empty(kt, dtype=np.uint8)
    vout = np.empty(vt, dtype=np.uint8)
    kp = 0
    vp = 0
    for i in range(n):
        leaf = leaves[i]
        ko = _koff(N, leaf)
        for j in range(_klen(N, leaf)):
            kout[kp] = K[ko + j]
            kp += 1
        vo = _voff(N, leaf)
        for j in range(_vlen(N, leaf)):
            vout[vp] = V[vo + j]
            vp += 1
    return kout, kend, vout, vend, kw, vw


# -- entry points called from Python ----------------------------------------------------


@kernel
def get(N, K, key):
    """The leaf's value word (offset | length << 44) of ``key``, or -1."""
    leaf = _lookup(N, N.view(np.uint8), K, key, 0, len(key))
    if leaf == 0:
        return -1
    return N[leaf + 1]


@kernel
def put(N, K, V, key, value):
    """1 new, 0 updated; -1/-2/-3: grow N/K/V first (nothing was changed)."""
    if N.shape[0] - N[M_TOP] < INSERT_W:
        return -1
    if K.shape[0] - N[M_KUSED] < len(key):
        return -2
    if V.shape[0] - N[M_VUSED] < len(value):
        return -3
    return _insert(N, N.view(np.uint8), K, V, key, 0, len(key), value, 0, len(value))


@kernel
def delete(N, K, key):
    return _delete(N, N.view(np.uint8), K, key, 0, len(key))


@kernel
def put_many(N, K, V, kbuf, klens, vbuf, vlens, start, kpos, vpos):
    """Insert records ``start..`` of a packed batch (key i is kbuf[kpos:kpos+klens[i]]
    after the previous ones).  Returns ``4 * i + why``: why 0 = done (i = n),
    1/2/3 = stopped before record i because N/K/V needs to grow."""
    Nb = N.view(np.uint8)
    n = klens.shape[0]
    ks = kpos
    vs = vpos
    scratch = np.empty(n, dtype=np.int64)
    for i in range(start, n):
        if (i - start) % GROUP == 0:
            # Walk the next GROUP keys with overlapped, prefetched misses first,
            # so the inserts below mostly find their path in cache.
            _lookup_range(N, Nb, K, kbuf, ks, klens, i, min(i + GROUP, n), scratch)
        kl = klens[i]
        vl = vlens[i]
        if N.shape[0] - N[M_TOP] < INSERT_W:
            return 4 * i + 1
        if K.shape[0] - N[M_KUSED] < kl:
            return 4 * i + 2
        if V.shape[0] - N[M_VUSED] < vl:
            return 4 * i + 3
        _insert(N, Nb, K, V, kbuf, ks, kl, vbuf, vs, vl)
        ks += kl
        vs += vl
    return 4 * n


GROUP = 16  # lookups advanced in lock-step, so their cache misses overlap


@kernel
def _lookup_batch(N, Nb, K, kbuf, klens, leaves):
    """``leaves[i]`` = leaf of key i or 0, for a packed batch.  Keys go through
    the tree GROUP at a time, one node step per key per round: the loads of
    different keys are independent, so the CPU overlaps their cache misses
    instead of paying them one after another."""
    _lookup_range(N, Nb, K, kbuf, 0, klens, 0, klens.shape[0], leaves)


@kernel
def _lookup_range(N, Nb, K, kbuf, kpos, klens, lo, hi, leaves):
    """``_lookup_batch`` for keys lo..hi, key lo starting at kbuf[kpos]."""
    n = hi
    starts = np.empty(hi - lo, dtype=np.int64)  # starts[i - lo]: where key i begins
    p = kpos
    for i in range(lo, n):
        starts[i - lo] = p
        p += klens[i]
    ref = np.empty(GROUP, dtype=np.int64)
    dep = np.empty(GROUP, dtype=np.int64)
    root = N[M_ROOT]
    for base in range(lo, n, GROUP):
        g = min(GROUP, n - base)
        for j in range(g):
            ref[j] = root
            dep[j] = 0
        active = g
        while active > 0:
            active = 0
            for j in range(g):
                r = ref[j]
                if r <= 0:
                    continue
                ks = starts[base - lo + j]
                kl = klens[base + j]
                d = dep[j]
                plen = N[r + 1]
                nxt = 0
                ok = True
                if plen != 0:
                    if kl - d < plen:
                        ok = False
                    else:
                        pb = (r + 3) * 8
                        for i in range(min(plen, MAXP)):
                            if Nb[pb + i] != kbuf[ks + d + i]:
                                ok = False
                                break
                        d += plen
                if ok:
                    if d == kl:
                        nxt = N[r + 2]
                    else:
                        s = _find_slot(N, Nb, r, kbuf[ks + d])
                        if s >= 0:
                            nxt = N[s]
                        d += 1
                ref[j] = nxt
                dep[j] = d
                if nxt > 0:
                    active += 1
                    _prefetch(N, nxt)
                    _prefetch(N, nxt + 8)
                elif nxt < 0:
                    _prefetch(N, -nxt)
        for j in range(g):
            r = ref[j]
            if r < 0:
                _prefetch(K, _koff(N, -r))
                _prefetch(K, _koff(N, -r) + 63)
        for j in range(g):
            r = ref[j]
            if r < 0 and _leaf_eq(N, K, -r, kbuf, starts[base - lo + j], klens[base + j]):
                leaves[base + j] = -r
            else:
                leaves[base + j] = 0


@kernel
def get_many(N, K, V, kbuf, klens):
    """Values of a packed batch of keys: (value bytes, end offsets, leaves (0 =
    absent), common value length or -1, misses)."""
    Nb = N.view(np.uint8)
    n = klens.shape[0]
    leaves = np.empty(n, dtype=np.int64)
    _lookup_batch(N, Nb, K, kbuf, klens, leaves)
    for i in range(n):
        if leaves[i] != 0:
            _prefetch(V, _voff(N, leaves[i]))
    total = 0
    misses = 0
    width = -2
    for i in range(n):
        leaf = leaves[i]
        if leaf == 0:
            misses += 1
            continue
        vl = _vlen(N, leaf)
        total += vl
        if width == -2:
            width = vl
        elif width != vl:
            width = -1
    out = np.empty(total, dtype=np.uint8)
    ends = np.empty(n, dtype=np.int64)
    p = 0
    for i in range(n):
        leaf = leaves[i]
        if leaf != 0:
            vo = _voff(N, leaf)
            for j in range(_vlen(N, leaf)):
                out[p + j] = V[vo + j]
            p += _vlen(N, leaf)
        ends[i] = p
    return out, ends, leaves, width, misses


@kernel
def longest_prefix_many(N, K, kbuf, klens, chain_lens):
    """For each chain (consecutive runs of ``chain_lens[c]`` keys), how many
    leading keys are present.  Every key is looked up (batched, misses
    overlapped), then each chain is cut at its first miss."""
    leaves = np.empty(klens.shape[0], dtype=np.int64)
    _lookup_batch(N, N.view(np.uint8), K, kbuf, klens, leaves)
    out = np.zeros(chain_lens.shape[0], dtype=np.int64)
    ki = 0
    for c in range(chain_lens.shape[0]):
        hit = 0
        while hit < chain_lens[c] and leaves[ki + hit] != 0:
            hit += 1
        out[c] = hit
        ki += chain_lens[c]
    return out


@kernel
def longest_prefix(N, K, kbuf, klens):
    """How many leading keys of one packed chain are present (stops at the first miss)."""
    if klens.shape[0] <= 4:
        Nb = N.view(np.uint8)
        ks = 0
        for i in range(klens.shape[0]):
            if _lookup(N, Nb, K, kbuf, ks, klens[i]) == 0:
                return i
            ks += klens[i]
        return klens.shape[0]
    leaves = np.empty(klens.shape[0], dtype=np.int64)
    _lookup_batch(N, N.view(np.uint8), K, kbuf, klens, leaves)
    for i in range(klens.shape[0]):
        if leaves[i] == 0:
            return i
    return klens.shape[0]


@kernel
def compact_arenas(N, K, V, leaves, n, newK, newV):
    """Copy the live keys and values of ``leaves[:n]`` into fresh arenas and
    repoint the leaves (drops the bytes of deleted keys and replaced values)."""
    kp = 0
    vp = 0
    for i in range(n):
        leaf = leaves[i]
        kl = _klen(N, leaf)
        vl = _vlen(N, leaf)
        ko = _koff(N, leaf)
        vo = _voff(N, leaf)
        for j in range(kl):
            newK[kp + j] = K[ko + j]
        for j in range(vl):
            newV[vp + j] = V[vo + j]
        N[leaf] = kp | (kl << 48)
        N[leaf + 1] = vp | (vl << 44)
        kp += kl
        vp += vl
    N[M_KUSED] = kp
    N[M_VUSED] = vp
    N[M_KDEAD] = 0
    N[M_VDEAD] = 0


@kernel
def node_census(N):
    """[leaves, n4, n16, n48, n256, max depth] reachable from the root (for tests
    and stats)."""
    Nb = N.view(np.uint8)
    out = np.zeros(6, dtype=np.int64)
    root = N[M_ROOT]
    if root == 0:
        return out
    if root < 0:
        out[0] = 1
        return out
    cap = N[M_MAXK] + 2
    stack = np.empty(cap * 256 + 1, dtype=np.int64)
    dstack = np.empty(cap * 256 + 1, dtype=np.int64)
    sp = 0
    stack[0] = root
    dstack[0] = 1
    while sp >= 0:
        n = stack[sp]
        d = dstack[sp]
        sp -= 1
        if n < 0:
            out[0] += 1
            continue
        if d > out[5]:
            out[5] = d
        t = N[n] & 0xFF
        out[t] += 1
        if N[n + 2] != 0:
            out[0] += 1
        for b in range(256):
            s = _find_slot(N, Nb, n, b)
            if s >= 0:
                sp += 1
                stack[sp] = N[s]
                dstack[sp] = d + 1
    return out


@kernel
def _copy_block(N, newN, ref, top):
    """Copy the block ``ref`` points at to ``newN[top:]``; returns (new ref, new top)."""
    if ref < 0:
        o = -ref
        newN[top] = N[o]
        newN[top + 1] = N[o + 1]
        return -top, top + LEAF_W
    t = N[ref] & 0xFF
    size = N4_W if t == T_N4 else (N16_W if t == T_N16 else (N48_W if t == T_N48 else N256_W))
    for i in range(size):
        newN[top + i] = N[ref + i]
    return top, top + size


@kernel
def defrag(N, newN):
    """Copy the live tree into ``newN`` breadth-first (free-list garbage dropped,
    upper levels packed together); returns the new top.  ``newN`` must have
    room for the live words, ``N[M_TOP] - N[M_FREEW]`` (else nothing is copied
    and -1 is returned)."""
    if newN.shape[0] < N[M_TOP] - N[M_FREEW]:
        return -1
    for i in range(META_W):
        newN[i] = N[i]
    for c in range(5):
        newN[M_FREE + c] = 0
    newN[M_FREEW] = 0
    top = META_W
    root = N[M_ROOT]
    if root == 0:
        newN[M_TOP] = top
        return top
    r, top = _copy_block(N, newN, root, top)
    newN[M_ROOT] = r
    queue = np.empty(N[M_TOP] // N4_W + 1, dtype=np.int64)
    qh = 0
    qt = 0
    if r > 0:
        queue[qt] = r
        qt += 1
    newNb = newN.view(np.uint8)
    while qh < qt:
        x = queue[qh]
        qh += 1
        if newN[x + 2] != 0:
            nr, top = _copy_block(N, newN, newN[x + 2], top)
            newN[x + 2] = nr
        t = newN[x] & 0xFF
        c = newN[x] >> 8
        if t == T_N4 or t == T_N16:
            first = x + HDR_W + (1 if t == T_N4 else 2)
            last = first + c
        elif t == T_N48:
            first = x + HDR_W + 32
            last = first + 48
        else:
            first = x + HDR_W
            last = first + 256
        for s in range(first, last):
            ch = newN[s]
            if ch != 0:
                nr, top = _copy_block(N, newN, ch, top)
                newN[s] = nr
                if nr > 0:
                    queue[qt] = nr
                    qt += 1
    newN[M_TOP] = top
    return top


# -- compilation: interpreted at first, machine code from a background thread -----------

JIT_ENV = "QUIVER_ART_JIT"  # background (default) | sync | off
JIT_MODES = ("background", "sync", "off")
CACHE_ENV = "QUIVER_NUMBA_CACHE_DIR"
# The most work an interpreted kernel takes on while its compiled one is not in
# place (measured: about 40 us a key put, 25 us a key looked up, 25 ms per 1000
# records of a census; so at most a few tenths of a second), else the call waits.
SMALL_BATCH = 4096  # keys of one batch call
SMALL_TREE = 8192  # records of a whole-tree call (scan, gather, census, defrag, compaction)

# What art.py calls, in the order the background thread compiles them (the
# first request's operations first).
ENTRIES = ("get", "get_many", "put_many", "put", "delete", "longest_prefix", "longest_prefix_many",
           "scan_leaves", "gather_pairs", "compact_arenas", "defrag", "node_census")

# entry -> predicate on its arguments: True when the interpreted kernel may do the
# work while the compiled one is not ready (None: always; a single key's path).
_SMALL = {
    "get": None,
    "put": None,
    "delete": None,
    "put_many": lambda N, K, V, kbuf, klens, vbuf, vlens, start, kpos, vpos: klens.shape[0] - start <= SMALL_BATCH,
    "get_many": lambda N, K, V, kbuf, klens: klens.shape[0] <= SMALL_BATCH,
    "longest_prefix": lambda N, K, kbuf, klens: klens.shape[0] <= SMALL_BATCH,
    "longest_prefix_many": lambda N, K, kbuf, klens, chain_lens: klens.shape[0] <= SMALL_BATCH,
    "scan_leaves": lambda N, K, prefix, out: N[M_COUNT] <= SMALL_TREE,
    "gather_pairs": lambda N, K, V, leaves, n: n <= SMALL_TREE,
    "compact_arenas": lambda N, K, V, leaves, n, newK, newV: n <= SMALL_TREE,
    "defrag": lambda N, newN: N[M_COUNT] <= SMALL_TREE,
    "node_census": lambda N: N[M_COUNT] <= SMALL_TREE,
}

_PY = {name: _KERNELS[name][0] for name in ENTRIES}  # the interpreted entry points


class _JitState:
    """Process-wide compile state (reset in a forked child)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.ns_lock = threading.RLock()  # building the compiled namespace; compiling in a caller
        self.ns: dict | None = None  # the compiled namespace, once built
        self.ready: dict = {}  # entry -> compiled dispatcher, warmed for art.py's argument types
        self.queue = list(ENTRIES)  # entries the thread has still to compile
        self.busy: str | None = None  # the entry the thread compiles now
        self.thread: threading.Thread | None = None
        self.working = False  # the thread is running (importing numba, building, compiling)
        self.stop = False
        self.failed: str | None = None  # why compiled kernels are unavailable (interpreted for good)
        self.mode: str | None = None
        self.cache_dir: str | None = None
        self.cache_tried: list[str] = []
        self.seconds: dict = {}  # entry -> seconds its compile (or cache load) took
        self.cache_hits: dict = {}  # entry -> True: loaded from the cache, False: compiled


_jit = _JitState()


def _mode() -> str:
    if _jit.mode is None:
        m = os.environ.get(JIT_ENV, "").strip().lower() or "background"
        if m not in JIT_MODES:
            log.warning("%s=%r is not one of %s: using 'background'", JIT_ENV, m, JIT_MODES)
            m = "background"
        _jit.mode = m
    return _jit.mode


def cache_dir_candidates() -> list[str]:
    """Where the compile cache may go, in order of preference (see the module docstring)."""
    explicit = os.environ.get(CACHE_ENV) or os.environ.get("NUMBA_CACHE_DIR")
    if explicit:
        return [os.path.abspath(os.path.expanduser(explicit))]
    out = []
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        out.append(os.path.join(xdg, "quiver", "numba"))
    home = os.path.expanduser("~")
    if os.path.isabs(home):
        out.append(os.path.join(home, ".cache", "quiver", "numba"))
    return out


def _writable_cache_dir() -> str | None:
    """The first candidate that exists (or can be made) and takes a file; None if none does."""
    _jit.cache_tried = cache_dir_candidates()
    for d in _jit.cache_tried:
        try:
            os.makedirs(d, exist_ok=True)
            tempfile.TemporaryFile(dir=d).close()
        except OSError:
            continue
        return d
    return None


def _prefetch_intrinsic():
    """The compiled ``_prefetch``: ``llvm.prefetch`` (read, high locality, data cache)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _prefetch(typingctx, arr, idx):
        sig = types.void(arr, types.intp)

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return sig, codegen

    return _prefetch


def _cache_class(root: str):
    """A Numba FunctionCache whose only locator puts every kernel's cache under
    ``root`` (attached to our dispatchers alone: Numba's configuration and
    every other jitted function in the process are left as they are)."""
    from numba.core import caching

    locator_base = getattr(caching, "_CacheLocator")
    source_mixin = getattr(caching, "_SourceFileBackedLocatorMixin")
    impl_base = getattr(caching, "CompileResultCacheImpl", None) or getattr(caching, "_CompileResultCacheImpl")

    class QuiverCacheLocator(source_mixin, locator_base):
        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(root, self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

    class QuiverCacheImpl(impl_base):
        _locator_classes = [QuiverCacheLocator]

    class QuiverFunctionCache(caching.FunctionCache):
        _impl_class = QuiverCacheImpl

    return QuiverFunctionCache


_warned_no_cache = False


def attach_cache(dispatcher, py_func) -> str | None:
    """Give a Numba dispatcher made elsewhere in Quiver (engine/copy_kernels.py)
    this module's compile cache: the same directory and locator, nothing
    written next to the package.  Returns the directory, or None when there is
    none (the dispatcher then compiles in memory in each process)."""
    root = _writable_cache_dir()
    if root is not None:
        try:
            dispatcher._cache = _cache_class(root)(py_func)
        except (RuntimeError, OSError):  # no locator: compiled in memory
            return None
    return root


def _namespace() -> dict:
    """Numba dispatchers of every kernel, bound to one another (built once).

    Each kernel is re-bound to a copy of this module's globals in which the
    kernel names are the dispatchers and ``_prefetch`` the intrinsic: the
    interpreted kernels keep calling one another."""
    global _warned_no_cache
    with _jit.ns_lock:
        if _jit.ns is not None:
            return _jit.ns
        from numba import njit

        root = _writable_cache_dir()
        cache_cls = _cache_class(root) if root else None
        if root is None and not _warned_no_cache:
            _warned_no_cache = True
            log.warning("ART kernels: no writable compile-cache directory (tried %s); they are compiled "
                        "in memory in every process (set %s to a writable directory)",
                        ", ".join(_jit.cache_tried) or "none", CACHE_ENV)
        g = dict(globals())
        g["_prefetch"] = _prefetch_intrinsic()
        for name, (fn, inline) in _KERNELS.items():
            f = _pytypes.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
            f.__qualname__ = fn.__qualname__
            f.__doc__ = fn.__doc__
            d = njit(inline="always" if inline else "never")(f)
            if cache_cls is not None:
                try:
                    d._cache = cache_cls(f)
                except (RuntimeError, OSError):  # no locator: this one compiles in memory
                    pass
            g[name] = d
        _jit.cache_dir = root
        _jit.ns = g
        return g


def _warm_args(name: str) -> tuple:
    """Small valid arguments with the types art.py passes (C-contiguous int64 /
    uint8 arrays, ``bytes`` keys, int64 scalars), so the compiled signature is
    the one every later call uses."""
    N, K, V = new_arrays(512, 256, 256)
    kb, kl = b"ab", np.ones(2, dtype=np.int64)
    leaves = np.zeros(4, dtype=np.int64)
    return {
        "get": (N, K, b"a"),
        "put": (N, K, V, b"a", b"v"),
        "delete": (N, K, b"a"),
        "put_many": (N, K, V, kb, kl, b"xy", kl.copy(), 0, 0, 0),
        "get_many": (N, K, V, kb, kl),
        "longest_prefix": (N, K, kb, kl),
        "longest_prefix_many": (N, K, kb, kl, np.array([2], dtype=np.int64)),
        "scan_leaves": (N, K, b"", leaves),
        "gather_pairs": (N, K, V, leaves, 0),
        "compact_arenas": (N, K, V, leaves, 0, np.zeros(8, dtype=np.uint8), np.zeros(8, dtype=np.uint8)),
        "defrag": (N, np.zeros(len(N), dtype=np.int64)),
        "node_census": (N,),
    }[name]


def _compile_one(name: str):
    """Compile (or load from the cache) entry ``name`` for art.py's argument
    types, and make it the module attribute.  Returns the dispatcher."""
    d = _namespace()[name]
    t0 = time.perf_counter()
    d(*_warm_args(name))
    _jit.seconds[name] = round(time.perf_counter() - t0, 4)
    _jit.cache_hits[name] = bool(sum(d._cache_hits.values())) and not sum(d._cache_misses.values())
    with _jit.cond:
        _jit.ready[name] = d
        globals()[name] = d
        _jit.cond.notify_all()
    return d


def _fail(exc: BaseException) -> None:
    with _jit.cond:
        if _jit.failed is None:
            _jit.failed = f"{type(exc).__name__}: {exc}"
            log.warning("ART kernels: compilation failed (%s); the index runs the interpreted kernels "
                        "(correct, much slower)", _jit.failed)
        _jit.cond.notify_all()


def _worker() -> None:
    """The background thread: compile the queued entries, most wanted first."""
    _jit.working = True
    try:
        _namespace()
        while True:
            with _jit.cond:
                if _jit.stop or not _jit.queue:
                    return
                name = _jit.busy = _jit.queue.pop(0)
            try:
                if name not in _jit.ready:
                    _compile_one(name)
            finally:
                with _jit.cond:
                    _jit.busy = None
                    _jit.cond.notify_all()
    except BaseException as exc:  # noqa: BLE001 - any failure leaves the interpreted kernels in place
        _fail(exc)
    finally:
        _jit.working = False


def _ensure_thread() -> None:
    with _jit.cond:
        if _jit.thread is not None or _jit.stop or _jit.failed or not _jit.queue:
            return
        _jit.thread = threading.Thread(target=_worker, name="quiver-art-jit", daemon=True)
        _jit.thread.start()


def _shutdown() -> None:
    """At exit: no new compile; wait for the one in flight (a few seconds at most,
    only in the first process after an install), so the interpreter never
    finalizes under a thread that is inside LLVM."""
    with _jit.cond:
        _jit.stop = True
        t = _jit.thread
    if t is not None and t.is_alive():
        t.join(timeout=300)


atexit.register(_shutdown)


def _after_fork_in_child() -> None:
    """The compile thread does not exist in a forked child: forget it, so the
    child starts its own when it needs one."""
    global _jit
    old = _jit
    new = _JitState()
    new.ns, new.ready, new.mode, new.failed = old.ns, dict(old.ready), old.mode, old.failed
    new.cache_dir, new.seconds, new.cache_hits = old.cache_dir, dict(old.seconds), dict(old.cache_hits)
    new.queue = [n for n in ENTRIES if n not in new.ready]
    lockmod = sys.modules.get("numba.core.compiler_lock")  # never import here: a ghost may hold its lock
    if old.working and lockmod is not None and hasattr(lockmod, "global_compiler_lock"):
        # The parent's thread may have been inside Numba: its compiler lock may
        # be held by a thread this process does not have.  (A fork in the
        # first half second, while that thread imports numba, can leave the
        # child a half-imported numba: fork before the first ART call, or
        # call warmup() first.)
        lockmod.global_compiler_lock._lock = threading.RLock()
    if old.working:
        # Dispatchers the thread was compiling may hold half-made overloads:
        # the child compiles with fresh ones (those already in place stay).
        new.ns = None
    _jit = new


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _wait_for(name: str):
    """Block until entry ``name`` is compiled (moving it to the front of the
    queue); compile it here if no thread will.  Returns what to call."""
    with _jit.cond:
        if name in _jit.queue:
            _jit.queue.remove(name)
            _jit.queue.insert(0, name)
        while name not in _jit.ready and _jit.failed is None:
            t = _jit.thread
            if t is None or not t.is_alive() or (_jit.stop and _jit.busy != name):
                break
            _jit.cond.wait(timeout=1.0)
        if name in _jit.ready:
            return _jit.ready[name]
        if _jit.failed is not None:
            return _PY[name]
    return _compile_here(name)


def _compile_here(name: str):
    try:
        with _jit.ns_lock:
            if name in _jit.ready:
                return _jit.ready[name]
            return _compile_one(name)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return _PY[name]


def _resolve(name: str, small: bool):
    """What entry ``name`` runs while its compiled kernel is not in place."""
    mode = _mode()
    if mode == "off" or _jit.failed is not None:
        return _PY[name]
    if mode == "sync":
        return _compile_here(name)
    _ensure_thread()
    if name in _jit.ready:
        return _jit.ready[name]
    return _PY[name] if small else _wait_for(name)


def _make_entry(name: str):
    small = _SMALL[name]
    py = _PY[name]

    if small is None:
        def entry(*args):
            fn = _jit.ready.get(name)
            return (fn or _resolve(name, True))(*args)
    else:
        def entry(*args):
            fn = _jit.ready.get(name)
            return (fn or _resolve(name, bool(small(*args))))(*args)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = py.__doc__
    entry.py_func = py
    return entry


for _name in ENTRIES:
    globals()[_name] = _make_entry(_name)
del _name


def require(*names: str) -> None:
    """Block until the named entry points are compiled (all if none are named):
    for callers about to do much work (a long log replay).  A no-op with
    QUIVER_ART_JIT=off or once compilation has failed."""
    for name in names or ENTRIES:
        if name not in ENTRIES:
            raise ValueError(f"unknown ART kernel {name!r}; known: {ENTRIES}")
        if name not in _jit.ready:
            _resolve(name, False)


def warmup(wait: bool = True, timeout: float | None = None) -> dict:
    """Compile (or load from the cache) every entry point now.  ``wait``: return
    once all are in place (or ``timeout`` passed); else just start the thread.
    Returns ``jit_status()``.  A no-op with QUIVER_ART_JIT=off."""
    mode = _mode()
    if mode == "off":
        return jit_status()
    if mode == "sync" or (_jit.stop and wait):
        for name in ENTRIES:
            if name not in _jit.ready:
                _compile_here(name)
        return jit_status()
    _ensure_thread()
    if wait:
        deadline = None if timeout is None else time.monotonic() + timeout
        with _jit.cond:
            while len(_jit.ready) < len(ENTRIES) and _jit.failed is None:
                t = _jit.thread
                if t is None or not t.is_alive():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                _jit.cond.wait(timeout=1.0 if left is None else min(left, 1.0))
    return jit_status()


def jit_status() -> dict:
    """Where compilation stands: mode, cache directory (None: none writable, or
    not chosen yet), compiled entries with the seconds each took and whether
    it came from the cache, pending ones, and the failure if any."""
    return {
        "mode": _mode(),
        "cache_dir": _jit.cache_dir,
        "cache_tried": list(_jit.cache_tried),
        "compiled": sorted(_jit.ready),
        "pending": [n for n in ENTRIES if n not in _jit.ready],
        "seconds": dict(_jit.seconds),
        "from_cache": dict(_jit.cache_hits),
        "failed": _jit.failed,
        "thread_alive": bool(_jit.thread is not None and _jit.thread.is_alive()),
    }
