"""Exporting a torch module to a simplified, checked ONNX file, and describing it for the manifest."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from persense.runtime.manifest import Artefact, TensorSpec, sha256_file

log = logging.getLogger(__name__)

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool"}
_SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf's 2 GB cap, with headroom: larger models keep external data


def export_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                output_names: list[str], dynamic_shapes: dict[str, Any] | None = None,
                options: dict[str, Any] | None = None) -> float:
    """Export with torch's dynamo exporter (extra torch.onnx.export `options`, e.g. opset_version), simplify with
    onnxslim, check, save; returns seconds taken."""
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, optimize=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
                                    **(options or {}))
    model = simplify(program.model_proto)
    save_onnx(model, path)
    onnx.checker.check_model(str(path))
    seconds = time.perf_counter() - start
    log.info("exported %s in %.1f s", path.name, seconds)
    return seconds


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and fuse redundant nodes with onnxslim (a maintained simplifier)."""
    import onnxslim

    return onnxslim.slim(model)


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save one file, or one file plus `<name>.data` external weights when above protobuf's limit."""
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    large = model.ByteSize() > _SINGLE_FILE_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=data_path.name if large else None)


def _specs(values) -> list[TensorSpec]:
    """TensorSpecs of ONNX graph inputs/outputs (dynamic axes keep their symbolic names)."""
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
        specs.append(TensorSpec(value.name, shape, _ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type))))
    return specs


def describe(path: Path, kind: str, precision: str, model_type: str, source_checkpoint: str,
             extra: dict[str, Any] | None = None) -> Artefact:
    """The manifest entry of an exported ONNX file (hash, opset, I/O)."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    extra = dict(extra or {})
    data_path = path.with_name(path.name + ".data")
    if data_path.exists():
        extra.update(data_file=data_path.name, data_sha256=sha256_file(data_path))
    return Artefact(file=path.name, sha256=sha256_file(path), kind=kind, precision=precision, model_type=model_type,
                    source_checkpoint=source_checkpoint, opset=opset, inputs=_specs(model.graph.input),
                    outputs=_specs(model.graph.output), extra=extra)
