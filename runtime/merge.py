"""Chosen low-res logits -> original-size instance boxes, a union mask and a label map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persense.runtime.transforms import SamTransform


@dataclass
class Instances:
    """Per-prompt boxes (x0, y0, x1, y1; NaN for an empty mask), non-empty flags and optionally a label map."""

    boxes: np.ndarray  # [B, 4] float64
    valid: np.ndarray  # [B] bool
    labels: np.ndarray | None  # HxW uint16, instance i -> i + 1 (a later instance wins overlaps)

    def union(self) -> np.ndarray:
        """0/255 uint8 union of all instance masks."""
        if self.labels is None:
            raise ValueError("instances were rasterised without a label map")
        return (self.labels > 0).astype(np.uint8) * np.uint8(255)


def rasterise(logits: np.ndarray, transform: SamTransform, with_labels: bool) -> Instances:
    """Upsample each chosen [256,256] logit map only where it can be positive; boxes and (optionally) labels."""
    count = len(logits)
    boxes = np.full((count, 4), np.nan)
    labels = np.zeros(transform.original_size, np.uint16) if with_labels else None
    for i, low in enumerate(logits):  # variable-size windows: one small matmul pair per chosen mask
        window = transform.upsampler.positive_window(low)
        if window is None:
            continue
        y0, x0, mask = window
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        boxes[i] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1], y0 + rows[-1])
        if labels is not None:
            labels[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = i + 1
    return Instances(boxes, ~np.isnan(boxes[:, 0]), labels)
