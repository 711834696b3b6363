"""An ONNX model run by ONNX Runtime on the CPU or CUDA execution provider."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from persense.runtime.backends.engine import default_threads
from persense.runtime.backends.ort_check import check_onnxruntime
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


class OrtEngine:
    """An ONNX model run by ONNX Runtime on the CPU or CUDA execution provider.

    With `io_binding` (the default on CUDA) every run binds device buffers: inputs given as host arrays are
    copied into per-input buffers on the session's device, inputs given as device values (`upload`) are bound
    as they are (the decoder binds one image embedding to all launches of an image), outputs go to per-output
    device buffers; buffers are reused while shapes stay the same. `uploads` counts host-to-device copies per
    input name. Threads may share an engine: each thread binds its own buffers.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        arena: bool = True,
        io_binding: bool | None = None,
    ) -> None:
        check_onnxruntime()
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PersenseError(
                    "ONNX Runtime has no CUDA provider here: install the `gpu` extra "
                    "(onnxruntime-gpu) on a machine with an NVIDIA GPU, or use --backend ort-cpu"
                )
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ORT's CPU arena keeps the largest transient buffers of every run: on for many small runs (the decoder),
        # off for one huge one (the encoder); measured in docs/DESIGN.md "Memory arena"
        options.enable_cpu_mem_arena = arena
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own types for corrupt or unsupported models
            raise PersenseError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
        self.device = device
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self.io_binding = device == "cuda" if io_binding is None else io_binding
        self.uploads: Counter[str] = Counter()
        self._local = threading.local()  # per thread: its io binding and its buffers

    def upload(self, name: str, array: np.ndarray) -> Any:
        """A copy of a host array for input `name` on the session's device (an OrtValue) that runs can bind."""
        from onnxruntime import OrtValue

        self.uploads[name] += 1
        return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run the session; inputs are host arrays, or device values from `upload` with `io_binding`."""
        names = [o.name for o in self.outputs]
        if not self.io_binding:
            return dict(zip(names, self.session.run(names, feeds)))
        return self._run_bound(names, feeds, self._state())

    def _state(self) -> Any:
        """This thread's io binding and buffer table ("in:<name>"/"out:<name>" -> ((shape, dtype), OrtValue))."""
        holder = self._local
        if not hasattr(holder, "binding"):
            holder.binding = self.session.io_binding()
            holder.buffers = {}
        return holder

    def _run_bound(self, names: list[str], feeds: dict[str, Any], state: Any) -> dict[str, np.ndarray]:
        """One run through an io binding whose buffers only this call uses."""
        binding = state.binding
        dims: dict[str, int] = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            if isinstance(value, np.ndarray):
                value = self._staged(state.buffers, spec.name, np.ascontiguousarray(value, spec.dtype))
            binding.bind_ortvalue_input(spec.name, value)
            dims.update((d, n) for d, n in zip(spec.shape, value.shape()) if isinstance(d, str))
        for spec in self.outputs:
            shape = [dims.get(d) if isinstance(d, str) else d for d in spec.shape]
            if None in shape:  # a dimension no input names: ONNX Runtime allocates the output
                binding.bind_output(spec.name, self.device, 0)
            else:
                binding.bind_ortvalue_output(
                    spec.name, self._buffer(state.buffers, f"out:{spec.name}", shape, spec.dtype)
                )
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def _staged(self, buffers: dict, name: str, array: np.ndarray) -> Any:
        """The device buffer of input `name` holding a copy of `array` (one upload)."""
        buffer = self._buffer(buffers, f"in:{name}", list(array.shape), array.dtype)
        buffer.update_inplace(array)
        self.uploads[name] += 1
        return buffer

    def _buffer(self, buffers: dict, key: str, shape: list[int], dtype: Any) -> Any:
        """The device buffer for `key`, reallocated only when its shape or dtype changes."""
        from onnxruntime import OrtValue

        layout = (tuple(shape), np.dtype(dtype))
        if key not in buffers or buffers[key][0] != layout:
            buffers[key] = (layout, OrtValue.ortvalue_from_shape_and_type(shape, layout[1], self.device, 0))
        return buffers[key][1]


def _spec(node) -> TensorSpec:
    """TensorSpec of an ORT NodeArg."""
    shape = tuple(d if isinstance(d, int) else str(d) for d in node.shape)
    return TensorSpec(node.name, shape, _ORT_TYPES.get(node.type, node.type))
