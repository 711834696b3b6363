"""Benchmark inputs: synthetic dense scenes with a known density map (regenerable anywhere), or the user's files.

A synthetic workload is fully determined by (seed, instances, image size): the object template, the
reference scene (12 instances, the mask of its fully visible one) and the target scene are drawn from
`numpy.random.default_rng` with fixed keys, so any machine renders the same pixels. The scene's
ground-truth density map is what the fixed counter returns, so the counter costs the same in both
pipelines and the decoder workload follows from the number of instances.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from persense.runtime.counters.base import NpyDensityCounter
from persense.runtime.datasets.synth import random_template, render_scene
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import atomic_write_bytes, read_mask, read_rgb, write_image

REFERENCE_INSTANCES = 12
DEFAULT_SIZE = (768, 576)  # (width, height), PerSense-D-like


@dataclass(frozen=True)
class Workload:
    """One benchmark input: target image, reference image and mask, and the density map the fixed counter returns."""

    name: str
    instances: int | None  # instances asked for (None for the user's own image)
    ground_truth_count: int | None  # instances visible in the synthetic scene (None for the user's image)
    size: tuple[int, int]  # target (width, height)
    image: Path
    reference: Path
    reference_mask: Path
    density: Path | None
    labels: Path | None = None  # .npy uint16 ground-truth label map of a synthetic scene (0 = background)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(target RGB, reference RGB, reference mask as bool), read as persense-infer reads them."""
        reference = read_rgb(self.reference)
        return read_rgb(self.image), reference, read_mask(self.reference_mask, expected_size=reference.shape[:2])

    def describe(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "instances": self.instances,
            "ground_truth_count": self.ground_truth_count,
            "width": self.size[0],
            "height": self.size[1],
            "image": str(self.image),
            "reference": str(self.reference),
            "reference_mask": str(self.reference_mask),
            "density": None if self.density is None else str(self.density),
            "labels": None if self.labels is None else str(self.labels),
        }


def parse_instances(text: str) -> tuple[int, ...]:
    """'10,50,200' -> (10, 50, 200), sorted and without duplicates."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise PersenseError(f"--instances must be comma-separated whole numbers, got {text!r}") from exc
    if not values or values[0] < 1:
        raise PersenseError(f"--instances needs at least one count, each 1 or more (got {text!r})")
    return tuple(values)


def parse_size(text: str) -> tuple[int, int]:
    """'768x576' -> (768, 576)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise PersenseError(f"--size must look like 768x576, got {text!r}") from exc
    return width, height


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write a .npy file atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def synthetic_workloads(folder: Path, instances: tuple[int, ...], size: tuple[int, int], seed: int) -> list[Workload]:
    """Render the reference scene and one target scene per instance count into `folder` (lossless PNG + .npy)."""
    folder = Path(folder) / f"seed{seed}-{size[0]}x{size[1]}"
    template = random_template(np.random.default_rng([seed, 0]))
    reference = render_scene(np.random.default_rng([seed, 0, 0]), template, REFERENCE_INSTANCES, size)
    ref_image, ref_mask = folder / "reference.png", folder / "reference_mask.png"
    write_image(ref_image, reference.image)
    write_image(ref_mask, (reference.labels == reference.top_label).astype(np.uint8) * 255)
    workloads = []
    for count in instances:
        scene = render_scene(np.random.default_rng([seed, 1, count]), template, count, size)
        name = f"n{count:03d}"
        image, density, labels = folder / f"{name}.png", folder / f"{name}_density.npy", folder / f"{name}_labels.npy"
        write_image(image, scene.image)
        _save_npy(density, scene.density)
        _save_npy(labels, scene.labels)
        workloads.append(Workload(name, count, scene.count, size, image, ref_image, ref_mask, density, labels))
    return workloads


def user_workload(image: Path, reference: Path, reference_mask: Path, density: Path | None) -> Workload:
    """The user's own target image, reference image and mask (and optional density map), checked up front."""
    workload = Workload(
        Path(image).stem,
        None,
        None,
        (0, 0),
        Path(image),
        Path(reference),
        Path(reference_mask),
        None if density is None else Path(density),
    )
    target, _, _ = workload.load()
    if density is not None:
        NpyDensityCounter(density)
    return replace(workload, size=(target.shape[1], target.shape[0]))
