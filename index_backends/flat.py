"""FlatIndex: a plain dict — the baseline every other backend is measured against.

Point operations are one hash lookup (the fastest a Python index can be), but
``scan_prefix`` is an O(N) filter over every key followed by a sort of the
matches: the cost an ordered structure exists to avoid.  Memory-only: nothing is
written to disk, ``persistent`` is False and a reopen starts empty (Quiver
rebuilds it from the walpub WAL).
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence

from quiver.index_backends._common import (
    check_batch,
    check_key,
    check_keys,
    check_pairs,
    check_prefix,
    check_seq,
    check_value,
)
from quiver.index_backends.errors import IndexClosedError
from quiver.index_backends.protocol import IndexStats


class FlatIndex:
    """dict-backed residency index (memory-only; O(N) prefix scans)."""

    name = "flat"
    persistent = False

    def __init__(self, path=None, **opts):
        if opts:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(opts)}")
        self._d: dict[bytes, bytes] | None = self._new_map()
        self._seq = 0

    def _new_map(self) -> dict[bytes, bytes]:
        """The mapping that holds the records (a subclass swaps in an ordered one)."""
        return {}

    def _live(self) -> dict[bytes, bytes]:
        if self._d is None:
            raise IndexClosedError(f"{type(self).__name__} is closed")
        return self._d

    def put(self, key: bytes, value: bytes) -> None:
        d = self._live()
        d[check_key(key)] = check_value(value)

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        d = self._live()
        ks, vs = check_pairs(keys, values)
        d.update(zip(ks, vs))

    def write_batch(self, keys, values, deletes, applied_seq) -> None:
        d = self._live()
        ks, vs, ds, seq = check_batch(keys, values, deletes, applied_seq)
        d.update(zip(ks, vs))
        for k in ds:
            d.pop(k, None)
        self._seq = seq

    def get(self, key: bytes) -> bytes | None:
        return self._live().get(check_key(key))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        d = self._live()
        return [d.get(k) for k in check_keys(keys)]

    def delete(self, key: bytes) -> bool:
        d = self._live()
        return d.pop(check_key(key), None) is not None

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        d = self._live()
        prefix = check_prefix(prefix)
        # The baseline: look at every key, then sort the matches.
        matches = sorted(k for k in d if k.startswith(prefix))
        return self._yield(matches)

    def _yield(self, keys: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
        for k in keys:
            v = self._live().get(k)
            if v is not None:  # deleted since the scan started
                yield k, v

    def longest_prefix(self, chain: Sequence[bytes]) -> int:
        d = self._live()
        n = 0
        for k in check_keys(chain):
            if k not in d:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._live())

    def flush(self) -> None:
        self._live()

    def close(self) -> None:
        self._d = None

    def stats(self) -> IndexStats:
        d = self._live()
        # O(N): sums the Python object sizes of every key and value plus the table.
        mem = sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())
        return IndexStats(records=len(d), bytes_on_disk=0, bytes_written=0, persistent=False, memory_bytes=mem, detail={})

    def get_applied_seq(self) -> int:
        self._live()
        return self._seq

    def set_applied_seq(self, seq: int) -> None:
        self._live()
        self._seq = check_seq(seq)
