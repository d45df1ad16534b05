"""SortedIndex: a sortedcontainers ``SortedDict`` — an ordered index in pure Python.

Point operations go through the underlying dict (hash lookups); the sorted key
list (a list of sub-lists, O(log N) insert) makes ``scan_prefix`` an ``irange``
from the prefix to its successor: O(log N + matches) instead of flat's O(N).
Memory-only: ``persistent`` is False and a reopen starts empty.
"""

from __future__ import annotations

import sys
from itertools import islice
from typing import Iterator, Sequence

from sortedcontainers import SortedDict

from index_backends._common import (
    chunked_scan,
    check_key,
    check_keys,
    check_pairs,
    check_prefix,
    check_seq,
    check_value,
    prefix_successor,
)
from index_backends.errors import IndexClosedError
from index_backends.protocol import IndexStats


class SortedIndex:
    """SortedDict-backed residency index (memory-only; O(log N) prefix seeks)."""

    name = "sorted"
    persistent = False

    def __init__(self, path=None, **opts):
        if opts:
            raise TypeError(f"SortedIndex takes no options, got {sorted(opts)}")
        self._d: SortedDict | None = SortedDict()
        self._seq = 0

    def _live(self) -> SortedDict:
        if self._d is None:
            raise IndexClosedError("SortedIndex is closed")
        return self._d

    def put(self, key: bytes, value: bytes) -> None:
        d = self._live()
        d[check_key(key)] = check_value(value)

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        d = self._live()
        ks, vs = check_pairs(keys, values)
        d.update(zip(ks, vs))

    def get(self, key: bytes) -> bytes | None:
        return self._live().get(check_key(key))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        d = self._live()
        return [d.get(k) for k in check_keys(keys)]

    def delete(self, key: bytes) -> bool:
        d = self._live()
        return d.pop(check_key(key), None) is not None

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._live()
        return chunked_scan(self._fetch, check_prefix(prefix), lambda: self._d is not None)

    def _fetch(self, prefix: bytes, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        # Chunked (re-seek after each chunk) because iterating a SortedDict while
        # the caller mutates it between yields is undefined.
        d = self._live()
        hi = prefix_successor(prefix)
        if after is None:
            keys = d.irange(minimum=prefix, maximum=hi, inclusive=(True, False))
        else:
            keys = d.irange(minimum=after, maximum=hi, inclusive=(False, False))
        return [(k, d[k]) for k in islice(keys, limit)]

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
        # O(N): key/value objects, the hash table (SortedDict is a dict subclass)
        # and the SortedList's sub-lists of references to the same keys.
        sl = d._list
        mem = sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())
        mem += sum(sys.getsizeof(sub) for sub in sl._lists) + sys.getsizeof(sl._lists) + sys.getsizeof(sl._maxes)
        return IndexStats(records=len(d), bytes_on_disk=0, bytes_written=0, persistent=False, memory_bytes=mem, detail={})

    def get_applied_seq(self) -> int:
        self._live()
        return self._seq

    def set_applied_seq(self, seq: int) -> None:
        self._live()
        self._seq = check_seq(seq)
