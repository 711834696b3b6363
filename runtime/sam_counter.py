"""A density counter that needs no weights beyond SAM's: prototype similarity peaks at the exemplars' scale.

From SAM's image embedding, the exemplar boxes give a prototype feature (mean of the cells under each
box). Cosine similarity to it, upsampled to SAM's 256x256 low-res frame, is searched for local maxima
no closer than about half an exemplar; a peak counts if its similarity is above the midpoint between
the image's median similarity and the exemplars' own. Each peak becomes a unit-mass Gaussian whose
width follows the exemplar size, so the map sums to the count and IDM finds one blob per peak.

Limits: it counts by appearance at SAM's 16-pixel feature stride. Objects much smaller than ~2 feature
cells (about 32 px at 1024 on the long side) merge; very elongated or strongly varying objects give
several or no peaks; it has no learned notion of "object". Use CounTR or DSALVANet engines when
their checkpoints are available.
"""

from __future__ import annotations

import cv2
import numpy as np

from persense.runtime.counters import CountRequest, Density
from persense.runtime.errors import PersenseError
from persense.runtime.transforms import resize_bilinear

FRAME = 256  # SAM's low-res frame: 4 samples per feature cell
IDM_THRESHOLD = 30


class SamPrototypeCounter:
    """Counts objects like the exemplars from the SAM embedding alone."""

    name = "sam"

    def count(self, request: CountRequest) -> Density:
        """Density map in the 256 frame (cropped to the image) and the number of peaks found."""
        if request.embedding is None:
            raise PersenseError("the SAM-only counter needs the SAM image embedding")
        transform = request.transform
        scale = FRAME / transform.long_side
        boxes = transform.boxes_to_input(request.exemplars) * scale  # exemplars in the 256 frame
        h, w = (int(np.ceil(s * scale)) for s in transform.input_size)
        similarity = _similarity(request.embedding, boxes)[:h, :w]
        sizes = np.sqrt(np.maximum(boxes[:, 2] - boxes[:, 0], 1) * np.maximum(boxes[:, 3] - boxes[:, 1], 1))
        size = float(np.median(sizes))
        peaks = _peaks(similarity, boxes, size)
        return Density(_render(peaks, (h, w), sigma=max(size / 4, 1.0)), float(len(peaks)), IDM_THRESHOLD)


def _similarity(embedding: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Cosine similarity of every feature cell to the exemplar prototype, upsampled to the 256 frame."""
    feats = embedding[0]
    grid = feats.shape[-1]
    feats = feats / np.maximum(np.linalg.norm(feats, axis=0, keepdims=True), 1e-12)
    cells = FRAME // grid
    protos = []
    for x0, y0, x1, y1 in boxes / cells:
        r0, r1 = int(np.clip(np.floor(y0), 0, grid - 1)), int(np.clip(np.ceil(y1), 1, grid))
        c0, c1 = int(np.clip(np.floor(x0), 0, grid - 1)), int(np.clip(np.ceil(x1), 1, grid))
        protos.append(feats[:, r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)].reshape(feats.shape[0], -1).mean(axis=1))
    prototype = np.mean(protos, axis=0)
    prototype /= max(float(np.linalg.norm(prototype)), 1e-12)
    cosine = np.tensordot(prototype, feats, axes=1)
    return resize_bilinear(cosine, FRAME, FRAME)


def _peaks(similarity: np.ndarray, boxes: np.ndarray, size: float) -> np.ndarray:
    """(x, y) local maxima at least ~size/2 apart whose similarity is above the adaptive threshold."""
    radius = max(1, int(round(size / 2)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    local_max = similarity >= cv2.dilate(similarity, kernel)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    cy = np.clip(centres[:, 1].astype(int), 0, similarity.shape[0] - 1)
    cx = np.clip(centres[:, 0].astype(int), 0, similarity.shape[1] - 1)
    exemplar_level = float(np.median(similarity[cy, cx]))
    threshold = 0.5 * (float(np.median(similarity)) + exemplar_level)
    ys, xs = np.nonzero(local_max & (similarity > threshold))
    return np.stack([xs, ys], axis=1).astype(np.float64)


def _render(peaks: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Sum of unit-mass Gaussians at the peaks (separable, so O(peaks x (h + w)))."""
    if len(peaks) == 0:
        return np.zeros(shape, np.float32)
    ys = np.exp(-0.5 * ((np.arange(shape[0])[None, :] - peaks[:, 1:2]) / sigma) ** 2)
    xs = np.exp(-0.5 * ((np.arange(shape[1])[None, :] - peaks[:, 0:1]) / sigma) ** 2)
    ys /= ys.sum(axis=1, keepdims=True)
    xs /= xs.sum(axis=1, keepdims=True)
    return (ys.T @ xs).astype(np.float32)
