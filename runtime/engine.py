"""The Engine protocol and its ONNX Runtime implementation; backend choice for `--backend`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Manifest, TensorSpec
from persense.runtime.ort_check import check_onnxruntime

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool"}


class Engine(Protocol):
    """Anything that maps named input arrays to named output arrays."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on host arrays and return host arrays by output name."""
        ...


def default_threads() -> int:
    """Intra-op threads: PERSENSE_THREADS if set, else every core this process may use."""
    env = os.environ.get("PERSENSE_THREADS")
    return int(env) if env else len(os.sched_getaffinity(0))


class OrtEngine:
    """An ONNX model run by ONNX Runtime on the CPU or CUDA execution provider."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, arena: bool = True) -> None:
        check_onnxruntime()
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PersenseError("ONNX Runtime has no CUDA provider here: install the `gpu` extra "
                                    "(onnxruntime-gpu) on a machine with an NVIDIA GPU, or use --backend ort-cpu")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ORT's CPU arena keeps the largest transient buffers of every run: worth it for many small runs
        # (vit_b decoder, one prompt: 31 ms with it, 45 ms without), not for one huge one (vit_b encoder:
        # peak RSS 3.2 GB with it, 2.1 GB without, 6.9 vs 6.3 s).
        options.enable_cpu_mem_arena = arena
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own types for corrupt or unsupported models
            raise PersenseError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        self.device = device
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on host arrays."""
        names = [o.name for o in self.outputs]
        return dict(zip(names, self.session.run(names, feeds)))


def _spec(node) -> TensorSpec:
    """TensorSpec of an ORT NodeArg."""
    shape = tuple(d if isinstance(d, int) else str(d) for d in node.shape)
    return TensorSpec(node.name, shape, _ORT_TYPES.get(node.type, node.type))


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

    from persense.runtime.trt_engine import engine_unusable_reason, tensorrt_unavailable_reason

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


def open_engine(manifest: Manifest, name: str, backend: str = "ort-cpu", threads: int | None = None,
                arena: bool = True) -> Engine:
    """Verify artefact `name` of a manifest (hash, existence) and open it on a resolved backend."""
    if backend == "trt":
        from persense.runtime.trt_engine import open_trt_engine

        return open_trt_engine(manifest, name)
    path = manifest.verified_path(name)
    return OrtEngine(path, device="cuda" if backend == "ort-cuda" else "cpu", threads=threads, arena=arena)
