"""BlockStore.open's options: validated before anything is created or locked.

Every bad value is a StoreConfigError naming the option (docs/STORE.md,
"Options are validated up front"): the store path, the sizes, modes and
timeouts, and the s3_options a tier.s3.S3ObjectStore accepts.  Also the
record of the options a handle runs with (``stats()["config"]``).  Split out
of engine.store so the facade holds only what a store *does*; nothing here
touches the file system beyond looking at the path.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np

from quiver.engine import codecs
from quiver.engine import config as _config
from quiver.engine.errors import StoreConfigError

L2_MODES = ("sync", "background")


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


def check_path(path: Any) -> str:
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


def check_open_options(o: dict) -> None:
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


def config_record(path: str, o: dict, sources: dict | None) -> dict:
    """stats()["config"]: what a handle runs with (JSON-safe; s3_options by name only:
    an endpoint URL may carry credentials) and where each value came from."""
    d = o["disk_bytes"]
    return dict(
        path=path, object_store=None if o["object_store"] is None else os.fspath(o["object_store"]),
        ram_bytes=int(o["ram_bytes"]), ram_slot_bytes=None if o["ram_slot_bytes"] is None else int(o["ram_slot_bytes"]),
        ram_policy=o["ram_policy"], disk_bytes=d if d is None or isinstance(d, str) else int(d),
        l2_mode=o["l2_mode"], l2_queue_max=int(o["l2_queue_max"]),
        l2_enqueue_timeout_s=float(o["l2_enqueue_timeout_s"]), l2_retry_interval_s=float(o["l2_retry_interval_s"]),
        manifest_batch=int(o["manifest_batch"]), bootstrap=bool(o["bootstrap"]), codec=o["codec"],
        s3_options=sorted(o["s3_options"] or {}),
        metrics_port=None if o["metrics_port"] is None else int(o["metrics_port"]),
        sources=dict(sources or {}),
    )
