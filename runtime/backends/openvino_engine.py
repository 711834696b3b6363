"""An ONNX model run by OpenVINO on the CPU (`--backend openvino`, the `openvino` extra)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.manifest import TensorSpec

log = logging.getLogger(__name__)

OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # persense precision -> INFERENCE_PRECISION_HINT
INSTALL_HINT = "install it with `pip install 'persense[openvino]'`"


def import_openvino() -> Any:
    """The openvino module, or a PersenseError saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise PersenseError(f"--backend openvino needs OpenVINO, which is not importable here; {INSTALL_HINT}") from exc
    return openvino


def precision_hint(core: Any, precision: str) -> str:
    """OpenVINO's CPU inference precision for a persense precision: bf16 only where the CPU has it, else f32."""
    if precision not in OV_PRECISIONS:
        raise PersenseError(f"OpenVINO runs precision fp32 or bf16, not {precision!r}")
    hint = OV_PRECISIONS[precision]
    if hint == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        log.info("OpenVINO: this CPU has no BF16 support; running f32")
        return "f32"
    return hint


class OvEngine:
    """An ONNX model compiled by OpenVINO for the CPU, dynamic axes kept dynamic; one infer request per thread."""

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        from persense.runtime.backends.engine import default_threads

        ov = import_openvino()
        core = ov.Core()
        self.precision_hint = precision_hint(core, precision)
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(
                model,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": self.precision_hint,
                    "INFERENCE_NUM_THREADS": threads or default_threads(),
                    "PERFORMANCE_HINT": "LATENCY",
                },
            )
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for unreadable or unsupported models
            raise PersenseError(f"{path}: OpenVINO cannot load it ({str(exc).splitlines()[0]})") from exc
        self.inputs = [_spec(port) for port in self.compiled.inputs]
        self.outputs = [_spec(port) for port in self.compiled.outputs]
        self._local = threading.local()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on host arrays in this thread's infer request; returns copies of the outputs by name."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        arrays = {spec.name: np.ascontiguousarray(feeds[spec.name], spec.dtype) for spec in self.inputs}
        results = request.infer(arrays)
        return {spec.name: np.array(results[port]) for spec, port in zip(self.outputs, self.compiled.outputs)}


def _spec(port: Any) -> TensorSpec:
    """TensorSpec of an OpenVINO port: static dimensions as ints, dynamic ones as '?'."""
    shape = tuple(dim.get_length() if dim.is_static else "?" for dim in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), shape, np.dtype(port.get_element_type().to_dtype()).name)
