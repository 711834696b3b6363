#!/usr/bin/env bash
# End-to-end demo: export SAM engines (plus PerSense++'s feature engine), synthesise a dense dataset of several
# shapes, segment it with PerSense and with PerSense++, score both.
# Run from the repository root with the package installed (see README). By default the engines come from the
# project's trained tiny SAM (assets/tiny_sam.pt, made by persense-train-tiny), which really segments these
# scenes; PERSENSE_DEMO_MODEL=vit_b (or tiny, vit_t, vit_l, vit_h) exports that model with random weights instead.
# PerSense++'s ResNet-50 has random weights here (torchvision's file cannot be downloaded; see README).
set -euo pipefail
model="${PERSENSE_DEMO_MODEL:-tiny-trained}"
if [ "$model" = tiny-trained ]; then
  persense-export --model tiny-trained --out engines
else
  persense-export --model "$model" --random-weights --out engines
fi
persense-export --method persense++ --random-weights --out engines
rm -rf demo
# seed 5: polygons, ellipses and rings (persense-synth's seed 0 class 0 scenes overlap the tiny SAM's training data)
persense-synth --out demo/data --classes 4 --images 1 --instances 30..40 --seed 5
class="$(ls demo/data/Images | head -n 1)"
images="demo/data/Images/$class"
# One image through persense-infer (the density map is the scene's ground truth, standing in for a counter
# with real weights), then the whole dataset through persense-eval --run with each method, scored as eval_miou.py.
persense-infer "$images/01.jpg" "$images/00.jpg" "$images/00.png" --density "demo/data/meta/$class/01_density.npy" \
  --out demo/infer --overlay --method persense++
for method in persense persense++; do
  persense-eval --data demo/data --pred "demo/pred-$method" --run --method "$method" --density-dir demo/data/meta \
    --json "demo/eval-$method.json"
done
python3 - <<'PY'
import json
scores = {m: json.load(open(f"demo/eval-{m}.json"))["miou"] for m in ("persense", "persense++")}
print("mIoU: " + ", ".join(f"{m} {v:.2f}" for m, v in scores.items()))
PY
echo "outputs: demo/infer/{mask.png,instances.png,overlay.jpg,result.json}, demo/pred-*/, demo/eval-*.json"
