"""What every persense command shares: logging flags and turning errors into one line on stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from persense.runtime.api import METHODS
from persense.runtime.backends.table import AUTO, BACKENDS
from persense.runtime.counters.choice import COUNTERS
from persense.runtime.errors import PersenseError


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """-v/-q for the log level, --debug for tracebacks."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def add_engine_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, density_flag: str) -> None:
    """--engines, --backend, --counter and --method: which engines run, on which backend, with which density
    counter, for which method."""
    parser.add_argument("--engines", type=Path, default=Path("engines"), help="engines folder (default engines/)")
    parser.add_argument("--backend", choices=BACKENDS, default=AUTO, help="execution backend (default auto)")
    parser.add_argument(
        "--counter",
        choices=COUNTERS,
        default="auto",
        help=f"density counter (auto: {density_flag} if given, else the SAM-only counter)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=METHODS[0],
        help="persense (the default) or persense++: hybrid IDM, PPSM as box gating, diversity-aware exemplars "
        "and IMRM (needs `persense-export --method persense++`; docs/ALGORITHM.md says when to use which)",
    )


def add_cache_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--cache-dir and --no-cache: where encoded references are cached across runs, or not at all."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="reference cache folder (default $PERSENSE_CACHE_DIR, else "
        "$XDG_CACHE_HOME/persense, else ~/.cache/persense)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="encode the reference even if it is cached, and cache nothing"
    )


def configure_logging(args: argparse.Namespace) -> None:
    """Log persense to stderr at the level the flags ask for (warnings by default); others at warnings."""
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("persense").setLevel(level)


def run_command(prog: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command body; user errors and crashes become one stderr line and a non-zero exit code."""
    configure_logging(args)
    try:
        return body(args)
    except PersenseError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output folder that is not writable, a full disk
        print(f"{prog}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into a clear line
        if args.debug:
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr
        )
        return 1
