"""PerSense++'s PPSM: spatial gating by the second detection's boxes (SPEC-PLUSPLUS §3, persense++.py PPSM).

A point is kept iff it lies in some box (float32 xyxy, inclusive on all sides, coordinates int()-cast);
order preserved; no similarity threshold and the count is unused. When nothing is kept (including no boxes at
all), the caller falls back to all IDM points, in both counter passes.

`boxes=None` means no second detection (no text prompt): the oracle then does not gate, i.e. keeps every
point, as the parity runs of PerSense did with a whole-image box.
"""

from __future__ import annotations

import numpy as np


def gate(points: list[tuple[int, int]], boxes: np.ndarray | None) -> list[tuple[int, int]]:
    """The points inside at least one box (all points when `boxes` is None)."""
    if boxes is None:
        return list(points)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    kept = []
    for point in points:
        x, y = int(point[0]), int(point[1])
        for x0, y0, x1, y1 in boxes:
            if x0 <= x <= x1 and y0 <= y <= y1:
                kept.append(point)
                break
    return kept


def gate_or_all(points: list[tuple[int, int]], boxes: np.ndarray | None) -> tuple[list[tuple[int, int]], bool]:
    """(points to decode, whether the fallback to all points was taken because gating kept none)."""
    kept = gate(points, boxes)
    if not kept and points:
        return list(points), True
    return kept, False
