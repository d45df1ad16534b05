"""Physical limits of this machine, measured in the same run as every other study.

memcpy bandwidth (numpy copyto), fsync'd sequential write bandwidth (64 KiB and
1 MiB writes, each followed by fsync, on the repository's disk), CRC32C (the
store's, and the ``crc32c`` package's beside it) and BLAKE3 throughput.  Each
result's ``extra_info`` carries ``bytes`` (per round) and ``gb_per_s`` (bytes /
median round time, 1 GB = 1e9 bytes), which the report sets beside the figures
they bound.
"""

from __future__ import annotations

import os
import time

import blake3
import crc32c
import numpy as np
import pytest

from quiver.walpub import checksum

from .config import pick
from .workloads import latency_summary

MiB = 1 << 20
COPY_BYTES = pick(smoke=16 * MiB, quick=256 * MiB, full=256 * MiB)
HASH_BYTES = pick(smoke=8 * MiB, quick=64 * MiB, full=256 * MiB)
FSYNC_BYTES = pick(smoke=2 * MiB, quick=32 * MiB, full=128 * MiB)
ROUNDS = pick(smoke=2, quick=5, full=10)
FSYNC_ROUNDS = pick(smoke=1, quick=3, full=5)


def _buffer(nbytes: int) -> np.ndarray:
    """Random (incompressible), already-touched bytes."""
    return np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)


def _record(benchmark, nbytes: int, **extra) -> None:
    median = benchmark.stats.stats.median if benchmark.stats else None  # None under --benchmark-disable
    gb_per_s = nbytes / median / 1e9 if median else None
    benchmark.extra_info.update({"bytes": nbytes, "median_s": median, "gb_per_s": gb_per_s, **extra})


def test_memcpy(benchmark):
    benchmark.group = "limits"
    src = _buffer(COPY_BYTES)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch of dst outside the timing
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert np.array_equal(dst[:4096], src[:4096])
    _record(benchmark, COPY_BYTES, what="numpy.copyto, one thread")


def test_crc32c(benchmark):
    """CRC32C as every read's check computes it (``quiver.walpub.checksum``)."""
    benchmark.group = "limits"
    buf = _buffer(HASH_BYTES).tobytes()
    benchmark.pedantic(checksum.crc32c, args=(buf,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, HASH_BYTES, what="CRC32C, the store's (awscrt: aws-c-checksums)")


def test_crc32c_package(benchmark):
    """The same CRC32C through the ``crc32c`` package (SSE4.2), which the store used
    before: beside the store's, the reason for the choice (walpub/checksum.py)."""
    benchmark.group = "limits"
    buf = _buffer(HASH_BYTES).tobytes()
    benchmark.pedantic(crc32c.crc32c, args=(buf,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert crc32c.crc32c(buf) == checksum.crc32c(buf)
    _record(benchmark, HASH_BYTES, what="CRC32C, the crc32c package",
            hardware=getattr(crc32c, "hardware_based", None))


def test_blake3(benchmark):
    benchmark.group = "limits"
    buf = _buffer(HASH_BYTES).tobytes()
    benchmark.pedantic(lambda: blake3.blake3(buf).digest(), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, HASH_BYTES, what="blake3, one thread")


def test_blake3_threads(benchmark):
    benchmark.group = "limits"
    buf = _buffer(HASH_BYTES).tobytes()
    benchmark.pedantic(
        lambda: blake3.blake3(buf, max_threads=blake3.blake3.AUTO).digest(), rounds=ROUNDS, iterations=1, warmup_rounds=1
    )
    _record(benchmark, HASH_BYTES, what="blake3, max_threads=AUTO", cpu_count=os.cpu_count())


@pytest.mark.parametrize("write_kib", [64, 1024])
def test_fsync_write(benchmark, bench_dir, write_kib):
    """Sequential writes of ``write_kib`` KiB, each followed by fsync, to a new file."""
    benchmark.group = "limits"
    chunk = _buffer(write_kib * 1024).tobytes()
    writes = max(1, FSYNC_BYTES // len(chunk))
    fsync_ns: list[int] = []
    state = {"round": 0}

    def setup():
        state["round"] += 1
        path = bench_dir / f"fsync-{write_kib}-{state['round']}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        return (fd,), {}

    def run(fd):
        try:
            for _ in range(writes):
                os.write(fd, chunk)
                t = time.perf_counter_ns()
                os.fsync(fd)
                fsync_ns.append(time.perf_counter_ns() - t)
        finally:
            os.close(fd)

    benchmark.pedantic(run, setup=setup, rounds=FSYNC_ROUNDS, iterations=1)
    lat = latency_summary(fsync_ns)
    _record(
        benchmark,
        writes * len(chunk),
        what=f"{write_kib} KiB write + fsync, sequential",
        write_bytes=len(chunk),
        writes_per_round=writes,
        fsync_p50_us=lat["p50_us"],
        fsync_p99_us=lat["p99_us"],
        dir=str(bench_dir),
    )
