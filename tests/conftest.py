"""Shared fixtures: a tiny random SAM, its engines exported once per test session, a synthetic scene."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from persense.runtime.geometry.upsampling import Upsampler

TINY_SEED = 0


@pytest.fixture(scope="session", autouse=True)
def reference_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """PERSENSE_CACHE_DIR for the whole session (child processes too): no test writes to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("reference_cache")
        patch.setenv("PERSENSE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_worker() -> None:
    """Under pytest-xdist each worker has a core of its own: torch's intra-op threads would oversubscribe them."""
    if os.environ.get("PYTEST_XDIST_WORKER") and importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sam():
    """The tiny SAM (same I/O as vit_b/h) with seeded random weights."""
    from persense.export.sam.build import random_sam

    return random_sam("tiny", TINY_SEED)


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per test run and read by every pytest-xdist worker: the first to get the lock builds it
    (the session's exports, which no test writes into, cost each worker their time otherwise)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, common to the workers
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            done.touch()
    return folder


def export_into(*args: str) -> Callable[[Path], None]:
    """A `shared_folder` build: persense-export with `args` into the folder."""

    def build(folder: Path) -> None:
        from persense.export.cli import main

        assert main([*args, "--out", str(folder), "-q"]) == 0

    return build


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engines folder exported by persense-export from the tiny SAM (shared by the whole run)."""
    return shared_folder(tmp_path_factory, "engines_tiny", export_into("--model", "tiny", "--seed", str(TINY_SEED)))


FEATURE_SEED = 0  # the random ResNet-50 of PerSense++'s feature engine in test engines (OraclePlusPlus's resnet_seed)


def added_to(engines: Path, *args: str) -> Callable[[Path], None]:
    """A `shared_folder` build: a copy of an engines folder with what persense-export `args` adds to it."""

    def build(folder: Path) -> None:
        shutil.copytree(engines, folder)
        export_into(*args)(folder)

    return build


FEATURE_ENGINE = ("--method", "persense++", "--random-weights", "--seed", str(FEATURE_SEED))  # the export adding it


@pytest.fixture(scope="session")
def plusplus_engines(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny engines plus the feature engine (random ResNet-50, FEATURE_SEED; shared by the whole run)."""
    return shared_folder(tmp_path_factory, "engines_plusplus", added_to(tiny_engines, *FEATURE_ENGINE))


@pytest.fixture(scope="session")
def trained_plusplus_engines(trained_tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny engines plus the same feature engine (shared by the whole run)."""
    return shared_folder(tmp_path_factory, "engines_plusplus_trained", added_to(trained_tiny_engines, *FEATURE_ENGINE))


@pytest.fixture(scope="session")
def int8_engines(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny engines with `--int8` added (shared by the whole run)."""
    args = ("--model", "tiny", "--seed", str(TINY_SEED), "--int8")
    return shared_folder(tmp_path_factory, "engines_int8", added_to(tiny_engines, *args))


def draw_scene(
    height: int = 288, width: int = 384, rows: int = 3, cols: int = 4, radius: int = 18, seed: int = 0
) -> dict[str, np.ndarray]:
    """A grid of red discs on a noisy background: image, union mask, one-object reference mask, density."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 90, (height, width, 3)).astype(np.uint8)
    union = np.zeros((height, width), np.uint8)
    centres = []
    for i in range(rows):
        for j in range(cols):
            cx = int((j + 0.5) * width / cols + rng.integers(-4, 5))
            cy = int((i + 0.5) * height / rows + rng.integers(-4, 5))
            centres.append((cx, cy))
            cv2.circle(image, (cx, cy), radius, (200, 60, 40), -1)
            cv2.circle(union, (cx, cy), radius, 255, -1)
    reference = np.zeros((height, width), np.uint8)
    cv2.circle(reference, centres[0], radius, 255, -1)
    yy, xx = np.mgrid[:height, :width]
    density = np.zeros((height, width), np.float32)
    for cx, cy in centres:
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (radius / 3) ** 2))
        density += (blob / blob.sum()).astype(np.float32)
    return {
        "image": image,
        "union": union,
        "reference": reference,
        "density": density,
        "centres": np.array(centres, dtype=np.float64),
    }


@pytest.fixture(scope="session")
def scene() -> dict[str, np.ndarray]:
    """The default synthetic scene (12 discs, 384x288)."""
    return draw_scene()


@pytest.fixture(scope="session")
def scene_files(tmp_path_factory: pytest.TempPathFactory, scene) -> dict[str, Path]:
    """The scene written to disk as persense-infer takes it."""
    folder = tmp_path_factory.mktemp("scene")
    files = {"image": folder / "image.jpg", "mask": folder / "ref_mask.png", "density": folder / "density.npy"}
    cv2.imwrite(str(files["image"]), cv2.cvtColor(scene["image"], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(files["mask"]), scene["reference"])
    np.save(files["density"], scene["density"])
    return files


@pytest.fixture(scope="session")
def trained_tiny_sam():
    """The tiny SAM with the project's own trained weights (assets/tiny_sam.pt, persense-train-tiny)."""
    from persense.export.sam.build import BUNDLED_CHECKPOINTS, load_sam

    return load_sam("tiny-trained", BUNDLED_CHECKPOINTS["tiny-trained"])


@pytest.fixture(scope="session")
def trained_tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engines folder exported by persense-export from the trained tiny SAM (shared by the whole run)."""
    return shared_folder(tmp_path_factory, "engines_tiny_trained", export_into("--model", "tiny-trained"))


def positive_window(upsampler: Upsampler, low_res: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    """(y0, x0, mask): `full(low_res) > 0` over the window outside which the tiles see no positive pixel, composed
    from the runtime's own `tiles.windows` and `positive_in` as the mask stage uses them, or None."""
    stack = low_res.astype(np.float32)[None]
    (y0,), (y1,), (x0,), (x1,) = upsampler.tiles.windows(stack)
    if y1 <= y0 or x1 <= x0:
        return None
    return int(y0), int(x0), upsampler.positive_in(stack[0], int(y0), int(y1), int(x0), int(x1))
