"""persense-bench outputs: the machine's description, and the JSON, Markdown and PNG reports of one run."""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from persense.benchmarks.variants import ORACLE_NAME
from persense.runtime.imageio import atomic_write_bytes
from persense.runtime.manifest import installed_versions

log = logging.getLogger(__name__)

STAGE_LABELS = {
    "reference_encoding": "reference encoding",
    "image_encoding": "image encoding",
    "location_prior": "location prior",
    "exemplar_cascade": "exemplar cascade",
    "counter": "counter",
    "idm": "IDM",
    "ppsm": "PPSM",
    "feedback": "feedback",
    "final_decoding": "final decoding",
    "merge": "merge/output",
    "exemplar_selection": "exemplar selection (PerSense++)",
    "total": "total",
}
METHOD_LABELS = {"persense": "PerSense", "persense++": "PerSense++"}
QUERY_KEYS = {"cold": ("stages_ms", "speedup_vs_oracle"), "warm": ("warm_stages_ms", "warm_speedup_vs_oracle")}
PACKAGES = (
    "persense",
    "torch",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "tensorrt",
    "numpy",
    "opencv-python-headless",
    "opencv-python",
    "matplotlib",
)


# ------------------------------------------------------------------------------------------ environment


def _cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """NVIDIA GPU names from nvidia-smi (empty without it)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def _versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    return {"python": platform.python_version(), **installed_versions(PACKAGES)}


def environment() -> dict[str, Any]:
    """CPU, GPU, memory, ONNX Runtime providers and package versions of this machine."""
    import onnxruntime as ort

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(memory / 2**30, 1),
        "gpus": gpu_names(),
        "onnxruntime_providers": ort.get_available_providers(),
        "versions": _versions(),
    }


# ---------------------------------------------------------------------------------------------- writers


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """The report as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def _ms(value: float | None) -> str:
    """Milliseconds with sensible precision ('-' when absent)."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _stats_cell(stats: dict[str, Any]) -> str:
    """'p50 / p90' of one statistics object."""
    return f"{_ms(stats['p50'])} / {_ms(stats['p90'])}"


def _cell(run: dict[str, Any] | None, stage: str, query: str = "cold") -> str:
    """'p50 / p90' of one stage of one run's cold or warm queries."""
    key = QUERY_KEYS[query][0]
    if run is None or run.get(key) is None or run[key].get(stage) is None:
        return "-"
    return _stats_cell(run[key][stage])


def _row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def table(header: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """A Markdown table; with `numeric`, all columns but the first are right-aligned."""
    rule = ["---"] + ["---:" if numeric else "---"] * (len(header) - 1)
    return [_row(header), _row(rule), *(_row(r) for r in rows), ""]


def _measured(doc: dict[str, Any]) -> list[str]:
    """Names of the pipelines with at least one measured run, in report order."""
    names = {r["pipeline"] for r in doc["runs"] if r["status"] == "measured"}
    return [p["name"] for p in doc["pipelines"] if p["name"] in names]


def _run(doc: dict[str, Any], workload: str, pipeline: str) -> dict[str, Any] | None:
    """The run record of one pipeline on one workload."""
    return next((r for r in doc["runs"] if r["workload"] == workload and r["pipeline"] == pipeline), None)


def weights_label(settings: dict[str, Any]) -> str:
    """'random weights (seed N)' or 'the shipped trained weights'."""
    if settings.get("weights") == "bundled":
        return "the shipped trained weights"
    return f"random weights (seed {settings['seed']})"


def _header_lines(doc: dict[str, Any]) -> list[str]:
    """Title and the one-paragraph description of machine and settings."""
    s, env = doc["settings"], doc["environment"]
    versions = env["versions"]
    ort = versions.get("onnxruntime-gpu", versions.get("onnxruntime", "?"))
    gpu = ", ".join(env["gpus"]) or "no GPU"
    return [
        f"# persense-bench: {METHOD_LABELS[s.get('method', 'persense')]}, SAM {s['model_type']}, {weights_label(s)}",
        "",
        f"{env['cpu']} ({env['cpu_cores_usable']} usable cores), {gpu}; python {versions['python']}, "
        f"torch {versions.get('torch', '-')}, onnxruntime {ort}, tensorrt {versions.get('tensorrt', '-')}.  ",
        f"threads: {s['threads']}; rounds (a cold and a warm query each) per pipeline and workload: "
        f"{s['warmup']} warm-up, {s['repeat']} timed, pipelines alternating; counter `{s['counter']}`; "
        f"inputs {s['inputs']}. Times in ms, p50 / p90. "
        "A cold query = reference encoding + segmentation of one image; a warm query = the segmentation "
        "with the reference encoded beforehand (what every further image with the same reference costs).",
        "",
    ]


def _scaling_lines(doc: dict[str, Any], pipelines: list[str], query: str) -> list[str]:
    """Total latency of the cold or warm query per workload and pipeline, with the speed-up over the oracle."""
    rows = []
    for workload in doc["workloads"]:
        cells = [workload["name"] if workload["instances"] is None else str(workload["instances"])]
        for name in pipelines:
            run = _run(doc, workload["name"], name)
            speedup = run and run.get(QUERY_KEYS[query][1])
            cells.append(_cell(run, "total", query) + (f" (x{speedup:.2f})" if speedup else ""))
        rows.append(cells)
    return [
        f"## Total latency, {query} query (speed-up over the oracle at p50)",
        "",
        *table(["instances", *pipelines], rows),
    ]


def _stage_lines(doc: dict[str, Any], pipelines: list[str], workload: dict[str, Any]) -> list[str]:
    """Per-stage table of one workload, a cold and a warm column per pipeline, then speed-ups, decoder work,
    memory and agreement with the oracle."""
    columns = [(_run(doc, workload["name"], name), query) for name in pipelines for query in QUERY_KEYS]
    rows = [
        [STAGE_LABELS.get(stage, stage), *(_cell(run, stage, query) for run, query in columns)]
        for stage in doc["stages"]
    ]
    rows[-1] = [f"**{c}**" if c != "-" else c for c in rows[-1]]

    def field(label: str, key: str | None, fmt: str = "{}") -> list[str]:
        """A table row of one per-run value (key None: the column's speed-up over the oracle)."""
        keys = [key or QUERY_KEYS[query][1] for _, query in columns]
        return [
            label,
            *(
                "-" if run is None or run.get(k) is None else fmt.format(run[k])
                for (run, _), k in zip(columns, keys, strict=True)
            ),
        ]

    rows += [
        field("speed-up vs oracle (total p50)", None, "x{:.2f}"),
        field("decoder launches", "decoder_launches"),
        field("decoder prompts", "decoder_prompts"),
        field("instances found", "points"),
        field("peak RSS (MB)", "peak_rss_mb", "{:,.0f}"),
        field("union IoU vs oracle", "union_iou_vs_oracle", "{:.4f}"),
    ]
    title = (
        workload["name"]
        if workload["instances"] is None
        else (f"{workload['instances']} instances ({workload['ground_truth_count']} visible)")
    )
    return [
        f"## Per stage: {title}",
        "",
        *table(["stage", *(f"{name} {query}" for name in pipelines for query in QUERY_KEYS)], rows),
    ]


def _mask_stage_lines(doc: dict[str, Any]) -> list[str]:
    """The merge stage on ground-truth mask extents next to the pipelines' merge stage on the benchmarked weights."""
    entries, s = doc.get("mask_stage") or [], doc["settings"]
    if not entries:
        return []
    runtimes = [p["name"] for p in doc["pipelines"] if p["kind"] == "runtime" and p["name"] in _measured(doc)]
    rows = []
    for entry in entries:
        cells = [
            str(entry["instances"]),
            str(entry["masks"]),
            f"{100 * entry['mean_mask_area']:.2f} %",
            f"{entry['union_iou_vs_ground_truth']:.4f}",
            _stats_cell(entry["rasterise_ms"]),
        ]
        for name in runtimes:
            run = _run(doc, entry["workload"], name)
            cells.append(
                "-" if run is None or run["stages_ms"] is None else f"{_cell(run, 'merge')} ({run['points']} masks)"
            )
        rows.append(cells)
    return [
        "## Mask stage on realistic extents",
        "",
        f"`merge.rasterise` with the label map, as the runtime's merge/output stage runs it, on "
        f"{entries[0]['label']}, timed in the benchmark's own process; next to it the merge/output stage of "
        "each runtime pipeline, whose masks come from the benchmarked weights (random weights: masks that cover "
        "most of the image, the stage's worst case).",
        "",
        *table(
            [
                "instances",
                "masks",
                "mean mask area",
                "union IoU vs ground truth",
                "ground-truth extents",
                *(f"{name}, {weights_label(s)}" for name in runtimes),
            ],
            rows,
        ),
    ]


def markdown(doc: dict[str, Any]) -> str:
    """The human-readable report: settings, pipelines (with skip reasons), scaling and per-stage tables."""
    pipelines = _measured(doc)
    lines = _header_lines(doc)
    lines += [
        "## Pipelines",
        "",
        *table(
            ["pipeline", "backend", "precision", "status"],
            [
                [p["name"], p["backend"], p["precision"], p["status"] + (f": {p['reason']}" if p["reason"] else "")]
                for p in doc["pipelines"]
            ],
            numeric=False,
        ),
    ]
    if pipelines:
        for query in QUERY_KEYS:
            lines += _scaling_lines(doc, pipelines, query)
        for workload in doc["workloads"]:
            lines += _stage_lines(doc, pipelines, workload)
    lines += _mask_stage_lines(doc)
    warnings = sorted({f"{r['pipeline']} on {r['workload']}: {w}" for r in doc["runs"] for w in r["warnings"]})
    if warnings:
        lines += ["## Pipeline warnings", "", *(f"- {w}" for w in warnings), ""]
    lines += [f"Peak memory: {doc['memory_method']}", ""]
    return "\n".join(lines)


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    """The Markdown report, written atomically."""
    atomic_write_bytes(path, markdown(doc).encode())


# ------------------------------------------------------------------------------------------------- plot


def _x_value(workload: dict[str, Any], run: dict[str, Any]) -> float:
    """Where a run sits on the scaling curve: instances asked for, else the instances it found."""
    return workload["instances"] if workload["instances"] is not None else run["points"]


def _stacked_bars(axis: Any, doc: dict[str, Any], pipelines: list[str], colours: list[Any]) -> None:
    """Per workload, one bar per pipeline stacking its per-stage p50 (seconds)."""
    stages = doc["stages"][:-1]  # without the total
    width = 0.8 / len(pipelines)
    for i, workload in enumerate(doc["workloads"]):
        for j, name in enumerate(pipelines):
            run = _run(doc, workload["name"], name)
            if run is None or run["stages_ms"] is None:
                continue
            x, bottom = i + (j - (len(pipelines) - 1) / 2) * width, 0.0
            for k, stage in enumerate(stages):
                value = (run["stages_ms"][stage] or {"p50": 0.0})["p50"] / 1000.0  # null: stage not timed
                axis.bar(
                    x,
                    value,
                    width * 0.92,
                    bottom=bottom,
                    color=colours[k % len(colours)],
                    label=STAGE_LABELS.get(stage, stage) if i == 0 and j == 0 else None,
                )
                bottom += value
            axis.annotate(
                name,
                (x, bottom),
                xytext=(0, 3),
                textcoords="offset points",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=8,
            )
    axis.set_xticks(
        range(len(doc["workloads"])),
        [w["name"] if w["instances"] is None else f"{w['instances']} instances" for w in doc["workloads"]],
    )
    axis.set_ylabel("p50 latency of one query (s)")
    axis.set_title("Where the time goes (cold query, stacked per-stage p50)")
    axis.margins(y=0.2)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), fontsize=8, ncol=5, frameon=False)


def _scaling_curve(axis: Any, doc: dict[str, Any], pipelines: list[str]) -> None:
    """Total p50 (marker) to p90 (bar) against instances, one line per pipeline and query (warm: open markers)."""
    ticks: set[float] = set()
    for name in pipelines:
        for query, (key, _) in QUERY_KEYS.items():
            points = sorted(
                (_x_value(w, run), run[key]["total"])
                for w in doc["workloads"]
                if (run := _run(doc, w["name"], name)) is not None and run.get(key) is not None
            )
            xs = [x for x, _ in points]
            p50 = [t["p50"] / 1000.0 for _, t in points]
            above = [(t["p90"] - t["p50"]) / 1000.0 for _, t in points]
            axis.errorbar(
                xs,
                p50,
                yerr=[[0.0] * len(xs), above],
                marker="o",
                capsize=3,
                mfc="none" if query == "warm" else None,
                linestyle="--" if name == ORACLE_NAME else "-",
                label=f"{name} {query}",
            )
            ticks.update(xs)
    axis.set_xticks(sorted(ticks))
    axis.set_xlabel("instances in the image")
    axis.set_ylabel("total latency of one query (s): p50, bar up to p90")
    axis.set_title("Scaling with the number of instances")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)


def write_plot(path: Path, doc: dict[str, Any]) -> bool:
    """Stacked per-stage bars and the scaling curve in one PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no plot: pip install 'persense[bench]'")
        return False
    pipelines = _measured(doc)
    if not pipelines:
        return False
    figure, (bars, curve) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    _stacked_bars(bars, doc, pipelines, list(plt.get_cmap("tab10").colors))
    _scaling_curve(curve, doc, pipelines)
    s, env = doc["settings"], doc["environment"]
    machine = ", ".join([env["cpu"], *env["gpus"]])
    figure.suptitle(
        f"persense-bench: SAM {s['model_type']} ({weights_label(s)}), {machine}; "
        f"timed queries per pipeline: {s['repeat']}"
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return True
