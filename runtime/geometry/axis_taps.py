"""A separable resize along one axis as a few (index, weight) taps per output pixel."""

from __future__ import annotations

import numpy as np


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
            out += image[index[:, k]] * weight[:, k : k + 1]
        return out

    def cols(self, image: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Output columns start..stop-1 of resizing axis 1 of a 2-D float32 array."""
        index, weight = self.index[start:stop], self.weight[start:stop]
        out = image[:, index[:, 0]] * weight[:, 0]
        for k in range(1, index.shape[1]):
            out += image[:, index[:, k]] * weight[:, k]
        return out
