"""ART-specific tests: node types growing and shrinking, prefix keys, pool growth
and free-list reuse, batch/single agreement, snapshot + log persistence (torn
tail, uncommitted frames, SIGKILL of a real child) and the Numba compile cache.

The protocol itself is covered by tests/test_index_conformance.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quiver.index_backends import _art_kernels as kern
from quiver.index_backends.art import LOG_NAME, SNAP_NAME, ArtCorruptError, ArtIndex, ValueTooLargeError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ix(tmp_path):
    idx = ArtIndex(tmp_path / "art")
    yield idx
    idx.close()


def crash(idx: ArtIndex) -> None:
    """Drop a handle the way a killed process would: no commit, no snapshot."""
    os.close(idx._log_fd)
    idx._log_fd = None
    idx._lock.release()
    idx._closed = True


def check_against(idx: ArtIndex, model: dict[bytes, bytes]) -> None:
    assert len(idx) == len(model)
    assert list(idx.scan_prefix(b"")) == sorted(model.items())
    keys = list(model)
    assert idx.get_many(keys) == [model[k] for k in keys]


# -- node types -----------------------------------------------------------------


def test_node_grows_through_4_16_48_256_and_shrinks_back(ix):
    keys = [b"p" + bytes([b]) for b in range(256)]
    expect_grow = {1: None, 2: "n4", 4: "n4", 5: "n16", 16: "n16", 17: "n48", 48: "n48", 49: "n256", 256: "n256"}
    for n, k in enumerate(keys, start=1):
        ix.put(k, k)
        if n in expect_grow:
            c = ix.node_census()
            kind = expect_grow[n]
            if kind is None:
                assert c["n4"] + c["n16"] + c["n48"] + c["n256"] == 0  # one key: a lone leaf
            else:
                assert c[kind] == 1 and sum(c[t] for t in ("n4", "n16", "n48", "n256")) == 1, (n, c)
    assert ix.get_many(keys) == keys
    # Shrinking uses hysteresis: N256 -> N48 at 40 children, N48 -> N16 at 12,
    # N16 -> N4 at 3, and a node left with one child collapses into it.
    expect_shrink = {41: "n256", 40: "n48", 13: "n48", 12: "n16", 4: "n16", 3: "n4", 2: "n4", 1: None}
    live = list(keys)
    while live:
        k = live.pop()
        assert ix.delete(k)
        n = len(live)
        if n in expect_shrink:
            c = ix.node_census()
            kind = expect_shrink[n]
            if kind is None:
                assert c == {"leaves": 1, "n4": 0, "n16": 0, "n48": 0, "n256": 0, "max_depth": 0}
            else:
                assert c[kind] == 1 and c["leaves"] == n, (n, c)
        assert ix.get_many(live) == live
    assert len(ix) == 0 and ix.node_census()["leaves"] == 0


def test_keys_that_are_prefixes_of_each_other(ix):
    chain = [b"a" * n for n in range(1, 40)]  # each key a prefix of the next
    model = {}
    for k in chain:
        ix.put(k, k[-3:] + bytes([len(k)]))
        model[k] = k[-3:] + bytes([len(k)])
    check_against(ix, model)
    assert [k for k, _ in ix.scan_prefix(b"a" * 30)] == chain[29:]
    # Delete from the middle: terminal leaves go, inner nodes collapse and
    # their compressed paths merge (past the 8 inline prefix bytes).
    for k in chain[5:35:2] + chain[::7]:
        if k in model:
            assert ix.delete(k)
            del model[k]
        check_against(ix, model)
    for k in list(model):
        assert ix.delete(k)
        del model[k]
        check_against(ix, model)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ops_with_long_shared_prefixes_match_a_dict(ix, seed):
    """Keys share 0..40-byte prefixes over a 3-letter alphabet, so compressed
    paths longer than the inline prefix split and merge all the time."""
    rng = random.Random(seed)
    stems = [bytes(rng.choice(b"xyz") for _ in range(rng.randrange(0, 40))) for _ in range(12)]
    model: dict[bytes, bytes] = {}
    for step in range(3000):
        k = rng.choice(stems) + bytes(rng.choice(b"xyz") for _ in range(rng.randrange(0, 6)))
        if not k:
            continue
        if rng.random() < 0.6:
            v = bytes([step & 0xFF]) * rng.randrange(0, 5)
            ix.put(k, v)
            model[k] = v
        else:
            assert ix.delete(k) == (k in model)
            model.pop(k, None)
        if step % 300 == 0:
            check_against(ix, model)
            p = rng.choice(stems)[: rng.randrange(0, 20)]
            assert list(ix.scan_prefix(p)) == sorted((a, b) for a, b in model.items() if a.startswith(p))
    check_against(ix, model)


# -- pools, arenas, free lists --------------------------------------------------


def test_pools_grow_mid_batch_and_keep_every_record(ix):
    start = ix.stats().memory_bytes
    rng = random.Random(5)
    keys = [b"\x11" * 16 + rng.randbytes(32) for _ in range(30_000)]
    vals = [k[-16:] for k in keys]
    ix.put_many(keys, vals)  # N must grow several times inside one batch (resume codes)
    s = ix.stats()
    assert s.memory_bytes > 20 * start
    assert s.records == 30_000
    assert ix.get_many(keys) == vals
    for k in rng.sample(keys, 500):  # single puts grow the pools too
        ix.put(k + b"!", b"x" * 100)
    assert ix.get(keys[0]) == vals[0]


def test_free_lists_reuse_slots(ix):
    rng = random.Random(9)
    keys = [rng.randbytes(12) for _ in range(5000)]
    ix.put_many(keys, [b"v"] * len(keys))
    top = int(ix._N[kern.M_TOP])
    for round_ in range(3):
        for k in keys:
            assert ix.delete(k)
        assert len(ix) == 0
        assert ix.node_census()["leaves"] == 0
        ix.put_many(keys, [b"w"] * len(keys))
        # Same shape again: every leaf and node comes from a free list.
        assert int(ix._N[kern.M_TOP]) == top, round_
    assert ix.get_many(keys[:10]) == [b"w"] * 10


def test_snapshot_defragments_the_node_array(ix):
    rng = random.Random(13)
    keys = [rng.randbytes(20) for _ in range(20_000)]
    ix.put_many(keys, keys)
    for k in keys[::2]:
        ix.delete(k)
    model = {k: k for k in keys[1::2]}
    before = int(ix._N[kern.M_TOP])
    census = ix.node_census()
    ix.snapshot()
    after = int(ix._N[kern.M_TOP])
    live_words = (
        census["leaves"] * kern.LEAF_W
        + census["n4"] * kern.N4_W
        + census["n16"] * kern.N16_W
        + census["n48"] * kern.N48_W
        + census["n256"] * kern.N256_W
    )
    assert after == kern.META_W + live_words < before  # exactly the live blocks remain
    assert ix.node_census() == census
    check_against(ix, model)
    ix.put_many(keys[::2], keys[::2])  # the rebuilt arrays keep working
    assert ix.get_many(keys) == keys


def test_growth_reclaims_free_list_garbage_first(ix):
    rng = random.Random(17)
    old = [rng.randbytes(20) for _ in range(20_000)]
    ix.put_many(old, old)
    for k in old[:15_000]:
        ix.delete(k)
    model = {k: k for k in old[15_000:]}
    free = ix.stats().detail["node_words_free_listed"]
    top = int(ix._N[kern.M_TOP])
    assert free * 4 >= top
    ix._grow(1)  # what a kernel's "grow N" code leads to
    assert int(ix._N[kern.M_TOP]) == top - free
    assert ix.stats().detail["node_words_free_listed"] == 0
    check_against(ix, model)
    batch = [b"\xee" + rng.randbytes(40) for _ in range(5000)]
    ix.put_many(batch, batch)
    model.update((k, k) for k in batch)
    check_against(ix, model)


def test_value_rewrites_compact_the_arena(ix):
    keys = [b"k%05d" % i for i in range(2000)]
    for n in range(1, 30):
        ix.put_many(keys, [b"v" * n] * len(keys))  # new length: the old bytes go dead
    d = ix.stats().detail
    assert d["value_bytes_dead"] <= d["value_bytes_used"]  # compacted as it went
    assert ix.stats().memory_bytes < 4 * (29 * 2000 + 6 * 2000) + 300_000
    assert ix.get_many(keys[:3]) == [b"v" * 29] * 3


def test_value_limit_is_typed(ix):
    with pytest.raises(ValueTooLargeError):
        ix.put(b"k", b"x" * (1 << 19))
    with pytest.raises(ValueTooLargeError):
        ix.put_many([b"a"], [b"x" * (1 << 19)])
    assert len(ix) == 0


# -- batch operations agree with single ones --------------------------------------


def test_batches_agree_with_single_operations(ix):
    rng = random.Random(11)
    ns = b"\x07" * 16
    keys = [ns + rng.randbytes(32) for _ in range(6000)]
    vals = [rng.randbytes(rng.randrange(0, 20)) for _ in keys]  # mixed lengths, some empty
    ix.put_many(keys[:5000], vals[:5000])
    probe = keys + [ns + rng.randbytes(32) for _ in range(500)] + [b"\x07", ns, b"x"]
    rng.shuffle(probe)  # > one 4096-key chunk, hits and misses interleaved
    assert ix.get_many(probe) == [ix.get(k) for k in probe]
    chains = [keys[i : i + rng.randrange(0, 20)] for i in range(0, 6000, 37)]
    chains += [keys[4990:5010], [], keys[:3] + [b"absent"] + keys[3:6]]
    assert ix.longest_prefix_many(chains) == [ix.longest_prefix(c) for c in chains]
    assert ix.longest_prefix(keys[4990:5010]) == 10
    # put_many == the same puts one by one
    other = ArtIndex(Path(ix._dir).parent / "single")
    try:
        for k, v in zip(keys[:5000], vals[:5000]):
            other.put(k, v)
        assert list(other.scan_prefix(b"")) == list(ix.scan_prefix(b""))
    finally:
        other.close()


# -- persistence --------------------------------------------------------------------


def test_snapshot_plus_log_tail_reopen(tmp_path):
    d = tmp_path / "art"
    ix = ArtIndex(d)
    model = {b"k%04d" % i: b"v%d" % i for i in range(3000)}
    ix.put_many(list(model), list(model.values()))
    ix.set_applied_seq(7)
    size = ix.snapshot()
    assert size == os.path.getsize(d / SNAP_NAME)
    assert os.path.getsize(d / LOG_NAME) == 0
    # the tail past the snapshot: puts, overwrites, deletes, a new applied_seq
    for i in range(0, 3000, 3):
        ix.delete(b"k%04d" % i)
        del model[b"k%04d" % i]
    ix.put(b"k0001", b"new")
    model[b"k0001"] = b"new"
    ix.set_applied_seq(9)
    ix.flush()
    crash(ix)
    again = ArtIndex(d)
    check_against(again, model)
    assert again.get_applied_seq() == 9
    again.close()
    # close() snapshotted: the log is empty, the snapshot holds everything
    assert os.path.getsize(d / LOG_NAME) == 0
    third = ArtIndex(d)
    check_against(third, model)
    third.close()


def test_log_frames_covered_by_the_snapshot_are_skipped(tmp_path):
    """A crash after the snapshot rename but before the log truncate leaves old
    frames in the log; replay must skip them (lsn <= snapshot lsn)."""
    d = tmp_path / "art"
    ix = ArtIndex(d)
    ix.put(b"a", b"1")
    ix.delete(b"a")
    ix.put(b"b", b"2")
    ix.flush()
    old_log = (d / LOG_NAME).read_bytes()
    ix.put(b"a", b"3")
    ix.snapshot()
    crash(ix)
    (d / LOG_NAME).write_bytes(old_log)  # stale frames: put a=1, delete a, put b=2
    again = ArtIndex(d)
    assert sorted(again.scan_prefix(b"")) == [(b"a", b"3"), (b"b", b"2")]
    again.close()


def test_torn_log_tail_is_truncated_on_reopen(tmp_path):
    d = tmp_path / "art"
    ix = ArtIndex(d)
    ix.put_many([b"a", b"b"], [b"1", b"2"])
    ix.flush()
    good = os.path.getsize(d / LOG_NAME)
    ix.put(b"c", b"3")
    ix.flush()
    full = os.path.getsize(d / LOG_NAME)
    crash(ix)
    for cut in (full - 1, good + 5, good + 1):  # torn inside the last commit's frames
        with open(d / LOG_NAME, "r+b") as f:
            f.truncate(cut)
        again = ArtIndex(d)
        assert sorted(again.scan_prefix(b"")) == [(b"a", b"1"), (b"b", b"2")]
        assert os.path.getsize(d / LOG_NAME) == good  # cut back to the last COMMIT
        crash(again)
    # a flipped bit in a committed frame: stop there, keep what came before
    data = bytearray((d / LOG_NAME).read_bytes())
    data[-3] ^= 0x40
    (d / LOG_NAME).write_bytes(bytes(data))
    again = ArtIndex(d)
    assert list(again.scan_prefix(b"")) == []
    again.put(b"z", b"9")  # appending after the cut works
    again.flush()
    crash(again)
    again = ArtIndex(d)
    assert list(again.scan_prefix(b"")) == [(b"z", b"9")]
    again.close()


def test_unflushed_writes_are_not_recovered_even_when_spilled(tmp_path):
    d = tmp_path / "art"
    ix = ArtIndex(d)
    ix.put(b"kept", b"1")
    ix.flush()
    big = [b"spill%06d" % i for i in range(60_000)]
    ix.put_many(big, [b"x" * 64] * len(big))  # > SPILL_BYTES: written, not committed
    assert os.path.getsize(d / LOG_NAME) > 4 << 20
    crash(ix)
    again = ArtIndex(d)
    assert list(again.scan_prefix(b"")) == [(b"kept", b"1")]
    again.close()


def test_corrupt_snapshot_is_a_typed_error(tmp_path):
    d = tmp_path / "art"
    ix = ArtIndex(d)
    ix.put(b"k", b"v")
    ix.close()
    data = bytearray((d / SNAP_NAME).read_bytes())
    data[-1] ^= 1
    (d / SNAP_NAME).write_bytes(bytes(data))
    with pytest.raises(ArtCorruptError):
        ArtIndex(d)
    # the failed open released the lock: the repaired snapshot opens again
    data[-1] ^= 1
    (d / SNAP_NAME).write_bytes(bytes(data))
    ArtIndex(d).close()


def test_without_log_flush_snapshots(tmp_path):
    d = tmp_path / "art"
    ix = ArtIndex(d, log=False)
    ix.put_many([b"a", b"b"], [b"1", b"2"])
    ix.set_applied_seq(5)
    ix.flush()
    ix.put(b"c", b"3")  # after the last flush: lost in a crash, walpub replays it
    ix._lock.release()
    ix._closed = True
    again = ArtIndex(d, log=False)
    assert sorted(again.scan_prefix(b"")) == [(b"a", b"1"), (b"b", b"2")]
    assert again.get_applied_seq() == 5
    assert not (d / LOG_NAME).exists()
    again.close()


CHILD = textwrap.dedent(
    """
    import sys
    from quiver.index_backends.art import ArtIndex
    ix = ArtIndex(sys.argv[1])
    i = 0
    while True:
        ix.put_many([b"b%05d-%03d" % (i, j) for j in range(50)], [b"%d" % i] * 50)
        if i:
            ix.delete(b"b%05d-000" % (i - 1))
        print("flushing", i, flush=True)
        ix.flush()
        print("ack", i, flush=True)
        ix.put(b"m%05d" % i, b"unflushed until the next flush")
        i += 1
    """
)


def _state_after_flush(f: int) -> dict[bytes, bytes]:
    model = {}
    for i in range(f + 1):
        model.update({b"b%05d-%03d" % (i, j): b"%d" % i for j in range(50)})
        if i:
            del model[b"b%05d-000" % (i - 1)]
            model[b"m%05d" % (i - 1)] = b"unflushed until the next flush"
    return model


def test_sigkill_child_reopens_to_exactly_the_flushed_contents(tmp_path):
    d = tmp_path / "art"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(d)], stdout=subprocess.PIPE, text=True, env=env)
    last = {"ack": -1, "flushing": -1}
    target = random.Random().randrange(20, 60)
    for line in proc.stdout:
        word, n = line.split()
        last[word] = int(n)
        if last["ack"] >= target:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The child ran on until the signal landed: what it printed meanwhile is
    # still in the pipe (each line is one small, atomic write).
    for line in proc.stdout.read().splitlines():
        word, n = line.split()
        last[word] = int(n)
    last_ack, last_flushing = last["ack"], last["flushing"]
    ix = ArtIndex(d)
    got = dict(ix.scan_prefix(b""))
    ix.close()
    # The child may have been inside the next flush; either way the state is
    # exactly the one some flush acknowledged (or was completing), no more.
    candidates = {f: _state_after_flush(f) for f in {last_ack, last_flushing}}
    assert any(got == m for m in candidates.values()), (last_ack, last_flushing, len(got))


# -- compile cache ----------------------------------------------------------------------
# Where the cache goes, that it never lands in the package, the unwritable case and
# the interpreted first requests: tests/test_first_request.py.

FIRST_CALL = textwrap.dedent(
    """
    import json, time
    t0 = time.perf_counter()
    from quiver.index_backends import _art_kernels as k
    t1 = time.perf_counter()
    N, K, V = k.new_arrays()
    k.put(N, K, V, b"key", b"value")
    k.get(N, K, b"key")
    t2 = time.perf_counter()
    st = k.jit_status()
    print(json.dumps({"import": t1 - t0, "first_calls": t2 - t1, "cache_dir": st["cache_dir"],
                      "from_cache": st["from_cache"]}))
    """
)


def test_compile_cache_is_reused_by_a_fresh_process(tmp_path):
    """QUIVER_ART_JIT=sync (compile at the first call, in the caller): a cold
    process compiles put and get, a second one loads them from the cache."""
    env = dict(os.environ, PYTHONPATH=str(REPO), QUIVER_NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               QUIVER_ART_JIT="sync")

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    cold = run()
    warm = run()
    assert cold["cache_dir"] == str(tmp_path / "cache")
    assert any((tmp_path / "cache").rglob("*.nbi"))
    assert cold["from_cache"] == {"put": False, "get": False}
    assert warm["from_cache"] == {"put": True, "get": True}
