"""The backends and what each one means: the one table every module asks instead of comparing names."""

from __future__ import annotations

from dataclasses import dataclass

from persense.runtime.artefact_names import OV_INT8
from persense.runtime.errors import PersenseError

AUTO = "auto"  # resolved per machine by choice.resolve_backend; never picks openvino (an opt-in extra)
PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # every precision some backend runs, in the order the CLIs list them


@dataclass(frozen=True)
class Backend:
    """One execution backend of the SAM models and the models beside them."""

    name: str
    device: str  # "cpu" or "cuda": where its engines' buffers live
    precisions: tuple[str, ...]  # the --precision values it runs
    decode_chunk: int  # SAM decoder prompts per launch (docs/DESIGN.md "Decode chunk")
    serialised: bool  # its engines take one call at a time: PerSense's threads take turns
    side: str  # the backend of the models beside SAM (counters, detector)
    own_engines: bool  # runs engines built for it (TensorRT plans), not the ONNX models themselves
    built_precision: str | None = None  # the precision its engines are built in, whatever --precision says
    fallback: str | None = None  # where a model whose own engine is unusable runs instead
    variants: tuple[tuple[str, str], ...] = ()  # (precision, SAM encoder variant) where they differ

    def encoder_variant(self, precision: str) -> str:
        """The variant of the SAM encoder (artefact_names.PRECISION_SUFFIXES key or fp32) a precision runs."""
        return dict(self.variants).get(precision, precision)

    @property
    def on_gpu(self) -> bool:
        """Whether it needs a GPU (Ray reserves one per actor)."""
        return self.device == "cuda"

    def run_precision(self, precision: str) -> str:
        """The precision the SAM models really run in for a requested one (TensorRT: its engines' precision)."""
        return self.built_precision or precision


TABLE: dict[str, Backend] = {
    "ort-cpu": Backend("ort-cpu", "cpu", ("fp32", "fp16", "int8"), 4, False, "ort-cpu", False),
    "ort-cuda": Backend("ort-cuda", "cuda", ("fp32", "fp16", "int8"), 256, False, "ort-cuda", False),
    "trt": Backend("trt", "cuda", ("fp32", "fp16", "int8"), 256, True, "trt", True, "fp16", "ort-cuda"),
    # side models on ORT-CPU: a small share of a query, not measured on OpenVINO; bf16 is the encoder's inference
    # precision (OpenVINO compiles the FP32 ONNX models), not an artefact; int8 runs the NNCF-quantised encoder
    "openvino": Backend(
        "openvino",
        "cpu",
        ("fp32", "bf16", "int8"),
        4,
        False,
        "ort-cpu",
        False,
        variants=(("bf16", "fp32"), ("int8", OV_INT8)),
    ),
}
BACKENDS = (AUTO, *TABLE)  # the --backend choices


def backend(name: str) -> Backend:
    """The table row of a resolved backend name (not `auto`)."""
    if name not in TABLE:
        raise PersenseError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return TABLE[name]
