"""--backend openvino: OvEngine parity with ONNX Runtime on the tiny engines, the pipeline on it, its errors;
precision choices per backend (int8: the INT8 encoder and decoder; OpenVINO INT8 in test_openvino_int8.py)."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest

from persense import PerSense, PersenseError
from persense.runtime.backends.choice import resolve_backend
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.backends.table import BACKENDS
from persense.runtime.manifest import load_manifest
from persense.runtime.metrics import cosine
from persense.runtime.models.sam import DECODER, ENCODER, engine_names

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed (pip install 'persense[openvino]')"
)


def _bf16_reason() -> str | None:
    """Why this machine cannot run OpenVINO bf16, or None."""
    if importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install 'persense[openvino]')"
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return None if "BF16" in capabilities else f"this CPU has no BF16 ({capabilities})"


def _engines(folder, name: str, precision: str = "fp32"):
    """The artefact `name` on OpenVINO and on ONNX Runtime's CPU provider."""
    from persense.runtime.backends.openvino_engine import OvEngine

    path = load_manifest(folder).verified_path(name)
    return OvEngine(path, precision, threads=2), OrtEngine(path, threads=2)


def _image(seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((1, 3, 1024, 1024)).astype(np.float32)}


def _decoder_feeds(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Decoder inputs for `batch` prompts of a point plus a box, half of them with mask input."""
    coords = rng.uniform(0, 1024, (batch, 3, 2)).astype(np.float32)
    return {
        "image_embeddings": rng.standard_normal((1, 256, 64, 64)).astype(np.float32),
        "point_coords": coords,
        "point_labels": np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (batch, 1)),
        "mask_input": rng.standard_normal((batch, 1, 256, 256)).astype(np.float32),
        "has_mask_input": (np.arange(batch) % 2).astype(np.float32),
        "target_embedding": rng.standard_normal((1, 256)).astype(np.float32),
        "attn_sim": rng.standard_normal((1, 4096)).astype(np.float32),
        "persam_weight": np.ones(batch, np.float32),
    }


@needs_openvino
def test_encoder_fp32_matches_onnxruntime(tiny_engines):
    ov, ort = _engines(tiny_engines, ENCODER)
    assert [s.name for s in ov.inputs] == ["image"] and [s.name for s in ov.outputs] == ["image_embeddings"]
    got, want = ov.run(_image())["image_embeddings"], ort.run(_image())["image_embeddings"]
    assert got.shape == want.shape == (1, 256, 64, 64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@needs_openvino
def test_decoder_fp32_matches_onnxruntime_on_dynamic_batches(tiny_engines):
    ov, ort = _engines(tiny_engines, DECODER)
    rng = np.random.default_rng(1)
    for batch in (1, 4, 17, 4):  # shapes change between runs (one static compilation each), and back
        feeds = _decoder_feeds(batch, rng)
        got, want = ov.run(feeds), ort.run(feeds)
        assert got["low_res_masks"].shape == (batch, 256, 256) and got["iou_predictions"].shape == (batch,)
        np.testing.assert_allclose(got["low_res_masks"], want["low_res_masks"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["iou_predictions"], want["iou_predictions"], rtol=0, atol=1e-4)
    assert len(ov._compiled) == 3


@pytest.mark.skipif(_bf16_reason() is not None, reason=str(_bf16_reason()))
def test_encoder_bf16_is_close_to_fp32(tiny_engines):
    bf16, ort = _engines(tiny_engines, ENCODER, "bf16")
    assert bf16.precision_hint == "bf16"
    got, want = bf16.run(_image(2))["image_embeddings"].ravel(), ort.run(_image(2))["image_embeddings"].ravel()
    assert not np.array_equal(got, want)  # bf16 really ran
    assert cosine(got, want) >= 0.999


@pytest.mark.skipif(_bf16_reason() is not None, reason=str(_bf16_reason()))
def test_bf16_applies_to_the_encoder_only(tiny_engines, scene, scene_files):
    ps = PerSense.open(tiny_engines, backend="openvino", precision="bf16", threads=2, cache=False)
    assert (ps.sam.encoder.precision_hint, ps.sam.decoder.precision_hint) == ("bf16", "f32")
    result = ps.segment(
        scene_files["image"], ps.reference(scene["image"], scene["reference"] > 0), density=scene_files["density"]
    )
    assert ps.precision == "bf16" and len(result.points) > 0


@needs_openvino
def test_threads_share_an_engine(tiny_engines):
    from concurrent.futures import ThreadPoolExecutor

    ov, ort = _engines(tiny_engines, DECODER)
    feeds = [_decoder_feeds(batch, np.random.default_rng(batch)) for batch in (1, 3, 5, 7)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ov.run, feeds * 2))
    for feed, got in zip(feeds * 2, results):
        np.testing.assert_allclose(got["low_res_masks"], ort.run(feed)["low_res_masks"], rtol=0, atol=1e-4)


@needs_openvino
def test_pipeline_on_openvino_matches_ort_cpu(tiny_engines, scene, scene_files):
    results = {}
    for backend in ("ort-cpu", "openvino"):
        ps = PerSense.open(tiny_engines, backend=backend, threads=2, cache=False)
        reference = ps.reference(scene["image"], scene["reference"] > 0)
        results[backend] = ps.segment(scene_files["image"], reference, density=scene_files["density"])
    ov, ort = results["openvino"], results["ort-cpu"]
    assert len(ort.points) >= 12
    np.testing.assert_array_equal(ov.points, ort.points)
    union = np.logical_or(ov.union > 0, ort.union > 0).sum()
    assert np.logical_and(ov.union > 0, ort.union > 0).sum() / union >= 0.99


def test_missing_openvino_is_a_clear_error(tiny_engines, monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(PersenseError, match=r"pip install 'persense\[openvino\]'"):
        PerSense.open(tiny_engines, backend="openvino", threads=2, cache=False)


@needs_openvino
def test_unknown_openvino_precision_is_refused(tiny_engines):
    from persense.runtime.backends.openvino_engine import OvEngine

    with pytest.raises(PersenseError, match="fp32 or bf16 or int8"):
        OvEngine(load_manifest(tiny_engines).verified_path(ENCODER), "fp8")


@pytest.mark.parametrize("backend, precision", [("openvino", "fp16"), ("ort-cpu", "bf16")])
def test_precisions_a_backend_does_not_run_are_refused(tiny_engines, backend, precision):
    with pytest.raises(PersenseError, match=f"precision {precision} does not run on backend {backend}"):
        engine_names(load_manifest(tiny_engines), backend, precision)


def test_engine_names_per_backend_and_precision(tiny_engines):
    manifest = load_manifest(tiny_engines)
    assert engine_names(manifest, "ort-cpu", "int8") == {ENCODER: "sam_encoder_int8", DECODER: "sam_decoder_int8"}
    assert engine_names(manifest, "ort-cpu", "fp16") == {ENCODER: "sam_encoder_fp16", DECODER: "sam_decoder_fp16"}
    for precision in ("fp32", "bf16"):
        assert engine_names(manifest, "openvino", precision) == {ENCODER: ENCODER, DECODER: DECODER}


def test_auto_never_picks_openvino(tiny_engines):
    assert "openvino" in BACKENDS
    assert resolve_backend("auto", load_manifest(tiny_engines)) != "openvino"


def test_counters_stay_on_ort_cpu_under_openvino(tiny_engines, tmp_path):
    import shutil

    from persense.export.cli import main as export
    from persense.runtime.counters.choice import make_counter

    shutil.copytree(tiny_engines, tmp_path, dirs_exist_ok=True)
    assert (
        export(
            [
                "--model",
                "tiny",
                "--seed",
                "0",
                "--out",
                str(tmp_path),
                "-q",
                "--counter",
                "countr",
                "--counter-config",
                "tiny",
            ]
        )
        == 0
    )
    counter = make_counter("countr", load_manifest(tmp_path), "openvino", 2)
    assert isinstance(counter.engine, OrtEngine) and counter.engine.device == "cpu"
