"""Picking and opening the density counter for `--counter`."""

from __future__ import annotations

from pathlib import Path

from persense.runtime.backends.table import backend as backend_row
from persense.runtime.counters.base import Counter, NpyDensityCounter
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Manifest

COUNTERS = ("auto", "sam", "npy", "countr", "dsalvanet")


def make_counter(
    name: str, manifest: Manifest, backend: str, threads: int | None, density: Path | None = None
) -> Counter:
    """The counter `name` ('auto' = the .npy map when --density is given, else the SAM-only counter)."""
    if name not in COUNTERS:
        raise PersenseError(f"unknown counter {name!r}; choose one of {', '.join(COUNTERS)}")
    if name == "auto":
        name = "npy" if density is not None else "sam"
    if name == "npy":
        if density is None:
            raise PersenseError("--counter npy needs --density FILE.npy")
        return NpyDensityCounter(density)
    if name == "sam":
        from persense.runtime.counters.sam_prototype import SamPrototypeCounter

        return SamPrototypeCounter()
    artefact = f"counter_{name}"
    if artefact not in manifest.artefacts:
        raise PersenseError(
            f"{manifest.folder}: no {artefact} engine; export it with "
            f"`persense-export --counter {name} --out {manifest.folder}`"
        )
    side = backend_row(backend).side
    if name == "countr":
        from persense.runtime.counters.countr import CountrCounter

        return CountrCounter.from_manifest(manifest, side, threads)
    from persense.runtime.counters.dsalvanet import DsalvanetCounter

    return DsalvanetCounter.from_manifest(manifest, side, threads)
