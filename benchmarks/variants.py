"""The pipelines persense-bench measures, the engines they need, and the worker process that runs one of them.

Every pipeline runs in its own worker process (multiprocessing, spawn): the parent sends "cold" or "warm"
and gets one query's timings back (cold: encode the reference, then segment; warm: segment with the
reference encoded once when the worker started), so the parent can alternate pipelines while each process's peak
resident memory (ru_maxrss) stays its own. Runtime workers never import torch.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from persense.benchmarks.workload import Workload
from persense.runtime.artefact_names import SAM_MODELS
from persense.runtime.backends.choice import unavailable_reason
from persense.runtime.backends.table import TABLE
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import load_manifest
from persense.runtime.models.sam import engine_names

QUERIES = ("cold", "warm")  # the two queries a user meets: a new reference, or one encoded before
STOP_TIMEOUT_S = 60.0
DETECTOR_PROMPT = "object"  # the text prompt the `detector` stage runs (any word the detector's vocabulary knows)
DETECTOR_STAGE = "detector"


@dataclass(frozen=True)
class Variant:
    """One pipeline: the PyTorch oracle, or the engine runtime on one backend and precision."""

    name: str
    backend: str  # torch-cpu or torch-cuda (the oracle), ort-cpu, ort-cuda, trt or openvino
    precision: str  # fp32, fp16, int8 or bf16 (SamEngines.from_manifest's `precision`; TensorRT engines are fp16)
    export_flag: str | None = None  # the persense-export flag that writes this variant's models

    @property
    def is_oracle(self) -> bool:
        """True for the PyTorch oracle."""
        return self.backend.startswith("torch")

    def describe(self) -> dict[str, str]:
        """JSON form."""
        return {
            "name": self.name,
            "kind": "oracle" if self.is_oracle else "runtime",
            "backend": self.backend,
            "precision": self.precision,
        }


ORACLE_NAME = "oracle"
ORACLES = {device: Variant(ORACLE_NAME, f"torch-{device}", "fp32") for device in ("cpu", "cuda")}
RUNTIME_VARIANTS = {
    v.name: v
    for v in (
        Variant("ort-cpu-fp32", "ort-cpu", "fp32"),
        Variant("ort-cpu-fp16", "ort-cpu", "fp16", "--fp16"),
        Variant("ort-cpu-int8", "ort-cpu", "int8", "--int8"),
        Variant("ort-cuda-fp32", "ort-cuda", "fp32"),
        Variant("ort-cuda-fp16", "ort-cuda", "fp16", "--fp16"),
        Variant("trt-fp16", "trt", "fp16", "--fp16"),
        Variant("ov-cpu-fp32", "openvino", "fp32"),
        Variant("ov-cpu-bf16", "openvino", "bf16"),
        Variant("ov-cpu-int8", "openvino", "int8", "--openvino-int8"),
    )
}


# ----------------------------------------------------------------------------------------------- engines


def _run_module(module: str, *args: str) -> str | None:
    """Run `python -m module args -q`; None on success, else the last line it wrote to stderr."""
    done = subprocess.run([sys.executable, "-m", module, *args, "-q"], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"python -m {module} exited with code {done.returncode}"


TRAINED_MODELS = ("tiny-trained",)  # models whose weights the project ships (sam_build.BUNDLED_CHECKPOINTS)


def weights_of(model_type: str) -> str:
    """'bundled' for a model whose trained weights the project ships, else 'random'."""
    return "bundled" if model_type in TRAINED_MODELS else "random"


def export_engines(
    model_type: str, seed: int, folder: Path, flags: list[str], detector: str | None = None, method: str = "persense"
) -> dict[str, str]:
    """`persense-export` (random weights with `seed`, or the bundled ones) into the cache folder (it reuses
    unchanged artefacts), with the Grounding DINO configuration `detector` (random weights with `seed`) when
    given and PerSense++'s feature engine (random weights with `seed`) for persense++, then once per extra flag
    (--fp16, --int8), so that a failed conversion only skips its variants; {flag: error line}."""
    weights = [] if weights_of(model_type) == "bundled" else ["--random-weights", "--seed", str(seed)]
    command = ["persense.export.cli", "--model", model_type, *weights, "--out", str(folder)]
    error = _run_module(*command)
    if error is None and detector is not None:
        error = _run_module(
            "persense.export.cli", "--detector", detector, "--random-weights", "--seed", str(seed), "--out", str(folder)
        )
    if error is None and method == "persense++":
        error = _run_module(
            "persense.export.cli", "--method", method, "--random-weights", "--seed", str(seed), "--out", str(folder)
        )
    if error is not None:
        raise PersenseError(f"exporting the {model_type} engines into {folder} failed: {error}")
    errors = {flag: _run_module(*command, flag) for flag in flags}
    return {flag: error for flag, error in errors.items() if error is not None}


def _torch_cuda_reason() -> str | None:
    """None when torch sees a CUDA GPU here, else why not (asked in a child process: the parent stays torch-free)."""
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return "torch cannot be imported here: install the `export` extra"
    version, available = done.stdout.split()
    return None if available == "True" else f"torch {version} sees no CUDA GPU here"


def platform_reason(variant: Variant) -> str | None:
    """Why this machine cannot run `variant` at all (no CUDA provider or GPU for torch, no TensorRT), or None."""
    if variant.is_oracle:
        return _torch_cuda_reason() if variant is ORACLES["cuda"] else None
    return unavailable_reason(variant.backend)


def engines_reason(variant: Variant, folder: Path, export_errors: dict[str, str]) -> str | None:
    """Why the engines in `folder` cannot serve `variant` (failed export, missing models, stale plans), or None."""
    if variant.export_flag in export_errors:
        return f"persense-export {variant.export_flag} failed: {export_errors[variant.export_flag]}"
    manifest = load_manifest(folder)
    if TABLE[variant.backend].own_engines:
        from persense.runtime.backends.trt_engine import engine_unusable_reason

        return next((r for name in SAM_MODELS if (r := engine_unusable_reason(manifest, name)) is not None), None)
    names = engine_names(manifest, variant.backend, variant.precision)
    missing = [names[name] for name in SAM_MODELS if names[name] not in manifest.artefacts]
    return f"{folder}: the manifest has no {' or '.join(missing)}" if missing else None


# ------------------------------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to build its pipeline for one workload."""

    variant: Variant
    model_type: str
    seed: int
    engines: Path
    workload: Workload
    counter: str  # "fixed" (the workload's density map) or "sam" (SamPrototypeCounter)
    threads: int
    decode_chunk: int | None
    method: str = "persense"


def _counter(spec: WorkerSpec) -> Any:
    """The density counter both pipelines use."""
    if spec.counter == "sam":
        from persense.runtime.counters.sam_prototype import SamPrototypeCounter

        return SamPrototypeCounter()
    from persense.runtime.counters.base import NpyDensityCounter

    if spec.workload.density is None:
        raise PersenseError(f"workload {spec.workload.name} has no density map for the fixed counter")
    return NpyDensityCounter(spec.workload.density)


def _build_pipeline(spec: WorkerSpec) -> Any:
    """The oracle (torch model with the export's seed) or the runtime on the variant's engines."""
    if spec.variant.is_oracle:
        import torch

        from persense.export.oracle.pipeline import OraclePipeline
        from persense.export.sam.build import bundled_or_random_sam

        torch.set_num_threads(spec.threads)
        device = spec.variant.backend.removeprefix("torch-")
        sam = bundled_or_random_sam(spec.model_type, spec.seed).to(device)
        if spec.method == "persense++":
            from persense.export.oracle.plusplus import OraclePlusPlus

            return OraclePlusPlus(sam, _counter(spec), resnet_seed=spec.seed)
        return OraclePipeline(sam, _counter(spec))
    from persense.runtime.models.sam import SamEngines
    from persense.runtime.pipeline.flow import PerSensePipeline

    variant = spec.variant
    manifest = load_manifest(spec.engines)
    sam = SamEngines.from_manifest(manifest, variant.backend, spec.threads, spec.decode_chunk, variant.precision)
    if spec.method == "persense++":
        from persense.runtime.models.features import FeatureEngine
        from persense.runtime.plusplus.flow import PlusPlusPipeline

        features = FeatureEngine.from_manifest(manifest, variant.backend, spec.threads, variant.precision)
        return PlusPlusPipeline(sam, _counter(spec), features=features)
    return PerSensePipeline(sam, _counter(spec))


Detector = Callable[[np.ndarray], tuple[np.ndarray, float] | None]  # the `detector` stage: best box, confidence


def detector_stage(spec: WorkerSpec) -> Detector | None:
    """The `detector` stage when the engines folder has Grounding DINO, else None: the runtime's engine, or for the
    oracle transformers' PyTorch model with the export's weights (its configuration and the bench's seed) on
    the same pre-processing; both end with the original's post-processing and return the best box and its
    confidence. The first exemplar of both pipelines stays the similarity arg-max, so their masks stay
    comparable: the stage times the detector only.
    """
    from persense.runtime.models.detector import DETECTOR, GroundingDino, detector_text, postprocess, preprocess

    manifest = load_manifest(spec.engines)
    if DETECTOR not in manifest.artefacts:
        return None
    if not spec.variant.is_oracle:
        engine = GroundingDino.from_manifest(manifest, spec.variant.backend, spec.threads, spec.variant.precision)
        tokens = engine.encode_text(DETECTOR_PROMPT)

        def run_engine(image: np.ndarray) -> tuple[np.ndarray, float] | None:
            found = engine.best_box(image, tokens)
            return None if found is None else (found.box, found.confidence)

        return run_engine
    import torch

    from persense.export.grounding_dino.model import random_detector

    text, min_side = detector_text(manifest)
    tokens = text.encode(DETECTOR_PROMPT)
    entry = manifest.artefact(DETECTOR)
    if entry.source_checkpoint != "random":
        raise PersenseError(
            f"{manifest.folder}: the oracle rebuilds only a random-weight detector (persense-bench "
            f"--detector exports one); this one comes from {entry.source_checkpoint}"
        )
    tokenizer = (manifest.folder / entry.extra["tokenizer"]["file"]).read_text()
    device = spec.variant.backend.removeprefix("torch-")
    model = random_detector(entry.extra["config"], spec.seed, tokenizer).to(device)
    feeds = {name: torch.from_numpy(value).to(device) for name, value in tokens.feeds().items()}

    def run(image: np.ndarray) -> tuple[np.ndarray, float] | None:
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(preprocess(image, min_side)).to(device), **feeds)
        logits = out.logits[0, :, : tokens.input_ids.shape[1]].cpu().numpy()
        found = postprocess(logits, out.pred_boxes[0].cpu().numpy(), image.shape[:2])
        best = found.best()
        return None if best is None else (found.boxes[best], float(found.confidence[best]))

    return run


def _timed_detector(detector: Detector | None, image: np.ndarray) -> dict[str, float]:
    """{"detector": ms} of one detector run on the target, or {} without a detector."""
    if detector is None:
        return {}
    start = time.perf_counter()
    detector(image)
    return {DETECTOR_STAGE: (time.perf_counter() - start) * 1000.0}


def cold_query(
    pipeline: Any, image: np.ndarray, ref_image: np.ndarray, ref_mask: np.ndarray, detector: Detector | None = None
) -> dict[str, Any]:
    """One cold query: encode the reference, run the detector if any, segment the target; timings and decoder work."""
    start = time.perf_counter()
    target = pipeline.reference(ref_image, ref_mask)
    reference_ms = (time.perf_counter() - start) * 1000.0
    detected = _timed_detector(detector, image)
    return _record(pipeline.segment(image, target), {"reference_encoding": reference_ms, **detected})


def warm_query(pipeline: Any, image: np.ndarray, target: Any, detector: Detector | None = None) -> dict[str, Any]:
    """One warm query: the detector if any, then segment the target with a reference encoded beforehand."""
    detected = _timed_detector(detector, image)
    return _record(pipeline.segment(image, target), detected)


def _record(result: Any, timings_ms: dict[str, float]) -> dict[str, Any]:
    """A query's timings (`timings_ms` first, then the segmentation's stages), decoder work and packed union."""
    return {
        "timings_ms": {**timings_ms, **result.timings_ms},
        "decoder_prompts": int(result.decoder_prompts),
        "decoder_launches": int(result.decoder_launches),
        "points": int(len(result.points)),
        "count_estimate": float(result.count),
        "warnings": list(result.warnings),
        "union": np.packbits(result.union > 0),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def serve(conn: Connection, spec: WorkerSpec) -> None:
    """Worker process: build the pipeline and encode the reference once (untimed, for warm queries); answer
    "cold" or "warm" with one query's results, "stop" with peak RSS."""
    logging.getLogger("persense").setLevel(logging.ERROR)  # pipeline warnings are returned with each result
    try:
        start = time.perf_counter()
        pipeline = _build_pipeline(spec)
        detector = detector_stage(spec)
        image, ref_image, ref_mask = spec.workload.load()
        target = pipeline.reference(ref_image, ref_mask)
        conn.send(("ok", {"load_s": time.perf_counter() - start, "torch_imported": "torch" in sys.modules}))
        while (message := conn.recv()) in QUERIES:
            conn.send(
                (
                    "ok",
                    cold_query(pipeline, image, ref_image, ref_mask, detector)
                    if message == "cold"
                    else warm_query(pipeline, image, target, detector),
                )
            )
        conn.send(("ok", {"peak_rss_bytes": peak_rss_bytes()}))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which marks the pipeline failed
        conn.send(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


# ------------------------------------------------------------------------------------------ parent side


class Worker:
    """Parent-side handle of one worker process; after a failure `error` says why and calls return None."""

    def __init__(self, spec: WorkerSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, spec), name=f"bench-{spec.variant.name}", daemon=True)
        self.process.start()
        child.close()
        self.error: str | None = None
        self.info: dict[str, Any] = {}

    def ready(self) -> bool:
        """Wait until the pipeline is built; False if it failed."""
        self.info = self._request(None) or {}
        return self.error is None

    def run(self, query: str) -> dict[str, Any] | None:
        """The results of one `query` (one of QUERIES), or None after a failure."""
        return self._request(query)

    def stop(self) -> int | None:
        """End the worker; its peak RSS in bytes (None if it failed)."""
        reply = self._request("stop")
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return None if reply is None else reply["peak_rss_bytes"]

    def _request(self, message: str | None) -> dict[str, Any] | None:
        """Send `message` (None: just wait) and return the reply's payload; a failure sets `error`."""
        if self.error is not None:
            return None
        try:
            if message is not None:
                self.conn.send(message)
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            self.error = f"worker process died (exit code {self.process.exitcode}; -9 is usually out of memory)"
            return None
        if status == "error":
            self.error = payload
            return None
        return payload
