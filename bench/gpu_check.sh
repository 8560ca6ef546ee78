#!/usr/bin/env bash
# The GPU checks of the plugin kernels in one short run, for a lent GPU machine (CUDA, nvcc, torch, cupy; no
# TensorRT, no network): the kernels against their numpy references (tests/gpu, marker cuda), then their speed
# against torch (bench/kernels.py). Outputs go to $OUT (default bench/results): gpu_tests.txt, kernels.txt,
# kernels.json. Packages the machine lacks (pytest, ml_dtypes) can be carried in .device-pkgs/ (pip install
# --target for the machine's Python), which this script puts on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .device-pkgs ] && export PYTHONPATH="$PWD/.device-pkgs:$PYTHONPATH"
export TRTGLM_CACHE="$OUT/cache"   # the PTX cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cupy, numpy, ml_dtypes, pytest, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" \
  || { echo "gpu_check: a package is missing (cupy, numpy, ml_dtypes, pytest, torch)" >&2; exit 2; }
status=0
python3 -m pytest tests/gpu -m cuda -q -p no:cacheprovider -o addopts="-rs" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 bench/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
