"""A density counter that needs no weights beyond SAM's: prototype similarity peaks at the exemplars' scale.

From SAM's image embedding, the exemplar boxes give a prototype feature (mean of the cells under the
central half of each box). Cosine similarity to it, upsampled to SAM's 256x256 low-res frame and smoothed at a
quarter of the exemplar size, is searched for local maxima
no closer than 0.7 exemplar sizes; a peak counts if its similarity is above the midpoint between
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

from persense.runtime.counters.base import DSALVANET_IDM_THRESHOLD, CountRequest, Density
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.resampling import resize_bilinear
from persense.runtime.geometry.transforms import LOW_RES

FRAME = LOW_RES  # SAM's low-res frame: 4 samples per feature cell
IDM_THRESHOLD = DSALVANET_IDM_THRESHOLD
SEPARATION = 0.7  # minimum peak distance in exemplar sizes: touching objects are ~1 size apart


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
    for x0, y0, x1, y1 in boxes / cells:  # the cells under the central half of each box: mostly object
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
        r0, c0 = (int(np.clip(np.floor(v), 0, grid - 1)) for v in (cy - hh, cx - hw))
        r1, c1 = int(np.clip(np.ceil(cy + hh), r0 + 1, grid)), int(np.clip(np.ceil(cx + hw), c0 + 1, grid))
        protos.append(feats[:, r0:r1, c0:c1].reshape(feats.shape[0], -1).mean(axis=1))
    prototype = np.mean(protos, axis=0)
    prototype /= max(float(np.linalg.norm(prototype)), 1e-12)
    cosine = np.tensordot(prototype, feats, axes=1)
    return resize_bilinear(cosine, FRAME, FRAME)


def _peaks(similarity: np.ndarray, boxes: np.ndarray, size: float) -> np.ndarray:
    """(x, y) similarity maxima above the adaptive threshold, at least 0.7 x size apart (plateaus give one peak)."""
    radius = max(1, int(round(SEPARATION * size)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    cy = np.clip(centres[:, 1].astype(int), 0, similarity.shape[0] - 1)
    cx = np.clip(centres[:, 0].astype(int), 0, similarity.shape[1] - 1)
    similarity = cv2.GaussianBlur(similarity, (0, 0), sigmaX=max(size / 4, 0.5))  # one smooth hill per object
    threshold = 0.5 * (float(np.median(similarity)) + float(np.median(similarity[cy, cx])))
    maxima = ((similarity >= cv2.dilate(similarity, kernel)) & (similarity > threshold)).astype(np.uint8)
    count, _, _, centroids = cv2.connectedComponentsWithStats(maxima, connectivity=8)
    candidates = centroids[1:count]
    if len(candidates) == 0:
        return np.zeros((0, 2))
    values = similarity[candidates[:, 1].astype(int), candidates[:, 0].astype(int)]
    kept: list[np.ndarray] = []
    for point in candidates[np.argsort(-values, kind="stable")]:  # greedy suppression, strongest first
        if all(np.hypot(*(point - other)) >= radius for other in kept):
            kept.append(point)
    return np.array(kept)


def _render(peaks: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Sum of unit-mass Gaussians at the peaks (separable, so O(peaks x (h + w)))."""
    if len(peaks) == 0:
        return np.zeros(shape, np.float32)
    ys = np.exp(-0.5 * ((np.arange(shape[0])[None, :] - peaks[:, 1:2]) / sigma) ** 2)
    xs = np.exp(-0.5 * ((np.arange(shape[1])[None, :] - peaks[:, 0:1]) / sigma) ** 2)
    ys /= ys.sum(axis=1, keepdims=True)
    xs /= xs.sum(axis=1, keepdims=True)
    return (ys.T @ xs).astype(np.float32)
