"""SAM's postprocess_masks (low-res logits -> original size) as a separable, tiled resize."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from persense.runtime.geometry.axis_taps import AxisTaps
from persense.runtime.geometry.positive_tiles import PositiveTiles
from persense.runtime.geometry.resampling import bilinear_matrix


class Upsampler:
    """postprocess_masks as a separable resize: low-res -> padded square -> crop -> original, per axis.

    Each output pixel draws on at most a few low-res rows and columns, so the maps are computed from those
    taps (in blocks of rows: memory is the output plus a few MB, time is linear in the output size).
    """

    _BLOCK_ROWS = 256

    def __init__(self, input_size: tuple[int, int], original_size: tuple[int, int], square: int, low_res: int) -> None:
        (in_h, in_w), (out_h, out_w) = input_size, original_size
        self.low_res = low_res
        self._dense = (
            bilinear_matrix(in_h, out_h) @ bilinear_matrix(low_res, square)[:in_h],
            bilinear_matrix(in_w, out_w) @ bilinear_matrix(low_res, square)[:in_w],
        )
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
        """Thresholded upsampling of logit stacks, in tiles (see persense.runtime.geometry.positive_tiles)."""
        return PositiveTiles(self.rows, self.cols)

    def positive_in(self, low_res: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """`full(low_res)[y0:y1, x0:x1] > 0` for a float32 map, computed for that window only."""
        return self._window(low_res, y0, y1, x0, x1, 0.0)

    def _window(self, low_res: np.ndarray, y0: int, y1: int, x0: int, x1: int, threshold: float | None) -> np.ndarray:
        """Output rows y0..y1-1, columns x0..x1-1: float32 values, or `> threshold` booleans."""
        out = np.empty((y1 - y0, x1 - x0), np.float32 if threshold is None else bool)
        for top in range(y0, y1, self._BLOCK_ROWS):
            bottom = min(top + self._BLOCK_ROWS, y1)
            block = self.cols.cols(self.rows.rows(low_res, top, bottom), x0, x1)
            out[top - y0 : bottom - y0] = block if threshold is None else block > threshold
        return out
