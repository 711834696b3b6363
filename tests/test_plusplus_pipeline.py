"""PerSense++ in the runtime (`PerSense.open(method="persense++")`) against its PyTorch oracle (OraclePlusPlus) on
the same SAM, ResNet-50 and density map: the same points at every stage, the same exemplars, the same IMRM
decisions, union IoU >= 0.99."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import FEATURE_SEED
from fake_detector import add_fixed_detector

from persense.export.oracle.plusplus import OraclePlusPlus
from persense.runtime.api import PerSense
from persense.runtime.cli.infer import main as infer
from persense.runtime.counters.base import NpyDensityCounter
from persense.runtime.errors import PersenseError
from persense.runtime.metrics import mask_iou

HALF = 22  # half side of the fixed detector's boxes around the discs, in pixels
# the random tiny SAM gives identical feedback boxes: KMeans(3) finds fewer distinct clusters and says so
pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters:sklearn.exceptions.ConvergenceWarning")


def disc_boxes(scene: dict, which: list[int]) -> list[list[float]]:
    """Normalised cxcywh boxes of side 2*HALF around the chosen discs (the fixed detector's output)."""
    height, width = scene["image"].shape[:2]
    return [[x / width, y / height, 2 * HALF / width, 2 * HALF / height] for x, y in scene["centres"][which].tolist()]


@pytest.fixture(scope="module", params=["random", "trained"])
def weights(request):
    """(tiny SAM module, its engines folder with the feature engine) with random weights, then the trained ones."""
    prefix = "" if request.param == "random" else "trained_"
    return request.getfixturevalue(f"{prefix}tiny_sam"), request.getfixturevalue(f"{prefix}plusplus_engines")


@pytest.fixture(scope="module")
def engines(weights, scene, tmp_path_factory):
    """Those engines plus a fixed detector boxing every disc, the sixth most confidently."""
    logits = [2.0] * len(scene["centres"])
    logits[5] = 3.0
    folder = tmp_path_factory.mktemp("plusplus_text") / "engines"
    return add_fixed_detector(weights[1], folder, logits, disc_boxes(scene, list(range(12))))


@pytest.fixture(scope="module")
def oracle(weights, scene_files):
    return OraclePlusPlus(weights[0], NpyDensityCounter(scene_files["density"]), resnet_seed=FEATURE_SEED)


def run_both(engines, oracle, scene, scene_files, **call):
    """The runtime's and the oracle's results on the scene (ground-truth density) for the same first exemplar,
    first detection and gating boxes (the runtime's detector gives them with `text`)."""
    ps = PerSense.open(engines, "ort-cpu", density=scene_files["density"], method="persense++", cache=False)
    got = ps.segment(scene["image"], ps.reference(scene["image"], scene["reference"] > 0), **call)
    detections = None
    box = call.get("box")
    if got.ppsm_gating["boxes"] is not None:
        detections = np.array(got.ppsm_gating["boxes"], np.float32).reshape(-1, 4)  # both captions: the same boxes
        box = np.array(got.first_exemplar["detection"]["box"], np.float32)
    target = oracle.reference(scene["image"], scene["reference"] > 0)
    expected = oracle.segment(scene["image"], target, box=box, detections=detections, gating_boxes=detections)
    return got, expected


def assert_same_run(got, expected) -> None:
    """Every stage's decisions equal, the union nearly so (ONNX vs torch arithmetic)."""
    stages = got.stages
    assert got.method == expected.method == "persense++"
    assert stages["hybrid_idm"]["first_pass"] == [list(p) for p in expected.first_idm_points]
    assert stages["hybrid_idm"]["second_pass"] == [list(p) for p in expected.second_idm_points]
    assert got.first_pass_points == expected.first_pass_points
    lines = [[int(v) for v in line.split()[:4]] for line in expected.feedback_lines]
    assert [entry[:4] for entry in stages["feedback_boxes"]] == lines
    np.testing.assert_allclose(
        [entry[4] for entry in stages["feedback_boxes"]],
        [float(line.split()[4]) for line in expected.feedback_lines],
        atol=1e-4,
    )
    np.testing.assert_array_equal(got.exemplars, expected.exemplars)
    if expected.diversity is not None:  # the same clusters of feedback lines
        selection = stages["exemplar_selection"]
        assert selection["clustered"] == expected.diversity.clustered
        assert selection["regions"] == {str(k): v for k, v in expected.diversity.regions.items()}
    kept = np.ones(len(expected.points), bool) if expected.kept is None else expected.kept
    rejected = [entry["index"] for entry in stages["imrm"].get("rejected", [])]
    assert rejected == np.flatnonzero(~kept).tolist()
    assert stages["imrm"]["ran"] == (expected.imrm is not None)
    np.testing.assert_array_equal(got.points, expected.points[kept])
    assert got.count == expected.count
    assert got.decoder_prompts == expected.decoder_prompts - 1  # the cascade's unused third call is skipped
    assert mask_iou(got.union > 0, expected.union > 0) >= 0.99


def test_text_prompt_run_matches_the_oracle(engines, oracle, scene, scene_files):
    """--text: the best box starts the cascade, its detection rescues IMRM's outliers, 'all <plural>' gates."""
    got, expected = run_both(engines, oracle, scene, scene_files, text="apple")
    assert got.first_exemplar["source"] == "text" and len(got.ppsm_gating["boxes"]) == 12
    assert len(expected.feedback_lines) >= 3 and expected.diversity is not None  # diversity selection ran
    assert_same_run(got, expected)


def test_box_run_without_gating_matches_the_oracle(engines, oracle, scene, scene_files):
    x, y = scene["centres"][3]
    got, expected = run_both(engines, oracle, scene, scene_files, box=[x - 18.6, y - 18.3, x + 18.8, y + 18.5])
    assert got.ppsm_gating["boxes"] is None and got.first_exemplar["source"] == "box"
    assert_same_run(got, expected)
    assert len(expected.points) >= 12  # every disc gives at least one point (before IMRM)


def test_few_feedback_boxes_keep_the_cascade_box(weights, oracle, scene, scene_files, tmp_path):
    """Gating by one disc's box leaves < 3 feedback boxes: exemplars are the cascade box then those, in order."""
    folder = add_fixed_detector(weights[1], tmp_path / "engines", [3.0], disc_boxes(scene, [5]))
    got, expected = run_both(folder, oracle, scene, scene_files, text="apple")
    assert 1 <= len(expected.feedback_lines) < 3 and expected.diversity is None
    assert got.stages["exemplar_selection"]["diversity"] is False
    assert_same_run(got, expected)


def test_result_json_names_the_method_and_its_stages(engines, scene_files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(scene_files[k]) for k in ("image", "image", "mask")]
    argv += ["--engines", str(engines), "--density", str(scene_files["density"]), "--out", str(out), "--no-cache"]
    assert infer([*argv, "--method", "persense++", "--text", "apple", "-q"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "persense++"
    assert set(result["stages"]) == {"hybrid_idm", "feedback_boxes", "exemplar_selection", "imrm"}
    assert result["instances"] == len(result["points"])
    assert infer([*argv, "-q"]) == 0  # the default method is PerSense's
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "persense" and "stages" not in result


def test_method_is_checked_and_persense_plus_plus_needs_the_feature_engine(tiny_engines, scene_files):
    with pytest.raises(
        PersenseError, match=re.escape("unknown method 'persense+'; choose one of persense, persense++")
    ):
        PerSense.open(tiny_engines, "ort-cpu", method="persense+")
    with pytest.raises(PersenseError, match="no ResNet-50 feature engine for --method persense\\+\\+"):
        PerSense.open(tiny_engines, "ort-cpu", method="persense++")
    ps = PerSense.open(tiny_engines, "ort-cpu", density=scene_files["density"], cache=False)  # PerSense needs none
    with pytest.raises(PersenseError, match="no ResNet-50 feature engine"):
        ps.segment(
            str(scene_files["image"]), ps.reference(scene_files["image"], scene_files["mask"]), method="persense++"
        )
