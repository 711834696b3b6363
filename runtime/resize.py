"""Pillow's bilinear resampling of uint8 images in NumPy (what SAM's ResizeLongestSide does via PIL)."""

from __future__ import annotations

import math

import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear coefficients as (first input index per output, fixed-point weights per tap)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 1.0 * filter_scale
    ksize = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)[None, :]
    dist = (taps + xmin[:, None] - centers[:, None] + 0.5) / filter_scale
    weights = np.clip(1.0 - np.abs(dist), 0.0, None)
    weights[taps >= xmax[:, None]] = 0.0
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    return xmin, fixed


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample one axis of a uint8 array with Pillow's fixed-point bilinear filter."""
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    xmin, fixed = _bilinear_taps(in_size, out_size)
    moved = np.moveaxis(image, axis, 0).astype(np.int64)
    acc = np.full((out_size,) + moved.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int64)
    extra = (1,) * (moved.ndim - 1)
    for tap in range(fixed.shape[1]):
        index = np.minimum(xmin + tap, in_size - 1)
        acc += moved[index] * fixed[:, tap].reshape((-1,) + extra)
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bilinear_pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an HxW or HxWxC uint8 image to (height, width) as Pillow's BILINEAR does.

    Each axis is bit-exact; like Pillow up to 12 the horizontal pass runs first. Pillow 13 sometimes
    runs the vertical pass first, so a 2-D resize can differ from it by one grey level in some pixels.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"resize_bilinear_pil expects uint8, got {image.dtype}")
    return _resample_axis(_resample_axis(image, width, axis=1), height, axis=0)
