"""DSALVANet counter on an engine: the original's pre-processing in NumPy and the exemplar ROI bins.

The original crops each exemplar from the current 128x128 feature map with Python slices and
adaptive-max-pools the crop to 3x3 before every DSAM block. Those boxes never change inside one
call, so the bins are computed here once: for each exemplar and each of the 3 row (column) bins, the
absolute feature rows (columns) it covers, padded to a fixed length by repeating the bin's first
index (a repeat leaves a max unchanged). The engine gathers those rows and columns and reduces them
with a max, which is exactly the slice + `adaptive_max_pool2d` of the original.
"""

from __future__ import annotations

import cv2
import numpy as np

from persense.runtime.backends.choice import open_engine
from persense.runtime.backends.engine import Engine
from persense.runtime.counters.base import DSALVANET_IDM_THRESHOLD, CountRequest, Density, dsalvanet_count
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import IMAGENET_MEAN, IMAGENET_STD, xyxy_to_yxyx
from persense.runtime.manifest import IoSpec, Manifest, TensorSpec

INPUT_SIZE = 512
FEATURE_STRIDE = 4
FEATURE_SIZE = INPUT_SIZE // FEATURE_STRIDE  # 128
POOL = 3  # exemplar features are pooled to POOL x POOL
N_EXEMPLARS = 3  # the network's similarity head is built for exactly 3 exemplars
BIN_LENGTH = -(-FEATURE_SIZE // POOL) + 1  # longest adaptive-pool bin over at most FEATURE_SIZE cells: 44
IDM_THRESHOLD = DSALVANET_IDM_THRESHOLD
ARTEFACT = "counter_dsalvanet"
DSALVANET_IO: IoSpec = (
    [
        TensorSpec("image", (1, 3, INPUT_SIZE, INPUT_SIZE), "float32"),
        TensorSpec("roi_rows", (N_EXEMPLARS, POOL, BIN_LENGTH), "int64"),
        TensorSpec("roi_cols", (N_EXEMPLARS, POOL, BIN_LENGTH), "int64"),
    ],
    [TensorSpec("density", (1, 1, INPUT_SIZE, INPUT_SIZE), "float32")],
)


def image_tensor(image_rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> [1,3,512,512] float32: cv2 bilinear resize, /255, ImageNet mean/std."""
    resized = cv2.resize(image_rgb, (INPUT_SIZE, INPUT_SIZE))
    scaled = resized.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(((scaled - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None])


def exemplar_rows(exemplars: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(K, 4) (x0, y0, x1, y1) original pixels -> (3, 4) float64 (y0, x0, y1, x1) in the 512 frame.

    As the original's `preprocess`: the first 3 boxes, fewer repeated cyclically (1 -> b0 b0 b0,
    2 -> b0 b1 b0), each coordinate scaled by 512/H or 512/W and truncated with int().
    """
    boxes = np.asarray(exemplars, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise PersenseError("DSALVANet needs at least one exemplar box")
    if not np.all(np.isfinite(boxes)):
        raise PersenseError(f"exemplar boxes must be finite numbers, got {boxes.tolist()}")
    picked = xyxy_to_yxyx(boxes[np.arange(N_EXEMPLARS) % min(len(boxes), N_EXEMPLARS)])
    height, width = image_size
    scale_h, scale_w = INPUT_SIZE / height, INPUT_SIZE / width
    return np.trunc(picked * np.array([scale_h, scale_w, scale_h, scale_w]))


def crop_slices(rows_yxyx: np.ndarray) -> list[tuple[range, range]]:
    """Feature rows and columns each exemplar crop covers, exactly as the original's slices of the 128x128 map.

    Boxes are divided by the stride, top-left floored and clamped at 0, bottom-right ceiled and clamped
    at the map size, truncated to int and sliced `[y0 : y1 + 1, x0 : x1 + 1]` (Python slice semantics).
    """
    scaled = rows_yxyx / FEATURE_STRIDE
    top_left = np.maximum(np.floor(scaled[:, :2]), 0)
    bottom_right = np.minimum(np.ceil(scaled[:, 2:]), FEATURE_SIZE)
    crops = []
    for (y0, x0), (y1, x1) in zip(top_left.astype(int), bottom_right.astype(int)):
        rows, cols = range(FEATURE_SIZE)[y0 : y1 + 1], range(FEATURE_SIZE)[x0 : x1 + 1]
        if len(rows) == 0 or len(cols) == 0:
            raise PersenseError(
                f"exemplar box (y0, x0, y1, x1) = {rows_yxyx[len(crops)].tolist()} in the "
                f"{INPUT_SIZE}x{INPUT_SIZE} frame covers no feature cell; boxes need x0 <= x1 "
                f"and y0 <= y1 inside the image"
            )
        crops.append((rows, cols))
    return crops


def pool_bins(cells: range) -> np.ndarray:
    """(POOL, BIN_LENGTH) indices of adaptive_max_pool2d's bins over `cells`, padded with each bin's first index."""
    n = len(cells)
    bins = np.empty((POOL, BIN_LENGTH), dtype=np.int64)
    for i in range(POOL):
        start, end = (i * n) // POOL, -(-((i + 1) * n) // POOL)
        members = np.arange(start, end)
        bins[i] = cells.start + np.pad(members, (0, BIN_LENGTH - len(members)), mode="edge")
    return bins


def roi_indices(rows_yxyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Engine inputs `roi_rows`, `roi_cols`: [3, POOL, BIN_LENGTH] int64 feature indices of every bin."""
    crops = crop_slices(rows_yxyx)
    return (np.stack([pool_bins(rows) for rows, _ in crops]), np.stack([pool_bins(cols) for _, cols in crops]))


def engine_feeds(image_rgb: np.ndarray, exemplars: np.ndarray) -> dict[str, np.ndarray]:
    """All inputs of the `counter_dsalvanet` engine for one image and its (x0, y0, x1, y1) exemplars."""
    rows, cols = roi_indices(exemplar_rows(exemplars, image_rgb.shape[:2]))
    return {"image": image_tensor(image_rgb), "roi_rows": rows, "roi_cols": cols}


class DsalvanetCounter:
    """The DSALVANet counter run by an engine (LVAM returns its mean: deterministic, unlike the original)."""

    name = "dsalvanet"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def from_manifest(manifest: Manifest, backend: str = "ort-cpu", threads: int | None = None) -> DsalvanetCounter:
        """Open and verify the `counter_dsalvanet` engine of an engines folder on `backend` (the side models')."""
        return DsalvanetCounter(open_engine(manifest, ARTEFACT, backend, threads, io=DSALVANET_IO))

    def count(self, request: CountRequest) -> Density:
        """512x512 density map, count = ceil(sum), IDM threshold 30."""
        density = self.engine.run(engine_feeds(request.image, request.exemplars))["density"][0, 0]
        return Density(density, dsalvanet_count(density), IDM_THRESHOLD)
