"""Typed errors of walpub (translated to engine.errors by the BlockStore facade).

Every failure a caller can act on is one of these; nothing walpub raises on
purpose is a bare OSError or ValueError without a WalpubError base."""

from __future__ import annotations


class WalpubError(Exception):
    """Base class of every error walpub raises on purpose."""


class VolumeLockedError(WalpubError):
    """Another writer (process or handle) holds the volume's LOCK."""


class VolumeClosedError(WalpubError):
    """The Volume was used after close()."""


class VolumeFailedError(WalpubError):
    """An fsync or write of the WAL failed; the volume refuses further work.

    After a failed fsync the kernel may have dropped the dirty pages
    ("fsyncgate"), so retrying cannot make the data durable: reopen (recover)."""


class InvalidKeyError(WalpubError, ValueError):
    """A key is not a non-empty bytes object of at most MAX_KEY_BYTES bytes."""


class ObjectTooLargeError(WalpubError, ValueError):
    """An object exceeds MAX_OBJECT_BYTES or the volume's byte capacity."""


class ObjectNotFoundError(WalpubError, KeyError):
    """No live object is stored under the key."""


class CorruptObjectError(WalpubError):
    """An object's bytes fail the length or CRC32C recorded for it.

    The record has been dropped (WAL DELETE + unlink) before this is raised, so
    the next read of the key is a miss, never wrong bytes."""


class BusyError(WalpubError):
    """A bounded wait (in-flight key, full group-commit queue) ran out."""


class VolumeIOError(WalpubError):
    """A file-system call for an object failed (disk full, EIO, permissions);
    the OSError is the ``__cause__``.  Nothing was acknowledged."""
