"""The L2 publisher: getting blocks that are durable in L1 into the object store (L2).

The BlockStore facade (engine.store) owns one :class:`L2Publisher` and
delegates to it everything about *publishing* to L2 and about L2's
availability:

* the keys owed to L2 -- the owed set, the retry list, and their durable
  record PENDING_L2 (the file itself is engine.owed_journal.OwedJournal);
* publishing: synchronously from a put's envelopes (``l2_mode="sync"``), or
  by the background worker thread from a bounded queue of keys whose bytes it
  reads back from L0/L1 (``"background"``); retries; manifests;
* attaching L2 (probe + manifest bootstrap) and the prober thread that finds
  a down L2 again, and the L2 part of close (worker, prober, journal).

Reads from L2 (lookup's HEAD, get's GET) stay in the facade; they share with
the publisher the set of keys known to be in L2 (:attr:`L2Publisher.known`).

The publisher shares the facade's lock (an RLock guarding counters, latency
histograms and the key sets here), its counters dict and latency histograms,
and reads what else it needs through the callables it is given: the local
copy of a key (L0, else L1), the disk tier (None once closed), whether the
store is closing / closed, and the store's repr for log records (which go to
the "quiver.engine.store" logger, as before the split).  Those callables hold
the store weakly; once L2 is configured (:meth:`L2Publisher.start`) the
publisher holds the store itself, as L2's threads always kept it alive.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable

from quiver.engine.error_map import os_errors, translated
from quiver.engine.errors import ObjectStoreUnreachableError, QuiverError
from quiver.engine.owed_journal import OwedJournal
from quiver.engine.pools import started_pool

_log = logging.getLogger("quiver.engine.store")

#: L2 uploads kept in flight together: a sync put's blocks, and the background
#: worker's (up to this many keys taken from its queue at a time).  One at a time,
#: a put of n blocks paid n round trips: with 30 ms added to each request of a
#: loopback moto, a vLLM engine's 32-block saves took 1.3-1.4 s each (p50), its
#: save queue filled and the loads that waited for those saves took 0.45-0.95 s
#: (2026-12-05).  botocore's default pool holds 10 connections.
L2_PUTS_IN_FLIGHT = 8


class L2Publisher:
    """Publishes L1-durable blocks to L2 and keeps L2 attached (see the module docstring)."""

    #: Budget of the manifest read that bootstraps the L2 key set at attach.
    L2_BOOTSTRAP_TIMEOUT_S = 20.0

    def __init__(self, *, describe: Callable[[], str], journal: OwedJournal, journal_slack_keys: int,
                 lock: threading.RLock, counters: dict, latency: dict,
                 local_envelope: Callable[[bytes], bytes | None], disk: Callable[[], Any],
                 is_closing: Callable[[], bool], is_closed: Callable[[], bool], l2_mode: str,
                 queue_max: int, enqueue_timeout_s: float, retry_interval_s: float, manifest_batch: int) -> None:
        self._describe = describe  # the store's repr, for log messages
        self._owner: object = None  # the store, held while L2 is configured (see start)
        self._lock = lock
        self._n = counters
        self._lat = latency
        self._local_envelope = local_envelope
        self._disk = disk
        self._is_closing = is_closing
        self._is_closed = is_closed
        self.l2_mode = l2_mode
        self._l2_queue_max = queue_max
        self._enqueue_timeout = enqueue_timeout_s
        self._retry_interval = retry_interval_s
        self._manifest_batch = manifest_batch
        self._l2 = None
        self.worker: threading.Thread | None = None
        self._put_pool = None  # the uploads in flight (made on first use: a store with no L2 makes none)
        self._put_pool_lock = threading.Lock()
        self._stop = threading.Event()
        self.queue: queue.Queue | None = None
        self.retry: dict[bytes, None] = {}  # keys durable in L1 whose L2 publish failed
        # Keys recorded in PENDING_L2 and not yet known to be in L2 (a superset of
        # retry: also queued and in-flight ones).  _journal_lock orders the file's
        # appends and rewrites; the dict itself is guarded by the lock.
        self.owed: dict[bytes, None] = {}
        self._journal_lock = threading.Lock()
        self.journal = journal
        self._journal_slack = journal_slack_keys
        self._manifest_pending: list[bytes] = []
        # Keys known to be in L2 (its manifests, our publishes, HEAD/GET hits): L2's
        # own membership, so a put skips re-publishing.  L1 membership is L1's
        # residency index alone; L0's is the RAM tier's.
        self.known: set[bytes] = set()
        self.bootstrap_s = 0.0
        self.attached = False
        self._bootstrap = True
        self._prober: threading.Thread | None = None
        self._probe_lock: threading.Lock | None = None
        self._probe_stop: threading.Event | None = None
        self._close_by: float | None = None

    def _observe(self, op: str, tier: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        with self._lock:
            self._lat[op][tier].observe(dt)

    # ------------------------------------------------------------------ attaching L2
    # L2's circuit breaker (tier.objectstore.CircuitBreaker, fed by the S3 retry
    # loop) makes calls fail fast while L2 does not answer.  Its half-open trials
    # are made here, by a prober thread that exists only while L2 is down (or not
    # yet attached): callers are never the trial, so none of them waits on a hung
    # L2 once the breaker is open.  "Attached" = L2 answered once and, with
    # bootstrap, its manifests were read; open attaches when L2 answers within
    # the probe budget, else the prober does it later.  docs/STORE.md, "L2 down".
    def start(self, l2, bootstrap: bool, owner: object) -> None:
        """At open, with L2 just opened: reload PENDING_L2, attach (bounded), start the worker.

        ``owner`` (the store) is held from now on: the worker and prober reach
        it through the callables given at construction, and it must outlive them."""
        self._owner = owner
        self._l2 = l2
        self._bootstrap = bootstrap
        self._probe_lock = threading.Lock()
        self._probe_stop = threading.Event()
        self._n.update(l2_attach_failures=0)
        # While L2 does not answer, calls to it fail fast; the trials that
        # find it back are made by our prober thread, never by a caller.
        l2.breaker.caller_trials = False
        l2.breaker.on_open = self.wake_prober
        self.load_pending()
        self.attach(l2, at_open=True)  # bounded; down -> open on L0/L1, attach later
        if self.l2_mode == "background":
            self.queue = queue.Queue(maxsize=self._l2_queue_max)
            self.worker = threading.Thread(target=self._worker_loop, name="quiver-l2", daemon=True)
            self.worker.start()

    def attach(self, l2, at_open: bool = False) -> bool:
        """Probe L2 (bounded by the breaker's probe budget) and, the first time
        it answers, read its manifests.  True when attached.  At open an auth,
        config or request error still fails the open (L2 answered: it is
        misconfigured, not down); "not answering" never does: the breaker is
        tripped (one WARNING), the store runs on L0/L1 and the prober retries."""
        try:
            self._probe_and_bootstrap(l2, at_open)
            return True
        except ObjectStoreUnreachableError as exc:
            reason = exc
        except QuiverError as exc:
            if at_open:
                raise
            reason = exc
        except Exception as exc:  # noqa: BLE001 - the prober must survive anything (e.g. closed under it)
            if at_open:
                raise
            reason = exc
        if self._probe_stop.is_set():  # closing: L2 may have been closed under the prober
            return False
        with self._lock:
            self._n["l2_attach_failures"] += 1
        l2.breaker.trip(f"{type(reason).__name__}: {reason}")  # the one WARNING of this outage
        if at_open:
            _log.info("%s opened on its local tiers: L2 is not answering; puts journal what L2 is owed, "
                      "L2 is attached when a probe succeeds", self.journal_dir)
            self.wake_prober()
        return False

    @property
    def journal_dir(self) -> str:
        """The store's directory (where PENDING_L2 lives)."""
        return os.path.dirname(self.journal.path)

    def _probe_and_bootstrap(self, l2, at_open: bool) -> None:
        """One probe; the first time L2 answers, its manifests seed :attr:`known`."""
        from quiver.tier.objectstore import deadline

        with translated("L2 probe"), deadline(l2.breaker.policy.probe_timeout_s):
            l2.probe()
        if self.attached:
            return
        # L2 answered the probe: deciding its layout reads its state, as the manifests read does,
        # under that budget (RGW's first HEAD on a new bucket took the probe's whole 2 s in a study
        # run, and a store that answers slowly is not down); the marker's write has the probe's.
        with translated("L2 layout"), deadline(self.L2_BOOTSTRAP_TIMEOUT_S):
            l2.settle_naming()  # a miss asks one name where no block can have the legacy one
        if self._bootstrap:
            t0 = time.perf_counter()
            with translated("reading L2 manifests"), deadline(self.L2_BOOTSTRAP_TIMEOUT_S):
                known = l2.read_manifests()
            with self._lock:
                self.known.update(known)
                self._n["bootstrap_keys"] = len(known)
            self.bootstrap_s = time.perf_counter() - t0
        self.attached = True
        if not at_open:
            _log.info("%s: L2 attached (%d keys from its manifests)", self._describe(), self._n["bootstrap_keys"])

    def wake_prober(self) -> None:
        """L2's breaker opened (or L2 is not attached): make sure the prober runs."""
        lock = self._probe_lock
        if lock is None:
            return
        with lock:
            if self._is_closing() or self._probe_stop.is_set() or self._prober is not None:
                return
            self._prober = threading.Thread(target=self._probe_loop, args=(self._l2,),
                                            name="quiver-l2-probe", daemon=True)
            self._prober.start()

    def _probe_loop(self, l2) -> None:
        """Wait out the breaker's cool-down, probe (and attach), until L2 answers."""
        breaker, stop = l2.breaker, self._probe_stop
        done = False
        try:
            while not done and not stop.wait(max(breaker.retry_in(), 0.001)):
                ok = self.attach(l2)
                with self._probe_lock:  # decided under the lock wake_prober takes
                    if ok and self.attached and breaker.state == breaker.CLOSED:
                        self._prober = None
                        done = True
        finally:
            if not done:
                with self._probe_lock:
                    if self._prober is threading.current_thread():
                        self._prober = None

    def stop_prober(self) -> None:
        """At close: stop the prober (its probe is bounded; waited for within close's budget)."""
        stop = self._probe_stop
        if stop is None:
            return
        with self._probe_lock:
            stop.set()
            prober = self._prober
        if prober is not None:
            prober.join(timeout=self.left(5.0))

    def set_close_budget(self, timeout_s: float) -> None:
        """close() began: all of its L2 work ends within ``timeout_s`` from now."""
        self._close_by = time.monotonic() + max(0.0, timeout_s)

    def left(self, default: float) -> float:
        """Seconds left of close's L2 budget (``default`` outside close)."""
        if self._close_by is None:
            return default
        return max(0.05, self._close_by - time.monotonic())

    def health(self) -> dict:
        """L2's availability: configured, attached (answered once; manifests read),
        the circuit breaker's state and counters."""
        l2 = self._l2
        if l2 is None:
            return {"configured": False}
        br = l2.breaker
        return {"configured": True, "attached": self.attached, "breaker": br.state,
                "outages": br.counts["outages"], "refused": br.counts["refused"],
                "failures": br.counts["failures"], "last_failure": br.last_failure}

    def gauges(self) -> dict:
        """stats()["gauges"]'s L2 levels; the caller holds the lock."""
        return dict(l2_retry_pending=len(self.retry), l2_owed=len(self.owed), bootstrap_s=self.bootstrap_s,
                    l2_queue=self.queue.unfinished_tasks if self.queue is not None else 0)

    # ------------------------------------------------------------------ publishing
    def publish_sync(self, todo: list[tuple[bytes, Any]]) -> None:
        """Publish a put's envelopes now (l2_mode "sync"), up to
        L2_PUTS_IN_FLIGHT at a time; the ones that failed go on the retry list
        and the first failure's typed error is raised, saying how many."""
        failed = [(sk, exc) for sk, exc in self._in_flight(self._publish, todo) if exc is not None]
        if failed:
            with self._lock:
                for sk, _ in failed:
                    self.retry[sk] = None
                self._n["l2_failures"] += 1
            exc = next((e for _, e in failed if isinstance(e, QuiverError)), failed[0][1])
            if not isinstance(exc, QuiverError):
                raise exc
            raise type(exc)(
                f"{exc} -- {len(failed)} block(s) are durable in L1 but not yet in L2; "
                f"they are retried by flush_l2()"
            ) from exc
        self._maybe_write_manifest(force=False)

    def _in_flight(self, fn, items: list[tuple]) -> list[tuple[bytes, BaseException | None]]:
        """``fn(*item)`` for every item, up to L2_PUTS_IN_FLIGHT at once (the
        calling thread waits for all: a put's envelopes may be L0 slots, reused
        once it returns); (the item's key, what it raised or None) per item, in order."""
        if len(items) <= 1:
            out = []
            for item in items:
                try:
                    fn(*item)
                    out.append((item[0], None))
                except Exception as exc:  # noqa: BLE001 - the caller decides
                    out.append((item[0], exc))
            return out
        with self._put_pool_lock:
            if self._put_pool is None:
                self._put_pool = started_pool(L2_PUTS_IN_FLIGHT, "quiver-l2-put")
            pool = self._put_pool
        futures = [pool.submit(fn, *item) for item in items]
        return [(item[0], fut.exception()) for item, fut in zip(items, futures)]

    def stop_pool(self) -> None:
        """At close, after the worker: no upload is started any more.  A try still
        running (the worker's, left to finish on its own) is not waited for."""
        with self._put_pool_lock:
            pool, self._put_pool = self._put_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def enqueue(self, skeys: list[bytes]) -> None:
        """Hand keys to the background worker; what the bounded queue refuses is deferred to a retry."""
        for i, sk in enumerate(skeys):
            try:
                self.queue.put(sk, timeout=self._enqueue_timeout)
            except queue.Full:
                with self._lock:  # the bytes stay in L1; published by a later retry
                    for k in skeys[i:]:
                        self.retry[k] = None
                    self._n["l2_deferred"] += len(skeys) - i
                return

    def retry_owed(self, skeys: list[bytes]) -> None:
        """A put failed before L1 held everything: its still-owed keys go on the retry
        list, where flush_l2 settles each (published if a local tier has it, else lost)."""
        with self._lock:
            for sk in skeys:
                if sk in self.owed:
                    self.retry[sk] = None

    def _publish(self, skey: bytes, env) -> None:
        t0 = time.perf_counter()
        try:
            with translated("L2 put"):
                created = self._l2.put(skey, env)
        except BaseException:
            self._observe("put", "l2", t0)  # a failed try's time counts too (a hung L2 shows here)
            raise
        with self._lock:
            self._lat["put"]["l2"].observe(time.perf_counter() - t0)
            self.known.add(skey)
            self._n["l2_published" if created else "l2_existing"] += 1
            self.retry.pop(skey, None)
            self.owed.pop(skey, None)
            self._manifest_pending.append(skey)

    def _publish_local(self, skey: bytes) -> str:
        """Publish ``skey`` from its local copy (L0, else L1): "published"; "failed"
        (L2 failed, the key is on the retry list); or "lost": no local tier holds
        it any more (evicted first, or a put that crashed before L1), so it is
        dropped and counted as ``l2_lost``."""
        env = self._local_envelope(skey)
        if env is None:
            with self._lock:
                self.retry.pop(skey, None)
                self.owed.pop(skey, None)
                self._n["l2_lost"] += 1
            return "lost"
        try:
            self._publish(skey, env)
        except QuiverError:
            with self._lock:
                self.retry[skey] = None
                self._n["l2_failures"] += 1
            return "failed"
        return "published"

    def _maybe_write_manifest(self, force: bool) -> None:
        with self._lock:
            if not self._manifest_pending or (not force and len(self._manifest_pending) < self._manifest_batch):
                return
            batch, self._manifest_pending = self._manifest_pending, []
        try:
            with translated("L2 manifest"):
                self._l2.write_manifest(batch)
        except QuiverError:
            with self._lock:  # a manifest is a hint: keep the keys for the next try
                self._manifest_pending[:0] = batch
                self._n["manifest_failures"] += 1
            return
        with self._lock:
            self._n["manifests_written"] += 1
        try:  # the L1 records of these keys say so too: survives a restart without a manifest read
            with translated("disk tier mark"):
                self._disk().mark_in_l2(batch)
        except QuiverError:
            pass  # a hint only

    def _worker_loop(self) -> None:
        """Background publisher: the queue holds store keys; the bytes are read back
        from L0/L1 (so the queue costs no memory per envelope).  Up to
        L2_PUTS_IN_FLIGHT keys already queued are published together."""
        q = self.queue
        while True:
            try:
                batch = [q.get(timeout=self._retry_interval)]
            except queue.Empty:
                if not self._stop.is_set():
                    if not self._worker_step(lambda: (self._retry_pending(limit=64),
                                                      self._maybe_write_manifest(force=True))):
                        return
                continue
            while batch[-1] is not None and len(batch) < L2_PUTS_IN_FLIGHT:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            keys = [sk for sk in batch if sk is not None]
            try:
                if keys and self._stop.is_set():  # closing: not published now, kept on the pending list
                    with self._lock:
                        for sk in keys:
                            self.retry[sk] = None
                elif keys and not self._worker_step(lambda: self._publish_local_many(keys)):
                    return
            finally:
                for _ in batch:
                    q.task_done()
            if batch[-1] is None:
                return
            if q.empty() and not self._stop.is_set():
                if not self._worker_step(lambda: self._maybe_write_manifest(force=False)):
                    return

    def _publish_local_many(self, keys: list[bytes]) -> None:
        """``_publish_local`` of each key, in flight together; anything it raised
        (not an L2 failure: those it counts and keeps) is raised here."""
        for _, exc in self._in_flight(self._publish_local, [(sk,) for sk in keys]):
            if exc is not None:
                raise exc

    def _worker_step(self, fn) -> bool:
        """Run one step of the worker; False when the store was closed under it
        (close's budget ran out while this step waited on L2: the tiers are gone,
        the step's keys are in PENDING_L2).  Anything else unexpected is logged,
        never the end of the worker."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the worker must outlive one bad step
            if self._is_closed():
                return False
            _log.warning("L2 worker step failed: %r", exc)
        return not self._is_closed()

    def _retry_pending(self, limit: int | None = None) -> int:
        """Publish keys whose L2 publish failed or was deferred, reading them from L0/L1.

        A key the L2 residency set already knows (a manifest lists it: e.g. a
        key reloaded from PENDING_L2 that was published before a crash) is
        dropped without a request (``l2_known``)."""
        with self._lock:
            keys = list(self.retry)[:limit]
            disk = self._disk()
            known = [sk in self.known or disk.in_l2(sk) for sk in keys]
            for sk, k in zip(keys, known):
                if k:
                    self.retry.pop(sk, None)
                    self.owed.pop(sk, None)
                    self._n["l2_known"] += 1
            keys = [sk for sk, k in zip(keys, known) if not k]
        breaker = self._l2.breaker
        for sk in keys:
            if breaker.state != breaker.CLOSED:
                break  # L2 is down (refused without a request): not even read back from L1
            outcome = self._publish_local(sk)
            if outcome == "failed":
                break  # the store is still failing: try again later
            if outcome == "published":
                with self._lock:
                    self._n["l2_retried"] += 1
        with self._lock:
            return len(self.retry)

    def flush(self, timeout_s: float | None) -> int:
        """Wait for the queue, retry failed publishes, write the manifest; how many
        keys are still not in L2.  One budget for all of it: each L2 try's
        timeouts are sized to what is left."""
        from quiver.tier.objectstore import deadline as l2_deadline

        with l2_deadline(timeout_s) as end:
            if self.queue is not None:
                while self.queue.unfinished_tasks:
                    if end is not None and time.monotonic() >= end:
                        break
                    time.sleep(0.005)
            left = self._retry_pending()
            self._maybe_write_manifest(force=True)
        with self._lock:
            return left + (self.queue.unfinished_tasks if self.queue is not None else 0)

    def stop_worker(self) -> None:
        """At close: tell the worker to stop and wait for it, within close's L2 budget."""
        if self.worker is None:
            return
        self._stop.set()
        try:
            self.queue.put(None, timeout=max(0.0, min(self._enqueue_timeout, self.left(30.0))))
        except queue.Full:
            pass  # the worker sees _stop after its current item
        # Bounded by close's budget: a worker stuck in an L2 try (bounded
        # itself) is left to finish on its own; its key stays owed.
        self.worker.join(timeout=self.left(30.0))
        self.worker = None

    # ------------------------------------------------------------------ pending L2 journal
    # PENDING_L2 holds the keys owed to L2: appended (and fsynced) by put
    # *before* L1 holds the blocks, so no crash -- during a put, with keys in the
    # background queue, after a failed publish -- loses the fact that L2 still
    # needs them (a later put would skip them: L1 has them).  Format: 48-byte
    # store keys back to back; a torn tail (len % 48) is cut off at open.
    # Publishing a key only removes it from memory; the file is rewritten (tmp,
    # fsync, rename, dir fsync) from the owed set when it holds more than
    # 2 x owed + journal_slack_keys keys, and at close (removed when nothing is
    # owed).  After a crash a key published since the last rewrite is reloaded:
    # dropped if a manifest lists it, else re-published (first writer wins: a no-op).
    # The file itself (format, fsyncs, torn tails) is engine/owed_journal.py, through
    # walpub's I/O layer so the crash simulator covers it.
    def load_pending(self) -> None:
        with self._journal_lock:
            with os_errors(f"cannot read {self.journal.path}"):
                keys = self.journal.load()  # cuts a torn tail of a crashed append
        for key in keys:
            self.retry[key] = None
            self.owed[key] = None

    def journal_owed(self, keys: list[bytes]) -> None:
        """Record ``keys`` durably in PENDING_L2 (one append, one fsync) before L1 holds them."""
        if not keys:
            return
        with self._journal_lock:
            with self._lock:
                fresh = [k for k in dict.fromkeys(keys) if k not in self.owed]
            if not fresh:
                return
            with os_errors(f"appending to {self.journal.path}"):
                self.journal.append(fresh)
            with self._lock:
                for k in fresh:
                    self.owed[k] = None
                self._n["journal_appends"] += 1
                compact = self.journal.count > 2 * len(self.owed) + self._journal_slack
            if compact:
                try:
                    self._rewrite_journal()
                except OSError as exc:  # the appended file (or its rewrite) stands: a superset, correct
                    _log.warning("could not rewrite %s: %s", os.path.basename(self.journal.path), exc)

    def _rewrite_journal(self) -> None:
        """Rewrite PENDING_L2 with exactly the owed keys (removed if none); _journal_lock held."""
        assert self._journal_lock.locked()
        with self._lock:
            keys = list(self.owed)
            self._n["journal_compactions"] += 1
        self.journal.rewrite(keys)

    def save_pending(self) -> None:
        """At close: PENDING_L2 = the keys still owed to L2 (removed when none)."""
        with self._journal_lock:
            try:
                self._rewrite_journal()
            except OSError as exc:  # the appended file stays: a superset, still correct
                _log.warning("could not rewrite %s: %s", os.path.basename(self.journal.path), exc)
            finally:
                self.journal.close()
