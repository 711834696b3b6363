"""TensorRT backend: availability, stale-engine refusal, and `TrtEngine` (plan + CUDA stream via cuda-python).

`tensorrt` and `cuda-python` are imported lazily, so this module imports everywhere. Engines are manifest
entries `<name>_trt` whose `extra` records the TensorRT version and GPU compute capability they were built
for; a TensorRT plan only runs on that exact TensorRT version and that kind of GPU, so anything else is
refused before deserialising.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from persense.runtime.artefact_names import engine_name, source_name
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Artefact, Manifest, TensorSpec

REBUILD_HINT = "rebuild the engines on this machine with `persense-export --fp16 --out {folder}`"


def cudart() -> ModuleType:
    """cuda-python's CUDA runtime module (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # type: ignore[no-redef]
    return runtime


def cuda_call(result: tuple[Any, ...]) -> Any:
    """Unpack a cuda-python `(error, *values)` result, raising PersenseError on a CUDA error."""
    err, *values = result
    if int(err) != 0:
        raise PersenseError(f"CUDA error {getattr(err, 'name', int(err))}")
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else one line saying why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (ImportError, or the PyPI stub failing at import)
        return f"tensorrt is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    try:
        runtime = cudart()
    except Exception as exc:  # noqa: BLE001 (as for tensorrt)
        return f"cuda-python is not importable ({type(exc).__name__})"
    err, count = runtime.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return "no CUDA GPU is visible"
    return None


def tensorrt_version() -> str:
    """Version of the importable TensorRT (e.g. '10.7.0')."""
    import tensorrt

    return tensorrt.__version__


def compute_capability(device: int = 0) -> str:
    """Compute capability of a CUDA device as 'major.minor' (e.g. '9.0' for an H100)."""
    runtime = cudart()
    attr = runtime.cudaDeviceAttr
    major = cuda_call(runtime.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device))
    minor = cuda_call(runtime.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device))
    return f"{major}.{minor}"


def stale_reason(engine: Artefact, trt_version: str, capability: str, source: Artefact | None) -> str | None:
    """Why an engine entry cannot run here (other TensorRT, other GPU, rebuilt ONNX), or None if current."""
    built_version = engine.extra.get("tensorrt_version")
    built_capability = engine.extra.get("compute_capability")
    if built_version != trt_version:
        return f"built with TensorRT {built_version}, this machine has TensorRT {trt_version}"
    if built_capability != capability:
        return f"built for compute capability {built_capability}, this GPU is {capability}"
    if source is not None and engine.extra.get("onnx_sha256") != source.sha256:
        return f"built from an older {source.file} (its sha256 changed since)"
    return None


def check_engine_current(manifest: Manifest, name: str, trt_version: str, capability: str) -> Artefact:
    """The engine entry for `name`, or a PersenseError when it is missing or stale (naming the rebuild command)."""
    key = engine_name(name)
    hint = REBUILD_HINT.format(folder=manifest.folder)
    if key not in manifest.artefacts:
        raise PersenseError(f"{manifest.folder}: no TensorRT engine '{key}' in the manifest; {hint}")
    engine = manifest.artefacts[key]
    source = manifest.artefacts.get(source_name(key))
    reason = stale_reason(engine, trt_version, capability, source)
    if reason is not None:
        raise PersenseError(f"{manifest.folder / engine.file}: stale TensorRT engine ({reason}); {hint}")
    return engine


def engine_unusable_reason(manifest: Manifest, name: str) -> str | None:
    """None when engine `name` can be opened here, else why not (for `--backend auto`)."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return reason
    try:
        check_engine_current(manifest, name, tensorrt_version(), compute_capability())
    except PersenseError as exc:
        return str(exc)
    return None


def open_trt_engine(manifest: Manifest, name: str) -> TrtEngine:
    """Open the TensorRT engine of artefact `name` after checking TensorRT, staleness and the file's hash."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise PersenseError(
            f"--backend trt needs TensorRT and an NVIDIA GPU: {reason}; use --backend ort-cuda or ort-cpu (or auto)"
        )
    engine = check_engine_current(manifest, name, tensorrt_version(), compute_capability())
    path = manifest.verified_path(engine_name(name))
    return TrtEngine(path, engine.inputs, engine.outputs)


class DeviceBuffer:
    """One CUDA allocation that grows on demand (never shrinks) and is freed with its owner."""

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        """Device pointer of at least `nbytes` bytes."""
        if nbytes > self.nbytes:
            self.free()
            self.ptr = cuda_call(cudart().cudaMalloc(max(nbytes, 1)))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        """Release the allocation."""
        if self.ptr:
            cuda_call(cudart().cudaFree(self.ptr))
            self.ptr, self.nbytes = 0, 0


class CudaStream:
    """A CUDA stream with host<->device copies of NumPy arrays on it."""

    def __init__(self) -> None:
        self.runtime = cudart()
        self.stream = cuda_call(self.runtime.cudaStreamCreate())

    @property
    def handle(self) -> int:
        """The stream as the integer handle TensorRT takes."""
        return int(self.stream)

    def upload(self, array: np.ndarray, buffer: DeviceBuffer) -> int:
        """Queue a copy of a C-contiguous array into `buffer`; returns the device pointer."""
        ptr = buffer.ensure(array.nbytes)
        kind = self.runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(self.runtime.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))
        return ptr

    def download(self, ptr: int, array: np.ndarray) -> None:
        """Queue a copy from device memory into a C-contiguous host array."""
        kind = self.runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(self.runtime.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        cuda_call(self.runtime.cudaStreamSynchronize(self.stream))

    def destroy(self) -> None:
        """Release the stream."""
        cuda_call(self.runtime.cudaStreamDestroy(self.stream))


class TrtEngine:
    """A deserialised TensorRT plan run with explicit input shapes per call on its own CUDA stream."""

    def __init__(self, path: str | Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise PersenseError(
                f"{path}: TensorRT could not deserialise the engine; " + REBUILD_HINT.format(folder=Path(path).parent)
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = sorted({t.name for t in inputs + outputs} - set(names))
        if missing:
            raise PersenseError(
                f"{path}: engine lacks tensors {missing} listed in the manifest; "
                + REBUILD_HINT.format(folder=Path(path).parent)
            )
        self.inputs, self.outputs = inputs, outputs
        self.context = self.engine.create_execution_context()
        self.stream = CudaStream()
        self.buffers = {name: DeviceBuffer() for name in names}
        self.dtypes = {name: np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))) for name in names}
        self.path = Path(path)

    def _profile_range(self, name: str) -> str:
        """The engine's optimisation-profile range of an input, for error messages."""
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        return f"{tuple(low)}..{tuple(high)}"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, set their shapes, execute on the stream, copy outputs back."""
        for spec in self.inputs:
            if spec.name not in feeds:
                raise PersenseError(f"{self.path.name}: input '{spec.name}' not given")
            array = np.ascontiguousarray(feeds[spec.name], dtype=self.dtypes[spec.name])
            if not self.context.set_input_shape(spec.name, array.shape):
                raise PersenseError(
                    f"{self.path.name}: input '{spec.name}' shape {array.shape} is outside the "
                    f"engine's optimisation profile {self._profile_range(spec.name)}"
                )
            self.context.set_tensor_address(spec.name, self.stream.upload(array, self.buffers[spec.name]))
        results = {}
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise PersenseError(f"{self.path.name}: output '{spec.name}' has unresolved shape {shape}")
            results[spec.name] = np.empty(shape, self.dtypes[spec.name])
            ptr = self.buffers[spec.name].ensure(results[spec.name].nbytes)
            self.context.set_tensor_address(spec.name, ptr)
        if not self.context.execute_async_v3(self.stream.handle):
            raise PersenseError(f"{self.path.name}: TensorRT execution failed")
        for spec in self.outputs:
            self.stream.download(self.buffers[spec.name].ptr, results[spec.name])
        self.stream.synchronize()
        return results

    def close(self) -> None:
        """Free device memory and the stream."""
        for buffer in self.buffers.values():
            buffer.free()
        self.stream.destroy()
        self.buffers = {}
