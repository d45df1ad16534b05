"""HuggingFace transformers adapter: prefill a causal LM through a BlockStore.

    from quiver.engine import BlockStore
    from quiver.engine.hf_adapter import HFPrefixCache

    with BlockStore.open("./quiver-data") as store:
        hf = HFPrefixCache(model, store, model_name="org/llama-7b", model_revision="0e9e39f",
                           tokenizer="llama3", tokenizer_revision="0e9e39f", tenant="acme")
        res = hf.prefill(input_ids)          # restores the longest cached prefix, runs the rest
        next_token = res.logits[0, -1].argmax()
        out = model(next_token.view(1, 1), past_key_values=res.cache, use_cache=True)  # generation

``prefill``:

1. ``CacheIdentity`` from the model config (layers, KV heads, head dim), the
   model's dtype (the KV dtype: the cache holds exactly the tensors the model
   produced, nothing is cast) and the caller's names (model + revision,
   tokenizer + revision, tenant, adapter + revision).  The names are the
   caller's promise: the config says nothing about the weights, so the model
   revision must name them.
2. ``store.lookup``: ``hits`` leading full blocks are held by some tier.
3. Restore ``k = min(hits, (len(prompt) - 1) // block_tokens)`` blocks: at least
   one token is always computed, so there are logits to return.  When the whole
   prompt is cached and its length is a multiple of ``block_tokens``, this
   restores all blocks but the last and recomputes that one block (rather than
   cropping the cache and running the last token alone).  Why: a one-row
   forward takes a different kernel path (matrix-vector) whose float results
   differ in the last bits from the full prefill's (measured: 9e-8 on a tiny
   float32 Llama); a suffix of one block is a matrix-matrix product like the
   full prefill, and the logits were bit-identical in every case tested.
   The cost is at most ``block_tokens - 1`` extra tokens of compute.
4. ``store.get`` delivers the k verified blocks into a new ``DynamicCache``
   (a ``DynamicCacheSink``, engine/sink.py): an L0 hit is copied once, from
   its slot into the cache's tensors (a transposing copy); blocks from L1 or
   L2 are read a few MiB at a time into the store's chunk buffer and copied
   from there, and any block decoded one at a time goes through a reused host
   staging tensor (:meth:`HFPrefixCache.reserve`).  On a CUDA model the get fills the
   pinned staging and ``scatter_dynamic`` moves it to the device.  A get that
   fails (a block evicted since the lookup, corruption in every tier, the
   identity guard refusing a block, an unreachable L2) is not an inference
   failure: the adapter recomputes the whole prompt and says why in
   ``PrefillResult.restore_error``.
5. ``model(prompt[kT:], past_key_values=cache)``.
6. The new full blocks ``k .. len(prompt) // T`` are gathered out of the cache
   (``gather_dynamic``) and stored (``store.put(..., start_block=k)``: only the
   new blocks are passed; durable on return).  A put
   that fails (for example a sync L2 that is down, after L1 holds the blocks)
   leaves the logits valid: it is reported in ``PrefillResult.put_error``.

Only single-sequence (batch 1) prompts and full-attention models: a
sliding-window or chunked-attention layer's cache is not a prefix of the
prompt, and is refused with :class:`UnsupportedModelError` up front.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from quiver.engine.errors import QuiverError
from quiver.engine.identity import CacheIdentity
from quiver.engine.torch_io import DynamicCacheSink, KVLayout, empty_host, gather_dynamic, scatter_dynamic

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class UnsupportedModelError(QuiverError, ValueError):
    """The model's KV cache is not a plain per-layer prefix (sliding window, chunked attention, ...)."""


def text_config(config):
    """The decoder's config (multimodal configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def check_supported(config) -> None:
    """Refuse configs whose cache layers are not full-attention prefixes."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        bad = sorted({t for t in types if t != "full_attention"})
        if bad:
            raise UnsupportedModelError(f"{type(cfg).__name__}: layer types {bad} are not prefix caches")
    elif getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        raise UnsupportedModelError(f"{type(cfg).__name__}: sliding_window={cfg.sliding_window} is not a prefix cache")
    elif getattr(cfg, "attention_chunk_size", None) is not None:
        raise UnsupportedModelError(f"{type(cfg).__name__}: chunked attention is not a prefix cache")


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    cfg = text_config(config)
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv_heads, int(head_dim)


def identity_for(config, *, model: str, model_revision: str, tokenizer: str, tokenizer_revision: str,
                 tenant: str, kv_dtype: str | torch.dtype, adapter: str | None = None,
                 adapter_revision: str | None = None, block_tokens: int = 16,
                 tenant_secret: bytes | None = None) -> CacheIdentity:
    """The CacheIdentity of a transformers model's KV: shape from the config, names from the caller."""
    check_supported(config)
    if isinstance(kv_dtype, torch.dtype):
        if kv_dtype not in DTYPE_NAMES:
            raise UnsupportedModelError(f"KV dtype {kv_dtype} is not one of {sorted(DTYPE_NAMES.values())}")
        kv_dtype = DTYPE_NAMES[kv_dtype]
    layers, kv_heads, head_dim = kv_shape(config)
    return CacheIdentity(model=model, model_revision=model_revision, tokenizer=tokenizer,
                         tokenizer_revision=tokenizer_revision, adapter=adapter, adapter_revision=adapter_revision,
                         tenant=tenant, kv_dtype=kv_dtype, block_tokens=block_tokens, num_layers=layers,
                         num_kv_heads=kv_heads, head_dim=head_dim, tenant_secret=tenant_secret)


@dataclass
class PrefillResult:
    """What one :meth:`HFPrefixCache.prefill` did.

    ``logits``: the model's logits for the computed tokens (positions
    ``cached_tokens ..``), trimmed to the last ``logits_to_keep`` when that
    was given.  ``cache``: the DynamicCache holding the whole prompt (continue
    generation with it).  Timings in seconds; ``store_s`` = lookup + get +
    scatter + gather + put, the store's share of the path.
    """

    logits: torch.Tensor
    cache: Any
    prompt_tokens: int
    hit_blocks: int  # what lookup reported
    cached_tokens: int  # restored from the store (k * block_tokens)
    computed_tokens: int
    stored_blocks: int  # newly written by put
    restore_error: str | None = None
    put_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def store_s(self) -> float:
        t = self.timings
        return sum(t.get(k, 0.0) for k in ("lookup_s", "get_s", "scatter_s", "gather_s", "put_s"))


class HFPrefixCache:
    """A transformers causal LM (batch 1, full attention) with its prefix KV in a BlockStore."""

    def __init__(self, model, store, *, model_name: str, model_revision: str, tokenizer: str,
                 tokenizer_revision: str, tenant: str, adapter: str | None = None,
                 adapter_revision: str | None = None, block_tokens: int = 16,
                 tenant_secret: bytes | None = None, store_blocks: bool = True):
        self.model = model
        self.store = store
        self.device = next(model.parameters()).device
        self.ident = identity_for(model.config, model=model_name, model_revision=model_revision, tokenizer=tokenizer,
                                  tokenizer_revision=tokenizer_revision, tenant=tenant,
                                  kv_dtype=next(model.parameters()).dtype, adapter=adapter,
                                  adapter_revision=adapter_revision, block_tokens=block_tokens,
                                  tenant_secret=tenant_secret)
        self.layout = KVLayout.from_identity(self.ident)
        self.store_blocks = store_blocks
        self._staging: torch.Tensor | None = None  # host blocks restored by get, reused across prefills

    def reserve(self, n_blocks: int) -> torch.Tensor:
        """The reused host staging buffer, grown to hold ``n_blocks`` blocks; returns its first ``n_blocks``.

        Fresh memory costs ~3x a copy on its first touch (page faults: a get
        into a new tensor measured 1.0 GB/s, into a reused one 2.6-2.8 GB/s),
        so the buffer is kept and touched once when it grows.  It holds the
        largest prefix restored so far (e.g. 128 MiB for 8192 tokens of the
        58M-parameter study model in float32).
        """
        if self._staging is None or self._staging.shape[0] < n_blocks:
            self._staging = None  # release the old one before allocating the new one
            buf = empty_host((n_blocks, *self.layout.block_shape), self.layout.dtype, pinned=self._on_cuda())
            buf.zero_()
            self._staging = buf
        return self._staging[:n_blocks]

    def _on_cuda(self) -> bool:
        """Host buffers are pinned for a CUDA model: copies skip the pinned staging."""
        return torch.device(self.device).type == "cuda"

    @staticmethod
    def _tokens(input_ids) -> list[int]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 2:
                if input_ids.shape[0] != 1:
                    raise ValueError(f"batch of {input_ids.shape[0]} sequences: the adapter prefills one at a time")
                input_ids = input_ids[0]
            if input_ids.dim() != 1:
                raise ValueError(f"input_ids must be [seq] or [1, seq], got {tuple(input_ids.shape)}")
            return input_ids.tolist()
        return [int(t) for t in input_ids]

    def prefill(self, input_ids, *, logits_to_keep: int = 0) -> PrefillResult:
        """Restore the longest cached prefix of ``input_ids``, run the model on the rest, store new blocks.

        ``logits_to_keep``: as in transformers (0 = logits of every computed
        token; 1 = the last one only, all an engine needs for the first token).
        """
        tokens = self._tokens(input_ids)
        n = len(tokens)
        if n == 0:
            raise ValueError("empty prompt")
        T = self.ident.block_tokens
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        hits = self.store.lookup(self.ident, tokens)
        t["lookup_s"] = time.perf_counter() - t0
        k = min(hits, (n - 1) // T)  # keep at least one token to compute (see the module docstring)
        cache, host, restore_error = None, None, None
        if k:
            try:
                t0 = time.perf_counter()
                host = self.reserve(k)
                if self._on_cuda():  # into pinned host blocks, then to the device
                    self.store.get(self.ident, tokens, k, out=host)
                    t["get_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    cache = scatter_dynamic(host, self.layout, device=self.device)
                else:  # straight into the cache's tensors: an L0 hit is copied once (engine/sink.py)
                    sink = self.store.get(self.ident, tokens, k, out=DynamicCacheSink(self.layout, host))
                    t["get_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    cache = sink.cache()
                t["scatter_s"] = time.perf_counter() - t0
            except QuiverError as exc:  # recompute: a cache miss is never an inference failure
                restore_error = f"{type(exc).__name__}: {exc}"
                cache, host, k = None, None, 0
        ids = torch.tensor([tokens[k * T:]], dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
        t["forward_s"] = time.perf_counter() - t0
        cache = out.past_key_values
        full = n // T
        stored, put_error = 0, None
        if self.store_blocks and full > k:
            t0 = time.perf_counter()
            new = empty_host((full - k, *self.layout.block_shape), self.layout.dtype, pinned=self._on_cuda())
            gather_dynamic(cache, new, self.layout, first_block=k).wait()  # CUDA: the D2H is done
            t["gather_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                stored = self.store.put(self.ident, tokens, new, start_block=k)  # 0..k-1 came from the store
            except QuiverError as exc:
                put_error = f"{type(exc).__name__}: {exc}"
            t["put_s"] = time.perf_counter() - t0
        return PrefillResult(logits=out.logits, cache=cache, prompt_tokens=n, hit_blocks=hits, cached_tokens=k * T,
                             computed_tokens=n - k * T, stored_blocks=stored, restore_error=restore_error,
                             put_error=put_error, timings=t)

    def greedy(self, result: PrefillResult, steps: int) -> list[int]:
        """``steps`` greedy tokens continuing ``result`` (extends ``result.cache``)."""
        return greedy_continue(self.model, result.logits[0, -1], result.cache, steps)


def greedy_continue(model, last_logits: torch.Tensor, cache, steps: int) -> list[int]:
    """Greedy decoding for ``steps`` tokens from the last position's logits and its cache."""
    tokens = []
    nxt = int(last_logits.argmax())
    with torch.no_grad():
        for i in range(steps):
            tokens.append(nxt)
            if i + 1 == steps:
                break
            out = model(torch.tensor([[nxt]], device=last_logits.device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
    return tokens


__all__ = ["HFPrefixCache", "PrefillResult", "UnsupportedModelError", "identity_for", "kv_shape",
           "check_supported", "greedy_continue", "text_config"]
