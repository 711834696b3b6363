"""persense-infer --text and PerSense.segment(text=...): the detector's best box is the first exemplar as --box
is, and its "all <plural>" detections gate PPSM's points as the original's; the fallback when it finds nothing;
every user error as one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_detector import add_fixed_detector

from persense.runtime.api import PerSense
from persense.runtime.cli.infer import main as infer
from persense.runtime.errors import PersenseError
from persense.runtime.models.detector import sigmoid
from persense.runtime.pipeline.exemplars import box_centre

HALF = 20.0  # half the side of the fixed detector's best box, in pixels


def _target_box(scene) -> list[float]:
    """cxcywh (normalised) of a box around the scene's sixth disc."""
    height, width = scene["image"].shape[:2]
    x, y = scene["centres"][5]
    return [x / width, y / height, 2 * HALF / width, 2 * HALF / height]


@pytest.fixture(scope="module")
def text_engines(tiny_engines, scene, tmp_path_factory) -> Path:
    """The tiny SAM engines plus a fixed detector whose best query (logit 2.0) boxes the sixth disc."""
    other = [0.2, 0.3, 0.1, 0.1]
    return add_fixed_detector(
        tiny_engines,
        tmp_path_factory.mktemp("text") / "engines",
        [-4.0, 2.0, 1.0],
        [other, _target_box(scene), [0.7, 0.6, 0.2, 0.1]],
    )


@pytest.fixture(scope="module")
def blind_engines(tiny_engines, scene, tmp_path_factory) -> Path:
    """The tiny SAM engines plus a fixed detector that finds nothing (every token sigmoid 0.1497 < 0.15)."""
    return add_fixed_detector(
        tiny_engines,
        tmp_path_factory.mktemp("blind") / "engines",
        [-1.735, -3.0],
        [_target_box(scene), [0.5, 0.5, 0.2, 0.2]],
    )


def _infer(engines: Path, scene_files, out: Path, extra: list[str], capsys) -> tuple[int, dict | None, str]:
    """persense-infer on the scene (ground-truth density): exit code, result.json (if written), stderr."""
    code = infer(
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
            *extra,
        ]
    )
    err = capsys.readouterr().err
    result = out / "result.json"
    return code, json.loads(result.read_text()) if result.is_file() else None, err


def _expected_box(scene) -> np.ndarray:
    """The detector's best box in pixels, computed as the original does (float32 cxcywh * (W,H,W,H) -> xyxy)."""
    height, width = scene["image"].shape[:2]
    cxcywh = np.float32(_target_box(scene)) * np.float32([width, height, width, height])
    half = np.float32(0.5) * cxcywh[2:]
    return np.concatenate([cxcywh[:2] - half, cxcywh[:2] + half])


def test_text_starts_from_the_detectors_best_box_as_box_does(text_engines, scene_files, scene, tmp_path, capsys):
    code, by_text, err = _infer(text_engines, scene_files, tmp_path / "text", ["--text", "Red Apple"], capsys)
    assert code == 0 and "Traceback" not in err
    expected = _expected_box(scene)
    first = by_text["first_exemplar"]
    assert first["source"] == "text" and first["text"] == "Red Apple" and by_text["text"] == "Red Apple"
    assert first["detection"]["box"] == [float(v) for v in expected]
    assert first["detection"]["confidence"] == pytest.approx(float(sigmoid(np.float32(2.0))), abs=1e-7)
    assert first["detection"]["phrase"] == "red apple [SEP]"  # the original's phrase: tokens after [CLS], dots removed
    assert first["point"] == box_centre(expected.astype(np.float64)).tolist()
    assert "detector" in by_text["timings_ms"] and by_text["box"] is None

    # the second detection ("all red apples."): every query above box_threshold, in query order
    assert by_text["ppsm_gating"]["caption"] == "all red apples."
    assert by_text["ppsm_gating"]["boxes"][0] == first["detection"]["box"] and len(by_text["ppsm_gating"]["boxes"]) == 2

    box = ",".join(str(float(v)) for v in expected)
    code, by_box, _ = _infer(text_engines, scene_files, tmp_path / "box", [f"--box={box}"], capsys)
    assert code == 0 and by_box["first_exemplar"]["source"] == "box"
    assert by_box["first_exemplar"]["point"] == first["point"]
    assert by_box["ppsm_gating"]["boxes"] is None  # no text: no second detection, PPSM ungated


def test_nothing_detected_falls_back_to_the_similarity_arg_max(blind_engines, scene_files, tmp_path, capsys):
    code, fallback, err = _infer(blind_engines, scene_files, tmp_path / "text", ["--text", "apple"], capsys)
    assert code == 0
    message = "the detector found no 'apple.' above box_threshold 0.15; starting from the best-matching point instead"
    assert message in fallback["warnings"] and message in err
    assert fallback["first_exemplar"] == {
        "source": "similarity",
        "text": "apple",
        "detection": None,
        "point": fallback["first_exemplar"]["point"],
    }
    code, plain, _ = _infer(blind_engines, scene_files, tmp_path / "plain", [], capsys)
    assert code == 0 and plain["first_exemplar"] == {
        "source": "similarity",
        "point": fallback["first_exemplar"]["point"],
    }
    # no "all apples." box either: PPSM keeps nothing, so no feedback, and the second pass takes every IDM point
    assert fallback["ppsm_gating"] == {"caption": "all apples.", "boxes": []}
    assert fallback["first_pass_points"] == 0 and len(fallback["exemplars"]) == 1
    assert any(w.startswith("PPSM kept none of") for w in fallback["warnings"])
    assert len(fallback["points"]) >= len(plain["points"])


def test_box_and_text_are_mutually_exclusive(text_engines, scene_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _infer(text_engines, scene_files, tmp_path / "out", ["--text", "apple", "--box", "1,2,30,40"], capsys)
    assert exit_info.value.code == 2
    assert "argument --box: not allowed with argument --text" in capsys.readouterr().err


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("", "text prompt '' is empty"),
        ("   ", "text prompt '   ' is empty"),
        ("red €uro", "'€uro' not in the detector's vocabulary"),
        ("a " * 300, "is 303 tokens long; the detector takes at most 256"),
    ],
)
def test_bad_prompt_is_one_clear_line(prompt, message, text_engines, scene_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, result, err = _infer(text_engines, scene_files, out, ["--text", prompt], capsys)
    assert code == 2 and result is None and err.count("\n") == 1
    assert err.startswith("persense-infer: error: ") and message in err


def test_missing_detector_names_the_export_command(tiny_engines, scene_files, tmp_path, capsys):
    code, result, err = _infer(tiny_engines, scene_files, tmp_path / "out", ["--text", "apple"], capsys)
    assert code == 2 and result is None and err.count("\n") == 1
    assert (
        f"no Grounding DINO detector for --text; export it with `persense-export --detector grounding-dino "
        f"--out {tiny_engines}`" in err
    )


def test_tampered_tokenizer_is_refused(text_engines, scene_files, tmp_path, capsys):
    copy = tmp_path / "engines"
    shutil.copytree(text_engines, copy)
    tokenizer = copy / "grounding_dino_tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"apple"', '"apples"'))
    code, _, err = _infer(copy, scene_files, tmp_path / "out", ["--text", "apple"], capsys)
    assert code == 2 and "grounding_dino_tokenizer.json: sha256" in err and "does not match the manifest" in err


def test_gated_ppsm_matches_the_oracle(text_engines, tiny_sam, scene_files, scene):
    from persense.export.oracle.pipeline import OraclePipeline
    from persense.runtime.counters.base import NpyDensityCounter
    from persense.runtime.metrics import mask_iou

    ps = PerSense.open(text_engines, counter="npy", density=scene_files["density"], cache=False, threads=2)
    got = ps.segment(scene["image"], ps.reference(scene["image"], scene["reference"] > 0), text="apple")
    boxes = np.array(got.ppsm_gating["boxes"], np.float32)
    oracle = OraclePipeline(tiny_sam, NpyDensityCounter(scene_files["density"]))
    target = oracle.reference(scene["image"], scene["reference"] > 0)
    expected = oracle.segment(scene["image"], target, box=_expected_box(scene), gating_boxes=boxes)
    ungated = oracle.segment(scene["image"], target, box=_expected_box(scene))
    assert expected.first_pass_points < ungated.first_pass_points  # the gate removes points here
    np.testing.assert_array_equal(got.points, expected.points)
    assert got.first_pass_points == expected.first_pass_points
    assert mask_iou(got.union > 0, expected.union > 0) >= 0.99


def test_api_text_prompt(text_engines, scene_files, scene):
    ps = PerSense.open(text_engines, counter="npy", density=scene_files["density"], cache=False)
    reference = ps.reference(scene["image"], scene["reference"])
    result = ps.segment(scene["image"], reference, text="apple")
    assert result.first_exemplar["source"] == "text"
    assert result.first_exemplar["point"] == box_centre(_expected_box(scene).astype(np.float64)).tolist()
    with pytest.raises(PersenseError, match="as a box or as a text prompt, not both"):
        ps.segment(scene["image"], reference, box=[1, 2, 30, 40], text="apple")
    with pytest.raises(PersenseError, match="is empty"):
        ps.segment(scene["image"], reference, text=" ")


# ------------------------------------------------------------------- the exported tiny Grounding DINO (random weights)

DETECTOR_SEED = 3


@pytest.fixture(scope="module")
def dino_engines(tiny_engines, tmp_path_factory) -> Path:
    """The tiny SAM engines plus the grounding-dino-tiny detector exported by persense-export (random weights)."""
    from persense.export.cli import main as export

    folder = tmp_path_factory.mktemp("dino") / "engines"
    shutil.copytree(tiny_engines, folder)
    assert (
        export(
            [
                "--detector",
                "grounding-dino-tiny",
                "--random-weights",
                "--seed",
                str(DETECTOR_SEED),
                "--out",
                str(folder),
                "-q",
            ]
        )
        == 0
    )
    return folder


@pytest.fixture(scope="module")
def dino_torch(dino_engines):
    """transformers' GroundingDinoForObjectDetection with the weights the export used (same config and seed)."""
    from persense.export.grounding_dino.model import random_detector

    tokenizer = (dino_engines / "grounding_dino_tokenizer.json").read_text()
    return random_detector("grounding-dino-tiny", DETECTOR_SEED, tokenizer)


@pytest.mark.parametrize(
    "height,width,prompt",
    [(288, 384, "apple"), (700, 500, "red car"), (300, 1900, "person. bottle"), (31, 40, "orange")],
)
def test_detector_engine_matches_transformers(height, width, prompt, dino_engines, dino_torch):
    """The runtime detector (ONNX Runtime, numpy pre/post-processing) against transformers' PyTorch model run on the
    same pixel_values and tokens: logits within 1e-4 (they reach about +-15), boxes within 1e-5 (normalised)."""
    import torch

    from persense.runtime.manifest import load_manifest
    from persense.runtime.models.detector import GroundingDino, postprocess, preprocess

    detector = GroundingDino.from_manifest(load_manifest(dino_engines), "ort-cpu", 2)
    tokens = detector.encode_text(prompt)
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels = preprocess(image, detector.min_side)
    engine = detector.engine.run({"pixel_values": pixels, **tokens.feeds()})
    with torch.no_grad():
        out = dino_torch(**{k: torch.from_numpy(v) for k, v in {"pixel_values": pixels, **tokens.feeds()}.items()})
    logits = out.logits[0, :, : tokens.input_ids.shape[1]].numpy()
    assert np.isinf(out.logits[0, :, tokens.input_ids.shape[1] :].numpy()).all()  # transformers' -inf padding
    np.testing.assert_allclose(engine["logits"][0], logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(engine["boxes"][0], out.pred_boxes[0].numpy(), rtol=0, atol=1e-5)
    ours, theirs = (
        postprocess(engine["logits"][0], engine["boxes"][0], (height, width)),
        postprocess(logits, out.pred_boxes[0].numpy(), (height, width)),
    )
    assert ours.best() is not None and ours.best() == theirs.best()
    best = detector.best_box(image, tokens)
    np.testing.assert_allclose(best.box, theirs.boxes[theirs.best()], rtol=0, atol=1e-3)  # pixels
    assert best.confidence == pytest.approx(float(theirs.confidence[theirs.best()]), abs=1e-5)


def test_infer_text_on_a_synthetic_scene(dino_engines, tmp_path, capsys):
    from persense.runtime.datasets.synth import generate_dataset
    from persense.runtime.imageio import read_rgb
    from persense.runtime.manifest import load_manifest
    from persense.runtime.models.detector import GroundingDino

    generate_dataset(tmp_path / "data", classes=1, images=1, instances=(6, 8), size=(384, 288))
    (folder,) = (tmp_path / "data" / "Images").iterdir()
    word = folder.name.replace("_", " ")
    out = tmp_path / "out"
    code = infer(
        [
            str(folder / "01.jpg"),
            str(folder / "00.jpg"),
            str(folder / "00.png"),
            "--engines",
            str(dino_engines),
            "--out",
            str(out),
            "--text",
            word,
            "--threads",
            "2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    detector = GroundingDino.from_manifest(load_manifest(dino_engines), "ort-cpu", 2)
    expected = detector.best_box(read_rgb(folder / "01.jpg"), detector.encode_text(word))
    first = result["first_exemplar"]
    assert result["text"] == word and first["source"] == "text" and first["text"] == word
    assert first["detection"] == expected.summary()
    assert first["point"] == box_centre(expected.box.astype(np.float64)).tolist()
    assert result["timings_ms"]["detector"] > 0 and result["instances"] == len(result["points"])


def test_api_falls_back_when_the_real_detector_finds_nothing(dino_engines, scene):
    ps = PerSense.open(dino_engines, cache=False)
    reference = ps.reference(scene["image"], scene["reference"])
    assert ps.segment(scene["image"], reference, text="apple").first_exemplar["source"] == "text"
    ps.detector.box_threshold = 1.0  # no sigmoid exceeds it
    result = ps.segment(scene["image"], reference, text="apple")
    assert result.first_exemplar["source"] == "similarity" and result.first_exemplar["detection"] is None
    assert any(w.startswith("the detector found no 'apple.' above box_threshold 1.0") for w in result.warnings)
    plain = ps.segment(scene["image"], reference)
    assert np.array_equal(result.points, plain.points) and np.array_equal(result.union, plain.union)


def test_bench_detector_stage_runs_the_same_detector_in_both_pipelines(dino_engines, tiny_engines, scene):
    """persense-bench's `detector` stage: the runtime's engine and the oracle's PyTorch model rebuilt from the
    export's configuration and seed find the same best box (the stage times equal work on both sides)."""
    from persense.benchmarks.variants import ORACLES, RUNTIME_VARIANTS, WorkerSpec, detector_stage

    runs = [
        detector_stage(WorkerSpec(variant, "tiny", DETECTOR_SEED, dino_engines, None, "fixed", 2, None))
        for variant in (ORACLES["cpu"], RUNTIME_VARIANTS["ort-cpu-fp32"])
    ]
    (oracle_box, oracle_confidence), (runtime_box, runtime_confidence) = (run(scene["image"]) for run in runs)
    np.testing.assert_allclose(runtime_box, oracle_box, rtol=0, atol=1e-3)
    assert runtime_confidence == pytest.approx(oracle_confidence, abs=1e-5)
    assert (
        detector_stage(WorkerSpec(RUNTIME_VARIANTS["ort-cpu-fp32"], "tiny", 0, tiny_engines, None, "fixed", 2, None))
        is None
    )  # no detector exported: no stage
