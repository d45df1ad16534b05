"""Typed errors of the tiers (translated to engine.errors by the BlockStore facade).

``tier`` sits below ``engine`` in the dependency order and cannot import it, so
it raises its own errors, all under :class:`TierError`.  Messages name the
operation, the object and the server's error code; they never carry
credentials, and errors raised from a botocore failure do not chain it
(``from None``), because a botocore response can echo the access key id.
"""

from __future__ import annotations


class TierError(Exception):
    """Base class of every error the tiers raise on purpose."""


class ObjectStoreError(TierError):
    """Base class of the L2 object store's errors."""


class InvalidObjectKeyError(ObjectStoreError, ValueError):
    """A key is not a non-empty bytes object of at most MAX_KEY_BYTES bytes."""


class InvalidRangeError(ObjectStoreError, ValueError):
    """A ranged read asks for bytes outside the object (or a negative range)."""


class ObjectStoreConfigError(ObjectStoreError, ValueError):
    """The store cannot be opened as specified (bad spec, missing bucket, bad option)."""


class ObjectStoreClosedError(ObjectStoreError):
    """The store was used after close()."""


class ObjectStoreAuthError(ObjectStoreError):
    """The server refused the credentials or the request (403); not retried."""


class ObjectStoreRequestError(ObjectStoreError):
    """The server rejected a request for a reason retrying cannot fix (a 4xx)."""


class ObjectStoreIOError(ObjectStoreError):
    """The local-directory object store's file system failed (disk full, EIO,
    a directory removed under it).  Nothing the failing call wrote is published."""


class ObjectStoreUnreachableError(ObjectStoreError):
    """The object store did not answer usefully within the retry budget.

    Raised when every try failed with a connection error, a timeout or a
    retryable server error (5xx, 429, SlowDown) and the tries or the total time
    ran out.  ``attempts`` and ``elapsed_s`` say how much was spent."""

    def __init__(self, message: str, attempts: int, elapsed_s: float) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.elapsed_s = elapsed_s


class ObjectStoreUnavailableError(ObjectStoreUnreachableError):
    """The object store's circuit breaker is open: recent tries failed in a row,
    so this call was refused at once, without a request (``attempts`` is 0).

    Raised until a probe finds the store answering again (half-open after a
    cool-down: docs/OBJECTSTORE.md, "Circuit breaker")."""


class ObjectCorruptError(ObjectStoreError):
    """An object's bytes fail their length or CRC32C check, on every try.

    The bytes are never returned.  In S3 a short or damaged body is retried
    first (it is usually the network); this is raised when the budget runs out
    or when the stored object itself is damaged (a local file that fails its CRC).
    """


class ManifestCorruptError(ObjectStoreError):
    """A manifest object is malformed or fails its CRC32C."""


# --- L0 RAM and L1 disk tiers (tier.ram, tier.disk) -------------------------------------


class TierKeyError(TierError, ValueError):
    """A key is not a non-empty bytes object of at most the tier's key length."""


class TierBufferError(TierError, ValueError):
    """Data is not a C-contiguous buffer (bytes, bytearray, memoryview, ndarray)."""


class TierObjectTooLargeError(TierError, ValueError):
    """A block is larger than a RAM slot, or than the disk tier's whole byte budget."""


class TierFullError(TierError):
    """No slot can be freed: every slot is held by an uncommitted reservation."""


class TierReservationError(TierError):
    """reserve/commit/abort misused: the key is already stored or reserved, or
    there is no reservation to commit or abort."""


class TierLockedError(TierError):
    """The disk tier's volume is locked by another writer (process or handle)."""


class TierClosedError(TierError):
    """The tier was used after close()."""


class TierCorruptError(TierError):
    """A stored block failed its length or CRC32C check; it has been dropped, so
    the next read of the key is a miss.  Wrong bytes are never returned."""


class TierIOError(TierError):
    """The disk tier failed an I/O call or was poisoned by a failed WAL fsync
    (reopen to recover); the walpub error is the ``__cause__``."""


class TierBusyError(TierError):
    """A bounded wait in the disk tier (a key in flight, a full commit queue) ran out."""


class TierConfigError(TierError, ValueError):
    """A tier cannot be built as asked (unknown policy, a budget below one slot)."""
