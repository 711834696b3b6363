"""The density-counter interface of the pipeline, and the counter that reads a density map from a file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform

# IDM's binary threshold on DSALVANet's maps in the original, shared by the counters that follow DSALVANet's
# conventions (DSALVANet, the .npy map, the SAM-only counter); each counter module states its own IDM_THRESHOLD.
DSALVANET_IDM_THRESHOLD = 30


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
    """DSALVANet's count as PerSense uses it: ceil of the density sum, summed in float32 as `torch.sum` does.

    The original computes `ceil(torch.sum(output))` on a float32 map (PerSense_modules.py L16-17). A float64
    sum of a map that sums to an integer in float32 can land just above it and give one more.
    """
    return float(math.ceil(float(np.sum(np.asarray(density, dtype=np.float32), dtype=np.float32))))


class NpyDensityCounter:
    """Returns a fixed density map read from a .npy file (DSALVANet conventions: ceil(sum), threshold 30)."""

    name = "npy"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise PersenseError(f"{path}: density file not found")
        try:
            density = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # not .npy, truncated, empty, pickled objects
            raise PersenseError(f"{path}: not a readable .npy array ({exc})") from exc
        if not isinstance(density, np.ndarray):  # an .npz archive
            density.close()
            raise PersenseError(f"{path}: is an .npz archive; save the density map alone with numpy.save")
        self.density = _checked_density(path, density)

    @classmethod
    def from_array(cls, density: np.ndarray, name: str = "density") -> NpyDensityCounter:
        """The same counter over an in-memory map, checked as a file's map is."""
        counter = cls.__new__(cls)
        counter.density = _checked_density(Path(name), np.asarray(density))
        return counter

    def count(self, request: CountRequest) -> Density:
        """The stored map, whatever the exemplars."""
        return Density(self.density, dsalvanet_count(self.density), DSALVANET_IDM_THRESHOLD)


def _checked_density(path: Path, density: np.ndarray) -> np.ndarray:
    """A loaded array as a finite, non-negative 2-D float32 map (leading batch axes of size 1 dropped)."""
    while density.ndim > 2 and density.shape[0] == 1:
        density = density[0]
    if density.ndim != 2 or density.size == 0:
        raise PersenseError(f"{path}: density map must be 2-D (H, W), got shape {density.shape}")
    if density.dtype.kind not in "biuf":
        raise PersenseError(f"{path}: density map must hold real numbers, got dtype {density.dtype}")
    with np.errstate(over="ignore"):
        density = density.astype(np.float32)
    if not np.isfinite(density).all():
        raise PersenseError(f"{path}: density map contains NaN or infinite values (or values beyond float32)")
    return np.maximum(density, 0)
