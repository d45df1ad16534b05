"""Storage tiers of Quiver: L0 RAM arena, L1 local disk (a walpub volume) and
L2 object store.  So far the L2 object store is built: one interface over
immutable, content-addressed objects with first-writer-wins publish, two
implementations (a local directory, the embedded default, and S3 over boto3),
manifests for bootstrap, bounded retries and typed errors.  Tier stores opaque
bytes; verifying block envelopes happens above it, in ``engine``."""

from tier.objectstore import LocalDirObjectStore, ObjectStore, open_object_store
from tier.s3 import S3ObjectStore

__all__ = ["ObjectStore", "LocalDirObjectStore", "S3ObjectStore", "open_object_store"]
