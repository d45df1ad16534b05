"""Crash suite level (a) of DESIGN.md: real processes, real files, SIGKILL.

A child process publishes and deletes under load with several threads and
reports each acknowledgement over a pipe only after ``publish`` returned
(studies/walpub_campaign.py).  It is SIGKILLed at random or kills itself at a
named crash point (walpub.volume.CRASH_POINTS), including inside a later
recovery; sometimes the WAL tail is torn as well.  The parent recovers and checks
the five invariants against the acknowledgements, for every index backend
(persistent ones take the catch-up path).  SIGKILL keeps the page cache, so this
level cannot find a missing fsync: tests/test_walpub_crash.py does that.  The
study (studies/bench_walpub.py) runs the same campaign with >= 200 kills.
"""

from __future__ import annotations

import os
import signal

import pytest

from quiver.studies import walpub_campaign as wc
from quiver.walpub import Volume, wal
from quiver.walpub.crash_check import Expect
from quiver.walpub.volume import CRASH_POINTS, object_relpath

BACKENDS = wc.walpub_backends()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "lmdb"])
def test_sigkill_under_load(tmp_path, backend):
    """One random kill and one kill at a named point, per backend."""
    st = wc.kill_campaign(str(tmp_path), backend, 2, seed=7, ops=200)
    assert not st.violations, "\n".join(st.violations[:10])
    assert st.kills + st.completed == 2 and st.kills >= 1
    assert st.checks == 2 and st.acked > 0
    if backend in ("lsm", "art"):  # persistent: recovery caught up from the WAL tail
        assert st.index_modes.get("catch_up", 0) >= 1


def test_every_crash_point_kills_and_recovers(tmp_path):
    """Each named crash point is reached and kills the child (at its first
    passage), recovery points inside a second child's recovery; the invariants
    hold after each.  Persistent index (lmdb), small capacity and compaction
    threshold so the eviction and compaction points come up at once."""
    st = wc.kill_campaign(str(tmp_path), "lmdb", len(CRASH_POINTS), seed=3, ops=200, nth_max=1,
                          schedule=list(CRASH_POINTS),
                          child_args=("--capacity", str(48 << 10), "--compact-min", "16", "--delete-p", "0.5"))
    assert not st.violations, "\n".join(st.violations[:10])
    assert set(st.point_kills) == set(CRASH_POINTS), f"not reached: {set(CRASH_POINTS) - set(st.point_kills)}"
    assert st.recovery_kills == len(wc.RECOVER_POINTS)
    assert st.completed == 0 and st.kills == len(CRASH_POINTS) + len(wc.RECOVER_POINTS)
    assert sum(st.tears.values()) == len(CRASH_POINTS) // 3
    assert st.index_modes.get("catch_up", 0) >= 1


def test_unknown_crash_point_is_refused(tmp_path):
    ev, rc, err = wc.run_child(["child", "--root", str(tmp_path / "v"), "--tag", "x"], crashpoint="publish.typo")
    assert rc == 1 and "crash point 'publish.typo'" in err and not ev.acked


def test_checker_finds_lost_and_resurrected_blocks(tmp_path):
    """The parent's checker is not vacuous: a lost acknowledged block, a deleted
    key that is still there, and a never-published key are each reported."""
    root = str(tmp_path / "v")
    ks = [wc.make_key("chk", i) for i in range(4)]
    data = {k: wc.block_data(k, wc.block_length(k, 1, 64)) for k in ks}
    with Volume(root) as v:
        for k in ks:
            v.publish(k, data[k])
    os.unlink(os.path.join(root, object_relpath(ks[0])))          # acked block lost
    expect = Expect({ks[0]: data[ks[0]], ks[1]: data[ks[1]]}, {}, {ks[2]})   # ks[2] "deleted"; ks[3] unknown
    vs, live, rep = wc.check_volume(root, "flat", expect)
    text = "\n".join(vs)
    assert rep.dropped == [(ks[0], "missing")]
    assert "1-acked-readable" in text and "deleted key came back" in text and "never-published key present" in text
    assert live == {ks[1], ks[2], ks[3]}


def test_expectations_from_events():
    """must / may / gone from the pipe events, keys published once each."""
    ev = wc.Events()
    a, b, c, d, e = (wc.make_key("ev", i) for i in range(5))
    for line in [f"B {a.hex()}", f"P {a.hex()} 0", f"B {b.hex()}", f"B {c.hex()}", f"P {c.hex()} 0",
                 f"DB {c.hex()}", f"DB {d.hex()}", f"DD {d.hex()}", f"DB {e.hex()}"]:
        ev.feed(line)
    x = wc.expectations({d, e}, ev, 1, 64)
    assert set(x.must) == {a} and set(x.may) == {b, c, e} and x.gone == {d}


TEARS = ["cut_mid_frame", "partial_frame", "zeros", "junk"]


@pytest.mark.parametrize("backend", ["flat", "lmdb"])
@pytest.mark.parametrize("tear", TEARS)
def test_torn_tail_then_continue_real_files(tmp_path, backend, tear):
    """Tear the WAL tail of a real volume; recover; publish more; kill a writer
    with SIGKILL; recover again: nothing acknowledged after the tear is lost, and
    before it only the cut frame's block (cut_mid_frame removes durable bytes:
    media damage, which the protocol itself never causes)."""
    root = str(tmp_path / "v")
    ks = [wc.make_key(f"tear-{tear}", i) for i in range(12)]
    blk = {k: wc.block_data(k, wc.block_length(k, 1, 4096)) for k in ks}
    with Volume(root, index=backend) as v:
        for k in ks[:8]:
            v.publish(k, blk[k])
    seg = os.path.join(root, "wal", sorted(os.listdir(os.path.join(root, "wal")))[-1])
    size = os.path.getsize(seg)
    frame = len(wal.encode(wal.PutRecord(1, ks[7], 1, 1)))
    if tear == "cut_mid_frame":
        good = size - frame
        os.truncate(seg, size - frame // 2)
    else:
        good = size
        tail = {"partial_frame": wal.encode(wal.PutRecord(99, ks[11], 3, 3))[:frame - 5],
                "zeros": bytes(40), "junk": os.urandom(40)}[tear]
        with open(seg, "ab") as f:
            f.write(tail)
    with Volume(root, index=backend) as v:
        rep = v.last_recovery
        assert [t[1] for t in rep.truncated] == [good]
        assert os.path.getsize(seg) == good
        kept = ks[:7] if tear == "cut_mid_frame" else ks[:8]
        assert sorted(v.keys()) == sorted(kept)
        if tear == "cut_mid_frame":
            assert rep.dropped == [] and rep.orphans_removed == 1      # the cut block's object
            if backend == "lmdb":   # index applied a seq the log no longer has
                assert rep.index_mode == "reconcile"
                assert v.index.get(ks[7]) is None
        for k in ks[8:10]:
            v.publish(k, blk[k])
    # A SIGKILLed writer on the repaired volume: its acknowledged blocks survive too.
    ev, rc, err = wc.run_child(["child", "--root", root, "--backend", backend, "--tag", f"tear-child-{tear}",
                                "--threads", "2", "--ops", "100", "--delete-p", "0", "--capacity", str(1 << 30)],
                               kill_after_lines=40)
    assert rc == -signal.SIGKILL, err[-2000:]
    expect = wc.expectations(set(kept) | set(ks[8:10]), ev, 1, 8192)
    for k in kept + ks[8:10]:   # the test's own blocks were made with another length range
        expect.must[k] = blk[k]
    vs, live, rep2 = wc.check_volume(root, backend, expect)
    assert not vs, "\n".join(vs[:10])
    assert set(kept) | set(ks[8:10]) <= live and len(ev.acked) > 0
