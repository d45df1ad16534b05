"""Numba kernels built on vector intrinsics Numba does not offer (16-byte shuffles,
non-temporal stores, a fence): vLLM's CPU paged layout both ways
(``copy_kernels.paged_cpu_copy``) and the DynamicCache scatter into 16-byte aligned
rows (``copy_kernels.scatter_block_rows``).  Imported only when a kernel is made.

Why intrinsics.  K is stored transposed in vLLM's CPU layout.  Written as scalar loops
(2-byte lanes, or 4 x 4 tiles in 64-bit words) the transpose ran at 0.16-0.36 of
memcpy; LLVM does not vectorise it.  ``_transpose8`` moves an 8 x 8 tile of 2-byte
elements in eight 16-byte loads, 24 shuffles and eight 16-byte stores: with the data
in cache a whole 2 MiB block's K costs ~30 us.  What remained was memory: a store to a
line not in cache first reads that line (read-for-ownership), so a scatter into cold
KV blocks moved every destination byte twice.  Non-temporal stores (``movntdq``) write
whole lines without reading them: 512 x 2 MiB scatters went from 0.52 to 0.78-0.91
of memcpy with them (one thread, interleaved, 2026-12-05).  They need 16-byte aligned
destinations (the caller checks) and a fence before the bytes are read elsewhere
(``_fence`` at the end of every call).

A gather writes Quiver's block rows, where a tile covers a quarter of eight different
lines: non-temporal stores there filled the write-combining buffers and ran slower
(0.42) than plain ones.  The gather transposes eight tokens' rows into a small
buffer with plain stores (it stays in L1) and moves the buffer out with non-temporal
stores, and asks for the next block's lines (``llvm.prefetch``) before it starts on
a block: 0.66-0.75 of memcpy at 2 MiB blocks, against 0.33-0.36 before (the
prefetch gave 0.59 -> 0.66 and 0.67 -> 0.75 at 16 and 512 blocks; the scatter, whose
reads are Quiver's consecutive blocks, gained nothing from one).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from quiver.index_backends._art_kernels import _prefetch_intrinsic

_prefetch = _prefetch_intrinsic()  # llvm.prefetch of one element's line (the ART kernels' own)

_VEC = ir.VectorType(ir.IntType(16), 8)  # 16 bytes: eight 2-byte elements
_I32 = ir.IntType(32)
# Shuffle masks of an 8 x 8 transpose of 2-byte lanes: interleave 2-, then 4-, then 8-byte units.
_LO16, _HI16 = [0, 8, 1, 9, 2, 10, 3, 11], [4, 12, 5, 13, 6, 14, 7, 15]
_LO32, _HI32 = [0, 1, 8, 9, 2, 3, 10, 11], [4, 5, 12, 13, 6, 7, 14, 15]
_LO64, _HI64 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]


def _vec_ptr(context, builder, aryty, ary, idx):
    """A pointer to the 16 bytes from ``ary[idx]`` (``ary`` 1-D)."""
    a = context.make_array(aryty)(context, builder, ary)
    p = cgutils.get_item_pointer(context, builder, aryty, a, [idx], wraparound=False)
    return builder.bitcast(p, _VEC.as_pointer())


def _store(builder, value, ptr, nontemporal: bool) -> None:
    if nontemporal:  # aligned: movntdq faults on an address not on a 16-byte boundary
        st = builder.store(value, ptr, align=16)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
    else:
        builder.store(value, ptr, align=1)


def _make_transpose(nontemporal: bool):
    @intrinsic
    def transpose8(typingctx, src, s, s_step, dst, d, d_step):
        """``dst[d + c*d_step + a] = src[s + a*s_step + c]`` for a, c in 0..7."""
        sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            src_t, _, _, dst_t = signature.args[:4]
            sa, s0, ss, da, d0, ds = args
            rows = [builder.load(_vec_ptr(context, builder, src_t, sa, builder.add(s0, builder.mul(ss, ss.type(a)))),
                                 align=1) for a in range(8)]

            def mix(x, y, mask):
                return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, 8), mask))

            a = []
            for i in range(0, 8, 2):
                a += [mix(rows[i], rows[i + 1], _LO16), mix(rows[i], rows[i + 1], _HI16)]
            b = []
            for i in (0, 1, 4, 5):
                b += [mix(a[i], a[i + 2], _LO32), mix(a[i], a[i + 2], _HI32)]
            # b = [cols 0-1, 2-3, 4-5, 6-7] of rows 0-3, then the same of rows 4-7
            for c in range(8):
                lo, hi = b[c // 2], b[c // 2 + 4]
                col = mix(lo, hi, _LO64 if c % 2 == 0 else _HI64)
                _store(builder, col, _vec_ptr(context, builder, dst_t, da, builder.add(d0, builder.mul(ds, ds.type(c)))),
                       nontemporal)
            return context.get_dummy_value()

        return sig, codegen

    return transpose8


_transpose8 = _make_transpose(nontemporal=False)
_transpose8_nt = _make_transpose(nontemporal=True)


@intrinsic
def _move16_nt(typingctx, src, s, dst, d):
    """The 16 bytes from ``src[s]`` to ``dst[d]``, stored non-temporally (``dst[d]`` on a
    16-byte boundary; eight elements of a 2-byte array, sixteen of a byte array)."""
    sig = types.void(src, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        src_t, _, dst_t, _ = signature.args
        v = builder.load(_vec_ptr(context, builder, src_t, args[0], args[1]), align=1)
        _store(builder, v, _vec_ptr(context, builder, dst_t, args[2], args[3]), nontemporal=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fence(typingctx):
    """Orders the non-temporal stores before anything after the call (``mfence``)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


def paged_cpu_py(blocks, kv, ids, layer, shape, gather):
    """Between block payloads ``blocks`` (flat 2-byte elements of ``[m, L, 2, T, H, D]``,
    ``shape``) and one layer ``kv`` (flat, ``[num_blocks, H, 2, T*D]``: per head K as
    ``[D, T]``, then V as ``[T, D]``): block ``j`` is ``kv``'s block ``ids[j]``; ``gather``
    copies kv -> blocks, else blocks -> kv.  T and D are multiples of 8 and the
    destination is on a 16-byte boundary (the caller checks both, and every index)."""
    layers, t_, h_, d_ = shape[1], shape[3], shape[4], shape[5]
    hd, td = h_ * d_, t_ * d_
    rows8 = np.empty(8 * hd, dtype=blocks.dtype)  # a gather's eight token rows of K
    for j in range(ids.shape[0]):
        k0 = (j * layers + layer) * 2 * t_ * hd  # block j's K of this layer, [T, H, D]
        v0 = k0 + t_ * hd
        o0 = ids[j] * h_ * 2 * td  # its block in kv
        if gather:
            if j + 1 < ids.shape[0]:  # the next block's lines, asked for now: its id is random
                nxt = ids[j + 1] * h_ * 2 * td
                for e in range(0, 2 * td * h_, 32):  # 32 elements: a 64-byte line
                    _prefetch(kv, nxt + e)
            for t8 in range(0, t_, 8):
                for h in range(h_):
                    for d8 in range(0, d_, 8):
                        _transpose8(kv, o0 + h * 2 * td + d8 * t_ + t8, t_, rows8, h * d_ + d8, hd)
                for e in range(0, 8 * hd, 8):
                    _move16_nt(rows8, e, blocks, k0 + t8 * hd + e)
        else:
            for h in range(h_):  # whole lines of kv filled by consecutive tiles
                for d8 in range(0, d_, 8):
                    for t8 in range(0, t_, 8):
                        _transpose8_nt(blocks, k0 + t8 * hd + h * d_ + d8, hd, kv, o0 + h * 2 * td + d8 * t_ + t8, t_)
        for t in range(t_):  # V: the payload's rows in order
            for h in range(h_):
                o = o0 + h * 2 * td + td + t * d_
                s = v0 + t * hd + h * d_
                for e in range(0, d_, 8):
                    if gather:
                        _move16_nt(kv, o + e, blocks, s + e)
                    else:
                        _move16_nt(blocks, s + e, kv, o + e)
    _fence()


def scatter_rows_nt_py(src, offset, rows, blocks, t_, h_, row, dst, seq):
    """One DynamicCache tensor's rows from block payloads, stored non-temporally:
    ``dst`` (the bytes of ``[H, seq, row]``, on a 16-byte boundary, ``row`` a
    multiple of 16) gets, for every j, token i and head h, the ``row`` bytes at
    ``offset + (i*H + h)*row`` of ``src[rows[j]]`` (a ``[T, H, row]`` part of a
    payload: one layer's K or V) at token ``blocks[j]*T + i``.  Source order, as
    ``copy_kernels._scatter_rows_py``; a restore writes tensors it has just
    allocated, lines no cache holds (512 x 256 KiB into touched tensors: 7.7-8.6
    ms against 15.7-16.4 with the plain kernel; into fresh ones 34.6-36.6 against
    38.3-40.7, their page faults the rest)."""
    for j in range(rows.shape[0]):
        payload = src[rows[j]]
        for i in range(t_):
            at = (blocks[j] * t_ + i) * row
            for h in range(h_):
                s = offset + (i * h_ + h) * row
                d = h * seq * row + at
                for e in range(0, row, 16):
                    _move16_nt(payload, s + e, dst, d + e)
    _fence()


def copy_rows_nt_py(src, offset, src_rows, dst, dst_rows, nbytes):
    """``dst[dst_rows[j], :nbytes] = src[src_rows[j], offset:offset + nbytes]`` for
    every j, stored non-temporally (``dst``'s rows on 16-byte boundaries, ``nbytes``
    a multiple of 16): a large get's L0 hits into the caller's array."""
    for j in range(src_rows.shape[0]):
        row, out = src[src_rows[j]], dst[dst_rows[j]]
        for e in range(0, nbytes, 16):
            _move16_nt(row, offset + e, out, e)
    _fence()
