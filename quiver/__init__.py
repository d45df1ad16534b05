"""Quiver: a content-addressed, crash-consistent KV-cache block store for LLM engines.

The one import name.  ``from quiver import BlockStore, CacheIdentity`` is what an
engine needs; the layers live in subpackages (``quiver.engine``, ``quiver.tier``,
``quiver.walpub``, ``quiver.index_backends``, ``quiver.studies``).  In the source
tree those are the top-level folders engine/, tier/, walpub/, index_backends/ and
studies/; pyproject.toml's ``package-dir`` maps them under ``quiver`` so nothing
named ``engine`` or ``tier`` is installed.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("quiver-kv")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from quiver.engine import BlockStore, CacheIdentity  # noqa: E402

__all__ = ["BlockStore", "CacheIdentity", "__version__"]
