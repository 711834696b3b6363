#!/usr/bin/env bash
# mIoU of PerSense and PerSense++ side by side on persense-synth (seeds 1-3: never used in training; 4 classes x
# 2 images each), the trained tiny SAM, with the ground-truth density and with the SAM-only counter (--counter sam).
# Run from an empty folder with the package installed (about 30 minutes on 2 cores); README "PerSense or PerSense++".
set -euo pipefail
rm -rf engines data pred-* eval-*
persense-export --model tiny-trained --out engines -q
persense-export --method persense++ --random-weights --out engines -q
for seed in 1 2 3; do persense-synth --out data/s$seed --classes 4 --images 2 --instances 20..60 --seed $seed -q; done
for seed in 1 2 3; do
  for method in persense persense++; do
    persense-eval --data data/s$seed --pred pred-$method-gt-s$seed --run --method $method --density-dir data/s$seed/meta --json eval-$method-gt-s$seed.json -q --no-cache
    persense-eval --data data/s$seed --pred pred-$method-sam-s$seed --run --method $method --counter sam --json eval-$method-sam-s$seed.json -q --no-cache
  done
done
python3 - <<'PY'
import json, glob
for counter in ("gt", "sam"):
    for method in ("persense", "persense++"):
        vals = {}
        for seed in (1, 2, 3):
            d = json.load(open(f"eval-{method}-{counter}-s{seed}.json"))
            vals.update({f"s{seed}/{k}": v["iou"] for k, v in d["classes"].items()})
        print(counter, method, "mIoU over", len(vals), "classes:", round(sum(vals.values()) / len(vals), 2))
        print("   ", {k: round(v, 1) for k, v in vals.items()})
PY
