"""Orchestrates an export: which artefacts, from which weights, reused when unchanged, and the manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from persense.runtime.errors import PersenseError
from persense.runtime.manifest import MANIFEST_NAME, Artefact, Manifest, load_manifest, sha256_file

log = logging.getLogger(__name__)

# Part of every artefact's source key: bump it when a change to the export code changes what it writes,
# so that folders exported by older code are re-exported instead of reused.
EXPORT_RECIPE = 2


@dataclass
class ExportRequest:
    """What to export: SAM type, its weights (None = random with `seed`), the output folder."""

    model_type: str
    checkpoint: Path | None
    seed: int
    out: Path
    force: bool = False


def resolve_checkpoint(model_type: str, checkpoint: Path | None, random_weights: bool,
                       weights_dir: Path) -> Path | None:
    """The checkpoint to load: the given path, the official file in `weights_dir`, or None for random weights."""
    from persense.export.sam_build import CHECKPOINT_NAMES

    if random_weights or model_type == "tiny":
        return None
    if checkpoint is not None:
        return checkpoint
    default = weights_dir / CHECKPOINT_NAMES[model_type]
    if default.is_file():
        return default
    raise PersenseError(f"no SAM checkpoint: put {CHECKPOINT_NAMES[model_type]} in {weights_dir}/, pass --checkpoint "
                        f"PATH, or use --random-weights for a demo with random weights")


def package_versions() -> dict[str, str]:
    """Versions of the packages an artefact depends on."""
    import importlib.metadata as md

    versions = {}
    for name in ("persense", "torch", "onnx", "onnxruntime", "onnxslim", "onnxconverter-common", "tensorrt"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def _reusable(previous: Manifest | None, name: str, source_key: str) -> Artefact | None:
    """The previous artefact if it came from the same source and its files are intact."""
    if previous is None or name not in previous.artefacts:
        return None
    art = previous.artefacts[name]
    if art.extra.get("source_key") != source_key:
        return None
    try:
        previous.verified_path(name)
    except PersenseError:
        return None
    return art


def _previous_manifest(out: Path) -> Manifest | None:
    """The folder's current manifest, if any and readable."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(out)
    except PersenseError:
        return None


def export_all(request: ExportRequest) -> Path:
    """Export SAM's encoder and decoder (reusing unchanged ones) and write the manifest; returns its path."""
    from persense.export.sam_build import load_sam, random_sam
    from persense.export.sam_export import export_decoder, export_encoder

    request.out.mkdir(parents=True, exist_ok=True)
    source = sha256_file(request.checkpoint) if request.checkpoint else "random"
    source_key = f"{request.model_type}:{source}:{'' if request.checkpoint else request.seed}:r{EXPORT_RECIPE}"
    previous = None if request.force else _previous_manifest(request.out)
    if previous is not None and previous.model_type != request.model_type:
        previous = None
    sam = None
    jobs: dict[str, Callable] = {"sam_encoder": export_encoder, "sam_decoder": export_decoder}
    artefacts: dict[str, Artefact] = {}
    for name, job in jobs.items():
        reused = _reusable(previous, name, source_key)
        if reused is not None:
            log.info("%s unchanged, reusing %s", name, reused.file)
            artefacts[name] = reused
            continue
        if sam is None:
            sam = load_sam(request.model_type, request.checkpoint) if request.checkpoint else random_sam(
                request.model_type, request.seed)
        log.info("exporting %s (%s, %s weights)", name, request.model_type, "checkpoint" if request.checkpoint
                 else f"random seed {request.seed}")
        art = job(sam, request.out / f"{name}.onnx", request.model_type, source)
        art.extra["source_key"] = source_key
        artefacts[name] = art
    manifest = Manifest(folder=request.out, model_type=request.model_type, versions=package_versions(),
                        artefacts=artefacts)
    return manifest.save()
