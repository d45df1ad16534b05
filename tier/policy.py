"""Eviction policies for the L0 RAM tier, behind one small interface.

A policy tracks *which* keys are resident and in what order they should go;
it never sees bytes.  The tier calls ``insert`` when a key becomes resident,
``access`` on a hit, ``remove`` when the key leaves (eviction or delete), and
``victim`` when it needs room.  ``victim`` names the key to evict next without
removing it: the tier removes it (and frees its slot) through ``remove``, so
the policy's membership and the tier's content change in one place only.

Two policies:

* :class:`LRUPolicy`, the baseline: an ``OrderedDict`` in recency order.
* :class:`S3FIFOPolicy`, the challenger: S3-FIFO (Yang et al., "FIFO queues are
  all you need for cache eviction", SOSP'23).  A small FIFO (10% of the
  entries) admits new keys; a key evicted from it without a second access goes
  to a ghost FIFO (keys only), a key accessed there moves to the main FIFO.
  The main FIFO evicts with 2-bit-frequency reinsertion (CLOCK-like).  A
  one-pass scan only churns the small queue, so a hot set in main survives it,
  where LRU loses it entirely.
"""

from __future__ import annotations

from collections import OrderedDict

from quiver.tier.errors import TierConfigError

POLICIES = ("lru", "s3fifo")
MAX_FREQ = 3  # S3-FIFO's two-bit frequency counter saturates here


class EvictionPolicy:
    """Interface: a set of keys plus the order in which they should be evicted."""

    name = "?"

    def insert(self, key: bytes) -> None:
        """``key`` became resident (it must not be already)."""
        raise NotImplementedError

    def access(self, key: bytes) -> None:
        """``key`` (resident) was hit."""
        raise NotImplementedError

    def remove(self, key: bytes) -> None:
        """``key`` (resident) left the tier: evicted or deleted."""
        raise NotImplementedError

    def victim(self) -> bytes:
        """The key to evict next; does not remove it.  KeyError when empty."""
        raise NotImplementedError

    def keys(self) -> list[bytes]:
        """Resident keys, roughly in eviction order."""
        raise NotImplementedError

    def evict(self) -> bytes:
        """``victim()`` then ``remove()`` of it: the key that was dropped."""
        key = self.victim()
        self.remove(key)
        return key

    def __len__(self) -> int:
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used first; ``access`` moves a key to the MRU end."""

    name = "lru"

    def __init__(self, capacity: int | None = None) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()  # LRU first

    def insert(self, key: bytes) -> None:
        assert key not in self._order, "insert of a resident key"
        self._order[key] = None

    def access(self, key: bytes) -> None:
        self._order.move_to_end(key)  # KeyError if not resident

    def remove(self, key: bytes) -> None:
        del self._order[key]

    def victim(self) -> bytes:
        if not self._order:
            raise KeyError("victim() of an empty policy")
        return next(iter(self._order))

    def keys(self) -> list[bytes]:
        """Resident keys, least recently used first."""
        return list(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO: small FIFO (admission), main FIFO (2-bit frequency), ghost FIFO.

    ``capacity`` (entries) sizes the small queue (``small_ratio`` of it) and the
    ghost (the rest, as in the paper).  Without it, both follow the current
    number of resident keys, which equals the capacity whenever the tier is
    full, the only time it evicts.

    ``move_threshold``: a key leaving the small queue with at least this many
    hits goes to main.  The paper's text says "accessed at least once": 1.
    """

    name = "s3fifo"

    def __init__(self, capacity: int | None = None, small_ratio: float = 0.10, move_threshold: int = 1) -> None:
        assert capacity is None or capacity >= 1
        assert 0.0 < small_ratio < 1.0 and 1 <= move_threshold <= MAX_FREQ
        self.capacity = capacity
        self.small_ratio = small_ratio
        self.move_threshold = move_threshold
        self._small: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, None] = OrderedDict()   # oldest first
        self._ghost: OrderedDict[bytes, None] = OrderedDict()  # oldest first, keys only
        self._freq: dict[bytes, int] = {}                     # resident keys only
        self._victim: bytes | None = None                     # last answer of victim()
        self.moved_to_main = 0
        self.ghost_hits = 0

    def _small_target(self) -> int:
        n = self.capacity if self.capacity is not None else len(self._freq)
        return max(1, int(n * self.small_ratio))

    def _ghost_bound(self) -> int:
        n = self.capacity if self.capacity is not None else len(self._freq)
        return max(1, n - self._small_target())

    def insert(self, key: bytes) -> None:
        assert key not in self._freq, "insert of a resident key"
        if key in self._ghost:  # evicted young, came back: it has proved reuse
            del self._ghost[key]
            self._main[key] = None
            self.ghost_hits += 1
        else:
            self._small[key] = None
        self._freq[key] = 0

    def access(self, key: bytes) -> None:
        f = self._freq[key]  # KeyError if not resident
        if f < MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: bytes) -> None:
        del self._freq[key]
        if key in self._small:
            del self._small[key]
            if key == self._victim:  # an eviction from small, not a delete: remember it
                self._ghost[key] = None
                bound = self._ghost_bound()
                while len(self._ghost) > bound:  # bounded by the ghost's length
                    self._ghost.popitem(last=False)
        else:
            del self._main[key]
        if key == self._victim:
            self._victim = None

    def victim(self) -> bytes:
        """Reorders the queues as S3-FIFO's eviction does (promotions to main,
        main reinsertions) until a key with no pending credit is at a tail."""
        if not self._freq:
            raise KeyError("victim() of an empty policy")
        v = self._victim
        if v is not None and v in self._freq:
            return v
        # Each promotion moves a key out of small for good, each reinsertion
        # spends one unit of a counter that is at most MAX_FREQ: bounded.
        for _ in range(len(self._small) + (MAX_FREQ + 1) * len(self._freq) + 1):
            if self._small and (len(self._small) >= self._small_target() or not self._main):
                key = next(iter(self._small))
                if self._freq[key] >= self.move_threshold:
                    del self._small[key]
                    self._main[key] = None
                    self._freq[key] = 0
                    self.moved_to_main += 1
                    continue
            else:
                key = next(iter(self._main))
                if self._freq[key] > 0:
                    self._freq[key] -= 1
                    self._main.move_to_end(key)
                    continue
            self._victim = key
            return key
        raise AssertionError("S3-FIFO victim search did not terminate")

    def keys(self) -> list[bytes]:
        """Resident keys: small queue then main, oldest first in each."""
        return list(self._small) + list(self._main)

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


def make_policy(name: str, capacity: int | None = None) -> EvictionPolicy:
    """"lru" or "s3fifo"; ``capacity`` in entries (sizes S3-FIFO's queues)."""
    if name == "lru":
        return LRUPolicy(capacity)
    if name == "s3fifo":
        return S3FIFOPolicy(capacity)
    raise TierConfigError(f"unknown eviction policy {name!r}; expected one of {POLICIES}")
