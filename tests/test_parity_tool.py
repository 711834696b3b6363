"""The parity tool: every ONNX model (FP32, FP16) of the tiny SAM against PyTorch, TensorRT rows skipped with
their reason where TensorRT is absent, and a perturbed model caught as a failure."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from persense.export.parity import (
    TOLERANCES,
    ParityRow,
    check_parity,
    format_table,
    judge,
    main,
    parity_ok,
)
from persense.export.precision.tensorrt import fp16_artefacts
from persense.runtime.backends.trt_engine import tensorrt_unavailable_reason
from persense.runtime.manifest import load_manifest, sha256_file
from persense.runtime.metrics import mean_mask_iou

TRT_REASON = tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def folder(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny engines plus their FP16 models (and engines where TensorRT is usable)."""
    out = tmp_path_factory.mktemp("parity") / "engines"
    shutil.copytree(tiny_engines, out)
    manifest = load_manifest(out)
    added, _ = fp16_artefacts(manifest.artefacts, out, manifest)
    manifest.artefacts.update(added)
    manifest.save()
    return out


@pytest.fixture(scope="module")
def rows(folder: Path) -> list[ParityRow]:
    """The parity rows of that folder."""
    return check_parity(folder)


def test_every_onnx_model_matches_pytorch(rows: list[ParityRow]) -> None:
    compared = {(r.artefact, r.output): r for r in rows if r.backend == "ort-cpu"}
    assert set(compared) == {(a, o) for a in ("sam_encoder", "sam_encoder_fp16") for o in ("image_embeddings",)} | {
        (a, o) for a in ("sam_decoder", "sam_decoder_fp16") for o in ("low_res_masks", "iou_predictions")
    }
    assert all(r.status == "pass" for r in compared.values()), format_table(rows)
    assert compared[("sam_encoder", "image_embeddings")].cosine >= TOLERANCES["fp32"].min_cosine
    assert compared[("sam_decoder_fp16", "low_res_masks")].mask_iou >= TOLERANCES["fp16"].min_iou
    assert compared[("sam_decoder", "low_res_masks")].max_abs < compared[("sam_decoder_fp16", "low_res_masks")].max_abs
    assert parity_ok(rows)


def test_tensorrt_rows_run_or_say_why_not(rows: list[ParityRow]) -> None:
    trt = [r for r in rows if r.backend == "trt"]
    assert {r.artefact for r in trt} == {"sam_encoder_trt", "sam_decoder_trt"}
    if TRT_REASON is None:
        assert all(r.status == "pass" for r in trt), format_table(rows)
    else:
        assert all(r.status == "skipped" and r.note == TRT_REASON for r in trt)


def test_table_and_command(rows: list[ParityRow], folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["artefact", "backend", "output", "max_abs"] and len(lines) == len(rows) + 1
    assert main([str(folder), "-q"]) == 0
    assert capsys.readouterr().out.strip() == table


def test_a_perturbed_model_fails(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    shutil.copytree(folder, out)
    manifest = load_manifest(out)
    model = onnx.load(str(out / "sam_encoder.onnx"))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype) * 0.1 * values.std()
    weight.CopyFrom(numpy_helper.from_array(values + noise, weight.name))
    onnx.save(model, str(out / "sam_encoder.onnx"))
    manifest.artefacts = {"sam_encoder": manifest.artefacts["sam_encoder"]}
    manifest.artefacts["sam_encoder"].sha256 = sha256_file(out / "sam_encoder.onnx")
    manifest.save()
    rows = check_parity(out)
    assert [r.status for r in rows if r.backend == "ort-cpu"] == ["FAIL"]
    assert not parity_ok(rows)


def test_an_artefact_without_a_reference_is_skipped(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    shutil.copytree(folder, out)
    manifest = load_manifest(out)
    manifest.artefacts = {"sam_encoder": manifest.artefacts["sam_encoder"]}
    manifest.artefacts["sam_encoder"].extra["source_key"] = "tiny:" + "f" * 64 + ":"
    manifest.save()
    rows = check_parity(out)
    assert [r.status for r in rows if r.backend == "ort-cpu"] == ["skipped"]
    assert "pass the checkpoint it was exported from" in rows[0].note


def test_judge_and_mask_iou() -> None:
    ref = np.linspace(-1, 1, 2 * 4 * 8 * 8, dtype=np.float32).reshape(2, 4, 8, 8)
    metrics, ok = judge(ref, ref + 1e-5, "low_res_masks", TOLERANCES["fp32"])
    assert ok and metrics["outliers"] == 0 and metrics["mask_iou"] == 1.0
    flipped = ref.copy()
    flipped[0, 0] *= -1
    assert mean_mask_iou(ref, flipped) < 1.0
    assert not judge(ref, flipped, "low_res_masks", TOLERANCES["fp16"])[1]
    assert mean_mask_iou(np.full((1, 4, 4), -1.0), np.full((1, 4, 4), -2.0)) == 1.0


def test_the_feature_engine_is_checked_against_its_resnet(plusplus_engines: Path) -> None:
    rows = [r for r in check_parity(plusplus_engines) if r.artefact == "resnet50_features"]
    assert [(r.backend, r.output, r.status) for r in rows] == [("ort-cpu", "features", "pass")], format_table(rows)
    assert rows[0].cosine >= TOLERANCES["fp32"].min_cosine
