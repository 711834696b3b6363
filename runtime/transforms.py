"""SAM's geometry in NumPy: longest-side resize, normalisation and padding, coordinate and box frames.

Public boundaries use (x, y) points and (x0, y0, x1, y1) boxes in original-image pixels; the
counters' (y0, x0, y1, x1) rows and SAM's 1024 frame are converted here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from persense.runtime.positive_tiles import PositiveTiles
from persense.runtime.resize import resize_bilinear_pil

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
LOW_RES = 256  # side of SAM's low-res mask logits


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size (h, w) after scaling the longest side to `long_side`, rounded like segment-anything.

    A side that would round to 0 (an image more than 2048 times longer than wide, where segment-anything
    fails) is kept at 1 pixel.
    """
    scale = long_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class SamTransform:
    """Maps one original image size to SAM's padded square input frame and back."""

    original_size: tuple[int, int]
    long_side: int = 1024

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the resized image inside the padded square."""
        return preprocess_shape(*self.original_size, self.long_side)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """Resize a uint8 HxW(xC) image to the input size (Pillow-exact bilinear, as ResizeLongestSide)."""
        return resize_bilinear_pil(image, *self.input_size)

    def normalize_pad(self, resized: np.ndarray) -> np.ndarray:
        """Normalise an RGB uint8 input-size image and zero-pad it to a 1x3xLxL float32 tensor."""
        out = np.zeros((1, 3, self.long_side, self.long_side), dtype=np.float32)
        h, w = resized.shape[:2]
        out[0, :, :h, :w] = ((resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)
        return out

    def image_tensor(self, image_rgb: np.ndarray) -> np.ndarray:
        """The encoder input for an original RGB uint8 image."""
        return self.normalize_pad(self.resize(image_rgb))

    def coords_to_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) (x, y) original pixels -> SAM input frame (as SamPredictor.apply_coords)."""
        h, w = self.original_size
        new_h, new_w = self.input_size
        out = np.asarray(points, dtype=np.float64).copy()
        out[..., 0] *= new_w / w
        out[..., 1] *= new_h / h
        return out.astype(np.float32)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(..., 4) (x0, y0, x1, y1) original pixels -> SAM input frame."""
        boxes = np.asarray(boxes)
        return self.coords_to_input(boxes.reshape(boxes.shape[:-1] + (2, 2))).reshape(boxes.shape)

    def coords_from_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) SAM input frame -> (x, y) original pixels."""
        h, w = self.original_size
        new_h, new_w = self.input_size
        out = np.asarray(points, dtype=np.float64).copy()
        out[..., 0] *= w / new_w
        out[..., 1] *= h / new_h
        return out

    @cached_property
    def upsampler(self) -> "Upsampler":
        """Composite bilinear maps from the 256x256 low-res frame to the original image."""
        return Upsampler(self, LOW_RES)

    def upsample_to_original(self, low_res: np.ndarray) -> np.ndarray:
        """A 256x256 map in SAM's padded frame -> original size float32, as SAM's postprocess_masks."""
        return self.upsampler.full(low_res)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two input indices and the weight of the second, as torch's bilinear resize."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    return i0, np.minimum(i0 + 1, in_size - 1), src - i0


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's bilinear resize (align_corners=False, no antialias) along one axis."""
    i0, i1, frac = _bilinear_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, i0), 1.0 - frac)
    np.add.at(matrix, (rows, i1), frac)
    return matrix


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D float map as torch's F.interpolate(mode='bilinear', align_corners=False) does."""
    r0, r1, fy = _bilinear_taps(image.shape[0], height)
    c0, c1, fx = _bilinear_taps(image.shape[1], width)
    rows = image[r0] * (1.0 - fy)[:, None] + image[r1] * fy[:, None]
    return (rows[:, c0] * (1.0 - fx) + rows[:, c1] * fx).astype(np.float32)


class AxisTaps:
    """A resize along one axis as K (index, weight) taps per output; K is small for bilinear compositions.

    Outputs with fewer than K non-zero weights repeat their first tap with weight 0, so every tap of an
    output lies within the span of its non-zero taps.
    """

    def __init__(self, matrix: np.ndarray) -> None:
        nonzero = matrix != 0
        taps = max(1, int(nonzero.sum(axis=1).max(initial=0)))
        order = np.argsort(~nonzero, axis=1, kind="stable")[:, :taps]  # non-zero columns first, in order
        weight = np.take_along_axis(matrix, order, axis=1)
        self.index = np.where(weight != 0, order, order[:, :1])
        self.weight = weight.astype(np.float32)
        self.out_size, self.in_size = matrix.shape
        self.first = np.where(nonzero.any(axis=0), np.argmax(nonzero, axis=0), self.out_size)
        self.last = np.where(nonzero.any(axis=0), self.out_size - np.argmax(nonzero[::-1], axis=0), 0)
        self.used = int(self.index.max(initial=-1)) + 1  # inputs 0..used-1 are the only ones any output draws on
        # inputs [low[t], high[u]) cover every tap of outputs t..u (suffix minima and prefix maxima of the taps)
        self.low = np.minimum.accumulate(self.index.min(axis=1, initial=self.in_size)[::-1])[::-1]
        self.high = np.maximum.accumulate(self.index.max(axis=1, initial=-1)) + 1
        self.dense = np.zeros(matrix.shape, np.float32)  # exactly the taps' float32 weights
        np.add.at(self.dense, (np.arange(self.out_size)[:, None], self.index), self.weight)

    def rows(self, image: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Output rows start..stop-1 of resizing axis 0 of a 2-D float32 array."""
        index, weight = self.index[start:stop], self.weight[start:stop]
        out = image[index[:, 0]] * weight[:, :1]
        for k in range(1, index.shape[1]):
            out += image[index[:, k]] * weight[:, k:k + 1]
        return out

    def cols(self, image: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Output columns start..stop-1 of resizing axis 1 of a 2-D float32 array."""
        index, weight = self.index[start:stop], self.weight[start:stop]
        out = image[:, index[:, 0]] * weight[:, 0]
        for k in range(1, index.shape[1]):
            out += image[:, index[:, k]] * weight[:, k]
        return out


class Upsampler:
    """postprocess_masks as a separable resize: low-res -> padded square -> crop -> original, per axis.

    Each output pixel draws on at most a few low-res rows and columns, so the maps are computed from those
    taps (in blocks of rows: memory is the output plus a few MB, time is linear in the output size).
    """

    _BLOCK_ROWS = 256

    def __init__(self, transform: SamTransform, low_res: int) -> None:
        (in_h, in_w), (out_h, out_w) = transform.input_size, transform.original_size
        square = transform.long_side
        self.low_res = low_res
        self._dense = (bilinear_matrix(in_h, out_h) @ bilinear_matrix(low_res, square)[:in_h],
                       bilinear_matrix(in_w, out_w) @ bilinear_matrix(low_res, square)[:in_w])
        self.rows, self.cols = AxisTaps(self._dense[0]), AxisTaps(self._dense[1])
        self._from_grid: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def from_grid(self, grid_map: np.ndarray) -> np.ndarray:
        """A coarse square map (SAM's 64x64 feature grid) resized bilinearly to the low-res frame, then as
        `full`: one pair of dense products with the composed (original x grid) maps, cached per grid size."""
        grid = grid_map.shape[0]
        if grid not in self._from_grid:
            to_low = bilinear_matrix(grid, self.low_res)
            self._from_grid[grid] = tuple((m @ to_low).astype(np.float32) for m in self._dense)
        rows, cols = self._from_grid[grid]
        return rows @ grid_map.astype(np.float32) @ cols.T

    def full(self, low_res: np.ndarray) -> np.ndarray:
        """The whole map at the original size."""
        return self._window(low_res.astype(np.float32), 0, self.rows.out_size, 0, self.cols.out_size, None)

    @cached_property
    def tiles(self) -> PositiveTiles:
        """Thresholded upsampling of logit stacks, in tiles (see persense.runtime.positive_tiles)."""
        return PositiveTiles(self.rows, self.cols)

    def positive_window(self, low_res: np.ndarray) -> tuple[int, int, np.ndarray] | None:
        """(y0, x0, mask) with `mask` exactly `full(low_res) > 0` over a window outside which no pixel is
        positive (each output pixel is a convex combination of the low-res logits it draws on, so it can be
        positive only where one of those is), or None if no pixel can be."""
        stack = low_res.astype(np.float32)[None]
        (y0,), (y1,), (x0,), (x1,) = self.tiles.windows(stack)
        if y1 <= y0 or x1 <= x0:
            return None
        return int(y0), int(x0), self.positive_in(stack[0], int(y0), int(y1), int(x0), int(x1))

    def positive_in(self, low_res: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """`full(low_res)[y0:y1, x0:x1] > 0` for a float32 map, computed for that window only."""
        return self._window(low_res, y0, y1, x0, x1, 0.0)

    def _window(self, low_res: np.ndarray, y0: int, y1: int, x0: int, x1: int,
                threshold: float | None) -> np.ndarray:
        """Output rows y0..y1-1, columns x0..x1-1: float32 values, or `> threshold` booleans."""
        out = np.empty((y1 - y0, x1 - x0), np.float32 if threshold is None else bool)
        for top in range(y0, y1, self._BLOCK_ROWS):
            bottom = min(top + self._BLOCK_ROWS, y1)
            block = self.cols.cols(self.rows.rows(low_res, top, bottom), x0, x1)
            out[top - y0:bottom - y0] = block if threshold is None else block > threshold
        return out


def xyxy_to_yxyx(boxes: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) -> (y0, x0, y1, x1), the row format of the original counters."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]


def yxyx_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(y0, x0, y1, x1) -> (x0, y0, x1, y1)."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]
