"""Training crops for the tiny SAM: persense-synth scenes seen as SAM sees them, with prompts and exact targets.

A crop is a CROP x CROP (256x256) window of SAM's 1024 input frame at a token offset (so the encoder's positional
embedding and the decoder's positional encoding are sliced, not resampled). The scene is rendered at a
smaller size and upscaled by 1..2x (the original's longest-side resize), JPEG-compressed like a dataset
image, and sometimes covers only the top of the crop (SAM's zero padding below).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from persense.runtime.resize import resize_bilinear_pil
from persense.runtime.synth import random_template, render_scene
from persense.runtime.transforms import SamTransform

CROP = 256  # crop side in the 1024 input frame
TOKEN = 16  # input pixels per embedding cell
GRID = 64  # embedding cells per side of the full frame
TARGET = 128  # side at which masks are compared in training
MIN_AREA = 48  # smallest instance (crop pixels) that gets a prompt
POINTS, BOXES, MULTI = 4, 2, 1  # prompts per crop by kind


@dataclass(frozen=True)
class Prompts:
    """A batch of prompts of one kind: input-frame coordinates, SAM labels, and the instance each one targets."""

    coords: np.ndarray  # (B, N, 2) float32 (x, y) in the 1024 frame
    labels: np.ndarray  # (B, N) float32: 1 point, 2/3 box corners, -1 padding
    targets: np.ndarray  # (B, TARGET, TARGET) float32 0/1 ground-truth instance masks


@dataclass(frozen=True)
class Crop:
    """One training crop: normalised image, its token offset, and prompts grouped by kind."""

    image: np.ndarray  # (3, CROP, CROP) float32, normalised, zero-padded
    offset: tuple[int, int]  # (row, col) of the crop's first embedding cell in the 64x64 grid
    points: Prompts  # one positive point each (multimask)
    boxes: Prompts  # one box each (single mask)
    multi: Prompts  # two or three positive points each (single mask)
    reference: np.ndarray  # (CROP, CROP) bool: one instance whose features guide PerSAM prompts


def _render(rng: np.random.Generator, easy: float) -> tuple[np.ndarray, np.ndarray]:
    """An upscaled, JPEG-compressed scene (h, CROP, 3) uint8 and its label map (h, CROP), h <= CROP.

    Object radii (1024 frame) are log-uniform in [20 + 40 * easy, 80] px: `easy` = 1 gives a few large
    objects per crop (a curriculum start), 0 the full range of PerSense-D-like crowds.
    """
    side = int(rng.integers(CROP // 2, CROP + 1))
    height = side if rng.uniform() < 0.7 else int(side * rng.uniform(0.5, 1.0))
    scale = CROP / side
    radius = np.exp(rng.uniform(np.log(20.0 + 40.0 * easy), np.log(80.0))) / scale  # outer radius, rendered px
    count = side * height / (1.15 * (radius / 0.48) ** 2)
    most = side * height * 0.48**2 / (1.15 * 16.0) / 1.3  # synth's density limit
    count = int(np.clip(round(count), 2, most))
    scene = render_scene(rng, random_template(rng), count, (side, height))
    ok, jpeg = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))])
    image = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED) if ok else scene.image
    out_h = min(CROP, int(height * scale + 0.5))
    labels = cv2.resize(scene.labels, (CROP, out_h), interpolation=cv2.INTER_NEAREST)
    return resize_bilinear_pil(image, out_h, CROP), labels


def _normalise(image: np.ndarray) -> np.ndarray:
    """SAM normalisation of an (h, CROP, 3) uint8 image into a zero-padded (3, CROP, CROP) float32 array."""
    return SamTransform(image.shape[:2], long_side=CROP).normalize_pad(image)[0]


def _target(mask: np.ndarray) -> np.ndarray:
    """A CROP x CROP bool mask as a TARGET x TARGET 0/1 float32 target (area average, then > 0.5)."""
    small = cv2.resize(mask.astype(np.float32), (TARGET, TARGET), interpolation=cv2.INTER_AREA)
    return (small > 0.5).astype(np.float32)


def _inside(rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
    """n random (x, y) pixels of a mask, biased to its interior half the time."""
    ys, xs = np.nonzero(mask)
    if rng.uniform() < 0.5:
        dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)[ys, xs]
        keep = dist >= 0.5 * dist.max()
        ys, xs = ys[keep], xs[keep]
    pick = rng.integers(len(xs), size=n)
    return np.stack([xs[pick], ys[pick]], 1).astype(np.float32)


def _box(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """The mask's box as two corners (2, 2), each side jittered by up to 10% of its length (max 20 px)."""
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
    span = np.repeat([box[2] - box[0], box[3] - box[1]], 2)[[0, 2, 1, 3]]
    box += rng.normal(0.0, 1.0, 4) * np.minimum(0.1 * span, 20.0)
    return np.clip(box, 0, CROP - 1).reshape(2, 2)


def _prompts(coords: list[np.ndarray], labels: list[np.ndarray], masks: list[np.ndarray],
             origin: np.ndarray) -> Prompts:
    """Stack per-prompt coordinates (crop pixels, shifted to the 1024 frame), labels and targets."""
    return Prompts(np.stack(coords).astype(np.float32) + origin, np.stack(labels).astype(np.float32),
                   np.stack([_target(m) for m in masks]))


def sample_crop(rng: np.random.Generator, easy: float = 0.0) -> Crop:
    """A random training crop with POINTS single-point, BOXES box and MULTI multi-point prompts."""
    while True:
        image, labels = _render(rng, easy)
        full = np.zeros((CROP, CROP), labels.dtype)
        full[:labels.shape[0]] = labels
        areas = np.bincount(full.ravel())
        ids = np.flatnonzero(areas >= MIN_AREA)
        ids = ids[ids > 0]
        if len(ids) >= 2:
            break
    offset = (int(rng.integers(0, GRID - CROP // TOKEN + 1)), int(rng.integers(0, GRID - CROP // TOKEN + 1)))
    origin = np.array([offset[1], offset[0]], np.float32) * TOKEN
    masks = {i: full == i for i in rng.choice(ids, size=min(len(ids), POINTS + BOXES + MULTI), replace=False)}
    order = list(masks) * (1 + (POINTS + BOXES + MULTI) // len(masks))
    pad = np.zeros((1, 2), np.float32)
    point_ids, box_ids, multi_ids = order[:POINTS], order[POINTS:POINTS + BOXES], order[-MULTI:]
    points = _prompts([np.concatenate([_inside(rng, masks[i], 1), pad]) for i in point_ids],
                      [np.array([1.0, -1.0])] * POINTS, [masks[i] for i in point_ids], origin)
    boxes = _prompts([_box(rng, masks[i]) for i in box_ids], [np.array([2.0, 3.0])] * BOXES,
                     [masks[i] for i in box_ids], origin)
    n = int(rng.integers(2, 4))
    multi = _prompts([np.concatenate([_inside(rng, masks[i], n), pad]) for i in multi_ids],
                     [np.array([1.0] * n + [-1.0])] * MULTI, [masks[i] for i in multi_ids], origin)
    return Crop(_normalise(image), offset, points, boxes, multi, full == point_ids[-1])
