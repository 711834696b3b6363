"""The mask stage on realistic extents: `merge.rasterise` timed on logits made from a scene's ground-truth masks.

With random weights SAM's masks cover most of the image, so the pipelines' merge stage (upsampling each
chosen mask where it can be positive, boxes, label map) is timed at its worst. Real masks are
object-sized. So for each synthetic workload this turns every visible instance of the scene into SAM
low-res logits (the ground-truth mask in SAM's padded 1024 frame, area-averaged to 256x256, mapped to
+-LOGIT_SCALE) and times `rasterise(..., with_labels=True)` on them, exactly as the runtime's merge runs.
"""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np

from persense.benchmarks.workload import Workload
from persense.runtime.geometry.transforms import LOW_RES, SamTransform
from persense.runtime.metrics import mask_iou
from persense.runtime.pipeline.masks import rasterise

LABEL = "ground-truth instance masks of the scene as SAM logits (object-sized, realistic extents)"
LOGIT_SCALE = 10.0  # |logit| far from the mask edge; the sign flips where a cell is half covered


def logits_from_labels(labels: np.ndarray, transform: SamTransform) -> np.ndarray:
    """[K, 256, 256] float32 logits of instances 1..K of a label map, in SAM's low-res frame."""
    height, width = transform.input_size
    count = int(labels.max())
    logits = np.full((count, LOW_RES, LOW_RES), -LOGIT_SCALE, dtype=np.float32)
    padded = np.zeros((transform.long_side, transform.long_side), dtype=np.float32)
    for i in range(count):
        padded[:height, :width] = cv2.resize(
            (labels == i + 1).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
        )
        cover = cv2.resize(padded, (LOW_RES, LOW_RES), interpolation=cv2.INTER_AREA)
        logits[i] = (2.0 * cover - 1.0) * LOGIT_SCALE
    return logits


def measure(workload: Workload, repeat: int) -> dict[str, Any] | None:
    """Timings of rasterise on the workload's ground-truth masks (one warm-up); None without ground truth."""
    if workload.labels is None:
        return None
    labels = np.load(workload.labels)
    transform = SamTransform(labels.shape)
    logits = logits_from_labels(labels, transform)
    instances = rasterise(logits, transform, with_labels=True)  # warm-up: builds the upsampling maps
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        rasterise(logits, transform, with_labels=True)
        samples.append((time.perf_counter() - start) * 1000.0)
    areas = np.bincount(labels.ravel(), minlength=len(logits) + 1)[1:] / labels.size
    return {
        "workload": workload.name,
        "instances": workload.instances,
        "extent": "ground_truth",
        "label": LABEL,
        "masks": len(logits),
        "mean_mask_area": round(float(areas.mean()), 6) if len(areas) else 0.0,
        "union_iou_vs_ground_truth": round(mask_iou(instances.labels > 0, labels > 0), 6),
        "samples_ms": samples,
    }
