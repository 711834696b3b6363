"""Models above protobuf's 2 GB cap (SAM vit_h, vit_l): the large-model export path, forced on the tiny SAM by
lowering `onnx_io.LARGE_MODEL_BYTES`, and (marked slow) a real vit_h random-weights export.

The forced path must give the same outputs as the normal path (same weights, same graph up to onnxslim's
fusions; tolerance: float32 rounding), keep every model's weights in one `<name>.onnx.data` file whose hash
the manifest records and checks, and reuse or redo artefacts as the normal path does.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import TINY_SEED

from persense.export import onnx_io
from persense.export.artefacts import external_data_files
from persense.export.cli import main as export
from persense.export.precision.error import sample_feeds
from persense.runtime.backends.choice import open_engine
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import load_manifest, sha256_file
from persense.runtime.models.sam import SamEngines

NAMES = ("sam_encoder", "sam_decoder")
# every artefact --fp16 --int8 writes for the tiny SAM
WRITTEN = ("sam_encoder", "sam_encoder_fp16", "sam_encoder_int8", "sam_decoder", "sam_decoder_fp16", "sam_decoder_int8")
MIN_FP16_COSINE = 0.999
MIN_INT8_COSINE = 0.99
PEAK_RSS_LIMIT_GB = 12.0


def export_large(folder: Path, *flags: str) -> None:
    """persense-export of the tiny SAM with every model sent down the large-model path, most weights detached."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_io, "LARGE_MODEL_BYTES", 0)
        patch.setattr(onnx_io, "DETACH_MIN_BYTES", 1024)  # the tiny model's weights are small
        assert export(["--model", "tiny", "--seed", str(TINY_SEED), "--out", str(folder), "-q", *flags]) == 0


@pytest.fixture(scope="module")
def large_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny engines (FP32, FP16, INT8) exported through the large-model path."""
    folder = tmp_path_factory.mktemp("large") / "engines"
    export_large(folder, "--fp16", "--int8")
    return folder


@pytest.fixture
def large_copy(large_engines: Path, tmp_path: Path) -> Path:
    """A private copy of those engines, to tamper with."""
    folder = tmp_path / "engines"
    shutil.copytree(large_engines, folder)
    return folder


@pytest.mark.parametrize("name", WRITTEN)
def test_weights_live_in_one_hashed_external_file(large_engines: Path, name: str) -> None:
    manifest = load_manifest(large_engines)
    assert set(manifest.artefacts) == set(WRITTEN)
    art = manifest.artefact(name)
    model = onnx.load(str(large_engines / art.file), load_external_data=False)
    assert external_data_files(model) == {art.file + ".data"} == {art.extra["data_file"]}
    data = large_engines / art.extra["data_file"]
    assert art.extra["data_sha256"] == sha256_file(data)
    assert (large_engines / art.file).stat().st_size < data.stat().st_size
    onnx.checker.check_model(str(large_engines / art.file))


@pytest.mark.parametrize("name", NAMES)
def test_large_path_matches_the_normal_path(large_engines: Path, tiny_engines: Path, name: str) -> None:
    normal, large = load_manifest(tiny_engines), load_manifest(large_engines)
    assert large.artefact(name).inputs == normal.artefact(name).inputs
    assert large.artefact(name).outputs == normal.artefact(name).outputs
    feeds = sample_feeds(normal.artefact(name), seed=5)
    want = open_engine(normal, name).run(feeds)
    got = open_engine(large, name).run(feeds)
    assert set(got) == set(want)
    for output, value in want.items():
        np.testing.assert_allclose(got[output], value, rtol=1e-5, atol=1e-6, err_msg=output)


def test_reduced_precision_copies_of_large_models_meet_their_thresholds(large_engines: Path) -> None:
    manifest = load_manifest(large_engines)
    for suffix, key, floor in (("_fp16", "fp16_error", MIN_FP16_COSINE), ("_int8", "int8_error", MIN_INT8_COSINE)):
        error = manifest.artefact("sam_encoder" + suffix).extra[key]["outputs"]["image_embeddings"]
        assert error["cosine"] >= floor, suffix
    SamEngines.from_manifest(manifest, "ort-cpu", precision="fp16", threads=1)


def test_tampered_external_data_is_refused(large_copy: Path) -> None:
    with open(large_copy / "sam_encoder.onnx.data", "r+b") as handle:
        handle.seek(8192)
        byte = handle.read(1)
        handle.seek(8192)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(PersenseError, match="sam_encoder.onnx.data: sha256 .* does not match the manifest.*re-export"):
        SamEngines.from_manifest(load_manifest(large_copy), "ort-cpu")


def test_missing_external_data_is_refused(large_copy: Path) -> None:
    (large_copy / "sam_decoder.onnx.data").unlink()
    with pytest.raises(PersenseError, match="sam_decoder.onnx.data: external weights of sam_decoder.onnx are missing"):
        SamEngines.from_manifest(load_manifest(large_copy), "ort-cpu")


def test_export_reuses_intact_large_models_and_redoes_a_tampered_one(large_copy: Path) -> None:
    files = sorted(large_copy.glob("*.onnx*"))
    before = {p.name: p.stat().st_mtime_ns for p in files}
    export_large(large_copy, "--fp16", "--int8")
    assert {p.name: p.stat().st_mtime_ns for p in files} == before
    (large_copy / "sam_encoder.onnx.data").write_bytes(b"\0" * 16)
    export_large(large_copy)
    manifest = load_manifest(large_copy)
    assert (large_copy / "sam_encoder.onnx.data").stat().st_mtime_ns != before["sam_encoder.onnx.data"]
    assert (large_copy / "sam_decoder.onnx.data").stat().st_mtime_ns == before["sam_decoder.onnx.data"]
    SamEngines.from_manifest(manifest, "ort-cpu", threads=1)


def _model(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray]) -> ir.Model:
    """A one-input onnx_ir model over float32 `x` [128, 64] with the given nodes and weights."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [128, 64])
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [x],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]))


def test_only_large_weights_that_meet_computed_values_are_detached() -> None:
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((64, 512), dtype=np.float32),  # MatMul(x, w): detached
        "folded": rng.standard_normal((512, 128), dtype=np.float32),  # Transpose(folded): folded, kept
        "bias": rng.standard_normal(512, dtype=np.float32),
    }  # below DETACH_MIN_BYTES: kept
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["h"]),
        onnx.helper.make_node("Transpose", ["folded"], ["t"]),
        onnx.helper.make_node("Add", ["h", "t"], ["s"]),
        onnx.helper.make_node("Add", ["s", "bias"], ["y"]),
    ]
    model = _model(nodes, weights)
    detached = {n for n, v in model.graph.initializers.items() if onnx_io._detachable(v)}
    assert detached == {"w"}


def test_a_synthetic_model_saves_through_the_large_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weights = {"w": rng.standard_normal((64, 512), dtype=np.float32), "b": rng.standard_normal(512, dtype=np.float32)}
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Add", ["h", "b"], ["y"])]
    path = tmp_path / "m.onnx"
    onnx_io.save_large(_model(nodes, weights), path)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["x"]
    assert external_data_files(model) == {"m.onnx.data"}
    import onnxruntime as ort

    x = rng.standard_normal((128, 64), dtype=np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weights["w"] + weights["b"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_vit_h_random_weights_exports_within_the_memory_budget(tmp_path: Path) -> None:
    out = tmp_path / "engines"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "persense.export.cli",
            "--model",
            "vit_h",
            "--random-weights",
            "--out",
            str(out),
            "--fp16",
            "-q",
        ],
        check=True,
    )
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # kilobytes on Linux
    assert peak_gb < PEAK_RSS_LIMIT_GB
    manifest = load_manifest(out)
    data = json.loads((out / "manifest.json").read_text())["artefacts"]
    assert data["sam_encoder"]["extra"]["data_file"] == "sam_encoder.onnx.data"
    for name in data:
        manifest.verified_path(name)
    assert data["sam_encoder_fp16"]["extra"]["fp16_error"]["outputs"]["image_embeddings"]["cosine"] >= MIN_FP16_COSINE
