"""Child program of tests/test_vllm_connector.py: one vLLM engine, a list of prompts, greedy outputs.

    <vllm venv>/bin/python tests/vllm_child.py SPEC.json

SPEC: {"model": dir, "max_model_len": int, "max_tokens": int,
       "connector": null | kv_connector_extra_config (QuiverConnector),
       "steps": [{"name": str, "tokens": [int], "salt": str | null}], "out": path}

Starts one ``LLM()`` (CPU backend, bfloat16, block size 32, eager, vLLM's own
prefix cache off so every reuse is Quiver's), runs each step as its own
``generate`` call in order (one request at a time: step i+1 is scheduled after
step i finished and saved), and writes {"outputs": {name: [token ids]}} to
``out`` (with each step's vLLM request id, and the barrier's).  With the connector, a last barrier request (salt
"quiver-barrier") makes sure every save has reached the store before exit.
The connector writes its events (lookups, loads, saves, load errors)
to the ``events_path`` named in its config.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

BLOCK_SIZE = 32


def main(spec_path: str) -> int:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    with open(spec_path) as f:
        spec = json.load(f)
    kw = {}
    if spec.get("connector") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="QuiverConnector", kv_role="kv_both",
            kv_connector_module_path="quiver.engine.vllm_connector",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["connector"])
    llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, block_size=BLOCK_SIZE,
              max_model_len=spec.get("max_model_len", 1024), enable_prefix_caching=False, seed=0, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), ignore_eos=True)
    outputs, request_ids = {}, {}
    for step in spec["steps"]:
        prompt = TokensPrompt(prompt_token_ids=step["tokens"])
        if step.get("salt") is not None:
            prompt["cache_salt"] = step["salt"]
        (res,) = llm.generate([prompt], params, use_tqdm=False)
        outputs[step["name"]] = list(res.outputs[0].token_ids)
        request_ids[step["name"]] = res.request_id
    barrier_id = None
    if spec.get("connector") is not None:
        # Barrier: this request's lookup is answered by the worker's store thread after every save
        # queued before it (FIFO), so when it returns the steps' blocks are durable -- the worker
        # may be killed at exit without draining its queue.  Its own salt keeps it apart.
        barrier = TokensPrompt(prompt_token_ids=list(range(3, 3 + BLOCK_SIZE + 1)), cache_salt="quiver-barrier")
        (res,) = llm.generate([barrier], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        barrier_id = res.request_id
    with open(spec["out"] + ".tmp", "w") as f:
        json.dump({"outputs": outputs, "request_ids": request_ids, "barrier_id": barrier_id}, f)
    os.replace(spec["out"] + ".tmp", spec["out"])
    del llm  # engine shutdown: the worker's connector drains its store thread and closes the store
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
