"""Exactly one ONNX Runtime build must own the `onnxruntime` module: checked once, before the runtime imports it.

`onnxruntime`, `onnxruntime-gpu`, `onnxruntime-openvino`, `onnxruntime-directml`, ... all install the same
`onnxruntime` package. pip installs two of them into one environment without complaint, and whichever
wrote its files last wins, silently: a GPU user then runs on the CPU. So the runtime refuses to start when
no build is installed, or when several builds share the folder that `import onnxruntime` loads from, and
says which extra to install. A build in another folder that the import never reaches (shadowed on
sys.path, e.g. onnxruntime-gpu carried in via PYTHONPATH on a machine whose system Python has the CPU
build) cannot mix files with the one imported, and is allowed.

`python -m persense.runtime.backends.ort_check [--require-provider NAME]` prints the build in use and its providers.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata as metadata
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from persense.runtime.errors import PersenseError

log = logging.getLogger(__name__)

MODULE_INIT = "onnxruntime/__init__.py"
NAME_PREFIXES = ("onnxruntime", "ort-nightly", "ort_nightly")  # onnxruntime-gpu, ort-nightly-gpu, ...
FIX = "install exactly one: pip install 'persense[cpu]', or 'persense[gpu]' for NVIDIA GPUs"


@dataclass(frozen=True)
class Build:
    """One installed distribution that provides the `onnxruntime` module."""

    name: str
    version: str
    location: Path  # the folder holding its `onnxruntime/` package (a site-packages directory)

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def _provides_module(dist: metadata.Distribution) -> bool:
    """Whether a distribution installs the `onnxruntime` package (not e.g. onnxruntime-extensions)."""
    if dist.files is not None:
        return any(str(path) == MODULE_INIT for path in dist.files)
    return "onnxruntime" in (dist.read_text("top_level.txt") or "").split()


def installed_builds() -> list[Build]:
    """Every distinct installed build of ONNX Runtime on sys.path, in sys.path order."""
    builds: dict[tuple[str, Path], Build] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(NAME_PREFIXES) and _provides_module(dist):
            location = Path(dist.locate_file("")).resolve()
            builds.setdefault((name, location), Build(name, dist.version, location))
    return list(builds.values())


def module_root() -> Path | None:
    """The folder `import onnxruntime` loads the package from (its parent), or None when it is not importable."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent.parent


def choose_build(builds: list[Build], root: Path | None) -> Build:
    """The build that `import onnxruntime` gets; PersenseError when there is none or it is mixed with another."""
    if not builds or root is None:
        raise PersenseError(f"ONNX Runtime is not installed: {FIX}")
    if len(builds) == 1:
        return builds[0]
    imported = [b for b in builds if b.location == root]
    if len(imported) != 1:
        names = " and ".join(str(b) for b in (imported or builds))
        uninstall = " ".join(sorted({b.name for b in (imported or builds)}))
        raise PersenseError(
            f"{names} are installed together in {root} and overwrite each other's `onnxruntime` "
            f"module: pip uninstall -y {uninstall}, then {FIX}"
        )
    shadowed = ", ".join(f"{b} in {b.location}" for b in builds if b is not imported[0])
    log.info("onnxruntime: using %s from %s; shadowed on sys.path: %s", imported[0], root, shadowed)
    return imported[0]


@functools.cache
def check_onnxruntime() -> Build:
    """Check the installed ONNX Runtime builds once per process; the build in use (PersenseError if unusable)."""
    return choose_build(installed_builds(), module_root())


def main(argv: list[str] | None = None) -> int:
    """Print the ONNX Runtime build in use and its providers; exit 2 if unusable or a required provider is missing."""
    parser = argparse.ArgumentParser(
        prog="python -m persense.runtime.backends.ort_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--require-provider",
        action="append",
        default=[],
        metavar="NAME",
        help="fail unless onnxruntime lists this execution provider (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        build = check_onnxruntime()
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        missing = [p for p in args.require_provider if p not in providers]
        if missing:
            raise PersenseError(f"{build} lists no {', '.join(missing)} (providers: {', '.join(providers)})")
    except PersenseError as exc:
        print(f"ort_check: error: {exc}", file=sys.stderr)
        return 2
    print(f"{build} in {build.location}; providers: {', '.join(providers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
