"""Build the tiny local Llama + tokenizer the vLLM tests serve (nothing is downloaded).

    python tests/vllm_model.py OUT_DIR

writes a random-weight Llama (seeded: the same bytes every time) with
safetensors weights, and a byte-level BPE tokenizer trained on a few sentences
saved as ``PreTrainedTokenizerFast``.  Shapes suit vLLM's CPU attention
backend: head_dim 64 (its kernels take 32, 64, 80, ...), 2 KV heads under 4
query heads (GQA), 2 layers.  ``initializer_range`` is raised from the usual
0.02 so the random model's logits are peaked: greedy decoding then has no
near-ties, and "token-identical" compares the KV cache, not bf16 rounding luck.

Run with the vLLM venv's python (its transformers is the one vLLM reads the
config with).
"""

from __future__ import annotations

import os
import sys

SENTENCES = [
    "Quiver keeps the KV blocks of a prompt so the next request does not prefill them again.",
    "A block is content addressed: its key is a hash chain over the model identity and the tokens.",
    "The scheduler asks how many tokens are cached, the worker loads them into the paged cache.",
    "Every block carries a CRC and the identity of the model that computed it.",
    "vLLM runs on the CPU backend here with a block size of thirty two tokens.",
    "The quick brown fox jumps over the lazy dog while the cache warms up.",
]
VOCAB = 512
SEED = 1234


def build(out: str) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)

    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.2,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
