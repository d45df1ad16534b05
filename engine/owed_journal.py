"""PENDING_L2: the store's durable journal of the keys it owes to L2.

The store appends (and fsyncs) the keys of a put to this file *before* L1
holds the blocks, so no crash -- during a put, with keys in the background
queue, after a failed publish -- loses the fact that L2 still needs them (a
later put would skip them: L1 has them).  docs/STORE.md tells the whole story;
this module is only the file.

Format: fixed-size keys back to back, nothing else.  A torn tail (size not a
multiple of the key size, from a crashed append) is cut off by :meth:`load`
before anything is appended after it, so keys never misalign.

Every file-system call goes through a :class:`walpub.io.FileSystem` (the real
one by default), so the crash simulator (walpub.simfs) can record the calls
and enumerate what a power loss leaves; each fsync carries a label of
``walpub.io.FSYNC_LABELS`` ("journal", "journal_dir", "journal_rewrite",
"journal_rewrite_dir") that a planted-bug test can disable.

Durability, precisely:

* :meth:`append` returns only once its keys are durable: the file's data is
  fsynced ("journal"), and the store directory is fsynced ("journal_dir") the
  first time this object appends to a file whose name it has not itself made
  durable -- a new file, or one a killed predecessor may have left only in the
  page cache.
* :meth:`rewrite` replaces the file by exactly the given keys: tmp write +
  fsync ("journal_rewrite"), rename over PENDING_L2, directory fsync
  ("journal_rewrite_dir"); with no keys it removes the file.  A crash during a
  rewrite leaves the old file (a superset) or the new one, never a mix.
* After any crash, :meth:`load` returns every key whose append returned and
  that no later rewrite left out -- possibly more (keys are never missing,
  extras are harmless: the store re-checks each against L2).

Not thread-safe: the caller serialises calls (the store's ``_journal_lock``).
OSError comes out as is; the store turns it into StoreIOError.
"""

from __future__ import annotations

import posixpath

from quiver.walpub.io import FileSystem, OsFileSystem

KEY_BYTES = 48  # a store key: identity namespace (16) + chain key (32)


class OwedJournal:
    """The append-only key journal at ``path`` (absolute), through ``io``."""

    def __init__(self, path: str, io: FileSystem | None = None, key_bytes: int = KEY_BYTES) -> None:
        self.path = path
        self.io: FileSystem = io if io is not None else OsFileSystem()
        self.key_bytes = key_bytes
        self._dir = posixpath.dirname(path) or "/"
        self._fd: int | None = None
        self._count = 0               # whole keys in the file
        self._name_durable = False    # this object fsynced the directory since the name last changed

    @property
    def count(self) -> int:
        """Whole keys in the file (appended or rewritten; after load, those found)."""
        return self._count

    def load(self) -> list[bytes]:
        """The keys in the file, in order (empty if there is none); a torn tail
        is cut off (and the cut fsynced) so that appends stay aligned."""
        self.close()
        self._name_durable = False  # a killed predecessor may have left it unsynced
        kb = self.key_bytes
        try:
            data = self.io.read_file(self.path)
        except FileNotFoundError:
            self._count = 0
            return []
        whole = len(data) - len(data) % kb
        if whole != len(data):  # torn tail of a crashed append: appending after it would misalign
            fd = self.io.open_append(self.path)
            try:
                self.io.truncate(fd, whole)
                self.io.fsync(fd, "journal")
            finally:
                self.io.close(fd)
        self._count = whole // kb
        return [bytes(data[i : i + kb]) for i in range(0, whole, kb)]

    def append(self, keys: list[bytes]) -> None:
        """Append ``keys`` (one write, one fsync); durable when this returns.
        On failure the file is cut back to whole keys (best effort) and the
        OSError raised."""
        if not keys:
            return
        assert all(len(k) == self.key_bytes for k in keys), "journal keys have one fixed size"
        if self._fd is None:
            fd = self.io.open_append(self.path)
            if not self._name_durable:  # the file may be new (or unsynced): make its name durable
                try:
                    self.io.fsync_dir(self._dir, "journal_dir")
                except OSError:
                    self.io.close(fd)
                    raise
                self._name_durable = True
            self._fd = fd
        try:
            self.io.write(self._fd, b"".join(keys))
            self.io.fsync(self._fd, "journal")
        except OSError:  # never append after a torn record: cut back to whole keys
            try:
                self.io.truncate(self._fd, self._count * self.key_bytes)
            except OSError:
                pass
            raise
        self._count += len(keys)

    def rewrite(self, keys: list[bytes]) -> None:
        """Replace the file by exactly ``keys`` (removed when there are none).

        On OSError the old file or the new one stands (both correct: the old
        one is a superset); the key count is re-read and the error raised."""
        self.close()
        try:
            if not keys:
                if self.io.exists(self.path):
                    self.io.unlink(self.path)
                    self._name_durable = False
                    self.io.fsync_dir(self._dir, "journal_rewrite_dir")
                self._count = 0
                return
            assert all(len(k) == self.key_bytes for k in keys), "journal keys have one fixed size"
            tmp = self.path + ".tmp"
            if self.io.exists(tmp):  # a leftover of a crashed rewrite
                self.io.unlink(tmp)
            fd = self.io.create(tmp)
            try:
                self.io.write(fd, b"".join(keys))
                self.io.fsync(fd, "journal_rewrite")
            finally:
                self.io.close(fd)
            self._name_durable = False
            self.io.rename(tmp, self.path)
            self.io.fsync_dir(self._dir, "journal_rewrite_dir")
            self._name_durable = True
            self._count = len(keys)
        except OSError:
            try:
                self._count = self.io.file_size(self.path) // self.key_bytes
            except OSError:
                self._count = 0
            raise

    def close(self) -> None:
        """Close the append handle (the file stays as it is)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self.io.close(fd)

    def __repr__(self) -> str:
        return f"OwedJournal({self.path!r}, keys={self._count})"


__all__ = ["OwedJournal", "KEY_BYTES"]
