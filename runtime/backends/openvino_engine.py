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

# persense precision -> INFERENCE_PRECISION_HINT; int8 (an NNCF-quantised model): the hint of its float parts,
# measured in docs/DESIGN.md "OpenVINO INT8"
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
INSTALL_HINT = "install it with `pip install 'persense[openvino]'`"


def import_openvino() -> Any:
    """The openvino module, or a PersenseError saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise PersenseError(f"--backend openvino needs OpenVINO, which is not importable here; {INSTALL_HINT}") from exc
    return openvino


def precision_hint(core: Any, precision: str) -> str:
    """OpenVINO's CPU float precision for a persense precision: bf16 only where the CPU has it, else f32."""
    if precision not in OV_PRECISIONS:
        raise PersenseError(f"OpenVINO runs precision {' or '.join(OV_PRECISIONS)}, not {precision!r}")
    hint = OV_PRECISIONS[precision]
    if hint == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        log.info("OpenVINO: this CPU has no BF16 support; running f32")
        return "f32"
    return hint


class OvEngine:
    """An ONNX model (or OpenVINO IR) compiled by OpenVINO for the CPU once per set of input shapes: static shapes
    run the decoder faster than a dynamic batch (docs/DESIGN.md "OpenVINO decoder"), and its few chunk shapes make
    few compilations. One infer request per thread and shape."""

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        from persense.runtime.backends.engine import default_threads

        ov = import_openvino()
        self._core = ov.Core()
        self.path = Path(path)
        self.precision_hint = precision_hint(self._core, precision)
        self._config = {
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "INFERENCE_NUM_THREADS": threads or default_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        self._model = self._ov_call(lambda: self._core.read_model(str(path)))
        self.inputs = [_spec(port) for port in self._model.inputs]
        self.outputs = [_spec(port) for port in self._model.outputs]
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        if all("?" not in spec.shape for spec in self.inputs):  # a static model: compiled (and checked) now
            self._compiled_for(tuple(spec.shape for spec in self.inputs))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on host arrays in this thread's infer request for their shapes; returns copies of the outputs by name."""
        arrays = {spec.name: np.ascontiguousarray(feeds[spec.name], spec.dtype) for spec in self.inputs}
        shapes = tuple(array.shape for array in arrays.values())
        requests = self._local.__dict__.setdefault("requests", {})
        if shapes not in requests:
            requests[shapes] = self._compiled_for(shapes).create_infer_request()
        results = requests[shapes].infer(arrays)
        return {spec.name: np.array(result) for spec, result in zip(self.outputs, results.values())}

    def _compiled_for(self, shapes: tuple) -> Any:
        """The model compiled for these input shapes (compiled on first use, shared by every thread)."""
        with self._lock:
            if shapes not in self._compiled:
                model = self._model.clone()
                model.reshape({port: list(shape) for port, shape in zip(model.inputs, shapes)})
                self._compiled[shapes] = self._ov_call(lambda: self._core.compile_model(model, "CPU", self._config))
            return self._compiled[shapes]

    def _ov_call(self, call: Any) -> Any:
        """`call()`, OpenVINO's RuntimeError (an unreadable or unsupported model) as a one-line PersenseError."""
        try:
            return call()
        except RuntimeError as exc:
            raise PersenseError(f"{self.path}: OpenVINO cannot load it ({str(exc).splitlines()[0]})") from exc


def _spec(port: Any) -> TensorSpec:
    """TensorSpec of an OpenVINO port: static dimensions as ints, dynamic ones as '?'."""
    shape = tuple(dim.get_length() if dim.is_static else "?" for dim in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), shape, np.dtype(port.get_element_type().to_dtype()).name)
