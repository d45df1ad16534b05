"""``quiver`` command line: run the studies, write the report.

    quiver run [--full] [--json PATH] [-- PYTEST_ARGS...]
        Runs every study suite (studies/bench_*.py) in ONE pytest session, with
        pytest -v progress, and writes pytest-benchmark's JSON (default
        bench_results/results.json).  --full sets QUIVER_FULL=1; without it the
        run uses quick sizes (QUIVER_SMOKE=1 in the environment gives smoke
        sizes).  Arguments after ``--`` go to pytest and replace the default
        target ``studies`` when they name files (e.g. ``-- studies/bench_index.py``).
        Exits with pytest's status; the JSON lists the studies that failed.

    quiver report [--input bench_results/results.json] [--out bench_results]
        Writes REPORT.md and plots/*.png from the JSON alone.

Also ``python -m quiver.studies.cli ...``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO_ROOT / "bench_results" / "results.json"
DEFAULT_OUT = REPO_ROOT / "bench_results"


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


def cmd_run(args: argparse.Namespace) -> int:
    json_path = Path(args.json).resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    extra = list(args.pytest_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    env = dict(os.environ)
    env.pop("QUIVER_FULL", None)
    if args.full:
        env["QUIVER_FULL"] = "1"
    mode = "smoke" if env.get("QUIVER_SMOKE") == "1" else ("full" if args.full else "quick")
    user_cmd = " ".join(
        ["QUIVER_SMOKE=1"] * (mode == "smoke") + ["python -m quiver.studies.cli run"] + ["--full"] * args.full
        + (["--json", shlex.quote(str(args.json))] if args.json != str(DEFAULT_JSON) else [])
        + (["--"] + [shlex.quote(a) for a in extra] if extra else [])
    )
    env["QUIVER_RUN_COMMAND"] = user_cmd
    argv = pytest_argv(json_path, extra)
    print(f"quiver run: mode={mode}  json={json_path}", flush=True)
    print("  " + " ".join(shlex.quote(a) for a in argv), flush=True)
    t0 = time.time()
    rc = subprocess.call(argv, cwd=REPO_ROOT, env=env)
    print(f"quiver run: pytest exited {rc} after {time.time() - t0:.0f} s; results in {json_path}", flush=True)
    return rc


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(Path(args.input), Path(args.out))
    print(f"quiver report: wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quiver", description="Run Quiver's studies and write the report.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every study in one pytest session")
    run.add_argument("--full", action="store_true", help="full sizes (QUIVER_FULL=1)")
    run.add_argument("--json", default=str(DEFAULT_JSON), help="results JSON (default bench_results/results.json)")
    run.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: extra pytest arguments")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="write REPORT.md and plots from the results JSON")
    rep.add_argument("--input", default=str(DEFAULT_JSON))
    rep.add_argument("--out", default=str(DEFAULT_OUT))
    rep.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
