"""PerSense++'s hybrid IDM: PerSense's contour centroids plus local-maximum peaks (SPEC-PLUSPLUS §2).

The original collects both in a Python `set` of (x, y) ints and decodes them in the set's iteration order,
which flows into the feedback lines, KMeans' sample order and tie-breaks. That order is a function of the
inserted values and their insertion order only (int tuples hash the same in every process), so the points are
inserted into a set exactly as the original does: children of composite contours, every contour centroid,
then the peaks of `peak_local_max(gray, min_distance=5, threshold_abs=mean + 2 std)`.
"""

from __future__ import annotations

import numpy as np

from persense.runtime.pipeline.idm import contour_centroids, eroded, normalised_map
from persense.runtime.plusplus.peaks import peak_local_max

PEAK_MIN_DISTANCE = 5
PEAK_STDS = 2  # peaks must be brighter than mean + 2 std of the uint8 map


def hybrid_points(density: np.ndarray, image_size: tuple[int, int], threshold: int) -> np.ndarray:
    """(N, 2) float64 (x, y) points in the original's set order; `threshold` 30 (DSALVANet) or 20 (CounTR).

    The same preprocessing and degenerate cases as `candidate_points`: a map without contrast gives (0, 2);
    a map that is not 2-D or holds NaN/inf raises PersenseError.
    """
    normalised = normalised_map(density, image_size)
    if normalised is None:
        return np.empty((0, 2), dtype=np.float64)
    gray = normalised.astype(np.uint8)
    children, centroids = contour_centroids(eroded((gray > threshold).view(np.uint8)))
    peaks = peak_local_max(gray, PEAK_MIN_DISTANCE, gray.mean() + PEAK_STDS * gray.std())[:, ::-1]
    points = set(map(tuple, np.concatenate([children, centroids, peaks]).astype(np.int64).tolist()))
    return np.array(list(points), dtype=np.float64).reshape(-1, 2)
