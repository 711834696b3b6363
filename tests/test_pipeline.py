"""The engine runtime against the PyTorch oracle on the same weights and density map."""

from __future__ import annotations

import numpy as np
import pytest

from persense.export.oracle.pipeline import OraclePipeline
from persense.runtime.counters.base import NpyDensityCounter
from persense.runtime.manifest import load_manifest
from persense.runtime.metrics import mask_iou
from persense.runtime.models.sam import SamEngines
from persense.runtime.pipeline.flow import PerSensePipeline


@pytest.fixture(scope="module", params=["random", "trained"])
def results(request, scene, scene_files):
    """Runtime and reference results on the tiny SAM with random weights, then with the trained weights."""
    prefix = "" if request.param == "random" else "trained_"
    tiny_sam, tiny_engines = (request.getfixturevalue(f"{prefix}tiny_{kind}") for kind in ("sam", "engines"))
    counter = NpyDensityCounter(scene_files["density"])
    runtime = PerSensePipeline(SamEngines.from_manifest(load_manifest(tiny_engines), "ort-cpu", threads=2), counter)
    reference = OraclePipeline(tiny_sam, counter)
    got = runtime.segment(scene["image"], runtime.reference(scene["image"], scene["reference"] > 0))
    expected = reference.segment(scene["image"], reference.reference(scene["image"], scene["reference"] > 0))
    return got, expected


def test_same_points_and_union_mask_as_the_reference(results, scene):
    got, expected = results
    assert len(expected.points) >= 12  # every disc yields a candidate
    np.testing.assert_array_equal(got.points, expected.points)
    assert got.first_pass_points == expected.first_pass_points
    assert got.count == expected.count == np.ceil(np.sum(scene["density"], dtype=np.float32))
    assert mask_iou(got.union > 0, expected.union > 0) >= 0.99
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4)


def test_runtime_skips_only_the_unused_box_call(results):
    got, expected = results
    assert expected.decoder_prompts == 3 + 2 * expected.first_pass_points + len(expected.points)
    assert got.decoder_prompts == expected.decoder_prompts - 1


def test_result_is_complete(results, scene):
    got, _ = results
    assert got.union.shape == scene["image"].shape[:2] and set(np.unique(got.union)) <= {0, 255}
    assert got.labels.dtype == np.uint16 and got.labels.max() <= len(got.points)
    assert np.array_equal(got.labels > 0, got.union > 0)
    assert got.boxes.shape == (len(got.points), 4) and got.exemplars.shape[1] == 4
    assert {
        "image_encoding",
        "location_prior",
        "exemplar_cascade",
        "counter",
        "idm",
        "ppsm",
        "feedback",
        "final_decoding",
        "merge",
    } <= set(got.timings_ms)
    summary = got.summary()
    assert summary["instances"] == len(got.points) and summary["decoder_prompts"] == got.decoder_prompts


def test_zero_density_gives_an_empty_mask_with_a_warning(tiny_engines, scene, tmp_path):
    path = tmp_path / "zeros.npy"
    np.save(path, np.zeros((32, 32), np.float32))
    runtime = PerSensePipeline(
        SamEngines.from_manifest(load_manifest(tiny_engines), "ort-cpu", threads=2), NpyDensityCounter(path)
    )
    result = runtime.segment(scene["image"], runtime.reference(scene["image"], scene["reference"] > 0))
    assert len(result.points) == 0 and not result.union.any()
    assert any("no instance found" in w for w in result.warnings)


def test_count_sums_in_float32_as_torch_sum_does():
    from persense.runtime.counters.base import dsalvanet_count

    tenths = np.full((2, 5), 0.1, np.float32)  # float64 sum 1.0000000149; float32 sum 1.0
    assert np.sum(tenths, dtype=np.float64) > 1 and dsalvanet_count(tenths) == 1.0
    assert dsalvanet_count(np.full((64, 64), 1 / 4096, np.float32)) == 1.0
    assert dsalvanet_count(np.zeros((8, 8), np.float32)) == 0.0


def test_thirty_instance_synthetic_map_counts_thirty():
    from persense.runtime.counters.base import dsalvanet_count
    from persense.runtime.datasets.synth import random_template, render_scene

    rng = np.random.default_rng(10)  # a map whose float64 sum is 30.0000000001 (ceil 31, the case)
    density = render_scene(rng, random_template(rng), 30, (768, 576)).density
    assert np.sum(density, dtype=np.float64) > 30
    assert dsalvanet_count(density) == 30.0


@pytest.fixture(scope="module")
def box_results(tiny_sam, tiny_engines, scene, scene_files):
    """Runtime and reference given the same first-exemplar box around a disc other than the reference's,
    and the first prompt the runtime's decoder received."""
    counter = NpyDensityCounter(scene_files["density"])
    runtime = PerSensePipeline(SamEngines.from_manifest(load_manifest(tiny_engines), "ort-cpu", threads=2), counter)
    prompts = []
    decode_best = runtime.sam.decode_best
    runtime.sam.decode_best = lambda embedding, batch, *rest: (
        prompts.append(batch) or decode_best(embedding, batch, *rest)
    )
    reference = OraclePipeline(tiny_sam, counter)
    x, y = scene["centres"][5]
    box = np.array([x - 18.7, y - 18.2, x + 18.9, y + 18.4])  # fractional, as a detector's boxes are
    got = runtime.segment(scene["image"], runtime.reference(scene["image"], scene["reference"] > 0), box)
    expected = reference.segment(scene["image"], reference.reference(scene["image"], scene["reference"] > 0), box)
    return got, expected, box, prompts[0]


def test_box_start_matches_the_reference(box_results, scene):
    from persense.runtime.models.sam import transform_for

    got, expected, box, first_prompt = box_results
    centre = np.array([[(int(box[0]) + int(box[2])) // 2, (int(box[1]) + int(box[3])) // 2]], np.float64)
    np.testing.assert_allclose(
        first_prompt.coords[0, :1], transform_for(scene["image"].shape[:2]).coords_to_input(centre), rtol=0, atol=1e-4
    )  # the cascade started at the box centre
    np.testing.assert_array_equal(got.points, expected.points)
    np.testing.assert_array_equal(got.exemplars, expected.exemplars)
    assert got.first_pass_points == expected.first_pass_points and got.count == expected.count
    assert mask_iou(got.union > 0, expected.union > 0) >= 0.99


def test_box_centre_is_the_originals():
    from persense.runtime.pipeline.exemplars import box_centre

    np.testing.assert_array_equal(box_centre(np.array([10.9, 3.2, 21.7, 8.99])), [15, 5])  # int32 cast, then //2
    np.testing.assert_array_equal(box_centre(np.array([0.0, 0.0, 1.0, 1.0])), [0, 0])


@pytest.mark.parametrize(
    "box,message",
    [
        ([10, 10, 5, 40], "inverted or empty"),
        ([10, 40, 50, 40], "inverted or empty"),
        ([-1, 0, 20, 20], "not inside"),
        ([0, 0, 385, 20], "not inside"),
        ([0, 0, 20, np.nan], "finite"),
        ([1, 2, 3], "four finite numbers"),
    ],
)
def test_bad_boxes_are_refused(box, message, tiny_engines, scene):
    from persense.runtime.errors import PersenseError

    runtime = PerSensePipeline(
        SamEngines.from_manifest(load_manifest(tiny_engines), "ort-cpu", threads=2),
        NpyDensityCounter.from_array(scene["density"]),
    )
    with pytest.raises(PersenseError, match=message):
        runtime.segment(scene["image"], None, np.array(box, dtype=float))
