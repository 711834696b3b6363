#!/usr/bin/env bash
# End-to-end demo on random weights: export SAM engines, synthesise a dense dataset, segment it, score it.
# Run from the repository root with the package installed (see README). PERSENSE_DEMO_MODEL=tiny is faster.
set -euo pipefail
model="${PERSENSE_DEMO_MODEL:-vit_b}"
persense-export --model "$model" --random-weights --out engines
rm -rf demo
persense-synth --out demo/data --classes 1 --images 2 --instances 30..40 --seed 0
class="$(ls demo/data/Images)"
images="demo/data/Images/$class"
# One image through persense-infer (the density map is the scene's ground truth, standing in for a counter
# with real weights), then the whole dataset through persense-eval --run, scored as eval_miou.py does.
persense-infer "$images/01.jpg" "$images/00.jpg" "$images/00.png" --density "demo/data/meta/$class/01_density.npy" \
  --out demo/infer --overlay
persense-eval --data demo/data --pred demo/pred --run --density-dir demo/data/meta --json demo/eval.json
echo "outputs: demo/infer/{mask.png,instances.png,overlay.jpg,result.json}, demo/pred/, demo/eval.json"
