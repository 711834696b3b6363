"""CMakeLists.txt: configure into a temporary folder and check the target graph and file dependencies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persense.runtime.backends.trt_engine import tensorrt_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("make") is None, reason="cmake and make are needed"
)


def configure(build: Path, *options: str) -> str:
    """Run cmake's configure step (Unix Makefiles) and return its output."""
    done = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            "-G",
            "Unix Makefiles",
            f"-DPERSENSE_PYTHON={sys.executable}",
            f"-DPERSENSE_ENGINES_DIR={build / 'engines'}",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def rules(build: Path, target: str) -> list[tuple[str, str]]:
    """(output, dependency) pairs of a target's generated build.make."""
    text = (build / "CMakeFiles" / f"{target}.dir" / "build.make").read_text()
    pairs = []
    for line in text.splitlines():
        if ": " in line and not line.startswith(("#", "\t")):
            out, dep = line.split(": ", 1)
            pairs.append((out.strip(), dep.strip()))
    return pairs


def depends(build: Path, target: str, output: str, dependency: str) -> bool:
    """Whether `target` rebuilds the file ending in `output` when the file ending in `dependency` changes."""
    return any(o.endswith(output) and d.endswith(dependency) for o, d in rules(build, target))


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A configured build of the tiny model and the configure output."""
    build = tmp_path_factory.mktemp("cmake_tiny")
    return build, configure(build, "-DPERSENSE_MODEL=tiny")


def test_targets_and_tensorrt_status(tiny_build: tuple[Path, str]) -> None:
    build, output = tiny_build
    help_text = subprocess.run(
        ["cmake", "--build", str(build), "--target", "help"], capture_output=True, text=True, check=True
    ).stdout
    targets = {line.removeprefix("... ").split()[0] for line in help_text.splitlines() if line.startswith("... ")}
    assert {"onnx", "fp16_sam_encoder", "fp16_sam_decoder", "parity", "test"} <= targets
    reason = tensorrt_unavailable_reason()
    if reason is None:
        assert {"trt_sam_encoder", "trt_sam_decoder"} <= targets
    else:
        assert not any(t.startswith("trt_") for t in targets)
        assert f"TensorRT engines not built: {reason}" in output


def test_file_dependencies(tiny_build: tuple[Path, str]) -> None:
    build, _ = tiny_build
    assert depends(build, "onnx", "engines/sam_encoder.onnx", "export/sam/graphs.py")
    assert depends(build, "onnx", "engines/sam_encoder.onnx", "export/sam/persam_decoder.py")  # one export command
    assert depends(build, "onnx", "engines/sam_decoder.onnx", "engines/sam_encoder.onnx")
    assert not depends(build, "onnx", "engines/sam_encoder.onnx", "export/precision/fp16.py")
    assert depends(build, "fp16_sam_encoder", "engines/sam_encoder_fp16.onnx", "engines/sam_encoder.onnx")
    assert depends(build, "fp16_sam_encoder", "engines/sam_encoder_fp16.onnx", "export/precision/fp16.py")
    assert not depends(build, "fp16_sam_encoder", "engines/sam_encoder_fp16.onnx", "engines/sam_decoder.onnx")


def test_ctest_runs_the_suite(tiny_build: tuple[Path, str]) -> None:
    build, _ = tiny_build
    listed = subprocess.run(["ctest", "-N", "--test-dir", str(build)], capture_output=True, text=True, check=True)
    assert "Test #1: pytest" in listed.stdout


def test_only_what_changed_is_rebuilt(tiny_build: tuple[Path, str]) -> None:
    build, _ = tiny_build
    engines = build / "engines"
    engines.mkdir(exist_ok=True)
    later = time.time() + 3600  # ONNX files newer than every source: only the FP16 step is out of date
    for name in ("sam_encoder.onnx", "sam_decoder.onnx"):
        (engines / name).write_bytes(b"")
        os.utime(engines / name, (later, later))
    dry = subprocess.run(["make", "-n", "fp16_sam_encoder"], cwd=build, capture_output=True, text=True, check=True)
    assert "persense.export.precision.fp16 --folder" in dry.stdout and "--name sam_encoder" in dry.stdout
    assert "persense.export.cli" not in dry.stdout and "--name sam_decoder" not in dry.stdout
    os.utime(engines / "sam_encoder.onnx", (0, 0))  # an ONNX file older than its sources is re-exported
    dry = subprocess.run(["make", "-n", "onnx"], cwd=build, capture_output=True, text=True, check=True)
    assert "persense.export.cli --model tiny" in dry.stdout and "--force" in dry.stdout


def test_the_checkpoint_is_a_dependency(tmp_path: Path) -> None:
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    checkpoint.write_bytes(b"not read at configure time")
    build = tmp_path / "build"
    configure(
        build,
        "-DPERSENSE_MODEL=vit_b",
        f"-DPERSENSE_CHECKPOINT={checkpoint}",
        "-DPERSENSE_FP16=OFF",
        "-DPERSENSE_TENSORRT=OFF",
    )
    assert depends(build, "onnx", "engines/sam_encoder.onnx", str(checkpoint))
    assert "--checkpoint" in (build / "CMakeFiles" / "onnx.dir" / "build.make").read_text()


def test_a_missing_checkpoint_disables_engine_targets_but_keeps_tests(tmp_path: Path) -> None:
    output = configure(tmp_path, "-DPERSENSE_MODEL=vit_h", f"-DPERSENSE_CHECKPOINT={tmp_path / 'missing.pth'}")
    assert "engine targets disabled" in output
    assert not (tmp_path / "CMakeFiles" / "onnx.dir").exists()
    assert (
        "Test #1: pytest"
        in subprocess.run(
            ["ctest", "-N", "--test-dir", str(tmp_path)], capture_output=True, text=True, check=True
        ).stdout
    )
