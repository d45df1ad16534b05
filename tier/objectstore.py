"""L2 object store: one interface, two implementations (local directory, S3).

An object store holds opaque, immutable objects named by a key (the block's
chain key, or any bytes up to MAX_KEY_BYTES).  It knows nothing about the block
envelope: the envelope's own CRCs and the identity guard are checked above it.
What it does promise:

- ``put`` is first-writer-wins.  A key names one immutable content, so a second
  publish of the same key is a success that creates nothing (returns False).
- A read never returns bytes that fail their length or CRC32C check: it raises
  :class:`~tier.errors.ObjectCorruptError` (or retries, for S3) instead.
- A key is found by name (``head``/``get``) whoever published it, so a reader
  never needs to list the store; manifests (``write_manifest`` /
  ``read_manifests``) tell a new process which keys exist without listing or
  fetching every block.

Object names (relative to the store's root or S3 prefix), one naming for both:

    blocks/<hex[-2:]>/<hex>         one object per key (hex = key.hex()), sharded
                                    on the key's last byte (spread across prefixes)
    manifests/<time_ns>-<rand>.qvm  a batch of published keys (format below)
    layout/tail-sharded             the layout marker: every block is under the name above

Blocks published before the tail sharding live under the legacy name
``blocks/<hex[:2]>/<hex>`` (the first byte: the identity namespace's, so one
model's blocks all shared one prefix).  Reads fall back to it (a HEAD/GET miss
under the new name tries the legacy one) while ``legacy_names`` is not False;
publishes use the new name only; ``migrate_legacy_layout`` moves old objects.
``settle_naming`` (BlockStore calls it when L2 attaches) turns the fallback off
where the layout marker is found, and writes the marker into an empty store.

Time: every call runs inside the caller's budget when one is set with
``deadline(timeout_s)`` (thread-local, nests to the tighter), and a
:class:`CircuitBreaker` per store makes calls fail fast while the store does
not answer (S3: docs/OBJECTSTORE.md, "Deadlines and the circuit breaker").

``LocalDirObjectStore`` is the embedded default: no server, the same atomic
publish discipline as walpub (tmp + fsync, then a no-overwrite link into place,
then fsync of the directory), every file call through walpub's I/O layer so
the crash simulator covers it.  ``tier.s3.S3ObjectStore`` is the same interface
over boto3.  ``open_object_store(spec)`` picks one.  docs/OBJECTSTORE.md has the
details and what was verified against which server.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from quiver.tier.errors import (
    InvalidObjectKeyError,
    InvalidRangeError,
    ManifestCorruptError,
    ObjectCorruptError,
    ObjectStoreAuthError,
    ObjectStoreClosedError,
    ObjectStoreConfigError,
    ObjectStoreIOError,
    ObjectStoreRequestError,
    ObjectStoreUnavailableError,
    ObjectStoreUnreachableError,
)
from quiver.walpub.checksum import crc32c, crc32c_of
from quiver.walpub.io import FileSystem, OsFileSystem

log = logging.getLogger("quiver.tier.objectstore")

MAX_KEY_BYTES = 64  # 128 hex chars: a file name, well under NAME_MAX (255)
BLOCKS_DIR = "blocks/"
MANIFESTS_DIR = "manifests/"
#: Present: no block of this store is under a legacy name (written into a store found
#: empty, or by migrate_legacy_layout), so a miss needs no second request.
LAYOUT_MARKER = "layout/tail-sharded"
_LAYOUT_BODY = b"quiver: every block is named blocks/<hex of the key's last byte>/<key hex>\n"
MANIFEST_SUFFIX = ".qvm"

# Manifest object: magic, version, reserved, count, then count x (u8 len, key),
# then CRC32C (u32) of everything before it.
MANIFEST_MAGIC = b"QVMF"
MANIFEST_VERSION = 1
MANIFEST_MAX_KEYS = 100_000  # per object; write_manifest splits larger batches
_MANIFEST_HEAD = struct.Struct("<4sHHI")
_U32 = struct.Struct("<I")


def _one_buffer(size: int) -> list:
    """``get_into``'s buffers for a plain ``get``: one of the object's size."""
    return [bytearray(size)]


def check_key(key: bytes) -> bytes:
    """Return ``key`` if it is usable as an object key, else raise InvalidObjectKeyError."""
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
        raise InvalidObjectKeyError(
            f"an object key must be 1..{MAX_KEY_BYTES} bytes, got "
            f"{type(key).__name__} of length {len(key) if isinstance(key, bytes) else '?'}"
        )
    return key


def object_name(key: bytes) -> str:
    """The object's name under the store's root/prefix: ``blocks/<last byte>/<hex>``.

    Sharded on the key's tail, as walpub shards its objects: a store key starts
    with the identity namespace, so its first byte is one value per model."""
    h = check_key(key).hex()
    return f"{BLOCKS_DIR}{h[-2:]}/{h}"


def legacy_object_name(key: bytes) -> str:
    """The name a block had before the tail sharding: ``blocks/<first byte>/<hex>``."""
    h = check_key(key).hex()
    return f"{BLOCKS_DIR}{h[:2]}/{h}"


def object_names(key: bytes, legacy: bool = True) -> list[str]:
    """The names a read tries, in order: the current one, then the legacy one
    (when ``legacy`` and it differs)."""
    new = object_name(key)
    old = legacy_object_name(key)
    return [new, old] if legacy and old != new else [new]


def key_from_name(name: str) -> bytes | None:
    """Inverse of object_name (or legacy_object_name) for a name relative to the
    root; None if it is not one."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] + "/" != BLOCKS_DIR:
        return None
    try:
        key = bytes.fromhex(parts[2])
    except ValueError:
        return None
    if not 0 < len(key) <= MAX_KEY_BYTES or key.hex() != parts[2]:
        return None
    if parts[1] != parts[2][-2:] and parts[1] != parts[2][:2]:
        return None
    return key


# --- the caller's time budget -----------------------------------------------------------

_budget = threading.local()


@contextmanager
def deadline(timeout_s: float | None) -> Iterator[float | None]:
    """Bound every object-store call this thread makes inside the block.

    The calls end (typed, ObjectStoreUnreachableError) by ``now + timeout_s``:
    no try starts after it, and each try's socket timeouts are sized to what is
    left (S3).  Nested budgets take the tighter; None adds no bound.  Yields the
    absolute deadline (time.monotonic), or None."""
    prev = getattr(_budget, "at", None)
    if timeout_s is None:
        yield prev
        return
    at = time.monotonic() + max(0.0, float(timeout_s))
    if prev is not None:
        at = min(at, prev)
    _budget.at = at
    try:
        yield at
    finally:
        _budget.at = prev


def current_deadline() -> float | None:
    """This thread's budget set by ``deadline`` (absolute, time.monotonic), or None."""
    return getattr(_budget, "at", None)


# --- circuit breaker -------------------------------------------------------------------


@dataclass(frozen=True)
class BreakerPolicy:
    """When the circuit breaker opens and when it probes again.

    ``failures`` consecutive failed tries (connection errors, timeouts, 5xx:
    the retryable kinds, counted across all operations and threads) open it;
    while open every call is refused at once (ObjectStoreUnavailableError).
    After ``cooldown_s`` it is half-open: one try -- a probe -- is let through;
    its success closes the breaker, its failure opens it again for twice the
    previous cool-down (at most ``max_cooldown_s``).  ``probe_timeout_s`` is the
    budget of one probe (BlockStore also uses it for the L2 check at open)."""

    failures: int = 3
    cooldown_s: float = 5.0
    max_cooldown_s: float = 30.0
    probe_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        ok = (isinstance(self.failures, int) and self.failures >= 1
              and all(isinstance(v, (int, float)) and v > 0 for v in
                      (self.cooldown_s, self.max_cooldown_s, self.probe_timeout_s))
              and self.max_cooldown_s >= self.cooldown_s)
        if not ok:
            raise ObjectStoreConfigError(f"bad breaker policy {self}")


class CircuitBreaker:
    """Closed -> open after ``policy.failures`` consecutive failed tries ->
    half-open after the cool-down (one trial try) -> closed on its success.

    Thread-safe.  Time comes from ``clock`` (time.monotonic by default;
    injectable, so the transitions are tested without waiting).  Logging: one
    WARNING when an outage begins (closed -> open), INFO when it ends, DEBUG
    for everything in between; with ``announce=False`` the owner logs the
    outage's WARNING and recovery INFO itself (S3 does, from the first failed
    try), and the breaker's own open is INFO, its close DEBUG.
    ``caller_trials=False`` reserves the half-open
    trial for ``acquire(probe=True)`` (a prober thread), so ordinary callers
    never wait on a trial: they are refused until a probe succeeds.
    ``on_open`` (if set) is called, outside the lock, on each move to open."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, policy: BreakerPolicy | None = None, *, name: str = "object store",
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None,
                 announce: bool = True) -> None:
        self.policy = policy or BreakerPolicy()
        self.name = name
        self.announce = announce
        self.caller_trials = True
        self.on_open: Callable[[], None] | None = None
        self._clock = clock
        self._log = logger or logging.getLogger("quiver.tier.objectstore")
        self._lock = threading.Lock()
        self._state = self.CLOSED
        self._fails = 0
        self._opened_at = 0.0
        self._outage_began = 0.0
        self._cooldown = self.policy.cooldown_s
        self._trial = False
        self.last_failure = ""
        self.history: deque[str] = deque([self.CLOSED], maxlen=64)  # states entered, in order
        self.counts = dict(opened=0, half_opened=0, closed=0, refused=0, failures=0, outages=0)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state!r})"

    # --- state ---------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            self._advance()
            return self._state

    def retry_in(self) -> float:
        """Seconds until a probe may run (0 when half-open or closed)."""
        with self._lock:
            self._advance()
            if self._state != self.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self._cooldown - self._clock())

    def _enter(self, state: str) -> None:
        self._state = state
        self.history.append(state)
        self.counts[{"open": "opened", "half-open": "half_opened", "closed": "closed"}[state]] += 1

    def _advance(self) -> None:
        if self._state == self.OPEN and self._clock() >= self._opened_at + self._cooldown:
            self._enter(self.HALF_OPEN)
            self._trial = False

    # --- calls -----------------------------------------------------------------------
    def acquire(self, probe: bool = False) -> str | None:
        """May a try start now?  "pass" (closed), "trial" (the one half-open
        try: end it with success/failure/end_trial), or None: refused."""
        with self._lock:
            self._advance()
            if self._state == self.CLOSED:
                return "pass"
            if self._state == self.HALF_OPEN and not self._trial and (probe or self.caller_trials):
                self._trial = True
                return "trial"
            self.counts["refused"] += 1
            return None

    def refusal(self, what: str) -> ObjectStoreUnavailableError:
        """The typed error a refused call raises."""
        with self._lock:
            left = max(0.0, self._opened_at + self._cooldown - self._clock()) if self._state == self.OPEN else 0.0
            last = self.last_failure
        return ObjectStoreUnavailableError(
            f"{what}: {self.name} is not answering (circuit breaker {self._state}, last failure: "
            f"{last or '?'}); refused without a request, next probe in {left:.1f}s",
            attempts=0, elapsed_s=0.0,
        )

    def end_trial(self) -> None:
        """A trial try ended without a verdict (e.g. an error not about reachability)."""
        with self._lock:
            self._trial = False

    def success(self) -> None:
        """A try got an answer from the store (any answer: 200, 404, 412, 403...)."""
        with self._lock:
            self._fails = 0
            self._trial = False
            if self._state == self.CLOSED:
                return
            down = self._clock() - self._outage_began
            self._enter(self.CLOSED)
            self._cooldown = self.policy.cooldown_s
        self._log.log(logging.INFO if self.announce else logging.DEBUG,
                      "%s answers again after %.1fs; circuit breaker closed", self.name, down)

    def failure(self, detail: str) -> None:
        """A try failed in a way that says the store is not answering."""
        opened = False
        with self._lock:
            self._fails += 1
            self.counts["failures"] += 1
            self.last_failure = detail
            self._trial = False
            if self._state == self.HALF_OPEN:
                self._reopen()
                opened = True
                self._log.debug("%s: probe failed (%s); next probe in %.1fs", self.name, detail, self._cooldown)
            elif self._state == self.CLOSED and self._fails >= self.policy.failures:
                opened = self._open_outage(f"{self._fails} consecutive failed tries (last: {detail})")
        if opened and self.on_open is not None:
            self.on_open()

    def trip(self, detail: str) -> None:
        """Open now, whatever the count (e.g. the store did not answer its check at open)."""
        opened = False
        with self._lock:
            self._trial = False
            self.last_failure = detail or self.last_failure
            if self._state == self.CLOSED:
                opened = self._open_outage(detail)
            elif self._state == self.HALF_OPEN:
                self._reopen()
                opened = True
        if opened and self.on_open is not None:
            self.on_open()

    def _open_outage(self, detail: str) -> bool:
        self._outage_began = self._opened_at = self._clock()
        self._cooldown = self.policy.cooldown_s
        self._enter(self.OPEN)
        self.counts["outages"] += 1
        self._log.log(logging.WARNING if self.announce else logging.INFO,
                      "%s is not answering: %s; calls fail fast (circuit breaker open), "
                      "probing again every %.0f-%.0fs", self.name, detail,
                      self.policy.cooldown_s, self.policy.max_cooldown_s)
        return True

    def _reopen(self) -> None:
        self._cooldown = min(self._cooldown * 2, self.policy.max_cooldown_s)
        self._opened_at = self._clock()
        self._enter(self.OPEN)


def check_range(start: int, length: int) -> None:
    """Refuse negative offsets and lengths before any I/O."""
    if not isinstance(start, int) or not isinstance(length, int) or start < 0 or length < 0:
        raise InvalidRangeError(f"bad range start={start!r} length={length!r}")


def new_manifest_name() -> str:
    """A fresh, unique, roughly time-ordered manifest name (never overwritten)."""
    return f"{MANIFESTS_DIR}{time.time_ns():020d}-{secrets.token_hex(8)}{MANIFEST_SUFFIX}"


def encode_manifest(keys: list[bytes]) -> bytes:
    """Serialise one manifest object (keys already checked)."""
    assert len(keys) <= MANIFEST_MAX_KEYS
    out = bytearray(_MANIFEST_HEAD.pack(MANIFEST_MAGIC, MANIFEST_VERSION, 0, len(keys)))
    for k in keys:
        out.append(len(k))
        out += k
    out += _U32.pack(crc32c(out))
    return bytes(out)


def decode_manifest(data: bytes, name: str = "?") -> list[bytes]:
    """Parse one manifest object; any damage is ManifestCorruptError, never a guess."""
    if len(data) < _MANIFEST_HEAD.size + 4:
        raise ManifestCorruptError(f"manifest {name}: {len(data)} bytes is too short")
    (crc,) = _U32.unpack_from(data, len(data) - 4)
    if crc32c(memoryview(data)[:-4]) != crc:
        raise ManifestCorruptError(f"manifest {name}: CRC32C mismatch")
    magic, version, _, count = _MANIFEST_HEAD.unpack_from(data, 0)
    if magic != MANIFEST_MAGIC or version != MANIFEST_VERSION:
        raise ManifestCorruptError(f"manifest {name}: bad magic or version {version}")
    keys, pos, end = [], _MANIFEST_HEAD.size, len(data) - 4
    for _ in range(count):
        if pos >= end:
            raise ManifestCorruptError(f"manifest {name}: truncated key list")
        n = data[pos]
        if not 0 < n <= MAX_KEY_BYTES or pos + 1 + n > end:
            raise ManifestCorruptError(f"manifest {name}: bad key length {n}")
        keys.append(bytes(data[pos + 1 : pos + 1 + n]))
        pos += 1 + n
    if pos != end:
        raise ManifestCorruptError(f"manifest {name}: {end - pos} trailing bytes")
    return keys


class OpCounts:
    """What an object store was asked and how it went (``ObjectStore.stats``).

    ``ops``/``errors``: public calls and the ones that raised, by operation;
    ``requests``: requests sent to a server, by operation (S3: one per HTTP
    try, retries included; a directory store sends none); ``retries``: tries
    repeated after a failure; ``hits``/``misses``: get/get_range/head that found
    the object or not; ``bytes_in``/``bytes_out``: object bytes put / read."""

    __slots__ = ("lock", "ops", "errors", "requests", "retries", "hits", "misses", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.retries = 0
        self.hits = self.misses = self.bytes_in = self.bytes_out = 0

    def done(self, op: str, found: bool | None = None, nin: int = 0, nout: int = 0, count: int = 1) -> None:
        """``count`` operations ``op`` done (a batch counts once, under one lock)."""
        with self.lock:
            self.ops[op] = self.ops.get(op, 0) + count
            if found is not None:
                if found:
                    self.hits += count
                else:
                    self.misses += count
            self.bytes_in += nin
            self.bytes_out += nout

    def failed(self, op: str) -> None:
        with self.lock:
            self.ops[op] = self.ops.get(op, 0) + 1
            self.errors[op] = self.errors.get(op, 0) + 1

    def request(self, op: str, retry: bool = False) -> None:
        with self.lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            self.retries += retry

    def snapshot(self) -> dict:
        with self.lock:
            return dict(ops=dict(self.ops), errors=dict(self.errors), requests=dict(self.requests),
                        retries=self.retries, hits=self.hits, misses=self.misses,
                        bytes_in=self.bytes_in, bytes_out=self.bytes_out)


_counts_lock = threading.Lock()


class ObjectStore(ABC):
    """The L2 interface.  Keys are bytes; objects are immutable bytes.

    Implementations are safe to share between threads.  Manifest handling is
    written once here over four small primitives (``_put_named`` and friends).
    """

    _closed = False
    #: True when every successful get has checked a CRC32C over exactly the bytes it
    #: returns (a local directory's trailer); False where the check can be absent
    #: (an S3 object without quiver-crc32c metadata).  The store then skips its own
    #: second pass over the body (docs/FORMAT.md, "What each read verifies").
    verifies_reads = False
    #: True when a get's reads of this store should run in flight together (BlockStore's
    #: read pool): they wait on a network round trip.  False for a local directory,
    #: whose reads are page-cache or local-disk copies, read on the get's own thread.
    concurrent_reads = True
    #: Reads fall back to the legacy name (blocks/<first byte>/...) on a miss: True;
    #: False: they do not (a miss costs one request); None (the default): on until
    #: ``settle_naming`` decides.
    legacy_names: bool | None = None
    _breaker: CircuitBreaker | None = None
    _op_counts: OpCounts | None = None

    @property
    def counts(self) -> OpCounts:
        """This store's OpCounts (made on first use: subclasses need no __init__ call)."""
        c = self._op_counts
        if c is None:
            with _counts_lock:
                if self._op_counts is None:
                    self._op_counts = OpCounts()
                c = self._op_counts
        return c

    def stats(self) -> dict:
        """Plain data: the OpCounts, the circuit breaker's state and counts, and
        the store's repr (no credentials in it)."""
        out = self.counts.snapshot()
        br = self.breaker
        out["breaker"] = dict(state=br.state, outages=br.counts["outages"], refused=br.counts["refused"],
                              failures=br.counts["failures"], last_failure=br.last_failure)
        out["store"] = repr(self)
        return out

    @property
    def breaker(self) -> CircuitBreaker:
        """This store's circuit breaker (S3 feeds it; a local directory never trips it)."""
        if self._breaker is None:
            self._breaker = CircuitBreaker(name=repr(self))
        return self._breaker

    def _names(self, key: bytes) -> list[str]:
        return object_names(key, self.legacy_names is not False)

    def settle_naming(self) -> bool:
        """Decide ``legacy_names`` where it is None (one HEAD, maybe one LIST and one
        PUT); returns it.  Off when the store holds the layout marker; off too when
        it holds no block at all (the marker is written: every block it will hold
        is named by this version); on when it holds blocks but no marker (they may
        be legacy-named until ``migrate_legacy_layout`` runs), or when the marker
        cannot be written (read-only credentials).  Advisory: a wrong "off" would
        only make a legacy-named block a miss (recomputed), never a wrong read."""
        if self.legacy_names is not None:
            return self.legacy_names
        try:
            if self._head_named(LAYOUT_MARKER) is None:
                if self._any_named(BLOCKS_DIR):
                    self.legacy_names = True
                    return True
                try:  # bounded by the probe's budget: a write that hangs costs the open no more
                    with deadline(self.breaker.policy.probe_timeout_s):
                        self._put_named(LAYOUT_MARKER, _LAYOUT_BODY)
                except ObjectStoreUnreachableError as exc:  # reads answer, the write does not: attach anyway
                    log.info("%r: the layout marker's write got no answer (%s); misses also try legacy names",
                             self, exc)
                    self.legacy_names = True
                    return True
        except (ObjectStoreAuthError, ObjectStoreRequestError, ObjectStoreIOError) as exc:  # answered: refused
            log.info("%r: the layout marker could not be read or written (%s); misses also try legacy names",
                     self, exc)
            self.legacy_names = True
            return True
        self.legacy_names = False
        return False

    def _any_named(self, prefix: str) -> bool:
        """True if any object's name starts with ``prefix`` (stores stop at the first)."""
        return bool(self._list_named(prefix))

    # --- objects --------------------------------------------------------------
    def put(self, key: bytes, data: bytes) -> bool:
        """Publish ``data`` under ``key`` durably; True if this call created it,
        False if the key already existed (first writer wins: both are success).
        Always under the current name (object_name), never the legacy one."""
        try:
            created = self._put_named(object_name(key), data)
        except BaseException:
            self.counts.failed("put")
            raise
        self.counts.done("put", nin=memoryview(data).nbytes)
        return created

    def get(self, key: bytes) -> bytes | bytearray | None:
        """The object's verified bytes (bytes, or a bytearray the local directory
        read them into), or None if there is no such object."""
        pieces = self.get_into(key, _one_buffer)
        return None if pieces is None else pieces[0]

    def get_into(self, key: bytes, buffers_for: Callable[[int], list]) -> list | None:
        """The object's verified bytes in pieces, or None if there is no such object.

        ``buffers_for(size)`` gives writable buffers whose lengths add up to
        ``size`` (the object's): a store that reads from a file reads the object
        straight into them, in order, and returns them (issue 10: an envelope's
        body lands in the caller's array); a store that receives its bytes
        whole (S3) ignores it and returns ``[bytes]``.  The CRC32C is checked
        over the pieces as over the whole; on a failed check the buffers may
        hold the refused bytes."""
        try:
            for name in self._names(key):
                pieces = self._get_into_named(name, buffers_for)
                if pieces is not None:
                    self.counts.done("get", True, nout=sum(memoryview(p).nbytes for p in pieces))
                    return pieces
        except BaseException:
            self.counts.failed("get")
            raise
        self.counts.done("get", False)
        return None

    def get_many_into(self, keys: list[bytes], buffers_fors: list) -> list[list | None]:
        """``get_into`` of many keys on the fast path only: each key's verified
        pieces, or None where that read needs ``get_into`` (a miss, a damaged
        object, an error, a length its ``buffers_for`` declines by returning
        None), with nothing changed: the caller calls ``get_into`` for those,
        which decides (and removes a damaged object).  Here every key is None
        (an object store read over a network has no fast path: BlockStore runs
        its reads in flight instead); a local directory reads them
        (issue 10: a get of n blocks pays its per-block layers once)."""
        return [None] * len(keys)

    def get_range(self, key: bytes, start: int, length: int) -> bytes | None:
        """Exactly ``length`` bytes from ``start`` (None if no such object).

        A range past the object's end is InvalidRangeError.  The length is
        checked, the CRC32C (which covers the whole object) cannot be: a ranged
        reader relies on the envelope's header CRC above this layer."""
        try:
            check_range(start, length)
            for name in self._names(key):
                data = self._get_range_named(name, start, length)
                if data is not None:
                    self.counts.done("get_range", True, nout=len(data))
                    return data
        except BaseException:
            self.counts.failed("get_range")
            raise
        self.counts.done("get_range", False)
        return None

    def head(self, key: bytes) -> int | None:
        """The object's size in bytes, or None if there is no such object."""
        try:
            for name in self._names(key):
                size = self._head_named(name)
                if size is not None:
                    self.counts.done("head", True)
                    return size
        except BaseException:
            self.counts.failed("head")
            raise
        self.counts.done("head", False)
        return None

    def delete(self, key: bytes) -> None:
        """Remove the object (under every name it may have); a missing key is not an error."""
        try:
            for name in object_names(key, legacy=True):
                self._delete_named(name)
        except BaseException:
            self.counts.failed("delete")
            raise
        self.counts.done("delete")

    def list_keys(self) -> Iterator[bytes]:
        """Every stored key (a full listing: for audits and tests, not bootstrap)."""
        seen: set[bytes] = set()
        for name in self._list_named(BLOCKS_DIR):
            key = key_from_name(name)
            if key is not None and key not in seen:
                seen.add(key)
                yield key

    def probe(self) -> None:
        """One cheap request that proves the store answers (raises if it does not).

        Passes the circuit breaker when it is half-open: this is the trial."""
        self._check_open()

    def migrate_legacy_layout(self) -> int:
        """Move every block stored under its legacy name to its current name
        (copy, verified, then delete the old object); returns how many moved.

        Safe while other processes read and publish: a reader finds the block
        under one name or the other at every moment (the copy exists before the
        old name goes), and a publisher racing the copy wins or loses the
        conditional create with the same bytes.  Idempotent: rerun after a crash."""
        self._check_open()
        moved = 0
        for name in self._list_named(BLOCKS_DIR):
            key = key_from_name(name)
            if key is None or name != legacy_object_name(key) or name == object_name(key):
                continue
            data = self._get_named(name)
            if data is None:  # deleted meanwhile
                continue
            self._put_named(object_name(key), data)
            self._delete_named(name)
            moved += 1
        self._put_named(LAYOUT_MARKER, _LAYOUT_BODY)  # no legacy name left: misses need one request
        self.legacy_names = False
        return moved

    def close(self) -> None:
        """Release connections; later calls raise ObjectStoreClosedError."""
        self._closed = True

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ObjectStoreClosedError(f"{self!r} is closed")

    # --- manifests --------------------------------------------------------------
    def write_manifest(self, keys: Iterable[bytes]) -> list[str]:
        """Record published keys in new manifest objects; returns their names.

        Each call writes new, never-overwritten objects, so any number of
        publishers can append concurrently without coordination.  Call it after
        the blocks themselves are published: a manifest is a hint that a key
        exists, and readers still confirm with head/get."""
        try:
            self._check_open()
            batch = sorted({check_key(k) for k in keys})
            names = []
            for i in range(0, len(batch), MANIFEST_MAX_KEYS):
                name = new_manifest_name()
                self._put_named(name, encode_manifest(batch[i : i + MANIFEST_MAX_KEYS]))
                names.append(name)
        except BaseException:
            self.counts.failed("write_manifest")
            raise
        self.counts.done("write_manifest")
        return names

    def read_manifests(self) -> set[bytes]:
        """The union of every manifest's keys: what a new process bootstraps from.

        Lists manifests/ only (never blocks/).  A manifest deleted by a
        concurrent compact_manifests is skipped: its keys are in the merged one."""
        try:
            self._check_open()
            keys: set[bytes] = set()
            for name in self._list_named(MANIFESTS_DIR):
                data = self._get_named(name)
                if data is not None:
                    keys.update(decode_manifest(data, name))
        except BaseException:
            self.counts.failed("read_manifests")
            raise
        self.counts.done("read_manifests")
        return keys

    def compact_manifests(self) -> int:
        """Merge all manifests into new ones, then delete the merged; returns how many.

        Safe against concurrent writers and compactors: a manifest is deleted
        only after a manifest holding all its keys is durably written, and only
        manifests this call has read are deleted."""
        self._check_open()
        read, keys = [], set()
        for name in self._list_named(MANIFESTS_DIR):
            data = self._get_named(name)
            if data is not None:
                keys.update(decode_manifest(data, name))
                read.append(name)
        if len(read) <= 1:
            return 0
        written = set(self.write_manifest(keys))
        for name in read:
            if name not in written:
                self._delete_named(name)
        return len(read)

    # --- primitives the rest is written over ------------------------------------------
    @abstractmethod
    def _head_named(self, name: str) -> int | None:
        """The size of an object by its relative name, or None if missing."""

    @abstractmethod
    def _get_range_named(self, name: str, start: int, length: int) -> bytes | None:
        """A range of an object by its relative name (range already checked)."""

    @abstractmethod
    def _put_named(self, name: str, data: bytes) -> bool:
        """Publish an object by its relative name (first writer wins)."""

    @abstractmethod
    def _get_named(self, name: str) -> bytes | bytearray | None:
        """Read an object by its relative name, verified; None if missing."""

    def _get_into_named(self, name: str, buffers_for: Callable[[int], list]) -> list | None:
        """``get_into`` by relative name: here the whole object, one piece."""
        data = self._get_named(name)
        return None if data is None else [data]

    @abstractmethod
    def _list_named(self, prefix: str) -> list[str]:
        """Relative names under ``prefix`` (e.g. "manifests/"), sorted."""

    @abstractmethod
    def _delete_named(self, name: str) -> None:
        """Delete an object by its relative name; missing is fine."""


# --- local directory ----------------------------------------------------------------


@contextmanager
def _fs_errors(what: str, root: str) -> Iterator[None]:
    """An OSError of the directory store comes out typed (FileNotFoundError of an
    object is handled by the callers as a miss before it gets here)."""
    try:
        yield
    except OSError as exc:
        raise _fs_error(what, root, exc) from exc


def _fs_error(what: str, root: str, exc: OSError) -> ObjectStoreIOError:
    return ObjectStoreIOError(f"{what} in {root}: {exc.strerror or exc}")


# A local object file is the object's bytes then this trailer: CRC32C of the
# bytes (u32) and a magic.  S3 keeps the same CRC in object metadata instead.
_TRAILER = struct.Struct("<I4s")
_TRAILER_MAGIC = b"QVOT"
_NOT_CLEAN = object()  # _read_named: a read that did not simply verify
STALE_TMP_S = 3600.0  # tmp files older than this are leftovers of a crash


class LocalDirObjectStore(ObjectStore):
    """The object store as a plain directory: the embedded default, no server.

    Publish is tmp write + fsync, then a hard link into the final name (an
    atomic create that fails if the name exists: first writer wins without a
    check-then-rename race, even between processes), then fsync of the
    directory.  Several processes may share one directory.

    Every file-system call goes through ``io`` (a :class:`walpub.io.FileSystem`;
    the real one by default), so the crash simulator can record a workload and
    enumerate what a power loss leaves; the fsyncs carry the "l2_*" labels of
    ``walpub.io.FSYNC_LABELS`` (docs/OBJECTSTORE.md says what each protects).
    """

    verifies_reads = True  # every object carries a CRC32C trailer, checked on every get
    concurrent_reads = False  # BlockStore._start_l2_reads says what a read pool cost here

    def __init__(self, root: str | os.PathLike[str], io: FileSystem | None = None) -> None:
        self._io: FileSystem = io if io is not None else OsFileSystem()
        self.root = os.path.abspath(os.fspath(root))
        self._tmp = os.path.join(self.root, "tmp")
        # Directories whose entry in their parent this object has fsynced (or
        # found durable at open): a shard directory made by another thread or
        # process may not be durable yet, so its first use here fsyncs its parent.
        self._durable_dirs = {os.path.join(self.root, "manifests")}
        try:
            self._makedirs(self.root)
            for sub in ("blocks", "manifests", "tmp"):
                path = os.path.join(self.root, sub)
                if not self._io.isdir(path):
                    try:
                        self._io.mkdir(path)
                    except FileExistsError:  # another process opening the same new directory made it
                        if not self._io.isdir(path):
                            raise
            # Also when the root exists: a killed creator may have left its name
            # (or its subdirectories) in the page cache only.
            self._io.fsync_dir(os.path.dirname(self.root), "l2_layout")
            self._io.fsync_dir(self.root, "l2_layout")
        except OSError as exc:
            raise ObjectStoreConfigError(
                f"cannot open object store directory {self.root}: {exc.strerror}"
            ) from exc
        self._clear_stale_tmp()

    def __repr__(self) -> str:
        return f"LocalDirObjectStore({self.root!r})"

    def _makedirs(self, path: str) -> None:
        """mkdir -p through the I/O layer; the parent of each directory created
        above the root's parent is fsynced (the root's own parent is fsynced by
        the caller)."""
        missing = []
        while not self._io.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for d in reversed(missing):
            try:
                self._io.mkdir(d)
            except FileExistsError:
                if not self._io.isdir(d):
                    raise
            if d != self.root:
                self._io.fsync_dir(os.path.dirname(d), "l2_layout")

    # --- objects --------------------------------------------------------------
    def probe(self) -> None:
        self._check_open()
        if not self._io.isdir(os.path.join(self.root, "blocks")):
            raise ObjectStoreIOError(f"object store directory {self.root} is gone")

    def _get_range_named(self, name: str, start: int, length: int) -> bytes | None:
        self._check_open()
        path = self._path(name)
        with _fs_errors(f"ranged read of {name}", self.root):
            try:
                size, data = self._read_range(path, start, length)
            except FileNotFoundError:
                return None
        if data is None:
            raise InvalidRangeError(
                f"range [{start}, {start + length}) is past the end of {name} ({size} bytes)"
            )
        if len(data) != length:  # the file shrank under us: never a short read as data
            raise ObjectCorruptError(f"{name}: short read {len(data)} of {length}")
        return data

    def _read_range(self, path: str, start: int, length: int) -> tuple[int, bytes | None]:
        """(object size, bytes [start, start+length)), or (size, None) when the
        range passes the object's end."""
        if type(self._io) is OsFileSystem:  # one positioned read, not the whole prefix
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size - _TRAILER.size
                if start + length > size:
                    return size, None
                f.seek(start)
                return size, f.read(length)
        size = self._io.file_size(path) - _TRAILER.size  # FileSystem has no positioned read
        if start + length > size:
            return size, None
        return size, self._io.read_head(path, start + length)[start:]

    def _head_named(self, name: str) -> int | None:
        self._check_open()
        with _fs_errors(f"stat of {name}", self.root):
            try:
                size = self._io.file_size(self._path(name))
            except FileNotFoundError:
                return None
        return max(size - _TRAILER.size, 0)

    # --- primitives -------------------------------------------------------------
    def _path(self, name: str) -> str:
        """The file of ``name`` ("/"-separated, relative) under the root (an
        absolute path without a trailing "/": ``__init__``'s abspath)."""
        return f"{self.root}/{name}"

    def _put_named(self, name: str, data: bytes) -> bool:
        self._check_open()
        with _fs_errors(f"publish {name}", self.root):
            return self._publish_file(name, data)

    def _publish_file(self, name: str, data: bytes) -> bool:
        io = self._io
        manifest = name.startswith(MANIFESTS_DIR)
        final = self._path(name)
        directory = os.path.dirname(final)
        if directory not in self._durable_dirs:
            if not io.isdir(directory):
                try:
                    io.mkdir(directory)
                except FileExistsError:  # another writer made it meanwhile
                    pass
            # Also when another writer made it: its fsync of the parent may be pending.
            io.fsync_dir(os.path.dirname(directory), "l2_parent")
            self._durable_dirs.add(directory)
        tmp = os.path.join(self._tmp, f"{secrets.token_hex(8)}.tmp")
        fd = io.create(tmp)
        try:
            try:
                view = memoryview(data).cast("B")  # any contiguous buffer, as bytes
                io.write(fd, view)
                io.write(fd, _TRAILER.pack(crc32c(view), _TRAILER_MAGIC))
                io.fsync(fd, "l2_manifest" if manifest else "l2_object")
            finally:
                io.close(fd)
            try:
                io.link(tmp, final)  # atomic, never replaces: the first writer wins
                created = True
            except FileExistsError:
                created = False
        finally:
            self._unlink_quiet(tmp)
        # Also when another writer won: its link may not be durable yet, and our
        # False tells the caller the block is safely published.
        io.fsync_dir(directory, "l2_manifest_dir" if manifest else "l2_dir")
        return created

    def _get_named(self, name: str) -> bytearray | None:
        pieces = self._get_into_named(name, _one_buffer)
        return None if pieces is None else pieces[0]

    def _get_into_named(self, name: str, buffers_for: Callable[[int], list]) -> list | None:
        self._check_open()
        pieces = self._read_named(name, buffers_for)
        if pieces is not _NOT_CLEAN:
            return pieces
        # Damaged at rest.  Remove it so the key can be published again (an
        # immutable store would otherwise refuse the good copy forever).
        self._delete_named(name)
        raise ObjectCorruptError(f"{name} in {self.root} failed its CRC32C check; removed")

    def get_many_into(self, keys: list[bytes], buffers_fors: list) -> list[list | None]:
        self._check_open()
        out: list[list | None] = []
        served = nout = 0
        for key, buffers_for in zip(keys, buffers_fors):
            try:  # the current name only: a miss (also under a legacy name) is get_into's
                pieces = self._read_named(object_name(key), buffers_for)
            except ObjectStoreIOError:
                pieces = None  # get_into raises it
            if pieces is _NOT_CLEAN:
                pieces = None
            elif pieces is not None:
                served += 1
                nout += sum(memoryview(p).nbytes for p in pieces)
            out.append(pieces)
        if served:
            self.counts.done("get", True, nout=nout, count=served)
        return out

    def _read_named(self, name: str, buffers_for: Callable[[int], list | None]):
        """The object's pieces checked against its trailer's CRC32C (one preadv: the
        body into the caller's pieces, the trailer into its own); None if there is
        no such object; _NOT_CLEAN if it fails the check or ``buffers_for``
        declines its length (nothing removed here)."""
        trailer = bytearray(_TRAILER.size)

        def with_trailer(size: int) -> list | None:
            pieces = buffers_for(max(0, size - _TRAILER.size))
            return None if pieces is None else [*pieces, trailer]
        try:
            size, read, got = self._io.read_sized_into(self._path(name), with_trailer)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _fs_error(f"read {name}", self.root, exc) from exc  # not _fs_errors: a get's hot loop
        if read is not None and got == size >= _TRAILER.size:
            crc, magic = _TRAILER.unpack(trailer)
            pieces = read[:-1]
            if magic == _TRAILER_MAGIC and crc32c_of(pieces) == crc:
                return pieces
        return _NOT_CLEAN

    def _list_named(self, prefix: str) -> list[str]:
        return sorted(self._walk_named(prefix))

    def _any_named(self, prefix: str) -> bool:
        return next(self._walk_named(prefix), None) is not None

    def _walk_named(self, prefix: str) -> Iterator[str]:
        """The names of the files under ``prefix``, in no order, one directory listed at a time."""
        self._check_open()
        stack = [self._path(prefix.rstrip("/"))]
        while stack:  # bounded: each directory is listed once (no links between directories)
            dirpath = stack.pop()
            try:
                entries = self._io.listdir(dirpath)
            except (FileNotFoundError, NotADirectoryError):
                continue  # as os.walk: a directory removed meanwhile is skipped
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for e in entries:
                full = os.path.join(dirpath, e)
                if self._io.isdir(full):
                    stack.append(full)
                else:
                    yield f"{rel}/{e}"

    def _delete_named(self, name: str) -> None:
        self._check_open()
        path = self._path(name)
        with _fs_errors(f"delete {name}", self.root):
            try:
                self._io.unlink(path)
            except FileNotFoundError:
                return
            self._io.fsync_dir(os.path.dirname(path), "l2_delete")

    def _clear_stale_tmp(self) -> None:
        """Remove tmp files a crashed writer left (old enough not to be in flight).

        Needs file ages, which only the real file system has: on another
        FileSystem (the crash simulator) leftovers stay, harmless."""
        if not isinstance(self._io, OsFileSystem):
            return
        cutoff = time.time() - STALE_TMP_S
        with os.scandir(self._tmp) as it:
            for entry in it:
                try:
                    if entry.stat().st_mtime < cutoff:
                        self._io.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def _unlink_quiet(self, path: str) -> None:
        try:
            self._io.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


# --- opening by spec -------------------------------------------------------------------


def open_object_store(
    spec: str | os.PathLike[str] | None, *, default_dir: str | os.PathLike[str] | None = None,
    check: bool = True, **s3_options: object,
) -> ObjectStore:
    """Open the store a spec names: None (``default_dir``), a directory, or s3://bucket/prefix.

    ``s3_options`` go to :class:`tier.s3.S3ObjectStore` (endpoint_url, profile,
    region, retry, breaker, ...); credentials always come from the standard AWS
    chain.  ``check=False`` makes no request (S3: the bucket is checked by the
    first ``probe()``), so a store that does not answer cannot stall the open.
    """
    if spec is None:
        if default_dir is None:
            raise ObjectStoreConfigError("no object store spec and no default directory")
        spec = default_dir
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ObjectStoreConfigError(f"bad object store spec {spec!r}")
    if spec.startswith("s3://"):
        try:
            from quiver.tier.s3 import S3ObjectStore  # boto3 is imported only when S3 is used
        except ImportError as exc:
            raise ObjectStoreConfigError(f"{spec}: S3 needs boto3: pip install 'quiver-kv[s3]' ({exc})") from exc

        bucket, _, prefix = spec[len("s3://") :].partition("/")
        s3_options.setdefault("check_bucket", check)
        return S3ObjectStore(bucket, prefix, **s3_options)  # type: ignore[arg-type]
    if "://" in spec:
        raise ObjectStoreConfigError(f"unsupported object store scheme in {spec.split('://')[0]!r}")
    if s3_options:
        raise ObjectStoreConfigError(f"S3 options given for a directory store: {sorted(s3_options)}")
    return LocalDirObjectStore(spec)
