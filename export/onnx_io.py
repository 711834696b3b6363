"""Exporting a torch module to a simplified, checked ONNX file, with external weights above protobuf's 2 GB cap.

Models whose weights exceed `LARGE_MODEL_BYTES` (SAM vit_l and vit_h) never exist as one ModelProto: protobuf
cannot serialise more than 2 GB, onnxslim serialises the whole model for shape inference, and each of its passes
copies the proto (vit_h failed at 19 GB peak RSS that way; vit_l, under the cap, would still pay the copies).
Their large weights are detached from the graph (as graph inputs) while onnxslim simplifies it, then streamed
one tensor at a time from the exporter's in-memory model into `<name>.onnx.data` and reattached as external
initializers. Weights that feed a constant-foldable node stay attached, so folding works as on the normal path.
"""

from __future__ import annotations

import ast
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import onnx
from onnx.external_data_helper import set_external_data

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LARGE_MODEL_BYTES = 1_000_000_000  # vit_l (1.2 GB) and vit_h (2.5 GB); tests lower it to force the large path
DETACH_MIN_BYTES = 1 << 16  # weights from this size on are detached while simplifying a large model
EXTERNAL_MIN_BYTES = 1024  # initializers from this size on go to the external data file (onnx's default)
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the module path the dynamo exporter records on each node
_ALIGNMENT = 4096  # external tensors start on page boundaries, so ONNX Runtime can memory-map them


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    named_scopes: tuple[str, ...] = (),
) -> float:
    """Export with torch's dynamo exporter (extra torch.onnx.export `options`, e.g. opset_version), simplify with
    onnxslim, check, save; returns seconds taken. The one node inside each submodule of `named_scopes` (attribute
    names) is named after it, so later steps can select it."""
    import torch

    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            optimize=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            **(options or {}),
        )
    name_scoped_nodes(program.model, named_scopes)
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    if weights > LARGE_MODEL_BYTES:
        log.info("%s: %.2f GB of weights, simplified with weights detached", path.name, weights / 1e9)
        save_large(program.model, path)
    else:
        save_onnx(simplify(program.model_proto), path)
    onnx.checker.check_model(str(path))
    seconds = time.perf_counter() - start
    log.info("exported %s in %.1f s", path.name, seconds)
    return seconds


def name_scoped_nodes(model: Any, scopes: tuple[str, ...]) -> None:
    """Name the single node the exporter recorded inside each module attribute of `scopes` after that attribute."""
    found: dict[str, list[Any]] = {scope: [] for scope in scopes}
    for node in model.graph:
        scope_path = ast.literal_eval(node.metadata_props.get(NAME_SCOPES, "[]"))
        for scope in set(scope_path) & found.keys():
            found[scope].append(node)
    for scope, nodes in found.items():
        if len(nodes) != 1:
            raise RuntimeError(f"expected one exported node in module {scope!r}, found {[n.op_type for n in nodes]}")
        nodes[0].name = scope


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and fuse redundant nodes with onnxslim (a maintained simplifier)."""
    import onnxslim

    return onnxslim.slim(model)


def data_file(path: Path) -> Path:
    """The external data file of ONNX file `path`: `<name>.onnx.data`."""
    return path.with_name(path.name + ".data")


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save one file, or one file plus `<name>.data` external weights when above `LARGE_MODEL_BYTES`."""
    data_path = data_file(path)
    data_path.unlink(missing_ok=True)
    large = sum(t.ByteSize() for t in model.graph.initializer) > LARGE_MODEL_BYTES  # never the whole proto's size
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=data_path.name if large else None,
        size_threshold=EXTERNAL_MIN_BYTES,
    )


def _detachable(value: Any) -> bool:
    """A large weight none of whose consumers could be constant-folded (each also takes a computed input)."""

    def computed(node_input: Any) -> bool:
        """An input that is neither a weight nor a Constant node's output."""
        producer = node_input.producer() if node_input is not None else None
        return (
            node_input is not None
            and not node_input.is_initializer()
            and not (producer is not None and producer.op_type == "Constant")
        )

    return value.const_value.nbytes >= DETACH_MIN_BYTES and all(
        any(computed(i) for i in use.node.inputs) for use in value.uses()
    )


def _slim_detached(model: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """onnxslim's model of an onnx_ir model whose large weights were graph inputs; returns it and those weights."""
    import onnx_ir as ir

    graph = model.graph
    detached = {name: v for name, v in graph.initializers.items() if v.const_value is not None and _detachable(v)}
    inputs = list(graph.inputs)
    for name, value in detached.items():
        graph.initializers.pop(name)
        value.type, value.shape = ir.TensorType(value.const_value.dtype), value.const_value.shape
        graph.inputs.append(value)
    try:
        proto = ir.serde.serialize_model(model)
    finally:  # the exporter's model is left as it was
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        graph.initializers.update(detached)
    log.info(
        "simplifying with %d weights (%.2f GB) detached",
        len(detached),
        sum(v.const_value.nbytes for v in detached.values()) / 1e9,
    )
    return simplify(proto), {name: v.const_value for name, v in detached.items()}


def _write_external(tensor: onnx.TensorProto, data: bytes, handle: BinaryIO, location: str) -> None:
    """Append `data` to the open data file at the next page boundary and point `tensor` at it."""
    end = handle.tell()
    offset = end + (-end) % _ALIGNMENT
    handle.seek(offset)
    handle.write(data)
    set_external_data(tensor, location, offset, len(data))
    tensor.ClearField("raw_data")


def save_large(model: Any, path: Path) -> None:
    """Simplify an onnx_ir model with its large weights detached, then save it with them in `<name>.onnx.data`."""
    import onnx_ir as ir

    slim, weights = _slim_detached(model)
    graph = slim.graph
    reattached = [graph_input for graph_input in graph.input if graph_input.name in weights]
    for graph_input in reattached:
        graph.input.remove(graph_input)
    data_path = data_file(path)
    with open(data_path, "wb") as handle:
        for tensor in graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                _write_external(tensor, tensor.raw_data, handle, data_path.name)
        for graph_input in reattached:  # one weight in memory at a time
            tensor = ir.serde.serialize_tensor(weights[graph_input.name])
            tensor.name = graph_input.name
            _write_external(tensor, tensor.raw_data, handle, data_path.name)
            graph.initializer.append(tensor)
    onnx.save_model(slim, str(path))
