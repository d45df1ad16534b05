"""Huge-page advice on the buffers whose first touch is on a hot path
(tier/hugepages.py): the L0 arena and the engine's fresh host tensors.  The
kernel records the advice in the mapping's VmFlags ("hg"), which is what these
tests read: whether huge pages are then granted depends on free memory."""

from __future__ import annotations

import os

import pytest
import torch

from quiver.engine.torch_io import empty_host
from quiver.tier.hugepages import HUGEPAGE_BYTES, HUGEPAGE_MIN_BYTES, advise_huge_pages, empty_huge
from quiver.tier.ram import RamTier

pytestmark = pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                                reason="no transparent huge pages in this kernel: the advice has nothing to ask")


def _vm_flags_at(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _first_huge_page(address: int) -> int:
    return -(-address // HUGEPAGE_BYTES) * HUGEPAGE_BYTES


def test_a_large_fresh_host_tensor_is_advised_huge_pages():
    """empty_host: a tensor of HUGEPAGE_MIN_BYTES or more is advised; it is an
    ordinary writable tensor of the shape and dtype asked for."""
    big = empty_host((HUGEPAGE_MIN_BYTES * 2 // 4,), torch.float32)
    assert big.shape == (HUGEPAGE_MIN_BYTES * 2 // 4,) and big.dtype == torch.float32
    assert "hg" in _vm_flags_at(_first_huge_page(big.data_ptr()))
    big.fill_(1.5)
    assert float(big.sum()) == 1.5 * big.numel()
    small = empty_host((3, 5), torch.float16)
    assert small.shape == (3, 5) and small.dtype == torch.float16


def test_the_l0_arena_is_advised_huge_pages():
    """A RamTier's arena is advised when it is made, before any slot is touched."""
    ram = RamTier(capacity_bytes=16 << 20, slot_bytes=256 << 10)
    assert "hg" in _vm_flags_at(_first_huge_page(ram.arena.ctypes.data))


def test_a_chunk_buffer_starts_on_a_huge_page_and_is_advised():
    """empty_huge: a 2 MiB-aligned writable uint8 array of the shape asked for,
    advised even just under HUGEPAGE_MIN_BYTES (its span rounds up to whole pages)."""
    shape = (15, (HUGEPAGE_MIN_BYTES - 4096) // 15)
    buf = empty_huge(shape)
    assert buf.shape == shape and buf.dtype.name == "uint8" and buf.flags.writeable and buf.flags.c_contiguous
    assert buf.ctypes.data % HUGEPAGE_BYTES == 0
    assert "hg" in _vm_flags_at(buf.ctypes.data)
    buf.fill(7)
    assert int(buf.sum()) == 7 * buf.size


def test_the_advice_stays_inside_the_buffer(monkeypatch):
    """Only whole 2 MiB pages inside the range are advised (the call recorded
    instead of made): a range too small gets no call."""
    import quiver.tier.hugepages as hp

    calls = []
    monkeypatch.setattr(hp, "_madvise", lambda: (lambda addr, n, advice: calls.append((addr, n, advice))))
    advise_huge_pages(HUGEPAGE_BYTES + 1, 3 * HUGEPAGE_BYTES)  # [2M+1, 8M+1): pages 4M and 6M
    advise_huge_pages(0, HUGEPAGE_MIN_BYTES - 1)  # too small: no call
    advise_huge_pages(1, HUGEPAGE_MIN_BYTES)  # [1, 4M+1): page 2M only
    assert calls == [(2 * HUGEPAGE_BYTES, 2 * HUGEPAGE_BYTES, 14), (HUGEPAGE_BYTES, HUGEPAGE_BYTES, 14)]
