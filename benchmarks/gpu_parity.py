"""ORT-CUDA against ORT-CPU on one exported engines folder: embeddings, decoder masks, and the encoders' latency.

The reference is ONNX Runtime on the CPU running the FP32 `sam_encoder` and `sam_decoder` (itself checked
against torch by the CPU test suite). Every encoder artefact the manifest has (`sam_encoder`,
`sam_encoder_fp16`, `sam_encoder_gpu`, `sam_encoder_gpu_fp16`) runs on CUDA on the same image; the
runtime's own CUDA engine pair per precision (`engine_names`: the GPU encoder where present) then decodes
a grid of one-point prompts, and its chosen masks are compared with the CPU's by IoU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from persense.runtime.artefact_names import DECODER, ENCODER, GPU_ENCODER, variant_name
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.imageio import atomic_write_bytes, read_rgb
from persense.runtime.manifest import Manifest, load_manifest
from persense.runtime.metrics import cosine, latency_summary, mask_iou
from persense.runtime.models.sam import Prompts, SamEngines, engine_names

# Tolerances against the CPU FP32 reference. FP32 on CUDA runs its GEMMs on TF32 tensor cores by default.
TOLERANCES = {
    "fp32": {"cosine": 0.9999, "max_abs_fraction": 0.02},
    "fp16": {"cosine": 0.999, "max_abs_fraction": 0.05},
    "mask_iou_mean": 0.99,
}
ENCODERS = tuple(variant_name(name, p) for name in (ENCODER, GPU_ENCODER) for p in ("fp32", "fp16"))
PROMPT_GRID = 8  # 8 x 8 one-point prompts spread over the image
WARMUP, REPEAT = 3, 10


def timed_ms(run: Callable[[], object], warmup: int, repeat: int) -> dict[str, float]:
    """p50/p90/min of `repeat` runs after `warmup` untimed ones, in ms (each run ends with host outputs)."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000.0)
    summary = latency_summary(samples, midpoint=True)  # p50 as statistics.median, as this check always had
    return {key: summary[key] for key in ("p50", "p90", "min")}


def embedding_agreement(test: np.ndarray, reference: np.ndarray, precision: str) -> dict[str, Any]:
    """Max abs difference, cosine similarity and the verdict against TOLERANCES[precision]."""
    a, b = test.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    similarity = cosine(a, b, zero=None)  # nan for an all-zero embedding: it fails
    max_abs, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    tolerance = TOLERANCES[precision]
    passed = similarity >= tolerance["cosine"] and max_abs <= tolerance["max_abs_fraction"] * scale
    return {
        "max_abs": round(max_abs, 6),
        "reference_max_abs": round(scale, 6),
        "cosine": round(similarity, 7),
        "passed": passed,
    }


def grid_prompts(transform: SamTransform) -> Prompts:
    """PROMPT_GRID^2 one-point prompts at the centres of a grid over the image, in SAM's input frame."""
    height, width = transform.original_size
    ys, xs = np.meshgrid(
        (np.arange(PROMPT_GRID) + 0.5) * height / PROMPT_GRID,
        (np.arange(PROMPT_GRID) + 0.5) * width / PROMPT_GRID,
        indexing="ij",
    )
    return Prompts.points(transform.coords_to_input(np.stack([xs.ravel(), ys.ravel()], axis=1)))


def mask_agreement(test: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Per-prompt IoU of the chosen low-res masks (logits > 0): mean, min and the verdict."""
    ious = [mask_iou(t > 0, r > 0) for t, r in zip(test, reference)]
    return {
        "prompts": len(ious),
        "mean_iou": round(float(np.mean(ious)), 6),
        "min_iou": round(float(np.min(ious)), 6),
        "passed": float(np.mean(ious)) >= TOLERANCES["mask_iou_mean"],
    }


def _failure(exc: Exception) -> str:
    """One line for an artefact that could not be opened or run (recorded; the other artefacts go on)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _encoder(
    manifest: Manifest, name: str, device: str, threads: int | None, feed: dict[str, np.ndarray], reference: np.ndarray
) -> tuple[dict[str, Any], OrtEngine | None]:
    """One encoder artefact on `device`: agreement with the reference embedding and latency; and its engine."""
    precision = "fp16" if name.endswith("_fp16") else "fp32"
    try:
        engine = OrtEngine(manifest.verified_path(name), device, threads, arena=False)
        embedding = engine.run(feed)["image_embeddings"]
        latency = timed_ms(lambda: engine.run(feed), WARMUP, REPEAT)
    except Exception as exc:  # noqa: BLE001 - a diagnostic run reports each artefact's failure and goes on
        return {"artefact": name, "precision": precision, "passed": False, "error": _failure(exc)}, None
    return {
        "artefact": name,
        "precision": precision,
        **embedding_agreement(embedding, reference, precision),
        "latency_ms": latency,
        "error": None,
    }, engine


def _decoder(
    manifest: Manifest,
    names: dict[str, str],
    encoder: OrtEngine,
    device: str,
    threads: int | None,
    image: np.ndarray,
    prompts: Prompts,
    reference_logits: np.ndarray,
) -> dict[str, Any]:
    """The runtime's engine pair on `device` end to end: its chosen masks against the reference's."""
    entry = {"encoder": names[ENCODER], "decoder": names[DECODER]}
    try:
        engines = SamEngines(
            encoder, OrtEngine(manifest.verified_path(names[DECODER]), device, threads), decode_chunk=PROMPT_GRID**2
        )
        logits, _ = engines.decode_best(engines.encode(image)[0], prompts)
    except Exception as exc:  # noqa: BLE001 - as in _encoder
        return {**entry, "passed": False, "error": _failure(exc)}
    return {**entry, **mask_agreement(logits, reference_logits), "error": None}


def check(manifest: Manifest, image: np.ndarray, threads: int | None = None, device: str = "cuda") -> dict[str, Any]:
    """Encoder agreement and latency per encoder artefact on `device` (CUDA; "cpu" tests this code), and decoder
    mask IoU per precision."""
    cpu = SamEngines(
        OrtEngine(manifest.verified_path(ENCODER), "cpu", threads, arena=False),
        OrtEngine(manifest.verified_path(DECODER), "cpu", threads),
        decode_chunk=PROMPT_GRID**2,
    )
    reference, transform = cpu.encode(image)
    prompts = grid_prompts(transform)
    reference_logits, _ = cpu.decode_best(reference, prompts)
    feed = {"image": transform.image_tensor(image)}
    encoders, engines = [], {}
    for name in (n for n in ENCODERS if n in manifest.artefacts):
        entry, engines[name] = _encoder(manifest, name, device, threads, feed, reference)
        encoders.append(entry)
    decoders = []
    for precision in ("fp32", "fp16"):
        names = engine_names(manifest, f"ort-{device}", precision)
        if all(name in manifest.artefacts for name in names.values()) and engines[names[ENCODER]] is not None:
            decoders.append(
                {
                    "precision": precision,
                    **_decoder(
                        manifest, names, engines[names[ENCODER]], device, threads, image, prompts, reference_logits
                    ),
                }
            )
    return {
        "reference": "ONNX Runtime CPU, sam_encoder + sam_decoder (FP32)",
        "tolerances": TOLERANCES,
        "encoders": encoders,
        "decoders": decoders,
        "passed": all(e["passed"] for e in encoders) and all(d["passed"] for d in decoders),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m persense.benchmarks.gpu_parity ENGINES IMAGE OUT.json`: run `check` and write its JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m persense.benchmarks.gpu_parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("engines", type=Path, help="engines folder (persense-export --fp16 [--gpu-encoder])")
    parser.add_argument("image", type=Path, help="RGB image to encode")
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device under test")
    args = parser.parse_args(argv)
    result = check(load_manifest(args.engines), read_rgb(args.image), device=args.device)
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
