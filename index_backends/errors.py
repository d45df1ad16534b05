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
