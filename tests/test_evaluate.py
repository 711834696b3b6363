"""mIoU as eval_miou.py computes it: hand-computed values, its quirks, warnings and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from persense.runtime.cli.eval import main
from persense.runtime.datasets.evaluate import miou, read_eval_mask
from persense.runtime.errors import PersenseError


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> np.ndarray:
    """A 0/255 uint8 mask with the given (row, col) pixels set."""
    mask = np.zeros(shape, np.uint8)
    for row, col in pixels:
        mask[row, col] = 255
    return mask


def _write(path: Path, mask: np.ndarray) -> None:
    """Write a mask PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)


def _pair(root: Path, cls: str, name: str, gt: np.ndarray, pred: np.ndarray | None) -> None:
    """Write data/Images/<cls>/<name> and, unless None, pred/<cls>/<name>."""
    _write(root / "data" / "Images" / cls / name, gt)
    if pred is not None:
        _write(root / "pred" / cls / name, pred)


EMPTY = np.zeros((4, 4), np.uint8)
BLOCK = _mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Four classes with hand-countable pixels; each reference 00 has another size (never read)."""
    ref = _mask((3, 5), (0, 0))
    for cls in ("alpha", "beta", "gamma", "delta"):
        _pair(tmp_path, cls, "00.png", ref, ref[:2])
    # alpha: 01 I=4 U=6, 02 I=1 U=2
    _pair(tmp_path, "alpha", "01.png", BLOCK, _mask((4, 4), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)))
    _pair(tmp_path, "alpha", "02.png", _mask((4, 4), (3, 3)), _mask((4, 4), (3, 3), (0, 3)))
    # beta: 01 I=4 U=4, 02 empty prediction I=0 U=2
    _pair(tmp_path, "beta", "01.png", BLOCK, BLOCK)
    _pair(tmp_path, "beta", "02.png", _mask((4, 4), (2, 2), (2, 3)), EMPTY)
    # gamma: empty ground truth I=0 U=3;  delta: both empty I=0 U=0
    _pair(tmp_path, "gamma", "01.png", EMPTY, _mask((4, 4), (0, 0), (1, 1), (2, 2)))
    _pair(tmp_path, "delta", "01.png", EMPTY, EMPTY)
    (tmp_path / "data" / "Images" / ".DS_Store").mkdir()
    (tmp_path / "data" / "Images" / "notes.txt").write_text("not a class")
    return tmp_path


def test_hand_computed_miou(dataset: Path) -> None:
    result = miou(dataset / "data", dataset / "pred")
    assert list(result.classes) == ["alpha", "beta", "delta", "gamma"]
    sums = {name: (r.intersection, r.union, r.images) for name, r in result.classes.items()}
    assert sums == {"alpha": (5, 8, 2), "beta": (4, 6, 2), "gamma": (0, 3, 1), "delta": (0, 0, 1)}
    assert result.classes["alpha"].iou == 100 * (5 / (8 + 1e-10))
    assert result.classes["delta"].iou == 0.0  # both empty: 0 / (0 + 1e-10)
    expected = 100 * (5 / (8 + 1e-10) + 4 / (6 + 1e-10) + 0.0 + 0.0) / 4
    assert result.miou == expected
    assert result.warnings == []


def test_size_mismatch_names_both_files(dataset: Path) -> None:
    _pair(dataset, "beta", "03.png", BLOCK, np.zeros((5, 4), np.uint8))
    with pytest.raises(PersenseError, match=r"Images/beta/03\.png.*4x4.*pred/beta/03\.png.*4x5"):
        miou(dataset / "data", dataset / "pred")


def test_ref_idx_in_path_skips_and_warns(tmp_path: Path) -> None:
    for name in ("00.png", "01.png", "100.png"):
        _pair(tmp_path, "cans", name, BLOCK, BLOCK)
    for name in ("00.png", "01.png"):
        _pair(tmp_path, "b00ts", name, BLOCK, BLOCK)
    result = miou(tmp_path / "data", tmp_path / "pred")
    assert result.classes["cans"].images == 1
    assert result.classes["b00ts"].images == 0 and result.classes["b00ts"].iou == 0.0
    assert result.miou == 100 * (4 / (4 + 1e-10) + 0.0) / 2
    skipped = [w for w in result.warnings if "occurs in its path" in w]
    assert len(skipped) == 2
    assert any("cans" in w and "100.png" in w for w in skipped)
    assert any("b00ts" in w and "01.png" in w and "b00ts/00.png" not in w for w in skipped)
    assert any("b00ts: no image pair evaluated" in w for w in result.warnings)


def test_ref_idx_is_matched_below_the_data_folder(tmp_path: Path) -> None:
    root = tmp_path / "run2400"
    _pair(root, "cans", "00.png", BLOCK, BLOCK)
    _pair(root, "cans", "01.png", BLOCK, EMPTY)
    assert miou(root / "data", root / "pred").classes["cans"].images == 1


def test_configurable_ref_idx(tmp_path: Path) -> None:
    _pair(tmp_path, "cans", "00.png", BLOCK, BLOCK)
    _pair(tmp_path, "cans", "01.png", BLOCK, EMPTY)
    default = miou(tmp_path / "data", tmp_path / "pred").classes["cans"]
    other = miou(tmp_path / "data", tmp_path / "pred", ref_idx="01").classes["cans"]
    assert (default.intersection, default.union) == (0, 4)
    assert (other.intersection, other.union) == (4, 4)


def test_pairing_by_sorted_position(tmp_path: Path) -> None:
    _pair(tmp_path, "cans", "00.png", BLOCK, BLOCK)
    _pair(tmp_path, "cans", "01.png", BLOCK, None)
    _pair(tmp_path, "cans", "02.png", _mask((4, 4), (3, 3)), None)
    _write(tmp_path / "pred" / "cans" / "02.png", BLOCK)  # paired with gt 01
    result = miou(tmp_path / "data", tmp_path / "pred")
    cans = result.classes["cans"]
    assert (cans.intersection, cans.union, cans.images) == (4, 4, 1)  # gt 02 falls off zip's end
    assert any("3 ground-truth masks but 2 predictions" in w for w in result.warnings)
    assert any("01.png <-> 02.png" in w for w in result.warnings)


def test_missing_prediction_folder_warns(dataset: Path) -> None:
    _pair(dataset, "extra", "01.png", BLOCK, None)
    result = miou(dataset / "data", dataset / "pred")
    assert result.classes["extra"].iou == 0.0 and len(result.classes) == 5
    assert any(w.startswith("extra: no prediction folder") for w in result.warnings)


def test_mask_reading_follows_bgr2gray(tmp_path: Path) -> None:
    colour = np.zeros((1, 3, 3), np.uint8)
    colour[0, 0] = (1, 0, 0)  # pure blue 1: gray rounds to 0, background as in the original
    colour[0, 1] = (0, 0, 255)
    _write(tmp_path / "c.png", colour)
    assert read_eval_mask(tmp_path / "c.png").tolist() == [[False, True, False]]


@pytest.mark.parametrize(
    "layout, message",
    [("nodata", "no such folder"), ("nopred", "no such prediction folder"), ("noclass", "no class folders")],
)
def test_input_errors(tmp_path: Path, layout: str, message: str) -> None:
    if layout != "nodata":
        (tmp_path / "data" / "Images").mkdir(parents=True)
    if layout == "nopred":
        (tmp_path / "data" / "Images" / "cans").mkdir()
    else:
        (tmp_path / "pred").mkdir()
    with pytest.raises(PersenseError, match=message):
        miou(tmp_path / "data", tmp_path / "pred")


def test_cli_prints_table_and_writes_json(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = dataset / "report" / "eval.json"
    assert main(["--data", str(dataset / "data"), "--pred", str(dataset / "pred"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["class", "images", "IoU"]
    assert printed[1].split() == ["alpha", "2", "62.50"]
    assert printed[-1].split() == ["mIoU", "32.29"]
    report = json.loads(out.read_text())
    assert set(report) == {"miou", "classes", "warnings"}
    assert report["classes"]["beta"] == {"iou": 100 * 4 / (6 + 1e-10), "images": 2, "intersection": 4, "union": 6}


def test_cli_user_error_is_one_line(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(dataset / "nowhere"), "--pred", str(dataset / "pred")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("persense-eval: error: ") and err.count("\n") == 1


def test_cli_warnings_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pair(tmp_path, "cans", "01.png", BLOCK, None)
    (tmp_path / "pred").mkdir()
    assert main(["--data", str(tmp_path / "data"), "--pred", str(tmp_path / "pred")]) == 0
    assert "persense-eval: warning: cans: no prediction folder" in capsys.readouterr().err


def test_cli_bad_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--data", "x"])
    assert exc.value.code == 2


def test_python_m_size_mismatch(dataset: Path) -> None:
    _pair(dataset, "beta", "03.png", BLOCK, np.zeros((5, 4), np.uint8))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "persense.runtime.cli.eval",
            "--data",
            str(dataset / "data"),
            "--pred",
            str(dataset / "pred"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert "03.png" in run.stderr and "size mismatch" in run.stderr
