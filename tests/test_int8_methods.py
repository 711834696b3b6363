"""The INT8 models: the encoder's attention products quantised, its convolutions not; the decoder's upscaling
products only; re-made when the method changes; exact on CPUs without VNNI (no saturating 16-bit sums)."""

from __future__ import annotations

import collections
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from persense.export.cli import main as export
from persense.export.precision.int8 import int8_method, quantise
from persense.runtime.artefact_names import ENCODER

ENCODER_COSINE = 0.999  # tiny random encoder, INT8 vs FP32 embedding on the test scene (measured 0.99986)
INT16_MAX = 32767  # VPMADDUBSW (u8s8 without VNNI) adds two u8 x s8 products into a saturating int16
QEMU = "qemu-x86_64"  # user-mode emulator (Debian qemu-user): runs this Python on an emulated CPU
AVX2_CPU = "EPYC-Rome"  # AMD Zen 2: AVX2, no AVX-512, no VNNI (the hosts where the saturation was seen)


def op_counts(path: Path) -> collections.Counter:
    """Node count per op type."""
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def entries(folder: Path) -> dict:
    """The manifest's artefact entries."""
    return json.loads((folder / "manifest.json").read_text())["artefacts"]


def test_encoder_quantises_every_matmul_and_the_decoder_its_upscaling(int8_engines: Path) -> None:
    fp32, int8 = op_counts(int8_engines / "sam_encoder.onnx"), op_counts(int8_engines / "sam_encoder_int8.onnx")
    assert fp32["MatMul"] > 0 and int8["MatMul"] == 0  # attention products: no float MatMul left
    assert int8["MatMulInteger"] == fp32["MatMul"] + fp32["Gemm"]
    assert int8["ConvInteger"] == 0 and int8["Conv"] == fp32["Conv"] > 0  # convolutions stay FP32 (faster)
    recorded = entries(int8_engines)
    assert recorded["sam_decoder_int8"]["extra"]["method"] == int8_method("sam_decoder")
    assert "nodes_to_quantize=['upscale_product_1', 'upscale_product_2']" in int8_method("sam_decoder")
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


def test_quantised_weights_leave_no_pair_sum_to_saturate(int8_engines: Path) -> None:
    model = onnx.load(str(int8_engines / "sam_encoder_int8.onnx"))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    products = [node for node in model.graph.node if node.op_type == "MatMulInteger"]
    constant = [weights[node.input[1]] for node in products if node.input[1] in weights]
    assert constant and all(w.dtype == np.int8 for w in constant)
    assert 2 * 255 * max(int(np.abs(w).max()) for w in constant) <= INT16_MAX  # u8 activations x 7-bit weights
    # activation x activation products: both sides DynamicQuantizeLinear's uint8 (u8u8 kernels widen to 32 bits)
    assert all(producers[node.input[1]] == "DynamicQuantizeLinear" for node in products if node.input[1] not in weights)


def saturating_matmul(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A MatMul whose u8 x s8 pair sums exceed int16 at full weight range: (FP32 model, input, exact output)."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 1.0, (256, 32)).astype(np.float32)  # all near the max: quantised near +127
    x = rng.uniform(0.9, 1.0, (4, 256)).astype(np.float32)  # dynamic u8 quantisation maps these near 255
    x[:, 0] = 0.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "saturating",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = folder / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, x, x @ weight


RUN_ON_CPU = """
import sys, numpy as np, onnxruntime as ort
x, y = np.load(sys.argv[1]), np.load(sys.argv[2])
for model in sys.argv[3:]:
    out = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    print(float(np.abs(out - y).max() / np.abs(y).max()))
"""


@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} (Debian qemu-user) emulates an AVX2-only CPU")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="runs this x86-64 Python under an emulated x86-64 CPU")
def test_int8_products_hold_on_an_avx2_cpu_without_vnni(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, x, exact = saturating_matmul(tmp_path)
    quantise(ENCODER, fp32, tmp_path / "ours.onnx")
    quantize_dynamic(str(fp32), str(tmp_path / "full_range.onnx"), weight_type=QuantType.QInt8)  # 8-bit weights
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", exact)
    run = subprocess.run(
        [QEMU, "-cpu", AVX2_CPU, sys.executable, "-c", RUN_ON_CPU, *(str(tmp_path / f) for f in ("x.npy", "y.npy"))]
        + [str(tmp_path / "ours.onnx"), str(tmp_path / "full_range.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ours, full_range = (float(line) for line in run.stdout.split())
    assert full_range > 0.1  # the emulated CPU runs the saturating kernel: 8-bit weights lose 30 % of the sum
    assert ours < 0.005  # 7-bit weights: only the quantisation step (measured 0.0011)
