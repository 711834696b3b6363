"""IMRM, PerSense++'s instance-level mask refinement: drop outlier-sized final masks (SPEC-PLUSPLUS §6).

On >= 2 final masks: KMeans(2) on the areas picks a majority cluster (count ties -> label 0); the threshold is
`(mu + 2 sigma) + (q3 + 2 IQR)` (majority mean and population std, quartiles of all areas: a sum, as written);
a mask over it is kept only if its inclusive box has IoU >= 0.8 (no +1) with an "independent" first-detection
box, one containing no other (computed only when there are >= 2 detections). Works from per-mask areas and
boxes, so no mask is materialised; the same decisions and wording as the oracle's `imrm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from persense.runtime.plusplus.boxes import box_iou_matrix
from persense.runtime.plusplus.clusters import kmeans

CLUSTERS = 2
SEED = 0
RESCUE_IOU = 0.8


@dataclass
class ImrmDecision:
    """Per mask: kept or not and why; the threshold and what it was made of."""

    kept: np.ndarray  # (N,) bool
    reasons: list[str]
    areas: np.ndarray  # (N,) float32 pixel counts
    threshold: float
    majority: int  # the KMeans label taken as the majority
    independent_boxes: np.ndarray  # (M, 4) int64 (x0, y0, x1, y1), the truncated first-detection boxes

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the threshold, the rescuing boxes and each rejected mask with why."""
        return {
            "threshold": self.threshold,
            "majority_label": self.majority,
            "independent_boxes": self.independent_boxes.tolist(),
            "kept": int(self.kept.sum()),
            "rejected": [
                {"index": int(i), "area": float(self.areas[i]), "reason": self.reasons[i]}
                for i in np.flatnonzero(~self.kept)
            ],
        }


def independent_boxes(detections: np.ndarray | None) -> np.ndarray:
    """xyxy detections -> the int()-truncated boxes that contain no other (inclusive); none for < 2 boxes."""
    if detections is None:
        return np.empty((0, 4), np.int64)
    boxes = np.trunc(np.asarray(detections, dtype=np.float64).reshape(-1, 4)).astype(np.int64)
    if len(boxes) <= 1:
        return np.empty((0, 4), np.int64)
    outer, inner = boxes[:, None, :], boxes[None, :, :]
    contains = ((outer[..., :2] <= inner[..., :2]) & (outer[..., 2:] >= inner[..., 2:])).all(axis=2)
    np.fill_diagonal(contains, False)
    return boxes[~contains.any(axis=1)]


def refine(areas: np.ndarray, boxes: np.ndarray, detections: np.ndarray | None) -> ImrmDecision:
    """Decide which of >= 2 final masks to keep.

    `areas`: (N,) pixel counts; `boxes`: (N, 4) inclusive xyxy mask boxes, NaN for an empty mask (never over the
    threshold, which is >= q3 >= 0; treated as not rescued); `detections`: the first detection's xyxy boxes.
    """
    areas = np.asarray(areas).astype(np.float32).reshape(-1, 1)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(areas) < CLUSTERS or len(boxes) != len(areas):
        raise ValueError(f"IMRM needs >= 2 masks with a box each, got {len(areas)} areas and {len(boxes)} boxes")
    labels, _ = kmeans(areas, CLUSTERS, SEED)
    unique, counts = np.unique(labels, return_counts=True)
    majority = unique[np.argmax(counts)]
    majority_areas = areas[labels == majority].flatten()
    mu, sigma = majority_areas.mean(), majority_areas.std()
    areas = areas.flatten()
    q1, q3 = np.percentile(areas, [25, 75])
    threshold = (mu + 2 * sigma) + (q3 + 2 * (q3 - q1))
    independent = independent_boxes(detections)
    kept = areas <= threshold
    best = np.zeros(len(areas))
    outliers = np.flatnonzero(~kept & ~np.isnan(boxes).any(axis=1))
    if len(independent) and len(outliers):
        best[outliers] = box_iou_matrix(boxes[outliers], independent).max(axis=1)
        kept[outliers] = best[outliers] >= RESCUE_IOU
    reasons = [_reason(area, threshold, len(independent) > 0, iou, keep) for area, iou, keep in zip(areas, best, kept)]
    return ImrmDecision(kept, reasons, areas, float(threshold), int(majority), independent)


def _reason(area: np.float32, threshold: np.floating, rescuable: bool, best: float, kept: bool) -> str:
    """Why a mask was kept or dropped, in the oracle's words."""
    if area <= threshold:
        return f"area {area:g} <= threshold {threshold:g}"
    if not rescuable:
        return f"area {area:g} > threshold {threshold:g}; no independent detection box to rescue it"
    return f"area {area:g} > threshold {threshold:g}; {'rescued' if kept else 'rejected'} (best IoU {best:.3f})"
