"""Training crops for the tiny SAM: persense-synth scenes seen as SAM sees them, with prompts and exact targets.

A crop is a CROP x CROP (256x256) window of SAM's 1024 input frame at a token offset (so the encoder's
positional embedding and the decoder's positional encoding are sliced, not resampled), cut from a whole
persense-synth-like scene resized into that frame as at inference: objects have the sizes the model meets
there, and windows near the image's bottom or right edge include SAM's zero padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from persense.runtime.datasets.synth import max_instances, random_template, render_scene
from persense.runtime.geometry.transforms import GRID, PATCH_SIZE, SamTransform

CROP = 256  # crop side in the 1024 input frame
TARGET = 128  # side at which masks are compared in training
MIN_AREA = 48  # smallest instance (crop pixels) that gets a prompt
MOSTLY_INSIDE = 0.6  # share of an instance's pixels inside the window for it to count as whole
SCENE_LONG = (512, 1024)  # long side of the rendered scenes (original pixels)
DENSITY = (15.0, 100.0)  # instances per 768x576 of scene area
WINDOWS = 2  # training crops cut from each scene
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
    instances: np.ndarray  # (CROP, CROP) bool: every instance of the reference's class (distractors excluded)


def _scene(rng: np.random.Generator, easy: float) -> tuple[np.ndarray, np.ndarray]:
    """A persense-synth-like scene as SAM's input sees it: resized (h, w, 3) uint8 image and (h, w) label map.

    Scenes are 512..1024 px on the long side with DENSITY instances per 768x576 of area (persense-synth's
    held-out and eval scenes hold 20..80 at 768x576), JPEG-compressed like a dataset image, then resized to
    the 1024 frame, so object sizes are those the model meets at inference. `easy` = 1 lowers the upper
    density towards the lower one (a few large objects: the curriculum start), 0 keeps the full range.
    """
    long = int(rng.integers(SCENE_LONG[0], SCENE_LONG[1] + 1))
    short = int(long * rng.uniform(0.55, 1.0))
    width, height = (long, short) if rng.uniform() < 0.75 else (short, long)
    top = DENSITY[1] - (DENSITY[1] - DENSITY[0]) * 0.8 * easy
    per_area = np.exp(rng.uniform(np.log(DENSITY[0]), np.log(top)))
    count = int(np.clip(round(per_area * width * height / (768 * 576)), 2, 0.7 * max_instances((width, height))))
    scene = render_scene(rng, random_template(rng), count, (width, height))
    ok, jpeg = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))])
    image = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED) if ok else scene.image
    transform = SamTransform((height, width))
    out_h, out_w = transform.input_size
    return transform.resize(image), cv2.resize(scene.labels, (out_w, out_h), interpolation=cv2.INTER_NEAREST)


def _window(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, side: int
) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """A token-aligned side x side window of the 1024 frame: its (row, col) cell offset, normalised
    (3, side, side) image (zero where the frame is padding, as SAM pads) and label map. Windows reach up
    to a quarter window into the padding below and right of the image."""
    cells = side // PATCH_SIZE
    spans = [min(GRID - cells, max(0, -(-extent // PATCH_SIZE) - cells + cells // 4)) for extent in labels.shape]
    row, col = (int(rng.integers(0, span + 1)) for span in spans)
    y, x = row * PATCH_SIZE, col * PATCH_SIZE
    part = image[y : y + side, x : x + side]
    crop = SamTransform(part.shape[:2], long_side=side).normalize_pad(part)[0]
    window = np.zeros((side, side), labels.dtype)
    window[: part.shape[0], : part.shape[1]] = labels[y : y + side, x : x + side]
    return (row, col), crop, window


def _target(mask: np.ndarray) -> np.ndarray:
    """A square bool mask as a 0/1 float32 target TARGET / CROP times its side (area average, then > 0.5)."""
    side = mask.shape[0] * TARGET // CROP
    small = cv2.resize(mask.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
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
    return np.clip(box, 0, mask.shape[0] - 1).reshape(2, 2)


def _prompts(
    coords: list[np.ndarray], labels: list[np.ndarray], masks: list[np.ndarray], origin: np.ndarray
) -> Prompts:
    """Stack per-prompt coordinates (crop pixels, shifted to the 1024 frame), labels and targets."""
    return Prompts(
        np.stack(coords).astype(np.float32) + origin,
        np.stack(labels).astype(np.float32),
        np.stack([_target(m) for m in masks]),
    )


def _prompted(areas: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Instances of a window worth a prompt: at least MIN_AREA pixels, only the mostly-inside ones if >= 2.
    `areas` are the instances' pixel counts in the whole scene."""
    inside = np.bincount(window.ravel(), minlength=len(areas))
    ids = np.flatnonzero(inside >= MIN_AREA)
    ids = ids[ids > 0]
    mostly = ids[inside[ids] >= MOSTLY_INSIDE * areas[ids]]
    return mostly if len(mostly) >= 2 else ids


def sample_crops(rng: np.random.Generator, easy: float = 0.0, windows: int = WINDOWS, side: int = CROP) -> list[Crop]:
    """`windows` random training crops of one scene, each with POINTS single-point, BOXES box and MULTI
    multi-point prompts (a scene costs about two crops' training time to render, so it serves several)."""
    while True:
        image, labels = _scene(rng, easy)
        areas = np.bincount(labels.ravel())
        crops = [crop for crop in (_crop(rng, image, labels, areas, side) for _ in range(4 * windows)) if crop]
        crops = crops[:windows]
        if len(crops) == windows:
            return crops


def _crop(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, areas: np.ndarray, side: int) -> Crop | None:
    """A random window of a scene (instance areas `areas`) with its prompts, or None when it holds fewer than two
    instances to prompt."""
    offset, crop, window = _window(rng, image, labels, side)
    ids = _prompted(areas, window)
    if len(ids) < 2:
        return None
    origin = np.array([offset[1], offset[0]], np.float32) * PATCH_SIZE
    masks = {i: window == i for i in rng.choice(ids, size=min(len(ids), POINTS + BOXES + MULTI), replace=False)}
    order = list(masks) * (1 + (POINTS + BOXES + MULTI) // len(masks))
    pad = np.zeros((1, 2), np.float32)
    point_ids, box_ids, multi_ids = order[:POINTS], order[POINTS : POINTS + BOXES], order[-MULTI:]
    points = _prompts(
        [np.concatenate([_inside(rng, masks[i], 1), pad]) for i in point_ids],
        [np.array([1.0, -1.0])] * POINTS,
        [masks[i] for i in point_ids],
        origin,
    )
    boxes = _prompts(
        [_box(rng, masks[i]) for i in box_ids], [np.array([2.0, 3.0])] * BOXES, [masks[i] for i in box_ids], origin
    )
    n = int(rng.integers(2, 4))
    multi = _prompts(
        [np.concatenate([_inside(rng, masks[i], n), pad]) for i in multi_ids],
        [np.array([1.0] * n + [-1.0])] * MULTI,
        [masks[i] for i in multi_ids],
        origin,
    )
    return Crop(crop, offset, points, boxes, multi, window == point_ids[-1], window > 0)
