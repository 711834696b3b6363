"""docs/ERRORS.md as tests: one case per catalogue row, each asserting the row's documented outcome.

An error row expects exit code 2, exactly one stderr line
`persense-<cmd>: error: ...` containing the documented text, no traceback and no output files. A
success row expects exit code 0, no error line, and the documented behaviour.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from persense.export.cli import main as export_main
from persense.runtime.cli.eval import main as eval_main
from persense.runtime.cli.infer import main as infer_main
from persense.runtime.cli.synth import main as synth_main
from persense.runtime.manifest import sha256_file

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"
PROGRAMS = {"infer": infer_main, "eval": eval_main, "export": export_main, "synth": synth_main}
HUGE = (9000, 12000)  # (H, W) of the huge target
MAX_HUGE_RSS = 3 * 1024**3
MANY = 1024  # candidate points of the "thousands" row (the stub decoder keeps it to seconds)


@dataclass
class Outcome:
    """What one command run left: exit code, captured stdout/stderr (file-descriptor level) and its --out."""

    code: int
    stdout: str
    stderr: str
    out: Path

    def result(self) -> dict:
        """The run's result.json."""
        return json.loads((self.out / "result.json").read_text())

    def image(self, name: str) -> np.ndarray:
        """An output image, unchanged."""
        return cv2.imread(str(self.out / name), cv2.IMREAD_UNCHANGED)


def expect_error(outcome: Outcome, command: str, text: str, code: int = 2) -> None:
    """Exit `code`, exactly one stderr line `persense-<command>: error: ...` with `text`, and nothing written."""
    lines = outcome.stderr.splitlines()
    assert outcome.code == code, outcome.stderr
    assert len(lines) == 1 and outcome.stderr.endswith("\n"), outcome.stderr
    assert lines[0].startswith(f"persense-{command}: error: ") and text in lines[0], lines[0]
    assert "Traceback" not in outcome.stderr
    written = [p for p in outcome.out.rglob("*") if p.is_file()] if outcome.out.is_dir() else []
    assert not written, written


def expect_success(outcome: Outcome, shape: tuple[int, int] | None = None) -> dict:
    """Exit 0, no error line, a complete set of outputs (of `shape` when given); returns result.json."""
    assert outcome.code == 0, outcome.stderr
    assert "error:" not in outcome.stderr and "Traceback" not in outcome.stderr
    result = outcome.result()
    mask, labels = outcome.image("mask.png"), outcome.image("instances.png")
    assert set(np.unique(mask)) <= {0, 255} and labels.dtype == np.uint16
    assert np.array_equal(mask > 0, labels > 0) and len(result["points"]) == result["instances"]
    if shape is not None:
        assert mask.shape == shape
    assert not [p for p in outcome.out.iterdir() if p.name.endswith(".tmp")]
    return result


def density_with_blocks(shape: tuple[int, int], centres: list[tuple[int, int]], value: float = 1.0) -> np.ndarray:
    """A density map with a 3x3 block of `value` at each (x, y): one IDM candidate per block."""
    density = np.zeros(shape, np.float32)
    for x, y in centres:
        density[y - 1 : y + 2, x - 1 : x + 2] = value
    return density


class Kit:
    """The files rows build on (scene, baseline density, tiny engines) and a way to run a command."""

    def __init__(self, root: Path, scene: dict, files: dict, engines: Path, baseline: Outcome, capfd) -> None:
        self.root, self.scene, self.files, self.engines, self.baseline = root, scene, files, engines, baseline
        self.capfd = capfd
        self.out = root / "out"
        self.density = root / "baseline_density.npy"
        np.save(self.density, baseline_density(scene))

    def path(self, name: str) -> Path:
        """A fresh path in the scratch folder."""
        return self.root / name

    def write_image(self, name: str, image: np.ndarray) -> Path:
        """Write an image (RGB when 3 channels, RGBA when 4) with OpenCV; returns its path."""
        path = self.path(name)
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
        assert cv2.imwrite(str(path), image)
        return path

    def save_density(self, name: str, density: np.ndarray) -> Path:
        """Save a density map as .npy."""
        path = self.path(name)
        np.save(path, density)
        return path

    def run(self, command: str, argv: list[str], out: Path | None = None) -> Outcome:
        """Run a command in this process, capturing file descriptors 1 and 2 (native codec output included)."""
        self.capfd.readouterr()
        code = PROGRAMS[command]([str(a) for a in argv])
        captured = self.capfd.readouterr()
        return Outcome(code, captured.out, captured.err, out or self.out)

    def infer(
        self,
        *paths: Path | str,
        extra: tuple = (),
        engines: Path | None = None,
        density: Path | None = None,
        out: Path | None = None,
    ) -> Outcome:
        """persense-infer on the given paths (default: scene image, scene image, scene mask)."""
        paths = paths or (self.files["image"], self.files["image"], self.files["mask"])
        out = out or self.out
        argv = [
            *paths,
            "--engines",
            engines or self.engines,
            "--density",
            density or self.density,
            "--out",
            out,
            "--threads",
            "2",
            *extra,
        ]
        return self.run("infer", argv, out)

    def same_as_baseline(self, outcome: Outcome) -> None:
        """The run found exactly the baseline's points and masks."""
        result = expect_success(outcome)
        assert result["points"] == self.baseline.result()["points"]
        assert np.array_equal(outcome.image("mask.png"), self.baseline.image("mask.png"))


def baseline_density(scene: dict) -> np.ndarray:
    """One candidate on the reference disc: a cheap run (five decoder prompts)."""
    x, y = scene["centres"][0].astype(int)
    return density_with_blocks(scene["image"].shape[:2], [(x, y)], 0.1)


@pytest.fixture(scope="module")
def baseline(tiny_engines, scene, scene_files, tmp_path_factory) -> Outcome:
    """persense-infer on the scene with the baseline density: what conversion rows must reproduce."""
    root = tmp_path_factory.mktemp("baseline")
    np.save(root / "density.npy", baseline_density(scene))
    out = root / "out"
    code = infer_main(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(tiny_engines),
            "--density",
            str(root / "density.npy"),
            "--out",
            str(out),
            "--threads",
            "2",
            "-q",
        ]
    )
    assert code == 0
    return Outcome(code, "", "", out)


@pytest.fixture
def kit(tmp_path, scene, scene_files, tiny_engines, baseline, capfd) -> Kit:
    """A Kit in a fresh scratch folder."""
    return Kit(tmp_path, scene, scene_files, tiny_engines, baseline, capfd)


def engines_copy(kit: Kit) -> Path:
    """A private copy of the tiny engines folder."""
    folder = kit.path("engines")
    shutil.copytree(kit.engines, folder)
    return folder


def edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    """Apply `edit` to folder/manifest.json."""
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rehash(folder: Path, name: str) -> None:
    """Make the manifest's sha256 of artefact `name` match its (altered) file again."""
    edit_manifest(folder, lambda d: d["artefacts"][name].update(sha256=sha256_file(folder / f"{name}.onnx")))


def stub_decoder_engines(kit: Kit) -> Path:
    """The tiny encoder with a stub decoder (same I/O; logits -1 everywhere): decodes cost microseconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = engines_copy(kit)
    spec = json.loads((folder / "manifest.json").read_text())["artefacts"]["sam_decoder"]

    def value_info(tensor: dict):
        return helper.make_tensor_value_info(tensor["name"], TensorProto.FLOAT, tensor["shape"])

    constants = {
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "mask_dims": np.array([256, 256], np.int64),
        "iou_dims": np.zeros(0, np.int64),
        "logit": np.full((1, 1, 1), -1.0, np.float32),
        "scores": np.array([0.4], np.float32),
    }
    nodes = [
        helper.make_node("Shape", ["point_coords"], ["coords_shape"]),
        helper.make_node("Slice", ["coords_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "mask_dims"], ["mask_shape"], axis=0),
        helper.make_node("Concat", ["batch", "iou_dims"], ["iou_shape"], axis=0),
        helper.make_node("Expand", ["logit", "mask_shape"], ["low_res_masks"]),
        helper.make_node("Expand", ["scores", "iou_shape"], ["iou_predictions"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stub_decoder",
        [value_info(t) for t in spec["inputs"]],
        [value_info(t) for t in spec["outputs"]],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "sam_decoder.onnx")
    rehash(folder, "sam_decoder")
    return folder


def run_measured(argv: list[str]) -> tuple[int, str, int]:
    """persense-infer in a child process: (exit code, stderr, peak resident memory in bytes)."""
    err_path = Path(argv[argv.index("--out") + 1]).with_suffix(".stderr")
    with open(err_path, "wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "persense.runtime.cli.infer", *argv], stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, err_path.read_text(), usage.ru_maxrss * 1024


ROWS: dict[str, Callable[[Kit], None]] = {}


def row(func: Callable[[Kit], None]) -> Callable[[Kit], None]:
    """Register a catalogue row under its function name."""
    ROWS[func.__name__] = func
    return func


# --- image files ------------------------------------------------------------------------------------------


@row
def missing_target(kit: Kit) -> None:
    expect_error(
        kit.infer(kit.path("absent.jpg"), kit.files["image"], kit.files["mask"]), "infer", "no such file or folder"
    )


@row
def zero_byte_image(kit: Kit) -> None:
    empty = kit.path("zero.jpg")
    empty.write_bytes(b"")
    expect_error(kit.infer(empty, kit.files["image"], kit.files["mask"]), "infer", "file is empty")


@row
def not_an_image(kit: Kit) -> None:
    text = kit.path("notes.jpg")
    text.write_text("hello")
    expect_error(kit.infer(kit.files["image"], text, kit.files["mask"]), "infer", "not a readable image")


@row
def truncated_png(kit: Kit) -> None:
    whole = kit.write_image("whole.png", kit.scene["image"]).read_bytes()
    cut = kit.path("cut.png")
    cut.write_bytes(whole[: len(whole) // 2])
    expect_error(
        kit.infer(cut, kit.files["image"], kit.files["mask"]),
        "infer",
        "not a readable image (truncated, corrupt or unsupported format) (libpng error",
    )


@row
def truncated_jpeg(kit: Kit) -> None:
    whole = kit.files["image"].read_bytes()
    cut = kit.path("cut.jpg")
    cut.write_bytes(whole[: len(whole) * 9 // 10])
    expect_error(kit.infer(cut, kit.files["image"], kit.files["mask"]), "infer", "not a readable image")


@row
def corrupt_jpeg_data(kit: Kit) -> None:
    data = bytearray(kit.files["image"].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = bytes([7]) * 200
    damaged = kit.path("damaged.jpg")
    damaged.write_bytes(bytes(data))
    outcome = kit.infer(damaged, kit.files["image"], kit.files["mask"])
    result = expect_success(outcome, kit.scene["image"].shape[:2])
    assert "the decoder reported a problem but read the image: Corrupt JPEG data" in result["warnings"][0]
    assert "WARNING" in outcome.stderr and "Corrupt JPEG data" in outcome.stderr


@row
def decompression_bomb(kit: Kit) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = kit.path("bomb.png")
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 50001))
        + chunk(b"IEND", b"")
    )
    expect_error(kit.infer(bomb, kit.files["image"], kit.files["mask"]), "infer", "more pixels than OpenCV allows")


@row
def directory_as_reference(kit: Kit) -> None:
    expect_error(kit.infer(kit.files["image"], kit.root, kit.files["mask"]), "infer", "is a directory")


@row
def folder_without_images(kit: Kit) -> None:
    folder = kit.path("no_images")
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    expect_error(kit.infer(folder, kit.files["image"], kit.files["mask"]), "infer", "folder contains no images")


@row
def float_tiff_target(kit: Kit) -> None:
    tiff = kit.write_image("float.tiff", kit.scene["image"].astype(np.float32))
    expect_error(kit.infer(tiff, kit.files["image"], kit.files["mask"]), "infer", "unsupported pixel type float32")


@row
def grayscale_target(kit: Kit) -> None:
    from persense.runtime.imageio import read_rgb

    grey = cv2.cvtColor(kit.scene["image"], cv2.COLOR_RGB2GRAY)
    path = kit.write_image("grey.png", grey)
    assert np.array_equal(read_rgb(path), np.repeat(grey[..., None], 3, axis=2))
    expect_success(kit.infer(path, kit.files["image"], kit.files["mask"]), grey.shape)


def decoded_jpeg(kit: Kit) -> np.ndarray:
    """The scene image as the baseline run decoded it (RGB)."""
    return cv2.cvtColor(cv2.imread(str(kit.files["image"])), cv2.COLOR_BGR2RGB)


@row
def rgba_reference(kit: Kit) -> None:
    pixels = decoded_jpeg(kit)
    alpha = np.random.default_rng(0).integers(0, 256, pixels.shape[:2], dtype=np.uint8)
    reference = kit.write_image("ref_rgba.png", np.dstack([pixels, alpha]))
    kit.same_as_baseline(kit.infer(kit.files["image"], reference, kit.files["mask"]))


@row
def sixteen_bit_target(kit: Kit) -> None:
    target = kit.write_image("deep.png", decoded_jpeg(kit).astype(np.uint16) * 257)
    kit.same_as_baseline(kit.infer(target, kit.files["image"], kit.files["mask"]))


@row
def exif_rotated_target(kit: Kit) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    target = kit.path("phone.jpg")
    Image.fromarray(kit.scene["image"]).save(target, exif=exif.tobytes())
    height, width = kit.scene["image"].shape[:2]
    expect_success(kit.infer(target, kit.files["image"], kit.files["mask"]), (width, height))


@row
def elongated_target(kit: Kit) -> None:
    target = kit.write_image("strip.png", np.full((3, 12000, 3), 90, np.uint8))
    expect_success(kit.infer(target, kit.files["image"], kit.files["mask"]), (3, 12000))


@row
def tiny_target(kit: Kit) -> None:
    target = kit.write_image("tiny.png", cv2.resize(kit.scene["image"], (8, 8), interpolation=cv2.INTER_AREA))
    density = kit.save_density("tiny.npy", density_with_blocks((8, 8), [(4, 4)]))
    result = expect_success(kit.infer(target, kit.files["image"], kit.files["mask"], density=density), (8, 8))
    assert result["instances"] == 1


@row
def huge_target(kit: Kit) -> None:
    target = kit.path("huge.jpg")
    big = cv2.resize(kit.scene["image"], HUGE[::-1], interpolation=cv2.INTER_NEAREST)
    assert cv2.imwrite(str(target), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    del big
    density = kit.save_density("huge.npy", baseline_density(kit.scene))
    code, stderr, peak = run_measured(
        [
            target,
            kit.files["image"],
            kit.files["mask"],
            "--engines",
            kit.engines,
            "--density",
            density,
            "--out",
            kit.out,
            "--threads",
            "2",
            "-q",
        ]
    )
    assert code == 0 and stderr == "", stderr
    assert peak < MAX_HUGE_RSS, f"peak RSS {peak / 1024**3:.2f} GiB"
    expect_success(Outcome(code, "", stderr, kit.out), HUGE)


# --- reference masks --------------------------------------------------------------------------------------


@row
def palette_mask(kit: Kit) -> None:
    from PIL import Image

    indexed = Image.fromarray((kit.scene["reference"] > 0).astype(np.uint8), mode="P")
    indexed.putpalette([255, 255, 255, 0, 128, 0])  # index 0 white, index 1 green: no red channel at all
    mask = kit.path("palette.png")
    indexed.save(mask)
    kit.same_as_baseline(kit.infer(kit.files["image"], kit.files["image"], mask))


@row
def non_binary_mask(kit: Kit) -> None:
    grey = (np.arange(kit.scene["reference"].size) % 7 * 30).astype(np.uint8).reshape(kit.scene["reference"].shape)
    expect_error(
        kit.infer(kit.files["image"], kit.files["image"], kit.write_image("grey.png", grey)),
        "infer",
        "mask is not binary (7 distinct values)",
    )


@row
def empty_mask(kit: Kit) -> None:
    empty = kit.write_image("empty.png", np.zeros_like(kit.scene["reference"]))
    expect_error(kit.infer(kit.files["image"], kit.files["image"], empty), "infer", "mask is empty")


@row
def all_ones_mask(kit: Kit) -> None:
    full = kit.write_image("full.png", np.full_like(kit.scene["reference"], 255))
    expect_success(kit.infer(kit.files["image"], kit.files["image"], full), kit.scene["image"].shape[:2])


@row
def mask_size_mismatch(kit: Kit) -> None:
    small = kit.write_image("small.png", np.full((10, 10), 255, np.uint8))
    expect_error(
        kit.infer(kit.files["image"], kit.files["image"], small),
        "infer",
        "mask is 10x10 but the reference image is 384x288; they must have the same size",
    )


@row
def mask_too_small(kit: Kit) -> None:
    dot = np.zeros_like(kit.scene["reference"])
    dot[0, 0] = 255
    expect_error(
        kit.infer(kit.files["image"], kit.files["image"], kit.write_image("dot.png", dot)),
        "infer",
        "reference mask is too small",
    )


def prompted(kit: Kit, *flags: str) -> Outcome:
    """persense-infer TARGET REF with a reference prompt instead of REF_MASK (the scene image as both)."""
    return kit.infer(kit.files["image"], kit.files["image"], extra=flags)


@row
def ref_box_outside_image(kit: Kit) -> None:
    expect_error(
        prompted(kit, "--ref-box", "10,10,500,100"),
        "infer",
        "reference box [10.0, 10.0, 500.0, 100.0] is not inside the 384x288 reference image",
    )


@row
def ref_box_inverted(kit: Kit) -> None:
    expect_error(prompted(kit, "--ref-box", "100,100,50,150"), "infer", "is inverted or empty: it needs x0 < x1")


@row
def ref_box_malformed(kit: Kit) -> None:
    expect_error(prompted(kit, "--ref-box", "1,2,3"), "infer", "--ref-box expects 4 numbers x0,y0,x1,y1")


@row
def ref_point_outside_image(kit: Kit) -> None:
    expect_error(
        prompted(kit, "--ref-point", "10,300"), "infer", "reference point (10, 300) is outside the 384x288 reference"
    )


@row
def ref_label_count_mismatch(kit: Kit) -> None:
    expect_error(
        prompted(kit, "--ref-point", "10,10", "--ref-point", "20,20", "--ref-label", "1"),
        "infer",
        "got 1 point labels for 2 reference points; give one label per point",
    )


@row
def ref_background_points_only(kit: Kit) -> None:
    expect_error(
        prompted(kit, "--ref-point", "10,10", "--ref-label", "0"),
        "infer",
        "a reference prompt needs a box or at least one point on the object (label 1)",
    )


@row
def ref_prompt_with_mask(kit: Kit) -> None:
    expect_error(
        kit.infer(kit.files["image"], kit.files["image"], kit.files["mask"], extra=("--ref-box", "1,1,50,50")),
        "infer",
        "is a mask: --ref-box and --ref-point replace REF_MASK",
    )


@row
def ref_prompt_with_saved_reference(kit: Kit) -> None:
    expect_error(
        prompted(kit, "--ref-box", "1,1,50,50", "--reference", str(kit.path("saved.npz"))),
        "infer",
        "--ref-box and --ref-point encode a reference from REF; --reference names a saved one",
    )


# --- paths and outputs ------------------------------------------------------------------------------------


@row
def non_ascii_space_paths(kit: Kit) -> None:
    folder = kit.path("données 图像 ✓ dir")
    folder.mkdir()
    image, mask = folder / "cible é.jpg", folder / "masque ü.png"
    shutil.copy(kit.files["image"], image)
    shutil.copy(kit.files["mask"], mask)
    engines = folder / "moteurs ß"
    shutil.copytree(kit.engines, engines)
    density = folder / "densité.npy"
    shutil.copy(kit.density, density)
    outcome = kit.infer(image, image, mask, engines=engines, density=density, out=folder / "sortie ñ")
    kit.same_as_baseline(outcome)


@row
def out_is_a_file(kit: Kit) -> None:
    blocker = kit.path("out.txt")
    blocker.write_text("not a folder")
    outcome = kit.infer(out=blocker)
    expect_error(Outcome(outcome.code, outcome.stdout, outcome.stderr, kit.out), "infer", "output folder is a file")
    assert blocker.read_text() == "not a folder"


@row
def out_not_writable(kit: Kit) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; out_is_a_file covers the check")
    locked = kit.path("locked")
    locked.mkdir(mode=0o500)
    expect_error(kit.infer(out=locked / "out"), "infer", "cannot write to the output folder (Permission denied)")


@row
def duplicate_target_names(kit: Kit) -> None:
    for name in ("a", "b"):
        kit.path(name).mkdir()
        shutil.copy(kit.files["image"], kit.path(name) / "scene.jpg")
    expect_error(
        kit.infer(kit.path("a") / "scene.jpg", kit.path("b") / "scene.jpg", kit.files["image"], kit.files["mask"]),
        "infer",
        "would both write to",
    )


@row
def too_few_paths(kit: Kit) -> None:
    expect_error(kit.infer(kit.files["image"], kit.files["mask"]), "infer", "expected at least three paths")


@row
def zero_threads(kit: Kit) -> None:
    outcome = kit.run(
        "infer",
        [
            kit.files["image"],
            kit.files["image"],
            kit.files["mask"],
            "--engines",
            kit.engines,
            "--out",
            kit.out,
            "--threads",
            "0",
        ],
    )
    expect_error(outcome, "infer", "--threads must be at least 1, got 0")


@row
def box_outside_image(kit: Kit) -> None:
    expect_error(kit.infer(extra=("--box", "300,200,400,280")), "infer", "is not inside the 384x288 target image")


@row
def box_inverted(kit: Kit) -> None:
    expect_error(kit.infer(extra=("--box", "50,50,40,60")), "infer", "is inverted or empty")


@row
def box_degenerate(kit: Kit) -> None:
    expect_error(kit.infer(extra=("--box", "10,10,10,40")), "infer", "is inverted or empty")


@row
def box_not_four_numbers(kit: Kit) -> None:
    expect_error(kit.infer(extra=("--box", "10,10,40")), "infer", "--box expects four numbers x0,y0,x1,y1")


def text_engines(kit: Kit, query_logits: list[float]) -> Path:
    """The tiny engines plus a fixed-output detector (tests/fake_detector.py) boxing the reference disc."""
    from fake_detector import add_fixed_detector

    (x, y), (height, width) = kit.scene["centres"][0], kit.scene["image"].shape[:2]
    return add_fixed_detector(kit.engines, kit.path("engines"), query_logits, [[x / width, y / height, 0.1, 0.1]])


@row
def text_detector_missing(kit: Kit) -> None:
    expect_error(
        kit.infer(extra=("--text", "apple")),
        "infer",
        "no Grounding DINO detector for --text; export it with `persense-export --detector grounding-dino",
    )


@row
def plusplus_feature_engine_missing(kit: Kit) -> None:
    expect_error(
        kit.infer(extra=("--method", "persense++")),
        "infer",
        f"{kit.engines}: no ResNet-50 feature engine for --method persense++; export it with "
        f"`persense-export --method persense++ --out {kit.engines}`",
    )


@row
def plusplus_text_detector_missing(kit: Kit) -> None:
    from fake_features import add_constant_feature_engine

    engines = engines_copy(kit)
    add_constant_feature_engine(engines)
    expect_error(
        kit.infer(extra=("--method", "persense++", "--text", "apple"), engines=engines),
        "infer",
        "no Grounding DINO detector for --text; export it with `persense-export --detector grounding-dino",
    )


@row
def text_empty_prompt(kit: Kit) -> None:
    expect_error(kit.infer(extra=("--text", "  "), engines=text_engines(kit, [2.0])), "infer", "is empty")


@row
def text_unknown_word(kit: Kit) -> None:
    expect_error(
        kit.infer(extra=("--text", "€uro"), engines=text_engines(kit, [2.0])),
        "infer",
        "'€uro' not in the detector's vocabulary",
    )


@row
def text_prompt_too_long(kit: Kit) -> None:
    expect_error(
        kit.infer(extra=("--text", "a " * 300), engines=text_engines(kit, [2.0])),
        "infer",
        "is 303 tokens long; the detector takes at most 256",
    )


@row
def text_nothing_detected(kit: Kit) -> None:
    outcome = kit.infer(extra=("--text", "apple"), engines=text_engines(kit, [-3.0]))
    kit.same_as_baseline(outcome)
    warning = "the detector found no 'apple.' above box_threshold 0.15; starting from the best-matching point instead"
    assert warning in outcome.result()["warnings"] and warning in outcome.stderr
    assert outcome.result()["first_exemplar"]["source"] == "similarity"
    assert outcome.result()["ppsm_gating"] == {"caption": "all apples.", "boxes": []}
    assert any(w.startswith("PPSM kept none of") for w in outcome.result()["warnings"])


@row
def folder_with_unreadable_file(kit: Kit) -> None:
    folder = kit.path("targets")
    folder.mkdir()
    for name in ("a.jpg", "c.jpg"):
        shutil.copy(kit.files["image"], folder / name)
    (folder / "b.jpg").write_text("a text file named .jpg\n")
    outcome = kit.infer(folder, kit.files["image"], kit.files["mask"], extra=("-q",))  # -q: no warning lines
    lines = outcome.stderr.splitlines()
    assert outcome.code == 1 and len(lines) == 2 and "Traceback" not in outcome.stderr, outcome.stderr
    assert lines[0].startswith(f"persense-infer: error: {folder / 'b.jpg'}: not a readable image")
    assert lines[1] == f"persense-infer: 2 of 3 targets segmented; 1 failed: {folder / 'b.jpg'}"
    for stem in ("a", "c"):
        kit.same_as_baseline(Outcome(0, outcome.stdout, "", kit.out / stem))
    assert not (kit.out / "b").exists()


@row
def reference_file_corrupt(kit: Kit) -> None:
    saved = kit.path("apple.npz")
    saved.write_text("not a reference")
    expect_error(kit.infer(kit.files["image"], extra=("--reference", saved)), "infer", "not a persense reference file")


@row
def reference_file_other_engines(kit: Kit) -> None:
    from persense.runtime.api import Reference
    from persense.runtime.pipeline.prior import Target

    unit = np.full(256, 1 / 16, np.float32)
    saved = Reference(Target(unit, unit), "0123456789abcdef", "fp32", "ort-cpu").save(kit.path("apple.npz"))
    expect_error(
        kit.infer(kit.files["image"], extra=("--reference", saved)),
        "infer",
        "the reference was encoded by other engines",
    )


# --- engines ----------------------------------------------------------------------------------------------


@row
def engines_missing(kit: Kit) -> None:
    expect_error(kit.infer(engines=kit.path("nowhere")), "infer", "engines folder not found")


@row
def manifest_missing(kit: Kit) -> None:
    folder = engines_copy(kit)
    (folder / "manifest.json").unlink()
    expect_error(kit.infer(engines=folder), "infer", "no manifest; re-export with `persense-export")


@row
def manifest_not_json(kit: Kit) -> None:
    folder = engines_copy(kit)
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    expect_error(kit.infer(engines=folder), "infer", "unreadable manifest")


@row
def manifest_from_other_model(kit: Kit) -> None:
    folder = engines_copy(kit)

    def as_vit_h(data: dict) -> None:  # what a vit_h folder's manifest says about its own files
        data["model_type"] = "vit_h"
        for index, artefact in enumerate(data["artefacts"].values()):
            artefact.update(model_type="vit_h", sha256=f"{index:064x}")

    edit_manifest(folder, as_vit_h)
    expect_error(kit.infer(engines=folder), "infer", "does not match the manifest")


@row
def onnx_swapped(kit: Kit) -> None:
    folder = engines_copy(kit)
    encoder, decoder = folder / "sam_encoder.onnx", folder / "sam_decoder.onnx"
    data = encoder.read_bytes()
    encoder.write_bytes(decoder.read_bytes())
    decoder.write_bytes(data)
    expect_error(kit.infer(engines=folder), "infer", "does not match the manifest")


@row
def onnx_truncated(kit: Kit) -> None:
    folder = engines_copy(kit)
    decoder = folder / "sam_decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[:100_000])
    expect_error(kit.infer(engines=folder), "infer", "does not match the manifest")


@row
def onnx_truncated_rehashed(kit: Kit) -> None:
    folder = engines_copy(kit)
    decoder = folder / "sam_decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[:100_000])
    rehash(folder, "sam_decoder")
    expect_error(kit.infer(engines=folder), "infer", "ONNX Runtime cannot load it")


@row
def precision_not_exported(kit: Kit) -> None:
    outcome = kit.infer(extra=("--precision", "fp16"))
    expect_error(outcome, "infer", "manifest has no 'sam_encoder_fp16' artefact; `")
    expect_error(outcome, "infer", " --fp16` (with the folder's --model) adds it")


@row
def backend_unavailable(kit: Kit) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    expect_error(kit.infer(extra=("--backend", "ort-cuda")), "infer", "ONNX Runtime has no CUDA provider")


# --- density maps and candidate points --------------------------------------------------------------------


@row
def density_zeros(kit: Kit) -> None:
    zeros = kit.save_density("zeros.npy", np.zeros(kit.scene["image"].shape[:2], np.float32))
    outcome = kit.infer(density=zeros)
    result = expect_success(outcome)
    message = "no instance found: the counter's density map gave no candidate point"
    assert result["instances"] == 0 and not outcome.image("mask.png").any()
    assert message in result["warnings"] and f"WARNING persense.runtime.pipeline.flow: {message}" in outcome.stderr


def _non_finite(kit: Kit, bad: float) -> None:
    density = np.load(kit.density)
    density[5, 5] = bad
    expect_error(kit.infer(density=kit.save_density("bad.npy", density)), "infer", "contains NaN or infinite values")


@row
def density_nan(kit: Kit) -> None:
    _non_finite(kit, np.nan)


@row
def density_inf(kit: Kit) -> None:
    _non_finite(kit, np.inf)


@row
def density_missing(kit: Kit) -> None:
    expect_error(kit.infer(density=kit.path("absent.npy")), "infer", "density file not found")


@row
def density_not_npy(kit: Kit) -> None:
    text = kit.path("density.npy")
    text.write_text("0 1 2")
    expect_error(kit.infer(density=text), "infer", "not a readable .npy array")


@row
def density_npz(kit: Kit) -> None:
    archive = kit.path("density.npz")
    np.savez(archive, density=np.load(kit.density))
    expect_error(kit.infer(density=archive), "infer", "is an .npz archive")


@row
def density_3d(kit: Kit) -> None:
    stacked = kit.save_density("stacked.npy", np.stack([np.load(kit.density)] * 2))
    expect_error(kit.infer(density=stacked), "infer", "density map must be 2-D (H, W), got shape (2, 288, 384)")


@row
def density_text_dtype(kit: Kit) -> None:
    expect_error(
        kit.infer(density=kit.save_density("words.npy", np.array([["a", "b"], ["c", "d"]]))),
        "infer",
        "density map must hold real numbers",
    )


@row
def all_points_rejected(kit: Kit) -> None:
    height, width = kit.scene["image"].shape[:2]
    corners = kit.save_density(
        "corners.npy", density_with_blocks((height, width), [(5, 5), (width - 6, height - 6)], 0.1)
    )  # count 2 -> tau = S_max / sqrt(2)
    outcome = kit.infer(density=corners)
    result = expect_success(outcome)
    message = "PPSM kept none of 2 candidate points; using all of them (as the original)"
    assert result["instances"] == 2 and result["first_pass_points"] == 0
    assert message in result["warnings"] and message in outcome.stderr


@row
def thousands_of_candidates(kit: Kit) -> None:
    cell = np.zeros((9, 12), np.float32)
    cell[3:6, 4:7] = 1.0
    density = kit.save_density("many.npy", np.tile(cell, (32, 32)))  # 32 x 32 = 1024 separate blocks
    engines = stub_decoder_engines(kit)
    code, stderr, peak = run_measured(
        [
            kit.files["image"],
            kit.files["image"],
            kit.files["mask"],
            "--engines",
            engines,
            "--density",
            density,
            "--out",
            kit.out,
            "--threads",
            "2",
            "-q",
        ]
    )
    result = expect_success(Outcome(code, "", stderr, kit.out))
    assert result["instances"] == MANY and result["first_pass_points"] == MANY
    assert result["decoder_prompts"] == 2 + 3 * MANY
    assert f"{MANY} feedback point(s) gave an empty mask and were skipped" in result["warnings"]
    assert peak < 4 * 1024**3, f"peak RSS {peak / 1024**3:.2f} GiB"


# --- persense-export --------------------------------------------------------------------------------------


@row
def export_wrong_checkpoint_for_model(kit: Kit) -> None:
    import torch

    from persense.export.sam.build import random_sam

    checkpoint = kit.path("tiny.pth")
    torch.save(random_sam("tiny", 0).state_dict(), checkpoint)
    expect_error(
        kit.run("export", ["--model", "vit_b", "--checkpoint", checkpoint, "--out", kit.out]),
        "export",
        "this is a tiny SAM checkpoint but --model is vit_b; pass --model tiny",
    )


@row
def export_truncated_checkpoint(kit: Kit) -> None:
    import torch

    from persense.export.sam.build import random_sam

    checkpoint = kit.path("sam_vit_b_01ec64.pth")
    torch.save(random_sam("tiny", 0).state_dict(), checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:20_000])
    expect_error(
        kit.run("export", ["--model", "vit_b", "--checkpoint", checkpoint, "--out", kit.out]),
        "export",
        "not a readable PyTorch checkpoint",
    )


@row
def export_missing_checkpoint(kit: Kit) -> None:
    absent = kit.path("absent.pth")
    expect_error(
        kit.run("export", ["--model", "vit_b", "--checkpoint", absent, "--out", kit.out]),
        "export",
        f"{absent}: checkpoint not found",
    )


@row
def export_vit_t_checkpoint_wrong_key(kit: Kit) -> None:
    import torch

    from persense.export.sam.build import random_sam

    state = random_sam("vit_t", 0).state_dict()
    key = "image_encoder.layers.1.blocks.0.attn.attention_biases"
    state["image_encoder.layers.1.blocks.0.attn.bias_table"] = state.pop(key)
    checkpoint = kit.path("mobile_sam.pt")
    torch.save(state, checkpoint)
    expect_error(
        kit.run("export", ["--model", "vit_t", "--checkpoint", checkpoint, "--out", kit.out]),
        "export",
        f"does not fit SAM vit_t: missing {key}; unexpected image_encoder.layers.1.blocks.0.attn.bias_table",
    )


@row
def export_gpu_encoder_vit_t(kit: Kit) -> None:
    expect_error(
        kit.run("export", ["--model", "vit_t", "--random-weights", "--gpu-encoder", "--out", kit.out]),
        "export",
        "--gpu-encoder fuses the global attention of SAM's ViT encoders; vit_t's TinyViT has only small windows",
    )


@row
def export_feature_checkpoint_wrong_key(kit: Kit) -> None:
    import torch

    from persense.export.features.resnet import build_resnet

    checkpoint = kit.path("resnet50-0676ba61.pth")
    torch.save({**build_resnet(seed=0).state_dict(), "head.weight": torch.zeros(1)}, checkpoint)
    expect_error(
        kit.run("export", ["--method", "persense++", "--feature-checkpoint", checkpoint, "--out", kit.out]),
        "export",
        f"{checkpoint}: not a torchvision ResNet-50 state dict: unexpected key 'head.weight'",
    )


@row
def export_feature_checkpoint_missing(kit: Kit) -> None:
    absent = kit.path("absent-resnet50.pth")
    expect_error(
        kit.run("export", ["--method", "persense++", "--feature-checkpoint", absent, "--out", kit.out]),
        "export",
        f"{absent}: feature checkpoint not found",
    )


@row
def export_feature_weights_absent(kit: Kit) -> None:
    from unittest import mock

    torch_home = kit.path("torch_home")
    with mock.patch.dict(os.environ, {"TORCH_HOME": str(torch_home)}):
        outcome = kit.run("export", ["--method", "persense++", "--out", kit.out])
    expect_error(
        outcome,
        "export",
        f"no ResNet-50 weights for --method persense++: put torchvision's resnet50-0676ba61.pth "
        f"(https://download.pytorch.org/models/resnet50-0676ba61.pth) in {torch_home}/hub/checkpoints/, "
        f"pass --feature-checkpoint PATH, or use --random-weights",
    )


# --- persense-eval ----------------------------------------------------------------------------------------


def eval_run(kit: Kit, data: Path, pred: Path, *extra: str) -> Outcome:
    """persense-eval with a --json report in kit.out."""
    return kit.run("eval", ["--data", data, "--pred", pred, "--json", kit.out / "report.json", *extra])


@row
def eval_data_missing(kit: Kit) -> None:
    expect_error(eval_run(kit, kit.path("nodata"), kit.path("nopred")), "eval", "no such folder")


@row
def eval_pred_missing(kit: Kit) -> None:
    dataset = build_dataset(kit)
    expect_error(eval_run(kit, dataset / "data", kit.path("nopred")), "eval", "no such prediction folder")


@row
def eval_prediction_wrong_size(kit: Kit) -> None:
    dataset = build_dataset(kit)
    cv2.imwrite(str(next((dataset / "pred").glob("*/01.png"))), np.zeros((10, 10), np.uint8))
    expect_error(eval_run(kit, dataset / "data", dataset / "pred"), "eval", "size mismatch")


@row
def eval_prediction_unreadable(kit: Kit) -> None:
    dataset = build_dataset(kit)
    next((dataset / "pred").glob("*/01.png")).write_text("not a png")
    expect_error(eval_run(kit, dataset / "data", dataset / "pred"), "eval", "not a readable image")


@row
def eval_run_without_engines(kit: Kit) -> None:
    dataset = build_dataset(kit)
    expect_error(
        eval_run(kit, dataset / "data", dataset / "pred", "--run", "--engines", str(kit.path("nowhere"))),
        "eval",
        "engines folder not found",
    )


@row
def eval_run_unreadable_image(kit: Kit) -> None:
    dataset = build_dataset(kit)
    image = next((dataset / "data" / "Images").glob("*/01.jpg"))
    image.write_text("a text file named .jpg")
    prediction = dataset / "pred" / image.parent.name / "01.png"
    prediction.unlink()
    outcome = eval_run(
        kit,
        dataset / "data",
        dataset / "pred",
        "--run",
        "--engines",
        str(kit.engines),
        "--density-dir",
        str(dataset / "data" / "meta"),
    )
    assert outcome.code == 1 and "Traceback" not in outcome.stderr, outcome.stderr
    assert f"persense-eval: error: {image}: not a readable image" in outcome.stderr
    assert (
        "segmented 0 image(s), 1 already done, 1 failed (no prediction written: the next --run tries them again)"
        in outcome.stderr
    )
    assert not prediction.exists() and (kit.out / "report.json").is_file()


def build_dataset(kit: Kit) -> Path:
    """A one-class synthetic dataset (reference 00 and one image) with perfect predictions beside it."""
    from persense.runtime.datasets.synth import generate_dataset

    root = kit.path("dataset")
    generate_dataset(root / "data", classes=1, images=1, instances=(3, 4), size=(128, 96))
    for mask in (root / "data" / "Images").glob("*/*.png"):
        (root / "pred" / mask.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(mask, root / "pred" / mask.parent.name / mask.name)
    return root


# --- persense-synth ---------------------------------------------------------------------------------------


@row
def synth_out_is_file(kit: Kit) -> None:
    blocker = kit.path("blocker")
    blocker.write_text("a file")
    outcome = kit.run("synth", ["--out", blocker, "--classes", "1", "--images", "1", "--instances", "3..4"])
    expect_error(outcome, "synth", "Not a directory", code=2)


@row
def synth_zero_classes(kit: Kit) -> None:
    outcome = kit.run("synth", ["--out", kit.out, "--classes", "0", "--images", "1", "--instances", "3..4"])
    expect_error(outcome, "synth", "--classes must be at least 1", code=2)


@pytest.mark.parametrize("name", list(ROWS))
def test_catalogue_row(name: str, kit: Kit) -> None:
    ROWS[name](kit)


def test_every_row_is_documented_and_tested() -> None:
    documented = re.findall(r"^\| `([a-z0-9_]+)` \|", ERRORS_MD.read_text(), flags=re.MULTILINE)
    assert documented == list(ROWS)
    assert len(ROWS) >= 25


# --- logging levels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,shown,hidden",
    [
        ("-q", [], ["WARNING", "INFO"]),
        ("-v", ["WARNING persense.runtime.pipeline.flow: no instance found", "INFO persense.infer: [1/1]"], []),
    ],
)
def test_log_levels_and_warnings_in_result_json(flag: str, shown: list[str], hidden: list[str], kit: Kit) -> None:
    zeros = kit.save_density("zeros.npy", np.zeros(kit.scene["image"].shape[:2], np.float32))
    outcome = kit.infer(density=zeros, extra=(flag,))
    result = expect_success(outcome)
    assert "no instance found: the counter's density map gave no candidate point" in result["warnings"]
    assert all(text in outcome.stderr for text in shown) and not any(text in outcome.stderr for text in hidden)
