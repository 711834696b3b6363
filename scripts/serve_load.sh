#!/usr/bin/env bash
# README's persense-serve load figures: the trained tiny SAM served with --threads 1 --workers 4, the ellipse scene
# of tests/test_serve_load.py, 8 warm-up requests, then RUNS runs of 4 clients x 25 requests, each printing its JSON
# report (latencies, failures, throughput, server memory before/after). Run from the repository root with the
# package installed (about 3 minutes on 2 cores); it writes into OUT (default serve-load/) and uses PORT.
set -euo pipefail
OUT=${OUT:-serve-load}
PORT=${PORT:-8765}
RUNS=${RUNS:-4}
URL=http://127.0.0.1:$PORT
rm -rf "$OUT" && mkdir -p "$OUT"
persense-export --model tiny-trained --out "$OUT/engines" -q
BOX=$(python - "$OUT" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from prompt_scenes import scene_files
print(",".join(f"{v:g}" for v in scene_files(Path(sys.argv[1]))["box"]))
PY
)
persense-serve --engines "$OUT/engines" --threads 1 --workers 4 --port "$PORT" --cache-dir "$OUT/cache" -q &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 120); do curl -sf "$URL/healthz" >/dev/null && break; sleep 1; done
load() { python -m persense.benchmarks.serve_load --url "$URL" --reference "$OUT/reference.png" --box "$BOX" \
  --target "$OUT/target.png" --clients 4 --pid "$SERVER" "$@"; }
load --requests 2 >/dev/null
for _ in $(seq "$RUNS"); do load --requests 25; done
