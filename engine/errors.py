"""Typed errors of Quiver's public API.

Every failure a caller can act on is a subclass of :class:`QuiverError`, so an
engine can catch one base class.  Lower layers (``walpub``, ``index_backends``)
sit below ``engine`` in the dependency order and cannot import it; they raise
their own typed errors, which the engine facade translates into these (with the
original chained as ``__cause__``; the type table is engine.error_map).
"""

from __future__ import annotations

# tier.errors imports nothing; engine sits above tier, so it may subclass tier's errors.
import quiver.tier.errors as _tier_errors


class QuiverError(Exception):
    """Base class of every error Quiver raises on purpose."""


# --- identity -----------------------------------------------------------------


class InvalidIdentityError(QuiverError, ValueError):
    """A CacheIdentity field is missing, empty, malformed or unknown."""


class InvalidTokensError(QuiverError, ValueError):
    """Token ids cannot be keyed: not integers, not 1-D, or outside uint32."""


class IdentityMismatchError(QuiverError):
    """A stored block belongs to another identity, key, parent or token count."""


# --- payloads -----------------------------------------------------------------


class ShapeMismatchError(QuiverError, ValueError):
    """A payload's shape does not match the identity's block shape."""


class DTypeMismatchError(QuiverError, TypeError):
    """A payload's dtype does not match the identity's kv dtype."""


class InvalidPayloadError(QuiverError, ValueError):
    """A payload cannot be stored as KV: a meta, sparse or quantized torch tensor,
    a tensor whose bytes cannot be read on the CPU, or NaN/Inf in a block of a
    lossy int8 (``kv_quant``) identity, which no scale can represent."""


class BlockTableError(QuiverError, ValueError):
    """A block table names a block outside the engine's cache, or names one twice for a scatter."""


# --- envelope -----------------------------------------------------------------


class EnvelopeError(QuiverError):
    """A block envelope cannot be decoded; its bytes are never returned."""


class BadMagicError(EnvelopeError):
    """The bytes do not start with the envelope magic."""


class UnsupportedVersionError(EnvelopeError):
    """The envelope's format version is not one this build understands."""


class UnknownCodecError(EnvelopeError):
    """The envelope names a codec (or flag) this build does not know."""


class TruncatedEnvelopeError(EnvelopeError):
    """The envelope is shorter than its header says it must be."""


class LossyCodecError(UnknownCodecError):
    """A lossy (int8) envelope met a reader that expects exact KV.

    A subclass of UnknownCodecError: to a reader that did not opt in with
    ``allow_lossy=True``, codec 3 is a codec it does not accept.
    """


class ChecksumMismatchError(EnvelopeError):
    """CRC32C over header and body does not match: the block is corrupt."""


class CorruptEnvelopeError(EnvelopeError):
    """A header field is impossible (absurd length, bad shape, inconsistent sizes)."""


# --- stores -------------------------------------------------------------------


class StoreLockedError(QuiverError):
    """Another process holds the store's write lock."""


class ObjectStoreUnreachableError(QuiverError, _tier_errors.ObjectStoreUnreachableError):
    """The object store did not answer within the retry budget.

    The one "L2 does not answer" type: it is also the tiers' own
    :class:`quiver.tier.errors.ObjectStoreUnreachableError` (and so a TierError
    too), so ``except quiver.tier.errors.ObjectStoreUnreachableError`` catches
    it whichever layer raised it, and ``except QuiverError`` catches the
    facade's.  ``attempts`` and ``elapsed_s`` are what the tier spent (0 when
    it is not known, e.g. a message-only re-raise)."""

    def __init__(self, message: str, attempts: int = 0, elapsed_s: float = 0.0) -> None:
        _tier_errors.ObjectStoreUnreachableError.__init__(self, message, attempts, elapsed_s)


# --- block store (engine.store) ----------------------------------------------


class BlockNotFoundError(QuiverError, KeyError):
    """A requested block is in no tier (lookup first: it says how many are)."""


class StoreClosedError(QuiverError):
    """The BlockStore was used after close()."""


class StoreConfigError(QuiverError, ValueError):
    """BlockStore.open was given options it cannot honour (bad spec, bad sizes, missing bucket)."""


class StoreIOError(QuiverError):
    """The local disk tier failed (I/O error, failed fsync, bounded wait ran out).

    Nothing the failing call was writing is acknowledged; reopen the store to recover."""


class ObjectStoreAuthError(QuiverError):
    """The object store refused the credentials or the request (no retry helps)."""


class ObjectStoreRequestError(QuiverError):
    """The object store rejected a request for a reason retrying cannot fix."""
