"""Typed errors of the residency indexes (translated to engine.errors at the facade)."""


class IndexBackendError(Exception):
    """Base class of errors raised by a residency-index backend."""


class UnknownBackendError(IndexBackendError, ValueError):
    """``index_backends.open`` was given a name it does not know."""


class InvalidKeyError(IndexBackendError, ValueError):
    """A key is not a non-empty bytes object (or exceeds the backend's limit)."""


class IndexClosedError(IndexBackendError):
    """The index handle was used after close()."""


class IndexLockedError(IndexBackendError):
    """Another process holds the index's files open for writing."""


class IndexCorruptError(IndexBackendError):
    """This index's files are damaged (truncated, bit-flipped, a file its own
    metadata names is missing, ...).  The index is derived state: delete its
    files and rebuild it from the source of truth (walpub's WAL and objects).
    Raised by the open or by whichever call first meets the damage."""
