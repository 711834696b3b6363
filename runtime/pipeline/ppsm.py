"""PPSM, Point Prompt Selection: keep IDM points whose similarity clears a count-adaptive threshold (ALGORITHM §6)."""

from __future__ import annotations

import math

import numpy as np

from persense.runtime.errors import PersenseError

_SQRT2_F32 = np.sqrt(np.float32(2.0))


def ppsm_threshold(max_similarity: float, count: float) -> float:
    """τ = S_max/2 if count == 1, else S_max/(count/√2), in float32 like the original; count 0 gives +inf.

    A negative count (CounTR's float count can be) follows the same formula, as in the original, so τ
    changes sign. Raises PersenseError for a non-finite count. (The original divided by zero for
    count 0, giving -inf or NaN when S_max <= 0; here count 0 always keeps nothing.)
    """
    if not math.isfinite(count):
        raise PersenseError(f"PPSM count must be a finite number, got {count}")
    divisor = np.float32(2.0) if count == 1 else np.float32(count) / _SQRT2_F32
    if divisor == 0:  # count 0, or a count that is 0 in float32
        return math.inf
    with np.errstate(over="ignore"):
        return float(np.float32(max_similarity) / divisor)


def select_points(
    points: np.ndarray, similarity: np.ndarray, count: float, boxes: np.ndarray | None = None
) -> np.ndarray:
    """Boolean keep-mask (N,) over (x, y) points: similarity[y, x] >= ppsm_threshold(similarity.max(), count),
    and with `boxes` (the second detection's [K, 4] xyxy, float32) the point inside at least one box, edges
    included, as persense.py's point_prompt_select (no box: nothing kept).

    Float points are truncated to integer pixels like the original's int64 tensors. Raises
    PersenseError for a similarity map that is not a non-empty 2-D array, points that are not
    (N, 2) or not finite, points outside the map, or a non-finite count.
    """
    similarity = np.asarray(similarity)
    if similarity.ndim != 2 or similarity.size == 0:
        raise PersenseError(f"PPSM expects a non-empty 2-D similarity map, got shape {similarity.shape}")
    points = np.asarray(points, dtype=np.float64)
    if points.size == 0:
        points = points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise PersenseError(f"PPSM expects (N, 2) points as (x, y), got shape {points.shape}")
    tau = ppsm_threshold(similarity.max(), count)
    if not np.isfinite(points).all():
        raise PersenseError("PPSM points contain NaN or inf")
    xy = np.trunc(points)
    height, width = similarity.shape
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    if not inside.all():
        x, y = points[~inside][0]
        raise PersenseError(f"PPSM point (x={x}, y={y}) lies outside the {width}x{height} similarity map")
    xy = xy.astype(np.int64)
    keep = similarity[xy[:, 1], xy[:, 0]] >= tau
    if boxes is not None:
        keep &= inside_any_box(xy, boxes)
    return keep


def inside_any_box(xy: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boolean (N,): integer (x, y) points inside at least one float32 xyxy box, edges included."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x, y = xy[:, :1], xy[:, 1:]
    inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
    return inside.any(axis=1)
