"""IDM, the Instance Detection Module: candidate point prompts from a density map (docs/ALGORITHM.md §5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from persense.runtime.errors import PersenseError

_ERODE_KERNEL = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
_EPS = 1e-15  # the original's guard in m10 / (m00 + eps)
_COLUMN_ALIGN = 16  # crop start column for distance transforms (IPP results depend on it modulo 4)


def candidate_points(density: np.ndarray, image_size: tuple[int, int], threshold: int) -> np.ndarray:
    """Candidate instance centres as an (N, 2) float64 array of (x, y) image pixels.

    Bit-exact port of the original IDM. ``image_size`` is (H, W). The density is cast to float32
    (the dtype of the original's torch output), resized to (W, H) with INTER_LINEAR if its shape
    differs, min-max normalised, scaled by 255 and truncated to uint8; pixels ``> threshold`` are
    eroded once (3x3) and split into external contours. Contours whose area exceeds
    mean + 2·std (population) are "large": the centroids of the pieces above half the maximum of their
    distance transform come first (per large contour, in contour order), followed by the centroid of
    every contour. Centroids are truncated, zero-area contours give (0, 0), duplicates are kept.

    Degenerate cases: an empty, all-zero or constant map gives an empty (0, 2) array (the original
    divided 0 by 0); a map that is not 2-D or holds NaN/inf raises PersenseError.
    """
    normalised = normalised_map(density, image_size)
    if normalised is None:
        return np.empty((0, 2), dtype=np.float64)
    # trunc(v) > T  <=>  v >= floor(T) + 1 for v >= 0: skips the uint8 image, same pixels.
    children, centroids = contour_centroids(eroded((normalised >= math.floor(threshold) + 1).view(np.uint8)))
    return np.concatenate([children, centroids])


def contour_centroids(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(children of the large contours, every contour) truncated (x, y) centroids of an eroded foreground.

    Both (K, 2) float64, in the original's order: children per large contour in contour order, then contours.
    """
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.empty((0, 2), dtype=np.float64), np.empty((0, 2), dtype=np.float64)
    moments = _moments(contours)
    areas = moments[:, 0].copy()  # cv2.contourArea == m00 exactly for integer polygons
    large = np.flatnonzero(areas > areas.mean() + 2.0 * areas.std())
    children = [child for i in large for child in _cores(contours[i], binary.shape)]
    return _centroids(_moments(children)), _centroids(moments)


def normalised_map(density: np.ndarray, image_size: tuple[int, int]) -> np.ndarray | None:
    """The map at image size, min-max normalised and scaled by 255 (float32, the original's uint8 before the
    cast); None when it has no contrast (or no pixels). Raises PersenseError for a bad map or size."""
    density = np.asarray(density)
    if density.ndim != 2:
        raise PersenseError(f"IDM expects a 2-D density map, got shape {density.shape}; squeeze it first")
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise PersenseError(f"IDM image_size must be positive (H, W), got {tuple(image_size)}")
    if density.size == 0:
        return None
    with np.errstate(over="ignore"):
        dm = density.astype(np.float32)
    if not np.isfinite(dm).all():
        raise PersenseError("IDM density map contains NaN or inf (or values beyond float32); check the counter output")
    if dm.shape != (height, width):
        dm = cv2.resize(dm, (width, height), interpolation=cv2.INTER_LINEAR)
    low, high = dm.min(), dm.max()
    if high == low:
        return None
    np.subtract(dm, low, out=dm)
    np.divide(dm, high - low, out=dm)
    np.multiply(dm, np.float32(255), out=dm)
    return dm


def eroded(binary: np.ndarray) -> np.ndarray:
    """The foreground the contours are taken from: a uint8 mask eroded once with the 3x3 rectangle."""
    return cv2.erode(binary, _ERODE_KERNEL, iterations=1)


def _moments(contours: Sequence[np.ndarray]) -> np.ndarray:
    """(K, 3) array of (m00, m10, m01) per contour, bit-identical to cv2.moments, in one vectorised pass."""
    if not contours:
        return np.zeros((0, 3), dtype=np.float64)
    lengths = np.fromiter((len(c) for c in contours), dtype=np.int64, count=len(contours))
    starts = np.cumsum(lengths) - lengths
    pts = np.concatenate(contours).reshape(-1, 2).astype(np.float64)
    prev = np.roll(pts, 1, axis=0)
    prev[starts] = pts[starts + lengths - 1]  # each polygon closes on its own last vertex
    cross = prev[:, 0] * pts[:, 1] - pts[:, 0] * prev[:, 1]
    # Green's theorem sums, as OpenCV's contourMoments: exact integers in float64, then signed scaling.
    a00 = np.add.reduceat(cross, starts)
    a10 = np.add.reduceat(cross * (prev[:, 0] + pts[:, 0]), starts)
    a01 = np.add.reduceat(cross * (prev[:, 1] + pts[:, 1]), starts)
    sign = np.where(a00 > 0, 1.0, -1.0)
    out = np.stack([a00 * (sign * 0.5), a10 * (sign * (1.0 / 6.0)), a01 * (sign * (1.0 / 6.0))], axis=1)
    out[np.abs(a00) <= np.finfo(np.float32).eps] = 0.0  # OpenCV leaves degenerate polygons all zero
    return out


def _cores(contour: np.ndarray, shape: tuple[int, int]) -> Sequence[np.ndarray]:
    """Contours of the pixels above half the maximum distance transform of one filled contour, in image coordinates."""
    x, y, w, h = cv2.boundingRect(contour)
    # Computed in the bounding box only. Pad by one zero pixel where the box is inside the image (at the
    # image edge OpenCV treats the outside as far away, as for a full-image mask). OpenCV's IPP path sums
    # float distances in SIMD groups of columns, so x0 is also aligned to _COLUMN_ALIGN: bit-identical.
    x0, y0 = max(x - 1, 0) // _COLUMN_ALIGN * _COLUMN_ALIGN, max(y - 1, 0)
    x1, y1 = min(x + w + 1, shape[1]), min(y + h + 1, shape[0])
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    cv2.drawContours(mask, [contour], -1, 255, thickness=cv2.FILLED, offset=(-x0, -y0))
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    core = (dist > 0.5 * dist.max()).view(np.uint8)
    return cv2.findContours(core, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))[0]


def _centroids(moments: np.ndarray) -> np.ndarray:
    """Truncated (x, y) centroids from (m00, m10, m01) rows, as the original computed them."""
    denom = moments[:, :1] + _EPS
    return np.trunc(moments[:, 1:] / denom)
