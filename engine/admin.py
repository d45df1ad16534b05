"""Operator operations on a store directory: what the ``quiver`` command runs.

Every function here takes the path of a :class:`~quiver.engine.store.BlockStore`
directory (``PATH/l1`` is its walpub volume) and never creates one: a missing
path is :class:`StoreNotFoundError`, a directory that is not a store
:class:`NotAStoreError`.  docs/CLI.md is the user's side of this module.

Locking follows the store's own rule: ``BlockStore.open`` takes
``flock(LOCK_EX | LOCK_NB)`` on the store directory itself.

* :func:`inspect` takes that lock *shared* and reads: the WAL (replayed in
  memory, nothing truncated), the residency index's summary record, the
  markers (``l1/CLEAN``, ``PENDING_L2``) and the names under ``l1/objects``.
  It runs no recovery and writes nothing to the WAL, the objects or the
  markers; a persistent index is opened through its backend to read its
  applied seq (RocksDB may touch its own ``LOG`` doing so).
* :func:`verify`, :func:`gc` and :func:`evict` take it exclusive and open the
  L1 tier (``tier.disk.DiskTier`` with no byte budget, so opening never
  evicts): recovery runs as in any open, and every removal goes through the
  WAL (DELETE frame fsynced, then the index, then the unlink), so a crash
  in the middle leaves a consistent store.
* :func:`store_stats` opens the store itself (``BlockStore.open``) with a
  budget no smaller than what L1 holds.

A held lock -- an engine has the store open -- is ``StoreLockedError`` at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiver.engine.envelope import decode_header
from quiver.engine.errors import (
    EnvelopeError,
    InvalidIdentityError,
    QuiverError,
    StoreConfigError,
    StoreIOError,
    StoreLockedError,
)
from quiver.engine.identity import CacheIdentity
from quiver.walpub.checksum import crc32c

NAMESPACE_BYTES = 16
STORE_KEY_BYTES = 48  # namespace (16) + chain key (32), engine.store.STORE_KEY_BYTES
NAIVE_NAMESPACE = b"\0" * NAMESPACE_BYTES  # engine.store.NAIVE_NAMESPACE (naive mode: no identity)
PENDING_L2 = "PENDING_L2"  # engine.store.PENDING_L2
PERSISTENT_INDEXES = ("art", "lmdb", "lsm")  # the backends that keep files under l1/index-<name>
MEMORY_INDEXES = ("flat", "sorted")


# --------------------------------------------------------------------------- errors
class AdminError(QuiverError):
    """An operator operation refused its input (the CLI exits 2)."""


class StoreNotFoundError(AdminError, FileNotFoundError):
    """The path does not exist."""


class NotAStoreError(AdminError, ValueError):
    """The path exists but is no Quiver store directory (no ``l1/wal``)."""


class IdentityMappingError(AdminError, ValueError):
    """A tenant or model name cannot be mapped to identity namespaces exactly."""


class ObjectStoreNotFoundError(AdminError, FileNotFoundError):
    """A local object-store directory that does not exist or is not one."""


# --------------------------------------------------------------------------- the directory
def check_store(path: str | os.PathLike[str]) -> str:
    """The absolute path of an existing store directory; typed errors otherwise.
    Creates nothing (``BlockStore.open`` would create a missing store)."""
    p = os.path.abspath(os.fspath(path))
    if not os.path.exists(p):
        raise StoreNotFoundError(f"no such store directory: {path}")
    if not os.path.isdir(p):
        raise NotAStoreError(f"not a directory: {path}")
    if not os.path.isdir(os.path.join(p, "l1", "wal")):
        raise NotAStoreError(f"not a Quiver store (no l1/wal inside): {path}")
    return p


def detect_index(store: str) -> str:
    """The residency-index backend the store was last used with: the
    ``l1/index-<name>`` directory written last; ``flat`` when there is none
    (flat and sorted keep nothing on disk: the index is rebuilt from the WAL)."""
    l1 = os.path.join(store, "l1")
    found = []
    for name in PERSISTENT_INDEXES:
        d = os.path.join(l1, f"index-{name}")
        if os.path.isdir(d):
            found.append((_newest_mtime(d), name))
    return max(found)[1] if found else "flat"


def _newest_mtime(d: str) -> float:
    newest = os.stat(d).st_mtime
    with contextlib.suppress(OSError), os.scandir(d) as it:
        for e in it:
            with contextlib.suppress(OSError):
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    return newest


def _usable_index(name: str) -> str:
    from quiver import index_backends

    if name not in (*PERSISTENT_INDEXES, *MEMORY_INDEXES):
        raise StoreConfigError(f"unknown index backend {name!r}; known: {[*PERSISTENT_INDEXES, *MEMORY_INDEXES]}")
    if name not in index_backends.available():
        raise StoreConfigError(f"index backend {name!r} cannot be imported here (missing dependency)")
    return name


def configured(config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """BlockStore.open's configuration as an engine opening with no keywords
    would get it (engine.config: ``$QUIVER_*``, the TOML file ``config`` or
    ``$QUIVER_CONFIG``): ``{"values", "sources", "error"}``.  A bad
    configuration is reported in ``error``, not raised."""
    try:
        from quiver.engine import config as _config
    except ImportError:  # a build without engine.config: only keywords exist
        return {"values": {}, "sources": {}, "error": None}
    try:
        values, sources = _config.resolve({}, config=config)
    except QuiverError as exc:
        return {"values": {}, "sources": {}, "error": str(exc)}
    return {"values": values, "sources": sources, "error": None}


def _set(cfg: dict[str, Any], name: str) -> Any:
    """The configured value of ``name`` when something set it (not the default)."""
    if cfg["sources"].get(name, "default") == "default":
        return None
    return cfg["values"].get(name)


def choose_index(store: str, index: str | None, cfg: dict[str, Any]) -> str:
    """--index, else the configured index, else the one the store's files say."""
    return index or _set(cfg, "index") or detect_index(store)


@contextlib.contextmanager
def store_lock(store: str, *, exclusive: bool) -> Iterator[None]:
    """flock the store directory as ``BlockStore.open`` does (exclusive), or
    shared for readers; StoreLockedError at once when an open store holds it."""
    try:
        fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreIOError(f"cannot open the store directory {store}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"store is locked by another process: {store}") from None
        except OSError as exc:
            raise StoreIOError(f"cannot lock {store}: {exc.strerror or exc}") from exc
        yield
    finally:
        os.close(fd)  # releases the flock


def pending_l2_keys(store: str) -> list[bytes]:
    """The keys PENDING_L2 lists (owed to L2), read only; a torn tail is ignored."""
    try:
        data = Path(store, PENDING_L2).read_bytes()
    except FileNotFoundError:
        return []
    n = len(data) // STORE_KEY_BYTES
    return [data[i * STORE_KEY_BYTES:(i + 1) * STORE_KEY_BYTES] for i in range(n)]


# --------------------------------------------------------------------------- envelopes
def envelope_problem(skey: bytes, data) -> str | None:
    """Why ``data`` is not a sound envelope of the block ``skey`` (None if it is):
    header (its own CRC32C), whole-envelope CRC32C, the header's block key
    against the key's chain part, and the identity fingerprint against the
    key's namespace (not checkable in a naive store's zero namespace)."""
    if len(skey) != STORE_KEY_BYTES:
        return f"a {len(skey)}-byte key is not a store key"
    mv = memoryview(data).cast("B")
    try:
        h = decode_header(mv, allow_lossy=True)
    except (EnvelopeError, ValueError) as exc:
        return f"bad envelope header ({exc})"
    if len(mv) != h.total_len:
        return f"envelope is {len(mv)} bytes, its header says {h.total_len}"
    end = h.header_len + h.body_len
    if crc32c(mv[:end]) != int.from_bytes(mv[end:end + 4], "little"):
        return "envelope CRC32C mismatch"
    if h.key != skey[NAMESPACE_BYTES:]:
        return "the header names another block"
    if skey[:NAMESPACE_BYTES] != NAIVE_NAMESPACE and h.fingerprint[:NAMESPACE_BYTES] != skey[:NAMESPACE_BYTES]:
        return "the header's identity fingerprint does not match the key's namespace"
    return None


def _adoptable(skey: bytes, data: bytes) -> bool:
    # walpub's check for an orphan after WAL damage (BlockStore._adoptable's rule).
    return envelope_problem(skey, data) is None


# --------------------------------------------------------------------------- identities
def load_identities(paths: Iterable[str | os.PathLike[str]]) -> list[CacheIdentity]:
    """CacheIdentity values from JSON files: one object, a list of objects, or
    JSON Lines (one object per line); fields as ``CacheIdentity.to_dict``."""
    out: list[CacheIdentity] = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise IdentityMappingError(f"no such identities file: {path}") from None
        except OSError as exc:
            raise IdentityMappingError(f"cannot read identities file {path}: {exc.strerror or exc}") from None
        try:
            doc = json.loads(text)
            items = doc if isinstance(doc, list) else [doc]
        except json.JSONDecodeError:
            try:
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise IdentityMappingError(f"{path}: neither JSON nor JSON Lines ({exc})") from None
        for i, item in enumerate(items):
            if isinstance(item, dict) and isinstance(item.get("tenant_secret"), str):
                item = dict(item, tenant_secret=item["tenant_secret"].encode())  # not in the namespace anyway
            try:
                out.append(CacheIdentity.from_dict(item))
            except InvalidIdentityError as exc:
                raise IdentityMappingError(f"{path}: identity #{i}: {exc}") from None
    return out


def namespaces_for(identities: list[CacheIdentity], *, tenant: str | None = None,
                   model: str | None = None) -> list[bytes]:
    """The namespaces of the identities whose tenant (and/or model) is the one
    named.  The store keeps only namespaces (a BLAKE3 prefix of the identity
    encoding), never names, so a name maps to blocks only through identities
    the caller supplies; IdentityMappingError when it cannot be mapped."""
    what = " and ".join(f"{k} {v!r}" for k, v in (("tenant", tenant), ("model", model)) if v is not None)
    if not what:
        raise IdentityMappingError("name a tenant or a model")
    if not identities:
        raise IdentityMappingError(
            f"cannot map {what} to blocks: the store records identity namespaces (a BLAKE3 prefix of "
            f"the identity), not tenant or model names; give --identities FILE with the identities "
            f"(CacheIdentity fields as JSON), or --namespace HEX from `quiver inspect`")
    chosen = [i for i in identities
              if (tenant is None or i.tenant == tenant) and (model is None or i.model == model)]
    if not chosen:
        raise IdentityMappingError(f"no identity in the identities file(s) has {what}")
    return list(dict.fromkeys(i.namespace for i in chosen))


def parse_namespace(text: str) -> bytes:
    try:
        ns = bytes.fromhex(text)
    except ValueError:
        ns = b""
    if len(ns) != NAMESPACE_BYTES:
        raise IdentityMappingError(f"a namespace is {NAMESPACE_BYTES} bytes in hex (32 hex digits), got {text!r}")
    return ns


def identity_label(ident: CacheIdentity) -> dict[str, Any]:
    d = ident.to_dict()
    return {k: v for k, v in d.items() if v is not None}


# --------------------------------------------------------------------------- reading the WAL
@dataclass
class WalState:
    """The WAL replayed in memory (nothing truncated or written)."""

    segments: list[int] = field(default_factory=list)
    junk: list[str] = field(default_factory=list)
    bytes: int = 0
    records: int = 0            # frames since (and including) the last RESET
    last_seq: int = 0
    reset_base: int = 0
    live: dict[bytes, Any] = field(default_factory=dict)  # key -> PutRecord
    torn: list[tuple[int, int, str]] = field(default_factory=list)       # (segment, offset, why)
    damaged: list[tuple[int, int, int, str]] = field(default_factory=list)


def read_wal(l1: str) -> WalState:
    """Replay ``l1/wal`` as recovery would (a bad end of a sealed segment is
    skipped, later segments still read) but cut nothing: read only."""
    from quiver.walpub import wal as _wal
    from quiver.walpub.io import OsFileSystem

    io = OsFileSystem()
    waldir = os.path.join(l1, "wal")
    st = WalState()
    ids, st.junk = _wal.list_segments(io, waldir)
    st.segments = ids
    for seg in ids:
        buf = io.read_file(os.path.join(waldir, _wal.segment_name(seg)))
        st.bytes += len(buf)
        recs, valid, why, damaged = _wal.scan_segment(buf)
        st.damaged += [(seg, a, b, w) for a, b, w in damaged]
        for rec in recs:
            st.records += 1
            if isinstance(rec, _wal.ResetRecord):
                st.live.clear()
                st.reset_base = rec.seq
                st.records = 1
            elif isinstance(rec, _wal.PutRecord):
                st.live.pop(rec.key, None)
                st.live[rec.key] = rec
            else:
                st.live.pop(rec.key, None)
            st.last_seq = max(st.last_seq, rec.seq)
        if why is not None:
            st.torn.append((seg, valid, why))
    return st


def read_index(l1: str, name: str) -> dict[str, Any]:
    """The residency index's own summary: applied seq, records, and the volume
    summary walpub keeps in it.  Memory-only backends have none."""
    out: dict[str, Any] = {"backend": name, "persistent": name in PERSISTENT_INDEXES}
    if name not in PERSISTENT_INDEXES:
        out["note"] = "memory-only: rebuilt from the WAL at every open"
        return out
    path = os.path.join(l1, f"index-{name}")
    out["path"] = path
    if not os.path.isdir(path):
        out["note"] = "no index files: the next open builds the index from the WAL"
        return out
    out["bytes"] = sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    from quiver import index_backends
    from quiver.index_backends.errors import IndexBackendError, IndexLockedError
    from quiver.walpub.io import OsFileSystem
    from quiver.walpub.volume import META_KEY, META_VALUE

    if name not in index_backends.available():
        out["note"] = f"backend {name!r} cannot be imported here: not read"
        return out
    opts = {"io": OsFileSystem(), "log": False} if name == "art" else {}
    try:
        idx = index_backends.open(name, path, **opts)
    except IndexLockedError:
        raise StoreLockedError(f"store is locked by another process: its index {path} is open") from None
    except IndexBackendError as exc:
        out["damaged"] = f"{type(exc).__name__}: {exc}"
        out["note"] = "damaged: the next open discards the index files and rebuilds from the WAL"
        return out
    try:
        out["applied_seq"] = idx.get_applied_seq()
        raw = idx.get(META_KEY)
        n = len(idx)
    finally:
        idx.close()
    out["records"] = n - (raw is not None)
    if raw is not None and len(raw) == META_VALUE.size:
        seq, live, used, wal_records = META_VALUE.unpack(raw)
        out["summary"] = {"applied_seq": seq, "live": live, "bytes": used, "wal_records": wal_records}
    return out


def _object_files(l1: str) -> tuple[dict[bytes, int], int]:
    """{key: size} of the object files under l1/objects (names listed, each
    stat'ed; none read), and how many files there name no key."""
    from quiver.walpub.io import OsFileSystem
    from quiver.walpub.volume import iter_object_files

    files: dict[bytes, int] = {}
    other = 0
    for path, key in iter_object_files(OsFileSystem(), l1):
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # a directory where a file belongs: recovery's "stray", not ours
        if key is None:
            other += 1
        else:
            files[key] = st.st_size
    return files, other


# --------------------------------------------------------------------------- inspect
def _open_l2(spec: str, s3_options: dict | None):
    """An object store by spec; a local directory must exist and look like one."""
    from quiver.tier.objectstore import open_object_store

    if not spec.startswith("s3://"):
        p = os.path.abspath(spec)
        if not os.path.isdir(p):
            raise ObjectStoreNotFoundError(f"no such object store directory: {spec}")
        if os.path.isdir(os.path.join(p, "l1", "wal")):
            raise ObjectStoreNotFoundError(
                f"{spec} is a Quiver store, not an object store; give the L2 itself "
                f"(the directory or s3://bucket/prefix the store was opened with as object_store)")
        if not (os.path.isdir(os.path.join(p, "blocks")) or os.path.isdir(os.path.join(p, "manifests"))):
            raise ObjectStoreNotFoundError(f"not an object store directory (no blocks/ or manifests/): {spec}")
        return open_object_store(p)
    return open_object_store(spec, check=True, **(s3_options or {}))


def inspect(path: str | os.PathLike[str], *, index: str | None = None, object_store: str | None = None,
            s3_options: dict | None = None, identities: Iterable[CacheIdentity] = (),
            l2_sizes: bool = False, config: str | os.PathLike[str] | None = None,
            use_l2: bool = True) -> dict[str, Any]:
    """What the store holds and what state it is in; read only (see the module doc).

    L2 is read (its manifests) when ``object_store`` is given, or else when
    the configuration names one (``use_l2=False``: not at all).  A configured
    L2 that fails is reported in ``l2.error``; an explicit one raises."""
    store = check_store(path)
    l1 = os.path.join(store, "l1")
    labels = {i.namespace: identity_label(i) for i in identities}
    cfg = configured(config)
    with store_lock(store, exclusive=False):
        name = choose_index(store, index, cfg)
        wal = read_wal(l1)
        idx = read_index(l1, name)
        files, other_files = _object_files(l1)
        tmp = os.path.join(l1, "tmp")
        tmp_files = len(os.listdir(tmp)) if os.path.isdir(tmp) else 0
        clean = os.path.exists(os.path.join(l1, "CLEAN"))
        owed = pending_l2_keys(store)
        stale = [n for n in PERSISTENT_INDEXES if n != name and os.path.isdir(os.path.join(l1, f"index-{n}"))]
    per: dict[bytes, dict[str, Any]] = {}

    def row(ns: bytes) -> dict[str, Any]:
        if ns not in per:
            per[ns] = {"namespace": ns.hex(), "label": labels.get(ns), "naive": ns == NAIVE_NAMESPACE,
                       "l0": None, "l1": {"blocks": 0, "bytes": 0}, "l2": None}
        return per[ns]

    for key, rec in wal.live.items():
        r = row(key[:NAMESPACE_BYTES])["l1"]
        r["blocks"] += 1
        r["bytes"] += rec.length
    missing = sum(1 for k in wal.live if k not in files)
    wrong_size = sum(1 for k, rec in wal.live.items() if k in files and files[k] != rec.length)
    orphans = sum(1 for k in files if k not in wal.live)

    l2, read_l2 = _inspect_l2(cfg, object_store, s3_options, use_l2, l2_sizes, owed, wal, row, per)
    applied = idx.get("applied_seq")
    recovery = _recovery_state(idx, wal, clean)
    rows = sorted(per.values(), key=lambda r: (-r["l1"]["blocks"], r["namespace"]))
    total_l2 = None
    if read_l2:
        total_l2 = {"blocks": sum(r["l2"]["blocks"] for r in rows),
                    "bytes": sum(r["l2"]["bytes"] for r in rows) if l2_sizes else None}
    l1_bytes = sum(r.length for r in wal.live.values())
    return {
        "path": store,
        "index": dict(idx, stale=stale),
        "wal": {
            "segments": len(wal.segments), "segment_ids": wal.segments, "bytes": wal.bytes,
            "records": wal.records, "last_seq": wal.last_seq, "reset_base": wal.reset_base,
            "applied_seq": applied, "junk": wal.junk,
        },
        "recovery": recovery,
        "l1": {
            "blocks": len(wal.live), "bytes": l1_bytes,
            "object_files": len(files), "orphans": orphans, "missing": missing, "wrong_size": wrong_size,
            "other_files": other_files, "tmp_files": tmp_files,
        },
        "l0": {"note": "RAM only: nothing of L0 persists, an offline store has none"},
        "l2": l2,
        "config": {"error": cfg["error"],
                   "index": {"value": _set(cfg, "index"), "source": cfg["sources"].get("index", "default")}},
        "identities": rows,
        "totals": {"identities": len(rows), "l1": {"blocks": len(wal.live), "bytes": l1_bytes}, "l2": total_l2},
    }


def _inspect_l2(cfg: dict, object_store, s3_options, use_l2: bool, l2_sizes: bool, owed, wal: WalState,
                row, per: dict) -> tuple[dict[str, Any], bool]:
    """inspect's L2 part: what is configured, and the manifests' keys per
    identity when an L2 is read.  Returns (the l2 section, whether L2 was read)."""
    l2: dict[str, Any] = {"pending_l2_keys": len(owed), "object_store": None, "error": None}
    spec_cfg = _set(cfg, "object_store")
    if spec_cfg is not None:
        l2["configured"] = {"object_store": os.fspath(spec_cfg), "source": cfg["sources"]["object_store"],
                            "s3_options": sorted(_set(cfg, "s3_options") or {})}
        l2["note"] = f"configured by {cfg['sources']['object_store']} (the store directory itself records none)"
    else:
        l2["configured"] = None
        l2["note"] = ("no L2 configured (the store directory records none; $QUIVER_OBJECT_STORE or the "
                      "config file would name it); --object-store reads one")
    explicit = object_store is not None
    if not explicit and use_l2 and spec_cfg is not None:
        object_store, s3_options = os.fspath(spec_cfg), s3_options or _set(cfg, "s3_options")
    if not use_l2:
        object_store = None
    read_l2 = object_store is not None
    if read_l2:
        try:
            _read_l2(object_store, s3_options, l2, wal, row, per, l2_sizes)
        except QuiverError as exc:
            if explicit:
                raise
            read_l2 = False
            l2["error"] = f"{type(exc).__name__}: {exc}"
            for r in per.values():
                r["l2"] = None

    return l2, read_l2


def _recovery_state(idx: dict, wal: WalState, clean: bool) -> dict[str, Any]:
    """inspect's recovery part: how the last close went and what the next open will do."""
    applied = idx.get("applied_seq")
    if idx.get("persistent") and "summary" in idx and applied is not None and wal.reset_base <= applied <= wal.last_seq:
        next_open = f"catch up: replay {wal.last_seq - applied} WAL record(s) past the index's applied seq {applied}"
    else:
        next_open = f"rebuild the index from the whole WAL ({wal.records} record(s))"
    return {
        "clean": clean,
        "last_close": "clean (CLEAN marker present)" if clean else
                      "not clean: killed, crashed, or never closed (no CLEAN marker)",
        "next_open": next_open,
        "orphan_scan_at_next_open": (not clean) or bool(wal.torn) or bool(wal.damaged),
        "torn_tail": [{"segment": s, "offset": o, "why": w} for s, o, w in wal.torn],
        "damaged_regions": [{"segment": s, "start": a, "end": b, "why": w} for s, a, b, w in wal.damaged],
        "last_recovery": None,
        "last_recovery_note": "walpub keeps no record of past recoveries; `quiver gc` runs one and prints its report",
    }


def _read_l2(spec: str, s3_options: dict | None, l2: dict[str, Any], wal: WalState, row, per: dict,
             l2_sizes: bool) -> None:
    """Per-namespace L2 blocks from the manifests (bytes: the L1 length, else one HEAD)."""
    with _l2_errors():
        os_ = _open_l2(spec, s3_options)
        try:
            keys = os_.read_manifests()
            l2.update(object_store=repr(os_), manifest_keys=len(keys), sizes=l2_sizes)
            for r in per.values():
                r["l2"] = {"blocks": 0, "bytes": 0 if l2_sizes else None}
            for key in keys:
                if len(key) != STORE_KEY_BYTES:
                    continue
                r = row(key[:NAMESPACE_BYTES])
                if r["l2"] is None:
                    r["l2"] = {"blocks": 0, "bytes": 0 if l2_sizes else None}
                r["l2"]["blocks"] += 1
                if l2_sizes:
                    rec = wal.live.get(key)  # every tier holds the same envelope bytes
                    size = rec.length if rec is not None else os_.head(key)
                    r["l2"]["bytes"] += size or 0
        finally:
            os_.close()


@contextlib.contextmanager
def _l2_errors() -> Iterator[None]:
    """tier.errors of an object store -> engine.errors (the store's own mapping)."""
    from quiver.tier import errors as te

    try:
        yield
    except te.ObjectStoreConfigError as exc:
        raise StoreConfigError(str(exc)) from exc
    except te.ObjectStoreAuthError as exc:
        from quiver.engine.errors import ObjectStoreAuthError

        raise ObjectStoreAuthError(str(exc)) from exc
    except te.ObjectStoreUnreachableError as exc:
        from quiver.engine.errors import ObjectStoreUnreachableError

        raise ObjectStoreUnreachableError(str(exc)) from exc
    except te.ObjectStoreError as exc:
        from quiver.engine.errors import ObjectStoreRequestError

        raise ObjectStoreRequestError(f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- writers
def recovery_summary(rep) -> dict[str, Any]:
    """walpub's RecoveryReport as plain data."""
    return {
        "index_mode": rep.index_mode, "last_seq": rep.last_seq, "live": rep.live,
        "segments": len(rep.segments),
        "truncated": [{"segment": s, "offset": o, "why": w} for s, o, w in rep.truncated],
        "discarded_segments": list(rep.discarded_segments),
        "dropped": [{"key": k.hex(), "why": w} for k, w in rep.dropped],
        "tmp_removed": rep.tmp_removed, "wal_junk_removed": rep.wal_junk_removed,
        "orphans_removed": rep.orphans_removed, "adopted": rep.adopted,
        "stray": list(rep.stray), "index_reset": rep.index_reset,
        "damaged": [{"segment": s, "start": a, "end": b, "why": w} for s, a, b, w in rep.damaged],
    }


@contextlib.contextmanager
def open_l1(path: str | os.PathLike[str], *, index: str | None = None,
            config: str | os.PathLike[str] | None = None) -> Iterator[Any]:
    """The store's L1 tier, opened as the store opens it (recovery included)
    but with no byte budget (nothing is evicted at open), under the store's
    exclusive lock.  Yields the ``tier.disk.DiskTier``."""
    from quiver.tier.disk import DiskTier
    from quiver.tier.errors import TierError, TierLockedError

    store = check_store(path)
    with store_lock(store, exclusive=True):
        name = _usable_index(choose_index(store, index, configured(config)))
        try:
            tier = DiskTier(os.path.join(store, "l1"), None, index=name, adopt=_adoptable)
        except TierLockedError as exc:
            raise StoreLockedError(f"store is locked by another process: {store}") from exc
        except TierError as exc:
            raise StoreIOError(f"opening {store}/l1: {exc}") from exc
        tier.store_path = store
        tier.index_name = name
        try:
            yield tier
        finally:
            try:
                tier.close()
            except TierError as exc:
                raise StoreIOError(f"closing {store}/l1: {exc}") from exc


@contextlib.contextmanager
def _tier_errors(what: str) -> Iterator[None]:
    from quiver.tier.errors import TierError

    try:
        yield
    except TierError as exc:
        raise StoreIOError(f"{what}: {exc}") from exc


Progress = Callable[[int, int, int, int, float], None]  # blocks done, blocks, bytes done, bytes, elapsed s


def verify(path: str | os.PathLike[str], *, index: str | None = None, progress: Progress | None = None,
           config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read every L1 object whole and check it: length and CRC32C against its
    WAL record (walpub), then the envelope (header CRC, whole CRC, block key,
    identity namespace).  A block that fails is dropped through the WAL (a
    DELETE frame fsynced before the unlink: crash-safe) and reported."""
    from quiver.tier.errors import TierCorruptError

    with open_l1(path, index=index, config=config) as tier:
        vol = tier.volume
        rec = recovery_summary(tier.last_recovery)
        with _tier_errors("listing L1"):
            keys = tier.keys()
        total_bytes = tier.used_bytes
        corrupt: list[dict[str, Any]] = []
        done = done_bytes = 0
        t0 = time.monotonic()
        owed = set(pending_l2_keys(tier.store_path))
        for key in keys:
            with _tier_errors("verifying L1"):
                info = vol.info(key)
                if info is None:  # gone meanwhile
                    continue
                try:
                    data = tier.get(key)
                except TierCorruptError as exc:  # walpub already dropped it through the WAL
                    m = re.search(r"failed verification \(([^)]*)\)", str(exc))
                    corrupt.append({"key": key.hex(), "bytes": info.length,
                                    "why": f"object {m.group(1) if m else 'failed'} against its WAL record"})
                    data = None
                if data is not None:
                    why = envelope_problem(key, data)
                    if why is not None:
                        tier.delete(key)
                        corrupt.append({"key": key.hex(), "bytes": info.length, "why": why})
            done += 1
            done_bytes += info.length
            if progress is not None:
                progress(done, len(keys), done_bytes, total_bytes, time.monotonic() - t0)
        elapsed = time.monotonic() - t0
        return {
            "path": tier.store_path, "index": tier.index_name, "blocks": done, "bytes": done_bytes,
            "seconds": elapsed, "bytes_per_s": done_bytes / elapsed if elapsed > 0 else None,
            "corrupt": corrupt, "dropped": len(corrupt),
            "dropped_by_recovery": rec["dropped"],
            "owed_to_l2_lost": sum(1 for c in corrupt if bytes.fromhex(c["key"]) in owed),
            "remaining": {"blocks": len(tier), "bytes": tier.used_bytes},
            "recovery": rec,
        }


def gc(path: str | os.PathLike[str], *, index: str | None = None,
       config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Recovery (tmp files, torn WAL tail, orphans after an unclean stop), then
    an orphan sweep of objects/ whatever the last close was, then a leftover
    ``PENDING_L2.tmp`` (a crashed journal rewrite: never read)."""
    with open_l1(path, index=index, config=config) as tier:
        rec = recovery_summary(tier.last_recovery)
        with _tier_errors("collecting orphans"):
            orphans = tier.volume.gc()
        journal_tmp = os.path.join(tier.store_path, PENDING_L2 + ".tmp")
        removed_journal_tmp = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal_tmp)
            removed_journal_tmp = True
        return {
            "path": tier.store_path, "index": tier.index_name,
            "tmp_removed": rec["tmp_removed"], "wal_junk_removed": rec["wal_junk_removed"],
            "orphans_removed": rec["orphans_removed"] + orphans,
            "orphans_removed_by_recovery": rec["orphans_removed"], "orphans_removed_by_sweep": orphans,
            "journal_tmp_removed": removed_journal_tmp,
            "blocks": len(tier), "bytes": tier.used_bytes, "recovery": rec,
        }


def evict(path: str | os.PathLike[str], *, to_bytes: int | None = None,
          namespaces: Iterable[bytes] = (), index: str | None = None, dry_run: bool = False,
          threads: int = 8, config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Remove blocks from L1 through the WAL: down to ``to_bytes`` (least
    recently used first: blocks not used since the last open, oldest put
    first; one WAL fsync for all victims), or every block of ``namespaces``
    (deletes from ``threads`` threads, which walpub group-commits)."""
    ns = set(namespaces)
    if (to_bytes is None) == (not ns):
        raise AdminError("evict needs exactly one of: a byte budget, or namespaces")
    if to_bytes is not None and (not isinstance(to_bytes, int) or to_bytes < 0):
        raise AdminError(f"the byte budget must be an int >= 0, got {to_bytes!r}")
    with open_l1(path, index=index, config=config) as tier:
        rec = recovery_summary(tier.last_recovery)
        before_blocks, before = len(tier), tier.used_bytes
        owed = set(pending_l2_keys(tier.store_path))
        gone: list[bytes] = []
        if to_bytes is not None:
            if not dry_run:
                with _tier_errors("evicting"):
                    gone = tier.evict_to(to_bytes)
        else:
            with _tier_errors("listing L1"):
                targets = [k for k in tier.keys() if k[:NAMESPACE_BYTES] in ns]
            if dry_run:
                gone = targets
            else:
                with _tier_errors("deleting"), ThreadPoolExecutor(max(1, threads)) as pool:
                    gone = [k for k, ok in zip(targets, pool.map(tier.delete, targets)) if ok]
        if dry_run:
            freed = (max(0, before - to_bytes) if to_bytes is not None
                     else sum((tier.volume.info(k) or _NoLen).length for k in gone))
        else:
            freed = before - tier.used_bytes
        return {
            "path": tier.store_path, "index": tier.index_name, "dry_run": dry_run,
            "evicted": len(gone) if not (dry_run and to_bytes is not None) else None, "bytes_freed": freed,
            "before": {"blocks": before_blocks, "bytes": before},
            "after": {"blocks": len(tier), "bytes": tier.used_bytes},
            "to_bytes": to_bytes, "namespaces": sorted(n.hex() for n in ns),
            "owed_to_l2_lost": sum(1 for k in gone if k in owed) if not dry_run else 0,
            "recovery": rec,
        }


class _NoLen:
    length = 0


# --------------------------------------------------------------------------- stats
def store_stats(path: str | os.PathLike[str], *, index: str | None = None, object_store: str | None = None,
                s3_options: dict | None = None, config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``BlockStore.stats()`` of a handle opened on the store (and closed).

    Opened as an engine with no keywords would open it (``$QUIVER_*``, the
    config file; an L2 it names is attached, PENDING_L2 flushed at close), but
    with the index chosen as for every command, no metrics server, and a
    byte budget never below what L1 holds: looking evicts nothing."""
    from quiver.engine.store import BlockStore
    from quiver.tier.disk import auto_budget

    store = check_store(path)
    cfg = configured(config)
    with store_lock(store, exclusive=False):
        held = sum(r.length for r in read_wal(os.path.join(store, "l1")).live.values())
    name = _usable_index(choose_index(store, index, cfg))
    want = cfg["values"].get("disk_bytes")
    budget = want if isinstance(want, int) and not isinstance(want, bool) else auto_budget(os.path.join(store, "l1"), held)
    kw: dict[str, Any] = dict(index=name, disk_bytes=max(budget, held, 1))
    if object_store is not None:
        kw["object_store"] = object_store
    if s3_options:
        kw["s3_options"] = s3_options
    if config is not None:
        kw["config"] = config
    import inspect as _inspect

    params = _inspect.signature(BlockStore.open).parameters
    if "metrics_port" in params:
        kw["metrics_port"] = None
    kw = {k: v for k, v in kw.items() if k in params or k in ("index", "disk_bytes")}
    with BlockStore.open(store, **kw) as s:
        return s.stats()


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data from what stats() and friends return: dataclasses as
    dicts, bytes as hex, sets and tuples as lists, anything else unknown as str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k.hex() if isinstance(k, bytes) else k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        with contextlib.suppress(Exception):
            return to_jsonable(obj.item())
    return str(obj)


# --------------------------------------------------------------------------- L2
def l2_compact(spec: str, *, s3_options: dict | None = None) -> dict[str, Any]:
    """Merge an object store's manifests (``ObjectStore.compact_manifests``):
    all keys are written to new manifests first, then exactly the manifests
    read are deleted, so concurrent publishers and compactors lose nothing
    (a manifest written meanwhile is not read and stays)."""
    with _l2_errors():
        os_ = _open_l2(spec, s3_options)
        try:
            t0 = time.monotonic()
            merged = os_.compact_manifests()
            keys = len(os_.read_manifests())
            return {"object_store": repr(os_), "merged": merged, "keys": keys,
                    "seconds": time.monotonic() - t0}
        finally:
            os_.close()


__all__ = [
    "AdminError", "StoreNotFoundError", "NotAStoreError", "IdentityMappingError", "ObjectStoreNotFoundError",
    "check_store", "detect_index", "store_lock", "pending_l2_keys", "envelope_problem",
    "load_identities", "namespaces_for", "parse_namespace", "read_wal", "read_index",
    "inspect", "open_l1", "verify", "gc", "evict", "store_stats", "to_jsonable", "l2_compact",
]
