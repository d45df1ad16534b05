"""Storage tiers of Quiver: L0 RAM arena, L1 local disk (a walpub volume) and
L2 object store.  L0 (:class:`RamTier`) keeps blocks in one preallocated arena
of equal slots under an eviction policy (LRU or S3-FIFO, tier.policy); L1
(:class:`DiskTier`) is a walpub volume bounded by bytes, evicting least
recently used blocks through WAL deletes; :class:`ResidencySets` answers "which
of these blocks does tier T hold" with roaring bitmaps.  The L2 object store is
one interface over immutable, content-addressed objects with first-writer-wins
publish, two implementations (a local directory, the embedded default, and S3
over boto3), manifests for bootstrap, bounded retries and typed errors.  Tier
stores opaque bytes; verifying block envelopes happens above it, in
``engine``.  docs/TIERS.md and docs/OBJECTSTORE.md have the details."""

from quiver.tier.disk import DiskTier
from quiver.tier.objectstore import LocalDirObjectStore, ObjectStore, open_object_store
from quiver.tier.policy import EvictionPolicy, LRUPolicy, S3FIFOPolicy, make_policy
from quiver.tier.ram import RamTier
from quiver.tier.residency import KeyIds, ResidencySets

__all__ = [
    "RamTier", "DiskTier", "EvictionPolicy", "LRUPolicy", "S3FIFOPolicy", "make_policy", "KeyIds", "ResidencySets",
    "ObjectStore", "LocalDirObjectStore", "S3ObjectStore", "open_object_store",
]


def __getattr__(name: str):
    """``tier.S3ObjectStore`` on first use: boto3 is imported only where S3 is used
    (``import quiver`` and a store without an s3:// L2 never import it)."""
    if name == "S3ObjectStore":
        from quiver.tier.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
