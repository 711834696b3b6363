"""INT8 ONNX models for the CPU: ONNX Runtime dynamic quantisation of the MatMul/Conv weights.

Weights become int8 per tensor, activations are quantised on the fly; LayerNorm, softmax and the
element-wise ops stay FP32. On our CPU (AVX-512 VNNI) this is the fast variant of `ort-cpu`; the error
against FP32 is measured at conversion and recorded in the manifest (`extra["int8_error"]`).
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

QUANTISED_KINDS = ("sam_encoder", "sam_decoder")


def convert_int8(artefact: Artefact, folder: Path) -> Artefact:
    """Write `<name>_int8.onnx` next to an FP32 artefact and return its manifest entry with the measured error."""
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
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=large)
    finally:
        root.setLevel(level)
    onnx.checker.check_model(str(dst))
    extra = variant_extra(artefact, time.perf_counter() - start,
                          method="onnxruntime.quantization.quantize_dynamic(QInt8)")
    int8 = describe(dst, artefact.kind, "int8", artefact.model_type, artefact.source_checkpoint, extra)
    int8.extra["int8_error"] = measure_error(artefact, src, dst)
    log.info("wrote %s (%.1f s)", dst.name, time.perf_counter() - start)
    return int8


def int8_artefacts(artefacts: dict[str, Artefact], folder: Path, previous: Manifest | None) -> dict[str, Artefact]:
    """`--int8`: INT8 entries for SAM's FP32 encoder and decoder, reusing unchanged ones."""
    return {name + INT8_SUFFIX: reusable_variant(previous, name, art, INT8_SUFFIX) or convert_int8(art, folder)
            for name, art in artefacts.items() if name in QUANTISED_KINDS}
