"""Fault injection: SIGKILL at random moments never leaves a partial output; damaged engines never run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.cli.infer import main as infer

FINAL = ("mask.png", "instances.png", "result.json")
TEMPORARY = re.compile(r"^\.(mask\.png|instances\.png|result\.json)\..+\.tmp$")
VOLATILE = ("timings_ms", "reference_encoding_ms")  # differ between two runs of the same inputs
WRITER = """
import sys
from pathlib import Path
from persense.runtime.imageio import atomic_write_bytes
target, payloads = Path(sys.argv[1]), [bytes([65]) * (1 << 22), bytes([66]) * (1 << 22) + b"end"]
i = 0
while True:
    atomic_write_bytes(target, payloads[i % 2])
    i += 1
"""


def blocks(shape: tuple[int, int], centres: np.ndarray) -> np.ndarray:
    """A density map with one 3x3 block (sum 0.9) per (x, y) centre: one candidate each."""
    density = np.zeros(shape, np.float32)
    for x, y in centres.astype(int):
        density[y - 1 : y + 2, x - 1 : x + 2] = 0.1
    return density


def comparable(path: Path) -> bytes | dict:
    """A file's bytes, or for result.json its content without the timings."""
    if path.name != "result.json":
        return path.read_bytes()
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def runs(tiny_engines, scene, scene_files, tmp_path_factory) -> dict:
    """Two complete runs on the scene that differ (1 and 2 instances): 'old' and 'new' outputs and arguments."""
    root = tmp_path_factory.mktemp("fault_runs")
    runs = {}
    for name, centres in (("old", scene["centres"][:1]), ("new", scene["centres"][1:3])):
        np.save(root / f"{name}.npy", blocks(scene["image"].shape[:2], centres))
        argv = [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(tiny_engines),
            "--density",
            str(root / f"{name}.npy"),
            "--threads",
            "2",
            "-q",
        ]
        assert infer(argv + ["--out", str(root / name)]) == 0
        runs[name] = {"argv": argv, "folder": root / name, "files": {f: comparable(root / name / f) for f in FINAL}}
    assert runs["old"]["files"]["result.json"] != runs["new"]["files"]["result.json"]
    return runs


def owners(path: Path, runs: dict) -> set[str]:
    """The complete runs ('old', 'new') whose file this is; fails for a partial or foreign file."""
    content = comparable(path)
    found = {name for name, run in runs.items() if run["files"][path.name] == content}
    assert found, f"{path.name} is neither the previous nor the new complete file"
    return found


def check_outputs(out: Path, runs: dict) -> None:
    """Only complete files under final names; with result.json present, all three from the same run."""
    names = {p.name for p in out.iterdir()}
    visible = {n for n in names if not n.startswith(".")}
    assert visible <= set(FINAL), visible
    assert all(TEMPORARY.match(n) for n in names - visible), names - visible
    runs_of = {name: owners(out / name, runs) for name in visible}
    if "result.json" in visible:
        assert visible == set(FINAL) and set.intersection(*runs_of.values()), runs_of


def kill_new_run(runs: dict, out: Path, wait_for_writing: bool, delay: float) -> None:
    """Start the 'new' run over the 'old' outputs in `out` and SIGKILL it `delay` s after it starts, or after
    it starts writing (the first file created or removed in `out`)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(runs["old"]["folder"], out)
    before = set(os.listdir(out))
    child = subprocess.Popen(
        [sys.executable, "-m", "persense.runtime.cli.infer", *runs["new"]["argv"], "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while wait_for_writing and set(os.listdir(out)) == before and child.poll() is None:
        time.sleep(0.0005)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_infer_killed_at_random_moments_leaves_old_or_new_complete_outputs(runs, tmp_path):
    rng = np.random.default_rng(7)
    out = tmp_path / "out"
    moments = [(True, d) for d in rng.uniform(0.0, 0.015, 6)] + [(False, d) for d in rng.uniform(0.5, 4.0, 3)]
    for wait_for_writing, delay in moments:
        kill_new_run(runs, out, wait_for_writing, delay)
        check_outputs(out, runs)


def test_atomic_write_killed_at_random_moments_leaves_a_whole_file(tmp_path):
    rng = np.random.default_rng(3)
    target = tmp_path / "payload.bin"
    whole = {bytes([65]) * (1 << 22), bytes([66]) * (1 << 22) + b"end"}
    for delay in rng.uniform(0.0, 0.25, 8):
        target.unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        while not target.exists() and child.poll() is None:
            time.sleep(0.001)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert target.read_bytes() in whole
        leftovers = [p.name for p in tmp_path.iterdir() if p != target]
        assert all(re.fullmatch(r"\.payload\.bin\..+\.tmp", name) for name in leftovers), leftovers


@pytest.mark.parametrize("artefact", ["sam_encoder", "sam_decoder"])
@pytest.mark.parametrize("damage", ["flipped_byte", "truncated"])
def test_damaged_engine_is_refused_before_anything_runs(
    artefact, damage, tiny_engines, scene_files, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "engines"
    shutil.copytree(tiny_engines, folder)
    path = folder / f"{artefact}.onnx"
    data = bytearray(path.read_bytes())
    if damage == "flipped_byte":
        data[len(data) // 2] ^= 0xFF  # same size, likely still loadable: only the hash can tell
    else:
        del data[len(data) // 3 :]
    path.write_bytes(bytes(data))
    opened, ran = [], []
    real_init = OrtEngine.__init__

    def spy_init(self, model: Path, *args, **kwargs) -> None:
        opened.append(Path(model))
        real_init(self, model, *args, **kwargs)

    monkeypatch.setattr(OrtEngine, "__init__", spy_init)
    monkeypatch.setattr(OrtEngine, "run", lambda self, feeds: ran.append(feeds))
    out = tmp_path / "out"
    code = infer(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(folder),
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not match the manifest" in err and str(path) in err
    assert path not in opened and not ran
    assert not any(out.iterdir())
