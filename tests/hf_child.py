"""Child program for the transformers adapter's cross-process tests (tests/test_hf_adapter.py).

    python tests/hf_child.py ARCH STORE_PATH L2SPEC SEED NTOK OUT

builds model ARCH (``llama`` or ``qwen2``, float32, seeded random weights:
``build_model``), the prompt of NTOK tokens determined by SEED (``make_prompt``),
opens the BlockStore at STORE_PATH (L2SPEC: a directory, "s3://bucket/prefix"
with the AWS settings from the environment, or "-" for none), runs
``HFPrefixCache.prefill`` with all logits and 32 greedy steps, saves
``{"logits", "greedy"}`` to OUT (torch.save) and prints one JSON line: what the
prefill restored and stored, and the store's hit counters.  Torch runs with one
thread, as in the parent, so both compute with the same kernels.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

GREEDY_STEPS = 32
NAMES = dict(model_revision="seed0", tokenizer="synthetic", tokenizer_revision="v1", tenant="acme")


def build_model(arch: str, dtype: torch.dtype = torch.float32):
    """A tiny causal LM from a config, weights from ``torch.manual_seed(0)`` (nothing downloaded).

    llama: 2 layers, 4 query heads, 2 KV heads (GQA 2:1), head_dim 16.
    qwen2: 3 layers, 6 query heads, 1 KV head (MQA), head_dim 16, q/k/v biases.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=257, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=6, num_key_value_heads=1, max_position_embeddings=512)
        model = Qwen2ForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown arch {arch!r}")
    return model.to(dtype).eval()


def make_prompt(seed: int, n: int, vocab: int = 257) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def main(argv: list[str]) -> int:
    from quiver.engine.hf_adapter import HFPrefixCache
    from quiver.engine.store import BlockStore

    arch, path, spec, seed, ntok, out = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5]
    torch.set_num_threads(1)
    model = build_model(arch)
    prompt = make_prompt(seed, ntok)
    with BlockStore.open(path, object_store=None if spec == "-" else spec, ram_bytes=1 << 20, index="flat") as store:
        hf = HFPrefixCache(model, store, model_name=f"test/{arch}", **NAMES)
        res = hf.prefill(prompt)
        greedy = hf.greedy(res, GREEDY_STEPS)
        st = store.stats()
        left = store.flush_l2(timeout_s=60)
    torch.save({"logits": res.logits, "greedy": greedy}, out)
    print(json.dumps({"cached_tokens": res.cached_tokens, "computed_tokens": res.computed_tokens,
                      "hit_blocks": res.hit_blocks, "stored_blocks": res.stored_blocks,
                      "restore_error": res.restore_error, "put_error": res.put_error,
                      "l0_hits": st["counters"]["l0_hits"], "l1_hits": st["counters"]["l1_hits"], "l2_hits": st["counters"]["l2_hits"],
                      "l2_left": left}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
