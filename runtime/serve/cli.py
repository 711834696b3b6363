"""persense-serve: the REST API and web page of PerSense on one engines folder (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from persense.runtime.backends.table import BACKENDS, PRECISIONS
from persense.runtime.cli.common import add_common_flags, run_command
from persense.runtime.counters.choice import COUNTERS
from persense.runtime.datasets.ray_batch import LOCAL
from persense.runtime.errors import PersenseError

if TYPE_CHECKING:
    from persense.runtime.serve.app import Limits

DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator chooses otherwise
DEFAULT_PORT = 8000


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="persense-serve", description=__doc__)
    parser.add_argument("--engines", type=Path, default=Path("engines"), help="engines folder (default engines/)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="execution backend (default auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="default precision (default fp32)")
    parser.add_argument("--counter", choices=COUNTERS, default="auto", help="density counter (default auto)")
    parser.add_argument("--threads", type=int, help="CPU threads per engine (default: all cores)")
    parser.add_argument(
        "--cache-dir", type=Path, help="reference cache: where reference ids are kept (default: persense-infer's)"
    )
    parser.add_argument("--max-upload-mb", type=float, default=32, help="largest request body in MiB (default 32)")
    parser.add_argument("--max-side", type=int, default=8192, help="longest image side in pixels (default 8192)")
    parser.add_argument("--workers", type=int, default=8, help="requests run at once (thread pool, default 8)")
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="serve through Ray Serve: --replicas copies of the app on a Ray cluster (ADDRESS: auto, HEAD:6379; "
        "alone: a private local Ray instance); see docs/RAY.md",
    )
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas with --ray (default 2)")
    add_common_flags(parser)
    return parser


def _serve(args: argparse.Namespace) -> int:
    """Open the engines once, then serve until interrupted."""
    try:
        import uvicorn

        from persense.runtime.serve.app import Limits, create_app
    except ImportError as exc:
        raise PersenseError(f"persense-serve needs its extra: pip install 'persense[serve]' ({exc})") from exc
    from persense.runtime.serve.engines import EngineOptions, EngineSet

    for value, flag in (
        (args.max_upload_mb, "--max-upload-mb"),
        (args.max_side, "--max-side"),
        (args.workers, "--workers"),
        (args.replicas, "--replicas"),
    ):
        if value <= 0:
            raise PersenseError(f"{flag} must be positive, got {value}")
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_side, args.workers)
    if args.ray is not None:
        return _serve_on_ray(args, limits)
    engines = EngineSet(
        EngineOptions(args.engines, args.backend, args.precision, args.counter, args.threads, args.cache_dir)
    )
    app = create_app(engines, limits)
    level = "warning" if args.quiet else "info"
    uvicorn.run(app, host=args.host, port=args.port, log_level=level, timeout_graceful_shutdown=5)
    return 0


def _serve_on_ray(args: argparse.Namespace, limits: Limits) -> int:
    """Deploy on Ray Serve and keep the driver alive until interrupted (then shut Serve down)."""
    from persense.runtime.serve.engines import EngineOptions
    from persense.runtime.serve.ray_app import run

    # absolute paths: the replicas may run elsewhere (the engines and the cache on a shared filesystem)
    cache_dir = args.cache_dir.resolve() if args.cache_dir else None
    threads = args.threads or 1  # CPUs each replica reserves and uses per engine
    options = EngineOptions(args.engines.resolve(), args.backend, args.precision, args.counter, threads, cache_dir)
    serve = run(options, limits, args.replicas, args.ray, args.host, args.port)
    print(f"persense-serve: {args.replicas} replicas on Ray Serve at http://{args.host}:{args.port}/", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Entry point of persense-serve."""
    return run_command("persense-serve", _serve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
