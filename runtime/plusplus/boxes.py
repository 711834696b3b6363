"""Box overlap as persense++.py computes it (no +1 on sides), shared by IMRM and the diversity selection."""

from __future__ import annotations

import numpy as np


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of boxes given as two corners (x0, y0, x1, y1) or (y0, x0, y1, x1): the formula is
    symmetric in the axes. No +1, as the original (its products and sums in the same order); a zero union gives 0.
    """
    a, b = np.asarray(a, np.float64)[:, None, :], np.asarray(b, np.float64)[None, :, :]
    inter = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None) * np.clip(
        np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None
    )
    union = box_areas(a) + box_areas(b) - inter
    safe = np.where(union != 0, union, 1.0)
    return np.where(union != 0, inter / safe, 0.0)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of two-corner boxes, (far - near) per axis multiplied, no +1 (the original's calculate_area)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
