"""Thread pools whose threads exist before the first task.

A plain ThreadPoolExecutor starts its threads one per submit, inside the call
that first needs them (a few ms each on a loaded host): a get's reads, a put's
L2 uploads.  :func:`started_pool` makes them all at once, up front.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


def started_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool with all ``workers`` threads already running: a barrier
    that only ``workers`` concurrent tasks pass makes each thread exist before
    this returns."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers)
    for fut in [pool.submit(barrier.wait) for _ in range(workers)]:
        fut.result()
    return pool
