"""BlockStore: the facade an inference engine uses (lookup, put, get).

    with BlockStore.open("./quiver-data") as store:          # embedded: no server
        n = store.lookup(ident, token_ids)                    # leading full blocks available
        store.put(ident, token_ids, blocks)                   # durable when it returns
        blocks = store.get(ident, token_ids, n_blocks=n)      # verified payloads

Tiers: L0 is a RAM arena (tier.ram.RamTier), L1 a walpub volume on local disk
(tier.disk.DiskTier, the durability point), L2 an optional object store
(a shared directory or s3://bucket/prefix).  Every tier holds the same bytes:
the block envelope (engine.envelope), named by the *store key*
``identity.namespace (16 B) + chain key (32 B)``.

put: validate everything (identity, tokens, shape, dtype, codec) -> build
each missing block's envelope straight in a reserved L0 arena slot (one copy
of the payload; a heap buffer when L0 cannot take it) -> record the keys owed
to L2 in PENDING_L2 (fsynced) -> L1 reads the envelopes where they lie (one
group commit for the batch; durable) -> L2 synchronously from the same
envelopes, or through a bounded background queue of keys -> commit the L0
slots.  An L2 failure never loses the L1 copy: the key goes on a retry list,
and PENDING_L2 keeps it across a crash.

Lossy int8 blocks: an identity with ``kv_quant="int8-channel"`` is stored
with codec int8 and decoded with ``allow_lossy``; an exact identity is never
served an int8 block (it has another fingerprint, so other keys, and the
guard also compares the codec's lossiness).

get: for each block, the fastest tier that holds it (L0, L1, then L2 by key),
CRC-verified and checked by the identity guard (engine.guard) before one
payload byte reaches the caller; a hit below L0 is promoted upwards (best
effort: a failed promotion is counted, never raised).

docs/STORE.md has the whole contract.  ``naive=True`` exists only for
studies/bench_identity.py: keys from tokens alone, no guard -- it serves other
identities' bytes and must never be used for real.

Rooms: this module is the facade (open/close, lookup, put, get, stats).
Its neighbours, one concept each: engine.options validates open's options;
engine.l2_publisher publishes to L2 and keeps L2 attached (one L2Publisher
per store); engine.payload coerces and validates payloads; engine.error_map
translates the lower layers' errors; engine.owed_journal is the PENDING_L2 file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import re
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any, Iterable

import blake3
import numpy as np

from quiver import index_backends
from quiver.engine import codecs, quant, row_copy
from quiver.engine import config as _config
from quiver.engine import envelope as _envelope
from quiver.engine.envelope import (
    body_in_place,
    decode_block_into,
    decode_header,
    decode_raw_into,
    envelope_size,
    prepare_envelope,
    RawLayout,
    raw_layout,
    raw_view,
    uniform_layer_offsets,
)
from quiver.engine.error_map import translated
from quiver.engine.errors import (
    BlockNotFoundError,
    ChecksumMismatchError,
    EnvelopeError,
    IdentityMismatchError,
    InvalidTokensError,
    LossyCodecError,
    ObjectStoreAuthError,
    ObjectStoreRequestError,
    ObjectStoreUnreachableError,
    QuiverError,
    ShapeMismatchError,
    StoreClosedError,
    StoreConfigError,
    StoreIOError,
    StoreLockedError,
)
from quiver.engine.guard import CARRIERS, PerBlock, check_destination, expected_for, guard_envelope
from quiver.engine.identity import CacheIdentity
from quiver.engine.keys import chain_hash_key, chain_keys, iter_chain_keys, root_key, tokens_to_le_u32
from quiver.engine.l2_publisher import L2Publisher
from quiver.engine.metrics import latency_snapshot, new_latency
from quiver.engine.options import check_open_options, check_path, config_record
from quiver.engine.owed_journal import OwedJournal
from quiver.engine.pools import started_pool
from quiver.engine.promoter import FromL1, FromL2, Promoter
from quiver.engine.payload import block_arrays, check_identity, check_quant, check_start_block
from quiver.engine.sink import BlockSink
from quiver.tier.hugepages import empty_huge

TIERS = ("l0", "l1", "l2")
NAIVE_NAMESPACE = b"\0" * 16
NAIVE_ROOT = blake3.blake3(b"quiver/naive/root").digest()
MiB = 1 << 20
STORE_KEY_BYTES = 48  # identity namespace (16) + chain key (32)
PENDING_L2 = "PENDING_L2"
#: PENDING_L2 is compacted once it holds this many keys more than twice the owed set
#: (read when a store opens: its L2Publisher gets the value of that moment).
JOURNAL_SLACK_KEYS = 4096
#: L2 reads one get keeps in flight (botocore's default pool holds 10 connections).
L2_READS_IN_FLIGHT = 8
#: Bytes queued for promotion (L2 hits into L1, L1 hits into L0) before a get writes its own (engine/promoter.py).
PROMOTE_QUEUE_BYTES = 256 * MiB
#: Byte offset of the codec id in an envelope header (docs/FORMAT.md).
_CODEC_AT = 6
assert _envelope._FIXED.format.startswith("<4sHB"), "envelope header layout changed"


def _operation(fn):
    """A public BlockStore call: refused once close() has begun (StoreClosedError);
    close() waits for the calls already inside (see BlockStore.close)."""
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        with self._ops_cv:
            if self._closing:
                raise StoreClosedError(f"BlockStore({self.path!r}) is closed")
            self._ops += 1
        try:
            return fn(self, *args, **kwargs)
        finally:
            with self._ops_cv:
                self._ops -= 1
                if not self._ops:
                    self._ops_cv.notify_all()
    return call


# --------------------------------------------------------------------------- keys and codecs
def naive_chain_keys(block_tokens: int, token_ids: Any, n_blocks: int | None = None) -> list[bytes]:
    """UNSAFE (study only): chain keys from tokens alone, with no identity in them."""
    raw = tokens_to_le_u32(token_ids)
    step = block_tokens * 4
    full = len(raw) // step
    n = full if n_blocks is None else n_blocks
    if not 0 <= n <= full:
        raise InvalidTokensError(f"n_blocks={n} but the tokens fill only {full} full blocks")
    prev, out = NAIVE_ROOT, []
    for off in range(0, n * step, step):
        prev = blake3.blake3(prev + raw[off : off + step]).digest()
        out.append(prev)
    return out


def envelope_bound(ident: CacheIdentity, codec: str, chunk_size: int = codecs.DEFAULT_CHUNK_SIZE) -> int:
    """Largest envelope a block of ``ident`` can have under ``codec`` (an L0 slot's size).

    Exact for codecs none and int8, an upper bound for lz4/zstd (engine.envelope.envelope_size)."""
    return envelope_size(ident.block_shape, ident.kv_dtype, codec=codec, layer_count=ident.num_layers,
                         layer_crcs=codec == "none", chunk_size=chunk_size)


#: Fewest L0 hits a get checks together (``_l0_batch``): with the headers of a small
#: batch compared byte-wise (``RawLayout.matching_rows``) the batch was the cheaper
#: path from 2 hits (2 x 512 B: 28.5 against 33.2 us per get, interleaved A/B); at
#: 1 the two were even, and a single hit keeps the per-block path.
L0_BATCH_MIN = 2
#: Fewest L1 or local-directory L2 reads a get makes together (``_read_batch``): the
#: one-key read was cheaper for 1 block (L1, 512 B: 52 against 65 us per get,
#: interleaved A/B), even at 2, and dearer from 3.
READ_BATCH_MIN = 4
#: L1 and local-directory L2 batches are read in chunks of about this many bytes
#: (``_read_batch``), with a BlockSink through the store's reused chunk buffers: 4 to 32
#: blocks of 256 KiB measured alike (22.3-24.6 ms for 512), all well under one
#: 128 MiB pass (34 ms); with two threads, 1 and 2 MiB chunks were slower than 4.
READ_CHUNK_BYTES = 4 << 20
#: Threads beside the get's own that read a batch's chunks (``_read_batch``), one
#: pool per store shared by its gets.  One helper, interleaved A/B on 2 cores
#: (2026-12-05, L1, page cache warm, into an array): 32 x 256 KiB 1.53 -> 1.34 ms,
#: 512 x 256 KiB 29.0 -> 19.4 ms, 8 x 2 MiB 2.66 -> 1.83 ms, 64 x 2 MiB 22.5 -> 13.5 ms.
READ_HELPERS = 1


def _chunk_blocks(raw_len: int) -> int:
    """Blocks of one chunk of a batch read (``_read_batch``): READ_CHUNK_BYTES of
    whole blocks, at least one."""
    return max(1, READ_CHUNK_BYTES // raw_len)


def _rows_of(buf: np.ndarray, raw_len: int) -> np.ndarray:
    """``buf``'s leading chunk (``_chunk_blocks``) as rows of one block each."""
    return buf[:_chunk_blocks(raw_len) * raw_len].reshape(-1, raw_len)


def _found(read: Future) -> bool:
    """Whether a started L2 read (``BlockStore._start_l2_reads``) found its block; waits for it."""
    return read.exception() is None and read.result() is not None


def _layout(ident: CacheIdentity) -> RawLayout:
    """The header layout of ``ident``'s blocks as this store writes them with codec
    none (what a read checks first: envelope.RawLayout)."""
    return raw_layout(ident.block_shape, ident.kv_dtype, ident.num_layers, ident.block_tokens)


def _guard_codec(buf, ident: CacheIdentity) -> None:
    """Refuse an envelope whose lossiness disagrees with the identity (after guard_envelope).

    An exact request (``kv_quant`` None) is never served an int8 block and a
    lossy one never an exact block, whatever the header's other fields say.
    Fast path: the codec byte.  On a difference the header is parsed (its CRC
    verified, so damage is a checksum error) and the refusal is an
    IdentityMismatchError."""
    mv = memoryview(buf)
    if len(mv) > _CODEC_AT and (mv[_CODEC_AT] == codecs.CODEC_INT8) == (ident.kv_quant is not None):
        return
    h = decode_header(buf, allow_lossy=True)
    try:
        quant.check_identity_codec(ident, h.codec)
    except LossyCodecError as exc:
        raise IdentityMismatchError(f"stored block {h.key[:8].hex()} refused: {exc}") from exc


# --------------------------------------------------------------------------- the store
class BlockStore:
    """A tiered, content-addressed KV block store.  Thread-safe; one per process per path.

    Open with :meth:`open`; use as a context manager or call :meth:`close`."""

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] = _config.UNSET,
        *,
        index: str | None = _config.UNSET,
        object_store: str | os.PathLike[str] | None = _config.UNSET,
        ram_bytes: int = _config.UNSET,
        ram_slot_bytes: int | None = _config.UNSET,
        ram_policy: str = _config.UNSET,
        disk_bytes: int | str | None = _config.UNSET,
        l2_mode: str = _config.UNSET,
        l2_queue_max: int = _config.UNSET,
        l2_enqueue_timeout_s: float = _config.UNSET,
        l2_retry_interval_s: float = _config.UNSET,
        manifest_batch: int = _config.UNSET,
        bootstrap: bool = _config.UNSET,
        codec: str = _config.UNSET,
        guard: bool | None = _config.UNSET,
        naive: bool = _config.UNSET,
        s3_options: dict | None = _config.UNSET,
        metrics_port: int | None = _config.UNSET,
        config: str | os.PathLike[str] | None = None,
    ) -> "BlockStore":
        """Open (creating if needed) the store at ``path``.

        Each option not given here comes from ``QUIVER_<OPTION>`` in the
        environment, else from the TOML file ``config`` (or ``$QUIVER_CONFIG``),
        else its default (engine.config.OPTIONS; docs/CONFIG.md): a deployment
        configures the store without code, and code that passes an option keeps it.

        index:        residency-index backend of the disk tier; default "art"
                      when index_backends.available() has it, else "flat".
        object_store: None = no L2 (L1 at ``path`` is the shared-nothing default);
                      a directory (shared by processes on one machine); or
                      "s3://bucket/prefix" (standard AWS configuration chain,
                      ``s3_options`` such as endpoint_url/profile/create_bucket).
        ram_bytes:    L0 arena size (default 256 MiB; 0 = no L0); ``ram_slot_bytes``
                      defaults to the envelope bound of the first identity stored.
        disk_bytes:   L1 capacity; LRU eviction beyond it (before a put that would cross
                      it, and at open).  None or "auto" (default): half of what the
                      volume could hold at open, i.e. tier.disk.DEFAULT_DISK_FRACTION x
                      (free space of the file system + bytes already in L1).
        Every option is validated before anything is created: a bad value is a
        StoreConfigError (docs/STORE.md, "Options are validated up front").
        codec:        envelope codec of exact identities: "none" (default), "lz4",
                      "zstd"; "int8" makes a lossy-only store.  An identity with
                      kv_quant="int8-channel" is always stored with the lossy int8
                      codec; LossyCodecError where codec and kv_quant disagree.
        l2_mode:      "sync" (default: put returns after L2 has the blocks) or
                      "background" (a bounded queue of ``l2_queue_max`` keys).
        guard:        the identity guard on every get; None (default) = on, except
                      in naive mode.  guard=False is for measuring its cost only.
        naive:        UNSAFE, study only: keys from tokens alone, no identity in
                      them (and, unless guard=True, no guard).
        metrics_port: serve Prometheus metrics (engine.metrics) on this port while
                      the store is open (0: any free port, see ``metrics_port``
                      attribute); needs prometheus_client.
        """
        given = {k: v for k, v in locals().items() if k not in ("cls", "config") and v is not _config.UNSET}
        opts, sources = _config.resolve(given, config=config)
        try:
            return cls(opts.pop("path"), **opts, sources=sources)
        except StoreConfigError as exc:  # say where a value that is not a keyword came from
            m = re.match(r"(\w+)", str(exc))
            src = sources.get(m[1]) if m else None
            if src in (None, "keyword", "default"):
                raise
            raise StoreConfigError(f"{exc} (from {src})") from exc

    def __init__(self, path, *, index, object_store, ram_bytes, ram_slot_bytes, ram_policy, disk_bytes,
                 l2_mode, l2_queue_max, l2_enqueue_timeout_s, l2_retry_interval_s, manifest_batch,
                 bootstrap, codec, guard, naive, s3_options, metrics_port=None, sources=None) -> None:
        # Everything is checked before the directory is created or locked: a bad call writes nothing.
        opts = dict(index=index, object_store=object_store, ram_bytes=ram_bytes, ram_slot_bytes=ram_slot_bytes,
                    ram_policy=ram_policy, disk_bytes=disk_bytes, l2_mode=l2_mode, l2_queue_max=l2_queue_max,
                    l2_enqueue_timeout_s=l2_enqueue_timeout_s, l2_retry_interval_s=l2_retry_interval_s,
                    manifest_batch=manifest_batch, bootstrap=bootstrap, codec=codec, guard=guard, naive=naive,
                    s3_options=s3_options, metrics_port=metrics_port)
        path = check_path(path)
        check_open_options(opts)
        self._config = config_record(path, opts, sources)
        if disk_bytes is None:  # the default budget (tier.disk.auto_budget, docs/STORE.md)
            from quiver.tier.disk import AUTO

            disk_bytes = AUTO
        elif not isinstance(disk_bytes, str):
            disk_bytes = int(disk_bytes)  # numpy ints are ints here, never floats or bools
        if index is None:
            index = "art" if "art" in index_backends.available() else "flat"
        self.path = path
        self.index = index
        self.codec = codec
        self.naive = bool(naive)
        self.guard = (not self.naive) if guard is None else bool(guard)
        self.l2_mode = l2_mode
        self._ram_bytes = int(ram_bytes)
        self._ram_slot = None if ram_slot_bytes is None else int(ram_slot_bytes)
        self._ram_policy = ram_policy
        self._init_state()
        # The publisher reaches back through weak references: no store <-> publisher cycle, so a
        # store without L2 that is dropped unclosed is freed at once, as before the split.
        me = weakref.ref(self)
        self._pub = L2Publisher(
            describe=lambda: repr(me()),
            journal=OwedJournal(os.path.join(self.path, PENDING_L2), key_bytes=STORE_KEY_BYTES),
            journal_slack_keys=JOURNAL_SLACK_KEYS, lock=self._lock, counters=self._n, latency=self._lat,
            local_envelope=lambda skey: me()._local_envelope(skey), disk=lambda: me()._disk,
            is_closing=lambda: me()._closing, is_closed=lambda: me()._closed, l2_mode=l2_mode,
            queue_max=int(l2_queue_max), enqueue_timeout_s=float(l2_enqueue_timeout_s),
            retry_interval_s=float(l2_retry_interval_s), manifest_batch=int(manifest_batch))
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(f"cannot create store directory {self.path}: {exc.strerror}") from exc
        self._take_lock()
        try:
            self._open_tiers(index, object_store, disk_bytes, s3_options or {}, bool(bootstrap))
            if metrics_port is not None:
                self._serve_metrics(int(metrics_port))
        except BaseException:
            try:
                self._release_everything()  # always unlocks, whatever else fails
            except QuiverError as exc:  # the open's own error is the one to raise
                logging.getLogger("quiver.engine.store").warning("cleaning up a failed open of %s: %s", self.path, exc)
            raise

    def _init_state(self) -> None:
        """The handle's locks, tier slots, counters and latency histograms (nothing opened yet)."""
        self._lock = threading.RLock()
        self._chunks: list[np.ndarray] = []  # idle buffers for a sink's chunked reads (_take_chunk)
        self._chunks_lock = threading.Lock()
        self._closed = False
        # In-flight public calls (lookup, put, get, flush_l2): close() sets
        # _closing (new calls are refused) and waits for _ops to reach 0 before
        # it closes the tiers, so no call finds them gone half-way.
        self._ops_cv = threading.Condition(threading.Lock())
        self._ops = 0
        self._closing = False
        self._ram = None
        self._disk = None
        self._l2 = None
        self._l2_pool: ThreadPoolExecutor | None = None  # a get's concurrent L2 reads (made on first use)
        self._read_pool: ThreadPoolExecutor | None = None  # reads a batch's chunks beside the get (made on first use)
        # A get's hits copied into the tiers above them in the background (engine/promoter.py).
        self._promoter = Promoter(self._promote_now, PROMOTE_QUEUE_BYTES, "quiver-l1-promote")  # L2 hits: L1, L0
        self._l0_promoter = Promoter(self._promote_l0_now, PROMOTE_QUEUE_BYTES, "quiver-l0-promote")  # L1 hits
        self._lock_fd: int | None = None
        self._n = dict(
            put_blocks=0, put_present=0, put_in_slot=0, put_heap=0, get_blocks=0,
            l0_hits=0, l1_hits=0, l2_hits=0, misses=0,
            identity_mismatches=0, corrupt_l0=0, corrupt_l1=0, corrupt_l2=0, l0_oversize=0,
            lookups=0, l2_heads=0, l2_lookup_errors=0, l2_published=0, l2_existing=0, l2_failures=0,
            l2_deferred=0, l2_retried=0, l2_lost=0, l2_known=0, manifests_written=0, manifest_failures=0,
            bootstrap_keys=0, l0_busy=0, journal_appends=0, journal_compactions=0, l1_promote_failures=0,
            l0_promote_failures=0,
        )
        # Latency histograms (engine.metrics): op -> tier -> Histogram, guarded by _lock.
        self._lat = new_latency()
        self.metrics_port: int | None = None  # the port serving metrics (metrics_port=0: the one picked)
        self._metrics_server = None

    @property
    def bootstrap_s(self) -> float:
        """Seconds the manifest read that bootstrapped L2's key set took (0.0: none)."""
        return self._pub.bootstrap_s

    # The L2 publisher's worker thread and journal, as tests and tools reach them.
    @property
    def _worker(self) -> threading.Thread | None:
        return self._pub.worker

    @property
    def _journal(self) -> OwedJournal:
        return self._pub.journal

    # ------------------------------------------------------------------ opening
    def _serve_metrics(self, port: int) -> None:
        """Serve this store's metrics over HTTP (a registry of its own) until close."""
        from quiver.engine.metrics import serve

        try:
            _registry, server, _thread = serve(self, port)
        except OSError as exc:
            raise StoreConfigError(f"metrics_port {port}: cannot listen ({exc.strerror or exc})") from exc
        self._metrics_server = server
        self.metrics_port = server.server_port

    def _take_lock(self) -> None:
        # The store directory itself is locked: a lock file could be unlinked by
        # a cleaner of stale files while we run, and a second writer get in.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreIOError(f"cannot open the store directory {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"store {self.path} is open in another process (or handle)") from None
        except OSError as exc:
            os.close(fd)
            raise StoreIOError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        self._lock_fd = fd

    def _open_tiers(self, index: str, object_store, disk_bytes, s3_options: dict, bootstrap: bool) -> None:
        from quiver.tier.disk import DiskTier
        from quiver.tier.policy import make_policy
        with translated("ram_policy"):
            make_policy(self._ram_policy, 1)  # an unknown name fails at open, not at the first put
        with translated(f"opening disk tier {self.path}/l1"):
            self._disk = DiskTier(os.path.join(self.path, "l1"), disk_bytes, index=index, adopt=self._adoptable)
        if object_store is not None:
            from quiver.tier.objectstore import open_object_store

            with translated("opening object store"):  # no request yet: a config error fails here
                self._l2 = open_object_store(object_store, check=False, **s3_options)
            # PENDING_L2, attach (bounded), the worker.  With L2 the publisher holds the store
            # (its threads and L2's breaker hook keep it alive, as they always have).
            self._pub.start(self._l2, bootstrap, owner=self)
        if self._ram_bytes > 0 and self._ram_slot is not None:
            self._make_ram(self._ram_slot)

    def _adoptable(self, skey: bytes, data: bytes) -> bool:
        """walpub's check for an object that lost its WAL record to damage: a
        whole envelope whose CRC32C verifies and whose header names this key
        (and, unless naive, this identity namespace).  Then it is kept."""
        try:
            h, _body = _envelope._verified(data, allow_lossy=True)
        except (EnvelopeError, ValueError):
            return False
        return len(skey) == 48 and h.key == skey[16:] and (self.naive or h.fingerprint[:16] == skey[:16])

    def _make_ram(self, slot_bytes: int) -> None:
        from quiver.tier.ram import RamTier

        if slot_bytes > self._ram_bytes:
            raise StoreConfigError(f"ram_bytes {self._ram_bytes} cannot hold one slot of {slot_bytes} bytes")
        with translated("creating the RAM tier"):
            self._ram = RamTier(self._ram_bytes, slot_bytes, policy=self._ram_policy)
        self._ram_slot = slot_bytes

    # ------------------------------------------------------------------ keys
    def _chain(self, ident: CacheIdentity, token_ids, n: int | None) -> tuple[list[bytes], list[bytes]]:
        """(chain keys, store keys) of the leading ``n`` (or all) full blocks."""
        check_identity(ident)
        if self.naive:
            keys = naive_chain_keys(ident.block_tokens, token_ids, n)
            ns = NAIVE_NAMESPACE
        else:
            keys = chain_keys(ident, token_ids, n)
            ns = ident.namespace
        return keys, [ns + k for k in keys]

    def _root(self, ident: CacheIdentity) -> bytes:
        return NAIVE_ROOT if self.naive else root_key(ident)

    # ------------------------------------------------------------------ lookup
    @_operation
    def lookup(self, ident: CacheIdentity, token_ids) -> int:
        """Leading full blocks of ``token_ids`` held by some tier (stops at the first miss).

        The chain is hashed lazily, in growing batches, and each batch is one
        ``longest_prefix`` call on L1's residency index: a prompt with nothing
        cached costs a few hashes, not the whole prompt's.  Past L1's prefix a
        block may still be in L0 or known in L2; past that, L2 is asked by key
        (HEAD), so another process's blocks are found without any listing.  An
        unreachable L2 counts as a miss here (``stats()["counters"]["l2_lookup_errors"]``):
        lookup is advisory, and get reports the error."""
        self._check_open()
        check_identity(ident)
        ns = NAIVE_NAMESPACE if self.naive else ident.namespace
        t0 = time.perf_counter()
        with self._lock:
            self._n["lookups"] += 1
        n = 0
        try:
            for batch in self._iter_chain(ident, token_ids):
                skeys = [ns + k for k in batch]
                t1 = time.perf_counter()
                with translated("disk tier lookup"):
                    hit = self._disk.longest_prefix(skeys)
                self._observe("lookup", "l1", t1)
                for skey in skeys[hit:]:
                    if not (self._in_ram(skey) or skey in self._pub.known or self._l2_head(skey)):
                        return n + hit
                    hit += 1
                n += hit
            return n
        finally:
            self._observe("lookup", "all", t0)

    def _observe(self, op: str, tier: str, t0: float) -> None:
        """Record the latency since ``t0`` (time.perf_counter) in op/tier's histogram."""
        dt = time.perf_counter() - t0
        with self._lock:
            self._lat[op][tier].observe(dt)

    def _iter_chain(self, ident: CacheIdentity, token_ids):
        if self.naive:
            return iter_chain_keys(token_ids, ident.block_tokens, NAIVE_ROOT)
        return iter_chain_keys(token_ids, ident.block_tokens, root_key(ident), chain_hash_key(ident))

    def _in_ram(self, skey: bytes) -> bool:
        with self._lock:
            return self._ram is not None and self._ram.contains(skey)

    def _l2_head(self, skey: bytes) -> bool:
        """Ask L2 for ``skey`` (False without L2, on a miss, or when L2 fails).

        Bounded by L2_LOOKUP_TIMEOUT_S; while L2's circuit breaker is open the
        call is refused without a request (microseconds), and counted as an error."""
        if self._l2 is None:
            return False
        from quiver.tier.objectstore import deadline

        with self._lock:
            self._n["l2_heads"] += 1
        t0 = time.perf_counter()
        try:
            with translated("L2 head"), deadline(self.L2_LOOKUP_TIMEOUT_S):
                size = self._l2.head(skey)
        except (ObjectStoreUnreachableError, ObjectStoreAuthError, ObjectStoreRequestError):
            with self._lock:
                self._n["l2_lookup_errors"] += 1
                self._lat["lookup"]["l2"].observe(time.perf_counter() - t0)
            return False
        self._observe("lookup", "l2", t0)
        if size is None:
            return False
        with self._lock:
            self._pub.known.add(skey)
        return True

    # ------------------------------------------------------------------ put
    @_operation
    def put(self, ident: CacheIdentity, token_ids, blocks, start_block: int = 0) -> int:
        """Store full blocks ``start_block .. start_block + len(blocks) - 1`` of
        ``token_ids``; durable on return.

        ``token_ids`` is the whole prompt from its first token (a block's key
        names its whole prefix), but only the blocks from ``start_block`` on are
        passed: an engine that already holds blocks 0..k-1 stores k..m without
        handing those over again.  Everything is validated first (tokens,
        count, shape, dtype, codec): a bad call writes nothing.  Blocks already on disk are skipped.  Returns
        how many blocks were newly written.  In sync L2 mode an L2 failure
        raises its typed error *after* L1 holds every block (they are retried
        later, also after a crash: see PENDING_L2)."""
        t0 = time.perf_counter()
        try:
            return self._put(ident, token_ids, blocks, start_block)
        finally:
            self._observe("put", "all", t0)

    def _put(self, ident: CacheIdentity, token_ids, blocks, start_block: int) -> int:
        self._check_open()
        check_identity(ident)
        start = check_start_block(start_block)
        codec = self._codec_for(ident)
        arrays = block_arrays(ident, blocks)
        if not arrays:
            return 0
        keys, skeys = self._chain(ident, token_ids, start + len(arrays))
        parents = ([self._root(ident)] + keys)[start:start + len(arrays)]
        keys, skeys = keys[start:], skeys[start:]
        with translated("disk tier contains"):
            todo = [i for i, held in enumerate(self._disk.contains_many(skeys)) if not held]
        with self._lock:
            self._n["put_present"] += len(arrays) - len(todo)
        if not todo:
            return 0
        slots = self._ensure_ram(ident, codec)
        # The envelopes of the last `slots` blocks are built in L0 slots: the
        # earlier ones of a batch larger than the arena would be evicted by the
        # later ones anyway (what inserting them in order into the LRU leaves).
        first_slot = len(todo) - slots
        items: list[tuple[bytes, Any, int]] = []  # (store key, envelope: an L0 slot or its pieces, its CRC32C)
        reserved: list[bytes] = []           # store keys holding an uncommitted L0 reservation
        l2_todo: list[tuple[bytes, Any]] = []
        durable = False
        try:
            for j, i in enumerate(todo):
                enc = prepare_envelope(
                    arrays[i], fingerprint=ident.fingerprint, key=keys[i], parent=parents[i],
                    token_count=ident.block_tokens, codec=codec, dtype=ident.kv_dtype,
                    layer_offsets=uniform_layer_offsets(ident.num_layers, arrays[i].nbytes),
                    layer_crcs=codec == "none",  # verified ranged layer reads (engine.layerwise)
                )
                dest = self._l0_reserve(skeys[i], enc.nbytes) if j >= first_slot else None
                if dest is None:  # no L0 copy: L1 writes the pieces (header, the caller's payload, CRC)
                    dest = enc.pieces()
                else:
                    reserved.append(skeys[i])
                    enc.write_into(dest)  # the one copy of the payload into its envelope
                items.append((skeys[i], dest, enc.object_crc))  # walpub's record CRC, without a pass
            with self._lock:
                l2_todo = [] if self._l2 is None else [(sk, env) for sk, env, _ in items if sk not in self._pub.known]
            self._pub.journal_owed([sk for sk, _ in l2_todo])  # before L1: no crash window loses them
            t1 = time.perf_counter()
            self._disk_put_many(items, "disk tier put")
            durable = True
            with self._lock:
                self._lat["put"]["l1"].observe(time.perf_counter() - t1)
                self._n["put_blocks"] += len(items)
                self._n["put_in_slot"] += len(reserved)
                self._n["put_heap"] += len(items) - len(reserved)
            if l2_todo and self.l2_mode == "sync":  # from the envelopes: reserved slots cannot be reused
                self._pub.publish_sync([(sk, b"".join(env) if isinstance(env, tuple) else env) for sk, env in l2_todo])
        finally:
            self._l0_finish(reserved, commit=durable)
            if not durable and l2_todo:  # journaled, maybe partly in L1: flush_l2 settles each key
                self._pub.retry_owed([sk for sk, _ in l2_todo])
        if l2_todo and self.l2_mode == "background":
            self._pub.enqueue([sk for sk, _ in l2_todo])  # the worker reads them back from L0/L1
        return len(items)

    def _disk_put_many(self, items: list[tuple], what: str) -> None:
        """L1 put_many: one group commit, then eviction to the budget.  L1's
        residency index records both; nothing else keeps a copy to update."""
        with translated(what):
            self._disk.put_many(items)

    def _codec_for(self, ident: CacheIdentity) -> str:
        """The codec of ``ident``'s blocks: int8 when the identity says its KV is
        lossy (kv_quant), else the store's.  LossyCodecError when they disagree."""
        check_quant(ident)
        codec = "int8" if ident.kv_quant is not None else self.codec
        if codec == "int8" and ident.kv_quant is None:
            raise LossyCodecError("this store's codec is lossy int8, but the identity expects exact KV "
                                  f"(kv_quant is None); use kv_quant={quant.KV_QUANT_INT8!r}")
        return codec

    def _ensure_ram(self, ident: CacheIdentity, codec: str) -> int:
        """Create the L0 arena on the first block; how many slots it has (0: no L0)."""
        if self._ram_bytes == 0:
            return 0
        with self._lock:
            if self._ram is None:
                self._make_ram(envelope_bound(ident, codec))
            return self._ram.n_slots

    def _l0_reserve(self, skey: bytes, nbytes: int):
        """A writable L0 slot to build ``skey``'s envelope in, or None (no L0, too
        big, already in L0, or every slot held by in-flight puts)."""
        from quiver.tier.errors import TierFullError, TierReservationError

        with self._lock:
            if self._ram is None or self._ram.contains(skey):  # L0 keeps its copy: same key, same bytes
                return None
            if nbytes > self._ram_slot:
                self._n["l0_oversize"] += 1
                return None
            evicted: list[bytes] = []
            try:
                view = self._ram.reserve(skey, nbytes, evicted)
            except (TierFullError, TierReservationError):
                self._n["l0_busy"] += 1
                view = None
            return view

    def _l0_finish(self, reserved: list[bytes], commit: bool) -> None:
        """Commit (the put is durable) or abort the put's L0 reservations."""
        if not reserved:
            return
        with self._lock:
            for sk in reserved:
                if commit:
                    self._ram.commit(sk)
                else:
                    self._ram.abort(sk)

    def _ensure_l0(self, ident: CacheIdentity) -> bool:
        """Create the L0 arena, sized for ``ident``'s envelopes, before a get
        queues its first promotion into it; False when the store has no L0."""
        if self._ram_bytes == 0:
            return False
        with self._lock:
            if self._ram is None:
                exact = "none" if self.codec == "int8" else self.codec
                self._make_ram(envelope_bound(ident, "int8" if ident.kv_quant is not None else exact))
        return True

    def _ram_put(self, skey: bytes, pieces: list) -> None:
        """Copy a finished envelope (a promotion from L2), given as the pieces it
        was read in, into L0: a reserved slot filled outside the store lock."""
        views = [memoryview(p).cast("B") for p in pieces]
        slot = self._l0_reserve(skey, sum(v.nbytes for v in views))
        if slot is None:  # no L0, already in L0, too big, or every slot held by in-flight puts
            return
        pos = 0
        for v in views:
            slot[pos:pos + v.nbytes] = v
            pos += v.nbytes
        self._l0_finish([skey], commit=True)

    # ------------------------------------------------------------------ L2 (engine.l2_publisher)
    #: Budget of the L2 HEAD one lookup may make (advisory: a miss when it runs out).
    L2_LOOKUP_TIMEOUT_S = 1.0

    def l2_health(self) -> dict:
        """L2's availability: configured, attached (answered once; manifests read),
        the circuit breaker's state and counters."""
        return self._pub.health()

    def _local_envelope(self, skey: bytes) -> bytes | None:
        with self._lock:
            if self._ram is not None:
                view = self._ram.get(skey)
                if view is not None:
                    return bytes(view)
        try:
            with translated("disk tier get"):
                return self._disk.get(skey)
        except QuiverError:
            return None

    @_operation
    def flush_l2(self, timeout_s: float | None = 60.0) -> int:
        """Wait for the background queue, retry failed publishes, write the manifest.

        Returns how many blocks are still not in L2 (0 = everything published)."""
        self._check_open()
        return self._flush_l2(timeout_s)

    def _flush_l2(self, timeout_s: float | None) -> int:
        if self._l2 is None:
            return 0
        return self._pub.flush(timeout_s)

    # ------------------------------------------------------------------ get
    @_operation
    def get(self, ident: CacheIdentity, token_ids, n_blocks: int | None = None, out=None,
            start_block: int = 0):
        """The verified payloads of blocks ``start_block .. n_blocks - 1`` (to the
        last full block if ``n_blocks`` is None; ``start_block`` 0 by default).

        Returns a numpy array ``[n, *block_shape]`` (bfloat16 as uint16), or
        decodes into ``out`` (array/tensor ``[n, *block_shape]`` or a sequence
        of per-block ones) and returns it, ``n = n_blocks - start_block``.
        ``out`` may also be a :class:`~quiver.engine.sink.BlockSink` (an
        engine's own cache layout): the verified blocks are handed to it, L0
        hits straight from their slots (one copy), L1/L2 batches a chunk at a
        time from one of the store's chunk buffers, the others through its staging array
        (engine/sink.py).
        Raises BlockNotFoundError for a block no tier holds,
        IdentityMismatchError when the guard refuses a stored block, an
        EnvelopeError when every copy found was corrupt; each carries
        ``block_index``, the failing block's index in the prompt (the blocks
        before it were delivered, verified)."""
        t0 = time.perf_counter()
        try:
            return self._get(ident, token_ids, n_blocks, out, start_block)
        finally:
            self._observe("get", "all", t0)

    def _get(self, ident: CacheIdentity, token_ids, n_blocks: int | None, out, start_block: int):
        self._check_open()
        check_identity(ident)
        check_quant(ident)
        start = check_start_block(start_block)
        keys, skeys = self._chain(ident, token_ids, n_blocks)
        if start > len(keys):
            raise InvalidTokensError(f"start_block={start} is past the {len(keys)} blocks asked for")
        parents = ([self._root(ident)] + keys)[start:len(keys)]
        keys, skeys = keys[start:], skeys[start:]
        n = len(keys)
        sink = out if isinstance(out, BlockSink) else None
        if sink is not None:
            out = sink.staging(n)
            if isinstance(out, (list, tuple)):
                raise ShapeMismatchError("a BlockSink's staging must be one array [n, *block_shape]")
        if out is None:
            carrier = CARRIERS[ident.kv_dtype][0]
            result = np.empty((n, *ident.block_shape), dtype=carrier)
            dsts = PerBlock(result, n)
        else:
            dsts = check_destination(out, ident, n)
            result = out
        # The destination's bytes, one row per block, where it is one array.
        rows = None if isinstance(result, (list, tuple)) or n == 0 else raw_view(result).reshape(n, -1)
        from_l2: list[tuple[bytes, Any]] = []  # promoted to L1 in one group commit, then L0 (engine/promoter.py)
        from_l1: list[tuple[bytes, FromL1]] = []  # promoted to L0 (engine/promoter.py)
        served: list[tuple[str, float]] = []      # (tier, seconds) per block delivered
        staged: list[int] = []  # with a sink: blocks the per-block path delivered into its staging rows
        with self._lock:
            ram = self._ram
        # One lock acquisition pins every L0 hit of the get (their slots are not
        # reused until unpinned, so each decodes with no lock held).
        pins = ram.pin_many(skeys) if ram is not None else [None] * n
        # A generator: a store with no L2 looks at no block for it.
        l2_reads = self._start_l2_reads(ident, ((i, skeys[i]) for i in range(n) if pins[i] is None), dsts)
        try:
            batch = self._l0_batch(ident, keys, parents, pins, rows, sink) if rows is not None else []
            # Not in L0, and in L1's index when the get began (else: l2_reads); a get served
            # whole from L0 (or whose other hits _read_one takes) asks no other tier.
            l1_todo = [i for i in range(n) if pins[i] is None and i not in l2_reads]
            if rows is not None and (l1_todo or l2_reads):
                try:
                    if l1_todo:
                        batch += self._l1_batch(ident, keys, parents, skeys, rows, l1_todo, from_l1, sink)
                    if l2_reads:
                        batch += self._l2_batch(ident, keys, parents, skeys, rows,
                                                [i for i, read in l2_reads.items() if read is None], from_l2, sink)
                except QuiverError as exc:  # a tier that failed as a whole (closed, failed): at the first
                    delivered = {i for i, _ in batch}  # block not delivered, so the ones before it were
                    exc.block_index = start + next(i for i in range(n) if i not in delivered)
                    raise
            served.extend(hit for _, hit in batch)
            done = {i for i, _ in batch}
            for i in range(n):
                if i in done:
                    continue
                want = expected_for(ident, keys[i], parents[i])
                try:
                    served.append(self._read_one(skeys[i], want, dsts[i], ident, pins[i], from_l2, from_l1,
                                                 l2_reads.get(i), l1_lacks=i in l2_reads))
                    staged.append(i)
                except QuiverError as exc:
                    exc.block_index = start + i
                    if isinstance(exc, IdentityMismatchError):
                        with self._lock:
                            self._n["identity_mismatches"] += 1
                    raise
        finally:  # also after an error: the blocks read so far were verified
            if ram is not None:
                ram.unpin_many([pin[0] for pin in pins if pin is not None])
            started = [fut for fut in l2_reads.values() if fut is not None]
            if started:
                for fut in started:
                    fut.cancel()  # those not running yet (a failed block ends the get)
                wait_all(started)  # the running ones may write into the caller's array: not after we return
            if sink is not None and staged:  # also after an error: the blocks before it are delivered
                sink.take(rows, 0, staged, staged)
            if (from_l2 or from_l1) and self._ensure_l0(ident):
                self._l0_promoter.submit(from_l1)
            if from_l2:
                self._promoter.submit(from_l2)
            per_time = Counter(served)  # a batch's blocks share one (tier, seconds): one observe each
            with self._lock:  # the get's counters and latencies, once per get
                self._n["get_blocks"] += len(served)
                for (tier, seconds), count in per_time.items():
                    self._n[f"{tier}_hits"] += count
                    self._lat["get"][tier].observe(seconds, count)
        return result if sink is None else sink

    def _l0_batch(self, ident: CacheIdentity, keys: list, parents: list, pins: list,
                  rows: np.ndarray, sink: BlockSink | None) -> list[tuple[int, tuple[str, float]]]:
        """The L0 hits of a get checked and copied together, so the get pays its
        fixed Python cost once, not per block (issue 10): every pinned header is
        compared with the identity's codec-none layout and with the block's own
        fingerprint, key and parent (the guard's compare) together
        (``RawLayout.matching_rows``), its header CRC checked, and the body
        copied into the block's row of the destination (with a sink, handed to
        it from the slots: one copy into the engine's layout).  Returns (index,
        ("l0", seconds)) of the blocks served; any other hit (another codec, a
        mismatch, a damaged header) is left to ``_read_one``, which decides and
        explains it."""
        t0 = time.perf_counter()
        idx = [i for i, pin in enumerate(pins) if pin is not None]
        layout = _layout(ident)
        if len(idx) < L0_BATCH_MIN or rows.shape[1] != layout.raw_len:
            return []
        ok = layout.matching_rows(self._ram.heads([pins[i][0] for i in idx], layout.header_len),
                                  self._guard_ids(ident, keys, parents, idx))
        hl, total = layout.header_len, layout.total_len
        good = [i for i, fits in zip(idx, ok) if fits and pins[i][1] == total]
        # One thread copies: split over a thread pool in tasks of 4 MiB, 8 MiB gets ran slower
        # here (memory-bound, and a hand-off costs about a 256 KiB copy), 128 MiB ones gained < 10%.
        arena, slot_bytes = self._ram.arena, self._ram.slot_bytes  # pinned slots: read with no lock held
        # The arena holds bytes verified (or encoded) on their way in: header only.
        if sink is not None and good:
            sink.take(arena.reshape(-1, slot_bytes), hl, [pins[i][0] for i in good], good)
        elif good:  # a large get's with non-temporal stores (engine/row_copy.py)
            row_copy.copy_rows(arena.reshape(-1, slot_bytes), hl, [pins[i][0] for i in good], rows, good)
        each = (time.perf_counter() - t0) / max(1, len(good))
        return [(i, ("l0", each)) for i in good]

    def _l1_batch(self, ident: CacheIdentity, keys: list, parents: list, skeys: list, rows: np.ndarray,
                  todo: list[int], from_l1: list, sink: BlockSink | None) -> list[tuple[int, tuple[str, float]]]:
        """The L1 hits among blocks ``todo`` read and checked together
        (``_read_batch`` over ``DiskTier.get_many_into``: walpub's index asked
        under one lock), each appended to ``from_l1`` (promoted to L0 after the
        get).  Returns (index, ("l1", seconds)) of the blocks served; the others
        are ``_read_one``'s."""
        t0 = time.perf_counter()
        good = self._read_batch(ident, keys, parents, skeys, rows, todo, self._disk.get_many_into, "disk tier get",
                                sink)
        if self._ram_bytes:  # no L0, nothing to promote
            size = _layout(ident).total_len  # the only size it reads
            from_l1.extend((skeys[i], FromL1(size)) for i, _ in good)
        each = (time.perf_counter() - t0) / max(1, len(good))
        return [(i, ("l1", each)) for i, _ in good]

    def _l2_batch(self, ident: CacheIdentity, keys: list, parents: list, skeys: list, rows: np.ndarray,
                  todo: list[int], from_l2: list, sink: BlockSink | None) -> list[tuple[int, tuple[str, float]]]:
        """The L2 hits among blocks ``todo`` (L1's index lacked them; their reads
        not started in flight) read and checked together (``_read_batch`` over
        ``ObjectStore.get_many_into``: a local directory's reads, no removal of a
        damaged object there: ``_read_one`` reads it again and decides), each
        queued for L1 and L0 as ``_read_one`` does.  Returns (index,
        ("l2", seconds)) of the blocks served."""
        if self._l2 is None or len(todo) < READ_BATCH_MIN:
            return []
        t0 = time.perf_counter()
        good = self._read_batch(ident, keys, parents, skeys, rows, todo, self._l2.get_many_into, "L2 get", sink)
        if not good:
            return []
        with self._lock:
            self._pub.known.update(skeys[i] for i, _ in good)
        size = _layout(ident).total_len  # the only size a batch reads
        for i, _ in good:  # a body read into the caller's array: the promoter reads it again
            from_l2.append((skeys[i], FromL2(size)))
        each = (time.perf_counter() - t0) / len(good)
        return [(i, ("l2", each)) for i, _ in good]

    def _read_batch(self, ident: CacheIdentity, keys: list, parents: list, skeys: list, rows: np.ndarray,
                    todo: list[int], read_many, what: str, sink: BlockSink | None) -> list[tuple[int, list]]:
        """Blocks ``todo`` read from one tier together, as ``_l0_batch`` checks L0
        hits (issue 10: a get pays the tier's lock and call layers once, not per
        block): ``read_many(keys, buffers_fors)`` (``get_many_into``) reads each
        codec-none object of the identity's size with its body straight into the
        block's row and verifies it (length + CRC32C: the one pass), then every
        header is checked together (``RawLayout.matching_rows``: layout,
        the guard's compare, header CRC).  Returns (index, pieces) of the blocks
        served; any other (a miss, another codec or size, a failed check, a
        mismatch) is left to ``_read_one``, which reads it again, decides and
        explains; a refused block's row is zeroed first (its bytes do not stay in
        the caller's array).

        The batch is read in chunks of ``READ_CHUNK_BYTES``, by the get's own
        thread and the store's read helper together (``READ_HELPERS``), each
        taking the next chunk until none is left: reads (``preadv``) and
        CRC32C release the GIL, so two threads overlap their system calls and
        checks.  A chunk the helper has not started when the get's thread runs
        out is not waited for: the helper is shared by the store's gets.  A
        failure on either thread stops both from taking another chunk, and the
        get never returns while its helper may still write into ``rows`` or
        the sink.

        With a sink the blocks go through a chunk buffer each reading thread
        takes from the store's (``_take_chunk``), each chunk handed to the sink once checked,
        while its bytes are still in the CPU cache, one ``take`` at a time
        unless the sink's ``concurrent_take`` says its takes may overlap (a
        sink need not be thread-safe): 512 x 256 KiB read from files,
        CRC-checked and copied into a DynamicCache took 22.3-22.6 ms in chunks
        of 16 against 33.8-34.2 ms through a 128 MiB staging array, and 30.2 ms
        in chunks of 16 through the staging rows (a fresh region each chunk:
        the cache's lines are written back and refilled); with the helper,
        24.2-26.3 against 28.8-32.0 ms (interleaved, 2026-12-05)."""
        layout = _layout(ident)
        if len(todo) < READ_BATCH_MIN or rows.shape[1] != layout.raw_len:
            return []
        per = _chunk_blocks(layout.raw_len)
        parts = iter([todo[at:at + per] for at in range(0, len(todo), per)])
        next_lock = threading.Lock()
        # One take at a time, unless the sink says its takes of distinct blocks may overlap.
        take_lock = contextlib.nullcontext() if sink is not None and sink.concurrent_take else threading.Lock()
        stop = threading.Event()  # a failure on either thread: the other takes no new chunk

        def read_parts() -> list[tuple[int, list]]:
            """Chunks taken from ``parts`` until none is left, each read and
            checked into its rows (with a sink: the chunk buffer this thread took, then
            handed to the sink)."""
            buf = None if sink is None else self._take_chunk(layout.raw_len)
            chunk, good = (rows if buf is None else _rows_of(buf, layout.raw_len)), []
            try:
                while not stop.is_set():
                    with next_lock:
                        part = next(parts, None)
                    if part is None:
                        break
                    got = self._read_rows(ident, layout, keys, parents, skeys, part, chunk,
                                          part if sink is None else range(len(part)), read_many, what)
                    if got and sink is not None:
                        with take_lock:
                            sink.take(chunk, 0, [j for j, _ in got], [part[j] for j, _ in got])
                    good += [(part[j], pieces) for j, pieces in got]
            except BaseException:
                stop.set()
                raise
            finally:
                if buf is not None:
                    self._give_chunk(buf)
            return good

        helper = self._read_helper().submit(read_parts) if READ_HELPERS and len(todo) > per else None
        try:
            good = read_parts()
        finally:
            # Not started yet (another get's chunks hold the helper): nothing left for it.  Running:
            # it may be writing into the sink, so never return before it ends.
            if helper is not None and not helper.cancel():
                wait_all([helper])
        return good + (helper.result() if helper is not None and not helper.cancelled() else [])

    def _read_helper(self) -> ThreadPoolExecutor:
        """The thread that reads a batch's chunks beside the get's own
        (``_read_batch``), made on first use."""
        with self._lock:
            if self._read_pool is None:
                self._read_pool = started_pool(READ_HELPERS, "quiver-read")
            return self._read_pool

    def _read_rows(self, ident: CacheIdentity, layout: RawLayout, keys: list, parents: list, skeys: list,
                   todo: list[int], rows: np.ndarray, places, read_many, what: str) -> list[tuple[int, list]]:
        """``_read_batch``'s read and check of blocks ``todo``, block ``todo[j]``
        into ``rows[places[j]]``; returns (j, pieces) of the blocks served."""
        heads = np.empty((len(todo), layout.header_len), dtype=np.uint8)
        total = layout.total_len
        buffers_fors = [lambda length, head=heads[j], row=rows[p]: ([head, row, bytearray(4)] if length == total
                                                                    else None)
                        for j, p in enumerate(places)]
        with translated(what):
            got = read_many([skeys[i] for i in todo], buffers_fors)
        read = [j for j, pieces in enumerate(got) if pieces is not None]
        if not read:
            return []
        ok = layout.matching_rows(heads[read], self._guard_ids(ident, keys, parents, [todo[j] for j in read]))
        good = []
        for j, fits in zip(read, ok):
            if fits:
                good.append((j, got[j]))
            else:
                rows[places[j]].fill(0)
        return good

    def _take_chunk(self, raw_len: int) -> np.ndarray:
        """An idle buffer of at least one chunk (``_chunk_blocks``) for one thread's
        chunked reads into a sink (``_read_batch``), taken from the store's
        (a fresh one pays its page faults inside the get: in this VM ~2 ms
        per MiB, 9 of a vLLM restart's first 15 ms load; ``prepare_reads``
        makes them beforehand); give it back with ``_give_chunk``."""
        need = _chunk_blocks(raw_len) * raw_len
        with self._chunks_lock:
            for i, buf in enumerate(self._chunks):
                if buf.nbytes >= need:
                    return self._chunks.pop(i)
        return empty_huge((need,))

    def _give_chunk(self, buf: np.ndarray) -> None:
        """A buffer back to the idle ones, which keep one per thread that reads a
        batch: the largest (a prepared buffer is not dropped for a smaller one)."""
        with self._chunks_lock:
            self._chunks.append(buf)
            if len(self._chunks) > 1 + READ_HELPERS:
                del self._chunks[min(range(len(self._chunks)), key=lambda i: self._chunks[i].nbytes)]

    @_operation
    def prepare_reads(self, block_nbytes: int) -> None:
        """Make, now, what a get of blocks of ``block_nbytes`` payload bytes
        into a ``BlockSink`` makes on first use: a chunk buffer per reading
        thread, its pages touched, and the read helper's thread.  For an
        engine's start-up (the vLLM connector calls it when it registers its
        KV caches), so that the first request after a restart does not pay
        them: a first 16-block load from L1 in a fresh vLLM process took
        14.8-15.9 ms with them inside it, 4.4-5.5 ms without (2026-12-05).
        Optional: a store never prepared makes them on its first such get."""
        if isinstance(block_nbytes, bool) or not isinstance(block_nbytes, int) or block_nbytes <= 0:
            raise StoreConfigError(f"block_nbytes must be a positive int, got {block_nbytes!r}")
        self._check_open()
        bufs = [self._take_chunk(block_nbytes) for _ in range(1 + READ_HELPERS)]
        for buf in bufs:
            buf.fill(0)  # the page faults, here
            self._give_chunk(buf)
        if READ_HELPERS:
            self._read_helper()

    def _guard_ids(self, ident: CacheIdentity, keys: list, parents: list, idx: list[int]) -> np.ndarray | None:
        """The guard's identity fields (fingerprint, key, parent) of blocks ``idx``,
        one row each, for ``RawLayout.matching_rows``; None when the guard is off."""
        if not self.guard:
            return None
        return np.frombuffer(b"".join(ident.fingerprint + keys[i] + parents[i] for i in idx),
                             dtype=np.uint8).reshape(len(idx), -1)

    def _decode(self, buf, want, dst, ident: CacheIdentity, verify_body: bool) -> None:
        """Guard (identity fields, then lossiness), then verify and decode.

        The header CRC is always checked; the whole-envelope CRC only where
        ``verify_body`` (bytes that did not just pass a CRC over the same bytes:
        docs/FORMAT.md, "What each read verifies").  Lossy int8 envelopes are
        decodable only for an identity with kv_quant set; an exact identity's
        decode refuses codec int8 even with guard=False."""
        if self.guard:
            guard_envelope(buf, want)
            _guard_codec(buf, ident)
        if not decode_raw_into(buf, dst, _layout(ident), verify_body=verify_body):
            decode_block_into(buf, dst, allow_lossy=ident.kv_quant is not None, verify_body=verify_body)

    @staticmethod
    def _read_buffers(ident: CacheIdentity, dst):
        """Where an L1 or local-directory L2 read of a block for ``dst`` lands
        (``DiskTier.get_into``, ``ObjectStore.get_into``): an object of the size
        the identity's codec-none envelope has is read in three pieces, header,
        body straight into ``dst`` and trailing CRC (the payload is copied once,
        by the kernel); any other size (lz4, zstd, int8) into one buffer,
        decoded from there."""
        head_len = _layout(ident).header_len
        body = raw_view(dst)

        def buffers_for(length: int) -> list:
            if length == head_len + body.nbytes + 4:
                return [bytearray(head_len), body, bytearray(4)]
            return [bytearray(length)]
        return buffers_for

    def _decode_pieces(self, pieces: list, want, dst, ident: CacheIdentity, verify_body: bool = False) -> None:
        """``_decode`` of an L1 or L2 read (``_read_buffers``), whose bytes passed
        walpub's or the directory's CRC: a body read into ``dst`` is checked in
        place (its header guarded and verified); anything else (also S3's one
        piece, whose body is verified where ``verify_body``) is decoded from the
        bytes read."""
        if len(pieces) == 3:
            head, body = pieces[0], pieces[1]
            try:
                if self.guard:
                    guard_envelope(head, want)
                    _guard_codec(head, ident)
                if body_in_place(head, dst, allow_lossy=ident.kv_quant is not None, layout=_layout(ident)):
                    return
            except Exception:
                body.fill(0)  # a refused block's bytes do not stay in the caller's array
                raise
            pieces = [b"".join(pieces)]  # a same-sized envelope of another codec: decode it
        self._decode(pieces[0], want, dst, ident, verify_body=verify_body)

    def _start_l2_reads(self, ident: CacheIdentity, blocks: Iterable[tuple[int, bytes]],
                        dsts) -> dict[int, Future | None]:
        """The blocks of a get, (index, key), that neither L0 nor L1's index
        holds, by index: each with its L2 read started (into ``dsts[index]``),
        where the L2's reads wait on a network (``ObjectStore.concurrent_reads``),
        so n blocks cost about one round trip per ``L2_READS_IN_FLIGHT``, not n
        (issue 10); else None, read on the get's own thread.  A local directory
        is read there, as L1 is: on this machine a read pool made its 256 KiB
        gets ×1.5–2.2 slower (the threads contend for the GIL between their
        system calls) and its 2 MiB gets under 10% faster.  ``_read_one`` takes
        each result through the same checks as a read it makes itself; the get
        cancels the reads not started and waits for the rest before it returns
        (a read may write into its caller's array)."""
        l2 = self._l2
        if l2 is None:
            return {}
        with self._lock:
            ram = self._ram
        maybe = [(i, sk) for i, sk in blocks if not (ram is not None and ram.contains(sk))]
        in_l1 = self._disk.contains_many([sk for _, sk in maybe]) if maybe else []  # one index call
        wanted = [block for block, held in zip(maybe, in_l1) if not held]
        if not l2.concurrent_reads or len(wanted) < 2:  # read on the get's thread: no destination view made here
            return {i: None for i, _ in wanted}
        with self._lock:
            if self._l2_pool is None:
                self._l2_pool = started_pool(L2_READS_IN_FLIGHT, "quiver-l2-read")
            pool = self._l2_pool
        return {i: pool.submit(self._l2_read, l2, sk, ident, dsts[i]) for i, sk in wanted}

    def _l2_read(self, l2, skey: bytes, ident: CacheIdentity, dst) -> list | None:
        """An L2 block's verified bytes in pieces (``ObjectStore.get_into``): a
        local directory's codec-none envelope with its body read straight into
        ``dst`` (``_read_buffers``), anything else whole."""
        return l2.get_into(skey, self._read_buffers(ident, dst))

    def drain_promotions(self) -> None:
        """Return once the hits of the gets that returned before this call are
        promoted: L2 hits in L1 and L0, L1 hits in L0 (a get promotes them in
        the background: engine/promoter.py)."""
        self._check_open()
        self._promoter.drain()
        self._l0_promoter.drain()

    def _promote_now(self, items: list[tuple[bytes, bytes]]) -> None:
        """Copy verified L2 hits into L1 with one publish_many (one WAL group
        commit for the whole get, not an fsync'd publish per block); run by the
        promoter's thread, or by a get when the promoter's queue is full.

        Promotion is an optimisation: its failure never fails the get (nor
        replaces the get's own error); it is counted (``l1_promote_failures``)
        and logged, and the blocks stay in L2."""
        if not items:
            return
        try:
            if any(isinstance(env, FromL2) for _, env in items):  # read into a caller's array: read again
                with translated("L2 get (promotion)"):
                    items = [(sk, self._l2.get(sk) if isinstance(env, FromL2) else env) for sk, env in items]
                items = [(sk, env) for sk, env in items if env is not None]  # gone from L2 since: nothing to copy
            self._disk_put_many(items, "disk tier put (promotion)")
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the cause (typed or not)
            with self._lock:
                self._n["l1_promote_failures"] += 1
            logging.getLogger("quiver.engine.store").warning("promoting %d L2 hit(s) to L1 failed: %s", len(items), exc)
        for skey, env in items:  # then L0, from the bytes in hand (verified when the get read them)
            if not isinstance(env, FromL2):
                self._ram_put(skey, [env])

    def _promote_l0_now(self, items: list[tuple[bytes, FromL1]]) -> None:
        """Copy L1 hits into L0: each read from L1 again straight into a reserved
        L0 slot on walpub's fast path (``get_many_into``: one lock, length and
        CRC32C checked, no side effect) and committed only if that read
        verified.  Run by the L0 promoter's thread, or by a get when its queue
        is full.  Best effort, as L1 promotion: a block already in L0 is
        skipped; one gone from L1 since, changed or damaged is not copied (the
        next get that reads it from L1 decides); an error is counted
        (``l0_promote_failures``) and logged, never raised."""
        slots = [(skey, item.nbytes, self._l0_reserve(skey, item.nbytes)) for skey, item in items]
        slots = [(skey, nbytes, slot) for skey, nbytes, slot in slots if slot is not None]
        got: list = [None] * len(slots)
        try:
            with translated("disk tier get (promotion)"):
                got = self._disk.get_many_into(
                    [skey for skey, _, _ in slots],
                    [lambda n, want=nbytes, slot=slot: [slot] if n == want else None for _, nbytes, slot in slots])
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the cause (typed or not)
            with self._lock:
                self._n["l0_promote_failures"] += 1
            logging.getLogger("quiver.engine.store").warning("promoting %d L1 hit(s) to L0 failed: %s", len(slots), exc)
        finally:
            self._l0_finish([skey for (skey, _, _), pieces in zip(slots, got) if pieces is not None], commit=True)
            self._l0_finish([skey for (skey, _, _), pieces in zip(slots, got) if pieces is None], commit=False)

    def _read_one(self, skey: bytes, want, dst, ident: CacheIdentity, pin: tuple | None, from_l2: list,
                  from_l1: list, l2_read: Future | None = None, l1_lacks: bool = False) -> tuple[str, float]:
        """One block from the fastest tier holding it, verified, into ``dst``;
        (tier, seconds) of the read.  Queues it for the tiers above (an L1 hit
        appended to ``from_l1`` for L0, an L2 hit to ``from_l2`` for L1 and
        L0).  ``pin``: its L0 slot pinned by the get (``RamTier.pin_many``), or
        None; ``l1_lacks``: L1's index lacked it when the get began;
        ``l2_read``: its L2 read, started then (``_start_l2_reads``)."""
        corrupt: EnvelopeError | None = None
        t0 = time.perf_counter()
        if pin is not None:  # the slot is not reused until the get unpins it: decode outside any lock
            try:  # the arena holds bytes verified (or encoded) on their way in: header only
                self._decode(self._ram.pinned_view(*pin), want, dst, ident, verify_body=False)
            except EnvelopeError as exc:
                corrupt = exc
                self._ram.delete(skey)
                with self._lock:
                    self._n["corrupt_l0"] += 1
            else:
                return "l0", time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            with translated("disk tier get"):
                # A block L1's index lacked when the get began: its L2 read, if started,
                # may be writing into dst, so it is waited for; L1 is asked only when that
                # read found nothing and the block arrived in L1 since (not the stat of L1's
                # miss path: the L2 read decides).
                skip = (l2_read is not None and _found(l2_read)) or (l1_lacks and not self._disk.contains(skey))
                pieces = None if skip else self._disk.get_into(skey, self._read_buffers(ident, dst))
        except ChecksumMismatchError as exc:  # walpub dropped the record already
            corrupt, pieces = exc, None
            raw_view(dst).fill(0)  # the refused bytes may have been read into it
            with self._lock:
                self._n["corrupt_l1"] += 1
        if pieces is not None:
            try:  # walpub checked length + CRC32C of these very bytes: one pass is enough
                self._decode_pieces(pieces, want, dst, ident)
            except EnvelopeError as exc:  # walpub's CRC passed, the envelope's header did not
                corrupt = exc
                with translated("disk tier delete"):
                    self._disk.delete(skey)
                with self._lock:
                    self._n["corrupt_l1"] += 1
            else:
                from_l1.append((skey, FromL1(sum(memoryview(p).nbytes for p in pieces))))
                return "l1", time.perf_counter() - t1
        if self._l2 is not None:
            t2 = time.perf_counter()
            try:
                with translated("L2 get"):
                    pieces = l2_read.result() if l2_read is not None else self._l2_read(self._l2, skey, ident, dst)
            except ChecksumMismatchError as exc:
                corrupt, pieces = exc, None
                raw_view(dst).fill(0)  # the refused bytes may have been read into it
                with self._lock:
                    self._n["corrupt_l2"] += 1
            if pieces is not None:
                try:  # unless the tier checked a CRC over these very bytes (S3 metadata is optional)
                    self._decode_pieces(pieces, want, dst, ident, verify_body=not self._l2.verifies_reads)
                except EnvelopeError as exc:
                    with self._lock:
                        self._n["corrupt_l2"] += 1
                    raise type(exc)(f"L2 copy of block {skey[16:24].hex()}: {exc}") from exc
                with self._lock:
                    self._pub.known.add(skey)
                # A body read into dst is the caller's once we return: the promoter reads it again.
                from_l2.append((skey, pieces[0] if len(pieces) == 1
                                else FromL2(sum(memoryview(p).nbytes for p in pieces))))
                return "l2", time.perf_counter() - t2
            with self._lock:
                self._pub.known.discard(skey)
        with self._lock:
            self._n["misses"] += 1
        if corrupt is not None:
            raise type(corrupt)(f"block {skey[16:24].hex()}: every copy found was corrupt ({corrupt})") from corrupt
        raise BlockNotFoundError(f"block {skey[16:24].hex()} is in no tier (lookup says how many are)")

    # ------------------------------------------------------------------ misc
    #: stats()["gauges"]: values that go up and down (the rest of _n only counts up).

    _GAUGES = ("bootstrap_keys",)

    def stats(self) -> dict:
        """This handle's numbers as plain data (``json.dumps`` takes it): docs/STORE.md,
        "Stats and metrics", has the schema.  engine.metrics exports it to Prometheus.

        ``counters`` only go up (since open); ``gauges`` are current levels;
        ``residency`` the blocks each tier holds; ``config`` the options in use
        and where each came from; ``tiers`` each tier's own stats (None where a
        tier is absent); ``latency`` histograms per operation and tier."""
        with self._lock:
            counters = dict(self._n)
            gauges = {k: counters.pop(k) for k in self._GAUGES}
            gauges.update(self._pub.gauges())
            residency = {"l0": len(self._ram) if self._ram is not None else 0,
                         "l1": len(self._disk) if self._disk is not None else 0,
                         "l2": len(self._pub.known)}  # L2: the keys known to be there
            l0 = dataclasses.asdict(self._ram.stats()) if self._ram is not None else None
            latency = latency_snapshot(self._lat)
        promoted = self._promoter.counts_snapshot()
        counters.update(l1_promoted_blocks=promoted["blocks"], l1_promote_batches=promoted["batches"],
                        l1_promote_inline=promoted["inline_batches"])
        gauges["l1_promote_queued_bytes"] = promoted["queued_bytes"]
        promoted = self._l0_promoter.counts_snapshot()
        counters.update(l0_promoted_blocks=promoted["blocks"], l0_promote_batches=promoted["batches"],
                        l0_promote_inline=promoted["inline_batches"])
        gauges["l0_promote_queued_bytes"] = promoted["queued_bytes"]
        config = dict(self._config, index=self.index, guard=self.guard, naive=self.naive)
        disk, l2 = self._disk, self._l2  # close() may clear them meanwhile
        l1 = dataclasses.asdict(disk.stats()) if disk is not None else None
        l2s = None
        if l2 is not None:
            l2s = l2.stats()
            l2s["attached"] = self._pub.attached
        return {"counters": counters, "gauges": gauges, "residency": residency, "config": config,
                "tiers": {"l0": l0, "l1": l1, "l2": l2s}, "latency": latency}


    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"BlockStore({self.path!r}) is closed")

    def close(self, l2_timeout_s: float = 30.0) -> None:
        """Drain the L2 queue (bounded), write the manifest, close the tiers, unlock.

        From the moment close begins, new calls raise StoreClosedError; the
        calls already in progress on other threads are waited for (each is
        bounded by its tiers' timeouts) before anything is closed under them.
        Must not be called from inside a store call."""
        with self._ops_cv:
            if self._closing:
                return
            self._closing = True
            while self._ops:
                self._ops_cv.wait()
        try:
            if self._l2 is not None:
                # l2_timeout_s bounds all of close's L2 work: this flush, then the
                # worker's and the prober's last calls (_release_everything).
                if l2_timeout_s is not None:
                    self._pub.set_close_budget(l2_timeout_s)
                try:
                    self._flush_l2(timeout_s=l2_timeout_s)
                except QuiverError:
                    pass
        finally:
            self._closed = True
            self._release_everything()

    def _release_everything(self) -> None:
        """Stop the L2 worker and close L2, then close L1, then unlock.  L1 is
        closed whatever the L2 part raised, and the store's lock is released
        whatever anything raised (a full disk failing the ART snapshot at close
        must not leave the store unopenable by this process).  Only typed errors
        come out: an untyped one becomes StoreIOError, its cause chained."""
        server, self._metrics_server = self._metrics_server, None
        if server is not None:  # first: no scrape runs while the tiers close
            server.shutdown()
            server.server_close()
        try:
            try:
                self._promoter.stop()  # the queued promotions reach L1 (and L0) before it closes
                self._l0_promoter.stop()  # it reads L1
                self._pub.stop_worker()
                self._pub.stop_pool()  # after the worker, its last user
                for pool in (self._l2_pool, self._read_pool):  # no get is running (close waited): idle threads
                    if pool is not None:
                        pool.shutdown(wait=True, cancel_futures=True)
                self._l2_pool = self._read_pool = None
                if self._l2 is not None:
                    self._pub.stop_prober()
                    self._pub.save_pending()
                    self._l2.close()
                    self._l2 = None
            finally:
                if self._disk is not None:
                    try:
                        with translated("closing disk tier"):
                            self._disk.close()
                    finally:
                        self._disk = None
                self._ram = None
                self._chunks = []
        except QuiverError:
            raise
        except Exception as exc:  # noqa: BLE001 - typed on the way out, cause chained
            raise StoreIOError(f"closing {self.path}: {exc!r}") from exc
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BlockStore({self.path!r}, index={self.index!r}, l2={self._l2!r}, guard={self.guard})"


__all__ = ["BlockStore", "naive_chain_keys", "envelope_bound", "TIERS"]
