"""persense-infer: segment every instance of the reference object in one or more target images."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from persense.runtime.api import PerSense, Reference
from persense.runtime.backends.table import PRECISIONS
from persense.runtime.cli.common import add_cache_flags, add_common_flags, add_engine_flags, run_command
from persense.runtime.cli.overlay import overlay
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import read_raw, read_rgb, write_image, write_json
from persense.runtime.pipeline.exemplars import parse_box
from persense.runtime.pipeline.reference_prompt import parse_numbers
from persense.runtime.pipeline.result import SegmentResult

log = logging.getLogger("persense.infer")

REFERENCE_MASK = "reference_mask.png"  # in --out: the mask SAM made from --ref-box/--ref-point
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="persense-infer",
        description=__doc__,
        usage="persense-infer IMAGE [IMAGE|DIR ...] (REF REF_MASK | REF --ref-box x0,y0,x1,y1 | REF --ref-point x,y "
        "[--ref-point x,y ...] | --reference FILE.npz) [options]",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="IMAGE... REF REF_MASK",
        help="target image(s) or folder(s), then the reference image and its 0/255 mask "
        "(without them with --reference; targets may be left out with --save-reference)",
    )
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out/)")
    parser.add_argument(
        "--ref-box",
        metavar="x0,y0,x1,y1",
        help="the reference object as a box in REF instead of REF_MASK: SAM segments it (its mask is written to "
        "OUT/reference_mask.png)",
    )
    parser.add_argument(
        "--ref-point",
        action="append",
        metavar="x,y",
        help="a click on (or, with --ref-label 0, off) the reference object in REF, instead of REF_MASK; repeatable",
    )
    parser.add_argument(
        "--ref-label",
        action="append",
        type=int,
        metavar="1|0",
        help="the label of each --ref-point, in order: 1 on the object (default), 0 off it",
    )
    add_engine_flags(parser, "--density")
    parser.add_argument("--density", type=Path, help=".npy density map to use as the counter's output")
    first = parser.add_mutually_exclusive_group()
    first.add_argument(
        "--box",
        metavar="x0,y0,x1,y1",
        help="the first exemplar as a box in the target image (as a detector gives it): the "
        "cascade starts from its centre instead of the best-matching point",
    )
    first.add_argument(
        "--text",
        metavar="WORD",
        help="the object's name: the exported Grounding DINO's most confident box for it is the first "
        "exemplar, as in the original (needs `persense-export --detector ...`; the best-matching "
        "point, with a warning, when it finds nothing)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="FILE.npz",
        help="a reference saved with --save-reference, instead of REF REF_MASK",
    )
    parser.add_argument(
        "--save-reference",
        type=Path,
        metavar="FILE.npz",
        help="save the encoded reference for later runs with --reference (same engines)",
    )
    add_cache_flags(parser)
    parser.add_argument("--threads", type=int, help="CPU threads per engine (default: all cores)")
    parser.add_argument("--decode-chunk", type=int, help="prompts per decoder launch (default: per backend)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="ONNX models to run (fp16/int8 need `persense-export --fp16/--int8`; int8: INT8 encoder, decoder "
        "with INT8 upscaling; TensorRT engines are fp16; openvino: fp32, bf16 or int8 (`--openvino-int8`))",
    )
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
            raise PersenseError(
                f"{seen[folder]} and {path} would both write to {folder}; "
                f"rename one of them or segment them in separate runs"
            )
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


def _write_outputs(folder: Path, image: np.ndarray | None, result: SegmentResult, summary: dict) -> None:
    """mask.png, instances.png, overlay.jpg when the image is given, then result.json last (it marks a finished image).

    The previous result.json goes first, so a run killed half-way never leaves a result.json beside
    images of another run; a stale overlay.jpg is removed when this run writes none.
    """
    (folder / "result.json").unlink(missing_ok=True)
    write_image(folder / "mask.png", result.union)
    write_image(folder / "instances.png", result.labels)
    if image is not None:
        write_image(folder / "overlay.jpg", overlay(image, result.labels, result.points))
    else:
        (folder / "overlay.jpg").unlink(missing_ok=True)
    write_json(folder / "result.json", summary)


def _split_paths(args: argparse.Namespace) -> tuple[list[Path], tuple[Path, Path | None] | None]:
    """(target paths, (REF, REF_MASK), (REF, None) with a reference prompt, or None with --reference), refusing a
    count that fits neither form."""
    prompted = _prompted(args)
    if args.reference is not None:
        if prompted:
            raise PersenseError("--ref-box and --ref-point encode a reference from REF; --reference names a saved one")
        if args.save_reference is not None:
            raise PersenseError(
                "--save-reference saves a reference encoded from REF REF_MASK; --reference already names a saved one"
            )
        return list(args.paths), None
    if prompted:
        if len(args.paths) < (1 if args.save_reference is not None else 2):
            raise PersenseError("expected at least two paths with --ref-box or --ref-point: IMAGE REF")
        *targets, ref_path = args.paths
        _refuse_mask_as_reference(ref_path)
        return targets, (ref_path, None)
    least = 2 if args.save_reference is not None else 3
    if len(args.paths) < least:
        raise PersenseError("expected at least three paths: IMAGE REF REF_MASK (or IMAGE --reference FILE.npz)")
    *targets, ref_path, mask_path = args.paths
    return targets, (ref_path, mask_path)


def _refuse_mask_as_reference(path: Path) -> None:
    """With a prompt the last path is REF; a binary single-channel image there is a REF_MASK given as well."""
    if path.is_file():
        image = read_raw(path)
        if image.ndim == 2 and np.unique(image).size <= 2:
            raise PersenseError(
                f"{path} is a mask: --ref-box and --ref-point replace REF_MASK; give IMAGE... REF with them"
            )


def _prompted(args: argparse.Namespace) -> bool:
    """Whether the reference object is given as a prompt (--ref-box, --ref-point, --ref-label)."""
    return any(value is not None for value in (args.ref_box, args.ref_point, args.ref_label))


def _prompt(args: argparse.Namespace) -> dict:
    """The reference prompt flags as PerSense.reference's keywords (checked against REF there)."""
    if args.ref_label is not None and args.ref_point is None:
        raise PersenseError("--ref-label labels --ref-point clicks; give a --ref-point for each label")
    box = parse_numbers(args.ref_box, 4, "--ref-box") if args.ref_box is not None else None
    points = [parse_numbers(text, 2, "--ref-point") for text in args.ref_point] if args.ref_point else None
    return {"box": box, "points": points, "labels": args.ref_label}


def _infer(args: argparse.Namespace) -> int:
    """Validate the inputs, open the engines once, encode (or load) the reference once, try every target."""
    _check_count(args.threads, "--threads")
    _check_count(args.decode_chunk, "--decode-chunk")
    box = parse_box(args.box) if args.box is not None else None
    target_paths, pair = _split_paths(args)
    prompt = _prompt(args) if pair is not None and pair[1] is None else {}
    targets = _targets(target_paths) if target_paths else []
    folders = _output_folders(targets, args.out)
    saved = Reference.load(args.reference) if args.reference is not None else None
    if targets:
        _check_writable(args.out)
    ps = PerSense.open(
        args.engines,
        args.backend,
        args.precision,
        args.counter,
        args.threads,
        args.decode_chunk,
        args.density,
        args.cache_dir,
        not args.no_cache,
        args.method,
    )
    if args.text is not None:
        ps.text_tokens(args.text)  # refuse a prompt or a missing detector before any encoding
    reference = ps.reference(*pair, **prompt) if saved is None else saved
    ps.check_reference(reference)
    if reference.mask is not None and targets:
        write_image(args.out / REFERENCE_MASK, reference.mask.astype(np.uint8) * np.uint8(255))
    if args.save_reference is not None:
        reference.save(args.save_reference)
        print(f"reference saved to {args.save_reference}")
    failed: dict[Path, str] = {}
    for index, (path, folder) in enumerate(zip(targets, folders, strict=True)):
        try:
            result = ps.segment(path, reference, box, text=args.text)
        except PersenseError as exc:
            if len(targets) == 1:
                raise
            failed[path] = message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
            print(f"persense-infer: error: {message}", file=sys.stderr)
            continue
        summary = _summary(args, ps, reference, path, box, result)
        _write_outputs(folder, read_rgb(path) if args.overlay else None, result, summary)
        log.info(
            "[%d/%d] %s: %d instances in %.0f ms",
            index + 1,
            len(targets),
            path.name,
            len(result.points),
            sum(result.timings_ms.values()),
        )
        print(json.dumps(summary) if args.json else f"{path}: {len(result.points)} instances -> {folder}")
    return _report(len(targets), failed, args.json)


def _summary(
    args: argparse.Namespace,
    ps: PerSense,
    reference: Reference,
    path: Path,
    box: np.ndarray | None,
    result: SegmentResult,
) -> dict:
    """The content of result.json for one target."""
    if args.reference is not None:
        source = {"reference_file": str(args.reference)}
    elif _prompted(args):
        source = {"reference": str(args.paths[-1]), "reference_prompt": _prompt(args)}
    else:
        source = {"reference": str(args.paths[-2]), "reference_mask": str(args.paths[-1])}
    return {
        "image": str(path),
        **source,
        "box": None if box is None else box.tolist(),
        "text": args.text,
        "backend": ps.backend,
        "precision": ps.precision,
        "model_type": ps.manifest.model_type,
        "counter": ps.counter_name,
        "manifest": ps.manifest.digest(),
        "reference_encoding_ms": round(reference.encoding_ms, 3),
        "reference_source": reference.source,
        "reference_key": reference.key,
        **result.summary(),
    }


def _report(total: int, failed: dict[Path, str], quiet_stdout: bool) -> int:
    """The summary line of a run over several targets; exit code 1 when any of them failed."""
    if total > 1 and failed:
        names = ", ".join(str(path) for path in failed)
        print(
            f"persense-infer: {total - len(failed)} of {total} targets segmented; {len(failed)} failed: {names}",
            file=sys.stderr,
        )
        return 1
    if total > 1 and not quiet_stdout:
        print(f"{total} of {total} targets segmented")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of persense-infer."""
    args = build_parser().parse_args(argv)
    return run_command("persense-infer", _infer, args)


if __name__ == "__main__":
    sys.exit(main())
