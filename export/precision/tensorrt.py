"""TensorRT FP16 engines from the FP32 ONNX models (TensorRT 10 Python API), and the `--fp16` export step.

Each engine: FP16 with the numerically sensitive layers (normalisation, softmax, reductions, pow/sqrt)
constrained to FP32, one optimisation profile over the dynamic axes of its kind, the folder's timing cache
read and updated, the plan saved as `<name>.<first 12 hex of its sha256>.engine` and recorded as manifest
entry `<name>_trt` with the TensorRT version and GPU compute capability it only runs on.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from persense.export.artefacts import add_artefact, reusable_variant
from persense.export.precision.fp16 import convert_fp16
from persense.export.precision.fp16_islands import SENSITIVE_OPS
from persense.runtime.artefact_names import RUNS_IN, engine_name, variant_name
from persense.runtime.backends.trt_engine import (
    compute_capability,
    stale_reason,
    tensorrt_unavailable_reason,
    tensorrt_version,
)
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import atomic_write_bytes
from persense.runtime.manifest import Artefact, Manifest, load_manifest, sha256_file

log = logging.getLogger(__name__)

TIMING_CACHE = "trt_timing.cache"
WORKSPACE_GIB = 8.0
PROMPT_BATCH_MAX = 256  # SAM decoder prompts per launch (the runtime's GPU decode chunk)
# (min, opt, max) per dynamic axis name, per artefact kind
PROFILE_RANGES: dict[str, dict[str, tuple[int, int, int]]] = {
    "sam_decoder": {"B": (1, 128, PROMPT_BATCH_MAX), "N": (1, 2, 64)},
    "counter_countr": {"N": (1, 8, 256), "K": (1, 3, 5)},  # windows per call, exemplar crops
    "grounding_dino": {"H": (320, 800, 1344), "W": (320, 1066, 1344), "T": (1, 8, 256)},  # 800/1333 resize, tokens
}
SENSITIVE_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


def input_profiles(artefact: Artefact) -> dict[str, list[list[int]]]:
    """[min, opt, max] shapes of every dynamic input of an artefact, from its kind's axis ranges."""
    ranges = PROFILE_RANGES.get(artefact.kind, {})
    profiles = {}
    for spec in artefact.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        missing = [d for d in spec.shape if isinstance(d, str) and d not in ranges]
        if missing:
            raise PersenseError(
                f"{artefact.file}: no TensorRT profile range for axis {missing[0]!r} of input "
                f"'{spec.name}' ({artefact.kind}); add it to PROFILE_RANGES"
            )
        profiles[spec.name] = [[d if isinstance(d, int) else ranges[d][i] for d in spec.shape] for i in range(3)]
    return profiles


def engine_file(artefact: Artefact, plan: bytes) -> str:
    """`<onnx stem>.<first 12 hex of the plan's sha256>.engine`."""
    return f"{Path(artefact.file).stem}.{hashlib.sha256(plan).hexdigest()[:12]}.engine"


def record_engine(source: Artefact, folder: Path, plan: bytes, extra: dict[str, Any]) -> Artefact:
    """Save a plan under its content-hash name (removing older plans of the same model) and describe it."""
    name = engine_file(source, plan)
    for old in folder.glob(f"{Path(source.file).stem}.*.engine"):
        if old.name != name:
            old.unlink()
    atomic_write_bytes(folder / name, plan)
    extra = {
        "source_key": source.extra.get("source_key"),
        "onnx_file": source.file,
        "onnx_sha256": source.sha256,
        **extra,
    }
    return Artefact(
        file=name,
        sha256=sha256_file(folder / name),
        kind=source.kind,
        precision="fp16",
        model_type=source.model_type,
        source_checkpoint=source.source_checkpoint,
        opset=source.opset,
        inputs=list(source.inputs),
        outputs=list(source.outputs),
        extra=extra,
    )


def _current(
    previous: Artefact,
    source: Artefact,
    folder: Path,
    version: str,
    capability: str,
    profiles: dict[str, list[list[int]]],
) -> bool:
    """Whether a previous engine entry was built from this ONNX, here, with these profiles, and is intact."""
    path = folder / previous.file
    return (
        stale_reason(previous, version, capability, source) is None
        and previous.extra.get("profiles") == profiles
        and path.is_file()
        and sha256_file(path) == previous.sha256
    )


def _sensitive_nodes(onnx_path: Path) -> set[str]:
    """Names of the ONNX nodes whose op is numerically sensitive (TensorRT names layers after them)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {node.name for node in model.graph.node if node.op_type in SENSITIVE_OPS}


def _constrain_sensitive_layers(trt: Any, network: Any, node_names: set[str]) -> int:
    """Pin the sensitive float layers to FP32 (precision and output types); returns how many."""
    types = {getattr(trt.LayerType, t) for t in SENSITIVE_LAYER_TYPES}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in types and layer.name not in node_names:
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(t.dtype != trt.float32 for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _timing_cache(config: Any, path: Path) -> None:
    """Attach the folder's timing cache (a fresh one when absent, corrupt or from another GPU/TensorRT)."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        if config.set_timing_cache(cache, ignore_mismatch=False):
            return
    except Exception as exc:  # noqa: BLE001 (TensorRT raises its own types on an unreadable cache)
        log.warning("%s unusable (%s), starting a new timing cache", path.name, exc)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _build_plan(
    onnx_path: Path, profiles: dict[str, list[list[int]]], cache_path: Path, workspace_gib: float
) -> tuple[bytes, int]:
    """Parse, configure (FP16, FP32 sensitive layers, profile, timing cache) and build; returns (plan, pinned)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise PersenseError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profiles.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    _timing_cache(config, cache_path)
    pinned = _constrain_sensitive_layers(trt, network, _sensitive_nodes(onnx_path))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PersenseError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan)), pinned


def build_engine(
    artefact: Artefact, folder: Path, previous: Artefact | None = None, workspace_gib: float = WORKSPACE_GIB
) -> Artefact:
    """The `<name>_trt` entry of an FP32 ONNX artefact: `previous` when still current, else a fresh FP16 build."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise PersenseError(f"cannot build a TensorRT engine for {artefact.file}: {reason}")
    version, capability = tensorrt_version(), compute_capability()
    profiles = input_profiles(artefact)
    if previous is not None and _current(previous, artefact, folder, version, capability, profiles):
        log.info("%s unchanged, reusing %s", artefact.file, previous.file)
        return previous
    start = time.perf_counter()
    plan, pinned = _build_plan(folder / artefact.file, profiles, folder / TIMING_CACHE, workspace_gib)
    seconds = round(time.perf_counter() - start, 1)
    log.info("built TensorRT engine for %s in %.1f s (%d layers pinned to FP32)", artefact.file, seconds, pinned)
    return record_engine(
        artefact,
        folder,
        plan,
        {
            "tensorrt_version": version,
            "compute_capability": capability,
            "profiles": profiles,
            "fp32_layers": pinned,
            "precision_constraints": "prefer",
            "timing_cache": TIMING_CACHE,
            "workspace_gib": workspace_gib,
            "build_seconds": seconds,
        },
    )


def fp16_artefacts(
    artefacts: dict[str, Artefact], folder: Path, previous: Manifest | None = None
) -> tuple[dict[str, Artefact], str | None]:
    """`--fp16`: FP16 ONNX entries for the FP32 ONNX artefacts the runtime runs in FP16 (not the counters), plus
    engines for every FP32 ONNX artefact where TensorRT and a GPU are usable.

    Returns the new entries and, when no engines were built, one line saying why.
    """
    sources = {name: a for name, a in artefacts.items() if a.precision == "fp32" and a.file.endswith(".onnx")}
    added: dict[str, Artefact] = {}
    for name, art in sources.items():
        if name in RUNS_IN["fp16"]:
            added[variant_name(name, "fp16")] = reusable_variant(previous, name, art, "fp16") or convert_fp16(
                art, folder
            )
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return added, f"TensorRT engines not built: {reason}"
    for name, art in sources.items():
        if "trt" not in art.extra.get("backends", ["trt"]):
            continue  # exported for other backends only (sam_encoder_gpu: ONNX Runtime CUDA)
        old = previous.artefacts.get(engine_name(name)) if previous is not None else None
        added[engine_name(name)] = build_engine(art, folder, old)
    return added, None


def main(argv: list[str] | None = None) -> int:
    """`python -m persense.export.precision.tensorrt --folder DIR --name NAME [--stamp F]`: build, record (CMake)."""
    from persense.runtime.cli.common import add_common_flags, run_command

    parser = argparse.ArgumentParser(prog="persense.export.precision.tensorrt", description=main.__doc__)
    parser.add_argument("--folder", type=Path, required=True, help="engines folder with manifest.json")
    parser.add_argument("--name", required=True, help="FP32 ONNX artefact to build an engine for")
    parser.add_argument("--stamp", type=Path, help="file to write the engine's file name into (a make target)")
    add_common_flags(parser)

    def body(args: argparse.Namespace) -> int:
        manifest = load_manifest(args.folder)
        built = build_engine(manifest.artefact(args.name), args.folder, manifest.artefacts.get(engine_name(args.name)))
        add_artefact(args.folder, engine_name(args.name), built)
        if args.stamp:
            atomic_write_bytes(args.stamp, (built.file + "\n").encode())
        return 0

    return run_command(parser.prog, body, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
