"""The density-counter interface of the pipeline, and the counter that reads a density map from a file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.transforms import SamTransform


@dataclass
class CountRequest:
    """Everything a counter may use: the image, exemplar boxes and what SAM already computed."""

    image: np.ndarray  # HxWx3 uint8 RGB
    exemplars: np.ndarray  # (K, 4) float (x0, y0, x1, y1) original pixels; row 0 is the initial exemplar
    transform: SamTransform
    embedding: np.ndarray | None = None  # SAM image embedding [1, 256, 64, 64]
    similarity: np.ndarray | None = None  # HxW location prior (cosine similarity to the reference)


@dataclass
class Density:
    """A counter's output: a density map at any resolution (IDM resizes it) and the count PPSM uses."""

    map: np.ndarray  # 2-D float32, >= 0
    count: float
    idm_threshold: int  # binary threshold IDM applies to the normalised map (30 DSALVANet, 20 CounTR)


class Counter(Protocol):
    """Image + exemplar boxes -> density map and count."""

    name: str

    def count(self, request: CountRequest) -> Density:
        """Estimate the density of objects like the exemplars."""
        ...


def dsalvanet_count(density: np.ndarray) -> float:
    """DSALVANet's count as PerSense uses it: ceil of the density sum."""
    return float(math.ceil(float(np.sum(density, dtype=np.float64))))


class NpyDensityCounter:
    """Returns a fixed density map read from a .npy file (DSALVANet conventions: ceil(sum), threshold 30)."""

    name = "npy"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise PersenseError(f"{path}: density file not found")
        try:
            density = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise PersenseError(f"{path}: not a readable .npy array ({exc})") from exc
        density = np.squeeze(density)
        if density.ndim != 2 or density.size == 0:
            raise PersenseError(f"{path}: density map must be 2-D, got shape {density.shape}")
        if not np.all(np.isfinite(density)):
            raise PersenseError(f"{path}: density map contains NaN or infinite values")
        self.density = np.maximum(density.astype(np.float32), 0)

    def count(self, request: CountRequest) -> Density:
        """The stored map, whatever the exemplars."""
        return Density(self.density, dsalvanet_count(self.density), 30)
