"""The GPU check's CPU-checkable parts: the no-GPU line, the part runner, the orchestration on CPU, the report.

No GPU is faked: the orchestration test points the parts at the CPU (tiny SAM, ORT-CPU, torch on the CPU)
to prove the command lines, the files they write and the report built from them; the report test feeds
the writer a hand-made timing document.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from persense.benchmarks import gpu_check, gpu_parity, gpu_report
from persense.benchmarks.workload import synthetic_workloads
from persense.runtime.imageio import read_rgb
from persense.runtime.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def _has_cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_has_cuda_provider(), reason="ONNX Runtime has its CUDA provider here")
def test_without_a_gpu_the_script_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpu_check: no GPU to check here (") and done.stdout.count("\n") == 1
    assert "CUDAExecutionProvider" in done.stdout and not (tmp_path / "out").exists()


def test_unknown_model_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--models", "vit_b,vit_x"]) == 2
    assert capsys.readouterr().err == "gpu_check: error: --models: unknown vit_x; choose from vit_b, vit_h\n"


def test_run_part_reports_success_failure_and_kills_the_whole_group_at_the_deadline(tmp_path: Path) -> None:
    log = tmp_path / "part.log"
    ok = gpu_check.run_part([sys.executable, "-c", "print('{\"a\": 1}')"], 30, log, tmp_path / "out.json")
    assert ok["status"] == "ok" and json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
    failed = gpu_check.run_part([sys.executable, "-c", "import sys; sys.exit('export: no space left')"], 30, log)
    assert failed == {"status": "failed", "seconds": failed["seconds"], "error": "export: no space left"}
    pid_file = tmp_path / "grandchild.pid"
    spawner = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
        f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    stopped = gpu_check.run_part([sys.executable, "-c", spawner], 3, log)
    assert stopped["status"] == "timeout" and stopped["seconds"] < 30
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):  # SIGKILL is delivered at once, the exit can take a moment
        if not stat.exists() or stat.read_text().split(") ")[1][0] == "Z":  # gone, or a zombie nobody reaped
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's grandchild {pid_file.read_text()} outlived the deadline")
    assert log.read_text().count("$ ") == 3


def test_parts_are_skipped_with_the_reason_when_no_time_is_left(tmp_path: Path) -> None:
    budget = gpu_check.Budget(gpu_check.REPORT_RESERVE_S + 20)  # less than vit_h's export needs
    result = gpu_check.check_model("vit_h", budget, tmp_path / "work", tmp_path, "gpu")
    assert result["parts"]["export"]["status"] == "skipped" and "out of time" in result["parts"]["export"]["error"]
    assert all(p["status"] == "skipped" and "export" in p["error"] for n, p in result["parts"].items() if n != "export")
    assert result["parity"] is None and result["bench"] is None and result["torch"] is None


def test_parity_code_on_the_cpu_agrees_exactly(
    tiny_engines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_parity, "WARMUP", 1)
    monkeypatch.setattr(gpu_parity, "REPEAT", 2)
    image = read_rgb(synthetic_workloads(tmp_path, (10,), (320, 240), 0)[0].image)
    result = gpu_parity.check(load_manifest(tiny_engines), image, threads=1, device="cpu")
    (encoder,) = result["encoders"]
    assert encoder["artefact"] == "sam_encoder" and encoder["cosine"] > 0.999999 and encoder["max_abs"] < 1e-5
    assert encoder["passed"] and encoder["error"] is None
    assert 0 < encoder["latency_ms"]["min"] <= encoder["latency_ms"]["p50"]
    (decoder,) = result["decoders"]  # the session's engines have no FP16 models
    assert decoder["precision"] == "fp32" and decoder["prompts"] == gpu_parity.PROMPT_GRID**2
    assert decoder["mean_iou"] == decoder["min_iou"] == 1.0 and result["passed"]


def test_embedding_and_mask_tolerances() -> None:
    import numpy as np

    reference = np.random.default_rng(0).normal(size=(1, 256, 64, 64)).astype(np.float32)
    close = gpu_parity.embedding_agreement(reference + 1e-3, reference, "fp32")
    assert close["passed"] and close["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert not gpu_parity.embedding_agreement(reference + 0.5, reference, "fp16")["passed"]
    masks = np.ones((4, 8, 8), np.float32)
    flipped = masks.copy()
    flipped[0] = -1.0
    assert gpu_parity.mask_agreement(masks, masks)["mean_iou"] == 1.0
    assert gpu_parity.mask_agreement(flipped, masks) == {
        "prompts": 4,
        "mean_iou": 0.75,
        "min_iou": 0.0,
        "passed": False,
    }


@pytest.mark.slow  # about 90 s of CPU: FP16 and GPU-encoder exports, a bench run, torch_cuda on the CPU
def test_the_parts_run_end_to_end_when_pointed_at_the_cpu(
    tiny_engines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_check, "PLAN", {"tiny": (10,)})
    monkeypatch.setattr(gpu_check, "SIZE", (320, 240))
    monkeypatch.setitem(gpu_check.PART_MIN_S, "export", {"tiny": 1})
    monkeypatch.setitem(gpu_check.PART_MIN_S, "export_fp16", {"tiny": 1})
    monkeypatch.setattr(
        gpu_check,
        "BENCH_ARGS",
        ["--variants", "ort-cpu-fp32,ort-cpu-fp16", "--warmup", "0", "--repeat", "1", "--threads", "1"],
    )
    monkeypatch.setattr(gpu_check, "PARITY_ARGS", ["--device", "cpu"])
    monkeypatch.setattr(gpu_check, "TORCH_ARGS", ["--device", "cpu", "--prompts", "2", "--repeat", "1"])
    shutil.copytree(tiny_engines, tmp_path / "work" / "engines-tiny")
    result = gpu_check.check_model("tiny", gpu_check.Budget(900), tmp_path / "work", tmp_path, "cpu")
    assert list(result["parts"]) == ["export", "export_fp16", "parity", "bench", "torch"]
    assert all(part["status"] == "ok" for part in result["parts"].values()), result["parts"]
    names = [e["artefact"] for e in result["parity"]["encoders"]]
    assert names[:2] == ["sam_encoder", "sam_encoder_fp16"] and result["parity"]["decoders"][1]["precision"] == "fp16"
    assert {r["pipeline"] for r in result["bench"]["runs"]} == {"oracle", "ort-cpu-fp32", "ort-cpu-fp16"}
    assert result["torch"]["model_type"] == "tiny" and result["torch"]["prompts"] == 2
    assert (tmp_path / "bench_cpu_tiny.json").is_file() and (tmp_path / "bench_cpu_tiny.md").is_file()


def _run(backend: str, instances: int, totals: dict[str, float], pipeline: str) -> dict[str, Any]:
    """A measured bench run with the given stage p50s."""
    return {
        "pipeline": pipeline,
        "backend": backend,
        "instances": instances,
        "status": "measured",
        "stages_ms": {k: {"p50": v, "p90": v * 1.1} for k, v in totals.items()},
        "speedup_vs_oracle": None,
        "union_iou_vs_oracle": 0.99,
    }


def _stages(scale: float) -> dict[str, float]:
    """Stage p50s of a query, all multiplied by `scale`."""
    stages = {"image_encoding": 20.0, "exemplar_cascade": 4.0, "feedback": 30.0, "final_decoding": 6.0, "merge": 8.0}
    return {**{k: v * scale for k, v in stages.items()}, "total": sum(stages.values()) * scale}


def _faked_document() -> dict[str, Any]:
    """A report document as gpu_check.run builds it, with hand-made timings for vit_b; vit_h out of time."""
    encoders = [
        {
            "artefact": name,
            "precision": "fp16" if name.endswith("fp16") else "fp32",
            "max_abs": 0.01,
            "reference_max_abs": 4.7,
            "cosine": 0.99999,
            "passed": True,
            "latency_ms": {"p50": ms, "p90": ms},
            "error": None,
        }
        for name, ms in (
            ("sam_encoder", 22.0),
            ("sam_encoder_fp16", 21.0),
            ("sam_encoder_gpu", 12.0),
            ("sam_encoder_gpu_fp16", 6.0),
        )
    ]
    encoders[1] = {
        "artefact": "sam_encoder_fp16",
        "precision": "fp16",
        "passed": False,
        "error": "Fail: CUDA out of memory",
    }
    bench = {
        "settings": {"repeat": 3},
        "pipelines": [
            {"name": "oracle", "status": "measured", "reason": None},
            {"name": "ort-cuda-fp16", "status": "failed", "reason": "worker process died"},
        ],
        "runs": [
            _run("torch-cuda", 200, _stages(10.0), "oracle"),
            _run("ort-cuda", 200, _stages(1.0), "ort-cuda-fp32"),
            _run("ort-cuda", 200, _stages(2.0), "ort-cuda-fp16"),
            _run("ort-cuda", 50, _stages(0.5), "ort-cuda-fp32"),
        ],
        "mask_stage": [{"instances": 200, "masks": 187, "rasterise_ms": {"p50": 12.5}}],
    }
    vit_b = {
        "model": "vit_b",
        "instances": [50, 200],
        "bench": bench,
        "torch": None,
        "parts": {"export": {"status": "ok", "seconds": 50.0, "error": None}},
        "parity": {
            "reference": "ORT CPU",
            "tolerances": gpu_parity.TOLERANCES,
            "encoders": encoders,
            "decoders": [
                {
                    "precision": "fp32",
                    "encoder": "sam_encoder_gpu",
                    "decoder": "sam_decoder",
                    "prompts": 64,
                    "mean_iou": 0.995,
                    "min_iou": 0.9,
                    "passed": True,
                    "error": None,
                }
            ],
        },
    }
    vit_h = {
        "model": "vit_h",
        "instances": [50],
        "parity": None,
        "bench": None,
        "torch": None,
        "parts": {"export": {"status": "skipped", "seconds": 0.0, "error": "out of time: 90 s left"}},
    }
    environment = {
        "cpu": "Intel Xeon",
        "cpu_cores_usable": 16,
        "onnxruntime_providers": ["CUDAExecutionProvider"],
        "versions": {"onnxruntime-gpu": "1.31.1", "torch": "2.11.0"},
    }
    return {
        "schema": gpu_report.SCHEMA,
        "gpu": "NVIDIA H200",
        "environment": environment,
        "budget_s": 540,
        "elapsed_s": 530.2,
        "command": "gpu_check",
        "models": [vit_b, vit_h],
    }


def test_report_targets_and_files_from_a_faked_timing_document(tmp_path: Path) -> None:
    paths = gpu_report.write(_faked_document(), tmp_path)
    assert [p.name for p in paths] == ["gpu_check_nvidia_h200.json", "gpu_check_nvidia_h200.md"]
    targets = {t["target"]: t for t in json.loads(paths[0].read_text())["targets"]}
    assert targets["vit_b query, 200 instances, ORT-CUDA (ms)"] == {
        "target": "vit_b query, 200 instances, ORT-CUDA (ms)",
        "goal": "<= 250",
        "value": 68.0,
        "met": True,
    }
    assert targets["vit_b encoder FP16 speed-up over FP32 (x)"]["value"] == 2.0  # the GPU encoders: 12 / 6 ms
    assert targets["vit_b decoder stages, 200 instances: torch-CUDA oracle / ORT-CUDA (x)"]["value"] == 10.0
    assert targets["vit_b decoder stages, 200 instances: torch-CUDA oracle / ORT-CUDA (x)"]["met"] is False
    assert targets["mask stage, 200-instance scene, ground-truth extents (ms)"]["met"] is False
    assert targets["vit_h encoder FP16, ORT-CUDA (ms)"] == {
        "target": "vit_h encoder FP16, ORT-CUDA (ms)",
        "goal": "<= 45",
        "value": None,
        "met": None,
    }
    text = paths[1].read_text()
    assert text.startswith("# GPU check: NVIDIA H200\n")
    assert "| vit_b query, 200 instances, ORT-CUDA (ms) | <= 250 | 68.00 | yes |" in text
    assert "| vit_h encoder FP16, ORT-CUDA (ms) | <= 45 | - | not measured |" in text
    assert "export skipped (0 s): out of time: 90 s left" in text
    assert "ort-cuda-fp16: failed (worker process died)" in text
    assert "| sam_encoder_gpu_fp16 | fp16 | 6.0 | 6.0 |" in text
    assert "| sam_encoder_fp16 | fp16 | failed: Fail: CUDA out of memory |" in text
