"""persense-bench --quick on the tiny SAM: the JSON schema, every stage of cold and warm queries timed in both
pipelines, speed-ups from the same run, the reports.

No test here asserts a speed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from persense.benchmarks.bench import MASK_STAGE_MIN_REPEAT, SCHEMA, main
from persense.benchmarks.mask_stage import logits_from_labels
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.pipeline.masks import rasterise
from persense.runtime.pipeline.timing import STAGES

README = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"
TOP_KEYS = {
    "schema",
    "created",
    "command",
    "settings",
    "environment",
    "engines",
    "memory_method",
    "stages",
    "pipelines",
    "workloads",
    "runs",
    "mask_stage",
}
RUN_KEYS = {
    "workload",
    "instances",
    "ground_truth_count",
    "pipeline",
    "backend",
    "precision",
    "status",
    "error",
    "repetitions",
    "stages_ms",
    "decoder_launches",
    "decoder_prompts",
    "points",
    "count_estimate",
    "peak_rss_mb",
    "load_s",
    "torch_in_process",
    "union_iou_vs_oracle",
    "speedup_vs_oracle",
    "warm_stages_ms",
    "warm_speedup_vs_oracle",
    "warm_union_equals_cold",
    "warnings",
}
MASK_STAGE_KEYS = {
    "workload",
    "instances",
    "extent",
    "label",
    "masks",
    "mean_mask_area",
    "union_iou_vs_ground_truth",
    "rasterise_ms",
}
QUICK_REPEAT = 3
VARIANTS = ("ort-cpu-fp32", "ort-cuda-fp32", "ort-cuda-fp16", "trt-fp16")  # the GPU ones skip here, unconverted


@pytest.fixture(scope="module")
def out(tiny_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one `persense-bench --quick` run (engine cache seeded with the session's tiny export)."""
    folder = tmp_path_factory.mktemp("bench")
    shutil.copytree(tiny_engines, folder / "engines")
    # one thread: two spinning OpenMP/ORT threads on 2 shared cores can make a query ten times slower
    assert (
        main(
            [
                "--quick",
                "--instances",
                "10",
                "--variants",
                ",".join(VARIANTS),
                "--threads",
                "1",
                "--out",
                str(folder),
                "--engines-cache",
                str(folder / "engines"),
                "-q",
            ]
        )
        == 0
    )
    return folder


@pytest.fixture(scope="module")
def doc(out: Path) -> dict[str, Any]:
    """The JSON report."""
    return json.loads((out / "bench.json").read_text())


def _runs(doc: dict[str, Any], status: str = "measured") -> dict[str, dict[str, Any]]:
    """Run records by pipeline name."""
    return {r["pipeline"]: r for r in doc["runs"] if r["status"] == status}


def test_json_follows_the_schema(doc: dict[str, Any]) -> None:
    assert set(doc) == TOP_KEYS and doc["schema"] == SCHEMA
    assert doc["settings"]["model_type"] == "tiny" and doc["settings"]["repeat"] == QUICK_REPEAT
    assert doc["stages"] == [*STAGES, "total"]
    assert {"cpu", "gpus", "versions", "onnxruntime_providers"} <= set(doc["environment"])
    assert [w["instances"] for w in doc["workloads"]] == [10] and doc["workloads"][0]["ground_truth_count"] >= 1
    names = [p["name"] for p in doc["pipelines"]]
    assert names == ["oracle", *VARIANTS]
    for pipeline in doc["pipelines"]:
        assert pipeline["status"] in ("measured", "skipped", "failed")
        assert (pipeline["reason"] is None) == (pipeline["status"] == "measured")
    assert all(set(run) == RUN_KEYS for run in doc["runs"])


def test_every_stage_is_timed_in_both_pipelines(doc: dict[str, Any]) -> None:
    runs = _runs(doc)
    assert {"oracle", "ort-cpu-fp32"} <= set(runs)
    for name in ("oracle", "ort-cpu-fp32"):
        for key in ("stages_ms", "warm_stages_ms"):
            stages = runs[name][key]
            assert list(stages) == doc["stages"], (name, key)
            for stage, stats in stages.items():
                if key == "warm_stages_ms" and stage == "reference_encoding":
                    assert stats is None  # warm: the reference was encoded before the query
                    continue
                assert stats is not None and len(stats["samples"]) == QUICK_REPEAT, (name, key, stage)
                assert 0 < stats["min"] <= stats["p50"] <= stats["p90"] <= stats["max"], (name, key, stage)
            parts = [stats["samples"] for stage, stats in stages.items() if stage != "total" and stats is not None]
            np.testing.assert_allclose(np.sum(parts, axis=0), stages["total"]["samples"], atol=0.01)


def test_cold_and_warm_speedups_come_from_the_same_run(doc: dict[str, Any]) -> None:
    runs = _runs(doc)
    oracle, runtime = runs["oracle"], runs["ort-cpu-fp32"]
    for stages, speedup in (("stages_ms", "speedup_vs_oracle"), ("warm_stages_ms", "warm_speedup_vs_oracle")):
        expected = oracle[stages]["total"]["p50"] / runtime[stages]["total"]["p50"]
        assert runtime[speedup] == pytest.approx(expected, abs=1e-3) and oracle[speedup] is None
    assert all(run["warm_union_equals_cold"] for run in runs.values())  # a warm query segments the same


def test_runtime_agrees_with_the_oracle_and_never_loads_torch(doc: dict[str, Any]) -> None:
    runs = _runs(doc)
    oracle, runtime = runs["oracle"], runs["ort-cpu-fp32"]
    assert runtime["union_iou_vs_oracle"] >= 0.99 and runtime["speedup_vs_oracle"] > 0
    assert runtime["points"] == oracle["points"]
    assert runtime["decoder_prompts"] == oracle["decoder_prompts"] - 1  # the unused box call is skipped
    assert oracle["torch_in_process"] and not any(r["torch_in_process"] for n, r in runs.items() if n != "oracle")
    assert all(r["peak_rss_mb"] > 0 for r in runs.values())


def test_markdown_and_png_are_written(out: Path, doc: dict[str, Any]) -> None:
    text = (out / "bench.md").read_text()
    for label in (
        "reference encoding",
        "exemplar cascade",
        "merge/output",
        "decoder launches",
        "peak RSS",
        "## Total latency, cold query",
        "## Total latency, warm query",
        "ort-cpu-fp32 cold",
        "ort-cpu-fp32 warm",
        "oracle warm",
        "speed-up vs oracle",
    ):
        assert label in text
    speedup = _runs(doc)["ort-cpu-fp32"]["warm_speedup_vs_oracle"]
    assert f"(x{speedup:.2f})" in text.split("## Total latency, warm query", 1)[1].split("##", 1)[0]
    for pipeline in doc["pipelines"]:
        assert pipeline["name"] in text
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cuda_variants_are_skipped_here_with_the_reason(doc: dict[str, Any]) -> None:
    if "CUDAExecutionProvider" in doc["environment"]["onnxruntime_providers"]:
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    pipelines = {p["name"]: p for p in doc["pipelines"]}
    for name in ("ort-cuda-fp32", "ort-cuda-fp16"):
        assert pipelines[name]["status"] == "skipped" and "no CUDAExecutionProvider" in pipelines[name]["reason"]
    assert not any(r["pipeline"].startswith("ort-cuda") for r in doc["runs"])


def test_mask_stage_on_ground_truth_extents_is_reported_and_labelled(out: Path, doc: dict[str, Any]) -> None:
    (entry,) = doc["mask_stage"]
    workload = doc["workloads"][0]
    assert set(entry) == MASK_STAGE_KEYS and entry["extent"] == "ground_truth" and "ground-truth" in entry["label"]
    assert entry["workload"] == workload["name"] and entry["masks"] == workload["ground_truth_count"]
    assert 0 < entry["mean_mask_area"] < 0.05  # object-sized, unlike random-weight masks
    assert entry["union_iou_vs_ground_truth"] >= 0.95
    stats = entry["rasterise_ms"]
    assert len(stats["samples"]) == MASK_STAGE_MIN_REPEAT and 0 < stats["min"] <= stats["p50"] <= stats["max"]
    text = (out / "bench.md").read_text()
    assert "## Mask stage on realistic extents" in text and "ort-cpu-fp32, random weights" in text


def test_ground_truth_logits_rasterise_to_the_ground_truth_boxes() -> None:
    labels = np.zeros((480, 640), np.uint16)
    labels[100:140, 200:260] = 1
    labels[120:200, 240:300] = 2  # drawn later: overlaps instance 1
    labels[400:410, 10:30] = 3
    transform = SamTransform(labels.shape)
    instances = rasterise(logits_from_labels(labels, transform), transform, with_labels=True)
    expected = np.array([[200, 100, 259, 139], [240, 120, 299, 199], [10, 400, 29, 409]])
    assert instances.valid.all() and np.abs(instances.boxes - expected).max() <= 2
    agree = (instances.labels == labels).mean()
    assert agree > 0.998 and (instances.labels[150:190, 250:290] == 2).all()


def test_a_cuda_oracle_without_a_gpu_is_skipped_and_the_runtime_still_measured(
    tiny_engines: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_engines, tmp_path / "engines")
    assert (
        main(
            [
                "--quick",
                "--instances",
                "10",
                "--variants",
                "ort-cpu-fp32",
                "--oracle-device",
                "cuda",
                "--repeat",
                "1",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
                "--engines-cache",
                str(tmp_path / "engines"),
                "-q",
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "bench.json").read_text())
    oracle, runtime = doc["pipelines"]
    if oracle["status"] == "measured":
        pytest.skip("torch sees a CUDA GPU on this machine")
    assert oracle["backend"] == "torch-cuda" and oracle["status"] == "skipped"
    assert oracle["reason"].endswith("sees no CUDA GPU here")
    assert doc["settings"]["oracle_device"] == "cuda" and runtime["status"] == "measured"
    (run,) = doc["runs"]
    assert run["pipeline"] == "ort-cpu-fp32" and run["union_iou_vs_oracle"] is None


def test_readme_documents_every_json_key(doc: dict[str, Any]) -> None:
    documented = set(re.findall(r"`([a-z_0-9]+)`", README.read_text()))
    assert TOP_KEYS | RUN_KEYS | MASK_STAGE_KEYS <= documented


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--instances", "0"], "--instances"),
        (["--variants", "ort-cpu-int4"], "unknown variant"),
        (["--image", "crowd.jpg"], "--image, --ref and --ref-mask"),
        (["--repeat", "0"], "--repeat"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--quick", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
