"""Synthetic datasets: determinism, PerSense-D layout, exact ground truth, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from persense.runtime.cli.synth import main
from persense.runtime.datasets.evaluate import miou
from persense.runtime.datasets.synth import generate_dataset, random_template, render_scene
from persense.runtime.errors import PersenseError

ARGS = {"classes": 2, "images": 3, "instances": (5, 40), "size": (256, 192)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset written once for the module."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, seed=7, **ARGS)
    return out


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    """A PNG exactly as stored."""
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_same_seed_same_bytes(dataset: Path, tmp_path: Path) -> None:
    written = generate_dataset(tmp_path / "again", seed=7, **ARGS)
    assert len(written) == 2 * 4 * 5
    assert _files(tmp_path / "again") == _files(dataset)


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "other", seed=8, **ARGS)
    first = {p.read_bytes() for p in dataset.glob("Images/*/*.jpg")}
    second = {p.read_bytes() for p in (tmp_path / "other").glob("Images/*/*.jpg")}
    assert len(first) == len(second) == 8 and first.isdisjoint(second)


def test_layout(dataset: Path) -> None:
    classes = sorted(p.name for p in (dataset / "Images").iterdir())
    assert len(classes) == 2 and all("00" not in name for name in classes)
    for name in classes:
        expected = {f"{i:02d}.{ext}" for i in range(4) for ext in ("jpg", "png")}
        assert {p.name for p in (dataset / "Images" / name).iterdir()} == expected
        meta = {p.name for p in (dataset / "meta" / name).iterdir()}
        assert meta == {f"{i:02d}{suffix}" for i in range(4) for suffix in (".json", "_density.npy", "_instances.png")}


def test_reference_mask_is_one_instance(dataset: Path) -> None:
    for folder in (dataset / "Images").iterdir():
        mask = _read(folder / "00.png")
        labels = _read(dataset / "meta" / folder.name / "00_instances.png")
        reference = json.loads((dataset / "meta" / folder.name / "00.json").read_text())["reference_label"]
        assert mask.ndim == 2 and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask > 0, labels == reference)
        assert cv2.connectedComponents(mask, connectivity=8)[0] == 2  # background + one component


def test_test_masks_are_label_unions(dataset: Path) -> None:
    for jpg in dataset.glob("Images/*/0[1-9].jpg"):
        meta_dir = dataset / "meta" / jpg.parent.name
        mask, labels = _read(jpg.with_suffix(".png")), _read(meta_dir / f"{jpg.stem}_instances.png")
        meta = json.loads((meta_dir / f"{jpg.stem}.json").read_text())
        density = np.load(meta_dir / f"{jpg.stem}_density.npy")
        assert labels.dtype == np.uint16 and mask.shape == labels.shape == density.shape == (192, 256)
        assert np.array_equal(mask, np.where(labels > 0, 255, 0).astype(np.uint8))
        assert 5 <= meta["count"] <= 40 and labels.max() == meta["count"] == len(meta["boxes"])
        assert len(np.unique(labels)) == meta["count"] + 1
        assert density.dtype == np.float32 and abs(float(density.sum()) - meta["count"]) <= 0.02 * meta["count"]
        ys, xs = np.nonzero(labels == 1)
        assert meta["boxes"][0] == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_synth_ground_truth_scores_100(dataset: Path) -> None:
    result = miou(dataset, dataset / "Images")
    assert result.miou == pytest.approx(100.0, abs=1e-9)
    assert all(r.images == 3 for r in result.classes.values()) and result.warnings == []


def test_render_scene_is_fast_and_exact() -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    scene = render_scene(rng, random_template(rng), 200, (1024, 768))
    assert time.perf_counter() - start < 2.0  # typically ~0.15 s
    assert scene.image.shape == (768, 1024, 3) and scene.count == 200
    assert np.array_equal(scene.mask, scene.labels > 0)
    assert scene.density.sum() == pytest.approx(200, rel=1e-4)
    assert scene.boxes.shape == (200, 4) and scene.centres.shape == (200, 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--instances", "9..3"], "--instances must be A..B"),
        (["--images", "100"], "--images must be 1..99"),
        (["--instances", "5000"], "do not fit"),
        (["--seed", "-1"], "--seed must be 0 or more"),
    ],
)
def test_cli_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    base = {"--out": str(tmp_path / "ds"), "--classes": "1", "--images": "2", "--instances": "3..5", "--size": "64x48"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert main([item for pair in base.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("persense-synth: error: ") and message in err and err.count("\n") == 1


def test_refuses_non_empty_out(dataset: Path) -> None:
    with pytest.raises(PersenseError, match="already has content"):
        generate_dataset(dataset, seed=7, **ARGS)


def test_cli_bad_syntax_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", "x", "--classes", "1", "--images", "1", "--instances", "many"])
    assert exc.value.code == 2


def test_python_m_writes_dataset(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "persense.runtime.cli.synth",
            "--out",
            str(tmp_path / "ds"),
            "--classes",
            "1",
            "--images",
            "1",
            "--instances",
            "3..6",
            "--size",
            "96x64",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 1 classes x 2 images (10 files)" in run.stdout
    assert len(list((tmp_path / "ds" / "Images").glob("*/*.png"))) == 2


def test_defaults_need_only_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "ds"), "-q"]) == 0
    assert "wrote 3 classes x 5 images (75 files)" in capsys.readouterr().out
    for labels in (tmp_path / "ds" / "meta").glob("*/0[1-4]_instances.png"):
        assert 20 <= len(np.unique(cv2.imread(str(labels), cv2.IMREAD_UNCHANGED))) - 1 <= 60
