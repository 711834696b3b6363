"""`persense-eval`: mIoU of predicted masks against a PerSense-D style dataset, as eval_miou.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persense.runtime.errors import PersenseError
from persense.runtime.evaluate import EvalResult, miou
from persense.runtime.imageio import write_json

PROG = "persense-eval"


def _parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="dataset folder holding Images/<class>/NN.png")
    parser.add_argument("--pred", type=Path, required=True, help="prediction folder holding <class>/NN.png")
    parser.add_argument("--json", type=Path, help="write the report as JSON to this file")
    parser.add_argument("--ref-idx", default="00", help="reference marker: ground truth whose path contains "
                        "it is skipped, as in eval_miou.py (default: 00)")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 1 on a user error (one line on stderr), 2 on bad arguments."""
    args = _parser().parse_args(argv)
    try:
        evaluate(args.data, args.pred, ref_idx=args.ref_idx, json_out=args.json)
    except (PersenseError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
