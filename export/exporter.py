"""Orchestrates an export: which artefacts, from which weights, reused when unchanged, and the manifest."""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from persense.export.artefacts import package_versions, reusable
from persense.runtime.artefact_names import (
    COUNTR,
    DECODER,
    DSALVANET,
    ENCODER,
    FEATURES,
    GPU_ENCODER,
    export_family,
    source_name,
)
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import MANIFEST_NAME, Artefact, Manifest, load_manifest, sha256_file

log = logging.getLogger(__name__)

# Part of every artefact's source key: bump it when a change to the export code changes what it writes,
# so that folders exported by older code are re-exported instead of reused.
EXPORT_RECIPE = 7


@dataclass
class ExportRequest:
    """What to export: SAM type (None: no SAM) and weights (None = random with `seed`), an optional counter and
    detector, the folder."""

    model_type: str | None
    checkpoint: Path | None
    seed: int
    out: Path
    force: bool = False
    counter: str | None = None  # "countr" or "dsalvanet"
    counter_checkpoint: Path | None = None
    counter_config: str = "base"  # CounTR size; "tiny" is a test-size model with the same I/O
    fp16: bool = False  # also FP16 ONNX models and, where TensorRT and a GPU are usable, TensorRT engines
    int8: bool = False  # also INT8 (dynamically quantised) SAM models for the CPU
    openvino_int8: bool = False  # also the NNCF-quantised SAM encoder for OpenVINO (an IR)
    gpu_encoder: str | None = None  # also sam_encoder_gpu with this attention form (export/gpu_encoder.py)
    detector: str | None = None  # "grounding-dino" or "grounding-dino-tiny" (export/grounding_dino.py)
    detector_checkpoint: Path | None = None  # Hugging Face checkpoint folder; None = random weights with `seed`
    detector_tokenizer: Path | None = None  # tokenizer.json or vocab.txt; None = the checkpoint's or generated
    features: bool = False  # also PerSense++'s ResNet-50 feature engine (--method persense++)
    feature_checkpoint: Path | None = None  # torchvision's resnet50-0676ba61.pth; None = random weights with `seed`


@dataclass
class Job:
    """One artefact to export: its name, where its weights come from, how to build and export it."""

    name: str
    source: str  # checkpoint sha256 or "random"
    source_key: str
    build: Callable[[], object]
    export: Callable[[object, Path, str], Artefact]


def resolve_checkpoint(
    model_type: str, checkpoint: Path | None, random_weights: bool, weights_dir: Path
) -> Path | None:
    """The checkpoint to load: the given path, the official file in `weights_dir`, or None for random weights."""
    from persense.export.sam.build import BUNDLED_CHECKPOINTS, CHECKPOINT_NAMES

    if random_weights or (model_type == "tiny" and checkpoint is None):
        return None
    if checkpoint is None and model_type in BUNDLED_CHECKPOINTS:
        return BUNDLED_CHECKPOINTS[model_type]
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise PersenseError(f"{checkpoint}: checkpoint not found (download it and pass its path)")
        return checkpoint
    default = weights_dir / CHECKPOINT_NAMES[model_type]
    if default.is_file():
        return default
    raise PersenseError(
        f"no SAM checkpoint: put {CHECKPOINT_NAMES[model_type]} in {weights_dir}/, pass --checkpoint "
        f"PATH, or use --random-weights for a demo with random weights"
    )


def _previous_manifest(out: Path) -> Manifest | None:
    """The folder's current manifest, if any and readable."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(out)
    except PersenseError:
        return None


def _sam_jobs(request: ExportRequest) -> list[Job]:
    """SAM's encoder and decoder (and with `gpu_encoder` the fused-attention encoder), sharing one model build."""
    from persense.export.sam.build import is_tiny_vit, load_sam, random_sam
    from persense.export.sam.graphs import export_decoder, export_encoder

    source = sha256_file(request.checkpoint) if request.checkpoint else "random"
    key = f"{request.model_type}:{source}:{'' if request.checkpoint else request.seed}:r{EXPORT_RECIPE}"
    build = functools.cache(
        lambda: (
            load_sam(request.model_type, request.checkpoint)
            if request.checkpoint
            else random_sam(request.model_type, request.seed)
        )
    )
    jobs = [
        Job(name, source, key, build, lambda m, path, src, f=fn: f(m, path, request.model_type, src))
        for name, fn in ((ENCODER, export_encoder), (DECODER, export_decoder))
    ]
    form = request.gpu_encoder
    if form is not None and is_tiny_vit(request.model_type):
        raise PersenseError(
            f"--gpu-encoder fuses the global attention of SAM's ViT encoders; {request.model_type}'s TinyViT has "
            f"only small windows and no such encoder: drop --gpu-encoder (sam_encoder runs on every backend)"
        )
    if form is not None:
        from persense.export.sam.gpu_encoder import ATTENTION_FORMS, export_gpu_encoder

        if form not in ATTENTION_FORMS:
            raise PersenseError(
                f"unknown attention form {form!r} for the GPU encoder; choose one of {', '.join(ATTENTION_FORMS)}"
            )
        jobs.append(
            Job(
                GPU_ENCODER,
                source,
                f"{key}:{form}",
                build,
                lambda m, path, src: export_gpu_encoder(m, path, request.model_type, src, form),
            )
        )
    return jobs


def _counter_job(request: ExportRequest) -> Job:
    """The density counter engine."""
    checkpoint = request.counter_checkpoint
    if checkpoint is not None and not checkpoint.is_file():
        raise PersenseError(f"{checkpoint}: counter checkpoint not found")
    source = sha256_file(checkpoint) if checkpoint else "random"
    if request.counter == "countr":
        from persense.export.counters.countr import export_countr, load_countr, random_countr

        build = (
            (lambda: load_countr(checkpoint))
            if checkpoint
            else (lambda: random_countr(request.seed, request.counter_config))
        )
        key = f"countr-{request.counter_config}:{source}:{'' if checkpoint else request.seed}:r{EXPORT_RECIPE}"
        return Job(COUNTR, source, key, build, lambda m, path, src: export_countr(m, path.parent, src))
    if request.counter == "dsalvanet":
        from persense.export.counters.dsalvanet import export_dsalvanet, load_dsalvanet, random_dsalvanet

        build = (lambda: load_dsalvanet(checkpoint)) if checkpoint else (lambda: random_dsalvanet(request.seed))
        key = f"dsalvanet:{source}:{'' if checkpoint else request.seed}:r{EXPORT_RECIPE}"
        return Job(DSALVANET, source, key, build, lambda m, path, src: export_dsalvanet(m, path.parent, src))
    raise PersenseError(f"unknown counter {request.counter!r}; choose countr or dsalvanet")


def _detector_job(request: ExportRequest) -> Job:
    """The Grounding DINO detector (and its tokenizer file, rewritten every run so a reused entry has it)."""
    from persense.export.grounding_dino.model import (
        DETECTOR,
        detector_tokenizer,
        export_onnx,
        load_detector,
        random_detector,
        write_tokenizer,
    )

    checkpoint, config = request.detector_checkpoint, request.detector
    tokenizer = detector_tokenizer(checkpoint, request.detector_tokenizer)
    write_tokenizer(request.out, tokenizer)
    source = (
        "random"
        if checkpoint is None
        else (sha256_file(checkpoint) if checkpoint.is_file() else _folder_hash(checkpoint))
    )
    key = (
        f"{config}:{source}:{'' if checkpoint else request.seed}:"
        f"{hashlib.sha256(tokenizer.encode()).hexdigest()[:16]}:r{EXPORT_RECIPE}"
    )
    build = (
        (lambda: load_detector(config, checkpoint, tokenizer))
        if checkpoint
        else (lambda: random_detector(config, request.seed, tokenizer))
    )
    return Job(DETECTOR, source, key, build, lambda m, path, src: export_onnx(m, path, config, src, tokenizer))


def _feature_job(request: ExportRequest) -> Job:
    """PerSense++'s ResNet-50 feature engine (its checkpoint read and checked now, before any export runs)."""
    from persense.export.features.graph import MODEL_TYPE, export_features
    from persense.export.features.resnet import build_resnet, read_state_dict

    checkpoint = request.feature_checkpoint
    state = read_state_dict(checkpoint) if checkpoint else None
    source = sha256_file(checkpoint) if checkpoint else "random"
    key = f"{MODEL_TYPE}:{source}:{'' if checkpoint else request.seed}:r{EXPORT_RECIPE}"
    return Job(FEATURES, source, key, lambda: build_resnet(state, request.seed), export_features)


def _folder_hash(folder: Path) -> str:
    """sha256 of a checkpoint folder's config and weights files (a missing folder fails when loaded)."""
    from persense.export.grounding_dino.hf_checkpoint import WEIGHT_FILES

    files = [folder / name for name in ("config.json", *WEIGHT_FILES) if (folder / name).is_file()]
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def _kept(previous: Manifest | None, artefacts: dict[str, Artefact]) -> dict[str, Artefact]:
    """Earlier artefacts this run does not rewrite (other counters, FP16 models, engines) that are intact
    and were made from the same source as what the folder now holds."""
    kept: dict[str, Artefact] = {}
    for name, art in previous.artefacts.items() if previous else ():
        # sam_encoder_gpu (its key: SAM's key + ":<form>") is made from the SAM build that sam_encoder is
        base = artefacts.get(source_name(name)) or artefacts.get(export_family(name))
        key = art.extra.get("source_key", "")
        if name in artefacts or (base is not None and not f"{key}:".startswith(f"{base.extra.get('source_key')}:")):
            continue
        if reusable(previous, name, key) is not None:
            kept[name] = art
    return kept


def export_all(request: ExportRequest) -> tuple[Path, str | None]:
    """Export every requested artefact (reusing unchanged ones) and write the manifest.

    Returns the manifest path and, with `fp16`, one line saying why TensorRT engines were not built.
    """
    request.out.mkdir(parents=True, exist_ok=True)
    previous = None if request.force else _previous_manifest(request.out)
    if previous is not None and request.model_type is not None and previous.model_type != request.model_type:
        previous = None
    model_type = request.model_type or (previous.model_type if previous is not None else "none")
    jobs = (
        (_sam_jobs(request) if request.model_type else [])
        + ([_counter_job(request)] if request.counter else [])
        + ([_detector_job(request)] if request.detector else [])
        + ([_feature_job(request)] if request.features else [])
    )
    artefacts: dict[str, Artefact] = {}
    for job in tqdm(jobs, desc="persense-export", unit="artefact", file=sys.stderr, disable=len(jobs) < 3):
        reused = reusable(previous, job.name, job.source_key)
        if reused is not None:
            log.info("%s unchanged, reusing %s", job.name, reused.file)
            artefacts[job.name] = reused
            continue
        log.info("exporting %s (%s)", job.name, "checkpoint" if job.source != "random" else "random weights")
        art = job.export(job.build(), request.out / f"{job.name}.onnx", job.source)
        art.extra["source_key"] = job.source_key
        artefacts[job.name] = art
    del jobs, job  # frees the torch models (vit_h: 2.5 GB) before the FP16 and INT8 steps
    artefacts.update(_kept(previous, artefacts))
    note = None
    if request.fp16:
        from persense.export.precision.tensorrt import fp16_artefacts

        added, note = fp16_artefacts(artefacts, request.out, previous)
        artefacts.update(added)
    if request.int8:
        from persense.export.precision.int8 import int8_artefacts

        artefacts.update(int8_artefacts(artefacts, request.out, previous))
    if request.openvino_int8:
        from persense.export.precision.openvino_int8 import ov_int8_artefacts

        artefacts.update(ov_int8_artefacts(artefacts, request.out, previous))
    manifest = Manifest(folder=request.out, model_type=model_type, versions=package_versions(), artefacts=artefacts)
    return manifest.save(), note


def export_detector(
    out_dir: Path,
    config: str,
    checkpoint: Path | None = None,
    tokenizer: Path | None = None,
    seed: int = 0,
    fp16: bool = False,
) -> list[Artefact]:
    """Export the detector (reusing an unchanged one) into `out_dir`'s manifest; returns its manifest entries."""
    from persense.export.grounding_dino.model import DETECTOR

    request = ExportRequest(
        model_type=None,
        checkpoint=None,
        seed=seed,
        out=Path(out_dir),
        fp16=fp16,
        detector=config,
        detector_checkpoint=checkpoint,
        detector_tokenizer=tokenizer,
    )
    export_all(request)
    manifest = load_manifest(Path(out_dir))
    return [art for name, art in manifest.artefacts.items() if name.startswith(DETECTOR)]
