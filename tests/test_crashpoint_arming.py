"""walpub crash points are test hooks, off in production (issue 12, part B).

``QUIVER_WALPUB_CRASHPOINT`` in the environment used to make any process that
imported walpub SIGKILL itself at the named point.  Now a crash point is armed
only by ``walpub.volume.arm_crash_point`` called in the process itself: with
the variable alone a store's put completes (the variable is ignored, with one
warning); armed, the process dies at the point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quiver.walpub import volume

REPO = Path(__file__).resolve().parent.parent

# A production-shaped process: a BlockStore (default index) puts two blocks,
# reopens and reads them back.  ARM is either "" or a call to the test hook.
PUT = """
    import json, sys
    import numpy as np
    from quiver import BlockStore, CacheIdentity
    from quiver.walpub import volume
    {arm}
    ident = CacheIdentity(model="org/m", model_revision="r1", tokenizer="t", tokenizer_revision="t1",
                          tenant="acme", kv_dtype="float16", block_tokens=16, num_layers=2, num_kv_heads=2,
                          head_dim=16)
    tokens = list(range(32))
    blocks = np.random.default_rng(0).standard_normal((2, *ident.block_shape)).astype(np.float16)
    print("opening", flush=True)
    with BlockStore.open(sys.argv[1], ram_bytes=0) as st:
        st.put(ident, tokens, blocks)
        print("put returned", flush=True)
    with BlockStore.open(sys.argv[1], ram_bytes=0) as st:
        same = bool((st.get(ident, tokens) == blocks).all())
    print(json.dumps({{"same": same}}))
"""


def _run(tmp_path: Path, arm: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != volume.CRASHPOINT_ENV}
    env.update(PYTHONPATH=str(REPO), **env_extra)
    code = textwrap.dedent(PUT).format(arm=arm)
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_variable_alone_arms_nothing(tmp_path):
    """What a production process with the variable in its environment does:
    its put completes and the blocks read back (before: SIGKILL in the put)."""
    r = _run(tmp_path, "", **{volume.CRASHPOINT_ENV: "publish.committed"})
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "put returned" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"same": True}
    assert r.stderr.count("arms nothing") == 1, r.stderr[-3000:]  # said once, not per put


@pytest.mark.parametrize("point", ["publish.committed", "commit.wal_synced", "publish.object_written"])
def test_armed_by_the_test_hook_the_process_dies_there(tmp_path, point):
    r = _run(tmp_path, f"volume.arm_crash_point({point!r})")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert "opening" in r.stdout and "put returned" not in r.stdout


def test_nth_passage_and_disarm(tmp_path):
    """``@n`` counts passages: the first put passes, the second dies; disarming
    (None) before any passage lets both through."""
    two_puts = """
        from quiver.walpub import Volume, volume
        import sys
        volume.arm_crash_point({spec!r})
        {disarm}
        with Volume(sys.argv[1] + "/v") as v:
            v.publish(b"\\x01" * 32, b"a")
            print("first", flush=True)
            v.publish(b"\\x02" * 32, b"b")
            print("second", flush=True)
    """
    env = {k: v for k, v in os.environ.items() if k != volume.CRASHPOINT_ENV}
    env["PYTHONPATH"] = str(REPO)

    def run(disarm: str, d: Path) -> subprocess.CompletedProcess:
        code = textwrap.dedent(two_puts).format(spec="publish.committed@2", disarm=disarm)
        return subprocess.run([sys.executable, "-c", code, str(d)], env=env, capture_output=True, text=True,
                              timeout=120)

    r = run("", tmp_path / "a")
    assert r.returncode == -signal.SIGKILL and r.stdout.split() == ["first"], (r.returncode, r.stderr[-2000:])
    r = run("volume.arm_crash_point(None)", tmp_path / "b")
    assert r.returncode == 0 and r.stdout.split() == ["first", "second"], r.stderr[-2000:]


@pytest.mark.parametrize("spec", ["publish.typo", "publish.committed@0", "publish.committed@x", ""])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match="crash point"):
        volume.arm_crash_point(spec)
    assert volume._CRASH_ARMED is None  # nothing was armed by the refused call
