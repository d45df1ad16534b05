"""SortedIndex: a sortedcontainers ``SortedDict`` — an ordered index in pure Python.

Point operations go through the underlying dict (hash lookups); the sorted key
list (a list of sub-lists, O(log N) insert) makes ``scan_prefix`` an ``irange``
from the prefix to its successor: O(log N + matches) instead of flat's O(N).
Memory-only: ``persistent`` is False and a reopen starts empty.
"""

from __future__ import annotations

import sys
from itertools import islice
from typing import Iterator

from sortedcontainers import SortedDict

from quiver.index_backends._common import chunked_scan, check_prefix, prefix_successor
from quiver.index_backends.flat import FlatIndex
from quiver.index_backends.protocol import IndexStats


class SortedIndex(FlatIndex):
    """SortedDict-backed residency index (memory-only; O(log N) prefix seeks).

    Everything but the scan is FlatIndex's: SortedDict is a dict subclass, so
    point operations are the same hash lookups."""

    name = "sorted"

    def _new_map(self) -> SortedDict:
        return SortedDict()

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

    def stats(self) -> IndexStats:
        d = self._live()
        # O(N): key/value objects, the hash table (SortedDict is a dict subclass)
        # and the SortedList's sub-lists of references to the same keys.
        sl = d._list
        mem = sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())
        mem += sum(sys.getsizeof(sub) for sub in sl._lists) + sys.getsizeof(sl._lists) + sys.getsizeof(sl._maxes)
        return IndexStats(records=len(d), bytes_on_disk=0, bytes_written=0, persistent=False, memory_bytes=mem, detail={})
