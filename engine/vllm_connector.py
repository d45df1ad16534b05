"""vLLM KV connector: vLLM's paged KV cache backed by a Quiver BlockStore.

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model=..., kv_transfer_config=KVTransferConfig(
        kv_connector="QuiverConnector", kv_role="kv_both",
        kv_connector_module_path="quiver.engine.vllm_connector",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"store_path": "/var/lib/quiver", "model_revision": "0e9e39f"}))

docs/ENGINES.md ("vLLM") has the ``vllm serve`` line, every option and the
process design.  In short:

* vLLM builds this class once as SCHEDULER (engine-core process) and once per
  WORKER.  The **worker owns the BlockStore** (it holds the store's exclusive
  lock; with several workers, each rank owns ``<store_path>/rank<r>``) and
  serves the scheduler's lookups over an abstract Unix socket named after the
  store path and rank (:class:`LookupServer`).  A lookup asks the store at
  once, on the server's thread, and adds the blocks of saves still queued on
  the worker's store thread (:class:`PendingSaves`), so it sees every block a
  previous step handed over without waiting for those saves to be durable; a
  load of such blocks waits for their saves first.
* Scheduler: ``get_num_new_matched_tokens`` asks the workers how many leading
  full blocks of the prompt Quiver holds (the minimum over ranks), keeps at
  least one token to compute, and subtracts what vLLM's own prefix cache has.
  ``build_connector_meta`` sends the worker, per request, the blocks to load
  (``[start, end)``) and the prompt blocks that become complete this step (to
  save).
* Worker: ``start_load_kv`` reads the blocks (``BlockStore.get``: CRC and
  identity guard) and scatters ``[start, end)`` into vLLM's paged tensors: on
  the CPU through a ``PagedSink`` (each batch scattered as the get hands it
  over, an L1 chunk while in the CPU cache), on a GPU into a pinned host buffer,
  then one asynchronous copy; any failure -- corrupt, foreign identity, evicted since the
  lookup, a tier down -- puts the request's blocks in
  ``get_block_ids_with_load_errors`` and vLLM recomputes them (set
  ``kv_load_failure_policy="recompute"``; vLLM's default fails the request).
  ``wait_for_save`` copies the newly complete prompt blocks out of the paged
  tensors (the only work on the forward path) and hands the durable
  ``BlockStore.put`` to the store thread.
* Identity (:func:`base_identity`, :func:`request_identity`): model name and
  revision, tokenizer and revision, KV dtype, layers, KV heads, head dim, block
  size, TP/PP rank and size from vLLM's config; ``cache_salt`` joins the tenant
  (so two salts never share a block); LoRA from the request's
  ``lora_request`` with its revision from ``lora_revisions``.  Anything that
  cannot be determined (no model revision, an fp8 KV cache, a LoRA without a
  revision, multimodal or embedding prompts, a hybrid model) is not cached and
  is logged once -- never guessed.

Only prompt tokens are stored (not generated ones).  Range put/get are built
here on the public ``BlockStore`` API: a put passes blocks ``0..end`` (those
already stored are skipped by the store; the host buffer holding them is the
one the load filled, so only new blocks are copied out of vLLM), and a load
reads ``0..end`` and scatters ``start..end``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import torch

from quiver.engine.errors import QuiverError
from quiver.engine.identity import CacheIdentity
from quiver.engine.torch_io import (
    PAGED_FLASH,
    TORCH_DTYPES,
    KVLayout,
    PagedSink,
    detect_paged_layout,
    empty_host,
    gather_paged_any,
    host_blocks,
    scatter_paged_any,
    warm_paged_copies,
    warm_paged_cpu_copies,
)

try:  # the connector runs inside vLLM; the helpers above this line do not need it
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
except ImportError:  # pragma: no cover - exercised only without vllm
    KVConnectorBase_V1 = object  # type: ignore[assignment,misc]
    KVConnectorMetadata = object  # type: ignore[assignment,misc]
    KVConnectorRole = None  # type: ignore[assignment]

log = logging.getLogger("quiver.vllm")

DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
#: Bound on the store thread's queue of saves; a full queue makes the
#: forward path wait for the store rather than grow memory without limit.
STORE_QUEUE_MAX = 64
#: The scheduler's wait for a worker's lookup answer (then a miss), and a load's
#: wait for the saves that hold its blocks (then the load reads what is stored).
LOOKUP_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 << 20


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class QuiverOptions:
    """``kv_connector_extra_config`` (and environment fallbacks), validated once."""

    store_path: str
    object_store: str | None = None
    index: str | None = None
    ram_bytes: int = 256 << 20
    disk_bytes: int | None = None
    l2_mode: str = "sync"
    s3_options: dict = field(default_factory=dict)
    tenant: str = "default"
    model_name: str | None = None
    model_revision: str | None = None
    tokenizer_revision: str | None = None
    lora_revisions: dict = field(default_factory=dict)
    events_path: str | None = None
    load_staging_bytes: int = 256 << 20

    KEYS = ("store_path", "object_store", "index", "ram_bytes", "disk_bytes", "l2_mode", "s3_options",
            "tenant", "model_name", "model_revision", "tokenizer_revision", "lora_revisions", "events_path",
            "load_staging_bytes")

    @classmethod
    def from_extra(cls, extra: dict | None, env: dict | None = None) -> "QuiverOptions":
        env = os.environ if env is None else env
        extra = dict(extra or {})
        unknown = sorted(k for k in extra if k not in cls.KEYS)
        if unknown:
            raise ValueError(f"QuiverConnector: unknown kv_connector_extra_config key(s) {unknown}; "
                             f"known: {list(cls.KEYS)}")
        store_path = extra.get("store_path") or env.get("QUIVER_STORE_PATH")
        if not store_path:
            raise ValueError("QuiverConnector needs kv_connector_extra_config['store_path'] "
                             "(or QUIVER_STORE_PATH)")
        return cls(
            store_path=os.path.abspath(store_path),
            object_store=extra.get("object_store") or env.get("QUIVER_OBJECT_STORE") or None,
            index=extra.get("index"),
            ram_bytes=int(extra.get("ram_bytes", 256 << 20)),
            disk_bytes=None if extra.get("disk_bytes") is None else int(extra["disk_bytes"]),
            l2_mode=extra.get("l2_mode", "sync"),
            s3_options=dict(extra.get("s3_options") or {}),
            tenant=extra.get("tenant") or env.get("QUIVER_TENANT") or "default",
            model_name=extra.get("model_name"),
            model_revision=extra.get("model_revision") or env.get("QUIVER_MODEL_REVISION") or None,
            tokenizer_revision=extra.get("tokenizer_revision"),
            lora_revisions=dict(extra.get("lora_revisions") or {}),
            events_path=extra.get("events_path") or env.get("QUIVER_VLLM_EVENTS") or None,
            load_staging_bytes=int(extra.get("load_staging_bytes", 256 << 20)),
        )


# ----------------------------------------------------------------------------- identity
class Uncacheable(Exception):
    """Why a config or a request has no determinable identity (it is then not cached)."""


def base_identity(vllm_config, opts: QuiverOptions) -> dict:
    """The identity fields fixed by vLLM's config (everything but tenant, adapter and rank).

    Raises :class:`Uncacheable` with the reason when one cannot be determined."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    revision = opts.model_revision or getattr(mc, "revision", None)
    if not revision:
        raise Uncacheable("the model revision is unknown: set kv_connector_extra_config['model_revision'] "
                          "(or vLLM's --revision) to name the weights")
    tok_rev = opts.tokenizer_revision or getattr(mc, "tokenizer_revision", None)
    if not tok_rev:
        if getattr(mc, "tokenizer", mc.model) != mc.model:
            raise Uncacheable("the tokenizer is not the model's and has no revision: set 'tokenizer_revision'")
        tok_rev = revision
    cache_dtype = getattr(cc, "cache_dtype", "auto")
    if cache_dtype not in ("auto", None):
        if cache_dtype not in ("float16", "bfloat16", "float32", "half", "float"):
            raise Uncacheable(f"KV cache dtype {cache_dtype!r} is not stored by Quiver")
    dtype = DTYPE_NAMES.get(mc.dtype) if cache_dtype in ("auto", None) else {
        "half": "float16", "float": "float32"}.get(cache_dtype, cache_dtype)
    if dtype is None:
        raise Uncacheable(f"model dtype {mc.dtype} has no Quiver KV dtype")
    if getattr(mc, "is_hybrid", False) or getattr(mc, "use_mla", False):
        raise Uncacheable("hybrid / MLA models are not supported by this connector")
    return dict(
        model=opts.model_name or mc.model,
        model_revision=str(revision),
        tokenizer=str(getattr(mc, "tokenizer", None) or mc.model),
        tokenizer_revision=str(tok_rev),
        kv_dtype=dtype,
        block_tokens=int(cc.block_size),
        num_kv_heads=int(mc.get_num_kv_heads(pc)),
        head_dim=int(mc.get_head_size()),
        tp_size=int(pc.tensor_parallel_size),
        pp_size=int(pc.pipeline_parallel_size),
    )


def salted_tenant(tenant: str, cache_salt: str | None) -> str:
    """The tenant of a request: ``cache_salt`` joins it (hashed: any salt string is a valid tenant)."""
    if cache_salt is None:
        return tenant
    return f"{tenant}/salt-{blake3.blake3(cache_salt.encode('utf-8')).hexdigest()[:32]}"


def request_parts(request, opts: QuiverOptions) -> dict:
    """The per-request identity fields (tenant, adapter); :class:`Uncacheable` when unknown."""
    if getattr(request, "mm_features", None):
        raise Uncacheable("multimodal prompts: their token ids do not name the media")
    if getattr(request, "prompt_embeds", None) is not None or getattr(request, "prompt_token_ids", None) is None:
        raise Uncacheable("prompt embeddings have no token ids")
    parts = dict(tenant=salted_tenant(opts.tenant, getattr(request, "cache_salt", None)),
                 adapter=None, adapter_revision=None)
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        name = lora.lora_name
        rev = opts.lora_revisions.get(name)
        if not rev:
            raise Uncacheable(f"LoRA {name!r} has no revision in kv_connector_extra_config['lora_revisions']")
        parts.update(adapter=name, adapter_revision=str(rev))
    return parts


def request_identity(base: dict, parts: dict, *, num_layers: int, tp_rank: int, pp_rank: int) -> CacheIdentity:
    return CacheIdentity(**base, **parts, num_layers=num_layers, tp_rank=tp_rank, pp_rank=pp_rank)


# ----------------------------------------------------------------------------- events
class EventLog:
    """JSON lines of what the connector did, one ``write`` each (O_APPEND: several processes share a file).

    For tests and operators; off unless ``events_path`` is set."""

    def __init__(self, path: str | None, role: str) -> None:
        self.path, self.role = path, role

    def emit(self, event: str, **fields: Any) -> None:
        if not self.path:
            return
        line = json.dumps(dict(role=self.role, pid=os.getpid(), event=event, **fields), sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


_logged_once: set[str] = set()


def log_once(msg: str) -> None:
    if msg not in _logged_once:
        _logged_once.add(msg)
        log.warning("QuiverConnector: %s", msg)


# ----------------------------------------------------------------------------- lookup wire
def socket_name(store_path: str, rank: int) -> str:
    """Abstract Unix socket (no file, gone with its process; no 108-byte path limit)."""
    tag = blake3.blake3(os.path.abspath(store_path).encode()).hexdigest()[:24]
    return f"\0quiver-vllm-{tag}-rank{rank}"


def _send(sock: socket.socket, obj: Any) -> None:
    body = json.dumps(obj).encode()
    sock.sendall(struct.pack("<I", len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    (n,) = struct.unpack("<I", _recv_exact(sock, 4))
    if n > MAX_MESSAGE_BYTES:
        raise ConnectionError(f"message of {n} bytes exceeds {MAX_MESSAGE_BYTES}")
    return json.loads(_recv_exact(sock, n))


class LookupClient:
    """The scheduler's side: one persistent connection per worker rank."""

    def __init__(self, store_path: str, ranks: int) -> None:
        self.names = [socket_name(store_path, r) for r in range(ranks)]
        self.socks: list[socket.socket | None] = [None] * ranks

    def lookup(self, parts: dict, tokens: list[int]) -> int:
        """Leading full blocks every rank holds; 0 (and a log line, once) when a rank cannot answer."""
        best = None
        for r, name in enumerate(self.names):
            try:
                n = self._ask(r, name, {"op": "lookup", "parts": parts, "tokens": tokens})
            except (OSError, ConnectionError, ValueError) as exc:
                self._drop(r)
                log_once(f"lookup service of rank {r} unreachable ({exc}); counting misses")
                return 0
            best = n if best is None else min(best, n)
        return best or 0

    def _ask(self, r: int, name: str, msg: dict) -> int:
        s = self.socks[r]
        if s is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(LOOKUP_TIMEOUT_S + 5)
            s.connect(name)
            self.socks[r] = s
        _send(s, msg)
        reply = _recv(s)
        if "error" in reply:
            raise ValueError(reply["error"])
        return int(reply["blocks"])

    def _drop(self, r: int) -> None:
        s, self.socks[r] = self.socks[r], None
        if s is not None:
            s.close()

    def close(self) -> None:
        for r in range(len(self.socks)):
            self._drop(r)


class StoreThread:
    """The worker's one thread that makes its saves durable (``BlockStore.put``), in FIFO order.

    Lookups do not queue here (they see the saves still queued through
    :class:`PendingSaves`).  The queue is bounded (STORE_QUEUE_MAX): a producer
    faster than the disk waits instead of buffering without limit."""

    def __init__(self, store, events: EventLog) -> None:
        self.store, self.events = store, events
        self.q: queue.Queue = queue.Queue(maxsize=STORE_QUEUE_MAX)
        self.saved_blocks = 0
        self.save_errors = 0
        self.t = threading.Thread(target=self._run, name="quiver-store", daemon=True)
        self.t.start()

    def submit(self, fn, *args) -> "queue.Queue":
        done: queue.Queue = queue.Queue(maxsize=1)
        self.q.put((fn, args, done))
        return done

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, args, done = item
            try:
                res = (True, fn(*args))
            except BaseException as exc:  # reported to the waiter; the thread keeps serving
                res = (False, exc)
            done.put(res)

    def drain(self) -> None:
        self.submit(lambda: None).get()

    def stop(self) -> None:
        self.q.put(None)
        self.t.join()


class PendingSaves:
    """The saves handed to the store thread and not finished yet: each one's
    identity (namespace), prompt tokens and last block.

    vLLM's scheduler waits for every lookup, so a lookup must not queue behind
    saves (each a durable put; with ``l2_mode="sync"`` an L2 upload too): it
    asks the store at once and adds the leading blocks a pending save of the
    same identity will hold (``covered``), which keeps "a request scheduled
    after another sees its blocks".  A load whose blocks a pending save holds
    waits for it (``wait_stored``) instead of missing them.  A save that fails
    leaves its blocks out of the store: the load that counted on them fails,
    and vLLM recomputes those blocks."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._cond = threading.Condition()
        self._saves: dict[int, tuple[bytes, np.ndarray, int]] = {}
        self._next = 0

    def add(self, namespace: bytes, tokens, to_block: int) -> int:
        """A save of blocks up to ``to_block`` of ``tokens``' chain, about to be queued; its handle."""
        have = np.asarray(tokens[: to_block * self.block_size], dtype=np.int64)
        with self._cond:
            self._next += 1
            self._saves[self._next] = (namespace, have, to_block)
            return self._next

    def done(self, handle: int) -> None:
        """The save's put returned (its blocks are in the store) or failed."""
        with self._cond:
            self._saves.pop(handle, None)
            self._cond.notify_all()

    def covered(self, namespace: bytes, tokens) -> int:
        """Leading full blocks of ``tokens`` some pending save of the same identity
        holds: the blocks its prompt shares with ``tokens``, up to its last block
        (the blocks before a save's first are stored, or pending themselves)."""
        with self._cond:
            if not self._saves:  # the usual case: no prompt to convert
                return 0
        want = np.asarray(tokens, dtype=np.int64)
        with self._cond:
            return self._covered(namespace, want)

    def wait_stored(self, namespace: bytes, tokens, start_block: int, timeout_s: float) -> bool:
        """Wait until no pending save holds a block of ``tokens`` at or past
        ``start_block`` (False if that takes longer than ``timeout_s``)."""
        with self._cond:
            if not self._saves:  # every load's first question: nothing queued, no prompt to convert
                return True
        want = np.asarray(tokens, dtype=np.int64)
        with self._cond:
            return self._cond.wait_for(lambda: self._covered(namespace, want) <= start_block, timeout=timeout_s)

    def _covered(self, namespace: bytes, want: np.ndarray) -> int:
        best, bs = 0, self.block_size
        for ns, have, to_block in self._saves.values():
            if ns != namespace:
                continue
            m = min(want.size, have.size) // bs * bs
            diff = np.flatnonzero(want[:m] != have[:m])
            best = max(best, min((int(diff[0]) if diff.size else m) // bs, to_block))
        return best


class LookupServer:
    """Answers the scheduler's lookups on an abstract Unix socket (one thread per connection)."""

    def __init__(self, name: str, answer) -> None:
        self.answer = answer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(name)
        self.sock.listen(8)
        self.t = threading.Thread(target=self._accept, name="quiver-lookup", daemon=True)
        self.t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="quiver-lookup-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    msg = _recv(conn)
                except (OSError, ConnectionError, ValueError):
                    return
                try:
                    reply = {"blocks": int(self.answer(msg["parts"], msg["tokens"]))}
                except Exception as exc:  # a lookup error is a miss for the scheduler, never a crash
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                try:
                    _send(conn, reply)
                except OSError:
                    return

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ----------------------------------------------------------------------------- metadata
@dataclass
class ReqOp:
    """What the worker does for one request this step."""

    req_id: str
    parts: dict
    token_ids: list[int]           # the prompt's first max(load_end, save_end) * block_size tokens
    block_ids: list[int]           # the request's block table, at least as long as the blocks named here
    load: tuple[int, int] | None   # blocks [start, end) to load from Quiver
    save: tuple[int, int] | None   # prompt blocks [from, to) complete after this step, not yet saved
    load_fail: bool = False        # report the load's blocks as errors without reading (see update_state_after_alloc)


@dataclass
class QuiverConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    ops: list[ReqOp] = field(default_factory=list)


@dataclass
class _SchedReq:
    request: Any
    parts: dict | None
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0
    pending_load: tuple[int, int] | None = None
    load_fail: bool = False  # the pending load cannot be served: report its blocks as load errors
    query: tuple[int, int] | None = None  # (local computed tokens, external tokens) of the last query


# ----------------------------------------------------------------------------- the connector
class QuiverConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """vLLM KV connector over a Quiver BlockStore (see the module docstring)."""

    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.opts = QuiverOptions.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.is_scheduler = role == KVConnectorRole.SCHEDULER
        self.events = EventLog(self.opts.events_path, "scheduler" if self.is_scheduler else "worker")
        pc = vllm_config.parallel_config
        self.world = int(pc.tensor_parallel_size) * int(pc.pipeline_parallel_size)
        try:
            self.base: dict | None = base_identity(vllm_config, self.opts)
        except Uncacheable as exc:
            self.base = None
            log_once(f"nothing is cached: {exc}")
            self.events.emit("uncacheable", reason=str(exc))
        if kv_cache_config is not None and len(getattr(kv_cache_config, "kv_cache_groups", ())) > 1:
            self.base = None
            log_once("nothing is cached: the model has several KV cache groups (hybrid / sliding window)")
        if self.is_scheduler:
            if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
                log.warning("QuiverConnector: kv_load_failure_policy=%r: a block that fails its CRC or "
                            "identity check will fail the request; set kv_load_failure_policy='recompute'",
                            self._kv_transfer_config.kv_load_failure_policy)
            self._reqs: dict[str, _SchedReq] = {}
            self._client = LookupClient(self.opts.store_path, self.world) if self.base is not None else None
        else:
            self.store = None
            self._store_thread: StoreThread | None = None
            self._pending = PendingSaves(self.block_size)
            self._server: LookupServer | None = None
            self._kv: list[torch.Tensor] = []
            self._kind: str | None = None
            self._layout: KVLayout | None = None
            self._load_errors: set[int] = set()
            self.loaded_blocks = 0
            self._staging: torch.Tensor | None = None  # the loads' host buffer, reused (see _load_buffer)
            self._staging_copy = None  # the CopyReport of the last load's scatter (CUDA: may be in flight)

    # ------------------------------------------------------------------ scheduler side
    def on_new_request(self, request) -> None:
        parts = None
        if self.base is not None:
            try:
                parts = request_parts(request, self.opts)
            except Uncacheable as exc:
                log_once(f"request not cached: {exc}")
                self.events.emit("uncacheable", req=request.request_id, reason=str(exc))
        self._reqs[request.request_id] = _SchedReq(request=request, parts=parts)

    def _state(self, request) -> _SchedReq:
        st = self._reqs.get(request.request_id)
        if st is None:  # a request vLLM did not announce through on_new_request
            self.on_new_request(request)
            st = self._reqs[request.request_id]
        return st

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        if st.parts is None or self._client is None:
            return 0, False
        prompt = request.prompt_token_ids
        max_blocks = (len(prompt) - 1) // self.block_size  # at least one token is computed
        if max_blocks * self.block_size <= num_computed_tokens:
            st.query = (num_computed_tokens, 0)
            return 0, False
        t0 = time.perf_counter()
        n = self._client.lookup(st.parts, list(prompt[: max_blocks * self.block_size]))
        seconds = time.perf_counter() - t0  # what this request's lookup held the scheduler for
        ext = max(0, min(n, max_blocks) * self.block_size - num_computed_tokens)
        st.query = (num_computed_tokens, ext)
        self.events.emit("lookup", req=request.request_id, prompt_tokens=len(prompt), stored_blocks=n,
                         local_tokens=num_computed_tokens, external_tokens=ext, seconds=seconds)
        return ext, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens <= 0 or st.query is None:
            return
        local, _asked = st.query
        bs = self.block_size
        st.pending_load = (local // bs, -(-(local + num_external_tokens) // bs))
        st.load_fail = bool(local % bs or num_external_tokens % bs)
        if st.load_fail:
            # vLLM trimmed the hit to something not block-aligned, and it now counts those tokens as
            # computed.  Part of a block cannot be loaded: the worker reports the blocks as load
            # errors, so vLLM recomputes them instead of attending to stale KV.
            log_once(f"unaligned external hit ({local} local + {num_external_tokens} external tokens): "
                     "reported as load errors")

    def build_connector_meta(self, scheduler_output) -> QuiverConnectorMetadata:
        meta = QuiverConnectorMetadata()
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None or st.parts is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan(meta, new.req_id, st, new.num_computed_tokens, sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None or st.parts is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
                st.saved_upto = 0
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, st, cached.num_computed_tokens[i], sched.get(req_id, 0))
        return meta

    def _plan(self, meta: QuiverConnectorMetadata, req_id: str, st: _SchedReq, computed: int, scheduled: int) -> None:
        prompt = st.request.prompt_token_ids
        load, load_fail = st.pending_load, st.load_fail
        st.pending_load, st.load_fail = None, False
        if load is not None:
            st.saved_upto = max(st.saved_upto, load[1])  # those blocks are in Quiver already
        full = len(prompt) // self.block_size
        done = min(full, (computed + scheduled) // self.block_size)
        save = (st.saved_upto, done) if done > st.saved_upto else None
        if save is not None:
            st.saved_upto = done
        if load is None and save is None:
            return
        end = max(load[1] if load else 0, save[1] if save else 0)
        meta.ops.append(ReqOp(req_id=req_id, parts=st.parts, token_ids=list(prompt[: end * self.block_size]),
                              block_ids=st.block_ids[:end], load=load, save=save,
                              load_fail=load_fail))

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        self._reqs.pop(request.request_id, None)
        return False, None  # saves copy the blocks out synchronously: vLLM may free them now

    def shutdown(self) -> None:
        if self.is_scheduler:
            if self._client is not None:
                self._client.close()
            return
        self._close_worker()

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.base is None:
            return
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        from quiver.engine.store import BlockStore

        names = sorted(kv_caches, key=extract_layer_index)
        self._kv = [kv_caches[n] for n in names]
        self.tp_rank = int(get_tensor_model_parallel_rank())
        self.pp_rank = int(get_pp_group().rank_in_group)
        b = self.base
        self._layout = KVLayout(len(self._kv), b["block_tokens"], b["num_kv_heads"], b["head_dim"],
                                TORCH_DTYPES[b["kv_dtype"]])
        # An unknown layout (or a CPU kernel ISA whose packing is unverified) is a typed error here.
        self._kind = detect_paged_layout(self._kv, self._layout, cpu_isa=self._cpu_isa(names))
        # The copy kernel (Triton on a GPU, Numba on the CPU) compiled or loaded now, not in the first load.
        t0 = time.perf_counter()
        used = (warm_paged_copies if self._kind == PAGED_FLASH else warm_paged_cpu_copies)(self._kv, self._layout)
        self.events.emit("copy_warmup", seconds=time.perf_counter() - t0, kernel=used)
        rank = self.pp_rank * b["tp_size"] + self.tp_rank
        path = self.opts.store_path if self.world == 1 else os.path.join(self.opts.store_path, f"rank{rank}")
        self.store = BlockStore.open(path, index=self.opts.index, object_store=self.opts.object_store,
                                     ram_bytes=self.opts.ram_bytes, disk_bytes=self.opts.disk_bytes,
                                     l2_mode=self.opts.l2_mode, s3_options=self.opts.s3_options or None)
        if self.store.index == "art":
            # The engine starts serving with the ART's kernels in place: compiled (~25 s on 2
            # cores) or loaded from their disk cache (~0.5 s).  Left to the background loader,
            # a first request after an install or upgrade competed with it: 838 ms for a 64 MiB
            # load from L1, against 112-138 ms once the cache was written.
            from quiver.index_backends import _art_kernels

            t0 = time.perf_counter()
            jit = _art_kernels.warmup(wait=True)
            self.events.emit("warmup", seconds=time.perf_counter() - t0, failed=jit.get("failed"),
                             pending=list(jit.get("pending") or []))
        # The loads' host buffer, its pages touched now: a fresh buffer per load paid its page
        # faults inside the load (in this VM, whose freed memory goes back to the host, 0.5 s of a
        # 1.3 s 64 MiB load right after a restart).  Sized for the longest prompt, capped.
        max_blocks = -(-int(self._vllm_config.model_config.max_model_len) // self.block_size)
        n = min(max_blocks, self.opts.load_staging_bytes // self._layout.block_nbytes)
        self._staging = host_blocks(n, self._layout, for_device=self._kv[0].device) if n > 0 else None
        if self._kv[0].device.type == "cpu":  # loads go through the store's chunk buffers (PagedSink): made now
            self.store.prepare_reads(self._layout.block_nbytes)
        self._store_thread = StoreThread(self.store, self.events)
        self._server = LookupServer(socket_name(self.opts.store_path, rank), self._lookup_answer)
        atexit.register(self._close_worker)  # if vLLM exits without calling shutdown(): drain the saves
        self.events.emit("registered", layers=len(self._kv), layout=self._kind, isa=self._cpu_isa(names), store=path,
                         shape=list(self._kv[0].shape), rank=rank)

    def _cpu_isa(self, names: list[str]) -> str | None:
        """The CPU attention kernel ISA of the layers (it decides how K is packed), or None off CPU."""
        if self._kv[0].dim() != 4:
            return None
        ctx = self._vllm_config.compilation_config.static_forward_context
        isas = {getattr(getattr(ctx.get(n), "impl", None), "isa", None) or getattr(ctx.get(n), "isa", None)
                for n in names}
        isas.discard(None)
        if len(isas) == 1:
            return isas.pop()
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # what the backend itself calls

        b = self.base
        return _get_attn_isa(TORCH_DTYPES[b["kv_dtype"]], b["block_tokens"], b["head_dim"],
                             getattr(self._vllm_config.cache_config, "cache_dtype", None))

    def _ident(self, parts: dict) -> CacheIdentity:
        return request_identity(self.base, parts, num_layers=len(self._kv), tp_rank=self.tp_rank,
                                pp_rank=self.pp_rank)

    def _lookup_answer(self, parts: dict, tokens: list[int]) -> int:
        """Leading blocks stored or in a pending save, asked on the lookup server's
        thread (the store is thread-safe), not behind the saves on the store thread."""
        ident = self._ident(parts)
        # Pending saves first: one that finishes after this look is in the store by the next.
        pending = self._pending.covered(ident.namespace, tokens)
        return max(pending, self.store.lookup(ident, tokens))

    def _host(self, n: int) -> torch.Tensor:
        """A fresh host buffer for ``n`` blocks: a save's buffer is owned by its
        asynchronous put until that returns, so save buffers are not reused.
        Pinned when the KV lives on a GPU, so copies skip the pinned staging
        (torch's host allocator caches pinned blocks, so this is no cudaHostAlloc
        per save once warm)."""
        return empty_host((n, *self._layout.block_shape), self._layout.dtype,
                          pinned=self._kv[0].device.type == "cuda")

    def _load_buffer(self, n: int) -> torch.Tensor:
        """Where a load of ``n`` blocks lands before its scatter: the staging
        buffer (one per worker, reused: a load is synchronous) when it holds
        ``n`` blocks, else a fresh one.  On CUDA the previous load's scatter
        may still be copying out of the staging buffer: waited for first."""
        if self._staging_copy is not None:
            self._staging_copy.wait()
            self._staging_copy = None
        if self._staging is not None and n <= self._staging.shape[0]:
            return self._staging[:n]
        return self._host(n)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if self.store is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        for op in meta.ops:
            if op.load is None:
                continue
            start, end = op.load
            before = self._tier_hits()  # outside the timed load: stats() walks every tier
            t0 = time.perf_counter()
            try:
                if op.load_fail:
                    raise ValueError("unaligned external hit: nothing was loaded")
                ident = self._ident(op.parts)
                buf = self._load_buffer(end - start)  # only the blocks vLLM does not hold already
                tokens = op.token_ids[: end * self.block_size]
                # Blocks the lookup counted in a save still queued: stored before they are read.
                self._pending.wait_stored(ident.namespace, tokens, start, LOOKUP_TIMEOUT_S)
                if self._kv[0].device.type == "cpu":  # scattered as the get hands the blocks over
                    sink = PagedSink(self._kind, self._kv, op.block_ids[start:end], self._layout, buf)
                    self.store.get(ident, tokens, n_blocks=end, out=sink, start_block=start)
                else:  # into pinned staging, then one asynchronous copy to the GPU
                    self.store.get(ident, tokens, n_blocks=end, out=buf, start_block=start)
                    self._staging_copy = scatter_paged_any(self._kind, buf, self._kv, op.block_ids[start:end],
                                                           self._layout)
            except Exception as exc:  # never an inference failure: vLLM recomputes these blocks
                bad = op.block_ids[start:end]
                self._load_errors.update(bad)
                log.warning("QuiverConnector: load of blocks %d..%d of %s failed (%s: %s); vLLM recomputes them",
                            start, end, op.req_id, type(exc).__name__, exc)
                self.events.emit("load_error", req=op.req_id, start=start, end=end, block_ids=list(bad),
                                 error=type(exc).__name__, message=str(exc)[:300], tiers=self._tier_hits(before))
                continue
            seconds = time.perf_counter() - t0
            self.loaded_blocks += end - start
            self.events.emit("load", req=op.req_id, start=start, end=end, tokens=(end - start) * self.block_size,
                             seconds=seconds, tiers=self._tier_hits(before))

    _HIT_KEYS = ("l0_hits", "l1_hits", "l2_hits", "misses", "corrupt_l0", "corrupt_l1", "corrupt_l2",
                 "identity_mismatches")

    def _tier_hits(self, before: dict | None = None) -> dict:
        """The store's hit counters (the difference from ``before`` when given): which tier served a load."""
        st = self.store.stats()["counters"]
        now = {k: int(st.get(k, 0)) for k in self._HIT_KEYS}
        return now if before is None else {k: now[k] - before[k] for k in now}

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are complete when start_load_kv returns

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # blocks are copied out after the last layer, in wait_for_save

    def wait_for_save(self) -> None:
        if self.store is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        t0, handoff, saves = time.perf_counter(), 0.0, 0
        for op in meta.ops:
            if op.save is None:
                continue
            frm, to = op.save
            buf = self._host(to - frm)  # blocks 0..frm-1 are in Quiver already (loaded or saved before)
            gather_paged_any(self._kind, self._kv, op.block_ids[frm:to], buf, self._layout).wait()  # CUDA: D2H done
            ident = self._ident(op.parts)
            tokens = op.token_ids[: to * self.block_size]
            handle = self._pending.add(ident.namespace, tokens, to)  # seen by lookups from now on
            t1 = time.perf_counter()
            self._store_thread.submit(self._put, op.req_id, ident, tokens, buf, op.save, handle)  # waits when full
            handoff += time.perf_counter() - t1
            saves += 1
        if saves:  # what this step's forward waited for: the copies out, and room in the store thread's queue
            self.events.emit("saves_queued", saves=saves, seconds=time.perf_counter() - t0, handoff_seconds=handoff,
                             queued=self._store_thread.q.qsize())

    def _put(self, req_id: str, ident: CacheIdentity, tokens: list[int], blocks: torch.Tensor, rng,
             handle: int) -> int:
        t0 = time.perf_counter()
        try:
            n = self.store.put(ident, tokens, blocks, start_block=rng[0])
        except QuiverError as exc:
            log.warning("QuiverConnector: saving blocks of %s failed: %s", req_id, exc)
            self.events.emit("save_error", req=req_id, error=type(exc).__name__, message=str(exc)[:300])
            return 0
        finally:
            self._pending.done(handle)
        self.events.emit("save", req=req_id, blocks=int(blocks.shape[0]), new=n, range=list(rng),
                         seconds=time.perf_counter() - t0)
        return n

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.is_scheduler:
            return set()
        out, self._load_errors = self._load_errors, set()
        return out

    def get_finished(self, finished_req_ids: set[str]):
        return None, None

    def _close_worker(self) -> None:
        if self.store is None:
            return
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._store_thread is not None:
            self._store_thread.drain()
            self._store_thread.stop()
            self._store_thread = None
        stats = self._tier_hits()
        self.store.close()
        self.store = None
        self.events.emit("closed", loaded_blocks=self.loaded_blocks, tiers=stats)


__all__ = [
    "QuiverConnector",
    "QuiverConnectorMetadata",
    "QuiverOptions",
    "ReqOp",
    "Uncacheable",
    "base_identity",
    "request_parts",
    "request_identity",
    "salted_tenant",
    "socket_name",
]
