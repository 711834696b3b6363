"""The GPU check's report: the issue's targets from the measured parts, as JSON and Markdown named after the GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persense.benchmarks.report import STAGE_LABELS, table
from persense.runtime.artefact_names import ENCODER, GPU_ENCODER, variant_name
from persense.runtime.imageio import atomic_write_bytes

SCHEMA = "persense-gpu-check/1"
DECODER_STAGES = ("exemplar_cascade", "feedback", "final_decoding")
PIPELINE_STAGES = ("image_encoding", *DECODER_STAGES, "merge", "total")
TORCH_KEYS = (
    "encoder_fp32_ms",
    "encoder_fp16_ms",
    "decoder_sequential_fp32_ms",
    "decoder_batched_fp32_ms",
    "decoder_batched_fp16_ms",
)


def _model(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """One model's results, if it was checked."""
    return next((m for m in doc["models"] if m["model"] == name), None)


def _runs(model: dict[str, Any] | None, instances: int) -> list[dict[str, Any]]:
    """The measured bench runs of a model at one instance count."""
    bench = (model or {}).get("bench") or {"runs": []}
    return [r for r in bench["runs"] if r["instances"] == instances and r["status"] == "measured"]


def _p50(run: dict[str, Any], stage: str) -> float | None:
    """A run's p50 of one stage (None when it did not time it)."""
    stats = run["stages_ms"].get(stage)
    return None if stats is None else stats["p50"]


def _best_cuda_query(model: dict[str, Any] | None, instances: int) -> float | None:
    """The fastest ORT-CUDA total p50 at that instance count."""
    totals = [_p50(r, "total") for r in _runs(model, instances) if r["backend"] == "ort-cuda"]
    return min(totals) if totals else None


def _encoder_ms(model: dict[str, Any] | None, precision: str) -> float | None:
    """p50 of the encoder the runtime uses on ORT-CUDA at this precision (sam_encoder_gpu where exported)."""
    encoders = {e["artefact"]: e for e in ((model or {}).get("parity") or {}).get("encoders", []) if not e["error"]}
    chosen = encoders.get(variant_name(GPU_ENCODER, precision)) or encoders.get(variant_name(ENCODER, precision))
    return None if chosen is None else chosen["latency_ms"]["p50"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing."""
    return None if numerator is None or not denominator else numerator / denominator


def _decoder_speedup(model: dict[str, Any] | None, instances: int) -> float | None:
    """Decoder stages (cascade, feedback, final decoding) of the torch-CUDA oracle over the fastest ORT-CUDA."""

    def decoder_ms(run: dict[str, Any]) -> float:
        return sum(_p50(run, stage) or 0.0 for stage in DECODER_STAGES)

    runs = _runs(model, instances)
    oracle = [decoder_ms(r) for r in runs if r["backend"] == "torch-cuda"]
    runtime = [decoder_ms(r) for r in runs if r["backend"] == "ort-cuda"]
    return _ratio(oracle[0], min(runtime)) if oracle and runtime else None


def _mask_stage_ms(model: dict[str, Any] | None, instances: int) -> float | None:
    """Rasterise p50 on the ground-truth masks of that workload."""
    entries = ((model or {}).get("bench") or {}).get("mask_stage", [])
    return next((e["rasterise_ms"]["p50"] for e in entries if e["instances"] == instances), None)


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's GPU targets: what each asks, what was measured (None: not measured), whether it was met."""
    vit_b, vit_h = _model(doc, "vit_b"), _model(doc, "vit_h")
    rows = [
        ("vit_b query, 200 instances, ORT-CUDA (ms)", "<=", 250.0, _best_cuda_query(vit_b, 200)),
        ("vit_h query, 50 instances, ORT-CUDA (ms)", "<=", 250.0, _best_cuda_query(vit_h, 50)),
        ("vit_h encoder FP16, ORT-CUDA (ms)", "<=", 45.0, _encoder_ms(vit_h, "fp16")),
        (
            "vit_b encoder FP16 speed-up over FP32 (x)",
            ">=",
            1.7,
            _ratio(_encoder_ms(vit_b, "fp32"), _encoder_ms(vit_b, "fp16")),
        ),
        (
            "vit_h encoder FP16 speed-up over FP32 (x)",
            ">=",
            1.7,
            _ratio(_encoder_ms(vit_h, "fp32"), _encoder_ms(vit_h, "fp16")),
        ),
        ("mask stage, 200-instance scene, ground-truth extents (ms)", "<=", 10.0, _mask_stage_ms(vit_b, 200)),
        (
            "vit_b decoder stages, 200 instances: torch-CUDA oracle / ORT-CUDA (x)",
            ">=",
            25.0,
            _decoder_speedup(vit_b, 200),
        ),
    ]
    return [
        {
            "target": name,
            "goal": f"{op} {goal:g}",
            "value": None if value is None else round(value, 3),
            "met": None if value is None else (value <= goal if op == "<=" else value >= goal),
        }
        for name, op, goal, value in rows
    ]


# ---------------------------------------------------------------------------------------------- Markdown


def _num(value: float | None, digits: int = 1) -> str:
    """A number for a table cell ('-' when absent)."""
    return "-" if value is None else f"{value:,.{digits}f}"


def _verdict(met: bool | None) -> str:
    """yes / no / not measured."""
    return "not measured" if met is None else "yes" if met else "**no**"


def _parity_lines(parity: dict[str, Any]) -> list[str]:
    """Encoder agreement and latency, decoder mask IoU."""
    encoders = [
        [e["artefact"], e["precision"], "failed: " + e["error"], "-", "-", "-", _verdict(False)]
        if e["error"]
        else [
            e["artefact"],
            e["precision"],
            _num(e["latency_ms"]["p50"]),
            _num(e["latency_ms"]["p90"]),
            f"{e['max_abs']:.2e} (of {e['reference_max_abs']:.2f})",
            f"{e['cosine']:.6f}",
            _verdict(e["passed"]),
        ]
        for e in parity["encoders"]
    ]
    decoders = [
        [d["precision"], f"{d['encoder']} + {d['decoder']}", "failed: " + d["error"], "-", "-", _verdict(False)]
        if d["error"]
        else [
            d["precision"],
            f"{d['encoder']} + {d['decoder']}",
            str(d["prompts"]),
            f"{d['mean_iou']:.4f}",
            f"{d['min_iou']:.4f}",
            _verdict(d["passed"]),
        ]
        for d in parity["decoders"]
    ]
    return [
        f"Against {parity['reference']}; tolerances {json.dumps(parity['tolerances'])}.",
        "",
        *table(
            [
                "encoder on ORT-CUDA",
                "precision",
                "p50 ms",
                "p90 ms",
                "embedding max abs diff",
                "cosine",
                "within tolerance",
            ],
            encoders,
        ),
        *table(
            ["precision", "engines (runtime's choice)", "prompts", "mean mask IoU", "min mask IoU", "within tolerance"],
            decoders,
        ),
    ]


def _bench_lines(bench: dict[str, Any]) -> list[str]:
    """Per instance count and pipeline: stage p50s, speed-up and IoU against the oracle."""
    skipped = [f"{p['name']}: {p['status']} ({p['reason']})" for p in bench["pipelines"] if p["status"] != "measured"]
    rows = [
        [
            str(r["instances"]),
            r["pipeline"],
            r["backend"],
            *(_num(_p50(r, s)) for s in PIPELINE_STAGES),
            _num(r["speedup_vs_oracle"], 2),
            _num(r["union_iou_vs_oracle"], 4),
        ]
        for r in sorted(bench["runs"], key=lambda r: (r["instances"] or 0, r["pipeline"]))
        if r["status"] == "measured"
    ]
    masks = [[str(e["instances"]), str(e["masks"]), _num(e["rasterise_ms"]["p50"], 2)] for e in bench["mask_stage"]]
    return [
        "persense-bench, p50 ms of " + str(bench["settings"]["repeat"]) + " timed queries "
        "(a query = reference encoding + segmentation), synthetic scenes, ground-truth density as counter.",
        "",
        *table(
            [
                "instances",
                "pipeline",
                "backend",
                *(STAGE_LABELS[s] for s in PIPELINE_STAGES),
                "speed-up vs oracle",
                "union IoU vs oracle",
            ],
            rows,
        ),
        *(["Not measured: " + "; ".join(skipped), ""] if skipped else []),
        *table(["instances", "ground-truth masks", "mask stage (rasterise) p50 ms"], masks),
    ]


def _model_lines(model: dict[str, Any]) -> list[str]:
    """One model's section."""
    parts = "; ".join(
        f"{name} {p['status']} ({p['seconds']:.0f} s)" + (f": {p['error']}" if p["error"] else "")
        for name, p in model["parts"].items()
    )
    lines = [f"## {model['model']}", "", f"Parts: {parts}.", ""]
    if model["parity"]:
        lines += ["### ORT-CUDA against ORT-CPU", "", *_parity_lines(model["parity"])]
    if model["bench"]:
        lines += ["### Pipeline", "", *_bench_lines(model["bench"])]
    if model["torch"]:
        torch = model["torch"]
        header = ["torch " + torch["torch"], *(k.removesuffix("_ms").replace("_", " ") + " ms" for k in TORCH_KEYS)]
        lines += [
            "### torch eager on the same GPU (`persense.benchmarks.torch_cuda`)",
            "",
            *table(header, [[f"{torch['prompts']} prompts", *(_num(torch.get(k)) for k in TORCH_KEYS)]]),
        ]
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The human-readable report."""
    env = doc["environment"]
    versions = env["versions"]
    ort = versions.get("onnxruntime-gpu") or versions.get("onnxruntime", "?")
    lines = [
        f"# GPU check: {doc['gpu']}",
        "",
        f"{doc['gpu']}; {env['cpu']} ({env['cpu_cores_usable']} usable cores); onnxruntime {ort} "
        f"({', '.join(env['onnxruntime_providers'])}); torch {versions.get('torch', '-')}; random weights "
        f"(seed 0). {doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget. `{doc['command']}`",
        "",
        "## Targets (issue 12)",
        "",
        *table(
            ["target", "goal", "measured", "met"],
            [[t["target"], t["goal"], _num(t["value"], 2), _verdict(t["met"])] for t in doc["targets"]],
        ),
    ]
    for model in doc["models"]:
        lines += _model_lines(model)
    return "\n".join(lines)


def slug(gpu: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200' (report file names)."""
    return "".join(c if c.isalnum() else "_" for c in gpu.lower()).strip("_") or "gpu"


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """gpu_check_<gpu>.json and .md in `out` (the targets added to the document); their paths."""
    doc = {**doc, "targets": targets(doc)}
    paths = [out / f"gpu_check_{slug(doc['gpu'])}.json", out / f"gpu_check_{slug(doc['gpu'])}.md"]
    atomic_write_bytes(paths[0], (json.dumps(doc, indent=2) + "\n").encode())
    atomic_write_bytes(paths[1], markdown(doc).encode())
    return paths
