"""The crash-state enumerator: the on-disk states a power loss at a recorded
:class:`~walpub.simfs.CrashPoint` may leave (the model, after ALICE/OSDI'14
and CrashMonkey).

:func:`crash_states` turns a point (durable state plus pending ops, recorded by
:class:`~walpub.simfs.SimFileSystem`) into a bounded sample of states:

* a file's data is durable only through fsync of that file; un-fsynced writes
  and truncates persist as any *prefix* of the sequence, the first lost write
  optionally torn (half of it, or its second half zeros or junk);
* a name (create, mkdir, rename, unlink) is durable only through fsync of its
  directory; un-synced directory operations persist per directory as any
  prefix, plus every single op alone, every all-but-one, and a seeded sample of
  other subsets; a cross-directory rename is two ops (link in the target,
  unlink in the source) that persist independently, and a hard link
  (``link``) is one such link op: a second name for the same inode;
* what a directory entry points to after the crash is the inode's durable data
  plus the chosen pending ops; unreachable inodes vanish.

Not modelled: reordering of ops *across* different files' data beyond the
independence above, block-granular tearing inside one write other than the
three variants, metadata like mtime/permissions, media errors (see the bit-flip
campaign), and the page cache surviving a process kill (SimFileSystem.clone()
gives that: keep the volatile view, keep the pending lists).

A pure function of the point: nothing here runs a Volume or judges a state
(that is :mod:`walpub.crash_check`, which also holds the explorers that run a
workload and check every state enumerated here).
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

from quiver.walpub.simfs import CrashPoint, CrashState, SimFileSystem, walk_state


def _junk(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _file_options(ops: tuple) -> list[tuple]:
    """Choices for one file's pending data ops: ("prefix", j) or ("torn", j, variant)."""
    out = [("prefix", j) for j in range(len(ops) + 1)]
    for j, op in enumerate(ops):
        if op[0] == "write" and len(op[2]) >= 2:
            out += [("torn", j, "half"), ("torn", j, "zeros"), ("torn", j, "junk")]
    return out


def _apply_data(base: bytes, ops: tuple, choice: tuple) -> bytes:
    buf = bytearray(base)
    n = choice[1]
    for op in ops[:n]:
        _apply_one(buf, op)
    if choice[0] == "torn":
        _, off, data = ops[n]
        half = len(data) // 2
        if choice[2] == "half":
            data = data[:half]
        elif choice[2] == "zeros":
            data = data[:half] + bytes(len(data) - half)
        else:
            data = data[:half] + _junk(len(data) - half, off + len(data))
        _apply_one(buf, ("write", off, data))
    return bytes(buf)


def _apply_one(buf: bytearray, op: tuple) -> None:
    if op[0] == "write":
        _, off, data = op
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(data)] = data
    else:
        del buf[op[1]:]


def _dir_options(ops: tuple, rng: random.Random, samples: int) -> list[tuple[int, ...]]:
    """Subsets (as sorted index tuples) of one directory's pending ops."""
    m = len(ops)
    opts = {tuple(range(j)) for j in range(m + 1)}           # every prefix
    if m >= 2:
        opts |= {(i,) for i in range(m)}                      # each op alone
    if m >= 3:
        opts |= {tuple(j for j in range(m) if j != i) for i in range(m)}  # all but one
    for _ in range(samples if m >= 3 else 0):
        opts.add(tuple(j for j in range(m) if rng.random() < 0.5))
    return sorted(opts, key=lambda t: (len(t), t))


def _apply_dir(base: dict, ops: tuple, subset: tuple[int, ...]) -> dict:
    d = dict(base)
    for i in subset:
        op = ops[i]
        if op[0] == "link":
            d[op[1]] = op[2]
        elif op[0] == "unlink":
            d.pop(op[1], None)
        else:
            _, src, dst, ino = op
            if d.get(src) == ino:
                del d[src]
            d[dst] = ino
    return d


def crash_states(point: CrashPoint, kinds: dict[int, str], *, max_states: int = 64,
                 seed: int = 0, subset_samples: int = 3) -> list[CrashState]:
    """The on-disk states a power loss at ``point`` may leave (bounded sample).

    Full product of per-file and per-directory choices when it has at most
    ``max_states`` members; otherwise: nothing pending persisted, everything
    persisted, each single choice against both of those, then seeded random
    combinations up to ``max_states``."""
    rng = random.Random(seed * 1_000_003 + point.n_ops)
    comps: list[tuple[str, int, list]] = []
    for ino, ops in sorted(point.pend_data.items()):
        comps.append(("f", ino, _file_options(ops)))
    for ino, ops in sorted(point.pend_dir.items()):
        comps.append(("d", ino, _dir_options(ops, rng, subset_samples)))
    total = 1
    for c in comps:
        total *= len(c[2])
        if total > max_states:
            break
    if total <= max_states:
        combos = list(itertools.product(*[range(len(c[2])) for c in comps]))
    else:
        lo = tuple(0 for _ in comps)
        hi = tuple(_full_index(c) for c in comps)
        chosen = {lo: None, hi: None}
        # Round-robin over components, fewest options first, so that every
        # component gets its first choices varied before any gets its last.
        order = sorted(range(len(comps)), key=lambda i: len(comps[i][2]))
        widest = max(len(c[2]) for c in comps)
        for j in range(widest):
            for i in order:
                if j >= len(comps[i][2]):
                    continue
                for base in (hi, lo):
                    chosen[base[:i] + (j,) + base[i + 1 :]] = None
            if len(chosen) >= max_states:
                break
        # Bounded: at most 4 * max_states draws.
        for _ in range(4 * max_states):
            if len(chosen) >= max_states:
                break
            chosen[tuple(rng.randrange(len(c[2])) for c in comps)] = None
        combos = list(chosen)[:max_states]
    out, seen = [], set()
    for combo in combos:
        st = _build(point, kinds, comps, combo)
        dg = st.digest()
        if dg not in seen:
            seen.add(dg)
            out.append(st)
    return out


def _full_index(comp) -> int:
    kind, _ino, opts = comp
    if kind == "f":
        return opts.index(("prefix", max(o[1] for o in opts if o[0] == "prefix")))
    return max(range(len(opts)), key=lambda i: len(opts[i]))


def _build(point: CrashPoint, kinds, comps, combo) -> CrashState:
    entries = dict(point.dur_entries)
    data_over: dict[int, bytes] = {}
    for (kind, ino, opts), j in zip(comps, combo):
        if kind == "f":
            data_over[ino] = _apply_data(point.dur_data.get(ino, b""), point.pend_data[ino], opts[j])
        else:
            entries[ino] = _apply_dir(point.dur_entries.get(ino, {}), point.pend_dir[ino], opts[j])

    def data_of(ino: int) -> bytes:
        if ino in data_over:
            return data_over[ino]
        return point.dur_data.get(ino, b"")

    return walk_state(entries, data_of, kinds)


def states_iter(sim: SimFileSystem, **kw) -> Iterator[tuple[CrashPoint, CrashState]]:
    """Every (point, state) of a recorded SimFileSystem, for custom campaigns."""
    for pt in sim.points:
        for st in crash_states(pt, sim.kinds, **kw):
            yield pt, st
