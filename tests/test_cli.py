"""persense-infer and persense-export from the command line: outputs, and one clear line on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from persense.runtime.cli.infer import main as infer


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = infer(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_infer_writes_every_output(tiny_engines, scene_files, scene, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(tiny_engines),
            "--density",
            str(scene_files["density"]),
            "--out",
            str(out),
            "--overlay",
            "--json",
            "--threads",
            "2",
        ],
        capsys,
    )
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "result.json").read_text())
    mask = cv2.imread(str(out / "mask.png"), cv2.IMREAD_UNCHANGED)
    labels = cv2.imread(str(out / "instances.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == scene["image"].shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert labels.dtype == np.uint16 and labels.max() <= summary["instances"]
    assert np.array_equal(labels > 0, mask > 0)
    assert cv2.imread(str(out / "overlay.jpg")).shape[:2] == mask.shape
    assert summary["backend"] == "ort-cpu" and summary["counter"] == "npy" and summary["model_type"] == "tiny"
    assert len(summary["points"]) == summary["instances"] and len(summary["manifest"]) == 16
    assert not list(out.glob(".*.tmp"))


def test_infer_on_a_folder_encodes_the_reference_once(tiny_engines, scene_files, tmp_path, capsys):
    folder = tmp_path / "targets"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(scene_files["image"].read_bytes())
    out = tmp_path / "out"
    code, stdout, _ = _run(
        [
            str(folder),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(tiny_engines),
            "--density",
            str(scene_files["density"]),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and stdout.count("instances ->") == 2
    assert (
        json.loads((out / "a" / "result.json").read_text())["points"]
        == json.loads((out / "b" / "result.json").read_text())["points"]
    )


@pytest.fixture
def bad_inputs(tmp_path, scene_files):
    """Files a user can get wrong."""
    empty_mask = tmp_path / "empty.png"
    cv2.imwrite(str(empty_mask), np.zeros((288, 384), np.uint8))
    small_mask = tmp_path / "small.png"
    cv2.imwrite(str(small_mask), np.full((10, 10), 255, np.uint8))
    grey_mask = tmp_path / "grey.png"
    cv2.imwrite(str(grey_mask), (np.arange(288 * 384) % 7 * 30).astype(np.uint8).reshape(288, 384))
    zero_bytes = tmp_path / "zero.jpg"
    zero_bytes.write_bytes(b"")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    return {
        "empty_mask": empty_mask,
        "small_mask": small_mask,
        "grey_mask": grey_mask,
        "zero": zero_bytes,
        "not_image": not_image,
    }


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing_image", "no such file"),
        ("zero_image", "file is empty"),
        ("unreadable_image", "not a readable image"),
        ("empty_mask", "mask is empty"),
        ("size_mismatch", "must have the same size"),
        ("non_binary_mask", "not binary"),
        ("no_engines", "engines folder not found"),
        ("directory_as_reference", "is a directory"),
    ],
)
def test_infer_bad_input_is_one_clear_line(case, message, tiny_engines, scene_files, bad_inputs, tmp_path, capsys):
    image, mask, engines = str(scene_files["image"]), str(scene_files["mask"]), str(tiny_engines)
    args = {
        "missing_image": [str(tmp_path / "absent.jpg"), image, mask],
        "zero_image": [str(bad_inputs["zero"]), image, mask],
        "unreadable_image": [image, str(bad_inputs["not_image"]), mask],
        "empty_mask": [image, image, str(bad_inputs["empty_mask"])],
        "size_mismatch": [image, image, str(bad_inputs["small_mask"])],
        "non_binary_mask": [image, image, str(bad_inputs["grey_mask"])],
        "no_engines": [image, image, mask],
        "directory_as_reference": [image, str(tmp_path), mask],
    }[case]
    engines = str(tmp_path / "missing_engines") if case == "no_engines" else engines
    out = tmp_path / "out"
    code, _, err = _run(
        args + ["--engines", engines, "--density", str(scene_files["density"]), "--out", str(out)], capsys
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("persense-infer: error: ") and message in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_export_without_weights_says_where_they_go(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "persense.export.cli", "--model", "vit_h", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "put sam_vit_h_4b8939.pth in weights/" in done.stderr and "Traceback" not in done.stderr


def test_export_fp16_then_infer_with_the_fp16_models(tiny_engines, scene_files, tmp_path, capsys):
    import shutil

    from persense.export.cli import main as export

    folder = tmp_path / "engines"
    shutil.copytree(tiny_engines, folder)
    assert export(["--model", "tiny", "--seed", "0", "--out", str(folder), "--fp16", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "TensorRT engines not built:" in printed and printed.count("\n") == 2
    manifest = json.loads((folder / "manifest.json").read_text())["artefacts"]
    assert manifest["sam_encoder_fp16"]["precision"] == "fp16" and "fp16_error" in manifest["sam_decoder_fp16"]["extra"]
    code, stdout, _ = _run(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(folder),
            "--density",
            str(scene_files["density"]),
            "--precision",
            "fp16",
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--threads",
            "2",
        ],
        capsys,
    )
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["precision"] == "fp16"
    assert export(["--model", "tiny", "--seed", "0", "--out", str(folder), "-q"]) == 0  # a plain re-export
    assert "sam_decoder_fp16" in json.loads((folder / "manifest.json").read_text())["artefacts"]  # keeps them


def test_folder_run_survives_an_unreadable_file(tiny_engines, scene_files, tmp_path, capsys):
    folder = tmp_path / "targets"
    folder.mkdir()
    for name in ("a.jpg", "c.jpg"):
        (folder / name).write_bytes(scene_files["image"].read_bytes())
    (folder / "b.jpg").write_text("a text file renamed .jpg\n")
    out = tmp_path / "out"
    code, stdout, err = _run(
        [
            str(folder),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(tiny_engines),
            "--density",
            str(scene_files["density"]),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith(f"persense-infer: error: {folder / 'b.jpg'}: not a readable image")
    assert lines[1] == f"persense-infer: 2 of 3 targets segmented; 1 failed: {folder / 'b.jpg'}"
    for stem in ("a", "c"):
        assert {p.name for p in (out / stem).iterdir()} == {"mask.png", "instances.png", "result.json"}
    assert not (out / "b").exists() and stdout.count("instances ->") == 2


def test_box_starts_the_cascade_and_is_recorded(tiny_engines, scene_files, scene, tmp_path, capsys):
    x, y = scene["centres"][5]
    box = f"{x - 18},{y - 18},{x + 18},{y + 18}"
    code, stdout, _ = _run(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(tiny_engines),
            "--density",
            str(scene_files["density"]),
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--box",
            box,
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(stdout.strip().splitlines()[-1])["box"] == [x - 18, y - 18, x + 18, y + 18]


@pytest.mark.parametrize(
    "box,message",
    [
        ("1,2,3", "four numbers"),
        ("a,b,c,d", "four numbers"),
        ("50,50,40,60", "inverted or empty"),
        ("10,10,10,40", "inverted or empty"),
        ("-5,10,40,40", "not inside"),
        ("10,10,40,289", "not inside"),
    ],
)
def test_bad_box_is_one_clear_line(box, message, tiny_engines, scene_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(tiny_engines),
            "--density",
            str(scene_files["density"]),
            "--out",
            str(out),
            f"--box={box}",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith("persense-infer: error: ") and message in err
    assert not out.exists() or not any(out.rglob("*.*"))


def test_saved_reference_gives_the_same_results(tiny_engines, scene_files, tmp_path, capsys):
    saved = tmp_path / "apple.npz"
    common = ["--engines", str(tiny_engines), "--density", str(scene_files["density"]), "--json"]
    code, stdout, _ = _run(
        [str(scene_files["image"]), str(scene_files["mask"]), "--save-reference", str(saved), *common], capsys
    )  # no target: only encode and save
    assert code == 0 and saved.is_file() and not (tmp_path / "out").exists()
    code, stdout, _ = _run(
        [str(scene_files["image"]), "--reference", str(saved), "--out", str(tmp_path / "a"), *common], capsys
    )
    loaded = json.loads(stdout.strip().splitlines()[-1])
    code_b, stdout_b, _ = _run(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--out",
            str(tmp_path / "b"),
            *common,
        ],
        capsys,
    )
    direct = json.loads(stdout_b.strip().splitlines()[-1])
    assert code == code_b == 0 and loaded["points"] == direct["points"] and loaded["reference_file"] == str(saved)
    saved.write_bytes(saved.read_bytes()[:100])
    code, _, err = _run(
        [str(scene_files["image"]), "--reference", str(saved), "--out", str(tmp_path / "c"), *common], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "not a persense reference file" in err


@pytest.fixture
def encodes(monkeypatch) -> list[tuple[int, ...]]:
    """Every SamEngines.encode call of this test (the image shapes), in order."""
    from persense.runtime.models.sam import SamEngines

    calls: list[tuple[int, ...]] = []
    original = SamEngines.encode

    def counting(self, image):
        calls.append(image.shape)
        return original(self, image)

    monkeypatch.setattr(SamEngines, "encode", counting)
    return calls


def _infer_json(engines, scene_files, out, capsys, *extra) -> dict:
    """persense-infer on the scene (reference = the scene's first disc); its result.json, and stderr as `_stderr`."""
    code, stdout, stderr = _run(
        [
            str(scene_files["image"]),
            str(scene_files["image"]),
            str(scene_files["mask"]),
            "--engines",
            str(engines),
            "--density",
            str(scene_files["density"]),
            "--out",
            str(out),
            "--json",
            *extra,
        ],
        capsys,
    )
    assert code == 0
    return {**json.loads(stdout.strip().splitlines()[-1]), "_stderr": stderr}


def test_second_infer_with_the_same_reference_skips_its_encoding(tiny_engines, scene_files, tmp_path, capsys, encodes):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = _infer_json(tiny_engines, scene_files, tmp_path / "a", capsys, *cache)
    assert len(encodes) == 2 and first["reference_source"] == "encoded" and first["reference_encoding_ms"] > 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{first['reference_key']}.npz"]
    second = _infer_json(tiny_engines, scene_files, tmp_path / "b", capsys, *cache)
    assert len(encodes) == 3  # only the target: the reference came from the cache
    assert second["reference_source"] == "cache" and second["reference_encoding_ms"] == 0
    assert second["reference_key"] == first["reference_key"]
    assert second["points"] == first["points"] and second["scores"] == first["scores"]
    assert (tmp_path / "a" / "mask.png").read_bytes() == (tmp_path / "b" / "mask.png").read_bytes()
    again = _infer_json(tiny_engines, scene_files, tmp_path / "c", capsys, *cache, "--no-cache")
    assert len(encodes) == 5 and again["reference_source"] == "encoded" and again["reference_key"] is None
    assert again["points"] == first["points"]


def test_reexported_engines_miss_the_cache_and_encode_again(tiny_engines, scene_files, tmp_path, capsys, encodes):
    from persense.export.cli import main as export

    engines, cache = tmp_path / "engines", ["--cache-dir", str(tmp_path / "cache")]
    shutil.copytree(tiny_engines, engines)
    before = _infer_json(engines, scene_files, tmp_path / "a", capsys, *cache)
    assert export(["--model", "tiny", "--seed", "1", "--out", str(engines), "-q"]) == 0  # other weights
    capsys.readouterr()
    after = _infer_json(engines, scene_files, tmp_path / "b", capsys, *cache)
    assert after["manifest"] != before["manifest"] and after["reference_key"] != before["reference_key"]
    assert after["reference_source"] == "encoded" and len(encodes) == 4
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # the stale entry is never served


def test_a_broken_cache_never_fails_a_run(tiny_engines, scene_files, tmp_path, capsys, encodes):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unwritable = _infer_json(tiny_engines, scene_files, tmp_path / "a", capsys, "--cache-dir", str(blocker / "c"))
    assert unwritable["reference_source"] == "encoded" and "reference cache disabled" in unwritable["_stderr"]
    cache = tmp_path / "cache"
    first = _infer_json(tiny_engines, scene_files, tmp_path / "b", capsys, "--cache-dir", str(cache))
    entry = cache / f"{first['reference_key']}.npz"
    entry.write_bytes(entry.read_bytes()[:100])  # truncated: ignored, encoded again, rewritten
    second = _infer_json(tiny_engines, scene_files, tmp_path / "c", capsys, "--cache-dir", str(cache))
    assert second["reference_source"] == "encoded" and second["points"] == first["points"] == unwritable["points"]
    assert "ignoring" in second["_stderr"] and len(encodes) == 6
    assert (
        _infer_json(tiny_engines, scene_files, tmp_path / "d", capsys, "--cache-dir", str(cache))["reference_source"]
        == "cache"
    )
