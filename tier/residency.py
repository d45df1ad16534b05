"""Per-tier residency sets as roaring bitmaps.

The question a lookup asks in bulk is "which of these N blocks are in tier T"
(or in any tier).  Keys are 48-byte hashes, useless to a bitmap, so
:class:`KeyIds` gives each key a small, stable integer id (first come, first
numbered), and :class:`ResidencySets` keeps one pyroaring ``BitMap`` of ids
per tier.  A bulk query builds one bitmap of the asked ids and intersects it
with the tier's (or with the union of all tiers'): the set algebra runs in C
over compressed containers instead of N dict probes per tier.

Ids are never reused, so an id stays valid for a key for the life of the
process; the price is one dict entry per key ever seen (~150 bytes), bounded
by ``MAX_IDS`` (ids are 32-bit).  The sets live in memory only: after a
restart they are rebuilt from the tiers' own contents (``keys()``).
"""

from __future__ import annotations

from typing import Iterable

from pyroaring import BitMap

from quiver.tier.errors import TierConfigError, TierKeyError

MAX_IDS = (1 << 32) - 1  # pyroaring BitMap holds uint32


class KeyIds:
    """A stable small integer per key (dict-backed, never reused)."""

    def __init__(self) -> None:
        self._ids: dict[bytes, int] = {}
        self._keys: list[bytes] = []  # id -> key

    def id_of(self, key: bytes, create: bool = False) -> int | None:
        """The key's id; a new one if ``create``, else None for an unknown key."""
        i = self._ids.get(key)
        if i is None and create:
            if not isinstance(key, bytes) or not key:
                raise TierKeyError(f"a key must be non-empty bytes, got {type(key).__name__}")
            i = len(self._keys)
            assert i < MAX_IDS, "KeyIds ran out of 32-bit ids"
            self._ids[key] = i
            self._keys.append(key)
        return i

    def key_of(self, i: int) -> bytes:
        """The key with id ``i`` (IndexError if never assigned)."""
        return self._keys[i]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids


class ResidencySets:
    """One roaring bitmap of key ids per named tier."""

    def __init__(self, tier_names: Iterable[str], ids: KeyIds | None = None) -> None:
        names = list(tier_names)
        if not names or len(set(names)) != len(names):
            raise TierConfigError(f"tier names must be distinct and non-empty, got {names!r}")
        self.ids = ids if ids is not None else KeyIds()
        self._sets: dict[str, BitMap] = {name: BitMap() for name in names}

    @property
    def tier_names(self) -> list[str]:
        return list(self._sets)

    def _set(self, tier: str) -> BitMap:
        try:
            return self._sets[tier]
        except KeyError:
            raise TierConfigError(f"unknown tier {tier!r}; known: {list(self._sets)}") from None

    def add(self, tier: str, key: bytes) -> None:
        self._set(tier).add(self.ids.id_of(key, create=True))

    def add_many(self, tier: str, keys: Iterable[bytes]) -> None:
        """Add keys in one bitmap update (recovery: rebuild a tier's set from its keys())."""
        id_of = self.ids.id_of
        self._set(tier).update([id_of(k, create=True) for k in keys])

    def discard(self, tier: str, key: bytes) -> None:
        i = self.ids.id_of(key)
        if i is not None:
            self._set(tier).discard(i)

    def discard_many(self, tier: str, keys: Iterable[bytes]) -> None:
        """Remove keys (e.g. a tier's evicted list) in one bitmap difference."""
        id_of = self.ids.id_of
        gone = BitMap([i for k in keys if (i := id_of(k)) is not None])
        self._set(tier).difference_update(gone)

    def contains(self, tier: str, key: bytes) -> bool:
        i = self.ids.id_of(key)
        return i is not None and i in self._set(tier)

    def _query(self, keys: Iterable[bytes], within: BitMap) -> list[bool]:
        """Membership of each key in ``within``: one intersection, then per-key bit tests."""
        id_of = self.ids.id_of
        ids = [id_of(k) for k in keys]
        hit = BitMap([i for i in ids if i is not None]) & within
        return [i is not None and i in hit for i in ids]

    def present(self, tier: str, keys: Iterable[bytes]) -> list[bool]:
        """For each key, whether ``tier`` holds it."""
        return self._query(keys, self._set(tier))

    def any_tier(self, keys: Iterable[bytes]) -> list[bool]:
        """For each key, whether any tier holds it (the union of the sets)."""
        return self._query(keys, BitMap.union(*self._sets.values()))

    def count(self, tier: str) -> int:
        return len(self._set(tier))

    def bitmap(self, tier: str) -> BitMap:
        """A copy of the tier's id set, for set algebra outside (e.g. ``ram - disk``)."""
        return BitMap(self._set(tier))
