"""Torch copy-in/out on CUDA: the paged (flash) and DynamicCache paths through pinned memory.

These run only where torch sees a CUDA device (none on the CI machine: the
module is skipped there, with that reason).  Every check compares the device
path with the CPU path of the same module on the same bytes, which the CPU
suite (tests/test_torch_io.py) checks against the layouts' definitions.

Stream order, not timing: the engine's writes are queued on the current
stream behind a long device sleep (``torch.cuda._sleep``), so a copy that
did not wait for them would read the old values; and the engine's reads
after a scatter are queued with no host sync, so a scatter that did not make
the current stream wait would leave them reading zeros (its last block is
written tens of chunks after the call returns).
"""

from __future__ import annotations

import pytest
import torch

from quiver.engine.torch_io import (
    KVLayout,
    gather_dynamic,
    gather_paged,
    host_blocks,
    scatter_dynamic,
    scatter_dynamic_tensors,
    scatter_paged,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA path: needs a CUDA device (none on this machine)")

L, T, H, D = 3, 16, 2, 64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int8]
SLEEP_CYCLES = 200_000_000  # ~0.1 s of device time: far longer than queuing the copy takes


def _layout(dtype) -> KVLayout:
    return KVLayout(num_layers=L, block_tokens=T, num_kv_heads=H, head_dim=D, dtype=dtype)


def _random(shape, dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    return torch.randn(shape, generator=g).to(dtype)


def _paged_cpu(num_blocks: int, dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [_random((2, num_blocks, T, H, D), dtype, g) for _ in range(L)]


def _host(n: int, layout: KVLayout, pinned: bool) -> torch.Tensor:
    t = host_blocks(n, layout, for_device="cuda" if pinned else "cpu")
    assert t.is_pinned() == pinned
    return t


@pytest.fixture(params=["kernel", "torch"])
def copier(request, monkeypatch):
    """The paged copies' device pass: the Triton kernel (one launch per chunk) or torch's
    per-layer index ops (``QUIVER_COPY_JIT=off``, and wherever Triton is missing)."""
    if request.param == "kernel":
        pytest.importorskip("triton", reason="the paged copy kernel needs Triton")
    else:
        monkeypatch.setenv("QUIVER_COPY_JIT", "off")
    return request.param


def _device_ops(rep, chunk: int, pinned: bool) -> int:
    """Device copies per chunk, from the CopyReport: 1 for the kernel, 2 * layers for torch."""
    chunks = -(-rep.blocks // chunk)
    return rep.copy_ops // chunks - 1 - (0 if pinned else 1)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_gather_matches_cpu_gather(dtype, chunk, pinned, copier):
    layout = _layout(dtype)
    kv_cpu = _paged_cpu(23, dtype)
    kv = [t.cuda() for t in kv_cpu]
    ids = [22, 0, 5, 5, 17, 3, 9, 11, 1, 20]  # token order, not sorted; a repeat is legal in a gather
    want = host_blocks(len(ids), layout)
    gather_paged(kv_cpu, ids, want, layout)
    out = _host(len(ids), layout, pinned)
    rep = gather_paged(kv, ids, out, layout, chunk_blocks=chunk)
    rep.wait()
    assert torch.equal(out, want)
    assert (rep.device_passes, rep.transfers, rep.host_passes) == (1, 1, 0 if pinned else 1)
    assert _device_ops(rep, min(chunk, len(ids)), pinned) == (1 if copier == "kernel" else 2 * L)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_scatter_matches_cpu_scatter(dtype, chunk, pinned, copier):
    layout = _layout(dtype)
    g = torch.Generator().manual_seed(1)
    ids = [4, 19, 0, 7, 12, 2, 15]
    src = _host(len(ids), layout, pinned)
    src.copy_(_random(tuple(src.shape), dtype, g))
    want = _paged_cpu(21, dtype, seed=2)
    kv = [t.cuda() for t in want]
    scatter_paged(src, want, ids, layout)
    rep = scatter_paged(src, kv, ids, layout, chunk_blocks=chunk)
    rep.wait()
    for got, ref in zip(kv, want):  # the named blocks written, every other block unchanged
        assert torch.equal(got.cpu(), ref)
    assert _device_ops(rep, min(chunk, len(ids)), pinned) == (1 if copier == "kernel" else 2 * L)


def test_kernel_addresses_layers_below_the_first_and_leaves_strided_ones_to_torch():
    """Layers carved from one allocation in reverse (layer 0 at the highest address: the
    kernel's offsets are negative) copy right; non-contiguous layers take torch's path."""
    pytest.importorskip("triton", reason="the paged copy kernel needs Triton")
    layout = _layout(torch.float16)
    cpu = _paged_cpu(12, torch.float16, seed=6)
    big = torch.stack(cpu[::-1]).cuda()  # [L, 2, 12, T, H, D]
    kv = [big[L - 1 - layer] for layer in range(L)]
    assert kv[0].data_ptr() > kv[-1].data_ptr()
    ids = [11, 2, 7, 0]
    want = host_blocks(len(ids), layout)
    gather_paged(cpu, ids, want, layout)
    out = _host(len(ids), layout, pinned=True)
    rep = gather_paged(kv, ids, out, layout)
    rep.wait()
    assert torch.equal(out, want) and _device_ops(rep, len(ids), True) == 1
    wide = [torch.cat([t, t], dim=-1).cuda()[..., :D] for t in cpu]  # head_dim not contiguous
    assert not wide[0].is_contiguous()
    out.zero_()
    rep = gather_paged(wide, ids, out, layout)
    rep.wait()
    assert torch.equal(out, want) and _device_ops(rep, len(ids), True) == 2 * L


def test_gather_waits_for_the_engines_writes_on_the_current_stream():
    layout = _layout(torch.float16)
    kv = [t.cuda() for t in _paged_cpu(8, torch.float16)]
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # the engine is busy ...
    for t in kv:
        t.fill_(3.0)  # ... then writes its KV, all queued on the current stream
    out = _host(4, layout, pinned=True)
    gather_paged(kv, [1, 6, 2, 0], out, layout).wait()
    assert bool((out == 3.0).all())


def test_engine_reads_after_scatter_see_the_blocks_without_a_host_sync():
    layout = _layout(torch.float16)
    n = 4096  # 96 MiB in 64 chunks: the last block lands long after the call returns
    kv = [torch.zeros(2, n, T, H, D, dtype=torch.float16, device="cuda") for _ in range(L)]
    src = _host(n, layout, pinned=True)
    src.fill_(5.0)
    torch.cuda.synchronize()
    ids = list(range(n - 1, -1, -1))
    rep = scatter_paged(src, kv, ids, layout)
    sums = torch.stack([t[:, 0].float().sum() for t in kv])  # queued on the current stream, no sync
    assert sums.tolist() == [5.0 * 2 * T * H * D] * L
    rep.wait()


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dynamic_round_trip_matches_cpu(dtype, pinned):
    layout = _layout(dtype)
    g = torch.Generator().manual_seed(3)
    n = 7
    src = _host(n, layout, pinned)
    src.copy_(_random(tuple(src.shape), dtype, g))
    cache = scatter_dynamic(src, layout, device="cuda")
    cpu_cache = scatter_dynamic(src, layout)
    for (k, v), (kc, vc) in zip(((x.keys, x.values) for x in cache.layers),
                                ((x.keys, x.values) for x in cpu_cache.layers)):
        assert k.is_cuda and torch.equal(k.cpu(), kc) and torch.equal(v.cpu(), vc)
    back = _host(n - 2, layout, pinned)
    gather_dynamic(cache, back, layout, first_block=2, chunk_blocks=2).wait()
    assert torch.equal(back, src[2:])


def test_dynamic_scatter_into_existing_tensors_leaves_later_tokens():
    layout = _layout(torch.float16)
    pairs = [tuple(torch.full((1, H, 6 * T, D), 9.0, dtype=torch.float16, device="cuda") for _ in range(2))
             for _ in range(L)]
    src = _host(4, layout, pinned=False)
    src.copy_(_random(tuple(src.shape), torch.float16, torch.Generator().manual_seed(4)))
    _, rep = scatter_dynamic_tensors(src, layout, into=pairs, chunk_blocks=3)
    rep.wait()
    cpu_pairs, _ = scatter_dynamic_tensors(src, layout)
    for (k, v), (kc, vc) in zip(pairs, cpu_pairs):
        assert torch.equal(k[:, :, :4 * T].cpu(), kc) and torch.equal(v[:, :, :4 * T].cpu(), vc)
        assert bool((k[:, :, 4 * T:] == 9.0).all()) and bool((v[:, :, 4 * T:] == 9.0).all())


def test_real_model_cache_on_cuda_gathers_like_its_cpu_copy():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=H * D, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=H, head_dim=D, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    with torch.no_grad():
        cache = model(torch.arange(3 * T, device="cuda").view(1, -1) % 64, use_cache=True).past_key_values
    layout = _layout(torch.float16)
    out = _host(3, layout, pinned=True)
    gather_dynamic(cache, out, layout).wait()

    class CpuCache:  # the same tensors, copied to the host: the CPU path is the reference
        layers = [type("Layer", (), {"keys": x.keys.cpu(), "values": x.values.cpu(), "is_sliding": False})()
                  for x in cache.layers]

    want = host_blocks(3, layout)
    gather_dynamic(CpuCache(), want, layout)
    assert torch.equal(out, want) and bool(out.abs().sum() > 0)


def test_hf_adapter_on_cuda_restores_the_prefix_it_stored(tmp_path):
    """The transformers adapter with the model on the GPU: pinned host buffers, a put of the
    gathered blocks, then a restore whose cache holds the stored bits and whose logits match
    the full prefill's (float32, no TF32)."""
    from hf_child import NAMES, build_model, make_prompt
    from quiver.engine.hf_adapter import HFPrefixCache
    from quiver.engine.store import BlockStore

    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model("llama").to("cuda").eval()
    prompt = make_prompt(11, 5 * 16 + 7).to("cuda")
    with torch.no_grad():
        full = model(prompt, use_cache=True)
    with BlockStore.open(tmp_path / "s", ram_bytes=1 << 20, index="flat") as store:
        hf = HFPrefixCache(model, store, model_name="test/llama", **NAMES)
        first = hf.prefill(prompt)
        assert (first.hit_blocks, first.stored_blocks) == (0, 5)
        assert hf.reserve(1).is_pinned()
        again = hf.prefill(prompt)
        assert (again.hit_blocks, again.cached_tokens) == (5, 80)
    for got, want in zip(again.cache.layers, full.past_key_values.layers):
        assert torch.equal(got.keys[:, :, :80], want.keys[:, :, :80])
        assert torch.equal(got.values[:, :, :80], want.values[:, :, :80])
    assert (again.logits - full.logits[:, 80:]).abs().max().item() <= 1e-4


def test_warm_paged_copies_leaves_the_blocks_as_they_were(copier):
    from quiver.engine.torch_io import warm_paged_copies

    layout = _layout(torch.float16)
    cpu = _paged_cpu(5, torch.float16, seed=8)
    kv = [t.cuda() for t in cpu]
    assert warm_paged_copies(kv, layout) == (copier == "kernel")
    assert all(torch.equal(got.cpu(), want) for got, want in zip(kv, cpu))

