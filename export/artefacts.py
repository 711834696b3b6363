"""The manifest entry of an exported artefact: describing a file, reuse checks, recording it in a folder.

Every export step (ONNX export, FP16, INT8, TensorRT) depends on this module; it depends on none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from persense.runtime.artefact_names import variant_name
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Artefact, Manifest, TensorSpec, installed_versions, load_manifest, sha256_file

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}
_PACKAGES = ("persense", "torch", "onnx", "onnxruntime", "onnxslim", "onnxconverter-common", "tensorrt")


def package_versions() -> dict[str, str]:
    """Versions of the packages an artefact depends on."""
    return installed_versions(_PACKAGES)


def _specs(values) -> list[TensorSpec]:
    """TensorSpecs of ONNX graph inputs/outputs (dynamic axes keep their symbolic names)."""
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
        specs.append(TensorSpec(value.name, shape, _ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type))))
    return specs


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The files (relative locations) that a model's initializers keep their data in."""
    return {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def describe(
    path: Path, kind: str, precision: str, model_type: str, source_checkpoint: str, extra: dict[str, Any] | None = None
) -> Artefact:
    """The manifest entry of an exported ONNX file (hash, opset, I/O, and its external data file if any)."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    extra = dict(extra or {})
    files = external_data_files(model)
    if len(files) > 1:
        raise PersenseError(f"{path}: weights spread over {len(files)} external files; expected one")
    if files:
        data_path = path.parent / files.pop()
        extra.update(data_file=data_path.name, data_sha256=sha256_file(data_path))
    return Artefact(
        file=path.name,
        sha256=sha256_file(path),
        kind=kind,
        precision=precision,
        model_type=model_type,
        source_checkpoint=source_checkpoint,
        opset=opset,
        inputs=_specs(model.graph.input),
        outputs=_specs(model.graph.output),
        extra=extra,
    )


def intact(previous: Manifest, name: str) -> bool:
    """Whether a previous manifest's artefact still has all its files, with the recorded hashes."""
    try:
        previous.verified_path(name)
    except PersenseError:
        return False
    return True


def reusable(previous: Manifest | None, name: str, source_key: str) -> Artefact | None:
    """The previous artefact `name` if it came from the same source and its files are intact."""
    if previous is None or name not in previous.artefacts:
        return None
    art = previous.artefacts[name]
    if art.extra.get("source_key") != source_key or not intact(previous, name):
        return None
    return art


def reusable_variant(previous: Manifest | None, name: str, artefact: Artefact, precision: str) -> Artefact | None:
    """The previous `precision` variant (FP16, INT8) of `name` if it was converted from this exact FP32 file and is
    intact."""
    variant = variant_name(name, precision)
    if previous is None or variant not in previous.artefacts:
        return None
    entry = previous.artefacts[variant]
    if entry.extra.get("fp32_sha256") != artefact.sha256 or not intact(previous, variant):
        return None
    return entry


def variant_extra(artefact: Artefact, seconds: float, **fields: Any) -> dict[str, Any]:
    """The `extra` of an entry converted from an FP32 artefact: what it came from, how, and how long it took."""
    return {
        "source_key": artefact.extra.get("source_key"),
        "fp32_file": artefact.file,
        "fp32_sha256": artefact.sha256,
        **fields,
        "convert_seconds": round(seconds, 2),
    }


def add_artefact(folder: Path, name: str, artefact: Artefact) -> None:
    """Add or replace one entry of the folder's manifest (and refresh its package versions)."""
    manifest = load_manifest(folder)
    manifest.artefacts[name] = artefact
    manifest.versions.update(package_versions())
    manifest.save()
