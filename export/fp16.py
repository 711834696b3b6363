"""FP16 ONNX models (onnxconverter-common, float32 I/O kept, sensitive ops in FP32) and their measured error."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import onnx

from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Artefact, Manifest, load_manifest

log = logging.getLogger(__name__)

FP16_SUFFIX = "_fp16"
FP16_MAX = 65504.0  # constants are clamped to the FP16 range, not to onnxconverter-common's default 1e4
# LayerNorm (fused or SAM's LayerNorm2d as mean/pow/sqrt), softmax and reductions (the density head's sum)
SENSITIVE_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt")


def fp16_name(name: str) -> str:
    """Manifest name of the FP16 copy of artefact `name`."""
    return name + FP16_SUFFIX


def _dedupe_value_info(model: onnx.ModelProto) -> None:
    """Keep one value_info per tensor (export + shape inference can list one twice, which breaks the converter)."""
    first: dict[str, onnx.ValueInfoProto] = {}
    for info in model.graph.value_info:
        first.setdefault(info.name, info)
    kept = list(first.values())
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _unshare_blocked_initializers(model: onnx.ModelProto, blocked_ops: set[str]) -> None:
    """Give blocked (FP32) nodes their own copy of initializers they share with FP16 nodes."""
    initializers = {t.name: t for t in model.graph.initializer}
    users: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                users.setdefault(name, set()).add(node.op_type in blocked_ops)
    for node in model.graph.node:
        if node.op_type not in blocked_ops:
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
    """The FP16 model of an FP32 ONNX file: float32 inputs/outputs, SENSITIVE_OPS kept in FP32."""
    from onnxconverter_common import float16

    # path-based inference works above protobuf's 2 GB limit; the copy sits beside `src` for its external data
    inferred = src.with_name(f".{src.stem}.shapes.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
    blocked = set(float16.DEFAULT_OP_BLOCK_LIST) | set(SENSITIVE_OPS)
    _dedupe_value_info(model)
    _unshare_blocked_initializers(model, blocked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number 1e-08 will be truncated to 1e-07", per constant
        model = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                                 max_finite_val=FP16_MAX, op_block_list=sorted(blocked))
    _retype_float_casts(model)
    return model


def measure_error(artefact: Artefact, fp32_path: Path, variant_path: Path, seed: int = 0) -> dict[str, Any]:
    """Per-output error of a reduced-precision model against the FP32 one on ONNX Runtime CPU, seeded inputs."""
    from persense.export.parity import compare_outputs, sample_feeds
    from persense.runtime.engine import OrtEngine

    feeds = sample_feeds(artefact, seed)
    reference = OrtEngine(fp32_path).run(feeds)
    candidate = OrtEngine(variant_path).run(feeds)
    return {"backend": "onnxruntime-cpu", "reference": "fp32 onnx", "inputs": f"parity.sample_feeds(seed={seed})",
            "outputs": {name: compare_outputs(reference[name], candidate[name], name) for name in reference}}


def convert_fp16(artefact: Artefact, folder: Path) -> Artefact:
    """Write `<name>_fp16.onnx` next to an FP32 artefact and return its manifest entry with the measured error."""
    from persense.export.onnx_io import describe, save_onnx

    start = time.perf_counter()
    src = folder / artefact.file
    dst = folder / (Path(artefact.file).stem + FP16_SUFFIX + ".onnx")
    model = to_fp16(src)
    save_onnx(model, dst)
    onnx.checker.check_model(str(dst))
    extra = {"source_key": artefact.extra.get("source_key"), "fp32_file": artefact.file,
             "fp32_sha256": artefact.sha256, "fp32_ops": list(SENSITIVE_OPS),
             "convert_seconds": round(time.perf_counter() - start, 2)}
    fp16 = describe(dst, artefact.kind, "fp16", artefact.model_type, artefact.source_checkpoint, extra)
    fp16.extra["fp16_error"] = measure_error(artefact, src, dst)
    log.info("wrote %s (%.1f s)", dst.name, time.perf_counter() - start)
    return fp16


def reusable_fp16(previous: Manifest | None, name: str, artefact: Artefact, suffix: str = FP16_SUFFIX) -> Artefact | None:
    """The previous `<name><suffix>` entry if it was converted from this exact FP32 file and is intact."""
    variant = name + suffix
    if previous is None or variant not in previous.artefacts:
        return None
    entry = previous.artefacts[variant]
    if entry.extra.get("fp32_sha256") != artefact.sha256:
        return None
    try:
        previous.verified_path(variant)
    except PersenseError:
        return None
    return entry


def add_artefact(folder: Path, name: str, artefact: Artefact) -> None:
    """Add or replace one entry of the folder's manifest (and refresh its package versions)."""
    from persense.export.exporter import package_versions

    manifest = load_manifest(folder)
    manifest.artefacts[name] = artefact
    manifest.versions.update(package_versions())
    manifest.save()


def main(argv: list[str] | None = None) -> int:
    """`python -m persense.export.fp16 --folder DIR --name sam_encoder`: convert and record (used by CMake)."""
    from persense.runtime.cli_common import add_common_flags, run_command

    parser = argparse.ArgumentParser(prog="persense.export.fp16", description=main.__doc__)
    parser.add_argument("--folder", type=Path, required=True, help="engines folder with manifest.json")
    parser.add_argument("--name", action="append", required=True, help="FP32 artefact to convert (repeatable)")
    add_common_flags(parser)

    def body(args: argparse.Namespace) -> int:
        manifest = load_manifest(args.folder)
        for name in args.name:
            add_artefact(args.folder, fp16_name(name), convert_fp16(manifest.artefact(name), args.folder))
        return 0

    return run_command(parser.prog, body, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
