"""walpub: a crash-consistent volume of immutable objects (object-first atomic
publish + a segmented write-ahead log), its recovery, and the one I/O layer all
of its file-system calls go through, with a crash-simulating twin that builds
the states a power loss could leave.

Objects are opaque byte strings named by a key (1..120 bytes); walpub verifies
each by the length and CRC32C recorded in its WAL PUT record on every read and
at recovery, and never parses them.  Public names:

* :class:`Volume` (open, publish, publish_many, read, delete, evict_to, compact,
  keys, contains, info, stats, close; ``last_recovery``: :class:`RecoveryReport`);
* the I/O layer :class:`FileSystem`, :class:`OsFileSystem`, ``FSYNC_LABELS``;
* the twin :class:`SimFileSystem` in :mod:`walpub.simfs`, the crash-state
  enumerator in :mod:`walpub.crash_states`, the checker and the explorer in
  :mod:`walpub.crash_check`;
* the WAL format in :mod:`walpub.wal`; typed errors in :mod:`walpub.errors`.

The protocol, its crash windows and the invariants are in docs/WALPUB.md.
"""

from quiver.walpub.crash_check import Tracker, explore, explore_kill
from quiver.walpub.errors import (
    BusyError,
    CorruptObjectError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    VolumeClosedError,
    VolumeFailedError,
    VolumeIOError,
    VolumeLockedError,
    WalpubError,
)
from quiver.walpub.io import FSYNC_LABELS, FileSystem, OsFileSystem
from quiver.walpub.simfs import CrashState, SimFileSystem
from quiver.walpub.volume import MAX_OBJECT_BYTES, RecoveryReport, Volume, VolumeStats
from quiver.walpub.wal import MAX_KEY_BYTES

__all__ = [
    "Volume", "RecoveryReport", "VolumeStats", "MAX_KEY_BYTES", "MAX_OBJECT_BYTES",
    "FileSystem", "OsFileSystem", "FSYNC_LABELS", "SimFileSystem", "CrashState", "Tracker", "explore", "explore_kill",
    "WalpubError", "VolumeLockedError", "VolumeClosedError", "VolumeFailedError", "VolumeIOError", "InvalidKeyError",
    "ObjectTooLargeError", "ObjectNotFoundError", "CorruptObjectError", "BusyError",
]
