"""walpub: durable publish throughput, write amplification, recovery time, and the
crash campaign (simulated crash states, real SIGKILLs, bit flips).

Groups and their ``extra_info``:

* ``walpub-publish``: ``publish`` of ``block_bytes`` blocks by ``threads``
  threads, durable on return (3 fsyncs per block alone; group commit shares the
  WAL fsync).  ``blocks_per_s``, ``mb_per_s`` (payload, 1 MB = 1e6 bytes),
  ``disk_mb_per_s`` and ``ratio_to_disk``: the fsync'd sequential write
  bandwidth (1 MiB ``write`` + ``fsync`` each into one file in the same
  directory), measured right before each case (the disk is shared); the row
  ``fsync'd sequential write`` is a longer run of it.  ``fsyncs_per_block`` and
  ``wal_fsyncs_per_block`` from VolumeStats (publishing only, recovery's
  excluded); ``fsyncs_per_block_warm`` leaves out the ``objects_parent`` fsyncs
  of the first use of each ``objects/ab/`` directory of a fresh volume.
* ``walpub-amplification``: the same blocks (random bytes) stored by both
  stores, one thread, one block per call.  ``write_amplification``: bytes the
  process sent towards the disk
  (``/proc/self/io`` ``write_bytes``, charged when a page is dirtied, so a
  4 KiB page re-dirtied by each small WAL append counts each time; journal and
  directory blocks written by the kernel are not in it) per payload byte, and
  file bytes left on disk per payload byte, for walpub and for RocksDB
  (rocksdict, raw mode, defaults otherwise) storing the same blocks as values
  with ``WriteOptions.sync = True`` on every put (one WAL fsync per block: the
  same "durable on return" as ``publish``), then ``flush()`` of the memtable into
  an SST and close: the bytes a value costs until it sits in the LSM tree.
* ``walpub-recovery``: ``Volume.open`` (recovery) after SIGKILL.  A base volume
  of ``blocks`` 4 KiB objects is built once per size (object fsyncs masked,
  then one ``sync()``: the files are the same); per backend a child process
  opens it, publishes 256 more blocks and SIGKILLs itself (a persistent index
  applied those commits; SIGKILL keeps the page cache, so its catch-up replays
  the WAL and re-puts only the tail after its applied seq); then the open is
  timed in this process, page cache warm.  ``verify`` "crc" reads every
  object, "size" only stats it (reads still verify every time).
  ``index_mode`` says whether the index was rebuilt or caught up.  The base
  volume is shared by the rows in turn, so ``blocks`` (live at the open) grows
  by 256 per row.
* ``walpub-campaign``: crash states explored by walpub.crash_check.explore (random
  workloads), SIGKILL rounds per backend, bit flips, and their violations,
  which must be 0.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time

import pytest

from quiver.studies import walpub_campaign as wc
from .config import MODE, pick
from .conftest import make_bench_dir, run_once
from quiver.walpub import Volume

KiB, MiB = 1 << 10, 1 << 20
BACKENDS = wc.walpub_backends()
SMALL_BACKENDS = [b for b in BACKENDS if b in ("flat", "lmdb")]

PUBLISH_SIZES = pick(smoke=[4 * KiB, 16 * KiB], quick=[64 * KiB, MiB, 4 * MiB], full=[64 * KiB, MiB, 4 * MiB])
PUBLISH_BYTES = pick(smoke=256 * KiB, quick=24 * MiB, full=256 * MiB)     # per case and round
PUBLISH_THREADS = [1, 2, 8]
PUBLISH_ROUNDS = pick(smoke=1, quick=2, full=3)
BASELINE_BYTES = pick(smoke=4 * MiB, quick=64 * MiB, full=256 * MiB)    # the baseline row
ADJACENT_BASELINE_BYTES = pick(smoke=2 * MiB, quick=16 * MiB, full=64 * MiB)   # before each case

AMP_SIZES = pick(smoke=[4 * KiB], quick=[4 * KiB, 64 * KiB, MiB], full=[4 * KiB, 64 * KiB, MiB])
AMP_BYTES = pick(smoke=512 * KiB, quick=16 * MiB, full=128 * MiB)
AMP_MAX_BLOCKS = pick(smoke=128, quick=1024, full=16384)

# (blocks, backend, verify): quick mode measures "crc" (reads every object) at 10k
# only; at 100k it measures "size", the mode docs/WALPUB.md advises for large volumes.
RECOVERY_CASES = pick(
    smoke=[(300, b, v) for b in SMALL_BACKENDS for v in ("crc", "size")],
    quick=[(10_000, b, v) for b in BACKENDS for v in ("crc", "size")] + [(100_000, b, "size") for b in BACKENDS],
    full=[(n, b, v) for n in (10_000, 100_000, 1_000_000) for b in BACKENDS for v in ("crc", "size")],
)
RECOVERY_BLOCK = 4 * KiB
RECOVERY_TAIL = pick(smoke=32, quick=256, full=256)

CRASH_STATES = pick(smoke=300, quick=10_000, full=50_000)          # distinct, at least
KILL_ROUNDS = pick(smoke={"flat": 2, "lmdb": 2},
                   quick={"flat": 40, "sorted": 36, "lmdb": 40, "lsm": 40, "art": 8},
                   full={"flat": 200, "sorted": 100, "lmdb": 200, "lsm": 200, "art": 50})
MIN_KILLS = pick(smoke=2, quick=200, full=800)
OBJECT_FLIP_BATCHES = pick(smoke=1, quick=19, full=40)
OBJECTS_PER_BATCH = pick(smoke=30, quick=500, full=500)
WAL_FLIPS = pick(smoke=20, quick=600, full=3000)
MIN_FLIPS = pick(smoke=50, quick=10_000, full=20_000)


def _label(n: int) -> str:
    return f"{n // MiB}MiB" if n >= MiB else f"{n // KiB}KiB"


def _fsyncs(stats) -> int:
    return sum(stats.fsyncs.values())




@pytest.fixture(scope="module")
def scratch():
    d = make_bench_dir("walpub")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ walpub-publish
def _disk_baseline(scratch, nbytes: int) -> float:
    """MB/s of 1 MiB writes, each followed by fsync, into one file (same disk)."""
    path = os.path.join(str(scratch), "baseline.dat")
    buf = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    for _ in range(nbytes // MiB):
        os.write(fd, buf)
        os.fsync(fd)
    sec = time.perf_counter() - t0
    os.close(fd)
    assert os.path.getsize(path) == nbytes
    os.unlink(path)
    return nbytes / sec / 1e6


def test_fsync_sequential_write_baseline(benchmark, scratch):
    benchmark.group = "walpub-publish"
    mbps = run_once(benchmark, lambda: _disk_baseline(scratch, BASELINE_BYTES))
    assert mbps > 0
    benchmark.extra_info.update(store="fsync'd sequential write", block_bytes=MiB, threads=1,
                                payload_bytes=BASELINE_BYTES, mb_per_s=mbps, blocks_per_s=mbps * 1e6 / MiB,
                                fsyncs_per_block=1.0, ratio_to_disk=1.0)


@pytest.mark.parametrize("threads", PUBLISH_THREADS)
@pytest.mark.parametrize("size", PUBLISH_SIZES, ids=_label)
def test_publish_throughput(benchmark, scratch, size, threads):
    benchmark.group = "walpub-publish"
    # The disk is shared: measure its fsync'd bandwidth right before this case.
    disk = _disk_baseline(scratch, ADJACENT_BASELINE_BYTES)
    n = max(PUBLISH_BYTES // size, 2 * threads)
    n -= n % threads
    payload = os.urandom(size)
    runs = []

    def one_round(r: int):
        root = os.path.join(str(scratch), f"pub-{size}-{threads}-{r}")
        vol = Volume(root)
        f0 = vol.stats().fsyncs
        keys = [wc.make_key(f"pub/{size}/{threads}/{r}", i) for i in range(n)]
        errors = []

        def worker(t):
            try:
                for k in keys[t::threads]:
                    vol.publish(k, payload)
            except Exception as exc:  # noqa: BLE001 - fails the study below
                errors.append(exc)

        ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        sec = time.perf_counter() - t0
        st = vol.stats()
        assert not errors, errors[:3]
        assert st.publishes == n and len(vol) == n and vol.read(keys[-1]) == payload
        f1 = st.fsyncs
        delta = {k: f1.get(k, 0) - f0.get(k, 0) for k in f1}
        vol.close()
        shutil.rmtree(root)
        runs.append(dict(seconds=sec, fsyncs=sum(delta.values()), wal=delta.get("wal", 0), commits=st.commits,
                         parent=delta.get("objects_parent", 0)))

    def timed():
        for r in range(PUBLISH_ROUNDS):
            one_round(r)
        return statistics.median(x["seconds"] for x in runs)

    sec = run_once(benchmark, timed)
    last = runs[-1]
    mbps = n * size / sec / 1e6
    benchmark.extra_info.update(
        store="walpub", block_bytes=size, threads=threads, blocks=n, payload_bytes=n * size, rounds=len(runs),
        median_s=sec, blocks_per_s=n / sec, mb_per_s=mbps, disk_mb_per_s=disk, ratio_to_disk=mbps / disk,
        fsyncs_per_block=last["fsyncs"] / n, wal_fsyncs_per_block=last["wal"] / n, commits=last["commits"],
        # objects/ab/ made on first use (256 of them in a fresh volume): gone in a warm one
        objects_parent_fsyncs=last["parent"], fsyncs_per_block_warm=(last["fsyncs"] - last["parent"]) / n,
    )


# ------------------------------------------------------------------ walpub-amplification
def _write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def _tree_bytes(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def _walpub_store(root: str, blocks) -> None:
    with Volume(root) as vol:
        for k, v in blocks:
            vol.publish(k, v)


def _rocksdb_store(root: str, blocks) -> None:
    import rocksdict as rd

    db = rd.Rdict(root, rd.Options(raw_mode=True))
    wo = rd.WriteOptions()
    wo.sync = True
    db.set_write_options(wo)
    for k, v in blocks:
        db.put(k, v)
    db.flush()
    db.close()


@pytest.mark.parametrize("store", ["walpub", "rocksdb"])
@pytest.mark.parametrize("size", AMP_SIZES, ids=_label)
def test_write_amplification(benchmark, scratch, size, store):
    benchmark.group = "walpub-amplification"
    n = min(max(AMP_BYTES // size, 8), AMP_MAX_BLOCKS)
    # Incompressible values: RocksDB compresses its SSTs (snappy by default), walpub does not.
    blocks = [(wc.make_key(f"amp/{size}", i), os.urandom(size)) for i in range(n)]
    root = os.path.join(str(scratch), f"amp-{store}-{size}")
    fn = _walpub_store if store == "walpub" else _rocksdb_store

    def run():
        w0 = _write_bytes()
        t0 = time.perf_counter()
        fn(root, blocks)
        return time.perf_counter() - t0, _write_bytes() - w0

    sec, written = run_once(benchmark, run)
    on_disk = _tree_bytes(root)
    payload = n * size
    assert written >= payload and on_disk >= payload   # every payload byte written and kept
    shutil.rmtree(root)
    benchmark.extra_info.update(
        store=store, block_bytes=size, blocks=n, payload_bytes=payload, seconds=sec, mb_per_s=payload / sec / 1e6,
        write_bytes=written, write_amplification=written / payload, disk_bytes=on_disk,
        disk_bytes_per_payload_byte=on_disk / payload,
        durability="publish (3 fsyncs)" if store == "walpub" else "sync put (WAL fsync) + memtable flush",
    )


# ------------------------------------------------------------------ walpub-recovery
_BASES: dict = {}


def _base_volume(scratch, n: int) -> str:
    """A volume of ``n`` 4 KiB blocks, built once per size.  Fsyncs are masked
    while building (then one sync()): the files are those a durable build writes."""
    if n not in _BASES:
        root = os.path.join(str(scratch), f"rec-{n}")
        with Volume(root, index="flat", verify_on_recover="size") as vol:
            vol.io.disabled_fsyncs = {"object", "objects_dir", "objects_parent", "wal", "wal_dir"}
            batch = 1000
            for s in range(0, n, batch):
                keys = [wc.make_key(f"rec/{n}", i) for i in range(s, min(n, s + batch))]
                vol.publish_many([(k, (k * (RECOVERY_BLOCK // 32))) for k in keys])
            vol.io.disabled_fsyncs = set()
        os.sync()
        _BASES[n] = root
    return _BASES[n]


@pytest.mark.parametrize("blocks, backend, verify", RECOVERY_CASES, ids=lambda x: str(x))
def test_recovery_after_sigkill(benchmark, scratch, blocks, backend, verify):
    benchmark.group = "walpub-recovery"
    root = _base_volume(scratch, blocks)
    tag = f"tail/{blocks}/{backend}/{verify}"
    proc = wc._spawn(["tail", "--root", root, "--backend", backend, "--tag", tag,
                      "--count", str(RECOVERY_TAIL), "--size", str(RECOVERY_BLOCK)])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, err.decode()[-2000:]
    _tail, done, live_before = out.decode().split()
    assert int(done) == RECOVERY_TAIL

    def run():
        t0 = time.perf_counter()
        vol = Volume(root, index=backend, verify_on_recover=verify)
        sec = time.perf_counter() - t0
        rep = vol.last_recovery
        probe = wc.make_key(tag, RECOVERY_TAIL - 1)
        assert vol.read(probe) == (probe * (RECOVERY_BLOCK // 32))[:RECOVERY_BLOCK]   # the last acked tail block
        assert len(vol) == int(live_before) and len(vol.keys()) == len(vol)
        vol.close()
        return sec, rep

    sec, rep = run_once(benchmark, run)
    benchmark.extra_info.update(
        blocks=rep.live, base_blocks=blocks, backend=backend, verify=verify, block_bytes=RECOVERY_BLOCK,
        recovery_s=sec, blocks_per_s=rep.live / sec, index_mode=rep.index_mode, tail_blocks=RECOVERY_TAIL,
        segments=len(rep.segments), truncated=len(rep.truncated), orphans_removed=rep.orphans_removed,
        tmp_removed=rep.tmp_removed, page_cache="warm",
    )


# ------------------------------------------------------------------ walpub-campaign
def test_campaign_crash_states(benchmark):
    benchmark.group = "walpub-campaign"
    r = run_once(benchmark, lambda: wc.explore_campaign(CRASH_STATES, seed=1000))
    assert not r["violations"], "\n".join(r["violations"][:10])
    assert r["distinct"] >= CRASH_STATES
    benchmark.extra_info.update(
        part="crash states (walpub.crash_check.explore, random workloads)", states_explored=r["states"],
        distinct_states=r["distinct"], checked=r["checked"], recovery_crash_states=r["recovery_crash_states"],
        workloads=r["workloads"], crash_points=r["points"], seconds=r["seconds"], violations=len(r["violations"]),
    )


def test_campaign_sigkill(benchmark, scratch):
    benchmark.group = "walpub-campaign"
    work = os.path.join(str(scratch), "kills")

    def run():
        st = wc.KillStats()
        per_backend = {}
        for b in BACKENDS:
            rounds = KILL_ROUNDS.get(b, 0)
            if rounds:
                k0 = st.kills
                wc.kill_campaign(work, b, rounds, seed=11, stats=st)
                per_backend[b] = st.kills - k0
        extra = 0
        while st.kills < MIN_KILLS and not st.violations:   # top up on fresh flat volumes
            wc.kill_campaign(os.path.join(work, f"topup-{extra}"), "flat", 4, seed=100 + extra, stats=st)
            extra += 1
        return st, per_backend

    st, per_backend = run_once(benchmark, run)
    assert not st.violations, "\n".join(st.violations[:10])
    assert st.kills >= MIN_KILLS
    benchmark.extra_info.update(
        part="SIGKILL (real processes)", kills=st.kills, kills_per_backend=per_backend,
        random_kills=st.random_kills, crash_point_kills=sum(st.point_kills.values()),
        recovery_kills=st.recovery_kills, crash_points_hit=len(st.point_kills), kills_per_point=st.point_kills,
        completed_unkilled=st.completed,
        torn_tails=sum(st.tears.values()), acked_blocks=st.acked, acked_deletes=st.deletes_acked,
        recoveries_checked=st.checks, index_modes=st.index_modes, truncations=st.truncations,
        orphans_removed=st.orphans_removed, seconds=st.seconds, violations=len(st.violations),
    )


def test_campaign_bitflips(benchmark, scratch):
    benchmark.group = "walpub-campaign"
    work = os.path.join(str(scratch), "flips")
    os.makedirs(work)
    st = run_once(benchmark, lambda: wc.bitflip_campaign(
        work, object_batches=OBJECT_FLIP_BATCHES, n_objects=OBJECTS_PER_BATCH, wal_flip_count=WAL_FLIPS, seed=21))
    assert not st.violations, "\n".join(st.violations[:10])
    assert st.wrong_bytes_served == 0 and st.flips >= MIN_FLIPS
    assert st.object_detected_at_recovery + st.object_detected_at_read == st.object_flips
    assert st.wal_cut_lost_records + st.wal_cut_no_loss + st.undetected_no_effect == st.wal_flips
    benchmark.extra_info.update(part="bit flips (real files)", mode=MODE, **st.as_dict())
