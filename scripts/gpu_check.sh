#!/usr/bin/env bash
# One command for a GPU machine: persense's GPU check (benchmarks/gpu_check.py) inside a time limit.
#   scripts/gpu_check.sh [--kit DIR] [--wheels DIR] [gpu_check flags: --out DIR --models vit_b,vit_h ...]
# --kit DIR     the files of ort-gpu-kit's parts gathered in one folder (rest.tar.xz, provider.xz.0-3,
#               assemble.sh): onnxruntime-gpu is assembled into $SITE (default /tmp/site) and its env.sh sourced
# --wheels DIR  wheels from scripts/gpu_wheels.sh, installed with --no-deps into $SITE
# GPU_CHECK_LIMIT_S (default 600) is the whole command's limit: the check gets what is left of it minus 30 s.
# Without a GPU or without ONNX Runtime's CUDA provider the check prints one line and exits 0.
# See benchmarks/README.md ("A GPU machine without a package index") for the whole procedure.
set -euo pipefail
start=$SECONDS
limit=${GPU_CHECK_LIMIT_S:-600}
site=${SITE:-/tmp/site}
python=${PYTHON:-python3}
kit="" wheels=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --kit) kit=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    *) break ;;
  esac
done
if [[ -n $kit ]]; then
  bash "$kit/assemble.sh" "$kit" "$site"
  # shellcheck disable=SC1091
  source "$site/env.sh"
fi
if [[ -n $wheels ]]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout's persense/ folder must not shadow the installed package in this process or its children.
export PYTHONSAFEPATH=1
exec "$python" -m persense.benchmarks.gpu_check --budget-s "$((limit - (SECONDS - start) - 30))" "$@"
