"""The manifest refuses missing, tampered and mismatched artefacts with a message naming the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from persense.runtime.artefact_names import export_flag
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import load_manifest
from persense.runtime.models.sam import SamEngines


@pytest.fixture
def engines_copy(tiny_engines, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(tiny_engines, folder)
    return folder


def test_manifest_records_what_the_design_asks_for(tiny_engines):
    data = json.loads((tiny_engines / "manifest.json").read_text())
    assert data["model_type"] == "tiny" and {"torch", "onnx", "onnxruntime", "persense"} <= set(data["versions"])
    encoder = data["artefacts"]["sam_encoder"]
    assert encoder["source_checkpoint"] == "random" and encoder["precision"] == "fp32" and encoder["opset"] >= 17
    assert encoder["inputs"] == [{"name": "image", "shape": [1, 3, 1024, 1024], "dtype": "float32"}]
    assert encoder["outputs"] == [{"name": "image_embeddings", "shape": [1, 256, 64, 64], "dtype": "float32"}]
    decoder = {t["name"]: t["shape"] for t in data["artefacts"]["sam_decoder"]["inputs"]}
    assert decoder["point_coords"] == ["B", "N", 2] and decoder["mask_input"] == ["B", 1, 256, 256]
    assert len(encoder["sha256"]) == 64


def test_intact_folder_opens(engines_copy):
    SamEngines.from_manifest(load_manifest(engines_copy), "ort-cpu", threads=1)


def test_missing_folder_and_missing_manifest(tmp_path):
    with pytest.raises(PersenseError, match="engines folder not found.*persense-export"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(PersenseError, match="no manifest.*persense-export"):
        load_manifest(tmp_path)


def test_tampered_artefact_is_refused(engines_copy):
    with open(engines_copy / "sam_decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PersenseError, match="does not match the manifest.*persense-export"):
        SamEngines.from_manifest(load_manifest(engines_copy), "ort-cpu")


def test_missing_artefact_file_is_refused(engines_copy):
    (engines_copy / "sam_encoder.onnx").unlink()
    with pytest.raises(PersenseError, match="missing.*persense-export"):
        SamEngines.from_manifest(load_manifest(engines_copy), "ort-cpu")


def test_swapped_files_are_refused(engines_copy):
    encoder, decoder = engines_copy / "sam_encoder.onnx", engines_copy / "sam_decoder.onnx"
    data = encoder.read_bytes()
    encoder.write_bytes(decoder.read_bytes())
    decoder.write_bytes(data)
    with pytest.raises(PersenseError, match="sha256"):
        SamEngines.from_manifest(load_manifest(engines_copy), "ort-cpu")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["artefacts"]["sam_encoder"]["outputs"][0].update(shape=[1, 128, 64, 64]), "image_embeddings"),
        (lambda d: d["artefacts"].pop("sam_decoder"), "no 'sam_decoder' artefact"),
        (lambda d: d.update(format=99), "format 99"),
        (lambda d: d["artefacts"]["sam_decoder"]["inputs"].pop(), "persam_weight"),
    ],
)
def test_mismatched_manifest_is_refused(engines_copy, edit, message):
    path = engines_copy / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(PersenseError, match=message):
        SamEngines.from_manifest(load_manifest(engines_copy), "ort-cpu")


def test_unreadable_manifest(engines_copy):
    (engines_copy / "manifest.json").write_text("{not json")
    with pytest.raises(PersenseError, match="unreadable manifest"):
        load_manifest(engines_copy)


def test_export_reuses_unchanged_artefacts_and_redoes_tampered_ones(engines_copy):
    from persense.export.cli import main

    before = {p.name: p.stat().st_mtime_ns for p in engines_copy.glob("*.onnx")}
    assert main(["--model", "tiny", "--seed", "0", "--out", str(engines_copy), "-q"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in engines_copy.glob("*.onnx")} == before
    with open(engines_copy / "sam_encoder.onnx", "ab") as handle:
        handle.write(b"\0")
    assert main(["--model", "tiny", "--seed", "0", "--out", str(engines_copy), "-q"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in engines_copy.glob("*.onnx")}
    assert after["sam_decoder.onnx"] == before["sam_decoder.onnx"]
    assert after["sam_encoder.onnx"] != before["sam_encoder.onnx"]
    SamEngines.from_manifest(load_manifest(engines_copy), "ort-cpu")


@pytest.mark.parametrize(
    "name, flag",
    [
        ("sam_decoder_int8", "--int8"),
        ("sam_encoder_ov_int8", "--openvino-int8"),
        ("sam_encoder_gpu_fp16", "--fp16"),
        ("sam_decoder_trt", "--fp16"),
        ("sam_decoder", None),
        ("sam_encoder_gpu", None),
    ],
)
def test_a_missing_variant_names_the_export_flag_that_writes_it(name: str, flag: str | None) -> None:
    assert export_flag(name) == flag
