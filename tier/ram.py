"""L0: the RAM tier, one preallocated arena cut into equal slots.

Why an arena: a Python ``bytes`` per block costs an allocation and a page-fault
storm on every insert, and lets the heap fragment under churn.  Here the bytes
of every block live in ONE numpy ``uint8`` array of ``n_slots * slot_bytes``
(``n_slots = capacity_bytes // slot_bytes``), mapped lazily (``np.zeros``: a
slot's pages are faulted in by its first insert, once).  A block occupies one
slot; what the tier keeps per block is a dict entry ``key -> (slot, nbytes)``
and a policy entry, never a copy of its bytes.  Free slots are a stack (the
most recently freed slot, still hot in cache, is reused first).

``slot_bytes`` is the size of the largest block (envelope) the caller stores;
an engine's blocks for one identity all have the same size, so the slack is
the envelope's compression savings at most.

Two ways in:

* ``put(key, data)`` copies a finished buffer into a slot (one memcpy);
* ``reserve(key, nbytes)`` hands out the slot itself as a writable memoryview
  so the caller builds the envelope in place (the "few copies" path of torch
  copy-out), then ``commit(key)`` makes it visible.  Until then ``get`` and
  ``contains`` do not see it and it cannot be evicted.

``get`` returns a read-only view of the slot, not a copy.  The view aliases
the arena: it is valid until the key is evicted or deleted, after which the
slot may hold another block.  Consume it (decode and CRC-check it into the
destination) before the next ``put``/``reserve``/``delete`` on this tier, or
use ``get_into``, which copies under the tier's lock, or ``pin``: the view
stays valid until ``unpin``, without holding any lock meanwhile (a pinned
block can still be evicted or deleted: its key goes at once, its slot is
reused only after the last unpin), so readers copy in parallel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from quiver.tier.errors import (
    TierBufferError,
    TierConfigError,
    TierFullError,
    TierKeyError,
    TierObjectTooLargeError,
    TierReservationError,
)
from quiver.tier.hugepages import advise_huge_pages
from quiver.tier.policy import make_policy
from quiver.walpub.wal import MAX_KEY_BYTES

MAX_SLOTS = 1 << 31  # slot numbers stay small ints; 2^31 slots is far beyond any RAM here


def check_key(key) -> bytes:
    """``key`` if it is 1..MAX_KEY_BYTES bytes (the same bound as the disk tier)."""
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
        raise TierKeyError(f"a tier key must be 1..{MAX_KEY_BYTES} bytes, got {type(key).__name__} {key!r:.40}")
    return key


def byte_view(data) -> memoryview:
    """``data`` as a flat unsigned-byte memoryview, without a copy.

    Accepts any C-contiguous buffer (bytes, bytearray, memoryview, ndarray);
    anything else is a TierBufferError rather than a silent copy."""
    try:
        mv = memoryview(data)
    except TypeError as exc:
        raise TierBufferError(f"expected a buffer (bytes, memoryview, ndarray), got {type(data).__name__}") from exc
    if not mv.c_contiguous:
        raise TierBufferError("data must be C-contiguous")
    if mv.format == "B" and mv.ndim == 1:
        return mv
    return mv.cast("B")


@dataclass(frozen=True)
class RamStats:
    """Counters since construction, plus the current occupancy."""

    hits: int
    misses: int
    inserts: int
    refreshes: int       # put of a key already present: policy access, no copy
    evictions: int
    deletes: int
    bytes_in: int        # bytes copied or committed into slots
    bytes_out: int       # bytes of the views handed out by get / copied by get_into
    bytes_evicted: int
    blocks: int
    reserved: int        # slots held by uncommitted reservations
    used_bytes: int
    capacity_bytes: int
    slot_bytes: int
    n_slots: int
    policy: str


class RamTier:
    """L0: a byte-bounded block cache in one preallocated arena; thread-safe."""

    def __init__(self, capacity_bytes: int, slot_bytes: int, policy: str = "lru") -> None:
        if not (isinstance(slot_bytes, int) and slot_bytes >= 1):
            raise TierConfigError(f"slot_bytes must be a positive int, got {slot_bytes!r}")
        if not (isinstance(capacity_bytes, int) and capacity_bytes >= slot_bytes):
            raise TierConfigError(f"capacity_bytes {capacity_bytes!r} holds no slot of {slot_bytes} bytes")
        n_slots = capacity_bytes // slot_bytes
        if n_slots > MAX_SLOTS:
            raise TierConfigError(f"{n_slots} slots exceed the bound of {MAX_SLOTS}")
        self.slot_bytes = slot_bytes
        self.n_slots = n_slots
        self.policy_name = policy
        self._policy = make_policy(policy, n_slots)
        # np.zeros maps zero pages lazily: a slot's pages are faulted in by its first insert,
        # not all at open. Touching the whole arena up front cost 0.03-0.6 s (256 MiB) on the
        # first put of every process (first-request study); RSS now grows with what L0 holds.
        self.arena = np.zeros(n_slots * slot_bytes, dtype=np.uint8)
        advise_huge_pages(self.arena.ctypes.data, self.arena.nbytes)  # first touches: 512x fewer faults
        self._mv = memoryview(self.arena)  # writable, format "B": slices are cheap views
        self._free: list[int] = list(range(n_slots - 1, -1, -1))  # stack: pop() gives slot 0 first
        self._where: dict[bytes, tuple[int, int]] = {}            # key -> (slot, nbytes), committed
        self._reserved: dict[bytes, tuple[int, int, list[bytes]]] = {}  # key -> (slot, nbytes, evicted)
        self._used = 0
        self._pins: dict[int, int] = {}   # slot -> readers holding a pinned view of it
        self._unpinned_free: set[int] = set()  # slots freed while pinned: to _free at the last unpin
        self._lock = threading.Lock()
        self._n = dict(hits=0, misses=0, inserts=0, refreshes=0, evictions=0, deletes=0,
                       bytes_in=0, bytes_out=0, bytes_evicted=0)

    # ------------------------------------------------------------------ slots
    def _take_slot(self, evicted: list[bytes]) -> int:
        """A free slot, evicting the policy's victims until one frees an unpinned
        slot if there is none (lock held)."""
        while not self._free:
            if not self._where:
                raise TierFullError(f"all {self.n_slots} slots are held by uncommitted reservations or pinned readers")
            key = self._policy.evict()
            slot, n = self._where.pop(key)
            self._used -= n
            self._n["evictions"] += 1
            self._n["bytes_evicted"] += n
            evicted.append(key)
            self._release_slot(slot)
        return self._free.pop()

    def _release_slot(self, slot: int) -> None:
        """A slot no key names any more: free now, or at its last unpin (lock held)."""
        if slot in self._pins:
            self._unpinned_free.add(slot)
        else:
            self._free.append(slot)

    def _view(self, slot: int, nbytes: int) -> memoryview:
        off = slot * self.slot_bytes
        return self._mv[off : off + nbytes]

    def _check_size(self, nbytes: int) -> None:
        if nbytes > self.slot_bytes:
            raise TierObjectTooLargeError(f"a block of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")

    # ------------------------------------------------------------------ writes
    def put(self, key: bytes, data) -> list[bytes]:
        """Copy ``data`` into a slot; returns the keys evicted to make room.

        A key already present is refreshed (counts as an access), not copied:
        blocks are content-addressed, so the bytes are the same."""
        check_key(key)
        src = byte_view(data)
        self._check_size(src.nbytes)
        with self._lock:
            if key in self._where:
                self._policy.access(key)
                self._n["refreshes"] += 1
                return []
            if key in self._reserved:
                raise TierReservationError(f"key {key.hex()} is reserved and not committed")
            evicted: list[bytes] = []
            slot = self._take_slot(evicted)
            self._view(slot, src.nbytes)[:] = src
            self._insert(key, slot, src.nbytes)
            return evicted

    def _insert(self, key: bytes, slot: int, nbytes: int) -> None:
        self._where[key] = (slot, nbytes)
        self._policy.insert(key)
        self._used += nbytes
        self._n["inserts"] += 1
        self._n["bytes_in"] += nbytes

    def reserve(self, key: bytes, nbytes: int, evicted: list[bytes] | None = None) -> memoryview:
        """A writable view of ``nbytes`` in a fresh slot, for building a block in place.

        The key stays invisible until ``commit``; ``abort`` gives the slot back.
        Finding the slot may evict a block at once.  Those keys are appended to
        ``evicted`` when a list is passed (so residency bookkeeping is never
        stale), otherwise commit/abort return them."""
        check_key(key)
        if not (isinstance(nbytes, int) and nbytes >= 0):
            raise TierBufferError(f"nbytes must be a non-negative int, got {nbytes!r}")
        self._check_size(nbytes)
        with self._lock:
            if key in self._where or key in self._reserved:
                raise TierReservationError(f"key {key.hex()} is already stored or reserved")
            gone: list[bytes] = []
            slot = self._take_slot(gone)
            if evicted is not None:
                evicted.extend(gone)
                gone = []
            self._reserved[key] = (slot, nbytes, gone)
            return self._view(slot, nbytes)

    def commit(self, key: bytes) -> list[bytes]:
        """Make a reserved block visible; returns the keys its reserve() evicted
        (empty if reserve() was given an ``evicted`` list)."""
        with self._lock:
            entry = self._reserved.pop(key, None)
            if entry is None:
                raise TierReservationError(f"no reservation for key {key!r:.40}")
            slot, nbytes, evicted = entry
            self._insert(key, slot, nbytes)
            return evicted

    def abort(self, key: bytes) -> list[bytes]:
        """Drop a reservation and free its slot; returns the keys its reserve() evicted."""
        with self._lock:
            entry = self._reserved.pop(key, None)
            if entry is None:
                raise TierReservationError(f"no reservation for key {key!r:.40}")
            slot, _, evicted = entry
            self._free.append(slot)
            return evicted

    def delete(self, key: bytes) -> bool:
        """Drop ``key``; False if it was not stored (reservations are not touched)."""
        with self._lock:
            entry = self._where.pop(key, None)
            if entry is None:
                return False
            self._policy.remove(key)
            self._release_slot(entry[0])
            self._used -= entry[1]
            self._n["deletes"] += 1
            return True

    # ------------------------------------------------------------------ reads
    def get(self, key: bytes) -> memoryview | None:
        """A read-only view of the block (no copy), or None; counts as an access.

        The view aliases the slot: see the module docstring for how long it is valid."""
        with self._lock:
            entry = self._where.get(key)
            if entry is None:
                self._n["misses"] += 1
                return None
            self._policy.access(key)
            self._n["hits"] += 1
            self._n["bytes_out"] += entry[1]
            return self._view(*entry).toreadonly()

    def pin(self, key: bytes) -> tuple[memoryview, int] | None:
        """A read-only view of the block and its slot number, or None; counts as an
        access.  The slot is not reused until ``unpin(slot)``, so the view may be
        read without any lock held."""
        pinned = self.pin_many([key])[0]
        return None if pinned is None else (self.pinned_view(*pinned), pinned[0])

    def pin_many(self, keys: list[bytes]) -> list[tuple[int, int] | None]:
        """``pin`` of each key under one lock acquisition (a get of n blocks takes
        the lock once and counts once, not n times): (slot, block bytes) of each,
        or None.  No view is made here (one per block cost about a microsecond,
        and a batched get reads its slots through the arena): ``pinned_view``."""
        out: list[tuple[int, int] | None] = []
        hits = nbytes = 0
        with self._lock:
            where, pins, access = self._where, self._pins, self._policy.access
            for key in keys:
                entry = where.get(key)
                if entry is None:
                    out.append(None)
                    continue
                slot, n = entry
                access(key)
                pins[slot] = pins.get(slot, 0) + 1
                out.append(entry)
                hits += 1
                nbytes += n
            self._n["hits"] += hits
            self._n["misses"] += len(keys) - hits
            self._n["bytes_out"] += nbytes
        return out

    def pinned_view(self, slot: int, nbytes: int) -> memoryview:
        """A read-only view of the first ``nbytes`` of a slot the caller has pinned."""
        return self._view(slot, nbytes).toreadonly()

    def heads(self, slots: list[int], nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of each listed slot, ``[len(slots), nbytes]``
        (one numpy gather: a get checks the headers of all its hits at once).
        Read without the lock: only for slots the caller has pinned."""
        return self.arena.reshape(self.n_slots, self.slot_bytes)[slots, :nbytes]

    def unpin(self, slot: int) -> None:
        """End one ``pin`` of ``slot``."""
        self.unpin_many([slot])

    def unpin_many(self, slots: list[int]) -> None:
        """End one ``pin`` of each slot listed (a slot twice: two pins)."""
        with self._lock:
            for slot in slots:
                left = self._pins[slot] - 1
                if left:
                    self._pins[slot] = left
                    continue
                del self._pins[slot]
                if slot in self._unpinned_free:
                    self._unpinned_free.discard(slot)
                    self._free.append(slot)

    def get_into(self, key: bytes, out) -> int | None:
        """Copy the block into ``out`` (a writable buffer at least as large) under
        the lock; the number of bytes copied, or None on a miss."""
        dst = byte_view(out)
        if dst.readonly:
            raise TierBufferError("get_into needs a writable buffer")
        with self._lock:
            entry = self._where.get(key)
            if entry is None:
                self._n["misses"] += 1
                return None
            n = entry[1]
            if dst.nbytes < n:
                raise TierBufferError(f"buffer of {dst.nbytes} bytes is smaller than the {n}-byte block")
            dst[:n] = self._view(*entry)
            self._policy.access(key)
            self._n["hits"] += 1
            self._n["bytes_out"] += n
            return n

    def contains(self, key: bytes) -> bool:
        """True if the key is stored (committed); not an access."""
        return key in self._where

    __contains__ = contains

    def keys(self) -> list[bytes]:
        """Stored keys, in the policy's order (for LRU: least recently used first)."""
        with self._lock:
            return self._policy.keys()

    def __len__(self) -> int:
        return len(self._where)

    @property
    def used_bytes(self) -> int:
        """Bytes of the stored blocks (not counting slot slack or reservations)."""
        return self._used

    @property
    def capacity_bytes(self) -> int:
        """The arena's size, ``n_slots * slot_bytes`` (at most what was asked for)."""
        return self.n_slots * self.slot_bytes

    def stats(self) -> RamStats:
        with self._lock:
            return RamStats(
                **self._n, blocks=len(self._where), reserved=len(self._reserved), used_bytes=self._used,
                capacity_bytes=self.capacity_bytes, slot_bytes=self.slot_bytes, n_slots=self.n_slots,
                policy=self.policy_name,
            )

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests call it after every step)."""
        with self._lock:
            slots = ([s for s, _ in self._where.values()] + [s for s, _, _ in self._reserved.values()]
                     + list(self._unpinned_free))
            assert len(slots) + len(self._free) == self.n_slots, "a slot leaked or is counted twice"
            assert len(set(slots) | set(self._free)) == self.n_slots, "a slot is in two places"
            assert self._unpinned_free <= self._pins.keys(), "a slot waits for an unpin nobody holds"
            assert all(0 <= s < self.n_slots for s in self._free)
            assert len(self._policy) == len(self._where), "policy and content disagree in size"
            assert all(k in self._policy for k in self._where), "a stored key is unknown to the policy"
            assert not (self._where.keys() & self._reserved.keys())
            assert self._used == sum(n for _, n in self._where.values())
