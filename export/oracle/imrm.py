"""PerSense++'s IMRM (instance-level mask refinement), literally (SPEC-PLUSPLUS §6, persense++.py IMRM).

Runs on the final masks when there are at least two:
1. areas = float32 (N, 1) pixel counts; KMeans(2, random_state=0, n_init=10); the majority label has the larger
   count, ties -> label 0 (np.argmax over np.unique's counts); mu, sigma = mean, population std of its areas;
2. q1, q3 = np.percentile(areas, [25, 75]); threshold = (mu + 2 sigma) + (q3 + 2 IQR) (a sum, as written);
3. first-detection boxes as `[int(y0), int(x0), int(y1), int(x1)]`; "independent" boxes contain no other box
   (inclusive), computed only when there are at least two boxes;
4. a mask is kept if its area <= threshold, else only if its inclusive box has IoU >= 0.8 (no +1) with some
   independent box. Order preserved.

Departure: an empty mask over the threshold would crash `get_bbox_from_mask`; it cannot happen (the threshold
is >= q3 >= 0) but is handled as "not rescued".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from persense.export.oracle.diversity import box_iou
from persense.runtime.plusplus.clusters import KMEANS_N_INIT
from persense.runtime.plusplus.imrm import CLUSTERS, RESCUE_IOU, SEED


@dataclass
class ImrmResult:
    """Per mask: kept flag and why; the threshold and what it was made of."""

    kept: list[bool]
    reasons: list[str]
    areas: np.ndarray  # (N,) float32
    threshold: float
    majority: int  # the KMeans label taken as the majority
    independent_boxes: list[list[int]]  # [y0, x0, y1, x1]


def box_contains(outer: list[int], inner: list[int]) -> bool:
    """`outer` contains `inner`, inclusive on every side."""
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def independent_boxes(detections: np.ndarray | None) -> list[list[int]]:
    """First-detection xyxy boxes -> the `[y0, x0, y1, x1]` int boxes that contain no other (>= 2 boxes only)."""
    if detections is None:
        return []
    boxes = [[int(y0), int(x0), int(y1), int(x1)] for x0, y0, x1, y1 in np.asarray(detections).reshape(-1, 4).tolist()]
    if len(boxes) <= 1:
        return []
    return [
        box
        for i, box in enumerate(boxes)
        if not any(i != j and box_contains(box, other) for j, other in enumerate(boxes))
    ]


def majority_statistics(areas: np.ndarray) -> tuple[int, float, float]:
    """(majority label, mu, sigma) of KMeans(2) on the (N, 1) float32 areas; count ties -> the lower label."""
    labels = KMeans(n_clusters=CLUSTERS, random_state=SEED, n_init=KMEANS_N_INIT).fit(areas).labels_
    unique, counts = np.unique(labels, return_counts=True)
    majority = unique[np.argmax(counts)]
    majority_areas = areas[labels == majority].flatten()
    return int(majority), majority_areas.mean(), majority_areas.std()


def mask_box(mask: np.ndarray) -> list[int] | None:
    """get_bbox_from_mask: inclusive `[y0, x0, y1, x1]`; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return [int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())]


def imrm(masks: list[np.ndarray], detections: np.ndarray | None) -> ImrmResult:
    """Decide which of >= 2 final masks to keep; `detections`: the first detection's xyxy boxes (or None)."""
    areas = np.array([m.sum() for m in masks], dtype=np.float32).reshape(-1, 1)
    majority, mu, sigma = majority_statistics(areas)
    q1, q3 = np.percentile(areas.flatten(), [25, 75])
    threshold = (mu + 2 * sigma) + (q3 + 2 * (q3 - q1))
    independent = independent_boxes(detections)
    kept, reasons = [], []
    for mask, area in zip(masks, areas.flatten()):
        if area <= threshold:
            kept.append(True)
            reasons.append(f"area {area:g} <= threshold {threshold:g}")
            continue
        if not independent:
            kept.append(False)
            reasons.append(f"area {area:g} > threshold {threshold:g}; no independent detection box to rescue it")
            continue
        box = mask_box(mask)
        best = max((box_iou(box, b)[0] for b in independent), default=0.0) if box is not None else 0.0
        kept.append(best >= RESCUE_IOU)
        verdict = "rescued" if best >= RESCUE_IOU else "rejected"
        reasons.append(f"area {area:g} > threshold {threshold:g}; {verdict} (best IoU {best:.3f})")
    return ImrmResult(kept, reasons, areas.flatten(), float(threshold), majority, independent)
