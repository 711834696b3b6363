"""Which backend runs a model: `--backend` names, `auto` resolved, engines opened on the chosen backend."""

from __future__ import annotations

import importlib.util
import logging

from persense.runtime.artefact_names import RUNS_IN, export_flag, variant_name
from persense.runtime.backends.engine import Engine
from persense.runtime.backends.openvino_engine import INSTALL_HINT
from persense.runtime.backends.ort_check import check_onnxruntime
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.backends.table import AUTO, backend
from persense.runtime.manifest import REEXPORT_HINT, IoSpec, Manifest, check_io

log = logging.getLogger(__name__)


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine (no CUDA provider, no TensorRT, no OpenVINO), or None."""
    row = backend(name)
    if row.own_engines:
        from persense.runtime.backends.trt_engine import tensorrt_unavailable_reason

        return tensorrt_unavailable_reason()
    if row.name == "openvino":
        return None if importlib.util.find_spec("openvino") else f"OpenVINO is not installed; {INSTALL_HINT}"
    if row.on_gpu:
        check_onnxruntime()
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return (
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {', '.join(providers)}); "
                "install the `gpu` extra (onnxruntime-gpu) on a machine with an NVIDIA GPU"
            )
    return None


def resolve_backend(requested: str, manifest: Manifest | None = None) -> str:
    """Turn 'auto' into the best usable backend (TensorRT, then ORT-CUDA, then ORT-CPU) and log why.

    TensorRT is chosen only when it is usable here and the manifest has current engines for SAM.
    """
    if requested != AUTO:
        return backend(requested).name
    from persense.runtime.backends.trt_engine import engine_unusable_reason

    reason = unavailable_reason("trt")
    if reason is None and manifest is not None:
        reason = engine_unusable_reason(manifest, "sam_encoder") or engine_unusable_reason(manifest, "sam_decoder")
    if reason is None:
        choice = "trt"
    elif unavailable_reason("ort-cuda") is None:
        choice = "ort-cuda"
    else:
        choice = "ort-cpu"
    log.info("backend auto -> %s%s", choice, f" (TensorRT: {reason})" if reason else "")
    return choice


def open_engine(
    manifest: Manifest,
    name: str,
    backend_name: str = "ort-cpu",
    threads: int | None = None,
    arena: bool = True,
    ov_precision: str = "fp32",
    io: IoSpec | None = None,
) -> Engine:
    """Verify artefact `name` of a manifest (hash, existence; its recorded I/O against `io` where the backend runs
    the ONNX model itself) and open it on a resolved backend (`ov_precision`, fp32, bf16 or int8: OpenVINO only)."""
    row = backend(backend_name)
    if io is not None and not row.own_engines:
        check_io(name, manifest.artefact(name), *io, REEXPORT_HINT.format(folder=manifest.folder))
    if row.own_engines:
        from persense.runtime.backends.trt_engine import open_trt_engine

        return open_trt_engine(manifest, name)
    path = manifest.verified_path(name)
    if row.name == "openvino":
        from persense.runtime.backends.openvino_engine import OvEngine

        return OvEngine(path, ov_precision, threads)
    return OrtEngine(path, device=row.device, threads=threads, arena=arena)


def side_engine_choice(manifest: Manifest, name: str, backend_name: str, precision: str) -> tuple[str, str]:
    """(artefact, backend) a model beside SAM runs: its TensorRT engine on trt where usable (else the fallback
    backend), the backend table's side backend otherwise, its `precision` variant where RUNS_IN says so and it
    was exported, else the FP32 model."""
    row = backend(backend_name)
    if row.own_engines:
        from persense.runtime.backends.trt_engine import engine_unusable_reason

        reason = engine_unusable_reason(manifest, name)
        if reason is None:
            return name, row.name
        log.info("%s on %s: its %s engine is unusable (%s)", name, row.fallback, row.name, reason)
        row = backend(row.fallback)
    if name in RUNS_IN.get(precision, ()):
        variant = variant_name(name, precision)
        if variant in manifest.artefacts:
            return variant, row.side
        log.info("%s in fp32: the manifest has no %s (export it with %s)", name, variant, export_flag(variant))
    return name, row.side
