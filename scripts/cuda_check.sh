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
rm -rf /tmp/qtests && cp -r tests /tmp/qtests && cd /tmp || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, numpy, transformers; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider --noconftest /tmp/qtests/test_torch_io_cuda.py /tmp/qtests/test_torch_io.py \
  /tmp/qtests/test_copy_kernels.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m pytest -q -p no:cacheprovider /tmp/site/quiver/studies/bench_copy.py -k cuda \
  --benchmark-json "$OUT/bench_copy_cuda.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
