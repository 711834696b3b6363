"""Local-maximum peaks of a 2-D map with `skimage.feature.peak_local_max`'s semantics, in NumPy and OpenCV.

The hybrid IDM needs only `peak_local_max(gray, min_distance=d, threshold_abs=t)` with every other default
(scikit-image >= 0.18): a max filter of size 2d+1 with mode 'nearest'; candidates equal to the filtered max and
strictly above the threshold, none when every pixel is its own neighbourhood's max (a flat map); a d-pixel border
excluded; candidates in order of `argsort(-value, kind="stable")` (so row-major among ties, and for unsigned
images the wrapped negation puts zeros first); greedy thinning that drops a candidate at Chebyshev distance
< d from an accepted one. Written here so the runtime does not carry scikit-image.
"""

from __future__ import annotations

import cv2
import numpy as np


def peak_local_max(image: np.ndarray, min_distance: int, threshold_abs: float) -> np.ndarray:
    """(P, 2) int64 (row, col) peaks, identical to scikit-image's (order included) for a 2-D image."""
    image = np.asarray(image)
    size = 2 * min_distance + 1
    if size <= 1 or image.size == 1:
        candidates = image > threshold_abs
    else:
        kernel = np.ones((size, size), np.uint8)
        filtered = cv2.dilate(image, kernel, borderType=cv2.BORDER_REPLICATE)
        candidates = image == filtered
        if candidates.all():
            return np.empty((0, 2), np.int64)
        candidates &= image > threshold_abs
    if min_distance > 0:
        candidates[:min_distance] = False
        candidates[-min_distance:] = False
        candidates[:, :min_distance] = False
        candidates[:, -min_distance:] = False
    coords = np.argwhere(candidates)
    coords = coords[np.argsort(-image[candidates], kind="stable")]
    if min_distance > 1:
        coords = coords[_spaced(coords, candidates, min_distance)]
    return coords.astype(np.int64, copy=False)


def _spaced(coords: np.ndarray, candidates: np.ndarray, spacing: int) -> np.ndarray:
    """Greedy thinning in `coords`' order: keep a peak unless an earlier kept one is at Chebyshev distance < spacing.

    Only candidates with another candidate that close can be dropped, so only those go through the loop; each
    kept one blocks its (2 spacing - 1)^2 window in an occupancy map.
    """
    reach = spacing - 1
    window = 2 * reach + 1
    neighbours = cv2.boxFilter(
        candidates.astype(np.float32), -1, (window, window), normalize=False, borderType=cv2.BORDER_CONSTANT
    )
    crowded = neighbours[coords[:, 0], coords[:, 1]] > 1.5
    keep = np.ones(len(coords), dtype=bool)
    blocked = np.zeros(candidates.shape, dtype=bool)
    for i in np.flatnonzero(crowded):
        row, col = coords[i]
        if blocked[row, col]:
            keep[i] = False
            continue
        blocked[max(row - reach, 0) : row + reach + 1, max(col - reach, 0) : col + reach + 1] = True
    return keep
