"""Chosen low-res logits -> original-size instance boxes, a union mask and a label map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persense.runtime.geometry.transforms import LOW_RES, SamTransform


@dataclass
class Instances:
    """Per-prompt boxes (x0, y0, x1, y1; NaN for an empty mask), non-empty flags and, with a label map, pixel areas."""

    boxes: np.ndarray  # [B, 4] float64
    valid: np.ndarray  # [B] bool
    labels: np.ndarray | None  # HxW uint16, instance i -> i + 1 (a later instance wins overlaps)
    areas: np.ndarray | None = None  # [B] int64 positive pixels of each whole mask (overlaps counted in each)

    def union(self) -> np.ndarray:
        """0/255 uint8 union of all instance masks."""
        if self.labels is None:
            raise ValueError("instances were rasterised without a label map")
        return (self.labels > 0).astype(np.uint8) * np.uint8(255)


CHUNK = 256  # tiles per batch of products (about 10 MB of float32 values)
LARGE = 24  # tiles from which a map's label window is computed in one piece (cheaper for image-sized masks)


def rasterise(logits: np.ndarray, transform: SamTransform, with_labels: bool) -> Instances:
    """Upsample each chosen [256,256] logit map only where it can be positive; boxes and (optionally) labels.

    The positive pixels are exactly those of `transform.upsample_to_original(map) > 0` (see
    persense.runtime.geometry.positive_tiles), computed in tiles batched over maps. Without a label map only tiles
    that could still widen a box are computed: first those on the border of each map's window, then inner
    ones reaching outside the box found so far. The label map takes the largest index per pixel, which is
    "a later instance wins overlaps".
    """
    stack = np.asarray(logits, np.float32).reshape(-1, LOW_RES, LOW_RES)
    upsampler = transform.upsampler
    tiles = upsampler.tiles
    extents = _Extents(len(stack))
    labels = np.zeros(transform.original_size, np.uint16) if with_labels else None
    areas = np.zeros(len(stack), np.int64)
    windows = tiles.windows(stack)
    counts = tiles.counts(*windows)
    whole = np.flatnonzero(counts > LARGE) if with_labels else np.zeros(0, np.int64)
    for i in whole:
        y0, y1, x0, x1 = (int(w[i]) for w in windows)
        mask = upsampler.positive_in(stack[i], y0, y1, x0, x1)
        extents.add(np.array([i]), mask[None], np.array([y0]), np.array([x0]))
        areas[i] = np.count_nonzero(mask)
        _paint(labels, i, mask, y0, x0)
    tiled = (counts > 0) & (counts <= LARGE) if with_labels else counts > 0
    maps, top, left, edge = tiles.grid(np.flatnonzero(tiled), *windows)
    order = np.arange(len(maps)) if with_labels else np.concatenate([np.flatnonzero(edge), np.flatnonzero(~edge)])
    height, width = tiles.shape
    for start in range(0, len(order), CHUNK):
        chunk = order[start : start + CHUNK]
        if not with_labels and not edge[chunk[0]]:
            chunk = chunk[extents.may_widen(maps[chunk], top[chunk], left[chunk], height, width)]
        positive, y, x = tiles.positive(stack, maps[chunk], top[chunk], left[chunk])
        extents.add(maps[chunk], positive, y, x)
        if labels is not None:
            np.add.at(areas, maps[chunk], _own_pixels(positive, top[chunk] - y, left[chunk] - x))
            for i, tile, y0, x0 in zip(maps[chunk], positive, y, x):
                _paint(labels, i, tile, y0, x0)
    return Instances(extents.boxes(), extents.valid(), labels, areas if with_labels else None)


def _own_pixels(positive: np.ndarray, rows_shifted: np.ndarray, cols_shifted: np.ndarray) -> np.ndarray:
    """Positive pixels per tile, without the rows/columns a tile shifted into the image shares with its neighbour."""
    rows = np.arange(positive.shape[1])[None, :] >= rows_shifted[:, None]
    cols = np.arange(positive.shape[2])[None, :] >= cols_shifted[:, None]
    return np.einsum("nrc,nr,nc->n", positive, rows, cols, dtype=np.int64)


def _paint(labels: np.ndarray | None, index: int, mask: np.ndarray, y0: int, x0: int) -> None:
    """Label `index + 1` where `mask` is set, unless a larger label is there already."""
    if labels is not None:
        window = labels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        np.maximum(window, mask * np.uint16(index + 1), out=window)


class _Extents:
    """Per map, the bounding box of the positive pixels seen so far."""

    def __init__(self, count: int) -> None:
        big = np.iinfo(np.int64).max
        self.low = np.full((count, 2), big)  # (y0, x0)
        self.high = np.full((count, 2), -1)  # (y1, x1), inclusive

    def add(self, maps: np.ndarray, positive: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
        """Widen by tiles of booleans [N,T_r,T_c] at (top, left)."""
        for axis, origin, reduce in ((0, top, 2), (1, left, 1)):
            hits = positive.any(axis=reduce)
            found = hits.any(axis=1)
            first = origin + np.argmax(hits, axis=1)
            last = origin + hits.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=1)
            np.minimum.at(self.low[:, axis], maps[found], first[found])
            np.maximum.at(self.high[:, axis], maps[found], last[found])

    def may_widen(self, maps: np.ndarray, top: np.ndarray, left: np.ndarray, height: int, width: int) -> np.ndarray:
        """Which tiles reach outside their map's current box (or belong to a map without one yet)."""
        low, high = self.low[maps], self.high[maps]
        return (
            (high[:, 0] < 0)
            | (top < low[:, 0])
            | (top + height - 1 > high[:, 0])
            | (left < low[:, 1])
            | (left + width - 1 > high[:, 1])
        )

    def valid(self) -> np.ndarray:
        """Maps with at least one positive pixel."""
        return self.high[:, 0] >= 0

    def boxes(self) -> np.ndarray:
        """(x0, y0, x1, y1) per map as float64, NaN where no pixel is positive."""
        boxes = np.stack([self.low[:, 1], self.low[:, 0], self.high[:, 1], self.high[:, 0]], axis=1).astype(np.float64)
        boxes[~self.valid()] = np.nan
        return boxes
