"""`persense-export --openvino-int8` and `--backend openvino --precision int8`: the NNCF-quantised encoder of the
trained tiny SAM, recorded with its error, selected at run time, close to FP32, reused, and refused when tampered."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from persense import PerSense, PersenseError
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.manifest import load_manifest
from persense.runtime.metrics import cosine
from persense.runtime.models.sam import DECODER, ENCODER, engine_names

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None,
    reason="OpenVINO and NNCF are not installed (pip install 'persense[openvino]')",
)

OV_INT8_ENCODER = "sam_encoder_ov_int8"
ENCODER_COSINE = 0.999  # trained tiny SAM, OpenVINO INT8 vs FP32 embedding (measured 0.9998 on the test scene)
INT16_MAX = 32767  # without VNNI, u8s8 kernels add two u8 x s8 products in a saturating int16
UNION_IOU = 0.95  # the pipeline's union mask against ORT FP32 on the test scene (trained tiny SAM)


def export(folder: Path, *flags: str) -> None:
    """persense-export of the trained tiny SAM into `folder` (reusing what is there)."""
    from persense.export.cli import main

    assert main(["--model", "tiny-trained", "--out", str(folder), *flags, "-q"]) == 0


@pytest.fixture(scope="module")
def ov_int8_engines(trained_tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny engines with `--openvino-int8` added."""
    folder = tmp_path_factory.mktemp("ov_int8") / "engines"
    shutil.copytree(trained_tiny_engines, folder)
    export(folder, "--openvino-int8")
    return folder


def test_entry_records_the_ir_its_source_and_its_error(ov_int8_engines: Path) -> None:
    from persense.export.precision.openvino_int8 import ov_int8_method

    artefacts = json.loads((ov_int8_engines / "manifest.json").read_text())["artefacts"]
    entry = artefacts[OV_INT8_ENCODER]
    assert (entry["file"], entry["extra"]["data_file"]) == (f"{OV_INT8_ENCODER}.xml", f"{OV_INT8_ENCODER}.bin")
    assert entry["precision"] == "int8" and entry["extra"]["fp32_sha256"] == artefacts[ENCODER]["sha256"]
    assert entry["extra"]["method"] == ov_int8_method()
    assert entry["extra"]["int8_error"]["outputs"]["image_embeddings"]["cosine"] >= ENCODER_COSINE
    assert [spec["name"] for spec in entry["inputs"]] == ["image"]


def test_the_ir_runs_quantised_products_that_cannot_saturate(ov_int8_engines: Path) -> None:
    import openvino

    model = openvino.Core().read_model(str(ov_int8_engines / f"{OV_INT8_ENCODER}.xml"))
    ops = [op.get_type_name() for op in model.get_ops()]
    assert ops.count("FakeQuantize") >= ops.count("MatMul") > 0  # every product's inputs pass a quantiser
    weights = [
        op.get_data()
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == openvino.Type.i8
    ]
    assert weights and 2 * 255 * max(int(np.abs(w).max()) for w in weights) <= INT16_MAX  # 7 bits: no AVX2 overflow


def test_openvino_int8_selects_the_ir_encoder_and_the_fp32_decoder(ov_int8_engines: Path) -> None:
    manifest = load_manifest(ov_int8_engines)
    assert engine_names(manifest, "openvino", "int8") == {ENCODER: OV_INT8_ENCODER, DECODER: DECODER}
    assert engine_names(manifest, "ort-cpu", "int8") == {ENCODER: "sam_encoder_int8", DECODER: "sam_decoder_int8"}


def test_embedding_and_masks_stay_close_to_fp32(ov_int8_engines: Path, scene, scene_files) -> None:
    int8 = PerSense.open(ov_int8_engines, backend="openvino", precision="int8", threads=2, cache=False)
    fp32 = PerSense.open(ov_int8_engines, backend="ort-cpu", threads=2, cache=False)
    assert int8.sam.decoder.precision_hint == "f32"
    image = SamTransform(scene["image"].shape[:2]).image_tensor(scene["image"])
    reference = OrtEngine(ov_int8_engines / "sam_encoder.onnx", threads=2).run({"image": image})
    got = int8.sam.encoder.run({"image": image})["image_embeddings"]
    assert not np.array_equal(got, reference["image_embeddings"])  # INT8 really ran
    assert cosine(got, reference["image_embeddings"]) >= ENCODER_COSINE
    unions = [
        ps.segment(
            scene_files["image"], ps.reference(scene["image"], scene["reference"] > 0), density=scene_files["density"]
        ).union
        > 0
        for ps in (int8, fp32)
    ]
    assert unions[1].any()
    assert np.logical_and(*unions).sum() / np.logical_or(*unions).sum() >= UNION_IOU


def test_reused_kept_and_refused_when_tampered(ov_int8_engines: Path, tmp_path: Path) -> None:
    folder = tmp_path / "engines"
    shutil.copytree(ov_int8_engines, folder)
    made = (folder / f"{OV_INT8_ENCODER}.xml").stat().st_mtime_ns
    export(folder, "--openvino-int8")  # same method, same FP32 file: not quantised again
    export(folder)  # an export without the flag keeps it
    assert (folder / f"{OV_INT8_ENCODER}.xml").stat().st_mtime_ns == made
    assert OV_INT8_ENCODER in load_manifest(folder).artefacts
    with (folder / f"{OV_INT8_ENCODER}.bin").open("r+b") as weights:
        weights.seek(1024)
        weights.write(b"\x7f" * 16)
    with pytest.raises(PersenseError, match=f"{OV_INT8_ENCODER}.bin: sha256 .* does not match the manifest"):
        PerSense.open(folder, backend="openvino", precision="int8", threads=2, cache=False)


def test_missing_openvino_int8_names_the_artefact(tiny_engines: Path) -> None:
    with pytest.raises(PersenseError, match=f"manifest has no '{OV_INT8_ENCODER}' artefact; .* --openvino-int8` "):
        PerSense.open(tiny_engines, backend="openvino", precision="int8", threads=2, cache=False)
