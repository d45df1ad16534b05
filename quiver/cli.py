"""The ``quiver`` command: look after a store directory, run the studies.

    quiver inspect PATH       what the store holds (per identity namespace and tier),
                              index, WAL and recovery state; read only
    quiver stats PATH         BlockStore.stats() of a handle opened on the store
    quiver verify PATH        read and check every L1 block; drop the corrupt ones
    quiver gc PATH            recovery + tmp files + orphan objects
    quiver evict PATH         --to-bytes N | --namespace HEX | --tenant T / --model M
    quiver l2 compact SPEC    merge an object store's manifests
    quiver study run|report   the studies (also: quiver report)

Exit status: 0 done; 1 ``verify`` found corrupt blocks (and dropped them);
2 bad input (argparse's usage errors, a missing path, a directory that is no
store, a name that cannot be mapped); 3 the store is open in another process;
4 the operation failed (I/O, object store); 70 an internal error; 130
interrupted.  Errors are one line on stderr (``QUIVER_DEBUG=1`` adds the
traceback).  docs/CLI.md has an example of each command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

EXIT_OK = 0
EXIT_CORRUPT = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_FAILED = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------- formatting
def human(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


def rate(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:.1f} MB/s"


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``512K``, ``10M``, ``1GiB``, ``2G`` (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 4096, 512K, 10M, 1GiB)")
    unit = m.group(2).lower()
    if not unit and "i" in m.group(3).lower():
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 4096, 512K, 10M, 1GiB)")
    return int(m.group(1)) * (1024 ** ("kmgtp".index(unit) + 1) if unit else 1)


def _emit_json(obj: Any) -> None:
    from quiver.engine.admin import to_jsonable

    json.dump(to_jsonable(obj), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _s3_options(args: argparse.Namespace) -> dict | None:
    opts = {k: getattr(args, k, None) for k in ("endpoint_url", "profile", "region")}
    opts = {k: v for k, v in opts.items() if v is not None}
    return opts or None


def _path(args: argparse.Namespace) -> str:
    """PATH, else the configured store path ($QUIVER_PATH, the config file)."""
    from quiver.engine import admin

    if args.path is not None:
        return args.path
    cfg = admin.configured(args.config)
    if cfg["error"]:
        raise admin.AdminError(f"no PATH given, and the configuration is bad: {cfg['error']}")
    path = admin._set(cfg, "path")
    if path is None:
        raise admin.AdminError("no store path: give PATH (or set $QUIVER_PATH, or path in the config file)")
    args.path = os.fspath(path)
    return args.path


def _identities(args: argparse.Namespace) -> list:
    from quiver.engine.admin import load_identities

    return load_identities(getattr(args, "identities", None) or [])


# --------------------------------------------------------------------------- inspect
def _label(row: dict) -> str:
    if row.get("naive"):
        return "(naive mode: no identity)"
    lab = row.get("label")
    if not lab:
        return "?"
    s = f"{lab.get('tenant')}/{lab.get('model')}@{lab.get('model_revision')}"
    if lab.get("adapter"):
        s += f"+{lab['adapter']}"
    if lab.get("kv_quant"):
        s += f" [{lab['kv_quant']}]"
    return s


def cmd_inspect(args: argparse.Namespace) -> int:
    from quiver.engine import admin

    info = admin.inspect(_path(args), index=args.index, object_store=args.object_store,
                         s3_options=_s3_options(args), identities=_identities(args), l2_sizes=args.l2_sizes,
                         config=args.config, use_l2=not args.no_l2)
    if args.json:
        _emit_json(info)
        return EXIT_OK
    idx, wal, rec, l1, l2 = info["index"], info["wal"], info["recovery"], info["l1"], info["l2"]
    out = [f"store      {info['path']}"]
    line = f"index      {idx['backend']}"
    if idx.get("persistent"):
        parts = []
        if "bytes" in idx:
            parts.append(human(idx["bytes"]))
        if idx.get("applied_seq") is not None:
            parts.append(f"applied seq {idx['applied_seq']}")
        if idx.get("records") is not None:
            parts.append(f"{idx['records']} records")
        if parts:
            line += " (" + ", ".join(parts) + ")"
    if idx.get("note"):
        line += f"; {idx['note']}"
    if idx.get("stale"):
        line += f"; stale index files of: {', '.join(idx['stale'])}"
    out.append(line)
    out.append(f"WAL        {wal['segments']} segment(s), {human(wal['bytes'])}; {wal['records']} record(s) "
               f"since the last RESET; last seq {wal['last_seq']}"
               + (f"; junk files: {', '.join(wal['junk'])}" if wal["junk"] else ""))
    out.append(f"last close {rec['last_close']}")
    out.append(f"next open  {rec['next_open']}"
               + ("; scans objects/ for orphans" if rec["orphan_scan_at_next_open"] else ""))
    for t in rec["torn_tail"]:
        out.append(f"           torn WAL tail: segment {t['segment']} at byte {t['offset']} ({t['why']}): "
                   f"the next open cuts it there")
    for d in rec["damaged_regions"]:
        out.append(f"           damaged WAL region: segment {d['segment']} bytes {d['start']}-{d['end']} ({d['why']})")
    out.append(f"recovery   {rec['last_recovery_note']}")
    out.append(f"L0         {info['l0']['note']}")
    out.append(f"L1         {l1['blocks']} block(s), {human(l1['bytes'])}; {l1['object_files']} object file(s), "
               f"{l1['orphans']} orphan(s), {l1['missing']} missing, {l1['wrong_size']} of the wrong size, "
               f"{l1['tmp_files']} tmp file(s)")
    if l2.get("object_store"):
        out.append(f"L2         {l2['object_store']}: {l2['manifest_keys']} key(s) in its manifests; "
                   f"PENDING_L2 owes {l2['pending_l2_keys']} key(s)")
    else:
        out.append(f"L2         {l2['note']}; PENDING_L2 owes {l2['pending_l2_keys']} key(s)")
    if l2.get("error"):
        out.append(f"           the configured L2 could not be read: {l2['error']}")
    if info["config"]["error"]:
        out.append(f"config     bad configuration (an engine's open would fail): {info['config']['error']}")
    rows = info["identities"]
    out.append("")
    with_l2 = l2.get("object_store") is not None and not l2.get("error")
    head = f"{'NAMESPACE':32}  {'L1 BLOCKS':>9}  {'L1 BYTES':>10}"
    if with_l2:
        head += f"  {'L2 BLOCKS':>9}  {'L2 BYTES':>10}"
    out.append(head + "  IDENTITY")
    for r in rows:
        s = f"{r['namespace']:32}  {r['l1']['blocks']:>9}  {human(r['l1']['bytes']):>10}"
        if with_l2:
            s += f"  {r['l2']['blocks']:>9}  {human(r['l2']['bytes']):>10}"
        out.append(s + "  " + _label(r))
    tot = info["totals"]
    s = f"{'total (' + str(tot['identities']) + ' identities)':32}  {tot['l1']['blocks']:>9}  {human(tot['l1']['bytes']):>10}"
    if with_l2:
        s += f"  {tot['l2']['blocks']:>9}  {human(tot['l2']['bytes']):>10}"
    out.append(s)
    print("\n".join(out))
    return EXIT_OK


# --------------------------------------------------------------------------- stats
def _flatten(prefix: str, obj: Any, out: list[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list):
        out.append(f"{prefix} = {json.dumps(obj)}")
    else:
        out.append(f"{prefix} = {obj}")


def cmd_stats(args: argparse.Namespace) -> int:
    from quiver.engine import admin

    stats = admin.store_stats(_path(args), index=args.index, object_store=args.object_store,
                              s3_options=_s3_options(args), config=args.config)
    if args.json:
        _emit_json(stats)
    else:
        lines: list[str] = []
        _flatten("", admin.to_jsonable(stats), lines)
        print("\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------- verify
class ProgressBar:
    """One \\r line on a terminal; without one, a line every ``every_s`` seconds."""

    def __init__(self, stream=None, every_s: float = 5.0, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.enabled = enabled
        self.every_s = every_s if not self.tty else 0.1
        self._last: float | None = None
        self._drawn = False
        self._printed = False

    def __call__(self, done: int, total: int, done_bytes: int, total_bytes: int, elapsed: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        final = done >= total
        if self.tty:
            if self._last is not None and now - self._last < self.every_s and not final:
                return
        elif self._last is None:
            self._last = now  # the first line comes after every_s, not at block 1 (nor for a short run)
            return
        elif now - self._last < self.every_s and not (final and self._printed):
            return
        self._last = now
        pct = 100.0 * done_bytes / total_bytes if total_bytes else 100.0
        bps = done_bytes / elapsed if elapsed > 0 else None
        text = (f"verify: {done}/{total} blocks  {human(done_bytes)}/{human(total_bytes)}  "
                f"{pct:5.1f}%  {rate(bps)}")
        if self.tty:
            width = 28
            fill = int(width * pct / 100)
            self.stream.write("\r[" + "#" * fill + "." * (width - fill) + "] " + text + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(text + "\n")
            self._printed = True
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def cmd_verify(args: argparse.Namespace) -> int:
    from quiver.engine import admin

    bar = ProgressBar(enabled=not args.quiet)
    try:
        res = admin.verify(_path(args), index=args.index, progress=bar, config=args.config)
    finally:
        bar.finish()
    bad = res["dropped"] + len(res["dropped_by_recovery"])
    if args.json:
        _emit_json(res)
    else:
        out = [f"verified {res['blocks']} block(s), {human(res['bytes'])} in {res['seconds']:.2f} s "
               f"({rate(res['bytes_per_s'])}): full CRC32C + identity check of every L1 object"]
        for d in res["dropped_by_recovery"]:
            out.append(f"  dropped by recovery at open: {d['key']}  {d['why']}")
        if res["corrupt"]:
            out.append(f"corrupt: {res['dropped']} block(s) dropped through the WAL")
            for c in res["corrupt"]:
                out.append(f"  {c['key']}  {human(c['bytes'])}  {c['why']}")
        else:
            out.append("corrupt: none")
        if res["owed_to_l2_lost"]:
            out.append(f"warning: {res['owed_to_l2_lost']} dropped block(s) were still owed to L2 (PENDING_L2): "
                       f"no tier holds them now")
        out.append(f"remaining: {res['remaining']['blocks']} block(s), {human(res['remaining']['bytes'])}")
        print("\n".join(out))
    return EXIT_CORRUPT if bad else EXIT_OK


# --------------------------------------------------------------------------- gc
def cmd_gc(args: argparse.Namespace) -> int:
    from quiver.engine import admin

    res = admin.gc(_path(args), index=args.index, config=args.config)
    if args.json:
        _emit_json(res)
        return EXIT_OK
    rec = res["recovery"]
    out = [f"gc {res['path']}: removed {res['tmp_removed']} tmp file(s), {res['orphans_removed']} orphan object(s) "
           f"({res['orphans_removed_by_recovery']} by recovery, {res['orphans_removed_by_sweep']} by the sweep), "
           f"{res['wal_junk_removed']} stray WAL file(s)"
           + (", PENDING_L2.tmp" if res["journal_tmp_removed"] else "")]
    if rec["truncated"]:
        out.append("  recovery cut the WAL: " + "; ".join(f"segment {t['segment']} at {t['offset']} ({t['why']})"
                                                        for t in rec["truncated"]))
    if rec["dropped"]:
        out.append(f"  recovery dropped {len(rec['dropped'])} record(s) whose object was missing or wrong")
    if rec["index_reset"]:
        out.append(f"  recovery rebuilt the damaged index: {rec['index_reset']}")
    if rec["stray"]:
        out.append(f"  skipped (not ours): {', '.join(rec['stray'])}")
    out.append(f"  index {res['index']} ({rec['index_mode']}); {res['blocks']} block(s), {human(res['bytes'])} remain")
    print("\n".join(out))
    return EXIT_OK


# --------------------------------------------------------------------------- evict
def cmd_evict(args: argparse.Namespace) -> int:
    from quiver.engine import admin

    namespaces: list[bytes] = []
    if args.model is not None and (args.to_bytes is not None or args.namespace):
        raise admin.AdminError("--model chooses identities: it goes with --tenant or alone, "
                               "not with --to-bytes or --namespace")
    if args.to_bytes is None and not args.namespace and args.tenant is None and args.model is None:
        raise admin.AdminError("say what to evict: --to-bytes N, --namespace HEX, --tenant T or --model M")
    if args.namespace:
        namespaces = [admin.parse_namespace(h) for h in args.namespace]
    elif args.tenant is not None or args.model is not None:
        namespaces = admin.namespaces_for(_identities(args), tenant=args.tenant, model=args.model)
    elif args.identities:
        raise admin.IdentityMappingError("--identities needs --tenant or --model to choose among them")
    res = admin.evict(_path(args), to_bytes=args.to_bytes, namespaces=namespaces, index=args.index,
                      dry_run=args.dry_run, config=args.config)
    if args.json:
        _emit_json(res)
        return EXIT_OK
    b, a = res["before"], res["after"]
    if args.dry_run:
        if res["to_bytes"] is not None:
            msg = (f"dry run: L1 holds {human(b['bytes'])}; evicting to {human(res['to_bytes'])} would free "
                   f"{human(res['bytes_freed'])} (least recently used first)")
        else:
            msg = (f"dry run: {res['evicted']} block(s), {human(res['bytes_freed'])} of "
                   f"{len(res['namespaces'])} namespace(s) would be deleted")
        print(msg)
        return EXIT_OK
    out = [f"evicted {res['evicted']} block(s), {human(res['bytes_freed'])} through the WAL; "
           f"L1: {b['blocks']} -> {a['blocks']} block(s), {human(b['bytes'])} -> {human(a['bytes'])}"]
    if res["owed_to_l2_lost"]:
        out.append(f"warning: {res['owed_to_l2_lost']} evicted block(s) were still owed to L2 (PENDING_L2): "
                   f"no tier holds them now")
    if res["to_bytes"] is not None and a["bytes"] > res["to_bytes"]:
        out.append(f"warning: L1 still holds {human(a['bytes'])} > {human(res['to_bytes'])} "
                   f"(records it could not evict; see `quiver verify`)")
    print("\n".join(out))
    return EXIT_OK


# --------------------------------------------------------------------------- l2
def cmd_l2_compact(args: argparse.Namespace) -> int:
    from quiver.engine import admin

    res = admin.l2_compact(args.spec, s3_options=_s3_options(args))
    if args.json:
        _emit_json(res)
    elif res["merged"]:
        print(f"{res['object_store']}: merged {res['merged']} manifests; they list {res['keys']} key(s)")
    else:
        print(f"{res['object_store']}: nothing to merge (at most one manifest); {res['keys']} key(s) listed")
    return EXIT_OK


# --------------------------------------------------------------------------- warmup
def cmd_warmup(args: argparse.Namespace) -> int:
    """Compile (or load from the cache) the ART's kernels now, so that no later
    process compiles them: an optional install step (the default path already
    answers the first request without waiting for the compiler)."""
    from quiver.index_backends import _art_kernels

    st = _art_kernels.warmup(wait=True)
    if args.json:
        _emit_json(st)
    else:
        cached = sum(1 for v in st["from_cache"].values() if v)
        print(f"ART kernels: {len(st['compiled'])} ready ({cached} from the cache), {len(st['pending'])} pending; "
              f"cache: {st['cache_dir'] or 'none writable (compiled in memory)'}")
    if st["failed"]:
        print(f"quiver: warmup failed: {st['failed']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------- parser
def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", nargs="?",
                   help="the store directory (what BlockStore.open was given; default: $QUIVER_PATH or "
                        "path in the config file)")
    p.add_argument("--index", metavar="NAME", choices=["art", "lmdb", "lsm", "flat", "sorted"],
                   help="residency-index backend to open it with (default: $QUIVER_INDEX or the config "
                        "file's, else the one whose files l1/index-<name> were written last, else flat)")
    p.add_argument("--config", metavar="FILE",
                   help="BlockStore's TOML config file (default: $QUIVER_CONFIG), as an engine would open it")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _l2_args(p: argparse.ArgumentParser, spec_flag: bool = True) -> None:
    if spec_flag:
        p.add_argument("--object-store", metavar="SPEC",
                       help="the store's L2: a directory or s3://bucket/prefix (default: $QUIVER_OBJECT_STORE "
                        "or the config file's; the store directory records none)")
    p.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: the AWS configuration chain)")
    p.add_argument("--profile", metavar="NAME", help="AWS profile")
    p.add_argument("--region", metavar="NAME", help="AWS region")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    # Long because it is the flat list of every subcommand's flags (one place to
    # read the whole CLI); no logic.
    from quiver.studies import cli as study_cli

    try:
        from quiver import __version__ as version
    except ImportError:  # pragma: no cover - a broken install still gets its help
        version = "?"
    parser = argparse.ArgumentParser(
        prog="quiver", formatter_class=_Formatter,
        description="Look after a Quiver store directory, and run Quiver's studies.",
        epilog="exit status: 0 ok; 1 verify found corrupt blocks; 2 bad input; 3 store locked by another "
               "process; 4 operation failed; 70 internal error; 130 interrupted.  See docs/CLI.md.")
    parser.add_argument("--version", action="version", version=f"quiver {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="what a store holds, per identity and tier; index, WAL, recovery state",
                       description="Show what a store holds per identity namespace and tier, its index, "
                                   "WAL and recovery state.  Read only: runs no recovery, changes nothing.")
    _store_arg(p)
    _json_arg(p)
    p.add_argument("--identities", metavar="FILE", action="append",
                   help="JSON/JSON Lines file of CacheIdentity dicts: label namespaces with tenant/model "
                        "(repeatable)")
    _l2_args(p)
    p.add_argument("--l2-sizes", action="store_true",
                   help="also count L2 bytes (one HEAD per key L1 does not hold)")
    p.add_argument("--no-l2", action="store_true", help="do not read the configured L2")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("stats", help="BlockStore.stats() of a handle opened on the store",
                       description="Open the store (recovery runs as in any open; nothing is evicted) and "
                                   "print BlockStore.stats().")
    _store_arg(p)
    _json_arg(p)
    _l2_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("verify", help="full CRC32C + identity check of every L1 block; drops the corrupt",
                       description="Read every L1 object whole: length and CRC32C against its WAL record, "
                                   "envelope header and body CRC32C, block key and identity namespace.  "
                                   "A corrupt block is dropped through the WAL (crash-safe).  Exit status 1 "
                                   "when any block was corrupt.")
    _store_arg(p)
    _json_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", help="recovery, tmp files and orphan objects",
                       description="Run recovery (tmp files, a torn WAL tail, orphans after an unclean stop), "
                                   "then sweep objects/ for orphans and remove a leftover PENDING_L2.tmp.")
    _store_arg(p)
    _json_arg(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("evict", help="remove L1 blocks through the WAL: to a byte budget, or by identity",
                       description="Remove L1 blocks through the WAL (crash-safe): down to a byte budget "
                                   "(least recently used first), or every block of some identities.  The "
                                   "store records identity namespaces, not names: --tenant/--model need "
                                   "--identities FILE to map them.")
    _store_arg(p)
    _json_arg(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--to-bytes", metavar="N", type=parse_size,
                      help="evict until L1 holds at most N bytes (4096, 512K, 10M, 1GiB)")
    what.add_argument("--namespace", metavar="HEX", action="append",
                      help="every block of this identity namespace (32 hex digits; repeatable)")
    what.add_argument("--tenant", metavar="T", help="every block of the identities of tenant T")
    p.add_argument("--model", metavar="M", help="every block of the identities of model M (with --tenant: both)")
    p.add_argument("--identities", metavar="FILE", action="append",
                   help="JSON/JSON Lines file of CacheIdentity dicts that --tenant/--model choose from")
    p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    p.set_defaults(func=cmd_evict)

    l2 = sub.add_parser("l2", help="object-store (L2) maintenance", description="Object-store (L2) maintenance.")
    l2sub = l2.add_subparsers(dest="l2_command", metavar="COMMAND")
    p = l2sub.add_parser("compact", help="merge the L2 manifests into as few as possible",
                         description="Merge every manifest of an object store into new ones, then delete "
                                     "the merged.  Safe while other processes publish or compact.")
    p.add_argument("spec", metavar="SPEC", help="the object store: a directory or s3://bucket/prefix")
    _json_arg(p)
    _l2_args(p, spec_flag=False)
    p.set_defaults(func=cmd_l2_compact)
    l2.set_defaults(func=None, _parser=l2)

    p = sub.add_parser("warmup", help="compile (or load from the cache) the ART's kernels now",
                       description="Compile the ART index's Numba kernels into the user's cache directory "
                                   "($QUIVER_NUMBA_CACHE_DIR, $XDG_CACHE_HOME/quiver/numba or "
                                   "~/.cache/quiver/numba), so no later process compiles them.")
    _json_arg(p)
    p.set_defaults(func=cmd_warmup)

    study = sub.add_parser("study", help="run the studies and write the report",
                           description="Run Quiver's studies (from a source checkout) and write the report.")
    study_cli.add_commands(study.add_subparsers(dest="study_command", metavar="COMMAND"))
    study.set_defaults(func=None, _parser=study)

    rep = sub.add_parser("report", help="short for `quiver study report`",
                         description="Write REPORT.md and plots/*.png from a results JSON "
                                     "(same as `quiver study report`).")
    study_cli.add_report_arguments(rep)
    parser.set_defaults(func=None, _parser=parser)
    return parser


# --------------------------------------------------------------------------- errors
# An optional dependency a command needs -> the pyproject extra that installs it.
EXTRA_OF_MODULE = {"matplotlib": "study", "pytest": "study", "pytest_benchmark": "study", "boto3": "s3",
                   "botocore": "s3", "prometheus_client": "metrics", "torch": "torch", "transformers": "torch"}

def _classify(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) of an error out of a command."""
    from quiver.engine.admin import AdminError
    from quiver.engine.errors import QuiverError, StoreConfigError, StoreLockedError
    from quiver.studies.cli import StudyUsageError

    locked: tuple[type, ...] = (StoreLockedError,)
    lower: tuple[type, ...] = ()
    try:
        from quiver.index_backends.errors import IndexBackendError, IndexLockedError
        from quiver.tier.errors import ObjectStoreConfigError, TierError, TierLockedError
        from quiver.walpub.errors import VolumeLockedError, WalpubError

        locked += (TierLockedError, VolumeLockedError, IndexLockedError)
        lower = (TierError, WalpubError, IndexBackendError)
        usage_lower: tuple[type, ...] = (ObjectStoreConfigError,)
    except ImportError:  # pragma: no cover
        usage_lower = ()
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRA_OF_MODULE:
        extra = EXTRA_OF_MODULE[exc.name.split(".")[0]]
        return EXIT_USAGE, f"this command needs the '{extra}' extra: pip install 'quiver-kv[{extra}]' ({msg})"
    if isinstance(exc, locked):
        return EXIT_LOCKED, msg
    if isinstance(exc, (AdminError, StudyUsageError)):
        return EXIT_USAGE, msg
    if isinstance(exc, (StoreConfigError, *usage_lower)):
        return EXIT_USAGE, f"{type(exc).__name__}: {msg}"
    if isinstance(exc, (QuiverError, *lower, OSError)):
        return EXIT_FAILED, f"{type(exc).__name__}: {msg}"
    return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {msg} (QUIVER_DEBUG=1 shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is None:
        args._parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nquiver: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `quiver inspect ... | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more goes to the closed pipe
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every error leaves as one line and a status
        code, msg = _classify(exc)
        if code == EXIT_LOCKED and getattr(args, "path", None) is not None:
            msg = f"store is locked by another process: {args.path}"
        print(f"quiver: {msg}", file=sys.stderr)
        if os.environ.get("QUIVER_DEBUG") == "1":
            import traceback

            traceback.print_exception(exc)
        return code


if __name__ == "__main__":
    sys.exit(main())
