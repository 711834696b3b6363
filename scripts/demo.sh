#!/usr/bin/env bash
# End-to-end demo: export SAM engines, synthesise a dense dataset, segment it, score it.
# Run from the repository root with the package installed (see README). By default the engines come from the
# project's trained tiny SAM (assets/tiny_sam.pt, made by persense-train-tiny), which really segments these
# scenes; PERSENSE_DEMO_MODEL=vit_b (or tiny, vit_l, vit_h) exports that model with random weights instead.
set -euo pipefail
model="${PERSENSE_DEMO_MODEL:-tiny-trained}"
if [ "$model" = tiny-trained ]; then
  persense-export --model tiny-trained --out engines
else
  persense-export --model "$model" --random-weights --out engines
fi
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
