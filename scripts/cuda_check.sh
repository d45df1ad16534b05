#!/usr/bin/env bash
# The CUDA checks, as run on a lent GPU machine (no CI machine has one).
#
# Runs the copy-in/out tests that need a device (tests/test_torch_io_cuda.py and
# the CPU suite beside them) and the CUDA rows of studies/bench_copy.py (quick
# sizes), writing the logs and pytest-benchmark's JSON to $OUT (default ./cuda-out).
# The machine has torch with CUDA but no registry: Quiver's other dependencies
# come as py3.12 wheels in .whl/ (docs/ENGINES.md, "CUDA", says how to fetch them).
set -u
OUT=${OUT:-$PWD/cuda-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
# Run the installed package and a copy of the tests, so no source folder shadows it.
SRC=$PWD
rm -rf /tmp/qtests && cp -r tests /tmp/qtests && cd /tmp || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, numpy, transformers; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider --noconftest /tmp/qtests/test_torch_io_cuda.py /tmp/qtests/test_torch_io.py \
  /tmp/qtests/test_copy_kernels.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m pytest -q -p no:cacheprovider /tmp/site/quiver/studies/bench_copy.py -k cuda \
  --benchmark-json "$OUT/bench_copy_cuda.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
# The paged kernel's first use in a process: Triton compiles it (empty cache) or loads it.
for cache in empty warm; do
  [ "$cache" = empty ] && rm -rf "${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
  python3 - "$cache" <<'PY' 2>&1 | tee -a "$OUT/first_use.txt"
import sys, time, torch
from quiver.engine.torch_io import KVLayout, gather_paged, host_blocks
lay = KVLayout(32, 16, 8, 128, torch.float16)
kv = [torch.zeros(2, 8, 16, 8, 128, dtype=torch.float16, device="cuda") for _ in range(32)]
out = host_blocks(2, lay, for_device="cuda")
torch.cuda.synchronize()
for i in range(2):
    t = time.perf_counter(); gather_paged(kv, [3, 5], out, lay).wait(); s = time.perf_counter() - t
    print(f"triton cache {sys.argv[1]}: gather call {i + 1} {s * 1e3:.1f} ms")
PY
done
python3 "$SRC/scripts/cuda_probe_small_copies.py" 2>&1 | tee "$OUT/probe.txt"
echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
