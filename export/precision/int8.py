"""The INT8 SAM models for the CPU: ONNX Runtime dynamic quantisation of their matrix products.

Weights become int8 per tensor, activations are quantised on the fly; LayerNorm, softmax and the element-wise
ops stay FP32. The encoder: every MatMul/Gemm, the attention products (activation x activation) included, but
not the convolutions (patch embedding, neck). The decoder: only the mask upscaling's two per-pixel products
(39 % of its multiply-adds); quantising its attention products too cost mask IoU below the 0.98 gate
(docs/DESIGN.md "INT8"). The error against FP32 is measured at conversion and recorded in the manifest
(`extra["int8_error"]`).

One artefact for every x86 CPU: without VNNI (AVX2 only) ONNX Runtime's u8s8 kernels add pairs of u8 x s8
products in saturating 16-bit lanes (VPMADDUBSW), so the weights keep 7 bits (`reduce_range`, |w| <= 64:
2 x 255 x 64 <= 32767) and no sum can saturate; with VNNI the same kernels run as fast (docs/DESIGN.md "INT8").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx

from persense.export.artefacts import external_data_files, reusable_variant
from persense.export.precision.error import variant_entry
from persense.export.sam.reassociated_decoder import UPSCALE_PRODUCTS
from persense.runtime.artefact_names import DECODER, ENCODER, RUNS_IN, variant_name
from persense.runtime.manifest import Artefact, Manifest

log = logging.getLogger(__name__)

# quantize_dynamic's options per model: the encoder's attention products too (MatMulConstBOnly=False), MatMul/Gemm
# only (ORT's ConvInteger is slower than the FP32 Conv); the decoder's named upscaling products only; measured in
# docs/DESIGN.md "INT8"
QUANTISE_OPTIONS: dict[str, dict[str, bool]] = {ENCODER: {"MatMulConstBOnly": False}, DECODER: {}}
QUANTISED_OPS: dict[str, list[str]] = {ENCODER: ["MatMul", "Gemm"]}
QUANTISED_NODES: dict[str, list[str]] = {DECODER: list(UPSCALE_PRODUCTS)}
REDUCE_RANGE = True  # 7-bit weights: no u8s8 pair sum saturates on CPUs without VNNI (module docstring)


def int8_method(name: str) -> str:
    """The quantisation call used for artefact `name`, as recorded in its INT8 entry (`extra["method"]`)."""
    options = "".join(f", {key}={value}" for key, value in QUANTISE_OPTIONS[name].items())
    ops = f", op_types_to_quantize={QUANTISED_OPS[name]}" if name in QUANTISED_OPS else ""
    nodes = f", nodes_to_quantize={QUANTISED_NODES[name]}" if name in QUANTISED_NODES else ""
    return f"onnxruntime.quantization.quantize_dynamic(QInt8, reduce_range={REDUCE_RANGE}{ops}{nodes}{options})"


def quantise(name: str, src: Path, dst: Path) -> None:
    """Write the INT8 form of ONNX model `src` (quantised as artefact `name` is) to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # a source with external weights is above (or forced onto) the large-model path: so is its quantised copy
    model = onnx.load(str(src), load_external_data=False)
    large = bool(external_data_files(model))
    missing = set(QUANTISED_NODES.get(name, ())) - {node.name for node in model.graph.node}
    if missing:
        raise RuntimeError(f"{src.name} has no node(s) {sorted(missing)} to quantise: export it again (--force)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a generic pre-processing hint on the root logger
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            reduce_range=REDUCE_RANGE,
            use_external_data_format=large,
            op_types_to_quantize=QUANTISED_OPS.get(name),
            nodes_to_quantize=QUANTISED_NODES.get(name),
            extra_options=dict(QUANTISE_OPTIONS[name]),
        )
    finally:
        root.setLevel(level)


def convert_int8(name: str, artefact: Artefact, folder: Path) -> Artefact:
    """Write `<name>_int8.onnx` next to FP32 artefact `name` and return its manifest entry with the measured error."""
    start = time.perf_counter()
    src = folder / artefact.file
    dst = folder / (variant_name(Path(artefact.file).stem, "int8") + ".onnx")
    quantise(name, src, dst)
    return variant_entry(artefact, src, dst, "int8", start, method=int8_method(name))


def int8_artefacts(artefacts: dict[str, Artefact], folder: Path, previous: Manifest | None) -> dict[str, Artefact]:
    """`--int8`: the INT8 entries of SAM's FP32 encoder and decoder, reusing ones made the same way from the same
    files."""
    return {
        variant_name(name, "int8"): _reusable(previous, name, art) or convert_int8(name, art, folder)
        for name, art in artefacts.items()
        if name in RUNS_IN["int8"]
    }


def _reusable(previous: Manifest | None, name: str, artefact: Artefact) -> Artefact | None:
    """The previous INT8 entry of `name` if it is intact, from this FP32 file and made by today's method."""
    entry = reusable_variant(previous, name, artefact, "int8")
    return entry if entry is not None and entry.extra.get("method") == int8_method(name) else None
