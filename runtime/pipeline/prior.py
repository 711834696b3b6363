"""PerSAM's location prior: target embedding from the reference, similarity map, attention similarity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.geometry.resampling import resize_bilinear
from persense.runtime.geometry.transforms import GRID, PATCH_SIZE, PIXEL_MEAN, PIXEL_STD, SamTransform


@dataclass
class Target:
    """The reference object: mean reference feature (un-normalised, for the decoder) and its unit vector."""

    embedding: np.ndarray  # [256]
    feature: np.ndarray  # [256], L2-normalised


def reference_target(embedding: np.ndarray, mask: np.ndarray, transform: SamTransform) -> Target:
    """Mean of the reference features under the mask, selected as the original does.

    The original pushes the 0/255 mask through SAM's image preprocessing (resize, pixel mean/std, zero
    padding), resizes it bilinearly to 64x64 and keeps cells whose first channel is > 0. Bilinear
    64x64 sampling of the 1024 frame reads the 2x2 pixels at the centre of each 16x16 cell.
    """
    resized = transform.resize(np.where(mask, 255, 0).astype(np.uint8))
    size = transform.long_side
    normalised = np.zeros((size, size), np.float32)
    h, w = resized.shape
    normalised[:h, :w] = (resized.astype(np.float32) - PIXEL_MEAN[0]) / PIXEL_STD[0]
    centre = PATCH_SIZE // 2
    cells = 0.25 * (
        normalised[centre - 1 :: PATCH_SIZE, centre - 1 :: PATCH_SIZE]
        + normalised[centre - 1 :: PATCH_SIZE, centre::PATCH_SIZE]
        + normalised[centre::PATCH_SIZE, centre - 1 :: PATCH_SIZE]
        + normalised[centre::PATCH_SIZE, centre::PATCH_SIZE]
    )
    selected = cells > 0
    if not selected.any():
        raise PersenseError(
            "reference mask is too small: it covers the centre of no 16x16 cell of SAM's "
            "feature grid (at 1024 px on the long side); use a larger object or a tighter crop"
        )
    features = embedding[0].transpose(1, 2, 0)[selected]
    mean = features.mean(axis=0)
    return Target(mean.astype(np.float32), (mean / np.linalg.norm(mean)).astype(np.float32))


def similarity_map(embedding: np.ndarray, target: Target, transform: SamTransform) -> np.ndarray:
    """Cosine similarity of every location to the target, upsampled to the original image (HxW float32)."""
    feats = embedding[0].reshape(embedding.shape[1], -1)
    norms = np.linalg.norm(feats, axis=0)
    cosine = (target.feature @ feats) / norms
    grid = embedding.shape[-1]
    return transform.upsampler.from_grid(cosine.reshape(grid, grid))


def attention_similarity(similarity: np.ndarray, grid: int = GRID) -> np.ndarray:
    """PerSAM's attn_sim [1, grid*grid]: sigmoid of the z-scored map resized straight to grid x grid.

    As the original, the un-padded HxW map is resized to the whole grid (for non-square images the
    grid cells do not line up with the padded embedding; kept for parity).
    """
    std = similarity.std(ddof=1) if similarity.size > 1 else 0.0
    z = (similarity - similarity.mean()) / (std if std > 0 else 1.0)
    small = resize_bilinear(z, grid, grid)
    return (1.0 / (1.0 + np.exp(-small))).reshape(1, grid * grid).astype(np.float32)


def best_point(similarity: np.ndarray) -> np.ndarray:
    """(x, y) of the similarity maximum (first in row-major order on ties)."""
    y, x = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
    return np.array([x, y], dtype=np.float64)
