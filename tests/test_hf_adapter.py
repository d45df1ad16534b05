"""The transformers adapter (engine/hf_adapter.py) on real models built from configs.

Two architectures with different KV layouts (tests/hf_child.py ``build_model``):
Llama (2 KV heads for 4 query heads) and Qwen2 (one KV head for 6 query heads,
3 layers, q/k/v biases), float32, seeded random weights, nothing downloaded.

Exactness: a prefill that restores a prefix from the store must reproduce, bit
for bit (``torch.equal``), its reference: the full prefill of the prompt whose
blocks were stored, its cache cut to the restored length, then the suffix.
Against the plain full prefill of the whole prompt, logits must agree within
1e-5 (float32; they are often bit-identical, but a GEMM with another row count
may round differently) and 32 greedy tokens must be identical.

Across processes: one child prefills (full) and stores; a second child, with
the same store path (L1), a fresh store path and a shared local-directory L2,
or a fresh path and moto S3, restores and computes the rest.  Torch runs with
one thread in parent and children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import BUCKET
from quiver.engine.errors import ChecksumMismatchError, InvalidIdentityError
from quiver.engine.hf_adapter import HFPrefixCache, UnsupportedModelError, greedy_continue, identity_for
from quiver.engine.store import BlockStore
from hf_child import GREEDY_STEPS, NAMES, build_model, make_prompt

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_child.py")
ARCHS = ["llama", "qwen2"]
T = 16
TOL = 1e-5  # absolute, logits of order 0.1-1 here

_MODELS: dict = {}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_of(arch: str, dtype=torch.float32):
    if (arch, dtype) not in _MODELS:
        _MODELS[arch, dtype] = build_model(arch, dtype)
    return _MODELS[arch, dtype]


def full_prefill(model, prompt):
    """Reference: the whole prompt in one forward, no store; logits of every position + greedy."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    return out.logits, greedy_continue(model, out.logits[0, -1], out.past_key_values, GREEDY_STEPS)


def restore_reference(model, source, k, prompt):
    """What a restore must reproduce bit for bit: the KV of ``source``'s full prefill (the run that
    produced the stored blocks) cut to ``k`` tokens, then ``prompt[k:]`` run on it; logits + greedy."""
    with torch.no_grad():
        cache = model(source, use_cache=True).past_key_values
        cache.crop(-(source.shape[1] - k))
        assert cache.get_seq_length() == k
        out = model(prompt[:, k:], past_key_values=cache, use_cache=True)
    return out.logits, greedy_continue(model, out.logits[0, -1], out.past_key_values, GREEDY_STEPS)


def assert_matches(res_logits, res_greedy, exact, full, k):
    """Bit-identical to the restore reference; equal to the full prefill within TOL, same greedy tokens."""
    assert torch.equal(res_logits, exact[0])
    assert res_greedy == exact[1]
    assert (res_logits - full[0][:, k:]).abs().max().item() <= TOL
    assert res_greedy == full[1]


def adapter(model, store, arch):
    return HFPrefixCache(model, store, model_name=f"test/{arch}", **NAMES)


def open_store(path, **kw):
    return BlockStore.open(path, ram_bytes=1 << 20, index="flat", **kw)


# --- identity ------------------------------------------------------------------------


def test_identity_from_config():
    llama, qwen = model_of("llama"), model_of("qwen2")
    a = identity_for(llama.config, model="m", model_revision="r", tokenizer="t", tokenizer_revision="r",
                     tenant="acme", kv_dtype=torch.float32)
    assert (a.num_layers, a.num_kv_heads, a.head_dim, a.kv_dtype, a.block_tokens) == (2, 2, 16, "float32", 16)
    b = identity_for(qwen.config, model="m", model_revision="r", tokenizer="t", tokenizer_revision="r",
                     tenant="acme", kv_dtype=torch.bfloat16, block_tokens=32)
    assert (b.num_layers, b.num_kv_heads, b.head_dim, b.kv_dtype, b.block_tokens) == (3, 1, 16, "bfloat16", 32)
    # the caller's names are part of the identity: another adapter or tenant is another cache
    c = identity_for(llama.config, model="m", model_revision="r", tokenizer="t", tokenizer_revision="r",
                     tenant="acme", kv_dtype=torch.float32, adapter="lora-x", adapter_revision="1")
    d = identity_for(llama.config, model="m", model_revision="r", tokenizer="t", tokenizer_revision="r",
                     tenant="other", kv_dtype=torch.float32)
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
    with pytest.raises(InvalidIdentityError):
        identity_for(llama.config, model="m", model_revision="r", tokenizer="t", tokenizer_revision="r",
                     tenant="acme", kv_dtype=torch.float32, adapter="lora-x")
    hf = HFPrefixCache(model_of("qwen2"), None, model_name="test/qwen2", **NAMES)
    assert hf.ident.num_kv_heads == 1 and hf.ident.kv_dtype == "float32"


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig, Qwen2Config

    with pytest.raises(UnsupportedModelError, match="sliding"):
        identity_for(MistralConfig(num_hidden_layers=2), model="m", model_revision="r", tokenizer="t",
                     tokenizer_revision="r", tenant="a", kv_dtype="float16")
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        identity_for(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64, max_window_layers=0),
                     model="m", model_revision="r", tokenizer="t", tokenizer_revision="r", tenant="a",
                     kv_dtype="float16")


# --- in one process --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_restored_prefix_gives_the_full_prefill_logits(arch, tmp_path):
    model = model_of(arch)
    prompt = make_prompt(11, 5 * T + 7)  # 5 full blocks + 7 tokens
    full = full_prefill(model, prompt)
    with open_store(tmp_path / "s") as store:
        hf = adapter(model, store, arch)
        first = hf.prefill(prompt)
        assert (first.hit_blocks, first.cached_tokens, first.stored_blocks) == (0, 0, 5)
        assert torch.equal(first.logits, full[0])  # a miss is the full prefill
        second = hf.prefill(prompt)
        assert (second.hit_blocks, second.cached_tokens, second.computed_tokens) == (5, 5 * T, 7)
        assert second.stored_blocks == 0 and second.restore_error is None
        assert store.stats()["counters"]["l0_hits"] == 5
        assert_matches(second.logits, hf.greedy(second, GREEDY_STEPS),
                       restore_reference(model, prompt, 5 * T, prompt), full, 5 * T)
        # a longer prompt sharing the prefix: restore 5 blocks, compute 2 more blocks + 3 tokens, store 2
        longer = torch.cat([prompt, make_prompt(12, 2 * T - 4)], dim=1)
        third = hf.prefill(longer)
        assert (third.cached_tokens, third.stored_blocks) == (5 * T, 2)
        assert_matches(third.logits, hf.greedy(third, GREEDY_STEPS),
                       restore_reference(model, prompt, 5 * T, longer), full_prefill(model, longer), 5 * T)
        assert hf.prefill(longer).cached_tokens == 7 * T


@pytest.mark.parametrize("arch", ARCHS)
def test_fully_cached_prompt_recomputes_the_last_block(arch, tmp_path):
    model = model_of(arch)
    prompt = make_prompt(21, 4 * T)
    with open_store(tmp_path / "s") as store:
        hf = adapter(model, store, arch)
        hf.prefill(prompt)
        again = hf.prefill(prompt)
        assert (again.hit_blocks, again.cached_tokens, again.computed_tokens) == (4, 3 * T, T)
        assert_matches(again.logits, hf.greedy(again, GREEDY_STEPS),
                       restore_reference(model, prompt, 3 * T, prompt), full_prefill(model, prompt), 3 * T)
        # one token past a block boundary: a one-token suffix
        one = prompt[:, : 3 * T + 1]
        r = hf.prefill(one)
        assert (r.cached_tokens, r.computed_tokens) == (3 * T, 1)
        assert_matches(r.logits, hf.greedy(r, GREEDY_STEPS),
                       restore_reference(model, prompt, 3 * T, one), full_prefill(model, one), 3 * T)


def test_logits_to_keep_one(tmp_path):
    """What an engine asks for the first token: only the last position's logits."""
    model = model_of("qwen2")
    prompt = make_prompt(25, 3 * T + 4)
    with open_store(tmp_path / "s") as store:
        hf = adapter(model, store, "qwen2")
        assert hf.prefill(prompt, logits_to_keep=1).logits.shape == (1, 1, 257)
        r = hf.prefill(prompt, logits_to_keep=1)
    assert r.cached_tokens == 3 * T and r.logits.shape == (1, 1, 257)
    full = full_prefill(model, prompt)
    assert (r.logits[0, -1] - full[0][0, -1]).abs().max().item() <= TOL
    assert int(r.logits[0, -1].argmax()) == full[1][0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_models_restore_bit_identically(arch, dtype, tmp_path):
    """16-bit KV is stored as is (2-byte blocks): the restore reproduces its reference bit for bit,
    and the full prefill within 1e-2 (bit-identical in this case when written) with the same greedy tokens."""
    model = model_of(arch, dtype)
    prompt = make_prompt(31, 3 * T + 5)
    with open_store(tmp_path / "s") as store:
        hf = adapter(model, store, arch)
        assert hf.ident.kv_dtype == str(dtype).removeprefix("torch.")
        hf.prefill(prompt)
        r = hf.prefill(prompt)
        assert r.cached_tokens == 3 * T
        exact = restore_reference(model, prompt, 3 * T, prompt)
        full = full_prefill(model, prompt)
        greedy = hf.greedy(r, GREEDY_STEPS)
    assert torch.equal(r.logits, exact[0]) and greedy == exact[1]
    assert (r.logits.float() - full[0][:, 3 * T:].float()).abs().max().item() <= 1e-2
    assert greedy == full[1]


def test_corrupt_blocks_are_recomputed_not_served(tmp_path):
    """The only copies of the cached blocks are damaged on disk after lookup can see them: get
    raises a checksum error, the adapter recomputes the whole prompt (and stores the block again)."""
    model = model_of("llama")
    prompt = make_prompt(41, 3 * T + 2)
    want, _ = full_prefill(model, prompt)
    with BlockStore.open(tmp_path / "s", ram_bytes=0, index="flat") as store:
        hf = adapter(model, store, "llama")
        hf.prefill(prompt)
        blks = sorted((tmp_path / "s").rglob("*.blk"))
        assert len(blks) == 3
        for p in blks:  # flip one byte in the middle of each payload
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
        r = hf.prefill(prompt)
        assert r.hit_blocks == 3 and r.cached_tokens == 0 and r.computed_tokens == 3 * T + 2
        assert r.restore_error is not None and ChecksumMismatchError.__name__ in r.restore_error
        assert torch.equal(r.logits, want)
        # get stops at the first bad block (dropped from L1, so put rewrote it); put skips blocks L1
        # still lists, so each later damaged block is found and repaired by one more prefill
        assert r.stored_blocks == 1
        for attempt in range(2):
            again = hf.prefill(prompt)
            assert torch.equal(again.logits, want) and again.stored_blocks == 1 and again.cached_tokens == 0
        healed = hf.prefill(prompt)
        assert healed.cached_tokens == 3 * T and healed.restore_error is None


def test_batch_of_two_is_refused(tmp_path):
    with open_store(tmp_path / "s") as store:
        with pytest.raises(ValueError, match="batch"):
            adapter(model_of("llama"), store, "llama").prefill(torch.zeros(2, 20, dtype=torch.long))


# --- across processes ------------------------------------------------------------------


def run_child(arch, path, spec, seed, ntok, out, env=None):
    r = subprocess.run([sys.executable, CHILD, arch, str(path), spec, str(seed), str(ntok), str(out)],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1]), torch.load(out)


def check_cross_process(arch, tmp_path, first_path, first_spec, second_path, second_spec, env=None):
    seed, ntok = 51, 6 * T + 9
    a, a_out = run_child(arch, first_path, first_spec, seed, ntok, tmp_path / "a.pt", env)
    assert (a["cached_tokens"], a["stored_blocks"], a["l2_left"]) == (0, 6, 0)
    b, b_out = run_child(arch, second_path, second_spec, seed, ntok, tmp_path / "b.pt", env)
    assert (b["hit_blocks"], b["cached_tokens"], b["computed_tokens"]) == (6, 6 * T, 9), b
    assert b["restore_error"] is None and b["stored_blocks"] == 0
    model, prompt = model_of(arch), make_prompt(seed, ntok)
    full = full_prefill(model, prompt)
    # the first child's full prefill is this process's (same seeded weights, same kernels) ...
    assert torch.equal(a_out["logits"], full[0]) and a_out["greedy"] == full[1]
    # ... and the second child's restore reproduces the reference bit for bit, and the full prefill
    assert_matches(b_out["logits"], b_out["greedy"], restore_reference(model, prompt, 6 * T, prompt), full, 6 * T)
    return b


@pytest.mark.parametrize("arch", ARCHS)
def test_cross_process_restore_from_l1(arch, tmp_path):
    b = check_cross_process(arch, tmp_path, tmp_path / "s", "-", tmp_path / "s", "-")
    assert b["l1_hits"] == 6 and b["l0_hits"] == 0 and b["l2_hits"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_cross_process_restore_from_shared_directory_l2(arch, tmp_path):
    l2 = str(tmp_path / "l2")
    b = check_cross_process(arch, tmp_path, tmp_path / "a", l2, tmp_path / "b", l2)
    assert b["l2_hits"] == 6 and b["l1_hits"] == 0
    assert len(list((tmp_path / "b").rglob("*.blk"))) == 6  # promoted into the second store's L1


@pytest.mark.parametrize("arch", ARCHS)
def test_cross_process_restore_from_s3_moto(arch, moto_server, s3_prefix, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(moto_server.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    spec = f"s3://{BUCKET}/{s3_prefix}"
    b = check_cross_process(arch, tmp_path, tmp_path / "a", spec, tmp_path / "b", spec, env)
    assert b["l2_hits"] == 6 and b["l1_hits"] == 0
    page = moto_server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{s3_prefix}/blocks/")
    assert len(page.get("Contents", ())) == 6
