"""persense-train-tiny: deterministic training crops; an interrupted run resumes to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from persense.export.checkpoints import read_checkpoint
from persense.export.training import train_tiny
from persense.export.training.data import CROP, POINTS, TARGET, WINDOWS, sample_crops
from persense.export.training.train_tiny import main


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """persense-train-tiny sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_crops_are_deterministic_for_a_seed():
    first, second = (sample_crops(np.random.default_rng([3, 0, 11])) for _ in range(2))
    assert len(first) == len(second) == WINDOWS
    for a, b in zip(first, second):
        assert a.offset == b.offset
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.points.coords, b.points.coords)
        np.testing.assert_array_equal(a.points.targets, b.points.targets)
    assert first[0].image.shape == (3, CROP, CROP) and first[0].points.coords.shape == (POINTS, 2, 2)


def test_windows_show_objects_at_their_inference_size():
    """Objects in the training windows are as large as in persense-synth's scenes in SAM's frame (median
    equivalent radius about 40 px at 1024; the first recipe's crops had 18 px)."""
    radii = []
    for k in range(6):
        for crop in sample_crops(np.random.default_rng([0, 0, 1000 + k])):
            areas = crop.points.targets.reshape(len(crop.points.targets), -1).sum(1) * (CROP / TARGET) ** 2
            radii.extend(np.sqrt(areas / np.pi))
    assert 25 < np.median(radii) < 80, np.median(radii)


def test_a_whole_frame_window_is_the_frame():
    (crop,) = sample_crops(np.random.default_rng([0, 0, 5]), windows=1, side=1024)
    assert crop.offset == (0, 0) and crop.image.shape == (3, 1024, 1024)
    assert crop.points.targets.shape[1:] == (512, 512) and crop.reference.shape == (1024, 1024)
    assert (crop.points.coords[:, 0] >= 0).all() and (crop.points.coords[:, 0] < 1024).all()


def _args(folder: Path, *extra: str) -> list[str]:
    """Arguments of a run of 4 window steps and 1 whole-frame step that checkpoints every 2 steps into `folder`."""
    return [
        "--out",
        str(folder / "w.pt"),
        "--work",
        str(folder / "work"),
        "--steps",
        "4",
        "--full-frame-steps",
        "1",
        "--save-every",
        "2",
        "--eval-scenes",
        "1",
        "-q",
        *extra,
    ]


def _train(folder: Path, *extra: str) -> int:
    """persense-train-tiny's exit code for a 4 + 1-step run in `folder`."""
    return main(_args(folder, *extra))


def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    assert _train(tmp_path / "once") == 0
    report = json.loads((tmp_path / "once" / "w.json").read_text())
    assert report["steps"] == 4 and 0 <= report["held_out"]["mean_iou"] <= 1 and report["held_out"]["masks"] > 0
    calls, crop_loss = [], train_tiny.crop_loss

    def crash_at_step_3(*args: object) -> tuple:
        """crop_loss, interrupted in the third step (after the checkpoint of step 2; WINDOWS crops a step)."""
        calls.append(1)
        if len(calls) == 2 * WINDOWS + 1:
            raise KeyboardInterrupt
        return crop_loss(*args)

    monkeypatch.setattr(train_tiny, "crop_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_tiny.train(train_tiny._parser().parse_args(_args(tmp_path / "split")))
    monkeypatch.setattr(train_tiny, "crop_loss", crop_loss)
    assert read_checkpoint(tmp_path / "split" / "work" / "train_state.pt")["step"] == 2
    assert _train(tmp_path / "split", "--resume") == 0
    once, resumed = read_checkpoint(tmp_path / "once" / "w.pt"), read_checkpoint(tmp_path / "split" / "w.pt")
    assert all(torch.equal(once[k], resumed[k]) for k in once)
    assert _train(tmp_path / "split", "--resume", "--lr", "1e-3") == 2
    assert "written with --lr" in capsys.readouterr().err
