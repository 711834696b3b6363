"""One command for a GPU machine: export vit_b and vit_h, check ORT-CUDA against ORT-CPU, time the GPU paths.

`python -m persense.benchmarks.gpu_check [--models vit_b,vit_h] [--budget-s 540] [--out benchmarks/results]`
(usually through scripts/gpu_check.sh). Where ONNX Runtime lists its CUDA provider and nvidia-smi names a
GPU, for each model in turn (vit_b first), each part a child process:
1. export, export_fp16: `persense-export --random-weights --seed 0 [--gpu-encoder]`, then again with `--fp16`
   (FP32, then FP16 ONNX models; sam_encoder_gpu where this exporter has it, and without it when that fails);
2. parity: `gpu_parity` (ORT-CUDA against ORT-CPU FP32 within its stated tolerances, latency of every
   encoder artefact on CUDA);
3. bench: `persense-bench` at 1024x768 (vit_b: 50 and 200 instances, vit_h: 50) with ort-cuda-fp32,
   ort-cuda-fp16 and the PyTorch oracle on CUDA;
4. torch: `persense.benchmarks.torch_cuda` (torch eager encoder FP32/FP16, batched vs sequential decoder).
A part starts only when the time left holds its minimum (PART_MIN_S) and is killed at the deadline; what
was skipped or failed, and why, is in the report, which is always written: gpu_check_<gpu>.json and .md in
--out, next to bench_<gpu>_<model>.json/.md. Without a GPU or the CUDA provider: one line, exit 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from persense.benchmarks import gpu_report, report
from persense.benchmarks.workload import synthetic_workloads
from persense.runtime.backends.ort_check import check_onnxruntime
from persense.runtime.errors import PersenseError

PLAN = {"vit_b": (50, 200), "vit_h": (50,)}  # instance counts of the pipeline benchmark per model
SIZE = (1024, 768)
SEED = 0
PART_MIN_S = {
    "export": {"vit_b": 45, "vit_h": 150},
    "export_fp16": {"vit_b": 20, "vit_h": 60},
    "parity": 30,
    "bench": 60,
    "torch": 30,
}
REPORT_RESERVE_S = 10  # kept back from every part's deadline for writing the report
BENCH_ARGS = [
    "--variants",
    "ort-cuda-fp32,ort-cuda-fp16",
    "--oracle-device",
    "cuda",
    "--warmup",
    "1",
    "--repeat",
    "3",
]
PARITY_ARGS: list[str] = []  # gpu_parity's defaults: the device under test is CUDA
TORCH_ARGS = ["--prompts", "150", "--repeat", "10"]


class Budget:
    """The wall-clock deadline of the whole check."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        """Seconds a part may still use (the report's reserve kept back)."""
        return self.seconds - REPORT_RESERVE_S - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.monotonic() - self.start


def gpu_absent_reason() -> str | None:
    """Why this machine cannot run the check (no CUDA provider, no NVIDIA GPU), or None."""
    check_onnxruntime()
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return (
            f"onnxruntime {ort.__version__} lists no CUDAExecutionProvider ({', '.join(providers)}); "
            "install persense[gpu] (onnxruntime-gpu)"
        )
    if not report.gpu_names():
        return "nvidia-smi names no NVIDIA GPU"
    return None


def run_part(command: list[str], timeout: float, log: Path, stdout: Path | None = None) -> dict[str, Any]:
    """Run one part as a child process group, killed at `timeout`; its status, seconds and last error line."""
    start = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        offset = sink.tell()
        out = stdout.open("w") if stdout else sink
        process = subprocess.Popen(command, stdout=out, stderr=sink, start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the part's own workers too (persense-bench spawns them)
            process.wait()
            code = None
        finally:
            if out is not sink:
                out.close()
    seconds = round(time.monotonic() - start, 1)
    if code is None:
        return {"status": "timeout", "seconds": seconds, "error": f"stopped at the deadline after {seconds:.0f} s"}
    if code == 0:
        return {"status": "ok", "seconds": seconds, "error": None}
    lines = [line for line in log.read_bytes()[offset:].decode(errors="replace").splitlines() if line.strip()]
    return {"status": "failed", "seconds": seconds, "error": lines[-1] if lines else f"exit code {code}"}


def _module(name: str, *args: str) -> list[str]:
    """`python -m persense.<name> args`."""
    return [sys.executable, "-m", f"persense.{name}", *args]


def _gpu_encoder_flags() -> list[str]:
    """`--gpu-encoder` when this persense-export can write sam_encoder_gpu (found without importing torch here)."""
    return ["--gpu-encoder"] if importlib.util.find_spec("persense.export.sam.gpu_encoder") is not None else []


def check_model(model: str, budget: Budget, work: Path, out: Path, slug: str) -> dict[str, Any]:
    """Export, parity, bench and torch parts of one model, each only while time is left; their results."""
    engines, log = work / f"engines-{model}", work / f"{model}.log"
    parts: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {
        "model": model,
        "instances": list(PLAN[model]),
        "parts": parts,
        "parity": None,
        "bench": None,
        "torch": None,
    }
    image = synthetic_workloads(work / "workloads", (PLAN[model][0],), SIZE, SEED)[0].image
    bench_out = work / f"bench-{model}"
    outputs = {
        "parity": work / f"parity-{model}.json",
        "bench": bench_out / "bench.json",
        "torch": work / f"torch-{model}.json",
    }
    for stale in outputs.values():  # an earlier run's results must not pass for this run's
        stale.unlink(missing_ok=True)
    export = _module(
        "export.cli", "--model", model, "--random-weights", "--seed", str(SEED), "--out", str(engines), "-q"
    )
    commands = {  # FP32 first, so that a failed FP16 conversion leaves the FP32 parts something to measure
        "export": ([*export, *_gpu_encoder_flags()], None),
        "export_fp16": ([*export, "--fp16", *_gpu_encoder_flags()], None),
        "parity": (
            _module("benchmarks.gpu_parity", str(engines), str(image), str(outputs["parity"]), *PARITY_ARGS),
            None,
        ),
        "bench": (
            _module(
                "benchmarks.bench",
                "--model",
                model,
                "--instances",
                ",".join(map(str, PLAN[model])),
                "--size",
                "x".join(map(str, SIZE)),
                "--seed",
                str(SEED),
                *BENCH_ARGS,
                "--out",
                str(bench_out),
                "--engines-cache",
                str(engines),
                "-q",
            ),
            None,
        ),
        "torch": (_module("benchmarks.torch_cuda", "--model", model, *TORCH_ARGS), outputs["torch"]),
    }
    for name, (command, stdout) in commands.items():
        needed = PART_MIN_S[name][model] if isinstance(PART_MIN_S[name], dict) else PART_MIN_S[name]
        if name != "export" and parts["export"]["status"] != "ok":
            parts[name] = {"status": "skipped", "seconds": 0.0, "error": "no engines: the export was skipped or failed"}
        elif budget.left() < needed:
            parts[name] = {
                "status": "skipped",
                "seconds": 0.0,
                "error": f"out of time: {max(budget.left(), 0):.0f} s left, the part needs {needed} s",
            }
        else:
            parts[name] = run_part(command, budget.left(), log, stdout)
            if name == "export" and parts[name]["status"] == "failed" and _gpu_encoder_flags():
                parts[name] = _export_without_gpu_encoder(command, parts[name], budget, log)
                commands["export_fp16"] = ([*export, "--fp16"], None)
    result.update({name: _read_json(path) for name, path in outputs.items()})
    for suffix in ("json", "md"):
        if (bench_out / f"bench.{suffix}").is_file():
            shutil.copyfile(bench_out / f"bench.{suffix}", out / f"bench_{slug}_{model}.{suffix}")
    return result


def _export_without_gpu_encoder(
    command: list[str], failed: dict[str, Any], budget: Budget, log: Path
) -> dict[str, Any]:
    """Export again without --gpu-encoder after a failure with it, so that the other parts still run."""
    retry = run_part([c for c in command if c != "--gpu-encoder"], budget.left(), log)
    note = f"with --gpu-encoder: {failed['error']}; again without it"
    return {
        **retry,
        "seconds": round(failed["seconds"] + retry["seconds"], 1),
        "error": note if retry["error"] is None else f"{note}: {retry['error']}",
    }


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a part that did not finish)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(models: list[str], budget: Budget, work: Path, out: Path, argv: list[str]) -> dict[str, Any]:
    """Every model's parts within the budget; the report document."""
    gpu = report.gpu_names()[0]
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = [check_model(model, budget, work, out, gpu_report.slug(gpu)) for model in models]
    return {
        "schema": gpu_report.SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m persense.benchmarks.gpu_check", *argv]),
        "gpu": gpu,
        "environment": report.environment(),
        "budget_s": budget.seconds,
        "elapsed_s": round(budget.elapsed(), 1),
        "models": results,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line and exit 0 without a GPU; else the check and its report paths."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m persense.benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default=",".join(PLAN), help="models in order (default %(default)s)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="report folder")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("bench-results/gpu-check"),
        help="engines, workloads and logs (default %(default)s)",
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    try:
        unknown = [m for m in models if m not in PLAN]
        if unknown:
            raise PersenseError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(PLAN)}")
        reason = gpu_absent_reason()
        if reason is not None:
            print(f"gpu_check: no GPU to check here ({reason}); nothing measured")
            return 0
        doc = run(models, Budget(args.budget_s), args.work, args.out, argv)
    except PersenseError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    paths = gpu_report.write(doc, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
