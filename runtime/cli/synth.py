"""`persense-synth`: write a deterministic synthetic dense-scene dataset in the PerSense-D layout."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from persense.runtime.cli.common import add_common_flags, run_command
from persense.runtime.datasets.synth import generate_dataset

PROG = "persense-synth"
DEFAULT_CLASSES = 3
DEFAULT_IMAGES = 4
DEFAULT_INSTANCES = (20, 60)  # a dense scene, as PerSense-D's ~39 objects per image


def _instances(text: str) -> tuple[int, int]:
    """Parse "A..B" (or "A") into an inclusive instance-count range."""
    match = re.fullmatch(r"(\d+)(?:\.\.(\d+))?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected A..B such as 20..60, got {text!r}")
    low = int(match.group(1))
    return low, int(match.group(2) or low)


def _size(text: str) -> tuple[int, int]:
    """Parse "WxH" into (width, height)."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected WxH such as 768x576, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets Images/ and meta/)")
    parser.add_argument(
        "--classes", type=int, default=DEFAULT_CLASSES, help=f"number of object classes (default {DEFAULT_CLASSES})"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=DEFAULT_IMAGES,
        help=f"test images per class (1..99), besides 00 (default {DEFAULT_IMAGES})",
    )
    parser.add_argument(
        "--instances",
        type=_instances,
        default=DEFAULT_INSTANCES,
        help="instances per image, A..B (default {}..{})".format(*DEFAULT_INSTANCES),
    )
    parser.add_argument("--size", type=_size, default=(768, 576), help="image size WxH (default 768x576)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    add_common_flags(parser)
    return parser


def _synth(args: argparse.Namespace) -> int:
    """Generate the dataset and say what was written."""
    written = generate_dataset(args.out, args.classes, args.images, args.instances, args.size, args.seed)
    print(f"wrote {args.classes} classes x {args.images + 1} images ({len(written)} files) to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on a user error (one line on stderr) or bad arguments, 1 on a crash."""
    return run_command(PROG, _synth, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
