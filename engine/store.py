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
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import math
import numbers
import os
import queue
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import blake3
import numpy as np

from quiver import index_backends
from quiver.engine import codecs, quant
from quiver.engine import config as _config
from quiver.engine import envelope as _envelope
from quiver.engine.envelope import (
    decode_block_into,
    decode_header,
    envelope_size,
    prepare_envelope,
    uniform_layer_offsets,
)
from quiver.engine.errors import (
    BlockNotFoundError,
    ChecksumMismatchError,
    DTypeMismatchError,
    EnvelopeError,
    IdentityMismatchError,
    InvalidIdentityError,
    InvalidPayloadError,
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
from quiver.engine.guard import CARRIERS, check_destination, expected_for, guard_envelope
from quiver.engine.identity import CacheIdentity
from quiver.engine.keys import chain_hash_key, chain_keys, iter_chain_keys, root_key, tokens_to_le_u32
from quiver.engine.metrics import latency_snapshot, new_latency
from quiver.engine.owed_journal import OwedJournal

TIERS = ("l0", "l1", "l2")
L2_MODES = ("sync", "background")
NAIVE_NAMESPACE = b"\0" * 16
NAIVE_ROOT = blake3.blake3(b"quiver/naive/root").digest()
MiB = 1 << 20
STORE_KEY_BYTES = 48  # identity namespace (16) + chain key (32)
PENDING_L2 = "PENDING_L2"
#: PENDING_L2 is compacted once it holds this many keys more than twice the owed set.
JOURNAL_SLACK_KEYS = 4096
#: Byte offset of the codec id in an envelope header (docs/FORMAT.md).
_CODEC_AT = 6
assert _envelope._FIXED.format.startswith("<4sHB"), "envelope header layout changed"


# --------------------------------------------------------------------------- errors
def _translate(exc: BaseException, what: str) -> QuiverError:
    """The engine error for a tier / walpub / index error (the caller chains ``exc``)."""
    import quiver.index_backends.errors as ie
    import quiver.tier.errors as te
    import quiver.walpub.errors as we

    msg = f"{what}: {exc}"
    name = type(exc).__name__
    if isinstance(exc, (we.VolumeLockedError, ie.IndexLockedError)) or "Locked" in name:
        return StoreLockedError(msg)
    if isinstance(exc, te.ObjectStoreUnreachableError):
        return ObjectStoreUnreachableError(msg)
    if isinstance(exc, te.ObjectStoreAuthError):
        return ObjectStoreAuthError(msg)
    if isinstance(exc, (te.ObjectStoreConfigError, ie.UnknownBackendError)) or name in (
        "TierConfigError", "TierObjectTooLargeError"):
        return StoreConfigError(msg)
    if isinstance(exc, te.ObjectStoreRequestError):
        return ObjectStoreRequestError(msg)
    if isinstance(exc, te.ObjectCorruptError) or name == "TierCorruptError":
        return ChecksumMismatchError(msg)
    if isinstance(exc, (te.ObjectStoreClosedError, we.VolumeClosedError, ie.IndexClosedError)) or "Closed" in name:
        return StoreClosedError(msg)
    return StoreIOError(msg)


def _lower_errors() -> tuple[type[BaseException], ...]:
    import quiver.index_backends.errors as ie
    import quiver.tier.errors as te
    import quiver.walpub.errors as we

    return (te.TierError, we.WalpubError, ie.IndexBackendError)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Run a tier call; its typed errors come out as engine errors, cause chained."""
    try:
        yield
    except QuiverError:
        raise
    except _lower_errors() as exc:
        raise _translate(exc, what) from exc


@contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """An OSError of the store's own files comes out as StoreIOError."""
    try:
        yield
    except OSError as exc:
        raise StoreIOError(f"{what}: {exc.strerror or exc}") from exc


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


# --------------------------------------------------------------------------- payloads
def _check_identity(ident: Any) -> None:
    if not isinstance(ident, CacheIdentity):
        raise InvalidIdentityError(f"expected a CacheIdentity, got {type(ident).__name__}")


def _block_arrays(ident: CacheIdentity, blocks: Any) -> list[np.ndarray]:
    """Each block as a C-contiguous numpy array of the identity's carrier dtype.

    Accepts one array/tensor ``[n, *block_shape]`` or a sequence of per-block
    ones; everything is checked here, before anything is written."""
    if _is_torch(blocks):
        _check_tensor_kind(ident, blocks)
    if isinstance(blocks, np.ndarray) or _is_torch(blocks):
        if len(blocks.shape) != 1 + len(ident.block_shape):
            raise ShapeMismatchError(
                f"blocks must be [n, *{ident.block_shape}], got shape {tuple(blocks.shape)}"
            )
        items = [blocks[i] for i in range(blocks.shape[0])]
    elif isinstance(blocks, (list, tuple)):
        items = list(blocks)
    else:
        raise ShapeMismatchError(f"blocks must be an array, a tensor or a sequence of them, got {type(blocks).__name__}")
    return [_one_block(ident, b) for b in items]


def _check_start_block(start_block: Any) -> int:
    """A block index to start from: a non-negative int (a bool is not one)."""
    if isinstance(start_block, bool) or not isinstance(start_block, (int, np.integer)):
        raise InvalidTokensError(f"start_block must be an int, got {type(start_block).__name__}")
    if start_block < 0:
        raise InvalidTokensError(f"start_block must be >= 0, got {start_block}")
    return int(start_block)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _check_tensor_kind(ident: CacheIdentity, b: Any) -> None:
    """InvalidPayloadError for a torch object that is not a dense tensor with data."""
    import torch

    if not isinstance(b, torch.Tensor):
        raise DTypeMismatchError(f"blocks must be numpy arrays or torch tensors, got {type(b).__name__}")
    if b.is_quantized:
        raise InvalidPayloadError(f"a quantized tensor ({b.dtype}) is not KV of kv_dtype {ident.kv_dtype}; "
                                  "store the dequantized tensor, or use kv_quant for lossy blocks")
    if b.layout != torch.strided or getattr(b, "is_nested", False):
        raise InvalidPayloadError(f"a block must be a dense (strided) tensor, got layout {b.layout}")
    if b.device.type == "meta":
        raise InvalidPayloadError("a meta tensor has no data to store")


def _torch_block(ident: CacheIdentity, b: Any) -> np.ndarray:
    """A torch tensor's bytes as a numpy array; typed errors for what has no bytes
    to read (meta), is not a dense array (sparse, nested), or is quantized."""
    import torch

    _check_tensor_kind(ident, b)
    if b.is_complex():
        raise DTypeMismatchError(f"block dtype {b.dtype} does not match kv_dtype {ident.kv_dtype}")
    try:
        b = b.detach()
        if b.device.type != "cpu":
            b = b.cpu()
        b = b.resolve_conj().resolve_neg()
        if b.dtype == torch.bfloat16:
            if ident.kv_dtype != "bfloat16":
                raise DTypeMismatchError(f"block is bfloat16, identity kv_dtype is {ident.kv_dtype}")
            b = b.contiguous().view(torch.int16)
        return b.contiguous().numpy()
    except QuiverError:
        raise
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        raise InvalidPayloadError(f"cannot read the tensor's bytes ({b.dtype} on {b.device}): {exc}") from exc


def _one_block(ident: CacheIdentity, b: Any) -> np.ndarray:
    if _is_torch(b):
        b = _torch_block(ident, b)
    elif not isinstance(b, np.ndarray):
        raise DTypeMismatchError(f"a block must be a numpy array or torch tensor, got {type(b).__name__}")
    if b.dtype not in CARRIERS[ident.kv_dtype]:
        raise DTypeMismatchError(f"block dtype {b.dtype} does not match kv_dtype {ident.kv_dtype}")
    if tuple(b.shape) != ident.block_shape:
        raise ShapeMismatchError(f"block shape {tuple(b.shape)} != identity block shape {ident.block_shape}")
    b = np.ascontiguousarray(b)
    if ident.kv_quant is not None:  # int8 has no code for NaN/Inf: refused before anything is written
        quant.check_finite(b, ident.kv_dtype)
    return b


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


def _check_quant(ident: CacheIdentity) -> None:
    """Refuse an identity whose ``kv_quant`` names a scheme this store cannot hold."""
    if ident.kv_quant is not None and ident.kv_quant != quant.KV_QUANT_INT8:
        raise LossyCodecError(f"identity kv_quant {ident.kv_quant!r} is not {quant.KV_QUANT_INT8!r}, "
                              "the only lossy scheme (codec int8)")


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


# --------------------------------------------------------------------------- options
def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def _is_seconds(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not _is_bool(x) and math.isfinite(x)


#: s3_options values this layer type-checks (tier.s3.S3ObjectStore's keywords);
#: a keyword S3ObjectStore accepts that is not listed here passes unchecked.
_S3_OPTION_TYPES: dict[str, tuple[str, Any]] = {
    "endpoint_url": ("a non-empty str or None", lambda v: v is None or (isinstance(v, str) and bool(v))),
    "profile": ("a non-empty str or None", lambda v: v is None or (isinstance(v, str) and bool(v))),
    "region": ("a non-empty str or None", lambda v: v is None or (isinstance(v, str) and bool(v))),
    "multipart_threshold": ("a positive int", lambda v: _is_int(v) and v > 0),
    "part_size": ("a positive int", lambda v: _is_int(v) and v > 0),
    "max_pool_connections": ("a positive int", lambda v: _is_int(v) and v > 0),
    "create_bucket": ("a bool", _is_bool),
}


def _s3_option_names() -> set[str]:
    """The keyword arguments tier.s3.S3ObjectStore accepts (read from its signature)."""
    import inspect

    try:
        from quiver.tier.s3 import S3ObjectStore
    except ImportError as exc:
        raise StoreConfigError(f"an s3:// object_store needs boto3: pip install 'quiver-kv[s3]' ({exc})") from exc

    params = inspect.signature(S3ObjectStore.__init__).parameters.values()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {
        "self", "bucket", "prefix"}


def _check_path(path: Any) -> str:
    """The store's absolute path; StoreConfigError for None, non-paths, "" and existing non-directories."""
    if path is None:
        raise StoreConfigError(f"path is required: an argument, ${_config.OPTIONS['path'].env} or "
                               f"path in the config file")
    if not isinstance(path, (str, os.PathLike)):
        raise StoreConfigError(f"path must be a str or os.PathLike naming a directory, got {path!r}")
    p = os.fspath(path)
    if not isinstance(p, str):
        raise StoreConfigError(f"path must be a str path (not bytes), got {p!r}")
    if not p.strip():
        raise StoreConfigError("path is empty: name the store's directory (\".\" for the current one)")
    if "\0" in p:
        raise StoreConfigError(f"path {p!r} contains a NUL byte")
    p = os.path.abspath(p)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise StoreConfigError(f"path {p} exists and is not a directory")
    return p


def _check_open_options(o: dict) -> None:
    """Validate BlockStore.open's options before anything is created or locked.

    Every bad value is a StoreConfigError naming the option: wrong types (a
    bool where an int is expected, a str for a size), negative or non-finite
    sizes and timeouts, unknown names, and s3_options that S3ObjectStore does
    not accept (or that are given without an s3:// object store)."""
    def bad(name: str, want: str) -> StoreConfigError:
        return StoreConfigError(f"{name} must be {want}, got {o[name]!r}")

    if o["index"] is not None and not (isinstance(o["index"], str) and o["index"]):
        raise bad("index", "a backend name (str) or None")
    spec = o["object_store"]
    if spec is not None:
        if not isinstance(spec, (str, os.PathLike)) or not isinstance(os.fspath(spec), str) or not os.fspath(spec):
            raise bad("object_store", 'None, a directory path or "s3://bucket/prefix"')
    if not _is_int(o["ram_bytes"]) or o["ram_bytes"] < 0:
        raise bad("ram_bytes", "an int >= 0")
    if o["ram_slot_bytes"] is not None and (not _is_int(o["ram_slot_bytes"]) or o["ram_slot_bytes"] <= 0):
        raise bad("ram_slot_bytes", "a positive int or None")
    if not isinstance(o["ram_policy"], str):
        raise bad("ram_policy", "a policy name (str)")
    d = o["disk_bytes"]
    if not (d is None or (isinstance(d, str) and d == "auto") or (_is_int(d) and d > 0)):
        raise bad("disk_bytes", 'a positive int, None or "auto" (both: the default budget)')
    if not isinstance(o["l2_mode"], str) or o["l2_mode"] not in L2_MODES:
        raise bad("l2_mode", f"one of {L2_MODES}")
    names = sorted(codecs.CODEC_IDS) + sorted(codecs.LOSSY_CODEC_IDS)
    if not isinstance(o["codec"], str) or o["codec"] not in names:
        raise bad("codec", f"one of {names}")
    for name in ("l2_queue_max", "manifest_batch"):
        if not _is_int(o[name]) or o[name] < 1:
            raise bad(name, "an int >= 1")
    if not _is_seconds(o["l2_enqueue_timeout_s"]) or o["l2_enqueue_timeout_s"] < 0:
        raise bad("l2_enqueue_timeout_s", "a finite number of seconds >= 0")
    if not _is_seconds(o["l2_retry_interval_s"]) or o["l2_retry_interval_s"] <= 0:
        raise bad("l2_retry_interval_s", "a finite number of seconds > 0")
    for name in ("bootstrap", "naive"):
        if not _is_bool(o[name]):
            raise bad(name, "a bool")
    if o["guard"] is not None and not _is_bool(o["guard"]):
        raise bad("guard", "a bool or None")
    port = o["metrics_port"]
    if port is not None:
        if not _is_int(port) or not 0 <= port <= 65535:
            raise bad("metrics_port", "a TCP port (an int 0..65535; 0: any free port) or None")
        import importlib.util

        if importlib.util.find_spec("prometheus_client") is None:
            raise StoreConfigError("metrics_port needs prometheus_client: pip install 'quiver-kv[metrics]'")
    opts = o["s3_options"]
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise bad("s3_options", "a dict or None")
    if not opts:
        return
    if not (isinstance(spec, str) and spec.startswith("s3://")):
        raise StoreConfigError(f"s3_options {sorted(map(str, opts))} given without an s3:// object_store")
    accepted = _s3_option_names()
    unknown = sorted(str(k) for k in opts if not isinstance(k, str) or k not in accepted)
    if unknown:
        raise StoreConfigError(f"unknown s3_options {unknown}; accepted: {sorted(accepted)}")
    for name, value in opts.items():
        want, ok = _S3_OPTION_TYPES.get(name, (None, None))
        if ok is not None and not ok(value):
            raise StoreConfigError(f"s3_options[{name!r}] must be {want}, got {value!r}")
    retry = opts.get("retry")
    if retry is not None:
        from quiver.tier.s3 import RetryPolicy

        if not isinstance(retry, RetryPolicy):
            raise StoreConfigError(f"s3_options['retry'] must be a tier.s3.RetryPolicy or None, got {retry!r}")


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
        path = _check_path(path)
        _check_open_options(opts)
        # stats()["config"]: what this handle runs with (JSON-safe; s3_options by name only:
        # an endpoint URL may carry credentials) and where each value came from.
        self._config = dict(
            path=path, object_store=None if object_store is None else os.fspath(object_store),
            ram_bytes=int(ram_bytes), ram_slot_bytes=None if ram_slot_bytes is None else int(ram_slot_bytes),
            ram_policy=ram_policy, disk_bytes=disk_bytes if disk_bytes is None or isinstance(disk_bytes, str)
            else int(disk_bytes), l2_mode=l2_mode, l2_queue_max=int(l2_queue_max),
            l2_enqueue_timeout_s=float(l2_enqueue_timeout_s), l2_retry_interval_s=float(l2_retry_interval_s),
            manifest_batch=int(manifest_batch), bootstrap=bool(bootstrap), codec=codec,
            s3_options=sorted(s3_options or {}), metrics_port=None if metrics_port is None else int(metrics_port),
            sources=dict(sources or {}),
        )
        if disk_bytes is None:  # the default budget (tier.disk.auto_budget, docs/STORE.md)
            from quiver.tier.disk import AUTO

            disk_bytes = AUTO
        elif not isinstance(disk_bytes, str):
            disk_bytes = int(disk_bytes)  # numpy ints are ints here, never floats or bools
        ram_bytes, l2_queue_max, manifest_batch = int(ram_bytes), int(l2_queue_max), int(manifest_batch)
        ram_slot_bytes = None if ram_slot_bytes is None else int(ram_slot_bytes)
        l2_enqueue_timeout_s, l2_retry_interval_s = float(l2_enqueue_timeout_s), float(l2_retry_interval_s)
        bootstrap = bool(bootstrap)
        if index is None:
            index = "art" if "art" in index_backends.available() else "flat"
        self.path = path
        self.index = index
        self.codec = codec
        self.naive = bool(naive)
        self.guard = (not self.naive) if guard is None else bool(guard)
        self.l2_mode = l2_mode
        self._ram_bytes = ram_bytes
        self._ram_slot = ram_slot_bytes
        self._ram_policy = ram_policy
        self._l2_queue_max = l2_queue_max
        self._enqueue_timeout = l2_enqueue_timeout_s
        self._retry_interval = l2_retry_interval_s
        self._manifest_batch = manifest_batch
        self._lock = threading.RLock()
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
        self._lock_fd: int | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._retry: dict[bytes, None] = {}  # keys durable in L1 whose L2 publish failed
        # Keys recorded in PENDING_L2 and not yet known to be in L2 (a superset of
        # _retry: also queued and in-flight ones).  _journal_lock orders the file's
        # appends and rewrites; the dict itself is guarded by _lock.
        self._owed: dict[bytes, None] = {}
        self._journal_lock = threading.Lock()
        self._journal = OwedJournal(os.path.join(self.path, PENDING_L2), key_bytes=STORE_KEY_BYTES)
        self._manifest_pending: list[bytes] = []
        # Keys known to be in L2 (its manifests, our publishes, HEAD/GET hits): L2's
        # own membership, so a put skips re-publishing.  L1 membership is L1's
        # residency index alone; L0's is the RAM tier's.
        self._l2_known: set[bytes] = set()
        self._n = dict(
            put_blocks=0, put_present=0, put_in_slot=0, put_heap=0, get_blocks=0,
            l0_hits=0, l1_hits=0, l2_hits=0, misses=0,
            identity_mismatches=0, corrupt_l0=0, corrupt_l1=0, corrupt_l2=0, l0_oversize=0,
            lookups=0, l2_heads=0, l2_lookup_errors=0, l2_published=0, l2_existing=0, l2_failures=0,
            l2_deferred=0, l2_retried=0, l2_lost=0, l2_known=0, manifests_written=0, manifest_failures=0,
            bootstrap_keys=0, l0_busy=0, journal_appends=0, journal_compactions=0, l1_promote_failures=0,
        )
        self.bootstrap_s = 0.0
        # Latency histograms (engine.metrics): op -> tier -> Histogram, guarded by _lock.
        self._lat = new_latency()
        self.metrics_port: int | None = None  # the port serving metrics (metrics_port=0: the one picked)
        self._metrics_server = None
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(f"cannot create store directory {self.path}: {exc.strerror}") from exc
        self._take_lock()
        try:
            self._open_tiers(index, object_store, disk_bytes, s3_options or {}, bootstrap)
            if metrics_port is not None:
                self._serve_metrics(int(metrics_port))
        except BaseException:
            try:
                self._release_everything()  # always unlocks, whatever else fails
            except QuiverError as exc:  # the open's own error is the one to raise
                logging.getLogger("quiver.engine.store").warning("cleaning up a failed open of %s: %s", self.path, exc)
            raise

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
        with _translated("ram_policy"):
            make_policy(self._ram_policy, 1)  # an unknown name fails at open, not at the first put
        with _translated(f"opening disk tier {self.path}/l1"):
            self._disk = DiskTier(os.path.join(self.path, "l1"), disk_bytes, index=index, adopt=self._adoptable)
        if object_store is not None:
            from quiver.tier.objectstore import open_object_store

            with _translated("opening object store"):  # no request yet: a config error fails here
                self._l2 = open_object_store(object_store, check=False, **s3_options)
            self._l2_bootstrap = bootstrap
            self._l2_probe_lock = threading.Lock()
            self._l2_probe_stop = threading.Event()
            self._n.update(l2_attach_failures=0)
            # While L2 does not answer, calls to it fail fast; the trials that
            # find it back are made by our prober thread, never by a caller.
            self._l2.breaker.caller_trials = False
            self._l2.breaker.on_open = self._l2_wake_prober
            self._load_pending()
            self._l2_attach(self._l2, at_open=True)  # bounded; down -> open on L0/L1, attach later
            if self.l2_mode == "background":
                self._queue = queue.Queue(maxsize=self._l2_queue_max)
                self._worker = threading.Thread(target=self._l2_worker, name="quiver-l2", daemon=True)
                self._worker.start()
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
        with _translated("creating the RAM tier"):
            self._ram = RamTier(self._ram_bytes, slot_bytes, policy=self._ram_policy)
        self._ram_slot = slot_bytes

    # ------------------------------------------------------------------ keys
    def _chain(self, ident: CacheIdentity, token_ids, n: int | None) -> tuple[list[bytes], list[bytes]]:
        """(chain keys, store keys) of the leading ``n`` (or all) full blocks."""
        _check_identity(ident)
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
        _check_identity(ident)
        ns = NAIVE_NAMESPACE if self.naive else ident.namespace
        t0 = time.perf_counter()
        with self._lock:
            self._n["lookups"] += 1
        n = 0
        try:
            for batch in self._iter_chain(ident, token_ids):
                skeys = [ns + k for k in batch]
                t1 = time.perf_counter()
                with _translated("disk tier lookup"):
                    hit = self._disk.longest_prefix(skeys)
                self._observe("lookup", "l1", t1)
                for skey in skeys[hit:]:
                    if not (self._in_ram(skey) or skey in self._l2_known or self._l2_head(skey)):
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
            with _translated("L2 head"), deadline(self.L2_LOOKUP_TIMEOUT_S):
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
            self._l2_known.add(skey)
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
        _check_identity(ident)
        start = _check_start_block(start_block)
        codec = self._codec_for(ident)
        arrays = _block_arrays(ident, blocks)
        if not arrays:
            return 0
        keys, skeys = self._chain(ident, token_ids, start + len(arrays))
        parents = ([self._root(ident)] + keys)[start:start + len(arrays)]
        keys, skeys = keys[start:], skeys[start:]
        with _translated("disk tier contains"):
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
        items: list[tuple[bytes, Any]] = []  # (store key, envelope: an L0 slot or a heap buffer)
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
                if dest is None:
                    dest = np.empty(enc.nbytes, dtype=np.uint8)
                else:
                    reserved.append(skeys[i])
                enc.write_into(dest)  # the one copy of the payload into its envelope
                items.append((skeys[i], dest))
            with self._lock:
                l2_todo = [] if self._l2 is None else [item for item in items if item[0] not in self._l2_known]
            self._journal_owed([sk for sk, _ in l2_todo])  # before L1: no crash window loses them
            t1 = time.perf_counter()
            self._disk_put_many(items, "disk tier put")
            durable = True
            with self._lock:
                self._lat["put"]["l1"].observe(time.perf_counter() - t1)
                self._n["put_blocks"] += len(items)
                self._n["put_in_slot"] += len(reserved)
                self._n["put_heap"] += len(items) - len(reserved)
            if l2_todo and self.l2_mode == "sync":
                self._l2_publish_sync(l2_todo)  # from the envelopes: reserved slots cannot be reused
        finally:
            self._l0_finish(reserved, commit=durable)
            if not durable and l2_todo:  # journaled, maybe partly in L1: flush_l2 settles each key
                with self._lock:         # (published if a local tier has it, else dropped as lost)
                    for sk, _ in l2_todo:
                        if sk in self._owed:
                            self._retry[sk] = None
        if l2_todo and self.l2_mode == "background":
            self._l2_enqueue([sk for sk, _ in l2_todo])  # the worker reads them back from L0/L1
        return len(items)

    def _disk_put_many(self, items: list[tuple[bytes, Any]], what: str) -> None:
        """L1 put_many: one group commit, then eviction to the budget.  L1's
        residency index records both; nothing else keeps a copy to update."""
        with _translated(what):
            self._disk.put_many(items)

    def _codec_for(self, ident: CacheIdentity) -> str:
        """The codec of ``ident``'s blocks: int8 when the identity says its KV is
        lossy (kv_quant), else the store's.  LossyCodecError when they disagree."""
        _check_quant(ident)
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

    def _ram_put(self, skey: bytes, env: bytes, ident: CacheIdentity) -> None:
        """Copy a finished envelope (a promotion from L1/L2) into L0."""
        from quiver.tier.errors import TierFullError, TierReservationError

        if self._ram_bytes == 0:
            return
        with self._lock:
            if self._ram is None:
                exact = "none" if self.codec == "int8" else self.codec
                self._make_ram(envelope_bound(ident, "int8" if ident.kv_quant is not None else exact))
            if len(env) > self._ram_slot:
                self._n["l0_oversize"] += 1
                return
            with _translated("RAM tier put"):
                try:
                    self._ram.put(skey, env)
                except (TierFullError, TierReservationError):  # every slot held by in-flight puts
                    self._n["l0_busy"] += 1

    # ------------------------------------------------------------------ L2 availability
    # L2's circuit breaker (tier.objectstore.CircuitBreaker, fed by the S3 retry
    # loop) makes calls fail fast while L2 does not answer.  Its half-open trials
    # are made here, by a prober thread that exists only while L2 is down (or not
    # yet attached): callers are never the trial, so none of them waits on a hung
    # L2 once the breaker is open.  "Attached" = L2 answered once and, with
    # bootstrap, its manifests were read; open attaches when L2 answers within
    # the probe budget, else the prober does it later.  docs/STORE.md, "L2 down".

    #: Budget of the L2 HEAD one lookup may make (advisory: a miss when it runs out).
    L2_LOOKUP_TIMEOUT_S = 1.0
    #: Budget of the manifest read that bootstraps the L2 key set at attach.
    L2_BOOTSTRAP_TIMEOUT_S = 20.0
    _l2_attached = False
    _l2_bootstrap = True
    _l2_prober: threading.Thread | None = None
    _l2_close_by: float | None = None

    def _l2_attach(self, l2, at_open: bool = False) -> bool:
        """Probe L2 (bounded by the breaker's probe budget) and, the first time
        it answers, read its manifests.  True when attached.  At open an auth,
        config or request error still fails the open (L2 answered: it is
        misconfigured, not down); "not answering" never does: the breaker is
        tripped (one WARNING), the store runs on L0/L1 and the prober retries."""
        from quiver.tier.objectstore import deadline

        try:
            with _translated("L2 probe"), deadline(l2.breaker.policy.probe_timeout_s):
                l2.probe()
            if not self._l2_attached:
                if self._l2_bootstrap:
                    t0 = time.perf_counter()
                    with _translated("reading L2 manifests"), deadline(self.L2_BOOTSTRAP_TIMEOUT_S):
                        known = l2.read_manifests()
                    with self._lock:
                        self._l2_known.update(known)
                        self._n["bootstrap_keys"] = len(known)
                    self.bootstrap_s = time.perf_counter() - t0
                self._l2_attached = True
                if not at_open:
                    logging.getLogger("quiver.engine.store").info("%r: L2 attached (%d keys from its manifests)",
                                                           self, self._n["bootstrap_keys"])
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
        if self._l2_probe_stop.is_set():  # closing: L2 may have been closed under the prober
            return False
        with self._lock:
            self._n["l2_attach_failures"] += 1
        l2.breaker.trip(f"{type(reason).__name__}: {reason}")  # the one WARNING of this outage
        if at_open:
            logging.getLogger("quiver.engine.store").info(
                "%s opened on its local tiers: L2 is not answering; puts journal what L2 is owed, "
                "L2 is attached when a probe succeeds", self.path)
            self._l2_wake_prober()
        return False

    def _l2_wake_prober(self) -> None:
        """L2's breaker opened (or L2 is not attached): make sure the prober runs."""
        lock = getattr(self, "_l2_probe_lock", None)
        if lock is None:
            return
        with lock:
            if self._closing or self._l2_probe_stop.is_set() or self._l2_prober is not None:
                return
            self._l2_prober = threading.Thread(target=self._l2_probe_loop, args=(self._l2,),
                                               name="quiver-l2-probe", daemon=True)
            self._l2_prober.start()

    def _l2_probe_loop(self, l2) -> None:
        """Wait out the breaker's cool-down, probe (and attach), until L2 answers."""
        breaker, stop = l2.breaker, self._l2_probe_stop
        done = False
        try:
            while not done and not stop.wait(max(breaker.retry_in(), 0.001)):
                ok = self._l2_attach(l2)
                with self._l2_probe_lock:  # decided under the lock _l2_wake_prober takes
                    if ok and self._l2_attached and breaker.state == breaker.CLOSED:
                        self._l2_prober = None
                        done = True
        finally:
            if not done:
                with self._l2_probe_lock:
                    if self._l2_prober is threading.current_thread():
                        self._l2_prober = None

    def _l2_stop_prober(self) -> None:
        """At close: stop the prober (its probe is bounded; waited for within close's budget)."""
        stop = getattr(self, "_l2_probe_stop", None)
        if stop is None:
            return
        with self._l2_probe_lock:
            stop.set()
            prober = self._l2_prober
        if prober is not None:
            prober.join(timeout=self._l2_left(5.0))

    def _l2_left(self, default: float) -> float:
        """Seconds left of close's L2 budget (``default`` outside close)."""
        if self._l2_close_by is None:
            return default
        return max(0.05, self._l2_close_by - time.monotonic())

    def l2_health(self) -> dict:
        """L2's availability: configured, attached (answered once; manifests read),
        the circuit breaker's state and counters."""
        l2 = self._l2
        if l2 is None:
            return {"configured": False}
        br = l2.breaker
        return {"configured": True, "attached": self._l2_attached, "breaker": br.state,
                "outages": br.counts["outages"], "refused": br.counts["refused"],
                "failures": br.counts["failures"], "last_failure": br.last_failure}

    # ------------------------------------------------------------------ L2 publish
    def _l2_publish_sync(self, todo: list[tuple[bytes, Any]]) -> None:
        for i, (sk, env) in enumerate(todo):
            try:
                self._publish_l2(sk, env)
            except QuiverError as exc:
                with self._lock:
                    for k, _ in todo[i:]:
                        self._retry[k] = None
                    self._n["l2_failures"] += 1
                raise type(exc)(
                    f"{exc} -- {len(todo) - i} block(s) are durable in L1 but not yet in L2; "
                    f"they are retried by flush_l2()"
                ) from exc
        self._maybe_write_manifest(force=False)

    def _l2_enqueue(self, skeys: list[bytes]) -> None:
        for i, sk in enumerate(skeys):
            try:
                self._queue.put(sk, timeout=self._enqueue_timeout)
            except queue.Full:
                with self._lock:  # the bytes stay in L1; published by a later retry
                    for k in skeys[i:]:
                        self._retry[k] = None
                    self._n["l2_deferred"] += len(skeys) - i
                return

    def _publish_l2(self, skey: bytes, env) -> None:
        t0 = time.perf_counter()
        try:
            with _translated("L2 put"):
                created = self._l2.put(skey, env)
        except BaseException:
            self._observe("put", "l2", t0)  # a failed try's time counts too (a hung L2 shows here)
            raise
        with self._lock:
            self._lat["put"]["l2"].observe(time.perf_counter() - t0)
            self._l2_known.add(skey)
            self._n["l2_published" if created else "l2_existing"] += 1
            self._retry.pop(skey, None)
            self._owed.pop(skey, None)
            self._manifest_pending.append(skey)

    def _publish_local(self, skey: bytes) -> str:
        """Publish ``skey`` from its local copy (L0, else L1): "published"; "failed"
        (L2 failed, the key is on the retry list); or "lost": no local tier holds
        it any more (evicted first, or a put that crashed before L1), so it is
        dropped and counted as ``l2_lost``."""
        env = self._local_envelope(skey)
        if env is None:
            with self._lock:
                self._retry.pop(skey, None)
                self._owed.pop(skey, None)
                self._n["l2_lost"] += 1
            return "lost"
        try:
            self._publish_l2(skey, env)
        except QuiverError:
            with self._lock:
                self._retry[skey] = None
                self._n["l2_failures"] += 1
            return "failed"
        return "published"

    def _maybe_write_manifest(self, force: bool) -> None:
        with self._lock:
            if not self._manifest_pending or (not force and len(self._manifest_pending) < self._manifest_batch):
                return
            batch, self._manifest_pending = self._manifest_pending, []
        try:
            with _translated("L2 manifest"):
                self._l2.write_manifest(batch)
        except QuiverError:
            with self._lock:  # a manifest is a hint: keep the keys for the next try
                self._manifest_pending[:0] = batch
                self._n["manifest_failures"] += 1
            return
        with self._lock:
            self._n["manifests_written"] += 1
        try:  # the L1 records of these keys say so too: survives a restart without a manifest read
            with _translated("disk tier mark"):
                self._disk.mark_in_l2(batch)
        except QuiverError:
            pass  # a hint only

    def _l2_worker(self) -> None:
        """Background publisher: the queue holds store keys; the bytes are read back
        from L0/L1 (so the queue costs no memory per envelope)."""
        q = self._queue
        while True:
            try:
                sk = q.get(timeout=self._retry_interval)
            except queue.Empty:
                if not self._stop.is_set():
                    if not self._l2_worker_step(lambda: (self._retry_pending(limit=64),
                                                         self._maybe_write_manifest(force=True))):
                        return
                continue
            if sk is None:
                q.task_done()
                return
            try:
                if self._stop.is_set():  # closing: not published now, kept on the pending list
                    with self._lock:
                        self._retry[sk] = None
                elif not self._l2_worker_step(lambda: self._publish_local(sk)):
                    return
            finally:
                q.task_done()
            if q.empty() and not self._stop.is_set():
                if not self._l2_worker_step(lambda: self._maybe_write_manifest(force=False)):
                    return

    def _l2_worker_step(self, fn) -> bool:
        """Run one step of the worker; False when the store was closed under it
        (close's budget ran out while this step waited on L2: the tiers are gone,
        the step's keys are in PENDING_L2).  Anything else unexpected is logged,
        never the end of the worker."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the worker must outlive one bad step
            if self._closed:
                return False
            logging.getLogger("quiver.engine.store").warning("L2 worker step failed: %r", exc)
        return not self._closed

    def _retry_pending(self, limit: int | None = None) -> int:
        """Publish keys whose L2 publish failed or was deferred, reading them from L0/L1.

        A key the L2 residency set already knows (a manifest lists it: e.g. a
        key reloaded from PENDING_L2 that was published before a crash) is
        dropped without a request (``l2_known``)."""
        with self._lock:
            keys = list(self._retry)[:limit]
            known = [sk in self._l2_known or self._disk.in_l2(sk) for sk in keys]
            for sk, k in zip(keys, known):
                if k:
                    self._retry.pop(sk, None)
                    self._owed.pop(sk, None)
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
            return len(self._retry)

    def _local_envelope(self, skey: bytes) -> bytes | None:
        with self._lock:
            if self._ram is not None:
                view = self._ram.get(skey)
                if view is not None:
                    return bytes(view)
        try:
            with _translated("disk tier get"):
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
        from quiver.tier.objectstore import deadline as l2_deadline

        # One budget for all of it: the queue wait, every retried publish and the
        # manifest (each L2 try's timeouts are sized to what is left).
        with l2_deadline(timeout_s) as end:
            if self._queue is not None:
                while self._queue.unfinished_tasks:
                    if end is not None and time.monotonic() >= end:
                        break
                    time.sleep(0.005)
            left = self._retry_pending()
            self._maybe_write_manifest(force=True)
        with self._lock:
            return left + (self._queue.unfinished_tasks if self._queue is not None else 0)

    # ------------------------------------------------------------------ get
    @_operation
    def get(self, ident: CacheIdentity, token_ids, n_blocks: int | None = None, out=None,
            start_block: int = 0):
        """The verified payloads of blocks ``start_block .. n_blocks - 1`` (to the
        last full block if ``n_blocks`` is None; ``start_block`` 0 by default).

        Returns a numpy array ``[n, *block_shape]`` (bfloat16 as uint16), or
        decodes into ``out`` (array/tensor ``[n, *block_shape]`` or a sequence
        of per-block ones) and returns it, ``n = n_blocks - start_block``.
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
        _check_identity(ident)
        _check_quant(ident)
        start = _check_start_block(start_block)
        keys, skeys = self._chain(ident, token_ids, n_blocks)
        if start > len(keys):
            raise InvalidTokensError(f"start_block={start} is past the {len(keys)} blocks asked for")
        parents = ([self._root(ident)] + keys)[start:len(keys)]
        keys, skeys = keys[start:], skeys[start:]
        n = len(keys)
        if out is None:
            carrier = CARRIERS[ident.kv_dtype][0]
            result = np.empty((n, *ident.block_shape), dtype=carrier)
            dsts = [result[i] for i in range(n)]
        else:
            dsts = check_destination(out, ident, n)
            result = out
        from_l2: list[tuple[bytes, bytes]] = []  # promoted to L1 in one group commit
        try:
            for i in range(n):
                want = expected_for(ident, keys[i], parents[i])
                try:
                    self._read_one(skeys[i], want, dsts[i], ident, from_l2)
                except QuiverError as exc:
                    exc.block_index = start + i
                    if isinstance(exc, IdentityMismatchError):
                        with self._lock:
                            self._n["identity_mismatches"] += 1
                    raise
        finally:  # also after an error: the blocks read so far were verified
            self._promote_to_disk(from_l2)
        with self._lock:
            self._n["get_blocks"] += n
        return result

    def _decode(self, buf, want, dst, ident: CacheIdentity) -> None:
        """Guard (identity fields, then lossiness), then verify the CRC and decode.

        Lossy int8 envelopes are decodable only for an identity with kv_quant
        set; an exact identity's decode refuses codec int8 even with guard=False."""
        if self.guard:
            guard_envelope(buf, want)
            _guard_codec(buf, ident)
        decode_block_into(buf, dst, allow_lossy=ident.kv_quant is not None)

    def _promote_to_disk(self, items: list[tuple[bytes, bytes]]) -> None:
        """Copy verified L2 hits into L1 with one publish_many (one WAL group
        commit for the whole get, not an fsync'd publish per block).

        Promotion is an optimisation: its failure never fails the get (nor
        replaces the get's own error); it is counted (``l1_promote_failures``)
        and logged, and the blocks stay in L2."""
        if not items:
            return
        try:
            self._disk_put_many(items, "disk tier put (promotion)")
        except QuiverError as exc:
            with self._lock:
                self._n["l1_promote_failures"] += 1
            logging.getLogger("quiver.engine.store").warning("promoting %d L2 hit(s) to L1 failed: %s", len(items), exc)

    def _read_one(self, skey: bytes, want, dst, ident: CacheIdentity, from_l2: list) -> None:
        """One block from the fastest tier holding it, verified; promotes it
        upwards (to L0 at once; an L2 hit is appended to ``from_l2`` for L1)."""
        corrupt: EnvelopeError | None = None
        t0 = time.perf_counter()
        with self._lock:  # L0 slots are reused on eviction: decode under the lock
            view = self._ram.get(skey) if self._ram is not None else None
            if view is not None:
                try:
                    self._decode(view, want, dst, ident)
                    self._n["l0_hits"] += 1
                    self._lat["get"]["l0"].observe(time.perf_counter() - t0)
                    return
                except EnvelopeError as exc:
                    corrupt = exc
                    self._ram.delete(skey)
                    self._n["corrupt_l0"] += 1
        t1 = time.perf_counter()
        try:
            with _translated("disk tier get"):
                env = self._disk.get(skey)
        except ChecksumMismatchError as exc:  # walpub dropped the record already
            corrupt, env = exc, None
            with self._lock:
                self._n["corrupt_l1"] += 1
        if env is not None:
            try:
                self._decode(env, want, dst, ident)
            except EnvelopeError as exc:  # walpub's CRC passed, the envelope's did not
                corrupt = exc
                with _translated("disk tier delete"):
                    self._disk.delete(skey)
                with self._lock:
                    self._n["corrupt_l1"] += 1
            else:
                with self._lock:
                    self._n["l1_hits"] += 1
                    self._lat["get"]["l1"].observe(time.perf_counter() - t1)
                self._ram_put(skey, env, ident)
                return
        if self._l2 is not None:
            t2 = time.perf_counter()
            try:
                with _translated("L2 get"):
                    env = self._l2.get(skey)
            except ChecksumMismatchError as exc:
                corrupt, env = exc, None
                with self._lock:
                    self._n["corrupt_l2"] += 1
            if env is not None:
                try:
                    self._decode(env, want, dst, ident)
                except EnvelopeError as exc:
                    with self._lock:
                        self._n["corrupt_l2"] += 1
                    raise type(exc)(f"L2 copy of block {skey[16:24].hex()}: {exc}") from exc
                with self._lock:
                    self._n["l2_hits"] += 1
                    self._lat["get"]["l2"].observe(time.perf_counter() - t2)
                    self._l2_known.add(skey)
                from_l2.append((skey, env))
                self._ram_put(skey, env, ident)
                return
            with self._lock:
                self._l2_known.discard(skey)
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
            gauges.update(
                l2_retry_pending=len(self._retry), l2_owed=len(self._owed), bootstrap_s=self.bootstrap_s,
                l2_queue=self._queue.unfinished_tasks if self._queue is not None else 0,
            )
            residency = {"l0": len(self._ram) if self._ram is not None else 0,
                         "l1": len(self._disk) if self._disk is not None else 0,
                         "l2": len(self._l2_known)}  # L2: the keys known to be there
            l0 = dataclasses.asdict(self._ram.stats()) if self._ram is not None else None
            latency = latency_snapshot(self._lat)
        config = dict(self._config, index=self.index, guard=self.guard, naive=self.naive)
        disk, l2 = self._disk, self._l2  # close() may clear them meanwhile
        l1 = dataclasses.asdict(disk.stats()) if disk is not None else None
        l2s = None
        if l2 is not None:
            l2s = l2.stats()
            l2s["attached"] = self._l2_attached
        return {"counters": counters, "gauges": gauges, "residency": residency, "config": config,
                "tiers": {"l0": l0, "l1": l1, "l2": l2s}, "latency": latency}

    # ------------------------------------------------------------------ pending L2 journal
    # PENDING_L2 holds the keys owed to L2: appended (and fsynced) by put
    # *before* L1 holds the blocks, so no crash -- during a put, with keys in the
    # background queue, after a failed publish -- loses the fact that L2 still
    # needs them (a later put would skip them: L1 has them).  Format: 48-byte
    # store keys back to back; a torn tail (len % 48) is cut off at open.
    # Publishing a key only removes it from memory; the file is rewritten (tmp,
    # fsync, rename, dir fsync) from the owed set when it holds more than
    # 2 x owed + JOURNAL_SLACK_KEYS keys, and at close (removed when nothing is
    # owed).  After a crash a key published since the last rewrite is reloaded:
    # dropped if a manifest lists it, else re-published (first writer wins: a no-op).
    # The file itself (format, fsyncs, torn tails) is engine/owed_journal.py, through
    # walpub's I/O layer so the crash simulator covers it.
    def _pending_path(self) -> str:
        return os.path.join(self.path, PENDING_L2)

    def _load_pending(self) -> None:
        with self._journal_lock:
            with _os_errors(f"cannot read {self._pending_path()}"):
                keys = self._journal.load()  # cuts a torn tail of a crashed append
        for key in keys:
            self._retry[key] = None
            self._owed[key] = None

    def _journal_owed(self, keys: list[bytes]) -> None:
        """Record ``keys`` durably in PENDING_L2 (one append, one fsync) before L1 holds them."""
        if not keys:
            return
        with self._journal_lock:
            with self._lock:
                fresh = [k for k in dict.fromkeys(keys) if k not in self._owed]
            if not fresh:
                return
            with _os_errors(f"appending to {self._pending_path()}"):
                self._journal.append(fresh)
            with self._lock:
                for k in fresh:
                    self._owed[k] = None
                self._n["journal_appends"] += 1
                compact = self._journal.count > 2 * len(self._owed) + JOURNAL_SLACK_KEYS
            if compact:
                try:
                    self._rewrite_journal()
                except OSError as exc:  # the appended file (or its rewrite) stands: a superset, correct
                    logging.getLogger("quiver.engine.store").warning("could not rewrite %s: %s", PENDING_L2, exc)

    def _rewrite_journal(self) -> None:
        """Rewrite PENDING_L2 with exactly the owed keys (removed if none); _journal_lock held."""
        assert self._journal_lock.locked()
        with self._lock:
            keys = list(self._owed)
            self._n["journal_compactions"] += 1
        self._journal.rewrite(keys)

    def _save_pending(self) -> None:
        """At close: PENDING_L2 = the keys still owed to L2 (removed when none)."""
        with self._journal_lock:
            try:
                self._rewrite_journal()
            except OSError as exc:  # the appended file stays: a superset, still correct
                logging.getLogger("quiver.engine.store").warning("could not rewrite %s: %s", PENDING_L2, exc)
            finally:
                self._journal.close()

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
                    self._l2_close_by = time.monotonic() + max(0.0, l2_timeout_s)
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
                if self._worker is not None:
                    self._stop.set()
                    try:
                        self._queue.put(None, timeout=max(0.0, min(self._enqueue_timeout, self._l2_left(30.0))))
                    except queue.Full:
                        pass  # the worker sees _stop after its current item
                    # Bounded by close's budget: a worker stuck in an L2 try (bounded
                    # itself) is left to finish on its own; its key stays owed.
                    self._worker.join(timeout=self._l2_left(30.0))
                    self._worker = None
                if self._l2 is not None:
                    self._l2_stop_prober()
                    self._save_pending()
                    self._l2.close()
                    self._l2 = None
            finally:
                if self._disk is not None:
                    try:
                        with _translated("closing disk tier"):
                            self._disk.close()
                    finally:
                        self._disk = None
                self._ram = None
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
