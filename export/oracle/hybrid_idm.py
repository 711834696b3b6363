"""PerSense++'s hybrid IDM as the original runs it (SPEC-PLUSPLUS §2).

`DSALVANet/utils/PerSense_hybrid.py:hybrid_IDM` (DSALVANet, threshold 30) and
`DSALVANet/utils/PerSense_countr.py:hybrid_IDM_countr` (CounTR, threshold 20): contour centroids as PerSense's
IDM (composite contours split by the distance transform), plus the local maxima of
`skimage.feature.peak_local_max`, all collected in a Python `set` of (x, y) ints. The returned list is the
set's iteration order, not sorted: that order flows into the feedback lines, KMeans' sample order and
tie-breaks downstream. The set is built with the same insertion order as the original (composite children,
then every contour centroid, then the peaks), and Python ints hash as numpy's, so the order is the original's.

Departure: a map without contrast (the original's 0/0 min-max normalisation, NaN cast to uint8) gives no
points, as `glue.idm_points` does.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.feature import peak_local_max

from persense.export.oracle.glue import centroid
from persense.runtime.counters.base import DSALVANET_IDM_THRESHOLD
from persense.runtime.counters.countr import IDM_THRESHOLD as COUNTR_IDM_THRESHOLD
from persense.runtime.plusplus.hybrid_idm import PEAK_MIN_DISTANCE

DSALVANET_THRESHOLD = DSALVANET_IDM_THRESHOLD
COUNTR_THRESHOLD = COUNTR_IDM_THRESHOLD


def dsalvanet_gray(density: np.ndarray, image_size: tuple[int, int]) -> np.ndarray | None:
    """DSALVANet's map -> the uint8 map hybrid_IDM thresholds: resize to (W, H), min-max, truncating *255.

    `density`: any 2-D map (the original's (1,1,512,512) output, squeezed). None for a map without contrast.
    """
    h, w = image_size
    density = cv2.resize(np.asarray(density, dtype=np.float32).squeeze(), (w, h))
    low, high = density.min(), density.max()
    if not high > low:
        return None
    return ((density - low) / (high - low) * 255).astype(np.uint8)


def countr_gray(density_rgb: np.ndarray) -> np.ndarray:
    """CounTR's 3-channel [0, 1] map (HxWx3, image size) -> uint8 gray, as hybrid_IDM_countr."""
    return cv2.cvtColor((np.asarray(density_rgb) * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)


def contour_points(gray: np.ndarray, threshold: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The contour part, in insertion order: (children of composite contours, centroids of all contours)."""
    binary = cv2.threshold(gray, threshold, 255, cv2.THRESH_BINARY)[1]
    eroded = cv2.erode(binary, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)), iterations=1)
    contours = cv2.findContours(eroded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    areas = [cv2.contourArea(c) for c in contours]
    if not areas:
        return [], []
    limit = np.mean(areas) + 2.0 * np.std(areas)
    children = []
    for contour in (c for c, a in zip(contours, areas) if a > limit):
        filled = np.zeros_like(gray)
        cv2.drawContours(filled, [contour], -1, 255, thickness=cv2.FILLED)
        dist = cv2.distanceTransform(filled, cv2.DIST_L2, 3)
        split = cv2.threshold(dist, 0.5 * dist.max(), 255, cv2.THRESH_BINARY)[1].astype(np.uint8)
        children.extend(centroid(c) for c in cv2.findContours(split, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0])
    return children, [centroid(c) for c in contours]


def peak_points(gray: np.ndarray) -> list[tuple[int, int]]:
    """The peak part: peak_local_max(min_distance=5, threshold_abs=mean + 2 std) as (x=col, y=row)."""
    threshold = gray.mean() + 2 * gray.std()
    peaks = peak_local_max(gray, min_distance=PEAK_MIN_DISTANCE, threshold_abs=threshold)
    return [(int(col), int(row)) for row, col in peaks]


def hybrid_points(gray: np.ndarray | None, threshold: int) -> list[tuple[int, int]]:
    """(x, y) points in the iteration order of the original's `coord_set`."""
    if gray is None:
        return []
    children, centroids = contour_points(gray, threshold)
    points: set[tuple[int, int]] = set()
    for point in (*children, *centroids, *peak_points(gray)):
        points.add(point)
    return list(points)


def hybrid_idm(density: np.ndarray, image_size: tuple[int, int], threshold: int) -> list[tuple[int, int]]:
    """A counter's 2-D map -> hybrid IDM points (DSALVANet's preprocessing; `threshold` 30 or 20).

    For a single-channel map, CounTR's `RGB2GRAY` of three equal channels is the identity, so the
    runtime's 2-D CounTR map goes through the same path with its threshold of 20.
    """
    return hybrid_points(dsalvanet_gray(density, image_size), threshold)
