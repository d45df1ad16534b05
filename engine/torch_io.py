"""Torch copy-in/out: KV blocks between an engine's tensors and host buffers.

Quiver's block payload is one contiguous ``[num_layers, 2, block_tokens,
num_kv_heads, head_dim]`` array.  This module moves a request's blocks between
that layout and two engine layouts:

* **vLLM-style paged** -- per layer one tensor ``[2, num_blocks, block_size,
  num_kv_heads, head_dim]`` plus a block table (the request's block ids in
  token order): :func:`gather_paged` / :func:`scatter_paged`.
* **vLLM CPU paged** (vLLM's ``CPU_ATTN`` backend) -- per layer one tensor
  ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``.  Despite the
  shape, the bytes of one (block, head) are a K region of ``block_size *
  head_dim`` elements followed by a V region of the same size (the backend
  views the tensor as ``[blocks, heads, 2 * block_size, head_dim]`` and splits
  dim 2), and how K is packed depends on the kernel ISA vLLM picked: with the
  ``vec`` / ``vec16`` kernels (x86 AVX2/AVX-512 without AMX) K is stored
  transposed, ``[head_dim, block_size]``, V row-major ``[block_size,
  head_dim]`` (measured against vLLM's own ``cpu_attn_reshape_and_cache`` in
  tests/test_vllm_connector.py).  Other ISAs (``amx``, ``neon``, ...) pack K
  differently and are refused rather than copied wrong:
  :func:`gather_paged_cpu` / :func:`scatter_paged_cpu` turn it into Quiver's
  canonical payload, so blocks are portable across engines and ISAs (for
  2-byte dtypes with a compiled kernel, one call per layer whatever the block
  table, engine/copy_kernels.py; otherwise torch's strided copies, one per run
  of consecutive block ids, layer and K/V).
  :func:`detect_paged_layout` tells the paged layouts apart from the
  registered tensors (and the CPU kernel ISA) and refuses anything else
  (:class:`UnsupportedKVLayoutError`).
* **HuggingFace DynamicCache** -- per layer ``keys``/``values`` of ``[batch,
  num_kv_heads, seq, head_dim]`` (``cache.layers[i].keys`` in transformers
  5.x): :func:`gather_dynamic` / :func:`scatter_dynamic`.  Quiver's payload
  puts tokens before heads, so this direction is a transposing copy.

Copies (``CopyReport``; docs/ENGINES.md has the table).  On CPU every payload
byte is written once, straight into the caller's destination: a host tensor
from :func:`host_blocks`, or :func:`block_view` of a writable buffer such as
an L0 arena slot (``torch.frombuffer``: zero-copy).  No temporary is allocated
(``tests/test_torch_io.py`` checks with the torch profiler).  On CUDA the
blocks are gathered on the device into a scratch buffer (one device pass: for
the paged layout one Triton launch per chunk, engine/copy_kernels.py), copied
to pinned host memory with a non-blocking copy (one transfer), and, when the
destination is not itself pinned, copied once more from the pinned staging
into it (one host pass); the device pass and the transfers run on two side
streams, double-buffered, and an event marks completion.  Scatter is the
mirror image.  Pinning is only ever requested for a CUDA
device: torch raises if asked to pin without an accelerator.

The device is explicit: it is the device of the engine's tensors, which must
all agree; host buffers must be CPU tensors.  Shape and dtype mismatches are
:class:`~engine.errors.ShapeMismatchError` / :class:`~engine.errors.DTypeMismatchError`.
bfloat16 is carried as 2-byte elements throughout (torch has the dtype; numpy
views are int16).

CPU threads: torch's intra-op parallelism makes these copies far slower on a
busy machine (studies/bench_copy.py measured 20x with 2 threads on 2 loaded
cores).  This module never changes the process-wide setting; run copy-in/out
with ``torch.set_num_threads(1)`` (or from a thread of the engine's that
has it) unless the cores are idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from quiver.engine.copy_kernels import (dynamic_target, paged_cpu_copy, paged_runs, scatter_block_rows,
                                        scatter_rows)
from quiver.engine.errors import BlockTableError, DTypeMismatchError, ShapeMismatchError
from quiver.engine.identity import CacheIdentity
from quiver.engine.sink import BlockSink
from quiver.tier.hugepages import advise_huge_pages

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}
#: Blocks per CUDA staging chunk: bounds pinned and device scratch memory.
DEFAULT_CHUNK_BLOCKS = 64


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of one block's payload."""

    num_layers: int
    block_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_identity(cls, ident: CacheIdentity) -> "KVLayout":
        return cls(ident.num_layers, ident.block_tokens, ident.num_kv_heads, ident.head_dim,
                   TORCH_DTYPES[ident.kv_dtype])

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class CopyReport:
    """What one gather/scatter did.  ``*_passes`` count full passes over the payload.

    ``host_passes``: CPU writes of payload bytes (memcpy-like); ``transfers``:
    host<->device copies; ``device_passes``: device-to-device copies.  On CPU
    a gather or scatter is exactly one host pass.  ``event`` is a CUDA event
    recorded after the last copy (None on CPU, where the call is synchronous).
    """

    blocks: int
    payload_bytes: int
    host_passes: int = 0
    transfers: int = 0
    device_passes: int = 0
    copy_ops: int = 0
    event: Any = None

    def wait(self) -> None:
        """Block the host until the copies are complete (no-op on CPU)."""
        if self.event is not None:
            self.event.synchronize()


# --- host buffers ----------------------------------------------------------------

def empty_host(shape, dtype: torch.dtype, *, pinned: bool = False) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, its pages advised huge
    when large (tier/hugepages.py: a fresh 64 MiB tensor filled by ``copy_``
    ran 2.1 GB/s with 4 KiB pages, 6.1 GB/s advised).  ``pinned`` (only with
    a CUDA device: torch raises otherwise): page-locked, so a transfer goes
    straight into or out of it (a pageable buffer passes through pinned
    staging: on an H200 over PCIe 5, 512 blocks moved at 3.2-4.2 GB/s against
    45-52 GB/s pinned, docs/ENGINES.md)."""
    if pinned:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    t = torch.empty(shape, dtype=dtype)
    advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
    return t



def host_blocks(n: int, layout: KVLayout, *, for_device: torch.device | str = "cpu") -> torch.Tensor:
    """A host tensor ``[n, *block_shape]``, pinned only when ``for_device`` is CUDA.

    Touches every page once (the first touch of fresh memory costs ~10x a copy:
    pay it here, not inside a timed copy).
    """
    dev = torch.device(for_device)
    pin = dev.type == "cuda"  # never ask for pinning without an accelerator: torch raises
    shape = (n, *layout.block_shape)
    t = torch.empty(shape, dtype=layout.dtype, pin_memory=True) if pin else empty_host(shape, layout.dtype)
    t.zero_()
    return t


def block_view(buf, layout: KVLayout, n: int = 1, offset: int = 0) -> torch.Tensor:
    """Zero-copy ``[n, *block_shape]`` tensor over a writable buffer (arena slot, bytearray).

    ``offset`` is in bytes (e.g. an envelope's ``header_len``, to fill its body in place).
    """
    mv = memoryview(buf)
    if mv.readonly:
        raise ValueError("block_view needs a writable buffer (torch.frombuffer on read-only memory aliases it)")
    count = n * layout.block_nbytes // layout.dtype.itemsize
    if offset < 0 or offset + n * layout.block_nbytes > mv.nbytes:
        raise ShapeMismatchError(f"buffer of {mv.nbytes} bytes cannot hold {n} blocks of {layout.block_nbytes} at {offset}")
    return torch.frombuffer(mv, dtype=layout.dtype, count=count, offset=offset).view(n, *layout.block_shape)


# --- checks ----------------------------------------------------------------------


def _check_host(t, n: int, layout: KVLayout, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor (use block_view for a raw buffer), got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what} must be a host (CPU) tensor, is on {t.device}")
    if t.dtype != layout.dtype:
        raise DTypeMismatchError(f"{what} dtype {t.dtype} != kv dtype {layout.dtype}")
    if tuple(t.shape) != (n, *layout.block_shape):
        raise ShapeMismatchError(f"{what} shape {tuple(t.shape)} != {(n, *layout.block_shape)}")
    if not t.is_contiguous():
        raise ShapeMismatchError(f"{what} must be C-contiguous (a block payload is one contiguous array)")
    return t


def _check_paged(kv_caches: Sequence[torch.Tensor], layout: KVLayout) -> tuple[torch.device, int]:
    if len(kv_caches) != layout.num_layers:
        raise ShapeMismatchError(f"{len(kv_caches)} layer tensors, layout has {layout.num_layers} layers")
    first = kv_caches[0]
    want = (2, first.shape[1] if first.dim() == 5 else -1, layout.block_tokens, layout.num_kv_heads, layout.head_dim)
    for i, t in enumerate(kv_caches):
        if t.dim() != 5 or tuple(t.shape) != want:
            raise ShapeMismatchError(f"layer {i}: paged KV shape {tuple(t.shape)} != {want}")
        if t.dtype != layout.dtype:
            raise DTypeMismatchError(f"layer {i}: paged KV dtype {t.dtype} != {layout.dtype}")
        if t.device != first.device:
            raise ValueError(f"layer {i} is on {t.device}, layer 0 on {first.device}: one device per engine")
    return first.device, want[1]


def _block_ids(block_ids, num_blocks: int, *, unique: bool) -> torch.Tensor:
    ids = torch.as_tensor(block_ids, dtype=torch.int64).reshape(-1).cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise BlockTableError(f"block ids must be in [0, {num_blocks}), got min {int(ids.min())} max {int(ids.max())}")
    if unique and torch.unique(ids).numel() != ids.numel():
        raise BlockTableError("a scatter's block table names a block twice")
    return ids


def _np(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (bfloat16 as int16)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _host_slices(host: torch.Tensor, layout: KVLayout) -> list[torch.Tensor]:
    """``host[:, layer, kv]`` (``[n, T, H, D]``, strided) for layer-major (layer, kv) pairs.

    ``host`` is C-contiguous (``_check_host``), so each view is one
    ``torch.as_strided`` call: a third of the Python cost of ``host[:, l, kv]``,
    which is most of a small copy-in/out's overhead (64 views for 32 layers).
    """
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_dim
    run = T * H * D
    size = (host.shape[0], T, H, D)
    stride = (2 * layout.num_layers * run, H * D, D, 1)
    base = host.storage_offset()
    return [torch.as_strided(host, size, stride, base + i * run) for i in range(2 * layout.num_layers)]


# --- vLLM-style paged layout ------------------------------------------------------


def gather_paged(kv_caches: Sequence[torch.Tensor], block_ids, out: torch.Tensor, layout: KVLayout, *,
                 chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> CopyReport:
    """Copy the blocks ``block_ids`` (the request's block table, in token order) into ``out``.

    ``out`` is a host tensor ``[n, *block_shape]`` (``host_blocks`` or ``block_view``).
    """
    device, num_blocks = _check_paged(kv_caches, layout)
    ids = _block_ids(block_ids, num_blocks, unique=False)
    n = ids.numel()
    _check_host(out, n, layout, "out")
    rep = CopyReport(blocks=n, payload_bytes=n * layout.block_nbytes)
    if device.type == "cpu":
        dst = _host_slices(out, layout)
        for layer, t in enumerate(kv_caches):
            for kv in range(2):  # out[:, l, kv] is strided; index_select writes it in place
                torch.index_select(t[kv], 0, ids, out=dst[2 * layer + kv])
        rep.copy_ops = 2 * layout.num_layers
        rep.host_passes = 1
        return rep
    runs = paged_runs(kv_caches, layout.block_tokens * layout.num_kv_heads * layout.head_dim)
    if runs is not None:  # one launch per chunk (engine/copy_kernels.py)
        return _cuda_gather(device, out, layout, rep, chunk_blocks,
                            lambda lo, hi, dst: runs(ids[lo:hi].to(device), dst, True), dev_ops=1)
    return _cuda_gather(device, out, layout, rep, chunk_blocks,
                        lambda lo, hi, dst: _paged_gather_dev(kv_caches, ids[lo:hi].to(device), dst, layout))


def scatter_paged(src: torch.Tensor, kv_caches: Sequence[torch.Tensor], block_ids, layout: KVLayout, *,
                  chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> CopyReport:
    """Copy host blocks ``src`` ``[n, *block_shape]`` into the engine's blocks ``block_ids``."""
    device, num_blocks = _check_paged(kv_caches, layout)
    ids = _block_ids(block_ids, num_blocks, unique=True)
    n = ids.numel()
    _check_host(src, n, layout, "src")
    rep = CopyReport(blocks=n, payload_bytes=n * layout.block_nbytes)
    if device.type == "cpu":
        # numpy fancy assignment: ~2x torch index_copy_ with a strided source (measured in bench_copy).
        idx = ids.numpy()
        s = _np(src)
        for layer in range(layout.num_layers):
            dst = _np(kv_caches[layer])
            for kv in range(2):
                dst[kv][idx] = s[:, layer, kv]
                rep.copy_ops += 1
        rep.host_passes = 1
        return rep
    runs = paged_runs(kv_caches, layout.block_tokens * layout.num_kv_heads * layout.head_dim)
    if runs is not None:
        return _cuda_scatter(device, src, layout, rep, chunk_blocks,
                             lambda lo, hi, d: runs(ids[lo:hi].to(device), d, False), dev_ops=1)
    return _cuda_scatter(device, src, layout, rep, chunk_blocks,
                         lambda lo, hi, d: _paged_scatter_dev(d, kv_caches, ids[lo:hi].to(device), layout))


def warm_paged_copies(kv_caches: Sequence[torch.Tensor], layout: KVLayout) -> bool:
    """Compile (or load) the CUDA paged copy kernel before the engine serves: block 0 is
    gathered and scattered back onto itself (the same bytes).  Triton's first use in a
    process took 0.9 s with its disk cache warm and 1.9 s cold on an H200 host
    (docs/ENGINES.md), which a first save or load would otherwise pay.  Call it before
    the engine writes its KV.  True when the kernel is in use; False (nothing done) on
    CPU or where torch does the copies."""
    device, _ = _check_paged(kv_caches, layout)
    if device.type != "cuda" or paged_runs(kv_caches, layout.block_tokens * layout.num_kv_heads
                                           * layout.head_dim) is None:
        return False
    buf = host_blocks(1, layout, for_device=device)
    gather_paged(kv_caches, [0], buf, layout).wait()
    scatter_paged(buf, kv_caches, [0], layout).wait()
    return True


def _paged_gather_dev(kv_caches, sel: torch.Tensor, dst: torch.Tensor, layout: KVLayout) -> None:
    for layer in range(layout.num_layers):
        for kv in range(2):
            torch.index_select(kv_caches[layer][kv], 0, sel, out=dst[:, layer, kv])


def _paged_scatter_dev(dev: torch.Tensor, kv_caches, sel: torch.Tensor, layout: KVLayout) -> None:
    for layer in range(layout.num_layers):
        for kv in range(2):
            kv_caches[layer][kv].index_copy_(0, sel, dev[:, layer, kv])


# --- vLLM CPU paged layout ---------------------------------------------------------

#: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (CUDA flash-attention).
PAGED_FLASH = "flash"
#: ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` (vLLM CPU_ATTN, ``vec``/``vec16`` kernels):
#: per (block, head) K as ``[head_dim, block_size]`` then V as ``[block_size, head_dim]``.
PAGED_CPU = "cpu"
#: vLLM CPU kernel ISAs whose K/V packing is PAGED_CPU (checked against vLLM's own cache-write op).
CPU_ISAS_VERIFIED = ("vec", "vec16")
PAGED_LAYOUTS = (PAGED_FLASH, PAGED_CPU)


class UnsupportedKVLayoutError(ShapeMismatchError):
    """The engine's KV tensors match no layout this module can copy (refused at registration)."""


def detect_paged_layout(kv_caches: Sequence[torch.Tensor], layout: KVLayout, *,
                        cpu_isa: str | None = None) -> str:
    """Which paged layout the per-layer tensors ``kv_caches`` use: PAGED_FLASH or PAGED_CPU.

    Decided from the shapes against ``layout`` (the two have different ranks,
    so they cannot be confused) and, for the 4-D vLLM CPU shape, from the CPU
    kernel ISA ``cpu_isa`` (required: it decides how K is packed; only
    CPU_ISAS_VERIFIED are accepted).  Anything else -- another rank, a head
    count, block size or head dim that disagrees with ``layout``, mixed
    layouts, a non-contiguous tensor, an unverified ISA -- is
    :class:`UnsupportedKVLayoutError`, never a guess.
    """
    if len(kv_caches) != layout.num_layers or not kv_caches:
        raise UnsupportedKVLayoutError(f"{len(kv_caches)} layer tensors, layout has {layout.num_layers} layers")
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_dim
    kinds = set()
    for i, t in enumerate(kv_caches):
        shape = tuple(t.shape)
        if t.dim() == 5 and shape[0] == 2 and shape[2:] == (T, H, D):
            kinds.add(PAGED_FLASH)
        elif t.dim() == 4 and shape[1:] == (H, T, 2 * D):
            kinds.add(PAGED_CPU)
        else:
            raise UnsupportedKVLayoutError(
                f"layer {i}: KV tensor {shape} is neither [2, blocks, {T}, {H}, {D}] (flash) nor "
                f"[blocks, {H}, {T}, {2 * D}] (vLLM CPU)")
        if t.dtype != layout.dtype:
            raise DTypeMismatchError(f"layer {i}: paged KV dtype {t.dtype} != {layout.dtype}")
        if not t.is_contiguous():
            raise UnsupportedKVLayoutError(f"layer {i}: KV tensor is not contiguous (strides {t.stride()})")
    if len(kinds) != 1:
        raise UnsupportedKVLayoutError(f"layers mix paged layouts {sorted(kinds)}")
    kind = kinds.pop()
    if kind == PAGED_CPU and cpu_isa not in CPU_ISAS_VERIFIED:
        raise UnsupportedKVLayoutError(
            f"vLLM CPU KV tensors written by the {cpu_isa!r} kernels: their K packing is not one Quiver "
            f"has verified ({CPU_ISAS_VERIFIED})")
    return kind


def _check_paged_cpu(kv_caches: Sequence[torch.Tensor], layout: KVLayout) -> int:
    if detect_paged_layout(kv_caches, layout, cpu_isa=CPU_ISAS_VERIFIED[0]) != PAGED_CPU:
        raise UnsupportedKVLayoutError("expected the vLLM CPU layout [blocks, heads, block_size, 2*head_dim]")
    first = kv_caches[0]
    for i, t in enumerate(kv_caches):
        if t.device.type != "cpu":
            raise ValueError(f"layer {i} is on {t.device}: the vLLM CPU layout lives in host memory")
        if t.shape[0] != first.shape[0]:
            raise ShapeMismatchError(f"layer {i} has {t.shape[0]} blocks, layer 0 has {first.shape[0]}")
    return first.shape[0]


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(position, first block id, length) of each run of consecutive block ids."""
    out: list[tuple[int, int, int]] = []
    for pos, b in enumerate(ids.tolist()):
        if out and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((pos, b, 1))
    return out


def _cpu_blocks(t: torch.Tensor, b: int, m: int, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``b .. b+m`` of one vLLM-CPU layer as (K, V) ``[m, T, H, D]`` views (no copy)."""
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_dim
    kv = t[b:b + m].view(m, H, 2, T * D)
    k = kv[:, :, 0].unflatten(2, (D, T)).permute(0, 3, 1, 2)  # stored [m, H, D, T]
    v = kv[:, :, 1].unflatten(2, (T, D)).permute(0, 2, 1, 3)  # stored [m, H, T, D]
    return k, v


def gather_paged_cpu(kv_caches: Sequence[torch.Tensor], block_ids, out: torch.Tensor,
                     layout: KVLayout) -> CopyReport:
    """Copy blocks ``block_ids`` (token order) of vLLM-CPU paged tensors into host ``out`` ``[n, *block_shape]``.

    Straight into ``out`` (no temporary): one host pass, K transposed on the
    way, by the compiled kernel (one call per layer) where it applies, else by
    one strided torch copy per layer, K/V and run of consecutive block ids.
    """
    num_blocks = _check_paged_cpu(kv_caches, layout)
    ids = _block_ids(block_ids, num_blocks, unique=False)
    n = ids.numel()
    _check_host(out, n, layout, "out")
    rep = CopyReport(blocks=n, payload_bytes=n * layout.block_nbytes, host_passes=1)
    if paged_cpu_copy(out, kv_caches, ids.numpy(), gather=True):  # compiled: one call per layer
        rep.copy_ops = layout.num_layers
        return rep
    for pos, b, m in _runs(ids):
        for layer, t in enumerate(kv_caches):
            for kv, view in enumerate(_cpu_blocks(t, b, m, layout)):
                out[pos:pos + m, layer, kv].copy_(view)
                rep.copy_ops += 1
    return rep


def scatter_paged_cpu(src: torch.Tensor, kv_caches: Sequence[torch.Tensor], block_ids,
                      layout: KVLayout) -> CopyReport:
    """Copy host blocks ``src`` ``[n, *block_shape]`` into the vLLM-CPU paged blocks ``block_ids``."""
    num_blocks = _check_paged_cpu(kv_caches, layout)
    ids = _block_ids(block_ids, num_blocks, unique=True)
    n = ids.numel()
    _check_host(src, n, layout, "src")
    rep = CopyReport(blocks=n, payload_bytes=n * layout.block_nbytes, host_passes=1)
    if paged_cpu_copy(src, kv_caches, ids.numpy(), gather=False):  # compiled: one call per layer
        rep.copy_ops = layout.num_layers
        return rep
    for pos, b, m in _runs(ids):
        for layer, t in enumerate(kv_caches):
            for kv, view in enumerate(_cpu_blocks(t, b, m, layout)):
                view.copy_(src[pos:pos + m, layer, kv])
                rep.copy_ops += 1
    return rep


def warm_paged_cpu_copies(kv_caches: Sequence[torch.Tensor], layout: KVLayout) -> bool:
    """Load (or compile) the vLLM-CPU layout's copy kernel (engine/copy_kernels.py)
    before the engine serves: block 0 is gathered and scattered back onto itself
    (the same bytes).  Otherwise a fresh process's first load or save pays Numba's
    cache load.  Call it before the engine writes its KV.  True when the kernel is
    in use; False where torch does the copies."""
    _check_paged_cpu(kv_caches, layout)
    buf, first = host_blocks(1, layout), np.zeros(1, dtype=np.int64)
    return (paged_cpu_copy(buf, kv_caches, first, gather=True)
            and paged_cpu_copy(buf, kv_caches, first, gather=False))


def gather_paged_any(kind: str, kv_caches, block_ids, out: torch.Tensor, layout: KVLayout) -> CopyReport:
    """gather_paged or gather_paged_cpu, by the ``kind`` :func:`detect_paged_layout` returned."""
    if kind == PAGED_CPU:
        return gather_paged_cpu(kv_caches, block_ids, out, layout)
    if kind == PAGED_FLASH:
        return gather_paged(kv_caches, block_ids, out, layout)
    raise UnsupportedKVLayoutError(f"unknown paged layout {kind!r}; known: {PAGED_LAYOUTS}")


def scatter_paged_any(kind: str, src: torch.Tensor, kv_caches, block_ids, layout: KVLayout) -> CopyReport:
    """scatter_paged or scatter_paged_cpu, by ``kind``."""
    if kind == PAGED_CPU:
        return scatter_paged_cpu(src, kv_caches, block_ids, layout)
    if kind == PAGED_FLASH:
        return scatter_paged(src, kv_caches, block_ids, layout)
    raise UnsupportedKVLayoutError(f"unknown paged layout {kind!r}; known: {PAGED_LAYOUTS}")


class PagedSink(BlockSink):
    """``BlockStore.get(..., out=sink)`` straight into an engine's paged KV
    blocks ``block_ids`` in host memory (``kind``: the layout
    :func:`detect_paged_layout` found; block ``i`` of the get goes to
    ``block_ids[i]``): every batch the get hands over is scattered with
    :func:`scatter_paged_any`, an L1/L2 chunk while it is still in the CPU
    cache, instead of a get into ``staging`` and one scatter of all of it
    afterwards (every byte through memory twice).  ``staging`` (a host tensor
    ``[n, *block_shape]``, e.g. the connector's reused one) takes the blocks of
    the get's per-block path, as for any sink (engine/sink.py).  Takes may
    overlap (``concurrent_take``): each writes only its own blocks, in the KV
    and in the staging, and torch's copies release the GIL, so the scatter runs
    on both of the get's reading threads: 256 x 256 KiB from L1 into vLLM's CPU
    layout took 21.8-23.4 ms against 27.0-27.6 ms for a get into the staging
    and a scatter from it, and 29.4-31.8 ms with one take at a time
    (interleaved, 2026-12-05)."""

    concurrent_take = True

    def __init__(self, kind: str, kv_caches: Sequence[torch.Tensor], block_ids, layout: KVLayout,
                 staging: torch.Tensor):
        if kind not in PAGED_LAYOUTS:
            raise UnsupportedKVLayoutError(f"unknown paged layout {kind!r}; known: {PAGED_LAYOUTS}")
        for i, t in enumerate(kv_caches):
            if t.device.type != "cpu":
                raise ValueError(f"layer {i} is on {t.device}: a PagedSink scatters from host memory into "
                                 "host memory (a GPU's KV takes a get into pinned staging and scatter_paged)")
        self.kind, self.kv_caches, self.layout = kind, kv_caches, layout
        # The layout checked here, before the get: a take that refused it would end the get half-way.
        num_blocks = _check_paged_cpu(kv_caches, layout) if kind == PAGED_CPU else _check_paged(kv_caches, layout)[1]
        self.block_ids = _block_ids(block_ids, num_blocks, unique=True).tolist()  # checked once, for all takes
        self._staging = _check_host(staging, len(self.block_ids), layout, "staging")
        self._staging_bytes = _np(self._staging).view(np.uint8).reshape(len(self.block_ids), -1)

    def staging(self, n: int) -> torch.Tensor:
        if n != self._staging.shape[0]:
            raise ShapeMismatchError(f"the sink holds {self._staging.shape[0]} blocks, the get asks for {n}")
        return self._staging

    def take(self, src: np.ndarray, offset: int, rows, blocks) -> None:
        layout, rows, blocks = self.layout, list(rows), list(blocks)
        nbytes, m = layout.block_nbytes, len(rows)
        if m == 0:
            return
        if offset == 0 and src.shape[1] == nbytes and rows == list(range(rows[0], rows[0] + m)):
            part = torch.from_numpy(src[rows[0]:rows[0] + m])  # a chunk's consecutive rows: no copy
            self._scatter(part, blocks)
            return
        # L0's slots, a chunk with gaps: each block first into its own row of the staging
        # (disjoint rows, so concurrent takes never meet), then scattered a run at a time.
        staged = self._staging_bytes
        if not np.may_share_memory(src, staged):  # else: the get's per-block path, already there
            for r, b in zip(rows, blocks):
                staged[b] = src[r, offset:offset + nbytes]
        order = sorted(blocks)
        start = 0
        for i in range(1, m + 1):
            if i == m or order[i] != order[i - 1] + 1:
                b0, k = order[start], i - start
                self._scatter(self._staging[b0:b0 + k], order[start:i])
                start = i

    def _scatter(self, part: torch.Tensor, blocks: list[int]) -> None:
        layout = self.layout
        part = part.view(torch.uint8).view(layout.dtype).view(len(blocks), *layout.block_shape)
        scatter_paged_any(self.kind, part, self.kv_caches, [self.block_ids[b] for b in blocks], layout)


# --- HuggingFace DynamicCache -------------------------------------------------------


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers Cache (5.x ``cache.layers``) or a legacy tuple list."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = []
        for i, layer in enumerate(layers):
            if getattr(layer, "is_sliding", False):
                raise ShapeMismatchError(f"layer {i} is a sliding-window layer: its tokens are not a prefix")
            if layer.keys is None or layer.values is None:
                raise ShapeMismatchError(f"layer {i} holds no keys/values")
            out.append((layer.keys, layer.values))
        return out
    return [(k, v) for k, v, *_ in cache]


def _check_dynamic(pairs, layout: KVLayout, need_tokens: int, batch_index: int) -> torch.device:
    if len(pairs) != layout.num_layers:
        raise ShapeMismatchError(f"cache has {len(pairs)} layers, layout has {layout.num_layers}")
    device = pairs[0][0].device
    H, D, dtype = layout.num_kv_heads, layout.head_dim, layout.dtype
    for i, (k, v) in enumerate(pairs):
        for name, t in (("keys", k), ("values", v)):
            shape = t.shape  # read once: these checks run for every layer of every copy
            if len(shape) != 4 or shape[1] != H or shape[3] != D:
                raise ShapeMismatchError(f"layer {i} {name} shape {tuple(shape)} is not [batch, "
                                         f"{H}, seq, {D}]")
            if t.dtype != dtype:
                raise DTypeMismatchError(f"layer {i} {name} dtype {t.dtype} != {dtype}")
            if shape[2] < need_tokens:
                raise ShapeMismatchError(f"layer {i} {name} holds {shape[2]} tokens, need {need_tokens}")
            if not 0 <= batch_index < shape[0]:
                raise ShapeMismatchError(f"batch index {batch_index} outside batch of {shape[0]}")
            if t.device != device:
                raise ValueError(f"layer {i} is on {t.device}, layer 0 on {device}: one device per cache")
            if t.stride(3) != 1:
                raise ShapeMismatchError(f"layer {i} {name}: head_dim must be the contiguous dimension")
    return device


def _seq_view(t: torch.Tensor, b: int, s0: int, n: int, layout: KVLayout) -> torch.Tensor:
    """``t[b, :, s0:s0+n*T, :]`` as ``[n, T, H, D]`` (a strided view, no copy)."""
    T = layout.block_tokens
    return t[b, :, s0:s0 + n * T, :].unflatten(1, (n, T)).permute(1, 2, 0, 3)


def _seq_strided(t: torch.Tensor, b: int, s0: int, n: int, layout: KVLayout) -> torch.Tensor:
    """The view :func:`_seq_view` returns, built with one ``torch.as_strided`` call.

    Same elements, same strides (``tests/test_torch_io.py`` compares the two on
    sliced, batched and offset tensors); about a fifth of the Python cost, which
    matters on the CPU path at small block counts (64 views for 32 layers).
    Needs the bounds ``_check_dynamic`` has checked.
    """
    T = layout.block_tokens
    sb, sh, ss, sd = t.stride()
    return torch.as_strided(t, (n, T, layout.num_kv_heads, layout.head_dim), (T * ss, ss, sh, sd),
                            t.storage_offset() + b * sb + s0 * ss)


def gather_dynamic(cache, out: torch.Tensor, layout: KVLayout, *, first_block: int = 0,
                   batch_index: int = 0, chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> CopyReport:
    """Copy blocks ``first_block .. first_block+n`` of one sequence of a DynamicCache into ``out``.

    ``n`` is ``out.shape[0]``; block ``j`` holds tokens ``[j*T, (j+1)*T)``.
    """
    n = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() >= 1 else 0
    _check_host(out, n, layout, "out")
    pairs = cache_tensors(cache)
    T = layout.block_tokens
    device = _check_dynamic(pairs, layout, (first_block + n) * T, batch_index)
    rep = CopyReport(blocks=n, payload_bytes=n * layout.block_nbytes)
    s0 = first_block * T

    def copy_into(dst: torch.Tensor, lo: int, m: int) -> None:
        for layer, kv_pair in enumerate(pairs):
            for kv in range(2):
                dst[:, layer, kv].copy_(_seq_view(kv_pair[kv], batch_index, s0 + lo * T, m, layout))

    if device.type == "cpu":
        dst = _host_slices(out, layout)
        for layer, kv_pair in enumerate(pairs):
            for kv in range(2):
                dst[2 * layer + kv].copy_(_seq_strided(kv_pair[kv], batch_index, s0, n, layout))
        rep.copy_ops = 2 * layout.num_layers
        rep.host_passes = 1
        return rep
    return _cuda_gather(device, out, layout, rep, chunk_blocks, lambda lo, hi, dst: copy_into(dst, lo, hi - lo))


def scatter_dynamic(src: torch.Tensor, layout: KVLayout, *, device: torch.device | str = "cpu"):
    """A new single-sequence ``DynamicCache`` holding the blocks ``src`` ``[n, *block_shape]``.

    Each layer's keys/values ``[1, H, n*T, D]`` are allocated on ``device`` and
    written once (a transposing copy; on CUDA, through pinned staging, see
    :func:`scatter_dynamic_tensors`).  The layers are installed directly, not
    through ``DynamicCache.update`` (which would concatenate: a second copy).
    """
    pairs, rep = scatter_dynamic_tensors(src, layout, device=device)
    rep.wait()
    return _dynamic_cache(pairs)


def _dynamic_cache(pairs):
    """A ``DynamicCache`` whose layers are ``pairs`` (keys, values), installed as they are."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for k, v in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


class DynamicCacheSink(BlockSink):
    """``BlockStore.get(..., out=sink)`` into a new single-sequence CPU
    ``DynamicCache`` of ``n`` blocks (engine/sink.py): each layer's keys and
    values ``[1, H, n*T, D]`` are allocated here and written once per byte, an
    L0 hit straight from its slot (the compiled transposing copy,
    engine/copy_kernels.py), an L1/L2 batch from the store's chunk buffer, any
    other block from ``staging`` (a host tensor ``[n, *block_shape]``, e.g.
    the adapter's reused one) after the get put it there.  :meth:`cache` is
    the DynamicCache, once the get has returned."""

    def __init__(self, layout: KVLayout, staging: torch.Tensor):
        n = staging.shape[0] if staging.dim() >= 1 else 0
        self.layout = layout
        self._staging = _check_host(staging, n, layout, "staging")
        T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_dim
        self.pairs = [(empty_host((1, H, n * T, D), layout.dtype), empty_host((1, H, n * T, D), layout.dtype))
                      for _ in range(layout.num_layers)]
        self._target = dynamic_target(self.pairs, layout.block_shape, layout.dtype)  # None: torch copies

    def staging(self, n: int) -> torch.Tensor:
        if n != self._staging.shape[0]:
            raise ShapeMismatchError(f"the sink holds {self._staging.shape[0]} blocks, the get asks for {n}")
        return self._staging

    def take(self, src: np.ndarray, offset: int, rows, blocks) -> None:
        layout = self.layout
        if self._target is not None and scatter_block_rows(src, offset, rows, blocks, self._target):
            return
        # No compiled kernel (QUIVER_COPY_JIT=off, no Numba): torch, block by block.
        nbytes, T = layout.block_nbytes, layout.block_tokens
        for r, b in zip(rows, blocks):
            block = torch.from_numpy(src[r, offset:offset + nbytes].copy()).view(layout.dtype).view(layout.block_shape)
            for layer, pair in enumerate(self.pairs):
                for kv in range(2):
                    _seq_view(pair[kv], 0, b * T, 1, layout)[0].copy_(block[layer, kv])

    def cache(self):
        """The ``DynamicCache`` holding the blocks the get delivered."""
        return _dynamic_cache(self.pairs)


def scatter_dynamic_tensors(src: torch.Tensor, layout: KVLayout, *, device: torch.device | str = "cpu",
                            into=None, chunk_blocks: int = DEFAULT_CHUNK_BLOCKS):
    """Per-layer ``(keys, values)`` ``[1, H, n*T, D]`` on ``device`` from host blocks, and the CopyReport.

    ``into``: existing per-layer (keys, values) to write (tokens ``[0, n*T)`` of
    batch row 0) instead of allocating new ones.
    """
    n = src.shape[0] if isinstance(src, torch.Tensor) and src.dim() >= 1 else 0
    _check_host(src, n, layout, "src")
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_dim
    if into is not None:
        pairs = [tuple(p[:2]) for p in into]
        dev = _check_dynamic(pairs, layout, n * T, 0)
    else:
        dev = torch.device(device)

        def fresh() -> torch.Tensor:
            if dev.type == "cpu":
                return empty_host((1, H, n * T, D), layout.dtype)
            return torch.empty((1, H, n * T, D), dtype=layout.dtype, device=dev)
        pairs = [(fresh(), fresh()) for _ in range(layout.num_layers)]
    rep = CopyReport(blocks=n, payload_bytes=n * layout.block_nbytes)

    def copy_from(block_src: torch.Tensor, lo: int, m: int) -> None:
        for layer, pair in enumerate(pairs):
            for kv in range(2):
                _seq_view(pair[kv], 0, lo * T, m, layout).copy_(block_src[:, layer, kv])

    if dev.type == "cpu":
        if not scatter_rows(src, pairs):  # compiled, in source order (engine/copy_kernels.py); else torch
            srcs = _host_slices(src, layout)
            for layer, pair in enumerate(pairs):
                for kv in range(2):
                    _seq_strided(pair[kv], 0, 0, n, layout).copy_(srcs[2 * layer + kv])
        rep.copy_ops = 2 * layout.num_layers
        rep.host_passes = 1
        return pairs, rep
    rep = _cuda_scatter(dev, src, layout, rep, chunk_blocks, lambda lo, hi, d: copy_from(d, lo, hi - lo))
    return pairs, rep


# --- CUDA: pinned staging, side stream, events -------------------------------------


def _cuda_gather(device: torch.device, out: torch.Tensor, layout: KVLayout, rep: CopyReport,
                 chunk_blocks: int, gather_dev, dev_ops: int | None = None) -> CopyReport:
    """Device gather into scratch on one side stream, D2H on another, then into ``out``.

    Chunked by ``chunk_blocks`` so scratch and staging stay bounded, and
    double-buffered: the device gathers chunk i+1 into one scratch buffer
    while the copy engine moves chunk i out of the other.  When ``out`` is
    pinned the D2H goes straight into it (no host pass) and the call returns
    before the copies end (``rep.wait()``).  Otherwise two pinned staging
    buffers alternate (the host copies chunk i out of one while chunk i+1
    lands in the other) and the call returns complete.  The engine's current
    stream waits for the last copy, so its later kernels cannot overwrite the
    blocks while they are read.  ``gather_dev(lo, hi, dst)`` runs with the
    gather stream current, so what it allocates (the block ids) is freed in
    that stream's order.
    """
    n = rep.blocks
    current = torch.cuda.current_stream(device)
    work, xfer = torch.cuda.Stream(device), torch.cuda.Stream(device)
    work.wait_stream(current)  # the engine's writes to its KV come first
    direct = out.is_pinned()
    m = max(1, min(chunk_blocks, n))
    nbuf = min(2, max(1, -(-n // m)))
    staging = [] if direct else [_pinned(m, layout) for _ in range(nbuf)]
    gathered = [torch.cuda.Event() for _ in range(nbuf)]  # scratch k holds its chunk
    copied = [torch.cuda.Event() for _ in range(nbuf)]  # scratch k's chunk is on the host
    scratch = _scratch(nbuf, m, layout, device, work, xfer)
    pending = None  # (lo, hi, k): a chunk whose D2H is queued and not yet copied out of staging k

    def copy_out(lo: int, hi: int, k: int) -> None:
        copied[k].synchronize()
        out[lo:hi].copy_(staging[k][:hi - lo])

    for i, lo in enumerate(range(0, n, m)):
        hi, k = min(n, lo + m), i % nbuf
        with torch.cuda.stream(work):
            work.wait_event(copied[k])  # the D2H two chunks back has read scratch k (unrecorded: no wait)
            gather_dev(lo, hi, scratch[k][:hi - lo])
            gathered[k].record(work)
        with torch.cuda.stream(xfer):
            xfer.wait_event(gathered[k])
            host = out[lo:hi] if direct else staging[k][:hi - lo]
            host.copy_(scratch[k][:hi - lo], non_blocking=True)
            copied[k].record(xfer)
        if pending is not None:
            copy_out(*pending)
        pending = None if direct else (lo, hi, k)
    if pending is not None:
        copy_out(*pending)
    last = copied[(-(-n // m) - 1) % nbuf]
    current.wait_event(last)
    rep.device_passes, rep.transfers, rep.host_passes = 1, 1, 0 if direct else 1
    per_chunk = 2 * layout.num_layers if dev_ops is None else dev_ops  # device copies per chunk
    rep.copy_ops = -(-n // m) * (per_chunk + 1 + (0 if direct else 1))
    rep.event = last if n else None
    return rep


def _cuda_scatter(device: torch.device, src: torch.Tensor, layout: KVLayout, rep: CopyReport,
                  chunk_blocks: int, scatter_dev, dev_ops: int | None = None) -> CopyReport:
    """Host -> pinned staging (unless ``src`` is pinned) -> device scratch -> engine tensors.

    The H2D copies run on one side stream and the device scatters on
    another, double-buffered like :func:`_cuda_gather`; with pageable ``src``
    the host fills one staging buffer while the other is read.  The current
    stream is made to wait on the final event, so the engine's next kernels
    see the blocks without a host sync.  A pinned ``src`` must stay unchanged
    until ``rep.wait()``.
    """
    n = rep.blocks
    current = torch.cuda.current_stream(device)
    work, xfer = torch.cuda.Stream(device), torch.cuda.Stream(device)
    work.wait_stream(current)  # the engine's last use of the target blocks comes first
    direct = src.is_pinned()
    m = max(1, min(chunk_blocks, n))
    nbuf = min(2, max(1, -(-n // m)))
    staging = [] if direct else [_pinned(m, layout) for _ in range(nbuf)]
    landed = [torch.cuda.Event() for _ in range(nbuf)]  # scratch k holds its chunk (staging k is free)
    scattered = [torch.cuda.Event() for _ in range(nbuf)]  # scratch k's chunk is in the engine's tensors
    scratch = _scratch(nbuf, m, layout, device, work, xfer)
    for i, lo in enumerate(range(0, n, m)):
        hi, k = min(n, lo + m), i % nbuf
        if direct:
            host = src[lo:hi]
        else:
            landed[k].synchronize()  # the H2D two chunks back has read staging k (unrecorded: no-op)
            host = staging[k][:hi - lo]
            host.copy_(src[lo:hi])
        with torch.cuda.stream(xfer):
            xfer.wait_event(scattered[k])  # the scatter two chunks back has read scratch k
            scratch[k][:hi - lo].copy_(host, non_blocking=True)
            landed[k].record(xfer)
        with torch.cuda.stream(work):
            work.wait_event(landed[k])
            scatter_dev(lo, hi, scratch[k][:hi - lo])
            scattered[k].record(work)
    last = scattered[(-(-n // m) - 1) % nbuf]
    current.wait_event(last)
    rep.device_passes, rep.transfers, rep.host_passes = 1, 1, 0 if direct else 1
    per_chunk = 2 * layout.num_layers if dev_ops is None else dev_ops  # device copies per chunk
    rep.copy_ops = -(-n // m) * (per_chunk + 1 + (0 if direct else 1))
    rep.event = last if n else None
    return rep


def _scratch(nbuf: int, m: int, layout: KVLayout, device: torch.device, work, xfer) -> list[torch.Tensor]:
    """``nbuf`` device buffers of ``m`` blocks, allocated on ``work`` and marked used by
    ``xfer`` too, so the allocator reuses them only after both streams are done."""
    with torch.cuda.stream(work):
        bufs = [torch.empty((m, *layout.block_shape), dtype=layout.dtype, device=device) for _ in range(nbuf)]
    for b in bufs:
        b.record_stream(xfer)
    return bufs


def _pinned(m: int, layout: KVLayout) -> torch.Tensor:
    """A pinned staging buffer of ``m`` blocks (torch's host allocator caches them between calls)."""
    return empty_host((m, *layout.block_shape), layout.dtype, pinned=True)


__all__ = [
    "KVLayout",
    "CopyReport",
    "BlockTableError",
    "TORCH_DTYPES",
    "host_blocks",
    "block_view",
    "gather_paged",
    "scatter_paged",
    "warm_paged_copies",
    "warm_paged_cpu_copies",
    "PAGED_FLASH",
    "PAGED_CPU",
    "PAGED_LAYOUTS",
    "CPU_ISAS_VERIFIED",
    "UnsupportedKVLayoutError",
    "detect_paged_layout",
    "gather_paged_cpu",
    "scatter_paged_cpu",
    "gather_paged_any",
    "scatter_paged_any",
    "cache_tensors",
    "gather_dynamic",
    "scatter_dynamic",
    "scatter_dynamic_tensors",
]
