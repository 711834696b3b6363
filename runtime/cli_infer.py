"""persense-infer: segment every instance of the reference object in one or more target images."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from persense.runtime.cli_common import add_common_flags, run_command
from persense.runtime.counter_choice import COUNTERS, make_counter
from persense.runtime.engine import BACKENDS, resolve_backend
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import read_mask, read_rgb, write_image, write_json
from persense.runtime.manifest import load_manifest
from persense.runtime.overlay import overlay
from persense.runtime.pipeline import PerSensePipeline
from persense.runtime.sam import SamEngines

log = logging.getLogger("persense.infer")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="persense-infer", description=__doc__,
        usage="persense-infer IMAGE [IMAGE|DIR ...] REF REF_MASK [options]")
    parser.add_argument("paths", nargs="+", type=Path, metavar="IMAGE... REF REF_MASK",
                        help="target image(s) or folder(s), then the reference image and its 0/255 mask")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out/)")
    parser.add_argument("--engines", type=Path, default=Path("engines"), help="engines folder (default engines/)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="execution backend (default auto)")
    parser.add_argument("--counter", choices=COUNTERS, default="auto",
                        help="density counter (auto: --density if given, else the SAM-only counter)")
    parser.add_argument("--density", type=Path, help=".npy density map to use as the counter's output")
    parser.add_argument("--threads", type=int, help="CPU threads per engine (default: all cores)")
    parser.add_argument("--decode-chunk", type=int, help="prompts per decoder launch (default: per backend)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                        help="ONNX models to run (fp16/int8 need `persense-export --fp16/--int8`; TensorRT engines are fp16)")
    parser.add_argument("--overlay", action="store_true", help="also write overlay.jpg")
    parser.add_argument("--json", action="store_true", help="print each result.json to stdout")
    add_common_flags(parser)
    return parser


def _targets(paths: list[Path]) -> list[Path]:
    """Expand folders into their image files (sorted); refuse anything that is not there."""
    targets = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PersenseError(f"{path}: folder contains no images")
            targets.extend(found)
        elif path.exists():
            targets.append(path)
        else:
            raise PersenseError(f"{path}: no such file or folder")
    return targets


def _output_folders(targets: list[Path], out: Path) -> list[Path]:
    """`out` for one target, else `out/<stem>` per target; refuses two targets that would share a folder."""
    if len(targets) == 1:
        return [out]
    seen: dict[Path, Path] = {}
    for path in targets:
        folder = out / path.stem
        if folder in seen:
            raise PersenseError(f"{seen[folder]} and {path} would both write to {folder}; "
                                f"rename one of them or segment them in separate runs")
        seen[folder] = path
    return list(seen)


def _check_writable(folder: Path) -> None:
    """Create the output folder and prove that files can be written in it, before any work is done."""
    if folder.exists() and not folder.is_dir():
        raise PersenseError(f"{folder}: output folder is a file; pass --out a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PersenseError(f"{folder}: cannot write to the output folder ({exc.strerror or exc})") from exc


def _check_count(value: int | None, flag: str) -> None:
    """Refuse a count option below 1."""
    if value is not None and value < 1:
        raise PersenseError(f"{flag} must be at least 1, got {value}")


def _write_outputs(folder: Path, image: np.ndarray, result, summary: dict, with_overlay: bool) -> None:
    """mask.png, instances.png, optional overlay.jpg, then result.json last (it marks a finished image).

    The previous result.json goes first, so a run killed half-way never leaves a result.json beside
    images of another run; a stale overlay.jpg is removed when this run writes none.
    """
    (folder / "result.json").unlink(missing_ok=True)
    write_image(folder / "mask.png", result.union)
    write_image(folder / "instances.png", result.labels)
    if with_overlay:
        write_image(folder / "overlay.jpg", overlay(image, result.labels, result.points))
    else:
        (folder / "overlay.jpg").unlink(missing_ok=True)
    write_json(folder / "result.json", summary)


def _infer(args: argparse.Namespace) -> int:
    """Validate every input, load engines once, encode the reference once, segment each target."""
    if len(args.paths) < 3:
        raise PersenseError("expected at least three paths: IMAGE REF REF_MASK")
    _check_count(args.threads, "--threads")
    _check_count(args.decode_chunk, "--decode-chunk")
    *target_paths, ref_path, mask_path = args.paths
    targets = _targets(target_paths)
    folders = _output_folders(targets, args.out)
    input_warnings: list[str] = []
    ref_image = read_rgb(ref_path, input_warnings)
    ref_mask = read_mask(mask_path, ref_image.shape[:2], input_warnings)
    _check_writable(args.out)
    manifest = load_manifest(args.engines)
    backend = resolve_backend(args.backend, manifest)
    sam = SamEngines.from_manifest(manifest, backend, args.threads, args.decode_chunk, args.precision)
    pipeline = PerSensePipeline(sam, make_counter(args.counter, manifest, backend, args.threads, args.density))
    start = time.perf_counter()
    target = pipeline.reference(ref_image, ref_mask)
    reference_ms = (time.perf_counter() - start) * 1000
    for index, (path, folder) in enumerate(zip(targets, folders, strict=True)):
        warnings = list(input_warnings)
        image = read_rgb(path, warnings)
        result = pipeline.segment(image, target)
        summary = {"image": str(path), "reference": str(ref_path), "reference_mask": str(mask_path),
                   "backend": backend, "precision": "fp16" if backend == "trt" else args.precision,
                   "model_type": manifest.model_type, "counter": pipeline.counter.name,
                   "manifest": manifest.digest(), "reference_encoding_ms": round(reference_ms, 3),
                   **result.summary()}
        summary["warnings"] = warnings + summary["warnings"]
        _write_outputs(folder, image, result, summary, args.overlay)
        log.info("[%d/%d] %s: %d instances in %.0f ms", index + 1, len(targets), path.name, len(result.points),
                 result.timings_ms and sum(result.timings_ms.values()))
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"{path}: {len(result.points)} instances -> {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of persense-infer."""
    args = build_parser().parse_args(argv)
    return run_command("persense-infer", _infer, args)


if __name__ == "__main__":
    sys.exit(main())
