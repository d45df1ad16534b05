"""The README's first page works as written.

* The example marked ``<!-- readme-example ... -->`` runs, unchanged, in a fresh
  process whose working directory is an empty temporary directory (so it must
  create its own store, token ids and blocks), exits 0 and prints exactly the
  block marked ``<!-- readme-example-output -->``.
* Every relative link of README.md and docs/ARCHITECTURE.md names a file or
  directory that exists in the repository (the package index renders the
  README without the repository, so links stay few and relative, and this
  keeps them from rotting).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINKED_DOCS = (README, ROOT / "docs" / "ARCHITECTURE.md")

_FENCE = re.compile(r"```(\w*)\n(.*?)\n```", re.S)
# [text](target) outside code: the target up to a space or the closing parenthesis.
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _block_after(text: str, marker: str, lang: str) -> str:
    """The fenced block of ``lang`` that follows ``marker`` (only blank lines or
    prose without fences may sit between them)."""
    at = text.find(marker)
    assert at >= 0, f"README.md has no {marker!r} marker"
    m = _FENCE.search(text, at)
    assert m is not None, f"no fenced block after {marker!r}"
    assert m.group(1) == lang, f"the block after {marker!r} is {m.group(1)!r}, expected {lang!r}"
    return m.group(2)


def _strip_code(text: str) -> str:
    """Markdown without fenced blocks, indented code blocks and inline code spans."""
    text = _FENCE.sub("", text)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_example_runs_as_written(tmp_path):
    text = README.read_text(encoding="utf-8")
    code = _block_after(text, "<!-- readme-example:", "python")
    expected = _block_after(text, "<!-- readme-example-output -->", "text")
    script = tmp_path / "readme_example.py"
    script.write_text(code + "\n", encoding="utf-8")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the installed package, not the source tree on a path
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"README example failed (rc {proc.returncode}):\n{proc.stderr}"
    assert proc.stdout.strip().splitlines() == expected.strip().splitlines(), (
        f"README example printed:\n{proc.stdout}\nREADME says it prints:\n{expected}")
    # It made its stores where it was run, nowhere else.
    assert {p.name for p in tmp_path.iterdir()} == {"readme_example.py", "node-a", "node-b", "shared-l2"}


def test_readme_example_uses_the_public_import():
    code = _block_after(README.read_text(encoding="utf-8"), "<!-- readme-example:", "python")
    assert "from quiver import BlockStore, CacheIdentity" in code


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(doc):
    text = _strip_code(doc.read_text(encoding="utf-8"))
    links = _LINK.findall(text)
    assert links, f"no links found in {doc}: the pattern is broken"
    broken = []
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URL (https:, mailto:) or an anchor in the same page
        path = target.split("#", 1)[0]
        resolved = (doc.parent / path).resolve()
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"
