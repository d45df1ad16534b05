"""ArtIndex under walpub: ``write_batch`` is all-or-nothing across a crash, and
every file the ART touches goes through walpub's I/O layer, so the crash
simulator (walpub.simfs, walpub.crash_check) checks the snapshot protocol: at every recorded
point, every power-loss state reopens to exactly the content of a flush that
had started, at least the last one acknowledged, with its applied_seq.
Planted bugs (each snapshot fsync disabled) must break that check."""

from __future__ import annotations

import os

import pytest

from quiver.index_backends.art import LOG_NAME, SNAP_NAME, SPILL_BYTES, ArtCorruptError, ArtIndex, ValueTooLargeError
from quiver.index_backends.errors import IndexLockedError, InvalidKeyError
from quiver.walpub.crash_states import crash_states
from quiver.walpub.simfs import CrashState, SimFileSystem

DIR = "/vol/index-art"


def crash(idx: ArtIndex) -> None:
    """Drop a handle the way a killed process would: no commit, no snapshot."""
    if idx._log_fd is not None:
        idx._io.close(idx._log_fd)
        idx._log_fd = None
    idx._lock.release()
    idx._closed = True


def content(idx: ArtIndex) -> tuple[dict[bytes, bytes], int]:
    return dict(idx.scan_prefix(b"")), idx.get_applied_seq()


# -- write_batch ------------------------------------------------------------------


@pytest.mark.parametrize("log", [True, False])
def test_write_batch_is_all_or_nothing_across_close_and_crash(tmp_path, log):
    d = tmp_path / "art"
    ix = ArtIndex(d, log=log)
    ix.write_batch([b"a", b"b", b"c"], [b"1", b"2", b"3"], [], 1)
    ix.flush()
    before = content(ix)
    # puts, then deletes (a key in both ends deleted), then the seq
    ix.write_batch([b"d", b"b"], [b"4", b"22"], [b"b", b"a", b"absent"], 2)
    after = ({b"c": b"3", b"d": b"4"}, 2)
    assert content(ix) == after
    crash(ix)  # not flushed: none of it
    ix = ArtIndex(d, log=log)
    assert content(ix) == before
    ix.write_batch([b"d", b"b"], [b"4", b"22"], [b"b", b"a", b"absent"], 2)
    ix.flush()
    crash(ix)  # flushed: all of it
    ix = ArtIndex(d, log=log)
    assert content(ix) == after
    ix.write_batch([], [], [], 9)  # empty lists: just the seq
    ix.close()
    ix = ArtIndex(d, log=log)
    assert content(ix) == (after[0], 9)
    ix.close()


def test_write_batch_torn_anywhere_in_the_log_is_all_or_nothing(tmp_path):
    """Cut the log at every byte of one batch's frames (puts, deletes, seq,
    COMMIT): reopen shows the state before the batch, never part of it."""
    d = tmp_path / "art"
    ix = ArtIndex(d)
    ix.write_batch([b"k%d" % i for i in range(5)], [b"v"] * 5, [], 1)
    ix.flush()
    good = os.path.getsize(d / LOG_NAME)
    ix.write_batch([b"n1", b"n2"], [b"x", b"y"], [b"k1", b"k2"], 2)
    ix.flush()
    full_log = (d / LOG_NAME).read_bytes()
    crash(ix)
    before = ({b"k%d" % i: b"v" for i in range(5)}, 1)
    after = ({b"k0": b"v", b"k3": b"v", b"k4": b"v", b"n1": b"x", b"n2": b"y"}, 2)
    for cut in range(good, len(full_log) + 1):
        (d / LOG_NAME).write_bytes(full_log[:cut])
        ix = ArtIndex(d)
        assert content(ix) == (after if cut == len(full_log) else before), cut
        crash(ix)


def test_spilled_unflushed_batch_is_not_recovered(tmp_path):
    d = tmp_path / "art"
    ix = ArtIndex(d)
    ix.write_batch([b"kept"], [b"1"], [], 1)
    ix.flush()
    big = [b"spill%06d" % i for i in range(60_000)]
    ix.write_batch(big, [b"x" * 64] * len(big), [b"kept"], 2)  # > SPILL_BYTES: written, uncommitted
    assert os.path.getsize(d / LOG_NAME) > SPILL_BYTES
    crash(ix)
    ix = ArtIndex(d)
    assert content(ix) == ({b"kept": b"1"}, 1)
    ix.close()


@pytest.mark.parametrize("log", [True, False])
def test_write_batch_bad_input_writes_nothing(tmp_path, log):
    d = tmp_path / "art"
    ix = ArtIndex(d, log=log)
    ix.write_batch([b"k"], [b"v"], [], 3)
    ix.flush()
    for keys, values, deletes, seq, err in [
        ([b"x"], [b"v"], [b""], 4, InvalidKeyError),
        ([b"x"], [b"v"], ["k"], 4, InvalidKeyError),
        ([b"x"], [b"v"], [b"k" * 40_000], 4, InvalidKeyError),
        ([b"x"], [b"v"], b"k", 4, InvalidKeyError),
        ([b"x", 7], [b"v", b"w"], [], 4, InvalidKeyError),
        ([b"x"], ["v"], [], 4, TypeError),
        ([b"x"], [bytearray(b"v")], [], 4, TypeError),
        ([b"x", b"y"], [b"v"], [], 4, ValueError),
        ([b"x"], [b"v" * (1 << 19)], [], 4, ValueTooLargeError),
        ([b"x"], [b"v"], [b"k"], -1, ValueError),
        ([b"x"], [b"v"], [b"k"], 1 << 64, ValueError),
        ([b"x"], [b"v"], [b"k"], "4", TypeError),
        ([b"x"], [b"v"], [b"k"], True, TypeError),
    ]:
        with pytest.raises(err):
            ix.write_batch(keys, values, deletes, seq)
    assert content(ix) == ({b"k": b"v"}, 3)
    ix.close()  # nothing changed: nothing to log or snapshot
    ix = ArtIndex(d, log=log)
    assert content(ix) == ({b"k": b"v"}, 3)
    ix.close()


# -- the I/O layer ----------------------------------------------------------------


def _workload(ix: ArtIndex, sim: SimFileSystem | None = None) -> list[tuple[dict[bytes, bytes], int]]:
    """Batches and flushes; marks ("start", j) / ("done", j) around flush j.
    Returns the content of flush j (0: the empty index)."""
    model: dict[bytes, bytes] = {}
    states = [({}, 0)]
    mark = sim.mark if sim is not None else (lambda ev: None)
    seq = 0
    for r in range(4):
        for _ in range(2):
            seq += 1
            puts = {b"key-%d-%d" % (r, i): b"val-%d-%d" % (seq, i) * (1 + i % 3) for i in range(6)}
            dels = [b"key-%d-%d" % (r - 1, i) for i in range(0, 6, 2)] if r else []
            ix.write_batch(list(puts), list(puts.values()), dels, seq)
            model.update(puts)
            for k in dels:
                model.pop(k, None)
        states.append((dict(model), seq))
        mark(("start", len(states) - 1))
        ix.flush()
        mark(("done", len(states) - 1))
    ix.write_batch([b"late"], [b"unflushed"], [], seq + 1)  # lost in a crash; close snapshots it
    model[b"late"] = b"unflushed"
    states.append((dict(model), seq + 1))
    mark(("start", len(states) - 1))
    ix.close()
    mark(("done", len(states) - 1))
    return states


def _record(log: bool, disabled: set[str] = frozenset()):
    sim = SimFileSystem()
    sim.disabled_fsyncs = set(disabled)
    sim.start_recording()
    ix = ArtIndex(DIR, io=sim, log=log)
    sim.mark(("done", 0))
    states = _workload(ix, sim)
    return sim, states


def _allowed(sim: SimFileSystem, n_ops: int) -> tuple[int, int]:
    """Flushes a crash after op ``n_ops`` may show: from the last acknowledged
    to the last started (a flush marked "start" at op s writes ops > s)."""
    lo = max([j for at, (ev, j) in sim.marks if ev == "done" and at <= n_ops], default=0)
    hi = max([j for at, (ev, j) in sim.marks if ev == "start" and at < n_ops], default=0)
    return lo, hi


def _check(sim, states, log: bool, max_states: int) -> dict[str, int]:
    """Reopen every crash state; count exact/stale/corrupt/wrong outcomes.
    exact: some flushed content in the allowed range; stale: an older flush
    (durability lost); corrupt: ArtCorruptError; wrong: anything else."""
    out = {"states": 0, "exact": 0, "stale": 0, "corrupt": 0, "wrong": 0}
    for pt in sim.points:
        lo, hi = _allowed(sim, pt.n_ops)
        for st in crash_states(pt, sim.kinds, max_states=max_states):
            out["states"] += 1
            try:
                ix = ArtIndex(DIR, io=SimFileSystem(st), log=log)
            except ArtCorruptError:
                out["corrupt"] += 1
                continue
            got = content(ix)
            ix.write_batch([b"after"], [b"crash"], [], 1 << 40)  # a stale tmp must not stop
            ix.flush()                                           # the next snapshot
            ix.close()
            js = [j for j, s in enumerate(states) if s == got]
            if any(lo <= j <= hi for j in js):
                out["exact"] += 1
            elif any(j < lo for j in js):
                out["stale"] += 1
            else:
                out["wrong"] += 1
    return out


def test_snapshot_survives_every_crash_state():
    sim, states = _record(log=False)
    assert sim.fsync_counts["index_snapshot"] == len(states) - 1
    assert sim.fsync_counts["index_dir"] >= len(states) - 1
    r = _check(sim, states, log=False, max_states=64)
    assert r["states"] > 200, r
    assert r["exact"] == r["states"], r


@pytest.mark.parametrize("label", ["index_snapshot", "index_dir"])
def test_planted_bug_each_snapshot_fsync_is_load_bearing(label):
    """Without the tmp file's fsync the rename can outlive the data (a torn or
    empty art.snap); without the directory fsync an acknowledged snapshot can
    vanish.  Either way some state fails the check above -- but the CRC still
    turns a torn snapshot into ArtCorruptError, never into wrong content."""
    sim, states = _record(log=False, disabled={label})
    assert sim.skipped_fsyncs[label] > 0
    r = _check(sim, states, log=False, max_states=64)
    assert r["exact"] < r["states"], r
    assert r["wrong"] == 0, r
    if label == "index_snapshot":
        assert r["corrupt"] > 0, r
    else:
        assert r["stale"] > 0, r


@pytest.fixture
def index_log_label(monkeypatch):
    """walpub itself opens the ART with log=False, so its FSYNC_LABELS may lack
    the label of the ART's own log; add it for the log-mode campaign."""
    import quiver.walpub.io
    from quiver import walpub
    if "index_log" not in walpub.io.FSYNC_LABELS:
        monkeypatch.setattr(walpub.io, "FSYNC_LABELS", walpub.io.FSYNC_LABELS + ("index_log",))


@pytest.mark.usefixtures("index_log_label")
def test_log_mode_survives_every_crash_state():
    sim, states = _record(log=True)
    r = _check(sim, states, log=True, max_states=64)
    assert r["states"] > 100, r
    assert r["exact"] == r["states"], r


@pytest.mark.usefixtures("index_log_label")
@pytest.mark.parametrize("label", ["index_log", "index_dir"])
def test_planted_bug_log_mode_fsyncs_are_load_bearing(label):
    """The log's commit fsync, and the directory fsync after the log file is
    created (else a crash can drop art.log and every commit in it)."""
    sim, states = _record(log=True, disabled={label})
    r = _check(sim, states, log=True, max_states=64)
    assert r["stale"] > 0 and r["wrong"] == 0, r


def test_real_and_simulated_file_systems_write_the_same_snapshot(tmp_path):
    sim = SimFileSystem()
    _workload(ArtIndex(DIR, io=sim, log=False))
    _workload(ArtIndex(tmp_path / "art", log=False))
    assert sim.read_file(f"{DIR}/{SNAP_NAME}") == (tmp_path / "art" / SNAP_NAME).read_bytes()
    assert sorted(sim.listdir(DIR)) == sorted(os.listdir(tmp_path / "art")) == sorted(
        [SNAP_NAME, "QUIVER-INDEX.LOCK"])


def test_lock_goes_through_the_io_layer():
    sim = SimFileSystem()
    ix = ArtIndex(DIR, io=sim, log=False)
    with pytest.raises(IndexLockedError):
        ArtIndex(DIR, io=sim, log=False)
    ix.close()
    ArtIndex(DIR, io=sim, log=False).close()


def _with_snap(state: CrashState, data: bytes) -> SimFileSystem:
    files = tuple((p, data if p == f"{DIR}/{SNAP_NAME}" else b) for p, b in state.files)
    return SimFileSystem(CrashState(files, state.dirs))


def test_damaged_snapshot_is_a_typed_error_and_seq_comes_back():
    sim = SimFileSystem()
    ix = ArtIndex(DIR, io=sim, log=False)
    ix.write_batch([b"a", b"b"], [b"1", b"22"], [], 41)
    ix.close()
    state = sim.snapshot()
    snap = sim.read_file(f"{DIR}/{SNAP_NAME}")
    again = ArtIndex(DIR, io=_with_snap(state, snap), log=False)
    assert content(again) == ({b"a": b"1", b"b": b"22"}, 41)  # walpub replays its WAL past 41
    again.close()
    bad = [b"", snap[:10], snap[:-1], snap + b"\0", b"X" + snap[1:]]
    bad += [snap[:i] + bytes([snap[i] ^ 0x10]) + snap[i + 1:] for i in range(0, len(snap), max(1, len(snap) // 97))]
    for data in bad:
        with pytest.raises(ArtCorruptError):
            ArtIndex(DIR, io=_with_snap(state, data), log=False)
