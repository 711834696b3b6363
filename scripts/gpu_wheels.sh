#!/usr/bin/env bash
# Build here what a GPU machine without a package index needs for scripts/gpu_check.sh, into .gpu-kit/ (git-ignored):
#   .gpu-kit/wheels/  persense (this checkout) and the pure-Python packages the GPU image lacks:
#                     segment-anything, onnxslim, onnxconverter-common (torch, onnx, onnxscript, opencv, numpy,
#                     pillow, tqdm, matplotlib are there already)
#   .gpu-kit/ort/     onnxruntime-gpu (CUDA 13, CPython 3.12) packed by ort-gpu-kit into part1..part4 of at most
#                     ~60 MB each plus assemble.sh (about 4 minutes on 2 cores; skipped with --wheels-only, and
#                     when .gpu-kit/ort/assemble.sh exists already)
#   scripts/gpu_wheels.sh [--wheels-only]     (ORT_GPU_KIT: the kit, default ../shared/tools/ort-gpu-kit)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
kit_tool=${ORT_GPU_KIT:-../shared/tools/ort-gpu-kit}
rm -rf .gpu-kit/wheels && mkdir -p .gpu-kit/wheels
"$python" -m pip wheel -q --no-deps -w .gpu-kit/wheels . \
  segment-anything==1.0 onnxslim==0.1.98 onnxconverter-common==1.16.0
if [[ ${1:-} != --wheels-only && ! -f .gpu-kit/ort/assemble.sh ]]; then
  bash "$kit_tool" .gpu-kit/ort
fi
ls -l .gpu-kit/wheels
