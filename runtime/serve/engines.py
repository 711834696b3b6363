"""The engines a server shares between requests: one `PerSense` per precision the folder offers."""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from persense.runtime.api import METHODS, PerSense, Reference
from persense.runtime.artefact_names import FEATURES
from persense.runtime.backends.table import PRECISIONS
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Manifest
from persense.runtime.models.sam import engine_names
from persense.runtime.reference_cache import default_cache_dir


class NotFound(PersenseError):
    """A name the client sent that the server does not have (a reference id): HTTP 404."""


@dataclass(frozen=True)
class EngineOptions:
    """How the server opens its engines (persense-serve's flags)."""

    engines: Path
    backend: str = "auto"
    precision: str = "fp32"
    counter: str = "auto"
    threads: int | None = None
    cache_dir: Path | None = None  # the reference cache: where reference ids live (shared by replicas)


class EngineSet:
    """One PerSense per precision, the server's own opened at start-up, the others on first use; all thread-safe.

    A reference id is `<reference-cache key>-<precision>`: content-addressed (the key hashes the image, the mask
    or prompt, the encoder, precision and backend) and kept in the reference cache, so a restarted server, or
    another replica sharing the cache folder, finds it.
    """

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.cache_dir = Path(options.cache_dir or default_cache_dir()).expanduser()
        _check_writable(self.cache_dir)
        self.default = self._open(options.precision)
        self._opened = {self.default.precision: self.default}
        self._lock = threading.Lock()
        manifest, backend = self.default.manifest, self.default.backend
        self.precisions = tuple(p for p in PRECISIONS if _has_models(manifest, backend, p))
        self.methods = METHODS if FEATURES in manifest.artefacts else ("persense",)

    def _open(self, precision: str) -> PerSense:
        """A PerSense of this folder at `precision`, with the shared reference cache."""
        o = self.options
        return PerSense.open(o.engines, o.backend, precision, o.counter, o.threads, cache_dir=self.cache_dir)

    def get(self, precision: str | None) -> PerSense:
        """The PerSense of a precision the folder offers (None: the server's)."""
        if precision is None or precision == "":
            return self.default
        if precision not in self.precisions:
            choices = ", ".join(self.precisions)
            raise PersenseError(f"precision {precision!r} is not in this engines folder; choose one of {choices}")
        with self._lock:
            if precision not in self._opened:
                self._opened[precision] = self._open(precision)
            return self._opened[precision]

    def method(self, method: str | None) -> str:
        """A method the folder can run (None: persense)."""
        if method is None or method == "":
            return "persense"
        if method not in self.methods:
            raise PersenseError(f"method {method!r} is not available here; choose one of {', '.join(self.methods)}")
        return method

    def reference(self, reference_id: str) -> tuple[PerSense, Reference]:
        """The engines and the cached reference an id names, or NotFound."""
        key, _, precision = reference_id.partition("-")
        if precision not in self.precisions or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise NotFound(f"unknown reference id {reference_id!r}; create one with POST /v1/references")
        ps = self.get(precision)
        target = ps.cache.get(key)
        if target is None:
            raise NotFound(f"unknown reference id {reference_id!r}; create one with POST /v1/references")
        return ps, Reference(target, ps.manifest.digest(), ps.precision, ps.backend, source="cache", key=key)


def reference_id(reference: Reference) -> str:
    """The id a client uses for a reference the server encoded (or found in the cache)."""
    if reference.key is None:
        raise PersenseError("the reference cache could not store the reference; check the server's --cache-dir")
    return f"{reference.key}-{reference.precision}"


def _check_writable(folder: Path) -> None:
    """Refuse at start-up a reference cache folder that cannot hold references (their ids would not persist)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PersenseError(
            f"{folder}: cannot write to the reference cache folder ({exc.strerror or exc}); pass --cache-dir"
        ) from exc


def _has_models(manifest: Manifest, backend: str, precision: str) -> bool:
    """Whether the folder holds the SAM models `precision` runs on `backend`."""
    try:
        names = engine_names(manifest, backend, precision)
    except PersenseError:
        return False
    return all(name in manifest.artefacts for name in names.values())
