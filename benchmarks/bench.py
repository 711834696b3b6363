"""persense-bench: the PyTorch oracle against the engine runtime, per stage, on the same weights and inputs.

For each workload (a synthetic dense scene per --instances count, or the user's image), every pipeline
gets its own worker process; after --warmup untimed rounds each, the pipelines take turns (order
reversed every round) for --repeat timed rounds. A round is one cold query (reference encoding +
segmentation) and one warm query (segmentation with the reference encoded beforehand) per pipeline.
Reports: bench.json, bench.md and bench.png in --out.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persense.benchmarks import mask_stage, report
from persense.benchmarks.variants import (
    DETECTOR_PROMPT,
    DETECTOR_STAGE,
    ORACLE_NAME,
    ORACLES,
    QUERIES,
    RUNTIME_VARIANTS,
    Variant,
    Worker,
    WorkerSpec,
    engines_reason,
    export_engines,
    platform_reason,
    weights_of,
)
from persense.benchmarks.workload import (
    DEFAULT_SIZE,
    Workload,
    parse_instances,
    parse_size,
    synthetic_workloads,
    user_workload,
)
from persense.runtime.api import METHODS
from persense.runtime.backends.engine import default_threads
from persense.runtime.backends.ort_check import check_onnxruntime
from persense.runtime.cli.common import add_common_flags, run_command
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import load_manifest
from persense.runtime.metrics import latency_summary, mask_iou
from persense.runtime.models.detector import DETECTOR
from persense.runtime.pipeline.timing import STAGES

SCHEMA = "persense-bench/2"
MODELS = ("tiny", "tiny-trained", "vit_t", "vit_b", "vit_l", "vit_h")  # sam_build.SAM_CONFIGS (it needs torch)
DETECTORS = ("grounding-dino", "grounding-dino-tiny")  # export.grounding_dino.DETECTOR_CONFIGS (it needs torch)
DEFAULTS = {"model": "vit_h", "instances": "10,50,200,400", "warmup": 1, "repeat": 3}
QUICK = {"model": "tiny", "instances": "10", "warmup": 1, "repeat": 3}
MASK_STAGE_MIN_REPEAT = 5  # timed runs of the mask stage on ground-truth extents (milliseconds each)
SPEEDUPS = {"stages_ms": "speedup_vs_oracle", "warm_stages_ms": "warm_speedup_vs_oracle"}  # cold, warm
SETTLE_S = 0.25  # pause between queries, so the previous worker's thread pool stops spinning
MEMORY_METHOD = (
    "peak resident set size (getrusage ru_maxrss) of the worker process that ran only this pipeline "
    "on only this workload: loading the model or engines, warm-up and the timed queries; it includes "
    "the Python interpreter and the libraries the pipeline imports (torch for the oracle only)."
)


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures and how."""

    model_type: str
    seed: int
    warmup: int
    repeat: int
    threads: int
    decode_chunk: int | None
    counter: str
    variants: tuple[str, ...]
    oracle_device: str
    out: Path
    engines: Path
    quiet: bool
    detector: str | None = None
    method: str = "persense"

    def describe(self, inputs: str) -> dict[str, Any]:
        """JSON form."""
        return {
            "model_type": self.model_type,
            "weights": weights_of(self.model_type),
            "seed": self.seed,
            "warmup": self.warmup,
            "repeat": self.repeat,
            "threads": self.threads,
            "decode_chunk": self.decode_chunk,
            "counter": self.counter,
            "variants": list(self.variants),
            "oracle_device": self.oracle_device,
            "inputs": inputs,
            "engines": str(self.engines),
            "detector": self.detector,
            "method": self.method,
        }


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="persense-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {', '.join(f'--{k} {v}' for k, v in QUICK.items())} unless given",
    )
    parser.add_argument("--model", choices=MODELS, help=f"SAM variant (default {DEFAULTS['model']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the scenes (default 0)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=METHODS[0],
        help="the method both sides run: persense (default) or persense++ (its oracle against the runtime's)",
    )
    parser.add_argument(
        "--instances", help=f"instance counts of the synthetic scenes (default {DEFAULTS['instances']})"
    )
    parser.add_argument(
        "--size", default="x".join(map(str, DEFAULT_SIZE)), help="synthetic scene WxH (default %(default)s)"
    )
    parser.add_argument("--image", type=Path, help="your own target image instead of synthetic scenes")
    parser.add_argument("--ref", type=Path, help="reference image (with --image)")
    parser.add_argument("--ref-mask", type=Path, help="0/255 mask of one object in the reference (with --image)")
    parser.add_argument("--density", type=Path, help=".npy density map the fixed counter returns (with --image)")
    parser.add_argument(
        "--counter",
        choices=("fixed", "sam"),
        default="fixed",
        help="fixed: the scene's ground-truth density (or --density); sam: the SAM-only counter",
    )
    parser.add_argument(
        "--variants", default=",".join(RUNTIME_VARIANTS), help="runtime variants to try (default: all of %(default)s)"
    )
    parser.add_argument(
        "--oracle-device",
        choices=tuple(ORACLES),
        default="cpu",
        help="where the PyTorch oracle runs: cpu, or cuda to compare with torch on the same GPU (default %(default)s)",
    )
    parser.add_argument(
        "--detector",
        choices=DETECTORS,
        help=f"also export Grounding DINO (random weights, --seed); both pipelines time it on each "
        f"target (prompt {DETECTOR_PROMPT!r}) as stage `detector` whenever the engines have it",
    )
    parser.add_argument(
        "--warmup", type=int, help=f"untimed queries per pipeline and workload (default {DEFAULTS['warmup']})"
    )
    parser.add_argument(
        "--repeat", type=int, help=f"timed queries per pipeline and workload (default {DEFAULTS['repeat']})"
    )
    parser.add_argument("--threads", type=int, help="CPU threads of torch and ONNX Runtime (default: all usable cores)")
    parser.add_argument("--decode-chunk", type=int, help="runtime prompts per decoder launch (default: per backend)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default %(default)s)")
    parser.add_argument(
        "--engines-cache",
        type=Path,
        help="folder the benchmark exports its engines into (default OUT/engines-MODEL-seedN)",
    )
    add_common_flags(parser)
    return parser


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Settings from the flags, with --quick's or the normal defaults where a flag was not given."""
    defaults = QUICK if args.quick else DEFAULTS
    model = args.model or defaults["model"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    repeat = defaults["repeat"] if args.repeat is None else args.repeat
    if warmup < 0 or repeat < 1:
        raise PersenseError(f"--warmup must be 0 or more and --repeat 1 or more (got {warmup} and {repeat})")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in RUNTIME_VARIANTS]
    if unknown:
        raise PersenseError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(RUNTIME_VARIANTS)}")
    return Settings(
        model,
        args.seed,
        warmup,
        repeat,
        args.threads or default_threads(),
        args.decode_chunk,
        args.counter,
        variants,
        args.oracle_device,
        args.out,
        args.engines_cache or args.out / f"engines-{model}-seed{args.seed}",
        args.quiet,
        args.detector,
        args.method,
    )


def make_workloads(args: argparse.Namespace, settings: Settings) -> list[Workload]:
    """The user's image when --image is given, else one synthetic scene per instance count."""
    own = (args.image, args.ref, args.ref_mask)
    if any(p is not None for p in own) or args.density is not None:
        if any(p is None for p in own):
            raise PersenseError("your own inputs need all of --image, --ref and --ref-mask")
        if args.instances is not None:
            raise PersenseError("--instances applies to synthetic scenes; leave it out with --image")
        if settings.counter == "fixed" and args.density is None:
            raise PersenseError("--counter fixed needs --density FILE.npy with --image; or use --counter sam")
        return [user_workload(args.image, args.ref, args.ref_mask, args.density)]
    instances = parse_instances(args.instances or (QUICK if args.quick else DEFAULTS)["instances"])
    return synthetic_workloads(settings.out / "workloads", instances, parse_size(args.size), settings.seed)


class Progress:
    """A tqdm bar on stderr when tqdm is installed, else one line per query; silent with -q."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="query", file=sys.stderr, dynamic_ncols=True, disable=quiet)
        except ImportError:
            self.bar = None

    def step(self, label: str, seconds: float) -> None:
        """Count one finished query."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label}: {seconds:.1f} s")
            self.bar.update()
        elif not self.quiet:
            print(f"[{self.done}/{self.total}] {label}: {seconds:.1f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()


def note(message: str, quiet: bool) -> None:
    """One progress line on stderr."""
    if not quiet:
        print(f"persense-bench: {message}", file=sys.stderr, flush=True)


def _stats(values: list[float]) -> dict[str, Any]:
    """p50/p90/min/max and the samples, in ms."""
    array = np.asarray(values, dtype=np.float64)
    return {**latency_summary(array), "samples": [round(float(v), 3) for v in array]}


def _stage_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage statistics (STAGES first, then any other stage a pipeline timed) and the total of all stages."""
    timed = [s["timings_ms"] for s in samples]
    names = [*STAGES, *sorted({k for t in timed for k in t} - set(STAGES))]
    stats = {name: _stats([t[name] for t in timed]) if all(name in t for t in timed) else None for name in names}
    stats["total"] = _stats([sum(t.values()) for t in timed])
    return stats


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two packed-bit masks of the same image."""
    return mask_iou(np.unpackbits(a).astype(bool), np.unpackbits(b).astype(bool))


def summarise(
    workload: Workload, variant: Variant, worker: Worker, queries: dict[str, list[dict[str, Any]]], peak: int | None
) -> dict[str, Any]:
    """The JSON record of one pipeline on one workload: cold queries as `stages_ms`, warm ones as `warm_stages_ms`."""
    samples, warm = queries["cold"], queries["warm"]
    measured = worker.error is None and bool(samples) and len(warm) == len(samples)
    first = samples[0] if measured else {}
    return {
        "workload": workload.name,
        "instances": workload.instances,
        "ground_truth_count": workload.ground_truth_count,
        "pipeline": variant.name,
        "backend": variant.backend,
        "precision": variant.precision,
        "status": "measured" if measured else "failed",
        "error": worker.error,
        "repetitions": len(samples),
        "stages_ms": _stage_stats(samples) if measured else None,
        "warm_stages_ms": _stage_stats(warm) if measured else None,
        "decoder_launches": first.get("decoder_launches"),
        "decoder_prompts": first.get("decoder_prompts"),
        "points": first.get("points"),
        "count_estimate": first.get("count_estimate"),
        "peak_rss_mb": None if peak is None else round(peak / 2**20, 1),
        "load_s": round(worker.info["load_s"], 3) if "load_s" in worker.info else None,
        "torch_in_process": worker.info.get("torch_imported"),
        "union_iou_vs_oracle": None,
        "speedup_vs_oracle": None,
        "warm_speedup_vs_oracle": None,
        "warm_union_equals_cold": bool(measured and np.array_equal(samples[0]["union"], warm[0]["union"])),
        "warnings": sorted({w for s in samples + warm for w in s["warnings"]}),
    }


def _compare_with_oracle(records: list[dict[str, Any]], unions: dict[str, np.ndarray]) -> None:
    """Fill each runtime record's union IoU and cold and warm total-p50 speed-ups against the oracle on the same
    workload (all measured in this run)."""
    oracle = next((r for r in records if r["pipeline"] == ORACLE_NAME and r["status"] == "measured"), None)
    if oracle is None:
        return
    for record in records:
        if record is oracle or record["status"] != "measured":
            continue
        record["union_iou_vs_oracle"] = round(_iou(unions[record["pipeline"]], unions[ORACLE_NAME]), 6)
        for stages, speedup in SPEEDUPS.items():
            record[speedup] = round(oracle[stages]["total"]["p50"] / record[stages]["total"]["p50"], 3)


def measure_workload(
    settings: Settings, workload: Workload, variants: list[Variant], progress: Progress
) -> list[dict[str, Any]]:
    """Start one worker per pipeline, warm up, alternate the timed queries, stop the workers; their records."""
    workers = {
        v.name: Worker(
            WorkerSpec(
                v,
                settings.model_type,
                settings.seed,
                settings.engines,
                workload,
                settings.counter,
                settings.threads,
                settings.decode_chunk,
                settings.method,
            )
        )
        for v in variants
    }
    for worker in workers.values():
        worker.ready()
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {name: {q: [] for q in QUERIES} for name in workers}
    for round_index in range(settings.warmup + settings.repeat):
        order = list(workers) if round_index % 2 == 0 else list(reversed(workers))
        timed = round_index >= settings.warmup
        for name in order:
            for query in QUERIES:
                start = time.perf_counter()
                result = workers[name].run(query)
                phase = f"{query} query {round_index - settings.warmup + 1}/{settings.repeat}" if timed else "warm-up"
                progress.step(f"{workload.name} {name} {phase}", time.perf_counter() - start)
                if result is not None:
                    if timed:
                        samples[name][query].append(result)
                    time.sleep(SETTLE_S)
    peaks = {name: worker.stop() for name, worker in workers.items()}
    records = [summarise(workload, v, workers[v.name], samples[v.name], peaks[v.name]) for v in variants]
    _compare_with_oracle(records, {name: runs["cold"][0]["union"] for name, runs in samples.items() if runs["cold"]})
    return records


def _pipelines(requested: list[Variant], skipped: dict[str, str], records: list[dict[str, Any]]) -> list[dict]:
    """Every pipeline asked for, with its status (measured, failed or skipped) and why."""
    entries = []
    for variant in requested:
        errors = [r["error"] for r in records if r["pipeline"] == variant.name and r["status"] == "failed"]
        status = "skipped" if variant.name in skipped else "failed" if errors else "measured"
        entries.append(
            {
                **variant.describe(),
                "status": status,
                "reason": skipped.get(variant.name) or (errors[0] if errors else None),
            }
        )
    return entries


def measure_mask_stages(workloads: list[Workload], repeat: int) -> list[dict[str, Any]]:
    """The mask stage on each synthetic workload's ground-truth masks (realistic extents), timed in this process."""
    entries = []
    for workload in workloads:
        entry = mask_stage.measure(workload, max(repeat, MASK_STAGE_MIN_REPEAT))
        if entry is not None:
            samples = entry.pop("samples_ms")
            entries.append({**entry, "rasterise_ms": _stats(samples)})
    return entries


def _method_stages(records: list[dict[str, Any]]) -> list[str]:
    """Stages a method times beyond PerSense's (PerSense++'s exemplar_selection), in the order first timed."""
    timed = [name for r in records if r["stages_ms"] for name in r["stages_ms"]]
    return [name for name in dict.fromkeys(timed) if name not in (*STAGES, DETECTOR_STAGE, "total")]


def _document(
    args: argparse.Namespace,
    argv: list[str],
    settings: Settings,
    workloads: list[Workload],
    pipelines: list[dict[str, Any]],
    records: list[dict[str, Any]],
    mask_stages: list[dict[str, Any]],
) -> dict[str, Any]:
    """The bench.json document (schema in benchmarks/README.md)."""
    manifest = load_manifest(settings.engines)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["persense-bench", *argv]),
        "settings": settings.describe("files" if args.image else "synthetic"),
        "environment": report.environment(),
        "engines": {
            "folder": str(settings.engines),
            "model_type": manifest.model_type,
            "manifest_digest": manifest.digest(),
        },
        "memory_method": MEMORY_METHOD,
        "pipelines": pipelines,
        "stages": [
            *STAGES,
            *_method_stages(records),
            *([DETECTOR_STAGE] if DETECTOR in manifest.artefacts else []),
            "total",
        ],
        "workloads": [w.describe() for w in workloads],
        "runs": records,
        "mask_stage": mask_stages,
    }


def prepare_variants(settings: Settings) -> tuple[list[Variant], dict[str, str]]:
    """Export the engines; the pipelines asked for, and why those that cannot run here are skipped."""
    requested = [ORACLES[settings.oracle_device], *(RUNTIME_VARIANTS[name] for name in settings.variants)]
    skipped = {v.name: reason for v in requested if (reason := platform_reason(v)) is not None}
    flags = sorted({v.export_flag for v in requested if v.export_flag is not None and v.name not in skipped})
    note(
        f"engines: persense-export SAM {settings.model_type} (seed {settings.seed}{', ' if flags else ''}"
        f"{' '.join(flags)}) into {settings.engines}, reusing unchanged artefacts",
        settings.quiet,
    )
    export_errors = export_engines(
        settings.model_type, settings.seed, settings.engines, flags, settings.detector, settings.method
    )
    skipped.update(
        {
            v.name: reason
            for v in requested[1:]
            if v.name not in skipped and (reason := engines_reason(v, settings.engines, export_errors)) is not None
        }
    )
    for name, reason in skipped.items():
        note(f"{name} skipped: {reason}", settings.quiet)
    return requested, skipped


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    """Prepare inputs and engines, measure every pipeline, write the reports."""
    check_onnxruntime()
    settings = resolve_settings(args)
    workloads = make_workloads(args, settings)
    requested, skipped = prepare_variants(settings)
    variants = [v for v in requested if v.name not in skipped]
    progress = Progress(
        len(workloads) * len(variants) * (settings.warmup + settings.repeat) * len(QUERIES), settings.quiet
    )
    records = [r for w in workloads for r in measure_workload(settings, w, variants, progress)]
    progress.close()
    mask_stages = measure_mask_stages(workloads, settings.repeat)
    doc = _document(args, argv, settings, workloads, _pipelines(requested, skipped, records), records, mask_stages)
    return _write_reports(settings.out, doc)


def _write_reports(out: Path, doc: dict[str, Any]) -> int:
    """bench.json, bench.md and bench.png, and their paths on stdout; 1 if a pipeline failed, else 0."""
    report.write_json(out / "bench.json", doc)
    report.write_markdown(out / "bench.md", doc)
    plotted = report.write_plot(out / "bench.png", doc)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {out / 'bench.png'}" if plotted else ""))
    failed = [p for p in doc["pipelines"] if p["status"] == "failed"]
    for pipeline in failed:
        print(f"persense-bench: {pipeline['name']} failed: {pipeline['reason']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of persense-bench."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_command("persense-bench", lambda parsed: _bench(parsed, argv), args)


if __name__ == "__main__":
    sys.exit(main())
