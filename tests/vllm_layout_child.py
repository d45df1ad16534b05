"""Child of tests/test_vllm_connector.py: Quiver's vLLM-CPU gather against vLLM's own cache-write kernel.

    <vllm venv>/bin/python tests/vllm_layout_child.py

For each head_dim/dtype, vLLM's ``cpu_attn_reshape_and_cache`` (with the ISA
its CPU backend picks on this machine) writes known keys and values into a
paged tensor at scattered slots; ``gather_paged_cpu`` must return exactly
those keys and values in Quiver's payload order ``[blocks, layers, K/V,
tokens, heads, head_dim]``, and ``scatter_paged_cpu`` of that payload into a
fresh tensor must reproduce vLLM's bytes.  Each case runs twice: with the
compiled copy (engine/copy_kernels.py; ``copy_ops`` 1, one call per layer) and
with torch's (``QUIVER_COPY_JIT=off``).  Prints one JSON line per case.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from quiver.engine.torch_io import CPU_ISAS_VERIFIED, KVLayout, gather_paged_cpu, scatter_paged_cpu

    torch.manual_seed(0)
    N, H, T = 9, 2, 32
    ok = True
    for D in (64, 80, 128):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            isa = _get_attn_isa(dtype, T, D)
            case = dict(head_dim=D, dtype=str(dtype), isa=isa)
            if isa not in CPU_ISAS_VERIFIED:
                case["skipped"] = "ISA not verified: the connector refuses it at registration"
                print(json.dumps(case))
                continue
            kv = torch.zeros(N, H, T, 2 * D, dtype=dtype)
            kc, vc = kv.view(N, H, 2 * T, D).chunk(2, dim=2)
            blocks = [6, 2, 3, 8]  # a run (2, 3) and singletons, out of order
            n = len(blocks) * T
            key = torch.randn(n, H, D).to(dtype)
            val = torch.randn(n, H, D).to(dtype)
            slots = torch.tensor([blocks[i // T] * T + i % T for i in range(n)], dtype=torch.int64)
            ops.cpu_attn_reshape_and_cache(key, val, kc, vc, slots, isa)
            layout = KVLayout(1, T, H, D, dtype)
            for copier in ("kernel", "torch"):
                os.environ["QUIVER_COPY_JIT"] = "off" if copier == "torch" else ""
                out = torch.empty((len(blocks), *layout.block_shape), dtype=dtype)
                rep = gather_paged_cpu([kv], blocks, out, layout)
                res = dict(case, copier=copier, copy_ops=rep.copy_ops)
                res["k_equal"] = torch.equal(out[:, 0, 0], key.view(len(blocks), T, H, D))
                res["v_equal"] = torch.equal(out[:, 0, 1], val.view(len(blocks), T, H, D))
                back = torch.zeros_like(kv)
                scatter_paged_cpu(out, [back], blocks, layout)
                res["scatter_equal"] = torch.equal(back, kv)
                ok &= res["k_equal"] and res["v_equal"] and res["scatter_equal"]
                print(json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
