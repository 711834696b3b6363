"""FP16 ONNX models: manifest entries, FP32 islands for sensitive ops, and measured error vs FP32 (ORT CPU).

Thresholds (tiny random SAM, seeded sample inputs): encoder embedding cosine >= 0.9999 and max abs error
<= 1% of the largest FP32 value; decoder mean mask IoU (logits > 0) >= 0.99 and IoU-score cosine >= 0.9999.
Structure: every MatMul/Gemm/Conv computes in FP16; casts sit only at the borders of FP32 islands, one per
tensor that crosses a border, with no FP16 element-wise node left between two islands (cast ping-pong).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from persense.export.artefacts import reusable_variant
from persense.export.precision.error import compare_outputs, sample_feeds
from persense.export.precision.fp16 import main
from persense.export.precision.fp16_islands import GROWABLE_OPS, SENSITIVE_OPS, value_types
from persense.runtime.artefact_names import variant_name
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.manifest import Manifest, load_manifest

MIN_EMBEDDING_COSINE = 0.9999
MAX_EMBEDDING_ABS_FRACTION = 0.01
MIN_MASK_IOU = 0.99
NAMES = ("sam_encoder", "sam_decoder")
HEAVY_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


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
    fp32, fp16 = manifest.artefact(name), manifest.artefact(variant_name(name, "fp16"))
    assert fp16.file == f"{name}_fp16.onnx"
    assert fp16.precision == "fp16" and fp16.kind == fp32.kind
    assert fp16.extra["source_key"] == fp32.extra["source_key"]
    assert fp16.extra["fp32_sha256"] == fp32.sha256
    assert fp16.inputs == fp32.inputs and fp16.outputs == fp32.outputs  # float32 I/O kept
    assert set(fp16.extra["fp16_error"]["outputs"]) == {o.name for o in fp32.outputs}
    manifest.verified_path(variant_name(name, "fp16"))
    assert (manifest.folder / fp16.file).stat().st_size < 0.6 * (manifest.folder / fp32.file).stat().st_size


@pytest.mark.parametrize("name", NAMES)
def test_sensitive_ops_stay_fp32_and_weights_are_fp16(manifest: Manifest, name: str) -> None:
    model = onnx.shape_inference.infer_shapes(
        onnx.load(str(manifest.folder / manifest.artefact(variant_name(name, "fp16")).file))
    )
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
    assert reusable_variant(manifest, "sam_decoder", fp32, "fp16") is manifest.artefact("sam_decoder_fp16")
    changed = replace(fp32, sha256="0" * 64)
    assert reusable_variant(manifest, "sam_decoder", changed, "fp16") is None
    assert reusable_variant(None, "sam_decoder", fp32, "fp16") is None


class Fp16Graph:
    """An FP16 graph's FP32 islands (non-Cast nodes writing float32) and its FP32<->FP16 casts."""

    def __init__(self, path: Path) -> None:
        self.graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
        self.types = value_types(self.graph)
        self.producer = {t: n for n in self.graph.node for t in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for t in node.input:
                self.consumers.setdefault(t, []).append(node)
        self.island = {
            n.name for n in self.graph.node if n.op_type != "Cast" and any(self.types.get(o) == FLOAT for o in n.output)
        }
        self.casts = [
            n
            for n in self.graph.node
            if n.op_type == "Cast" and {self.types.get(n.input[0]), self.to(n)} == {FLOAT, FLOAT16}
        ]

    @staticmethod
    def to(cast: onnx.NodeProto) -> int:
        """The type a Cast node casts to."""
        return next(a.i for a in cast.attribute if a.name == "to")

    def island_count(self) -> int:
        """Connected components of island nodes."""
        parent = {name: name for name in self.island}

        def root(name: str) -> str:
            while parent[name] != name:
                name = parent[name]
            return name

        for node in self.graph.node:
            for t in node.input:
                source = self.producer.get(t)
                if node.name in self.island and source is not None and source.name in self.island:
                    parent[root(source.name)] = root(node.name)
        return len({root(name) for name in self.island})

    def from_island(self, cast: onnx.NodeProto) -> bool:
        """Whether an FP32->FP16 cast reads an island's output or a graph input."""
        source = self.producer.get(cast.input[0])
        return source is None or source.name in self.island

    def into_island(self, cast: onnx.NodeProto) -> bool:
        """Whether an FP16->FP32 cast feeds only islands or a graph output."""
        outputs = {o.name for o in self.graph.output}
        return cast.output[0] in outputs or all(n.name in self.island for n in self.consumers[cast.output[0]])

    def sandwiched(self) -> list[str]:
        """FP16 element-wise nodes whose inputs all come out of islands and whose outputs all go into islands."""
        found = []
        for node in self.graph.node:
            if node.name in self.island or node.op_type not in GROWABLE_OPS:
                continue
            inputs = [self.producer[t] for t in node.input if t in self.producer]
            users = [u for t in node.output for u in self.consumers.get(t, [])]
            if (
                inputs
                and users
                and all(n.op_type == "Cast" and self.from_island(n) for n in inputs)
                and all(u.op_type == "Cast" and self.to(u) == FLOAT for u in users)
            ):
                found.append(node.name)
        return found


@pytest.fixture(scope="module")
def fp16_graphs(manifest: Manifest) -> dict[str, Fp16Graph]:
    """The FP16 encoder and decoder graphs, shape-inferred."""
    return {name: Fp16Graph(manifest.folder / manifest.artefact(variant_name(name, "fp16")).file) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_matmul_conv_and_gemm_compute_in_fp16(fp16_graphs: dict[str, Fp16Graph], name: str) -> None:
    g = fp16_graphs[name]
    heavy = [n for n in g.graph.node if n.op_type in HEAVY_OPS]
    assert heavy
    assert all(g.types[t] == FLOAT16 for n in heavy for t in n.input[:2]), [n.name for n in heavy]


@pytest.mark.parametrize("name", NAMES)
def test_casts_sit_only_at_island_borders_once_per_tensor(fp16_graphs: dict[str, Fp16Graph], name: str) -> None:
    g = fp16_graphs[name]
    assert g.casts and g.island_count() > 1
    assert all(g.from_island(c) if g.to(c) == FLOAT16 else g.into_island(c) for c in g.casts)
    assert len({(c.input[0], g.to(c)) for c in g.casts}) == len(g.casts)  # one cast per crossing tensor
    assert not [c.name for c in g.casts if g.producer.get(c.input[0]) in g.casts]  # no round trips
    assert g.sandwiched() == []


def test_encoder_islands_are_entered_and_left_once(fp16_graphs: dict[str, Fp16Graph]) -> None:
    g = fp16_graphs["sam_encoder"]  # LayerNorms, softmaxes and the neck's two LayerNorm2d, one after another
    graph_io = len(g.graph.input) + len(g.graph.output)
    assert len(g.casts) <= 2 * g.island_count() + graph_io
