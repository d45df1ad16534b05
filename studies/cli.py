"""The studies' command line: run them, write the report.

    quiver study run [--full] [--out DIR | --json PATH] [-- PYTEST_ARGS...]
        Runs every study suite (studies/bench_*.py) in ONE pytest session, with
        pytest -v progress, and writes pytest-benchmark's JSON to DIR/results.json
        (default DIR: ./bench_results under the current directory; --json names
        the file itself).  --full sets QUIVER_FULL=1; without it the run uses
        quick sizes (QUIVER_SMOKE=1 in the environment gives smoke sizes).
        Arguments after ``--`` go to pytest and replace the default target
        ``studies`` when they name files (e.g. ``-- studies/bench_index.py``).
        Exits with pytest's status; the JSON lists the studies that failed.
        The studies need a source checkout (its tests/ helpers and data): from
        an installed wheel ``run`` says so and exits 2.

    quiver study report [--input PATH] [--out DIR]     (also: quiver report)
        Writes DIR/REPORT.md and DIR/plots/*.png from the JSON alone.  Default
        input: ./bench_results/results.json under the current directory;
        default DIR: the input's directory.

Also ``python -m quiver.studies.cli run|report`` (what the Makefile runs from the
repository root, so the results land in the repository's bench_results/).
Nothing is ever written next to the installed package: every default is
relative to the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: The source checkout this module lives in (its parent's parent), when it is one.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = "bench_results"
RESULTS_NAME = "results.json"


def source_root() -> Path | None:
    """The repository root when this module runs from a source checkout
    (editable install or PYTHONPATH), else None (an installed wheel)."""
    root = REPO_ROOT
    if (root / "pyproject.toml").is_file() and (root / "studies" / "conftest.py").is_file():
        return root
    return None


def default_out() -> Path:
    """./bench_results under the current directory (absolute)."""
    return Path.cwd() / DEFAULT_DIR


def results_path(args: argparse.Namespace) -> Path:
    """The results JSON a run writes: --json, else DIR/results.json with DIR = --out."""
    if getattr(args, "json", None):
        return Path(args.json).resolve()
    out = Path(args.out) if getattr(args, "out", None) else default_out()
    return (out / RESULTS_NAME).resolve()


def pytest_argv(json_path: Path, extra: list[str]) -> list[str]:
    """The pytest command line of one study run."""
    targets = [a for a in extra if not a.startswith("-") and (a.startswith("studies") or a.endswith(".py") or "::" in a)]
    argv = [
        sys.executable, "-m", "pytest",
        *([] if targets else ["studies"]),
        "-v", "-p", "no:cacheprovider",
        "--benchmark-json", str(json_path),
        "--benchmark-group-by=group",
        "--benchmark-sort=name",
        *extra,
    ]
    return argv


class StudyUsageError(Exception):
    """Bad input to a study command: one line, exit status 2."""


def cmd_run(args: argparse.Namespace) -> int:
    root = source_root()
    if root is None:
        raise StudyUsageError(
            f"the studies run from a source checkout of Quiver (they need its tests/ helpers and data); "
            f"this installation ({Path(__file__).resolve().parent}) has none. `quiver report` works anywhere")
    json_path = results_path(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    extra = list(args.pytest_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    env = dict(os.environ)
    env.pop("QUIVER_FULL", None)
    if args.full:
        env["QUIVER_FULL"] = "1"
    mode = "smoke" if env.get("QUIVER_SMOKE") == "1" else ("full" if args.full else "quick")
    where = []
    if args.json:
        where = ["--json", shlex.quote(str(args.json))]
    elif args.out:
        where = ["--out", shlex.quote(str(args.out))]
    user_cmd = " ".join(
        ["QUIVER_SMOKE=1"] * (mode == "smoke") + ["python -m quiver.studies.cli run"] + ["--full"] * args.full
        + where + (["--"] + [shlex.quote(a) for a in extra] if extra else [])
    )
    env["QUIVER_RUN_COMMAND"] = user_cmd
    argv = pytest_argv(json_path, extra)
    print(f"quiver study run: mode={mode}  json={json_path}", flush=True)
    print("  " + " ".join(shlex.quote(a) for a in argv), flush=True)
    t0 = time.time()
    rc = subprocess.call(argv, cwd=root, env=env)
    print(f"quiver study run: pytest exited {rc} after {time.time() - t0:.0f} s; results in {json_path}", flush=True)
    return rc


def cmd_report(args: argparse.Namespace) -> int:
    src = Path(args.input) if args.input else default_out() / RESULTS_NAME
    if not src.is_file():
        raise StudyUsageError(f"no results JSON at {src} (run `quiver study run` first, or give --input)")
    try:
        json.loads(src.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudyUsageError(f"{src} is not a results JSON: {exc}") from None
    out = Path(args.out) if args.out else src.resolve().parent
    from .report import write_report

    path = write_report(src, out)
    print(f"quiver report: wrote {path}")
    return 0


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--full", action="store_true", help="full sizes (QUIVER_FULL=1)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR",
                       help="write DIR/results.json (default: ./bench_results under the current directory)")
    where.add_argument("--json", metavar="PATH", help="write the results JSON to exactly this file")
    run.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: extra pytest arguments")
    run.set_defaults(func=cmd_run)


def add_report_arguments(rep: argparse.ArgumentParser) -> None:
    rep.add_argument("--input", metavar="PATH",
                     help="results JSON (default: ./bench_results/results.json under the current directory)")
    rep.add_argument("--out", metavar="DIR", help="where REPORT.md and plots/ go (default: the input's directory)")
    rep.set_defaults(func=cmd_report)


def add_commands(sub) -> None:
    """``run`` and ``report`` on an argparse subparsers object."""
    add_run_arguments(sub.add_parser("run", help="run every study in one pytest session",
                                     description="Run every study in one pytest session."))
    add_report_arguments(sub.add_parser("report", help="write REPORT.md and plots from the results JSON",
                                        description="Write REPORT.md and plots/*.png from a results JSON."))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quiver.studies.cli",
                                     description="Run Quiver's studies and write the report.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StudyUsageError as exc:
        print(f"quiver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
