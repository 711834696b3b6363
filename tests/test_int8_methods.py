"""The INT8 encoder: its attention products quantised, its convolutions not; no INT8 decoder; re-made when the
method changes."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from persense.export.cli import main as export
from persense.export.precision.int8 import int8_method

ENCODER_COSINE = 0.999  # tiny random encoder, INT8 vs FP32 embedding on the test scene (measured 0.9998)


def op_counts(path: Path) -> collections.Counter:
    """Node count per op type."""
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def entries(folder: Path) -> dict:
    """The manifest's artefact entries."""
    return json.loads((folder / "manifest.json").read_text())["artefacts"]


def test_encoder_quantises_every_matmul_and_no_decoder_is_quantised(int8_engines: Path) -> None:
    fp32, int8 = op_counts(int8_engines / "sam_encoder.onnx"), op_counts(int8_engines / "sam_encoder_int8.onnx")
    assert fp32["MatMul"] > 0 and int8["MatMul"] == 0  # attention products: no float MatMul left
    assert int8["MatMulInteger"] == fp32["MatMul"] + fp32["Gemm"]
    assert int8["ConvInteger"] == 0 and int8["Conv"] == fp32["Conv"] > 0  # convolutions stay FP32 (faster)
    recorded = entries(int8_engines)
    assert "sam_decoder_int8" not in recorded and not (int8_engines / "sam_decoder_int8.onnx").exists()
    assert recorded["sam_encoder_int8"]["extra"]["method"] == int8_method("sam_encoder")
    assert "MatMulConstBOnly=False" in int8_method("sam_encoder")
    assert "op_types_to_quantize=['MatMul', 'Gemm']" in int8_method("sam_encoder")


def test_int8_encoder_embedding_matches_fp32(int8_engines: Path, scene) -> None:
    from persense.runtime.backends.ort_engine import OrtEngine
    from persense.runtime.geometry.transforms import SamTransform

    image = SamTransform(scene["image"].shape[:2]).image_tensor(scene["image"])
    embeddings = [
        OrtEngine(int8_engines / name, threads=2).run({"image": image})["image_embeddings"].ravel()
        for name in ("sam_encoder.onnx", "sam_encoder_int8.onnx")
    ]
    a, b = (e.astype(np.float64) for e in embeddings)
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= ENCODER_COSINE
    assert (
        entries(int8_engines)["sam_encoder_int8"]["extra"]["int8_error"]["outputs"]["image_embeddings"]["cosine"]
        >= ENCODER_COSINE
    )


def test_int8_made_by_another_method_is_remade(int8_engines: Path, tmp_path: Path) -> None:
    folder = tmp_path / "engines"
    shutil.copytree(int8_engines, folder)
    made = (folder / "sam_encoder_int8.onnx").stat().st_mtime_ns
    assert export(["--model", "tiny", "--seed", "0", "--out", str(folder), "--int8", "-q"]) == 0
    assert (folder / "sam_encoder_int8.onnx").stat().st_mtime_ns == made  # same method, same source: reused
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artefacts"]["sam_encoder_int8"]["extra"]["method"] = "onnxruntime.quantization.quantize_dynamic(QInt8)"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert export(["--model", "tiny", "--seed", "0", "--out", str(folder), "--int8", "-q"]) == 0
    after = entries(folder)
    assert after["sam_encoder_int8"]["extra"]["method"] == int8_method("sam_encoder")
    assert (folder / "sam_encoder_int8.onnx").stat().st_mtime_ns != made  # re-converted
    assert op_counts(folder / "sam_encoder_int8.onnx")["MatMul"] == 0
