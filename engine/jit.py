"""Numba kernels made once per process, for the copies Python and torch run slowly
(engine/copy_kernels.py, engine/row_copy.py).  Kept free of torch: the core store
uses :mod:`quiver.engine.row_copy` without it.

A kernel is made at its first use (about 0.25 s in a fresh process, ~10 ms once the
ART index has loaded Numba; a load from the ART kernels' compile cache on disk after
the first process), or on a background thread (:func:`once_in_background`) where a
caller must never wait for it.  ``QUIVER_COPY_JIT=off`` turns every kernel off (the
callers' plain copies: a baseline for studies and tests); a kernel that fails to
make is logged once and its callers copy without it from then on.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("quiver.engine")

#: ``off`` keeps every copy out of the compiled kernels.
JIT_ENV = "QUIVER_COPY_JIT"

_lock = threading.Lock()
_made: dict = {}  # kernel name -> the kernel, or None once making it failed
_making: set = set()  # names a background thread is making
_making_lock = threading.Lock()  # not _lock: once() holds that while it makes a kernel


def off() -> bool:
    """True when ``QUIVER_COPY_JIT=off``: no kernel is made or used."""
    return os.environ.get(JIT_ENV, "").lower() == "off"


def once(name: str, make, level: int, what: str):
    """The kernel ``make()`` returns, made at the first call of a process; None when
    ``QUIVER_COPY_JIT=off`` or when making it failed (logged once at ``level``)."""
    if off():
        return None
    if name not in _made:
        with _lock:
            if name not in _made:
                try:
                    _made[name] = make()
                except Exception as exc:  # noqa: BLE001 - any failure: the caller copies without it
                    _made[name] = None
                    log.log(level, "%s: %s", what, exc)
    return _made[name]


def once_in_background(name: str, make, level: int, what: str):
    """The kernel if it is made; else None, and a background thread makes it (once):
    for a caller on a serving path, which copies without the kernel meanwhile."""
    if off():
        return None
    if name in _made:
        return _made[name]
    with _making_lock:
        if name in _making:
            return _made.get(name)
        _making.add(name)
    threading.Thread(target=once, args=(name, make, level, what), name=f"quiver-jit-{name}", daemon=True).start()
    return None


def compiled(py_func):
    """``py_func`` compiled by Numba (GIL released, no bounds checks: callers check
    every index), with the ART kernels' compile cache on disk."""
    from numba import njit

    from quiver.index_backends._art_kernels import attach_cache

    disp = njit(nogil=True, boundscheck=False)(py_func)
    attach_cache(disp, py_func)
    return disp
