"""A coloured overlay of the instances a person can look at."""

from __future__ import annotations

import cv2
import numpy as np


def overlay(image: np.ndarray, labels: np.ndarray, points: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB image with each instance tinted in its own colour and the prompt points marked."""
    rng = np.random.default_rng(0)
    palette = np.concatenate([[[0, 0, 0]], rng.integers(60, 256, size=(int(labels.max()) + 1, 3))]).astype(np.float32)
    colours = palette[labels]
    tinted = np.where(labels[..., None] > 0, (1 - alpha) * image + alpha * colours, image).astype(np.uint8)
    for x, y in np.asarray(points, dtype=int):
        cv2.circle(tinted, (int(x), int(y)), 3, (255, 255, 255), -1)
        cv2.circle(tinted, (int(x), int(y)), 3, (0, 0, 0), 1)
    return tinted
