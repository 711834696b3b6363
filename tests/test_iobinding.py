"""ONNX Runtime IO binding (the ORT-CUDA path, run here on the CPU with device "cpu"): same results as plain
runs, the image embedding uploaded once per image, output and input buffers reused while shapes stay."""

from __future__ import annotations

import numpy as np
import pytest

from persense.export.sam.graphs import decoder_example_inputs
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.counters.base import NpyDensityCounter
from persense.runtime.manifest import load_manifest
from persense.runtime.models.sam import Guidance, Prompts, SamEngines
from persense.runtime.pipeline.flow import PerSensePipeline


def _feeds(batch: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        name: t.numpy() * np.float32(scale)
        for name, t in zip(PerSamDecoder.input_names, decoder_example_inputs(batch, 2))
    }


@pytest.fixture(scope="module")
def decoders(tiny_engines):
    path = tiny_engines / "sam_decoder.onnx"
    return OrtEngine(path, threads=2), OrtEngine(path, threads=2, io_binding=True)


def test_bound_runs_equal_plain_runs_and_keep_earlier_results(decoders):
    plain, bound = decoders
    assert not plain.io_binding and bound.io_binding
    earlier = {}
    for batch, scale in ((3, 1.0), (3, 0.5), (1, 1.0), (8, 2.0)):
        got, want = bound.run(_feeds(batch, scale)), plain.run(_feeds(batch, scale))
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        earlier[(batch, scale)] = (got, want)
    for got, want in earlier.values():  # results are host copies: later runs into the same buffers leave them
        np.testing.assert_array_equal(got["low_res_masks"], want["low_res_masks"])


def test_device_values_are_bound_as_they_are_and_buffers_are_reused(decoders):
    plain, bound = decoders
    feeds = _feeds(4)
    embedding = bound.upload("image_embeddings", feeds["image_embeddings"])
    before = dict(bound.uploads)
    first = bound.run({**feeds, "image_embeddings": embedding})
    address = bound._local.buffers["out:low_res_masks"][1].data_ptr()
    second = bound.run({**_feeds(4, 0.5), "image_embeddings": embedding})
    assert bound._local.buffers["out:low_res_masks"][1].data_ptr() == address  # same shape: same output buffer
    assert bound.uploads["image_embeddings"] == before.get("image_embeddings", 0)  # bound, not copied again
    assert bound.uploads["point_coords"] == before.get("point_coords", 0) + 2
    np.testing.assert_array_equal(first["low_res_masks"], plain.run(feeds)["low_res_masks"])
    np.testing.assert_array_equal(
        second["iou_predictions"],
        plain.run({**_feeds(4, 0.5), "image_embeddings": feeds["image_embeddings"]})["iou_predictions"],
    )


def test_threads_sharing_a_bound_engine_get_their_own_results(decoders):
    """Each thread binds its own buffers: concurrent runs with different shapes return what a plain run does."""
    from concurrent.futures import ThreadPoolExecutor

    plain, bound = decoders
    cases = [(batch, scale) for batch in (1, 3, 5, 8) for scale in (0.5, 1.0, 2.0)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda case: bound.run(_feeds(*case)), cases))
    for case, result in zip(cases, got):
        np.testing.assert_array_equal(result["low_res_masks"], plain.run(_feeds(*case))["low_res_masks"])


def test_decode_uploads_the_embedding_once_per_image(tiny_engines):
    manifest = load_manifest(tiny_engines)
    plain = SamEngines.from_manifest(manifest, "ort-cpu", threads=2, decode_chunk=3)
    bound = SamEngines.from_manifest(manifest, "ort-cpu", threads=2, decode_chunk=3)
    bound.decoder = OrtEngine(tiny_engines / "sam_decoder.onnx", threads=2, io_binding=True)
    rng = np.random.default_rng(0)
    guidance = Guidance(rng.normal(size=(1, 256)).astype(np.float32), rng.random((1, 4096)).astype(np.float32))
    prompts = Prompts.points(rng.uniform(0, 1024, (7, 2)))
    for image in range(2):
        embedding = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
        for guide in (guidance, None):
            got, want = bound.decode_best(embedding, prompts, guide), plain.decode_best(embedding, prompts, guide)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        assert bound.decoder.uploads["image_embeddings"] == image + 1
    assert bound.decoder_launches == 2 * 2 * 3 and bound.decoder.uploads["point_coords"] == 12


def test_pipeline_with_io_binding_gives_the_same_result(tiny_engines, scene, scene_files):
    manifest = load_manifest(tiny_engines)
    counter = NpyDensityCounter(scene_files["density"])
    plain = PerSensePipeline(SamEngines.from_manifest(manifest, "ort-cpu", threads=2), counter)
    engines = SamEngines.from_manifest(manifest, "ort-cpu", threads=2)
    engines.decoder = OrtEngine(tiny_engines / "sam_decoder.onnx", threads=2, io_binding=True)
    bound = PerSensePipeline(engines, counter)
    target = plain.reference(scene["image"], scene["reference"] > 0)
    got, want = bound.segment(scene["image"], target), plain.segment(scene["image"], target)
    np.testing.assert_array_equal(got.points, want.points)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    assert engines.decoder.uploads["image_embeddings"] == 1  # one image: one upload for all its launches
    assert engines.decoder.uploads["point_coords"] == got.decoder_launches
