"""Residency indexes: one protocol, swappable backends, measured against each other.

``index_backends`` owns the :class:`ResidencyIndex` protocol and its backends:
``flat`` (a dict, O(N) scans: the baseline), ``sorted`` (sortedcontainers),
``lmdb`` (LMDB B-tree), ``lsm`` (RocksDB via rocksdict) and ``art`` (an adaptive
radix tree compiled with Numba).  ``open(name, path, **opts)`` opens one;
``available()`` lists the names whose dependencies import.
"""

from __future__ import annotations

import importlib

from quiver.index_backends.errors import (
    IndexBackendError,
    IndexClosedError,
    IndexCorruptError,
    IndexLockedError,
    InvalidKeyError,
    UnknownBackendError,
)
from quiver.index_backends.protocol import IndexStats, ResidencyIndex

# name -> "module:Class"; imported lazily so a missing optional dependency of one
# backend does not break the others.
_BACKENDS: dict[str, str] = {
    "flat": "quiver.index_backends.flat:FlatIndex",
    "sorted": "quiver.index_backends.sorted_map:SortedIndex",
    "lmdb": "quiver.index_backends.btree:LmdbIndex",
    "lsm": "quiver.index_backends.lsm:RocksIndex",
    "art": "quiver.index_backends.art:ArtIndex",
}


def _load(name: str):
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(f"unknown index backend {name!r}; known: {sorted(_BACKENDS)}") from None
    module_name, class_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def available() -> list[str]:
    """Backend names whose module and dependencies import on this machine."""
    names = []
    for name in _BACKENDS:
        try:
            _load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def open(name: str, path=None, **opts) -> ResidencyIndex:  # noqa: A001 - mirrors dbm.open
    """Open backend ``name`` at directory ``path`` (ignored by memory-only backends)."""
    return _load(name)(path, **opts)


__all__ = [
    "IndexStats",
    "ResidencyIndex",
    "IndexBackendError",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexClosedError",
    "InvalidKeyError",
    "UnknownBackendError",
    "open",
    "available",
]
