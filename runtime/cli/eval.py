"""`persense-eval`: mIoU of predicted masks against a PerSense-D style dataset, as eval_miou.py.

With `--run` it first segments every image without a prediction (resumable) and then scores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from persense.runtime.backends.table import PRECISIONS
from persense.runtime.cli.common import add_cache_flags, add_common_flags, add_engine_flags, run_command
from persense.runtime.datasets.evaluate import EvalResult, miou
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import write_json

if TYPE_CHECKING:
    from persense.runtime.datasets.batch import BatchReport

PROG = "persense-eval"


def _parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="dataset folder holding Images/<class>/NN.{jpg,png}")
    parser.add_argument("--pred", type=Path, required=True, help="prediction folder holding <class>/NN.png")
    parser.add_argument("--json", type=Path, help="write the report as JSON to this file")
    parser.add_argument(
        "--ref-idx",
        default="00",
        help="reference marker: ground truth whose path contains it is skipped, as in eval_miou.py (default: 00)",
    )
    run = parser.add_argument_group("running the pipeline first (--run)")
    run.add_argument("--run", action="store_true", help="segment images without a prediction, then score")
    add_engine_flags(run, "--density-dir")
    run.add_argument(
        "--density-dir",
        type=Path,
        help="per-image .npy density maps as <dir>/<class>/<NN>_density.npy (e.g. persense-synth's meta/)",
    )
    run.add_argument("--threads", type=int, help="CPU threads per engine (default: all cores; with --ray 1)")
    run.add_argument("--precision", choices=PRECISIONS, default="fp32", help="ONNX models to run (bf16: openvino)")
    add_cache_flags(run)
    run.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="distribute --run over Ray (pip install 'persense[ray]'): alone, a private local Ray "
        "instance; with an address (e.g. ray://head:10001 or auto), an existing cluster (docs/RAY.md)",
    )
    run.add_argument(
        "--ray-workers", type=int, default=2, metavar="N", help="Ray actors, each with its own engines (default 2)"
    )
    add_common_flags(parser)
    return parser


def format_table(result: EvalResult) -> str:
    """A per-class table (images, IoU in percent) ending with the mean."""
    width = max([5] + [len(name) for name in result.classes])
    lines = [f"{'class':<{width}}  {'images':>6}  {'IoU':>6}"]
    lines += [f"{name:<{width}}  {r.images:>6}  {r.iou:>6.2f}" for name, r in result.classes.items()]
    lines.append(f"{'mIoU':<{width}}  {'':>6}  {result.miou:>6.2f}")
    return "\n".join(lines)


def evaluate(data_dir: Path, pred_dir: Path, ref_idx: str = "00", json_out: Path | None = None) -> EvalResult:
    """Score `pred_dir` against `data_dir`, print the table and warnings, and write the JSON report."""
    result = miou(data_dir, pred_dir, ref_idx=ref_idx)
    for message in result.warnings:
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    print(format_table(result))
    if json_out is not None:
        write_json(json_out, result.to_json())
    return result


def run_pipeline(args: argparse.Namespace) -> BatchReport:
    """Segment the dataset into `args.pred` with the engines in `args.engines`, in-process or over Ray."""
    from persense.runtime.datasets.batch import PipelineSpec, run_dataset

    density_dir = args.density_dir
    if args.counter == "npy" and density_dir is None:
        raise PersenseError("--counter npy needs --density-dir")
    if args.ray_workers < 1:
        raise PersenseError("--ray-workers must be at least 1")
    density_for = (lambda name, stem: density_dir / name / f"{stem}_density.npy") if density_dir else None
    counter_name = "sam" if args.counter in ("auto", "npy") else args.counter
    spec = PipelineSpec(
        args.engines,
        args.backend,
        counter_name,
        args.threads,
        args.precision,
        args.cache_dir,
        not args.no_cache,
        args.method,
    )
    if args.ray:
        from persense.runtime.datasets.ray_batch import run_dataset_ray

        report = run_dataset_ray(
            args.data,
            args.pred,
            spec,
            args.ray,
            args.ray_workers,
            args.ref_idx,
            density_for,
            progress=not args.quiet,
            log_level=logging.getLogger("persense").level,
        )
    else:
        report = run_dataset(args.data, args.pred, spec.open(), args.ref_idx, density_for, progress=not args.quiet)
    for path, message in report.failed.items():
        print(f"{PROG}: error: {message if message.startswith(path) else f'{path}: {message}'}", file=sys.stderr)
    retry = " (no prediction written: the next --run tries them again)" if report.failed else ""
    print(
        f"segmented {report.segmented} image(s), {report.skipped} already done, {len(report.failed)} failed{retry}",
        file=sys.stderr,
    )
    return report


def _main(args: argparse.Namespace) -> int:
    """Optionally run the pipeline, then score; 1 when some images could not be segmented."""
    failed = run_pipeline(args).failed if args.run else {}
    evaluate(args.data, args.pred, ref_idx=args.ref_idx, json_out=args.json)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 1 when --run left images unsegmented (listed) or on a crash, 2 on a user error."""
    return run_command(PROG, _main, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
