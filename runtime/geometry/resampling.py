"""Pillow's bilinear resampling of uint8 images in NumPy (what SAM's ResizeLongestSide does via PIL)."""

from __future__ import annotations

import math

import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
_BLOCK_ELEMENTS = 1 << 21  # output elements per block: bounds the int32 temporaries to a few MB whatever the image


def _pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear coefficients as (first input index per output, fixed-point int32 weights per tap)."""
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
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return xmin, fixed


def _resample_lines(lines: np.ndarray, out_size: int) -> np.ndarray:
    """Resample axis 1 of a (lines, in[, C]) uint8 array, a block of lines at a time, in Pillow's int32 arithmetic.

    Weights are >= 0 and sum to about 2**22, so 255 * sum + rounding stays below 2**31: int32 is exact.
    """
    in_size = lines.shape[1]
    xmin, fixed = _pil_taps(in_size, out_size)
    used = np.flatnonzero(fixed.any(axis=0))
    index = np.minimum(xmin[:, None] + used, in_size - 1)
    weights = fixed[:, used].reshape((out_size, len(used)) + (1,) * (lines.ndim - 2))
    out = np.empty((lines.shape[0], out_size) + lines.shape[2:], np.uint8)
    step = max(1, _BLOCK_ELEMENTS // (out_size * math.prod(lines.shape[2:])))
    for start in range(0, lines.shape[0], step):
        block = lines[start : start + step]
        acc = np.full((block.shape[0],) + out.shape[1:], 1 << (_PRECISION_BITS - 1), np.int32)
        for tap in range(len(used)):
            acc += block[:, index[:, tap]] * weights[:, tap]
        np.right_shift(acc, _PRECISION_BITS, out=acc)
        out[start : start + step] = np.clip(acc, 0, 255)
    return out


def resize_bilinear_pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an HxW or HxWxC uint8 image to (height, width) as Pillow's BILINEAR does.

    Each axis is bit-exact; like Pillow up to 12 the horizontal pass runs first. Pillow 13 sometimes
    runs the vertical pass first, so a 2-D resize can differ from it by one grey level in some pixels.
    Memory beyond the input and output is a few MB (the passes run in blocks of lines).
    """
    if image.dtype != np.uint8:
        raise TypeError(f"resize_bilinear_pil expects uint8, got {image.dtype}")
    if height <= 0 or width <= 0:
        raise ValueError(f"resize_bilinear_pil needs a positive output size, got {height}x{width}")
    if image.shape[1] != width:
        image = _resample_lines(image, width)
    if image.shape[0] != height:
        image = np.ascontiguousarray(_resample_lines(image.swapaxes(0, 1), height).swapaxes(0, 1))
    return image


def _torch_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two input indices and the weight of the second, as torch's bilinear resize."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    return i0, np.minimum(i0 + 1, in_size - 1), src - i0


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's bilinear resize (align_corners=False, no antialias) along one axis."""
    i0, i1, frac = _torch_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, i0), 1.0 - frac)
    np.add.at(matrix, (rows, i1), frac)
    return matrix


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D float map as torch's F.interpolate(mode='bilinear', align_corners=False) does."""
    r0, r1, fy = _torch_taps(image.shape[0], height)
    c0, c1, fx = _torch_taps(image.shape[1], width)
    rows = image[r0] * (1.0 - fy)[:, None] + image[r1] * fy[:, None]
    return (rows[:, c0] * (1.0 - fx) + rows[:, c1] * fx).astype(np.float32)
