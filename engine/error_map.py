"""Error translation: lower layers' typed errors -> engine.errors, by type.

``tier``, ``walpub`` and ``index_backends`` sit below ``engine`` and raise
their own errors (engine/errors.py says why).  The BlockStore facade runs each
tier call inside :func:`translated`, which turns those errors into the engine
error an application catches, the original chained as ``__cause__``.

The mapping is a table from exception type to engine error type
(:func:`engine_error_table`), walked along the raised error's MRO: the most
specific class listed wins, and a lower error that matches nothing is a
StoreIOError.  Nothing here looks at class names or message strings.  The
lower modules are imported on first use, not at import (engine.store has
always imported the tiers lazily).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

from quiver.engine.errors import (
    ChecksumMismatchError,
    ObjectStoreAuthError,
    ObjectStoreRequestError,
    ObjectStoreUnreachableError,
    QuiverError,
    StoreClosedError,
    StoreConfigError,
    StoreIOError,
    StoreLockedError,
)


@functools.lru_cache(maxsize=None)
def engine_error_table() -> dict[type[BaseException], type[QuiverError]]:
    """Lower error type -> engine error type (exact classes; :func:`translate` walks the MRO)."""
    import quiver.index_backends.errors as ie
    import quiver.tier.errors as te
    import quiver.walpub.errors as we

    rows: list[tuple[tuple[type[BaseException], ...], type[QuiverError]]] = [
        ((we.VolumeLockedError, ie.IndexLockedError, te.TierLockedError), StoreLockedError),
        ((te.ObjectStoreUnreachableError,), ObjectStoreUnreachableError),  # and its ObjectStoreUnavailableError
        ((te.ObjectStoreAuthError,), ObjectStoreAuthError),
        ((te.ObjectStoreConfigError, ie.UnknownBackendError, te.TierConfigError, te.TierObjectTooLargeError),
         StoreConfigError),
        ((te.ObjectStoreRequestError,), ObjectStoreRequestError),
        ((te.ObjectCorruptError, te.TierCorruptError), ChecksumMismatchError),
        ((te.ObjectStoreClosedError, te.TierClosedError, we.VolumeClosedError, ie.IndexClosedError),
         StoreClosedError),
    ]
    return {lower: engine for lowers, engine in rows for lower in lowers}


@functools.lru_cache(maxsize=None)
def lower_errors() -> tuple[type[BaseException], ...]:
    """The base classes of the errors :func:`translated` translates."""
    import quiver.index_backends.errors as ie
    import quiver.tier.errors as te
    import quiver.walpub.errors as we

    return (te.TierError, we.WalpubError, ie.IndexBackendError)


def translate(exc: BaseException, what: str) -> QuiverError:
    """The engine error for a tier / walpub / index error (the caller chains ``exc``)."""
    table = engine_error_table()
    cls = next((table[c] for c in type(exc).__mro__ if c in table), StoreIOError)
    err = cls(f"{what}: {exc}")
    if isinstance(err, ObjectStoreUnreachableError):  # what the tier spent on it
        err.attempts, err.elapsed_s = exc.attempts, exc.elapsed_s
    return err


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Run a tier call; its typed errors come out as engine errors, cause chained."""
    try:
        yield
    except QuiverError:
        raise
    except lower_errors() as exc:
        raise translate(exc, what) from exc


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """An OSError of the store's own files comes out as StoreIOError."""
    try:
        yield
    except OSError as exc:
        raise StoreIOError(f"{what}: {exc.strerror or exc}") from exc
