"""The residency-index protocol every backend implements.

A residency index maps a key (bytes: 16-byte identity namespace + 32-byte block
key in Quiver's use, but any non-empty byte string here) to a small opaque value
(the packed residency record the tier layer defines).  Keys order
lexicographically as unsigned bytes; ``scan_prefix`` yields in that order.

Contract shared by every backend (tests/test_index_conformance.py checks it):
bad arguments fail when the method is called, before anything is written —
a key or prefix that is not ``bytes`` (or an empty key) raises
``InvalidKeyError``, a value that is not ``bytes`` raises ``TypeError``,
mismatched ``put_many`` lengths raise ``ValueError``; any call after ``close()``
(which is idempotent) raises ``IndexClosedError``; opening a persistent index
that is already open raises ``IndexLockedError``.  Handles are not thread-safe:
the caller serialises calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class IndexStats:
    """What a backend reports about itself.

    records:        live key count.
    bytes_on_disk:  bytes the backend's files occupy now (0 for memory-only).
    bytes_written:  bytes the backend wrote to its files since this handle opened
                    (0 for memory-only backends).  For the LSM this is RocksDB's
                    own WAL + flush + compaction byte counters.
    persistent:     True when a reopen finds the data again without a rebuild.
    memory_bytes:   best estimate of resident memory the structure uses (0 if unknown).
    detail:         backend-specific figures (e.g. RocksDB tickers, LMDB page counts).
    """

    records: int
    bytes_on_disk: int
    bytes_written: int
    persistent: bool
    memory_bytes: int = 0
    detail: dict | None = None


@runtime_checkable
class ResidencyIndex(Protocol):
    """One protocol, five backends (flat, sorted, lmdb, lsm, art)."""

    name: str
    persistent: bool

    def put(self, key: bytes, value: bytes) -> None:
        """Insert or overwrite one record."""

    def put_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Insert or overwrite many records in one call (one batch / transaction)."""

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values for many keys, in order, None where absent."""

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; True if it was present."""

    def write_batch(self, keys: Sequence[bytes], values: Sequence[bytes], deletes: Sequence[bytes],
                    applied_seq: int) -> None:
        """Put ``keys``/``values``, then delete ``deletes``, then set applied_seq --
        one atomic unit: after a crash and reopen, all of it or none of it is
        visible.  walpub applies each durable WAL group commit with one call, so
        the index is always exactly the state as of its applied_seq."""

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs whose key starts with ``prefix``, in key order.
        ``prefix=b""`` scans everything.  Not necessarily a snapshot: a key
        written or deleted while the iterator is suspended may or may not show."""

    def longest_prefix(self, chain: Sequence[bytes]) -> int:
        """Number of leading keys of ``chain`` that are present (stops at the
        first miss: a block is usable only if every block before it is)."""

    def __len__(self) -> int:
        """Live record count."""

    def flush(self) -> None:
        """Make every write so far durable (no-op for memory-only backends)."""

    def close(self) -> None:
        """Flush and release files; the handle is unusable afterwards."""

    def stats(self) -> IndexStats:
        """Sizes and write counters (see IndexStats)."""

    def get_applied_seq(self) -> int:
        """The last WAL sequence number whose effects this index holds durably
        (0 when none).  walpub replays only the WAL tail past it."""

    def set_applied_seq(self, seq: int) -> None:
        """Record ``seq`` as applied; durable at the next flush (or sooner)."""
