"""Which backend runs a model: `--backend` names, `auto` resolved, engines opened on the chosen backend."""

from __future__ import annotations

import logging

from persense.runtime.backends.engine import Engine
from persense.runtime.backends.ort_check import check_onnxruntime
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Manifest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt", "openvino")  # auto never picks openvino (an opt-in extra)


def resolve_backend(requested: str, manifest: Manifest | None = None) -> str:
    """Turn 'auto' into the best usable backend (TensorRT, then ORT-CUDA, then ORT-CPU) and log why.

    TensorRT is chosen only when it is usable here and the manifest has current engines for SAM.
    """
    if requested not in BACKENDS:
        raise PersenseError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    check_onnxruntime()
    import onnxruntime as ort

    from persense.runtime.backends.trt_engine import engine_unusable_reason, tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None and manifest is not None:
        reason = engine_unusable_reason(manifest, "sam_encoder") or engine_unusable_reason(manifest, "sam_decoder")
    if reason is None:
        choice = "trt"
    elif "CUDAExecutionProvider" in ort.get_available_providers():
        choice = "ort-cuda"
    else:
        choice = "ort-cpu"
    log.info("backend auto -> %s%s", choice, f" (TensorRT: {reason})" if reason else "")
    return choice


def side_backend(backend: str) -> str:
    """The backend of the models beside SAM (counters, detector): ORT-CPU under openvino (a small share of a
    query, not measured on OpenVINO), else `backend` itself."""
    return "ort-cpu" if backend == "openvino" else backend


def open_engine(
    manifest: Manifest,
    name: str,
    backend: str = "ort-cpu",
    threads: int | None = None,
    arena: bool = True,
    cuda_graph: bool = False,
    ov_precision: str = "fp32",
) -> Engine:
    """Verify artefact `name` of a manifest (hash, existence) and open it on a resolved backend
    (`cuda_graph` applies to ORT-CUDA only, `ov_precision` (fp32 or bf16) to OpenVINO only)."""
    if backend == "trt":
        from persense.runtime.backends.trt_engine import open_trt_engine

        return open_trt_engine(manifest, name)
    path = manifest.verified_path(name)
    if backend == "openvino":
        from persense.runtime.backends.openvino_engine import OvEngine

        return OvEngine(path, ov_precision, threads)
    return OrtEngine(
        path, device="cuda" if backend == "ort-cuda" else "cpu", threads=threads, arena=arena, cuda_graph=cuda_graph
    )
