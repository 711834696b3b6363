"""FP16 ONNX models (onnxconverter-common, float32 I/O kept, FP32 islands around sensitive ops) and their error."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import onnx

from persense.export.artefacts import add_artefact
from persense.export.onnx_io import save_onnx
from persense.export.precision.error import variant_entry
from persense.export.precision.fp16_islands import SENSITIVE_OPS, float_outputs_kept, fp32_islands, merge_casts
from persense.runtime.artefact_names import variant_name
from persense.runtime.manifest import Artefact, load_manifest

log = logging.getLogger(__name__)

FP16_MAX = 65504.0  # constants are clamped to the FP16 range, not to onnxconverter-common's default 1e4


def _dedupe_value_info(model: onnx.ModelProto) -> None:
    """Keep one value_info per tensor (export + shape inference can list one twice, which breaks the converter)
    and none for the graph's inputs and outputs (the converter would retype a float32 output's final cast)."""
    io = {v.name for v in (*model.graph.input, *model.graph.output)}
    first: dict[str, onnx.ValueInfoProto] = {}
    for info in model.graph.value_info:
        if info.name not in io:
            first.setdefault(info.name, info)
    kept = list(first.values())
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the converter's block list and casts go by node name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _unshare_blocked_initializers(model: onnx.ModelProto, blocked: set[str]) -> None:
    """Give blocked (FP32) nodes, named in `blocked`, their own copy of initializers they share with FP16 nodes."""
    initializers = {t.name: t for t in model.graph.initializer}
    users: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                users.setdefault(name, set()).add(node.name in blocked)
    for node in model.graph.node:
        if node.name not in blocked:
            continue
        for i, name in enumerate(node.input):
            if users.get(name) == {True, False}:
                copy_name = name + "_fp32"
                if copy_name not in initializers:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(initializers[name])
                    copy.name = copy_name
                    model.graph.initializer.append(copy)
                    initializers[copy_name] = copy
                node.input[i] = copy_name


def _retype_float_casts(model: onnx.ModelProto) -> None:
    """Casts to float32 whose output the converter retyped to float16 must cast to float16."""
    types = {info.name: info.type.tensor_type.elem_type for info in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type != "Cast" or types.get(node.output[0]) != onnx.TensorProto.FLOAT16:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16


def to_fp16(src: Path) -> onnx.ModelProto:
    """The FP16 model of an FP32 ONNX file: float32 inputs/outputs, FP32 islands around SENSITIVE_OPS."""
    from onnxconverter_common import float16

    # path-based inference works above protobuf's 2 GB limit; the copy sits beside `src` for its external data
    inferred = src.with_name(f".{src.stem}.shapes.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
    _dedupe_value_info(model)
    _name_nodes(model)
    islands = fp32_islands(model.graph)
    float_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    op_blocked = set(float16.DEFAULT_OP_BLOCK_LIST)  # ops without FP16 kernels
    _unshare_blocked_initializers(model, islands | {n.name for n in model.graph.node if n.op_type in op_blocked})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number 1e-08 will be truncated to 1e-07", per constant
        model = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            disable_shape_infer=True,
            max_finite_val=FP16_MAX,
            op_block_list=sorted(op_blocked),
            node_block_list=sorted(islands),
        )
    _retype_float_casts(model)
    float_outputs_kept(model.graph, float_outputs)
    merge_casts(model.graph)
    return model


def convert_fp16(artefact: Artefact, folder: Path) -> Artefact:
    """Write `<name>_fp16.onnx` next to an FP32 artefact and return its manifest entry with the measured error."""
    start = time.perf_counter()
    src = folder / artefact.file
    dst = folder / (variant_name(Path(artefact.file).stem, "fp16") + ".onnx")
    save_onnx(to_fp16(src), dst)
    return variant_entry(artefact, src, dst, "fp16", start, fp32_ops=list(SENSITIVE_OPS))


def main(argv: list[str] | None = None) -> int:
    """`python -m persense.export.precision.fp16 --folder DIR --name sam_encoder`: convert and record (CMake)."""
    from persense.runtime.cli.common import add_common_flags, run_command

    parser = argparse.ArgumentParser(prog="persense.export.precision.fp16", description=main.__doc__)
    parser.add_argument("--folder", type=Path, required=True, help="engines folder with manifest.json")
    parser.add_argument("--name", action="append", required=True, help="FP32 artefact to convert (repeatable)")
    add_common_flags(parser)

    def body(args: argparse.Namespace) -> int:
        manifest = load_manifest(args.folder)
        for name in args.name:
            add_artefact(args.folder, variant_name(name, "fp16"), convert_fp16(manifest.artefact(name), args.folder))
        return 0

    return run_command(parser.prog, body, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
