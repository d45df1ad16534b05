"""Where a small CUDA copy-in/out's fixed cost goes (16 and 64 blocks of 2 MiB): run on a GPU machine
with the package installed (as scripts/cuda_check.sh installs it); prints timings and torch profiler tables."""
import time, torch, numpy as np
from torch.profiler import profile, ProfilerActivity
from quiver.engine.torch_io import KVLayout, gather_paged, scatter_paged, host_blocks, _check_paged
torch.set_num_threads(1)
L, T, H, D = 32, 16, 8, 128
lay = KVLayout(L, T, H, D, torch.float16)
def med(fn, r=30):
    fn(); torch.cuda.synchronize(); ts = []
    for _ in range(r):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3
for n in (16, 64):
    pool = n + n // 4
    paged = [torch.empty(2, pool, T, H, D, dtype=torch.float16, device="cuda").uniform_() for _ in range(L)]
    ids = torch.randperm(pool)[:n].tolist()
    out = host_blocks(n, lay, for_device="cuda")
    flat = torch.empty(out.shape, dtype=torch.float16, device="cuda")
    sel = torch.tensor(ids, device="cuda")
    scratch = torch.empty(out.shape, dtype=torch.float16, device="cuda")
    lm = torch.empty((L, 2, n, T, H, D), dtype=torch.float16, device="cuda")
    def raw(): out.copy_(flat, non_blocking=True)
    def ours(): gather_paged(paged, ids, out, lay).wait()
    def ours_scatter(): scatter_paged(out, paged, ids, lay).wait()
    def checks(): _check_paged(paged, lay)
    def dev_strided():  # the device pass as torch_io does it: index_select into strided views of scratch
        for l in range(L):
            for kv in range(2):
                torch.index_select(paged[l][kv], 0, sel, out=scratch[:, l, kv])
    def dev_layer_major():  # contiguous index_select outputs, then one permuting copy
        for l in range(L):
            for kv in range(2):
                torch.index_select(paged[l][kv], 0, sel, out=lm[l, kv])
        scratch.copy_(lm.permute(2, 0, 1, 3, 4, 5))
    def ids_to_dev(): torch.tensor(ids).to("cuda")
    def streams():
        s1 = torch.cuda.Stream(); torch.cuda.Stream(); e = torch.cuda.Event(); s1.wait_stream(torch.cuda.current_stream()); e.record(s1)
    r = {k: med(f) for k, f in dict(raw=raw, ours=ours, ours_scatter=ours_scatter, checks=checks, dev_strided=dev_strided,
                                    dev_layer_major=dev_layer_major, ids_to_dev=ids_to_dev, streams=streams).items()}
    print(f"n={n}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in r.items()))
    if n == 16:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                ours()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                ours()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))
