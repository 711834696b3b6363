"""persense-eval --run resumes after kill -9: only unfinished images are redone, outputs are identical."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from eval_runs import eval_command, predictions, run_eval, tiny_dataset

IMAGES = 3  # per class, plus the reference, which is a target too


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One class, four target images."""
    return tiny_dataset(tmp_path_factory.mktemp("batch") / "data", classes=1, images=IMAGES)


def _kill_after_first_prediction(command: list[str], pred: Path) -> None:
    """Start a run and SIGKILL it as soon as its first prediction file is in place."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list(pred.glob("*/*.png")):
            assert process.poll() is None, "the run ended before writing a prediction"
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_killed_run_resumes_to_identical_outputs(dataset: Path, tiny_engines: Path, tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_eval(dataset, whole, tiny_engines) == (IMAGES + 1, 0)
    _kill_after_first_prediction(eval_command(dataset, resumed, tiny_engines), resumed)
    survivors = {p: p.stat().st_mtime_ns for p in resumed.glob("*/*.png")}
    assert 1 <= len(survivors) < IMAGES + 1, "the kill came too late to leave work undone"
    missing = next(
        p.relative_to(whole) for p in sorted(whole.glob("*/*.png")) if not (resumed / p.relative_to(whole)).exists()
    )
    stale = resumed / missing.parent / f".{missing.name}.k1ll3d.tmp"  # as a kill during a write leaves
    stale.write_bytes(b"partial")

    assert run_eval(dataset, resumed, tiny_engines) == (IMAGES + 1 - len(survivors), len(survivors))
    assert predictions(resumed) == predictions(whole)  # byte-identical, and no temp file left
    assert {p: p.stat().st_mtime_ns for p in survivors} == survivors  # finished images were not redone
    assert run_eval(dataset, resumed, tiny_engines) == (0, IMAGES + 1)


def test_unreadable_image_is_listed_and_retried_by_the_next_run(
    dataset: Path, tiny_engines: Path, tmp_path: Path
) -> None:
    import shutil

    data, pred = tmp_path / "data", tmp_path / "pred"
    shutil.copytree(dataset, data)
    bad = sorted(data.glob("Images/*/02.jpg"))[0]
    good_bytes = bad.read_bytes()
    bad.write_text("a text file renamed .jpg\n")
    done = subprocess.run(eval_command(data, pred, tiny_engines), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"persense-eval: error: {bad}: not a readable image" in done.stderr
    assert f"segmented {IMAGES} image(s), 0 already done, 1 failed" in done.stderr
    assert len(list(pred.glob("*/*.png"))) == IMAGES and not (pred / bad.parent.name / "02.png").exists()

    bad.write_bytes(good_bytes)  # the user repairs the file; the next run does only that image
    assert run_eval(data, pred, tiny_engines) == (1, IMAGES)
    assert (pred / bad.parent.name / "02.png").is_file()


def test_eval_run_encodes_each_class_reference_once_across_runs(
    dataset: Path, tiny_engines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from persense.runtime.api import PerSense
    from persense.runtime.datasets.batch import PipelineSpec, run_dataset

    encoded: list[str] = []
    original = PerSense.reference

    def recording(self, image, mask):
        reference = original(self, image, mask)
        encoded.append(reference.source)
        return reference

    monkeypatch.setattr(PerSense, "reference", recording)
    ps = PipelineSpec(tiny_engines, "ort-cpu", "sam", 1, cache_dir=tmp_path / "cache").open()
    first = run_dataset(dataset, tmp_path / "first", ps, progress=False)
    second = run_dataset(dataset, tmp_path / "second", ps, progress=False)
    assert first.segmented == second.segmented == IMAGES + 1 and encoded == ["encoded", "cache"]
    assert predictions(tmp_path / "first") == predictions(tmp_path / "second")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    no_cache = tmp_path / "unused"
    assert run_eval(dataset, tmp_path / "third", tiny_engines, "--no-cache", "--cache-dir", str(no_cache)) == (
        IMAGES + 1,
        0,
    )
    assert not no_cache.exists()
    assert run_eval(dataset, tmp_path / "fourth", tiny_engines, "--cache-dir", str(tmp_path / "cli")) == (IMAGES + 1, 0)
    assert len(list((tmp_path / "cli").glob("*.npz"))) == 1
