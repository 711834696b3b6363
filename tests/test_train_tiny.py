"""persense-train-tiny: deterministic training crops; an interrupted run resumes to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from persense.export import train_tiny
from persense.export.sam_build import read_checkpoint
from persense.export.train_data import CROP, POINTS, sample_crop
from persense.export.train_tiny import main


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """persense-train-tiny sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_crops_are_deterministic_for_a_seed():
    first, second = (sample_crop(np.random.default_rng([3, 0, 11])) for _ in range(2))
    assert first.offset == second.offset
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.points.coords, second.points.coords)
    np.testing.assert_array_equal(first.points.targets, second.points.targets)
    assert first.image.shape == (3, CROP, CROP) and first.points.coords.shape == (POINTS, 2, 2)


def _args(folder: Path, *extra: str) -> list[str]:
    """Arguments of a 4-step run that checkpoints every 2 steps into `folder`."""
    return ["--out", str(folder / "w.pt"), "--work", str(folder / "work"), "--steps", "4", "--save-every", "2",
            "--eval-scenes", "1", "-q", *extra]


def _train(folder: Path, *extra: str) -> int:
    """persense-train-tiny's exit code for a 4-step run in `folder`."""
    return main(_args(folder, *extra))


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    assert _train(tmp_path / "once") == 0
    report = json.loads((tmp_path / "once" / "w.json").read_text())
    assert report["steps"] == 4 and 0 <= report["held_out"]["mean_iou"] <= 1 and report["held_out"]["masks"] > 0
    calls, crop_loss = [], train_tiny.crop_loss

    def crash_at_step_3(*args: object) -> tuple:
        """crop_loss, interrupted at the third step (after the checkpoint of step 2)."""
        calls.append(1)
        if len(calls) == 3:
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
