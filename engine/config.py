"""Where BlockStore.open's options come from: keywords, the environment, a TOML file.

Per option, the first of: the keyword argument; the environment variable
``QUIVER_<OPTION>`` (the keyword upper-cased: ``QUIVER_RAM_BYTES``); the key
of the same name in the TOML file named by ``config=`` or ``QUIVER_CONFIG``;
the default.  Why: a deployment configures the store without touching the
engine's code (env for one value, a file for many), and code that passes an
option explicitly keeps control of it.

Strings from the environment are parsed here to the option's type (sizes
accept a binary suffix: ``64MiB``); then every value, whatever its source,
goes through the same validation as a keyword (engine.store), so a bad value
is the same StoreConfigError, naming the variable or file it came from.  A
key in the file that is not an option is a StoreConfigError; a ``QUIVER_*``
variable that is not an option is ignored (QUIVER_SMOKE, QUIVER_VLLM_* and
others belong to tests, studies and the vLLM connector).  ``guard`` and
``naive`` exist to measure the guard's cost and are keyword-only: neither a
variable nor a file may turn the identity guard off.  docs/CONFIG.md has the
table of every option.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from quiver.engine.errors import StoreConfigError

ENV_PREFIX = "QUIVER_"
#: The variable naming a TOML file (used when open() gets no ``config=``).
CONFIG_ENV = "QUIVER_CONFIG"
MiB = 1 << 20


class _Unset:
    """The default of BlockStore.open's keywords: "not given", so env and file may set it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<default>"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Option:
    """One option of BlockStore.open: its type (``kind``, how an env string is parsed),
    default, meaning, and whether env and file may set it."""

    name: str
    kind: str
    default: Any
    meaning: str
    settable: bool = True  # False: keyword only

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


#: Every option of BlockStore.open, in its signature's order: the one list the
#: defaults, the parsing and docs/CONFIG.md come from.
OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("path", "str", None, "the store's directory; created if missing"),
    Option("index", "str?", None, 'L1 residency-index backend: flat, sorted, lmdb, lsm, art (None: "art" when '
                                  'its numba code imports, else "flat")'),
    Option("object_store", "str?", None, 'L2: None (no L2), a directory, or "s3://bucket/prefix"'),
    Option("ram_bytes", "size", 256 * MiB, "L0 RAM arena bytes; 0 disables L0"),
    Option("ram_slot_bytes", "size?", None, "L0 slot bytes (None: the envelope bound of the first identity stored)"),
    Option("ram_policy", "str", "lru", "L0 eviction policy: lru or s3fifo"),
    Option("disk_bytes", "disk", None, 'L1 byte budget (None or "auto": half of free + held space at open)'),
    Option("l2_mode", "str", "sync", "sync (put returns once L2 has the blocks) or background (a queue)"),
    Option("l2_queue_max", "int", 256, "background mode: keys the L2 queue holds"),
    Option("l2_enqueue_timeout_s", "seconds", 1.0, "background mode: how long a put waits for queue space"),
    Option("l2_retry_interval_s", "seconds", 5.0, "background mode: how often failed L2 publishes are retried"),
    Option("manifest_batch", "int", 1024, "keys per L2 manifest written"),
    Option("bootstrap", "bool", True, "read L2's manifests when L2 attaches"),
    Option("codec", "str", "none", "envelope codec: none, lz4, zstd (int8: a lossy-only store)"),
    Option("guard", "bool?", None, "identity guard on every get (None: on unless naive); keyword only",
           settable=False),
    Option("naive", "bool", False, "UNSAFE, study only: keys without identity; keyword only", settable=False),
    Option("s3_options", "table", None, "keywords of tier.s3.S3ObjectStore (endpoint_url, profile, region, "
                                        "retry, breaker, ...); only with an s3:// object_store"),
    Option("metrics_port", "int?", None, "serve Prometheus metrics on this TCP port (0: any free port); "
                                         "needs prometheus_client"),
)}

DEFAULTS: dict[str, Any] = {name: o.default for name, o in OPTIONS.items()}

_SIZE = re.compile(r"\s*([0-9][0-9_]*)\s*(KiB|MiB|GiB|TiB)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_size(text: str, where: str) -> int:
    """An int of bytes from ``"268435456"``, ``"256MiB"``, ``"4 GiB"``; StoreConfigError otherwise."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise StoreConfigError(f"{where} must be a whole number of bytes, optionally with KiB, MiB, GiB or TiB, "
                               f"got {text!r}")
    return int(m[1]) * _UNITS[m[2].lower() if m[2] else None]


def parse_env(opt: Option, text: str, where: str) -> Any:
    """The value of ``opt`` from an environment string (validated later, as a keyword is).

    An empty string means None for the options whose default is None."""
    kind = opt.kind
    if text.strip() == "" and (kind.endswith("?") or kind in ("disk", "table")):
        return None
    if kind in ("str", "str?"):
        return text
    if kind in ("size", "size?"):
        return parse_size(text, where)
    if kind == "disk":
        return "auto" if text.strip().lower() == "auto" else parse_size(text, where)
    if kind in ("int", "int?"):
        try:
            return int(text)
        except ValueError:
            raise StoreConfigError(f"{where} must be an int, got {text!r}") from None
    if kind == "seconds":
        try:
            return float(text)
        except ValueError:
            raise StoreConfigError(f"{where} must be a number of seconds, got {text!r}") from None
    if kind in ("bool", "bool?"):
        t = text.strip().lower()
        if t in _TRUE or t in _FALSE:
            return t in _TRUE
        raise StoreConfigError(f"{where} must be a bool (1/0, true/false, yes/no, on/off), got {text!r}")
    if kind == "table":
        try:
            value = json.loads(text)
        except ValueError:
            raise StoreConfigError(f"{where} must be a JSON object, got {text!r}") from None
        if not isinstance(value, dict):
            raise StoreConfigError(f"{where} must be a JSON object, got {text!r}")
        return value
    raise AssertionError(kind)


def _from_file_value(opt: Option, value: Any, where: str) -> Any:
    """TOML values are typed already; only size strings ("64MiB") are parsed."""
    if isinstance(value, str) and opt.kind in ("size", "size?"):
        return parse_size(value, where)
    if isinstance(value, str) and opt.kind == "disk" and value.strip().lower() != "auto":
        return parse_size(value, where)
    return value


def _policies(s3_options: Any, where: str) -> Any:
    """s3_options from env or file: a ``retry`` / ``breaker`` table becomes its policy object."""
    if not isinstance(s3_options, dict):
        return s3_options
    out = dict(s3_options)
    for key in ("retry", "breaker"):
        if isinstance(out.get(key), dict):
            if key == "retry":
                try:
                    from quiver.tier.s3 import RetryPolicy as cls
                except ImportError as exc:
                    raise StoreConfigError("s3_options need boto3: pip install 'quiver-kv[s3]'") from exc
            else:
                from quiver.tier.objectstore import BreakerPolicy as cls
            try:
                out[key] = cls(**out[key])
            except Exception as exc:  # noqa: BLE001 - unknown field, wrong type: typed here
                raise StoreConfigError(f"{where}: s3_options[{key!r}] {out[key]!r} is not a valid "
                                       f"{cls.__name__}: {exc}") from None
    return out


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options in a TOML file (top-level keys); StoreConfigError for an
    unreadable or malformed file, an unknown key, or a keyword-only option."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise StoreConfigError(f"config file {p}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise StoreConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    unknown = sorted(k for k in data if k not in OPTIONS)
    if unknown:
        raise StoreConfigError(f"config file {p}: unknown option(s) {unknown}; options: {sorted(OPTIONS)}")
    fixed = sorted(k for k in data if not OPTIONS[k].settable)
    if fixed:
        raise StoreConfigError(f"config file {p}: {fixed} can only be given as keyword arguments")
    return data


def resolve(kwargs: Mapping[str, Any], config: str | os.PathLike[str] | None = None,
            environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Every option's value and where it came from ("keyword", "env QUIVER_X", "file PATH", "default").

    ``kwargs`` are the keywords the caller gave (no UNSET); ``config`` a TOML
    file (else ``$QUIVER_CONFIG``, if set and not empty).  Values are parsed
    but not validated: BlockStore validates the result as it validates keywords."""
    environ = os.environ if environ is None else environ
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        raise StoreConfigError(f"unknown option(s) {unknown}; options: {sorted(OPTIONS)}")
    values, sources = dict(DEFAULTS), dict.fromkeys(OPTIONS, "default")
    path = config if config is not None else (environ.get(CONFIG_ENV) or None)
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise StoreConfigError(f"config must be the path of a TOML file, got {path!r}")
        where = f"file {os.fspath(path)}"
        for name, value in read_file(path).items():
            values[name] = _from_file_value(OPTIONS[name], value, f"{name} in {where}")
            if name == "s3_options":
                values[name] = _policies(values[name], where)
            sources[name] = where
    for name, opt in OPTIONS.items():
        text = environ.get(opt.env)
        if text is None:
            continue
        if not opt.settable:
            raise StoreConfigError(f"{opt.env} is set, but {name} can only be given as a keyword argument "
                                   "(it exists to measure the identity guard's cost)")
        values[name] = parse_env(opt, text, opt.env)
        if name == "s3_options":
            values[name] = _policies(values[name], opt.env)
        sources[name] = f"env {opt.env}"
    for name, value in kwargs.items():
        values[name], sources[name] = value, "keyword"
    return values, sources


__all__ = ["CONFIG_ENV", "DEFAULTS", "ENV_PREFIX", "OPTIONS", "Option", "UNSET", "parse_size", "read_file",
           "resolve"]
