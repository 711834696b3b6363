"""INT8 ONNX models for the CPU: ONNX Runtime dynamic quantisation of the MatMul/Gemm/Conv weights.

Weights become int8 per tensor, activations are quantised on the fly; LayerNorm, softmax and the
element-wise ops stay FP32. In the encoder the attention products (activation x activation MatMuls) are
quantised too, its convolutions (patch embedding, neck) are not. On our CPU (AVX-512 VNNI) this is the fast
variant of `ort-cpu`; the error against FP32 is measured at conversion and recorded in the manifest
(`extra["int8_error"]`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx

from persense.export.artefacts import INT8_SUFFIX, describe, external_data_files, reusable_variant, variant_extra
from persense.export.parity import measure_error
from persense.runtime.manifest import Artefact, Manifest

log = logging.getLogger(__name__)

# quantize_dynamic extra options per model. Encoder: the attention products too (vit_b, 2 cores, paired runs:
# 1.30x faster than weights-only INT8, embedding cosine to FP32 0.99970 against 0.99973). Decoder: weights
# only (its attention products quantised: no gain per prompt, mean best-mask IoU to FP32 0.943 against 0.965).
QUANTISE_OPTIONS: dict[str, dict[str, bool]] = {"sam_encoder": {"MatMulConstBOnly": False}, "sam_decoder": {}}
QUANTISED_KINDS = tuple(QUANTISE_OPTIONS)
# Op types quantised per model (absent: quantize_dynamic's default list). Encoder: not its three Conv nodes, which
# ONNX Runtime runs as ConvInteger, about 4x slower than the FP32 Conv (vit_b, 2 shared cores, paired CPU time:
# encoder 1.04x faster without them, 1.07x with cpu_encoder's windowed blocks too; embedding cosine to the
# PyTorch model 0.99971 against 0.99956).
QUANTISED_OPS: dict[str, list[str]] = {"sam_encoder": ["MatMul", "Gemm"]}


def int8_method(name: str) -> str:
    """The quantisation call used for artefact `name`, as recorded in its INT8 entry (`extra["method"]`)."""
    options = "".join(f", {key}={value}" for key, value in QUANTISE_OPTIONS[name].items())
    ops = f", op_types_to_quantize={QUANTISED_OPS[name]}" if name in QUANTISED_OPS else ""
    return f"onnxruntime.quantization.quantize_dynamic(QInt8{ops}{options})"


def convert_int8(name: str, artefact: Artefact, folder: Path) -> Artefact:
    """Write `<name>_int8.onnx` next to FP32 artefact `name` and return its manifest entry with the measured error."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    src = folder / artefact.file
    dst = folder / (Path(artefact.file).stem + INT8_SUFFIX + ".onnx")
    # a source with external weights is above (or forced onto) the large-model path: so is its quantised copy
    large = bool(external_data_files(onnx.load(str(src), load_external_data=False)))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a generic pre-processing hint on the root logger
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            use_external_data_format=large,
            op_types_to_quantize=QUANTISED_OPS.get(name),
            extra_options=dict(QUANTISE_OPTIONS[name]),
        )
    finally:
        root.setLevel(level)
    onnx.checker.check_model(str(dst))
    extra = variant_extra(artefact, time.perf_counter() - start, method=int8_method(name))
    int8 = describe(dst, artefact.kind, "int8", artefact.model_type, artefact.source_checkpoint, extra)
    int8.extra["int8_error"] = measure_error(artefact, src, dst)
    log.info("wrote %s (%.1f s)", dst.name, time.perf_counter() - start)
    return int8


def int8_artefacts(artefacts: dict[str, Artefact], folder: Path, previous: Manifest | None) -> dict[str, Artefact]:
    """`--int8`: INT8 entries for SAM's FP32 encoder and decoder, reusing those made the same way from the same file."""
    return {
        name + INT8_SUFFIX: _reusable(previous, name, art) or convert_int8(name, art, folder)
        for name, art in artefacts.items()
        if name in QUANTISED_KINDS
    }


def _reusable(previous: Manifest | None, name: str, artefact: Artefact) -> Artefact | None:
    """The previous INT8 entry of `name` if it is intact, from this FP32 file and made by today's method."""
    entry = reusable_variant(previous, name, artefact, INT8_SUFFIX)
    return entry if entry is not None and entry.extra.get("method") == int8_method(name) else None
