"""The scenes of the reference-prompt and persense-serve tests: ellipses the trained tiny SAM segments."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from persense.runtime.datasets.synth import random_template, render_scene


def ellipse_scenes() -> dict:
    """A reference scene (20 ellipses) and a target (40), rendered as test_trained_tiny's synth scene, with the
    reference instance's true mask and the box around it."""
    rng = np.random.default_rng(11)
    template = random_template(rng)
    reference, target = (render_scene(rng, template, n, (384, 288)) for n in (20, 40))
    mask = reference.labels == reference.top_label
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return {"reference": reference, "target": target, "mask": mask, "box": box}


def scene_files(folder: Path) -> dict:
    """ellipse_scenes() as PNG files (reference, target, mask), with the box and a click inside the instance."""
    scenes = ellipse_scenes()
    files = {"reference": folder / "reference.png", "target": folder / "target.png", "mask": folder / "mask.png"}
    cv2.imwrite(str(files["reference"]), cv2.cvtColor(scenes["reference"].image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(files["target"]), cv2.cvtColor(scenes["target"].image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(files["mask"]), scenes["mask"].astype(np.uint8) * 255)
    return {**files, "box": scenes["box"], "click": interior_point(scenes["mask"]), "scenes": scenes}


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel farthest from its boundary: where a person would click."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)
