"""Helpers shared by the dataset-run tests: a tiny synthetic dataset, persense-eval --run as a process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from persense.runtime.datasets.synth import generate_dataset

SIZE = (320, 240)


def tiny_dataset(out: Path, classes: int, images: int) -> Path:
    """A small synthetic PerSense-D dataset (density maps in out/meta) at `out`."""
    generate_dataset(out, classes, images, (4, 6), size=SIZE, seed=3)
    return out


def eval_command(data: Path, pred: Path, engines: Path, *extra: str) -> list[str]:
    """persense-eval --run on the tiny engines with the dataset's own density maps (fast, deterministic)."""
    return [
        sys.executable,
        "-m",
        "persense.runtime.cli.eval",
        "--data",
        str(data),
        "--pred",
        str(pred),
        "--run",
        "--engines",
        str(engines),
        "--density-dir",
        str(data / "meta"),
        "--threads",
        "1",
        "-q",
        *extra,
    ]


def run_eval(data: Path, pred: Path, engines: Path, *extra: str) -> tuple[int, int]:
    """Run persense-eval --run to the end; (images segmented, images already done) from its summary line."""
    done = subprocess.run(eval_command(data, pred, engines, *extra), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    found = re.search(r"segmented (\d+) image\(s\), (\d+) already done, 0 failed", done.stderr)
    assert found, done.stderr
    return int(found[1]), int(found[2])


def predictions(pred: Path) -> dict[str, bytes]:
    """Every file under a prediction folder (hidden temp files included), by relative path, as bytes."""
    return {p.relative_to(pred).as_posix(): p.read_bytes() for p in sorted(pred.rglob("*")) if p.is_file()}
