"""Manifest names of the exported models and of their variants: built and taken apart here only."""

from __future__ import annotations

ENCODER = "sam_encoder"
GPU_ENCODER = "sam_encoder_gpu"  # the encoder with fused attention, exported for ORT-CUDA (--gpu-encoder)
DECODER = "sam_decoder"
COUNTR = "counter_countr"
DSALVANET = "counter_dsalvanet"
DETECTOR = "grounding_dino"
FEATURES = "resnet50_features"  # PerSense++'s ResNet-50 backbone (diversity-aware exemplar selection)
SAM_MODELS = (ENCODER, DECODER)

OV_INT8 = "ov_int8"  # the encoder quantised by NNCF for OpenVINO (an OpenVINO IR), what openvino runs for int8
# variants of an FP32 artefact (ONNX; ov_int8: OpenVINO IR); "_ov_int8" before "_int8" for source_name
PRECISION_SUFFIXES = {"fp16": "_fp16", OV_INT8: "_ov_int8", "int8": "_int8"}
ENGINE_SUFFIX = "_trt"  # a TensorRT plan built from an ONNX artefact
EXPORT_FLAGS = {"fp16": "--fp16", OV_INT8: "--openvino-int8", "int8": "--int8"}  # the persense-export flag per variant
# the models whose variants the runtime runs (--precision fp16 / int8); the counters always run their FP32 model,
# and OpenVINO's int8 runs the FP32 decoder
RUNS_IN = {
    "fp16": (ENCODER, GPU_ENCODER, DECODER, DETECTOR, FEATURES),
    "int8": (ENCODER, DECODER),
    OV_INT8: (ENCODER,),
}


def variant_name(name: str, precision: str) -> str:
    """The manifest name of the `precision` ONNX variant of FP32 artefact `name` (fp32: `name` itself)."""
    return name if precision == "fp32" else name + PRECISION_SUFFIXES[precision]


def export_flag(name: str) -> str | None:
    """The persense-export flag that writes variant or engine `name` (`sam_decoder_int8` -> `--int8`), or None."""
    if name.endswith(ENGINE_SUFFIX):
        return EXPORT_FLAGS["fp16"]  # --fp16 builds the TensorRT engines
    return next((EXPORT_FLAGS[p] for p, suffix in PRECISION_SUFFIXES.items() if name.endswith(suffix)), None)


def engine_name(name: str) -> str:
    """The manifest name of the TensorRT engine of ONNX artefact `name` (`sam_decoder` -> `sam_decoder_trt`)."""
    return name if name.endswith(ENGINE_SUFFIX) else name + ENGINE_SUFFIX


def source_name(name: str) -> str:
    """The FP32 ONNX artefact a variant or an engine was made from (`sam_encoder_gpu_fp16` -> `sam_encoder_gpu`)."""
    name = name.removesuffix(ENGINE_SUFFIX)
    for suffix in PRECISION_SUFFIXES.values():
        name = name.removesuffix(suffix)
    return name


def export_family(name: str) -> str:
    """The artefact made by the same export job from the same weights (`sam_encoder_gpu` -> `sam_encoder`)."""
    base = source_name(name)
    return ENCODER if base == GPU_ENCODER else base
