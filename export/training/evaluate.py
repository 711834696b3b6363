"""Held-out evaluation of a SAM on persense-synth scenes: mean single-point-prompt mask IoU.

Each held-out scene is rendered at 768x576 (as persense-synth writes them) from seeds the training crops
never use; every instance with at least 64 visible pixels gets one positive point at its most interior
pixel, and the mask is the one PerSense keeps: the best of the three multimask outputs by predicted IoU,
upsampled to the original size as segment-anything's postprocess_masks does.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from persense.export.sam.modeling import Sam
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.runtime.datasets.synth import random_template, render_scene
from persense.runtime.geometry.transforms import GRID, LOW_RES, SamTransform
from persense.runtime.metrics import mask_ious
from persense.runtime.models.sam import EMBED_DIM

HELD_OUT_SIZE = (768, 576)
HELD_OUT_KEY = 1  # training crops are drawn from default_rng([seed, 0, step])
MIN_PIXELS = 64


def held_out_scene(seed: int, index: int):
    """The index-th held-out scene for a training seed (20..80 instances, 768x576)."""
    rng = np.random.default_rng([seed, HELD_OUT_KEY, index])
    return render_scene(rng, random_template(rng), int(rng.integers(20, 81)), HELD_OUT_SIZE)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask pixel farthest from its boundary."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], np.float64)


@torch.no_grad()
def single_point_ious(sam: Sam, image: np.ndarray, labels: np.ndarray, limit: int = 24) -> np.ndarray:
    """IoU of SAM's single-point mask with each instance (up to `limit`, the largest first)."""
    sam.eval()
    decoder = PerSamDecoder(sam).eval()
    transform = SamTransform(image.shape[:2])
    embedding = sam.image_encoder(torch.from_numpy(transform.image_tensor(image)))
    areas = np.bincount(labels.ravel())
    ids = [i for i in np.argsort(-areas) if i > 0 and areas[i] >= MIN_PIXELS][:limit]
    if not ids:
        return np.zeros(0)
    points = np.stack([interior_point(labels == i) for i in ids])
    coords = np.concatenate([transform.coords_to_input(points)[:, None], np.zeros((len(ids), 1, 2))], 1)
    point_labels = np.tile([1.0, -1.0], (len(ids), 1))
    batch = len(ids)
    low, iou = decoder(
        embedding,
        torch.as_tensor(coords, dtype=torch.float32),
        torch.as_tensor(point_labels, dtype=torch.float32),
        torch.zeros(batch, 1, LOW_RES, LOW_RES),
        torch.zeros(batch),
        torch.zeros(1, EMBED_DIM),
        torch.zeros(1, GRID * GRID),
        torch.zeros(batch),
    )
    best = iou[:, 1:].argmax(1) + 1
    chosen = low[torch.arange(batch), best][:, None]
    masks = (sam.postprocess_masks(chosen, transform.input_size, image.shape[:2])[:, 0] > 0).numpy()
    truth = labels[None] == np.array(ids)[:, None, None]
    return mask_ious(masks, truth, empty=0.0)  # never empty: each instance has MIN_PIXELS


def held_out_iou(sam: Sam, seed: int, scenes: int = 8) -> dict[str, float]:
    """Mean single-point IoU over `scenes` held-out scenes, with the share of masks above 0.5 and 0.8."""
    ious = np.concatenate(
        [single_point_ious(sam, s.image, s.labels) for s in (held_out_scene(seed, i) for i in range(scenes))]
    )
    return {
        "mean_iou": float(ious.mean()),
        "iou_above_0.5": float((ious > 0.5).mean()),
        "iou_above_0.8": float((ious > 0.8).mean()),
        "masks": int(ious.size),
        "scenes": scenes,
    }
