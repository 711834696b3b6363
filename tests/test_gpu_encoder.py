"""The fused-attention GPU encoder: exact against segment-anything, its exports against sam_encoder on ORT-CPU,
FP16 accuracy, its place in persense-export's manifest and the runtime's choice of it on ort-cuda only."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from persense.export.sam.gpu_encoder import ATTENTION_FORMS, FusedAttention, export_gpu_encoder, gpu_encoder
from persense.export.sam.graphs import export_encoder
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import load_manifest
from persense.runtime.metrics import cosine
from persense.runtime.models.sam import GPU_ENCODER, SamEngines, engine_names

TORCH_ATOL = 1e-4  # GPU-form module vs segment-anything's encoder, FP32 on the CPU
ORT_ATOL = 5e-4  # sam_encoder_gpu vs sam_encoder, both on ONNX Runtime CPU (embeddings of magnitude ~1-5)
FP16_COSINE = 0.999
# The attention nodes each form must contain, one per encoder block (and no separate Softmax where fused).
ATTENTION_NODES = {
    "attention": ("", "Attention"),
    "mha": ("com.microsoft", "MultiHeadAttention"),
    "decomposed": ("", "Softmax"),
    "folded": ("", "Attention"),
}


@pytest.fixture(scope="module")
def sam_with_rel_pos(tiny_sam):
    """The tiny SAM with random (not zero-initialised) relative positions, different along height and width."""
    sam = copy.deepcopy(tiny_sam)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.copy_(torch.randn(block.attn.rel_pos_h.shape, generator=g))
            block.attn.rel_pos_w.copy_(torch.randn(block.attn.rel_pos_w.shape, generator=g) * 0.5)
    return sam


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A normalised, padded input image."""
    return torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def exported(sam_with_rel_pos, tmp_path_factory):
    """sam_encoder and sam_encoder_gpu in every form, exported once: {name: path}."""
    folder = tmp_path_factory.mktemp("gpu_encoder")
    paths = {"sam_encoder": folder / "sam_encoder.onnx"}
    export_encoder(sam_with_rel_pos, paths["sam_encoder"], "tiny", "random")
    for form in ATTENTION_FORMS:
        paths[form] = folder / f"{GPU_ENCODER}_{form}.onnx"
        export_gpu_encoder(sam_with_rel_pos, paths[form], "tiny", "random", form)
    return paths


@pytest.mark.parametrize("form", ATTENTION_FORMS)
def test_gpu_form_module_matches_segment_anything(sam_with_rel_pos, image, form):
    fused = gpu_encoder(sam_with_rel_pos.image_encoder, form)
    assert all(isinstance(block.attn, FusedAttention) for block in fused.blocks)  # windowed and global
    with torch.no_grad():
        expected = sam_with_rel_pos.image_encoder(image)
        got = fused(image)
    assert got.shape == (1, 256, 64, 64)
    torch.testing.assert_close(got, expected, atol=TORCH_ATOL, rtol=0)


def test_relative_positions_matter_in_this_check(sam_with_rel_pos, tiny_sam, image):
    with torch.no_grad():
        difference = (sam_with_rel_pos.image_encoder(image) - tiny_sam.image_encoder(image)).abs().max()
    assert difference > 100 * TORCH_ATOL  # a bias dropped or transposed would fail the parity test above


def test_unknown_form_is_refused(tiny_sam):
    with pytest.raises(PersenseError, match="unknown attention form 'flash'"):
        gpu_encoder(tiny_sam.image_encoder, "flash")


@pytest.mark.parametrize("form", ATTENTION_FORMS)
def test_exported_gpu_encoder_matches_sam_encoder_on_ort_cpu(exported, image, form):
    model = onnx.load(str(exported[form]))
    domain, op = ATTENTION_NODES[form]
    assert sum(n.domain == domain and n.op_type == op for n in model.graph.node) == 2  # one per block
    if form != "decomposed":
        assert not any(n.op_type == "Softmax" for n in model.graph.node)
    if form == "folded":  # query, key, value and no [S,S] mask
        assert all([i for i in n.input if i] == list(n.input[:3]) for n in model.graph.node if n.op_type == op)
    feeds = {"image": image.numpy()}
    expected = OrtEngine(exported["sam_encoder"], threads=2).run(feeds)["image_embeddings"]
    got = OrtEngine(exported[form], threads=2).run(feeds)["image_embeddings"]
    assert got.shape == expected.shape == (1, 256, 64, 64)
    assert np.abs(got - expected).max() <= ORT_ATOL


@pytest.mark.parametrize("form", ["attention", "mha", "folded"])
def test_fp16_gpu_encoder_keeps_attention_in_fp16_and_is_accurate(exported, image, form, tmp_path):
    from persense.export.precision.fp16 import to_fp16

    model = to_fp16(exported[form])
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    _, op = ATTENTION_NODES[form]
    attention = [n for n in model.graph.node if n.op_type == op]
    assert attention and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT16 for n in attention)
    path = tmp_path / "fp16.onnx"
    onnx.save(model, str(path))
    feeds = {"image": image.numpy()}
    reference = OrtEngine(exported[form], threads=2).run(feeds)["image_embeddings"]
    got = OrtEngine(path, threads=2).run(feeds)["image_embeddings"]
    assert got.dtype == np.float32
    assert cosine(got, reference) >= FP16_COSINE


@pytest.fixture(scope="module")
def gpu_folder(tiny_engines, tmp_path_factory):
    """A copy of the tiny engines folder to which persense-export added the GPU encoder and FP16 models."""
    from persense.export.cli import main

    folder = tmp_path_factory.mktemp("engines_gpu") / "engines"
    shutil.copytree(tiny_engines, folder)
    assert main(["--model", "tiny", "--seed", "0", "--out", str(folder), "--gpu-encoder", "--fp16", "-q"]) == 0
    return folder


def test_export_records_the_gpu_encoder_with_its_own_source_key(gpu_folder):
    artefacts = json.loads((gpu_folder / "manifest.json").read_text())["artefacts"]
    gpu, cpu = artefacts[GPU_ENCODER], artefacts["sam_encoder"]
    assert gpu["file"] == "sam_encoder_gpu.onnx" and gpu["opset"] == 23 and gpu["kind"] == "sam_encoder"
    assert gpu["extra"]["attention"] == "attention" and gpu["extra"]["backends"] == ["ort-cuda"]
    assert gpu["extra"]["source_key"] == cpu["extra"]["source_key"] + ":attention"
    assert gpu["inputs"] == cpu["inputs"] and gpu["outputs"] == cpu["outputs"]
    fp16 = artefacts[GPU_ENCODER + "_fp16"]
    assert fp16["precision"] == "fp16" and fp16["extra"]["fp32_sha256"] == gpu["sha256"]
    assert GPU_ENCODER + "_int8" not in artefacts


def test_reexport_keeps_the_gpu_encoder_only_for_the_same_weights(gpu_folder, tmp_path):
    from persense.export.cli import main

    folder = tmp_path / "engines"
    shutil.copytree(gpu_folder, folder)
    before = json.loads((folder / "manifest.json").read_text())["artefacts"][GPU_ENCODER]
    assert main(["--model", "tiny", "--seed", "0", "--out", str(folder), "-q"]) == 0
    assert load_manifest(folder).artefacts[GPU_ENCODER].sha256 == before["sha256"]  # kept without --gpu-encoder
    assert main(["--model", "tiny", "--seed", "1", "--out", str(folder), "-q"]) == 0
    assert not {GPU_ENCODER, GPU_ENCODER + "_fp16"} & set(load_manifest(folder).artefacts)  # other weights: dropped


def test_runtime_picks_the_gpu_encoder_on_ort_cuda_only(gpu_folder, tiny_engines):
    manifest, plain = load_manifest(gpu_folder), load_manifest(tiny_engines)
    assert engine_names(manifest, "ort-cuda", "fp32") == {"sam_encoder": GPU_ENCODER, "sam_decoder": "sam_decoder"}
    assert engine_names(manifest, "ort-cuda", "fp16")["sam_encoder"] == GPU_ENCODER + "_fp16"
    assert engine_names(manifest, "ort-cuda", "int8")["sam_encoder"] == "sam_encoder_int8"  # no GPU int8 form
    assert engine_names(manifest, "ort-cpu", "fp16")["sam_encoder"] == "sam_encoder_fp16"
    assert engine_names(manifest, "trt", "fp16")["sam_encoder"] == "sam_encoder"
    assert engine_names(plain, "ort-cuda", "fp32")["sam_encoder"] == "sam_encoder"


def test_from_manifest_opens_the_gpu_encoder_for_ort_cuda(gpu_folder, monkeypatch):
    opened = []
    monkeypatch.setattr(
        "persense.runtime.models.sam.open_engine",
        lambda manifest, name, backend, threads, **_: opened.append((name, backend)),
    )
    manifest = load_manifest(gpu_folder)
    SamEngines.from_manifest(manifest, "ort-cuda", precision="fp16")
    SamEngines.from_manifest(manifest, "ort-cpu", precision="fp16")
    assert opened == [
        (GPU_ENCODER + "_fp16", "ort-cuda"),
        ("sam_decoder_fp16", "ort-cuda"),
        ("sam_encoder_fp16", "ort-cpu"),
        ("sam_decoder_fp16", "ort-cpu"),
    ]


def test_no_tensorrt_engine_is_built_for_the_gpu_encoder(gpu_folder, monkeypatch):
    from persense.export.precision import tensorrt as trt_build

    built = []
    monkeypatch.setattr(trt_build, "tensorrt_unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_build, "build_engine", lambda art, folder, old: built.append(art.file) or art)
    manifest = load_manifest(gpu_folder)
    trt_build.fp16_artefacts(manifest.artefacts, gpu_folder, manifest)
    assert sorted(built) == ["sam_decoder.onnx", "sam_encoder.onnx"]
