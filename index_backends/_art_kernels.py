"""Numba kernels of the adaptive radix tree (see docs/ART.md for the layout).

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
doubling outside compiled code.  Kernels are compiled with ``cache=True`` into
the project's ``.numba_cache`` so a fresh process loads them in milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path


def _pick_cache_dir() -> str:
    """``.numba_cache`` at the repository root when writable, else a user cache dir."""
    repo_cache = Path(__file__).resolve().parent.parent / ".numba_cache"
    try:
        repo_cache.mkdir(exist_ok=True)
        if os.access(repo_cache, os.W_OK):
            return str(repo_cache)
    except OSError:
        pass
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quiver" / "numba"
    user.mkdir(parents=True, exist_ok=True)
    return str(user)


import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# The cache locator reads numba.config.CACHE_DIR when each @njit(cache=True)
# below is decorated, so it is set here, before them.  An explicit
# NUMBA_CACHE_DIR from the environment wins (numba has already read it).
if numba.config.CACHE_DIR:
    CACHE_DIR_SOURCE = "env"
else:
    numba.config.CACHE_DIR = _pick_cache_dir()
    CACHE_DIR_SOURCE = "project"
CACHE_DIR = numba.config.CACHE_DIR

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


@intrinsic
def _prefetch(typingctx, arr, idx):
    """``llvm.prefetch`` of ``arr[idx]`` (read, high locality): lets a batch
    start the cache miss of one key's next node while it works on others."""
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


# -- allocation ---------------------------------------------------------------------


@njit(cache=True, inline="always")
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


@njit(cache=True, inline="always")
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


@njit(cache=True, inline="always")
def _free(N, cls, off):
    N[off] = N[M_FREE + cls]
    N[M_FREE + cls] = off
    N[M_FREEW] += _class_words(cls)


# -- leaves -------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _klen(N, leaf):
    return N[leaf] >> 48


@njit(cache=True, inline="always")
def _vlen(N, leaf):
    return N[leaf + 1] >> 44


@njit(cache=True, inline="always")
def _koff(N, leaf):
    return N[leaf] & KOFF_MASK


@njit(cache=True, inline="always")
def _voff(N, leaf):
    return N[leaf + 1] & VOFF_MASK


@njit(cache=True)
def _leaf_eq(N, K, leaf, kb, ks, kl):
    if _klen(N, leaf) != kl:
        return False
    ko = _koff(N, leaf)
    for i in range(kl):
        if K[ko + i] != kb[ks + i]:
            return False
    return True


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
def _free_leaf(N, leaf):
    N[M_KDEAD] += _klen(N, leaf)
    N[M_VDEAD] += _vlen(N, leaf)
    N[M_COUNT] -= 1
    _free(N, C_LEAF, leaf)


# -- node fields --------------------------------------------------------------------


@njit(cache=True, inline="always")
def _type(N, n):
    return N[n] & 0xFF


@njit(cache=True, inline="always")
def _count(N, n):
    return N[n] >> 8


@njit(cache=True, inline="always")
def _set_tc(N, n, t, c):
    N[n] = t | (c << 8)


@njit(cache=True)
def _new_node(N, t, size):
    n = _alloc(N, t, size)
    _set_tc(N, n, t, 0)
    return n


@njit(cache=True)
def _copy_header(N, src, dst):
    for i in range(1, HDR_W):
        N[dst + i] = N[src + i]


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
def _insert_sorted(N, Nb, kbase, cbase, c, b, child):
    i = c
    while i > 0 and Nb[kbase + i - 1] > b:
        Nb[kbase + i] = Nb[kbase + i - 1]
        N[cbase + i] = N[cbase + i - 1]
        i -= 1
    Nb[kbase + i] = b
    N[cbase + i] = child


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
def _insert(N, Nb, K, V, kb, ks, kl, vb, vs, vl):
    """Insert or overwrite; 1 if the key is new, 0 if it was updated.  The caller
    guarantees INSERT_W free words, kl key bytes and vl value bytes of room."""
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
def get(N, K, key):
    """The leaf's value word (offset | length << 44) of ``key``, or -1."""
    leaf = _lookup(N, N.view(np.uint8), K, key, 0, len(key))
    if leaf == 0:
        return -1
    return N[leaf + 1]


@njit(cache=True)
def put(N, K, V, key, value):
    """1 new, 0 updated; -1/-2/-3: grow N/K/V first (nothing was changed)."""
    if N.shape[0] - N[M_TOP] < INSERT_W:
        return -1
    if K.shape[0] - N[M_KUSED] < len(key):
        return -2
    if V.shape[0] - N[M_VUSED] < len(value):
        return -3
    return _insert(N, N.view(np.uint8), K, V, key, 0, len(key), value, 0, len(value))


@njit(cache=True)
def delete(N, K, key):
    return _delete(N, N.view(np.uint8), K, key, 0, len(key))


@njit(cache=True)
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


@njit(cache=True)
def _lookup_batch(N, Nb, K, kbuf, klens, leaves):
    """``leaves[i]`` = leaf of key i or 0, for a packed batch.  Keys go through
    the tree GROUP at a time, one node step per key per round: the loads of
    different keys are independent, so the CPU overlaps their cache misses
    instead of paying them one after another."""
    _lookup_range(N, Nb, K, kbuf, 0, klens, 0, klens.shape[0], leaves)


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
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
