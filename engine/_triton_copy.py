"""The Triton kernel behind ``copy_kernels.paged_runs`` (imported only when it is used:
Triton comes with CUDA builds of torch, not with the CPU wheel)."""

import triton
import triton.language as tl


# Program (row, col) moves words col*BLOCK.. of one run; row = block b of the chunk times
# n_pairs plus the (layer, K/V) pair p.  The run starts at word pair_offs[p] + ids[b] * run
# of ``engine`` and at word row * run of ``buf``.
@triton.jit
def paged_runs(engine, buf, pair_offs, ids, n_pairs, run, GATHER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // n_pairs
    p = row - b * n_pairs
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < run
    at_engine = tl.load(pair_offs + p) + tl.load(ids + b) * run + offs
    at_buf = row * run + offs
    if GATHER:
        tl.store(buf + at_buf, tl.load(engine + at_engine, mask=mask), mask=mask)
    else:
        tl.store(engine + at_engine, tl.load(buf + at_buf, mask=mask), mask=mask)
