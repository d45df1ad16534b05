"""Helpers shared by the residency-index backends: argument checks, the chunked
prefix scan, the directory lock and size accounting.

Kept here so every backend refuses bad input with the same typed error and the
same message, which is what lets one conformance suite test them all.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable, Iterator, Sequence

from quiver.index_backends.errors import IndexClosedError, IndexLockedError, InvalidKeyError

# Largest unsigned 64-bit value: applied_seq is a WAL sequence number stored as u64.
MAX_SEQ = (1 << 64) - 1

# Pairs fetched per step of a chunked scan.  Bounded so a scan never holds a
# transaction / iterator across a ``yield`` (LMDB cannot grow its map while a
# read transaction is open; RocksDB cannot reopen while an iterator is alive).
SCAN_CHUNK = 1024


def check_key(key) -> bytes:
    """Return ``key`` if it is a non-empty bytes object, else raise InvalidKeyError."""
    if type(key) is not bytes:  # noqa: E721 - bytearray/memoryview/str are refused on purpose
        raise InvalidKeyError(f"index keys must be bytes, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("index keys must be non-empty")
    return key


def check_keys(keys: Sequence[bytes]) -> list[bytes]:
    """Validate every key up front, so a bad key fails the whole call before any write."""
    if isinstance(keys, (bytes, bytearray, str)):
        raise InvalidKeyError("expected a sequence of keys, got a single bytes/str object")
    return [check_key(k) for k in keys]


def check_value(value) -> bytes:
    """Values are opaque bytes (possibly empty); anything else is a TypeError."""
    if type(value) is not bytes:  # noqa: E721
        raise TypeError(f"index values must be bytes, got {type(value).__name__}")
    return value


def check_pairs(keys: Sequence[bytes], values: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Validate a put_many batch completely before anything is written."""
    ks = check_keys(keys)
    if isinstance(values, (bytes, bytearray, str)):
        raise TypeError("expected a sequence of values, got a single bytes/str object")
    vs = [check_value(v) for v in values]
    if len(ks) != len(vs):
        raise ValueError(f"put_many got {len(ks)} keys but {len(vs)} values")
    return ks, vs


def check_batch(keys: Sequence[bytes], values: Sequence[bytes], deletes: Sequence[bytes],
                applied_seq) -> tuple[list[bytes], list[bytes], list[bytes], int]:
    """Validate a write_batch completely (puts, deletes, seq) before anything is written."""
    ks, vs = check_pairs(keys, values)
    return ks, vs, check_keys(deletes), check_seq(applied_seq)


def check_prefix(prefix) -> bytes:
    """A scan prefix is bytes; unlike a key it may be empty (scan everything)."""
    if type(prefix) is not bytes:  # noqa: E721
        raise InvalidKeyError(f"scan prefix must be bytes, got {type(prefix).__name__}")
    return prefix


def check_seq(seq) -> int:
    """applied_seq is a non-negative int that fits in u64."""
    if type(seq) is not int:  # noqa: E721 - bool is refused too
        raise TypeError(f"applied_seq must be an int, got {type(seq).__name__}")
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"applied_seq must be in [0, 2**64), got {seq}")
    return seq


def prefix_successor(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string starting with ``prefix``
    (None when there is none: empty prefix or all 0xFF)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def first_miss(values: Sequence[bytes | None]) -> int:
    """Index of the first None in ``values`` (len(values) if none)."""
    for i, v in enumerate(values):
        if v is None:
            return i
    return len(values)


def chunked_scan(
    fetch: Callable[[bytes, bytes | None, int], list[tuple[bytes, bytes]]],
    prefix: bytes,
    is_open: Callable[[], bool],
) -> Iterator[tuple[bytes, bytes]]:
    """Yield a prefix scan in bounded chunks.

    ``fetch(prefix, after, limit)`` returns up to ``limit`` pairs whose key starts
    with ``prefix`` and is > ``after`` (>= prefix when ``after`` is None), in key
    order.  No transaction or iterator outlives one call of ``fetch``, so the scan
    is not a snapshot: a key written during the scan may or may not appear, but
    every pair yielded was present when its chunk was read, and keys come out in
    strictly increasing order.
    """
    after = None
    while True:
        if not is_open():
            raise IndexClosedError("index was closed during a scan")
        chunk = fetch(prefix, after, SCAN_CHUNK)
        yield from chunk
        if len(chunk) < SCAN_CHUNK:
            return
        after = chunk[-1][0]


class DirLock:
    """An exclusive ``flock`` on ``<dir>/<name>``.

    flock locks belong to the open file description, so a second open of the
    same index conflicts both from another process and from this one.
    """

    def __init__(self, directory: str, name: str = "QUIVER-INDEX.LOCK"):
        self.path = os.path.join(directory, name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise IndexLockedError(f"index at {directory!r} is already open (lock {self.path!r} is held)") from None
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def dir_size(directory: str) -> int:
    """Sum of the sizes of the regular files under ``directory``."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # a file removed by a background compaction
                continue
    return total


def require_dir(path) -> str:
    """Persistent backends need a directory path; create it if missing."""
    if path is None:
        raise ValueError("a persistent index needs a directory path")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    return path
