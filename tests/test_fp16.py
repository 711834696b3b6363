"""FP16 ONNX models: manifest entries, FP32 islands for sensitive ops, and measured error vs FP32 (ORT CPU).

Thresholds (tiny random SAM, seeded sample inputs): encoder embedding cosine >= 0.9999 and max abs error
<= 1% of the largest FP32 value; decoder mean mask IoU (logits > 0) >= 0.99 and IoU-score cosine >= 0.9999.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from persense.export.artefacts import FP16_SUFFIX, fp16_name, reusable_variant
from persense.export.fp16 import main
from persense.export.fp16_islands import SENSITIVE_OPS
from persense.export.parity import compare_outputs, sample_feeds
from persense.runtime.engine import OrtEngine
from persense.runtime.manifest import Manifest, load_manifest

MIN_EMBEDDING_COSINE = 0.9999
MAX_EMBEDDING_ABS_FRACTION = 0.01
MIN_MASK_IOU = 0.99
NAMES = ("sam_encoder", "sam_decoder")


@pytest.fixture(scope="module")
def folder(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny engines with FP16 models added by the CMake step's command."""
    out = tmp_path_factory.mktemp("fp16") / "engines"
    shutil.copytree(tiny_engines, out)
    assert main(["--folder", str(out), "--name", "sam_encoder", "--name", "sam_decoder", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def manifest(folder: Path) -> Manifest:
    """The manifest of that folder."""
    return load_manifest(folder)


@pytest.mark.parametrize("name", NAMES)
def test_fp16_entry_follows_the_manifest_conventions(manifest: Manifest, name: str) -> None:
    fp32, fp16 = manifest.artefact(name), manifest.artefact(fp16_name(name))
    assert fp16.file == f"{name}_fp16.onnx"
    assert fp16.precision == "fp16" and fp16.kind == fp32.kind
    assert fp16.extra["source_key"] == fp32.extra["source_key"]
    assert fp16.extra["fp32_sha256"] == fp32.sha256
    assert fp16.inputs == fp32.inputs and fp16.outputs == fp32.outputs  # float32 I/O kept
    assert set(fp16.extra["fp16_error"]["outputs"]) == {o.name for o in fp32.outputs}
    manifest.verified_path(fp16_name(name))
    assert (manifest.folder / fp16.file).stat().st_size < 0.6 * (manifest.folder / fp32.file).stat().st_size


@pytest.mark.parametrize("name", NAMES)
def test_sensitive_ops_stay_fp32_and_weights_are_fp16(manifest: Manifest, name: str) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(manifest.folder / manifest.artefact(fp16_name(name)).file)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    sensitive = [n for n in model.graph.node if n.op_type in SENSITIVE_OPS]
    assert sensitive
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in sensitive)
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    fp16_bytes = sum(t.ByteSize() for t in weights if t.data_type == onnx.TensorProto.FLOAT16)
    assert fp16_bytes > 0.9 * sum(t.ByteSize() for t in weights)


def test_recorded_error_meets_the_thresholds(manifest: Manifest) -> None:
    encoder = manifest.artefact("sam_encoder_fp16").extra["fp16_error"]["outputs"]["image_embeddings"]
    decoder = manifest.artefact("sam_decoder_fp16").extra["fp16_error"]["outputs"]
    assert encoder["cosine"] >= MIN_EMBEDDING_COSINE
    assert decoder["low_res_masks"]["mask_iou"] >= MIN_MASK_IOU
    assert 0 < decoder["low_res_masks"]["max_abs"] < 0.05


def test_fp16_encoder_matches_fp32_on_other_inputs(manifest: Manifest) -> None:
    art = manifest.artefact("sam_encoder")
    feeds = sample_feeds(art, seed=7)
    ref = OrtEngine(manifest.verified_path("sam_encoder")).run(feeds)["image_embeddings"]
    got = OrtEngine(manifest.verified_path("sam_encoder_fp16")).run(feeds)["image_embeddings"]
    assert got.dtype == np.float32 and got.shape == ref.shape
    metrics = compare_outputs(ref, got, "image_embeddings")
    assert metrics["cosine"] >= MIN_EMBEDDING_COSINE
    assert metrics["max_abs"] <= MAX_EMBEDDING_ABS_FRACTION * np.abs(ref).max()


def test_fp16_decoder_masks_match_fp32_on_other_inputs(manifest: Manifest) -> None:
    art = manifest.artefact("sam_decoder")
    feeds = sample_feeds(art, seed=7)
    ref = OrtEngine(manifest.verified_path("sam_decoder")).run(feeds)
    got = OrtEngine(manifest.verified_path("sam_decoder_fp16")).run(feeds)
    assert compare_outputs(ref["low_res_masks"], got["low_res_masks"], "low_res_masks")["mask_iou"] >= MIN_MASK_IOU
    assert compare_outputs(ref["iou_predictions"], got["iou_predictions"], "iou")["cosine"] >= MIN_EMBEDDING_COSINE


def test_fp16_entry_is_reused_only_for_the_same_fp32_file(manifest: Manifest) -> None:
    fp32 = manifest.artefact("sam_decoder")
    assert reusable_variant(manifest, "sam_decoder", fp32, FP16_SUFFIX) is manifest.artefact("sam_decoder_fp16")
    changed = replace(fp32, sha256="0" * 64)
    assert reusable_variant(manifest, "sam_decoder", changed, FP16_SUFFIX) is None
    assert reusable_variant(None, "sam_decoder", fp32, FP16_SUFFIX) is None
