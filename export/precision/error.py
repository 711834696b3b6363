"""How far a model's outputs are from another's: seeded sample inputs for an artefact's I/O, per-output error
measures, and the recorded error of a reduced-precision variant against its FP32 model (ONNX Runtime CPU)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from persense.export.artefacts import describe, variant_extra
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.geometry.transforms import LONG_SIDE
from persense.runtime.manifest import Artefact
from persense.runtime.metrics import cosine, mean_mask_iou

log = logging.getLogger(__name__)

MASK_OUTPUTS = ("low_res_masks", "masks")
# dynamic axes of the sample inputs (H, W, T: the detector's image and text); any other axis gets 1
SAMPLE_DIMS = {"B": 8, "N": 2, "K": 3, "H": 264, "W": 328, "T": 8}
DSALVANET_SAMPLE_BOXES = np.array([[0, 0, 511, 511], [100, 40, 180, 200], [300, 300, 310, 305]], np.float64)


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 (images, embeddings, mask logits)."""
    return rng.standard_normal(shape, dtype=np.float32)


def _uniform(scale: float) -> Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]:
    """Uniform float32 in [0, scale) (pixel coordinates, similarities, [0, 1] images)."""
    return lambda rng, shape: (rng.random(shape, dtype=np.float32) * scale).astype(np.float32)


def _point_labels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """One positive point per prompt, the rest padding."""
    labels = np.full(shape, -1.0, np.float32)  # SAM's padding label after one positive point
    labels[..., 0] = 1.0
    return labels


def _alternating(period: int) -> Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]:
    """0/1 flags alternating every `period` elements (mask input on/off, PerSAM guidance on/off)."""
    return lambda rng, shape: ((np.arange(int(np.prod(shape))) // period) % 2).astype(np.float32).reshape(shape)


def _roi(index: int) -> Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]:
    """DSALVANet's ROI bin indices (rows for 0, columns for 1) of three fixed exemplar boxes."""

    def make(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """The indices (shape fixed by the boxes)."""
        from persense.runtime.counters.dsalvanet import roi_indices

        return roi_indices(DSALVANET_SAMPLE_BOXES)[index]

    return make


def _token_ids(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """int64 token ids below 100 (inside every BERT vocabulary; the detector's generated one has more)."""
    return rng.integers(0, 100, shape, dtype=np.int64)


_FEEDS: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    "input_ids": _token_ids,
    "attention_mask": lambda rng, shape: np.ones(shape, np.int64),
    "token_type_ids": lambda rng, shape: np.zeros(shape, np.int64),
    "point_coords": _uniform(float(LONG_SIDE)),
    "point_labels": _point_labels,
    "has_mask_input": _alternating(1),
    "persam_weight": _alternating(2),
    "attn_sim": _uniform(1.0),
    "windows": _uniform(1.0),
    "exemplars": _uniform(1.0),
    "roi_rows": _roi(0),
    "roi_cols": _roi(1),
}


def sample_feeds(artefact: Artefact, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for every input of an artefact (valid prompts, labels and ROI indices where it matters)."""
    rng = np.random.default_rng(seed)
    sizes = {**SAMPLE_DIMS, **(dims or {})}
    feeds = {}
    for spec in artefact.inputs:
        shape = tuple(d if isinstance(d, int) else sizes.get(d, 1) for d in spec.shape)
        make = _FEEDS.get(spec.name, _normal)
        feeds[spec.name] = make(rng, shape)
    return feeds


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, name: str) -> dict[str, float]:
    """Max/mean absolute error and cosine of two outputs, plus mean mask IoU for mask logits."""
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    diff = np.abs(got - ref)
    metrics = {
        "max_abs": float(diff.max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "cosine": cosine(ref, got),  # 1 when either is all zero
    }
    if name in MASK_OUTPUTS:
        metrics["mask_iou"] = mean_mask_iou(reference, candidate)
    return metrics


def measure_error(artefact: Artefact, fp32_path: Path, variant_path: Path, seed: int = 0) -> dict[str, Any]:
    """Per-output error of a reduced-precision model against the FP32 one on ONNX Runtime CPU, seeded inputs."""
    feeds = sample_feeds(artefact, seed)
    reference = OrtEngine(fp32_path).run(feeds)
    candidate = OrtEngine(variant_path).run(feeds)
    return {
        "backend": "onnxruntime-cpu",
        "reference": "fp32 onnx",
        "inputs": f"precision.error.sample_feeds(seed={seed})",
        "outputs": {name: compare_outputs(reference[name], candidate[name], name) for name in reference},
    }


def variant_entry(artefact: Artefact, src: Path, dst: Path, precision: str, started: float, **fields: Any) -> Artefact:
    """The manifest entry of a `precision` variant just written to `dst` from FP32 `src`: checked, described, and
    its error against the FP32 model measured (`extra["<precision>_error"]`)."""
    onnx.checker.check_model(str(dst))
    extra = variant_extra(artefact, time.perf_counter() - started, **fields)
    entry = describe(dst, artefact.kind, precision, artefact.model_type, artefact.source_checkpoint, extra)
    entry.extra[f"{precision}_error"] = measure_error(artefact, src, dst)
    log.info("wrote %s (%.1f s)", dst.name, time.perf_counter() - started)
    return entry
