"""Which original-size pixels of upsampled low-res logits are > 0, for a stack of maps, in uniform tiles.

`Upsampler.full(map) > 0` is the definition; this computes exactly that, fast:

- Each output pixel is a convex combination of the low-res logits it draws on, so it can be positive
  only where one of those is; each map's window follows from the stack's row and column maxima.
- A window is cut into tiles of T_r x T_c pixels (shifted to lie inside the image; overlaps are computed
  twice, identically). A tile draws on at most n_r x n_c low-res logits, and its values are two small
  float32 matrix products with the taps' own weights, batched over tiles.
- Their rounding differs from `full`'s float32 taps by less than MARGIN x (the largest |logit| the tile
  draws on): both compute, per pixel, sums of at most n products (n <= MAX_SPAN here, 256 at worst) with
  non-negative weights summing to 1, each sum erring by at most about n x 2^-24 of that largest |logit|:
  under 3.1e-5 for both together even at n = 256, against MARGIN = 2^-12 = 2.4e-4. So where a product is
  further than MARGIN from 0 its sign is `full`'s, and the few pixels nearer 0 are recomputed with `full`'s
  own float32 operations (`exact_values`). Tiles that draw on a non-finite logit are all recomputed so.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from persense.runtime.geometry.axis_taps import AxisTaps

MARGIN = 2.0**-12  # relative bound (a reserve of 8 at worst) on the float32 rounding of an upsampled logit
MAX_TILE = 96  # output pixels per tile side at most
MAX_SPAN = 28  # low-res logits per tile side at most: keeps each product small (single-threaded BLAS calls)


class TileAxis:
    """One axis of the tiling: tile size T, low-res span n per tile, and the taps' weights per tile offset."""

    def __init__(self, taps: AxisTaps) -> None:
        self.taps = taps
        size = min(MAX_TILE, taps.out_size)
        while size > 1 and self._span(size) > MAX_SPAN:
            size -= 1
        self.size = size
        self.span = min(self._span(size), taps.in_size)
        # weights[t, i] = the taps' dense weights of outputs t..t+size-1 over inputs i..i+span-1 (a view)
        self.weights = sliding_window_view(taps.dense, (size, self.span))

    def _span(self, size: int) -> int:
        """Most low-res inputs that `size` consecutive outputs draw on."""
        return int((self.taps.high[size - 1 :] - self.taps.low[: self.taps.out_size - size + 1]).max())

    def starts(self, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per tile starting at output `first` (clipped into the image): (first output, first low-res input)."""
        first = np.minimum(first, self.taps.out_size - self.size)
        return first, np.minimum(self.taps.low[first], self.taps.in_size - self.span)


class PositiveTiles:
    """Thresholded upsampling of [B,256,256] logit stacks in tiles, for one image size."""

    def __init__(self, rows: AxisTaps, cols: AxisTaps) -> None:
        self.rows, self.cols = TileAxis(rows), TileAxis(cols)

    @property
    def shape(self) -> tuple[int, int]:
        """(T_r, T_c): pixels per tile."""
        return self.rows.size, self.cols.size

    def windows(self, low_res: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per map of a float32 stack, output rows [top, bottom) and columns [left, right) outside which no pixel
        is positive (empty where bottom <= top or right <= left)."""
        rows, cols = self.rows.taps, self.cols.taps
        bits = low_res[:, : rows.used, : cols.used].view(np.int32)  # > 0 exactly for floats > 0 (and +NaN)
        row_hit = bits.max(axis=2) > 0
        top, bottom = _window(rows, row_hit)
        left, right = _window(cols, _column_hits(bits, row_hit))
        return top, bottom, left, right

    def counts(self, top: np.ndarray, bottom: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Tiles per window (0 for an empty one)."""
        down = np.maximum(-(-(bottom - top) // self.rows.size), 0)
        return down * np.maximum(-(-(right - left) // self.cols.size), 0)

    def grid(
        self, maps: np.ndarray, top: np.ndarray, bottom: np.ndarray, left: np.ndarray, right: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tiles covering the windows of maps `maps`, in map order: (map, top, left, edge), `edge` marking tiles
        on the border of their map's tile grid."""
        top, bottom, left, right = top[maps], bottom[maps], left[maps], right[maps]
        down = -(-(bottom - top) // self.rows.size)
        across = -(-(right - left) // self.cols.size)
        counts = down * across
        owner = np.repeat(np.arange(len(maps)), counts)
        k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        i, j = k // across[owner], k % across[owner]
        edge = (i == 0) | (j == 0) | (i == down[owner] - 1) | (j == across[owner] - 1)
        return maps[owner], top[owner] + i * self.rows.size, left[owner] + j * self.cols.size, edge

    def positive(
        self, low_res: np.ndarray, maps: np.ndarray, top: np.ndarray, left: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tiles' `full(map) > 0` as [N,T_r,T_c] booleans, with the tiles' (top, left) after clipping into the image."""
        (top, r0), (left, c0) = self.rows.starts(top), self.cols.starts(left)
        crops = sliding_window_view(low_res, (self.rows.span, self.cols.span), axis=(1, 2))[maps, r0, c0]
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits: their tiles are recomputed exactly
            approx = self.rows.weights[top, r0] @ crops @ self.cols.weights[left, c0].transpose(0, 2, 1)
            margin = MARGIN * np.abs(crops).max(axis=(1, 2))
            margin = np.where(margin < 2.0**100, margin, np.inf)[:, None, None]  # non-finite (or huge): all exact
            positive = approx > margin
            near = np.abs(approx, out=approx) <= margin  # within rounding of 0
            near[np.isinf(margin[:, 0, 0])] = True  # and every pixel of a tile drawing on a non-finite logit
            n, y, x = np.unravel_index(np.flatnonzero(near), approx.shape)
            if n.size:
                exact = exact_values(low_res, self.rows.taps, self.cols.taps, maps[n], top[n] + y, left[n] + x)
                positive[n, y, x] = exact > 0
        return positive, top, left


def exact_values(
    stack: np.ndarray, rows: AxisTaps, cols: AxisTaps, maps: np.ndarray, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """Pixels (ys, xs) of maps `maps` of a float32 stack upsampled with the very float32 operations of
    `AxisTaps.rows` then `AxisTaps.cols` (as `Upsampler.full`), so bit-identical to them."""
    r_index, r_weight = rows.index[ys], rows.weight[ys]
    c_index, c_weight = cols.index[xs], cols.weight[xs]
    out = None
    for k in range(c_index.shape[1]):
        row = stack[maps, r_index[:, 0], c_index[:, k]] * r_weight[:, 0]
        for j in range(1, r_index.shape[1]):
            row += stack[maps, r_index[:, j], c_index[:, k]] * r_weight[:, j]
        out = row * c_weight[:, k] if out is None else out + row * c_weight[:, k]
    return out


def _column_hits(bits: np.ndarray, row_hit: np.ndarray) -> np.ndarray:
    """Per map, the low-res columns with a positive logit, searched only in the band of rows that have one."""
    found = row_hit.any(axis=1)
    first = np.argmax(row_hit, axis=1)
    band = int((row_hit.shape[1] - np.argmax(row_hit[:, ::-1], axis=1) - first)[found].max(initial=0))
    if band * 4 > bits.shape[1]:  # tall bands: one pass over everything is cheaper than gathering them
        return bits.max(axis=1) > 0
    hits = np.zeros((len(bits), bits.shape[2]), bool)
    if band == 0:
        return hits
    start = np.minimum(first[found], bits.shape[1] - band)
    bands = sliding_window_view(bits, (band, bits.shape[2]), axis=(1, 2))[np.flatnonzero(found), start, 0]
    hits[found] = bands.max(axis=1) > 0
    return hits


def _window(taps: AxisTaps, hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per map, outputs [start, stop) that draw on a hit low-res index ([B, used] booleans)."""
    used = hit.shape[1]
    start = np.where(hit, taps.first[:used], taps.out_size).min(axis=1, initial=taps.out_size)
    stop = np.where(hit, taps.last[:used], 0).max(axis=1, initial=0)
    return start, stop
