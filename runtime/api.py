"""`persense.PerSense`: the one object an application needs (the CLIs, dataset runs and Ray use it too).

    from persense import PerSense
    ps = PerSense.open("engines")                       # verified engines, backend chosen
    apple = ps.reference("ref.jpg", "ref_mask.png")     # arrays or paths; reusable, saveable
    result = ps.segment("crowd.jpg", apple)             # union, labels, boxes, points, count, ...

Thread-safety: one `PerSense` may be shared by worker threads. Each `segment`/`reference` call keeps
its state to itself (its own pipeline over the shared engine sessions; per-call counters); ONNX
Runtime sessions run concurrent calls; a TensorRT execution context cannot, so on `trt` calls take
turns through a lock.

`PerSense.reference` is the one place a reference is encoded: the reference cache
(persense.runtime.reference_cache) wraps that call, keyed by the files' (or arrays') bytes, the encoder
artefact, the precision and the backend; a hit skips the encoder. `PerSense.open(cache=False)` turns it off.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from persense.runtime.backends.table import PRECISIONS
from persense.runtime.backends.table import backend as backend_row
from persense.runtime.counters.base import Counter, NpyDensityCounter
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import atomic_write_bytes, mask_from_array, read_mask, read_rgb, rgb_from_array
from persense.runtime.manifest import Manifest
from persense.runtime.models.detector import GroundingDino
from persense.runtime.models.features import FeatureEngine
from persense.runtime.models.sam import ENCODER, SamEngines, engine_names
from persense.runtime.models.text import TextTokens, all_caption
from persense.runtime.pipeline.flow import PerSensePipeline
from persense.runtime.pipeline.prior import Target
from persense.runtime.pipeline.reference_prompt import ObjectPrompt, prompt_reference
from persense.runtime.pipeline.result import SegmentResult
from persense.runtime.reference_cache import (
    ReferenceCache,
    array_bytes,
    cache_key,
    default_cache_dir,
    encoder_digest,
)
from persense.runtime.reference_codec import DECODE_ERRORS, VECTORS, checked_target, checksum, decode, encode

ImageLike = np.ndarray | str | os.PathLike
REFERENCE_FORMAT = 1
log = logging.getLogger(__name__)
PROMPT_MASK_SUFFIX = ".mask.png"  # beside a prompt reference's cache entry: the mask SAM made
SOURCES = ("encoded", "cache", "file")  # where a Reference's numbers came from
METHODS = ("persense", "persense++")  # persense.py and persense++.py (SPEC-PLUSPLUS §0 lists the differences)


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference object encoded by one set of engines: reusable across images, saveable to .npz."""

    target: Target
    manifest: str  # digest of the engines folder's manifest that encoded it
    precision: str  # precision of the SAM models that encoded it
    backend: str  # backend that encoded it (informative: any backend may use it)
    warnings: tuple[str, ...] = ()  # what reading the reference image or mask reported
    encoding_ms: float = 0.0  # time the encoding took (0 from the cache or a file)
    source: str = "encoded"  # one of SOURCES: encoded now, read from the reference cache, or loaded from a file
    key: str | None = None  # its reference-cache key (None when the cache is off or for a loaded file)
    mask: np.ndarray | None = None  # HxW bool: the mask SAM made from a prompt (None when a mask was given)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the reference to an .npz file atomically (arrays, identity of the engines, a checksum)."""
        path = Path(path)
        meta = {
            "format": REFERENCE_FORMAT,
            "manifest": self.manifest,
            "precision": self.precision,
            "backend": self.backend,
            "warnings": list(self.warnings),
            "checksum": _checksum(self.target, self.manifest, self.precision),
        }
        atomic_write_bytes(path, encode(self.target, meta=json.dumps(meta)))
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> Reference:
        """A reference saved by `save`; a file that is not one, or was altered, is refused."""
        path = Path(path)
        if not path.is_file():
            raise PersenseError(f"{path}: no such reference file")
        try:
            arrays = decode(path.read_bytes(), (*VECTORS, "meta"))
            meta = json.loads(str(arrays["meta"]))
            target = checked_target(arrays, ValueError)
            expected = _checksum(target, meta["manifest"], meta["precision"])
            ok = meta["format"] == REFERENCE_FORMAT and meta["checksum"] == expected
        except (*DECODE_ERRORS, TypeError) as exc:
            raise PersenseError(
                f"{path}: not a persense reference file ({type(exc).__name__}: {exc}); "
                f"write one with persense-infer --save-reference"
            ) from exc
        if not ok:
            raise PersenseError(
                f"{path}: reference file is corrupt or of another format version; "
                f"write it again with persense-infer --save-reference"
            )
        return Reference(
            target, meta["manifest"], meta["precision"], meta["backend"], tuple(meta["warnings"]), source="file"
        )


def _checksum(target: Target, manifest: str, precision: str) -> str:
    """sha256 over the reference's numbers and the identity of the engines that made them."""
    return checksum(target, f"{manifest}|{precision}|".encode())


class PerSense:
    """Engines opened once; `reference` then `segment` as often as needed, from any thread."""

    def __init__(
        self,
        sam: SamEngines,
        counter: Counter,
        manifest: Manifest,
        backend: str,
        precision: str,
        cache: ReferenceCache | None = None,
        threads: int | None = None,
        method: str = "persense",
    ) -> None:
        self.sam = sam
        self.counter = counter
        self.manifest = manifest
        self.backend = backend
        self.cache = cache or ReferenceCache.disabled()
        self._encoder = encoder_digest(manifest.artefact(engine_names(manifest, backend, precision)[ENCODER]))
        row = backend_row(backend)
        self.precision = row.run_precision(precision)
        self._turns = threading.Lock() if row.serialised else contextlib.nullcontext()
        self.threads = threads
        self._detector: GroundingDino | None = None
        self._detector_lock = threading.Lock()
        self.method = _checked_method(method)
        self._features: FeatureEngine | None = None
        self._features_lock = threading.Lock()
        if self.method == "persense++":  # refuse a folder without the feature engine now, not at the first image
            from persense.runtime.plusplus.clusters import preload

            self._features = FeatureEngine.from_manifest(manifest, backend, threads, self.precision)
            preload()

    @staticmethod
    def open(
        engines: str | os.PathLike = "engines",
        backend: str = "auto",
        precision: str = "fp32",
        counter: str = "auto",
        threads: int | None = None,
        decode_chunk: int | None = None,
        density: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache: bool = True,
        method: str = "persense",
    ) -> PerSense:
        """Open and verify the SAM engines and the counter of an engines folder (see persense-infer's flags).

        `method`: the default of `segment` (persense or persense++; persense++ also opens the feature engine).

        `cache`: look encoded references up in (and add them to) the reference cache in `cache_dir`,
        by default $PERSENSE_CACHE_DIR, else $XDG_CACHE_HOME/persense, else ~/.cache/persense.
        """
        from persense.runtime.backends.choice import resolve_backend
        from persense.runtime.counters.choice import make_counter
        from persense.runtime.manifest import load_manifest

        if precision not in PRECISIONS:
            raise PersenseError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        for value, name in ((threads, "threads"), (decode_chunk, "decode_chunk")):
            if value is not None and value < 1:
                raise PersenseError(f"{name} must be at least 1, got {value}")
        manifest = load_manifest(engines)
        resolved = resolve_backend(backend, manifest)
        sam = SamEngines.from_manifest(manifest, resolved, threads, decode_chunk, precision)
        density = Path(density) if density is not None else None
        references = ReferenceCache(cache_dir or default_cache_dir()) if cache else ReferenceCache.disabled()
        return PerSense(
            sam,
            make_counter(counter, manifest, resolved, threads, density),
            manifest,
            resolved,
            precision,
            references,
            threads,
            method,
        )

    @property
    def counter_name(self) -> str:
        """Name of the default counter (`sam`, `npy`, `countr`, `dsalvanet`)."""
        return self.counter.name

    def reference(
        self,
        image: ImageLike,
        mask: ImageLike | None = None,
        *,
        box: Sequence[float] | np.ndarray | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> Reference:
        """Encode a reference image and its object, given as a mask (HxW array or file) or as a SAM prompt.

        The prompt: `box` (x0, y0, x1, y1) and/or `points` [(x, y), ...] with `labels` (1 on the object, 0 off
        it; default all 1); SAM segments the object (persense.runtime.pipeline.reference_prompt) and the
        reference is encoded from that mask, kept in `Reference.mask`. The inputs are always read and checked;
        the encoder runs only when the reference cache has no entry for them (then the result is stored), and
        `Reference.source` says which happened.
        """
        warnings: list[str] = []
        rgb = _image(image, warnings)
        prompted = box is not None or points is not None or labels is not None
        if (mask is not None) == prompted:
            which = "not both" if prompted else "none was given"
            raise PersenseError(f"give the reference object as a mask or as a prompt (box and/or points): {which}")
        size = rgb.shape[:2]
        prompt = ObjectPrompt.make(size, box, points, labels) if prompted else None
        binary = None
        if prompt is None:
            binary = read_mask(mask, size, warnings) if _is_path(mask) else mask_from_array(mask, size)
        identity = (self.manifest.digest(), self.precision, self.backend, tuple(warnings))
        key = self._cache_key_or_none(image, prompt or mask)
        cached = self.cache.get(key) if key is not None else None
        made = self._cached_prompt_mask(key, size) if cached is not None and prompt is not None else None
        if cached is not None and (prompt is None or made is not None):
            return Reference(cached, *identity, source="cache", key=key, mask=made)
        start = time.perf_counter()
        with self._turns:
            if prompt is None:
                target = self._pipeline(self.counter).reference(rgb, binary)
            else:
                target, made = prompt_reference(copy.copy(self.sam), rgb, prompt)
        elapsed_ms = (time.perf_counter() - start) * 1000
        if key is not None:
            self.cache.put(key, target)
            if made is not None:
                self._store_prompt_mask(key, made)
        return Reference(target, *identity, elapsed_ms, source="encoded", key=key, mask=made)

    def _prompt_mask_path(self, key: str) -> Path | None:
        """Where the cache keeps the mask SAM made for a prompt entry: beside it, `<key>.mask.png`."""
        return self.cache.path(key).with_suffix(PROMPT_MASK_SUFFIX) if self.cache.enabled else None

    def _cached_prompt_mask(self, key: str, size: tuple[int, int]) -> np.ndarray | None:
        """The cached mask of a prompt entry, or None (a miss: the reference is encoded again) when unreadable."""
        path = self._prompt_mask_path(key)
        try:
            return read_mask(path, size) if path is not None and path.is_file() else None
        except PersenseError as exc:
            log.warning("reference cache: ignoring %s: %s; it will be rewritten", path, exc)
            return None

    def _store_prompt_mask(self, key: str, mask: np.ndarray) -> None:
        """Keep the mask SAM made for a prompt beside its cache entry (never an error, as the cache)."""
        path = self._prompt_mask_path(key)
        try:
            if path is not None:
                atomic_write_bytes(path, cv2.imencode(".png", mask.astype(np.uint8) * np.uint8(255))[1].tobytes())
        except OSError as exc:
            log.warning("reference cache: cannot write %s (%s)", path, exc)

    def _cache_key_or_none(self, image: ImageLike, mask: ImageLike | ObjectPrompt) -> str | None:
        """The cache key, or None when the cache is off or a file vanished since it was read (never an error)."""
        if not self.cache.enabled:
            return None
        try:
            return self.cache_key(image, mask)
        except OSError as exc:
            log.warning("reference cache skipped: cannot read the reference again (%s)", exc)
            return None

    def cache_key(self, image: ImageLike, mask: ImageLike | ObjectPrompt) -> str:
        """The reference-cache key of an image and its mask or prompt (file bytes, array bytes with shape and
        dtype, or the prompt's values)."""
        mask_bytes = mask.identity() if isinstance(mask, ObjectPrompt) else _identity_bytes(mask)
        return cache_key(_identity_bytes(image), mask_bytes, self._encoder, self.precision, self.backend)

    def segment(
        self,
        image: ImageLike,
        reference: Reference,
        box: np.ndarray | list[float] | None = None,
        density: np.ndarray | str | os.PathLike | None = None,
        text: str | None = None,
        method: str | None = None,
    ) -> SegmentResult:
        """Every instance of the reference object in `image` (RGB array or path).

        `box` (x0, y0, x1, y1): the first exemplar, as a detector would give it; `text`: a prompt for the
        exported Grounding DINO, whose most confident box is the first exemplar (the similarity arg-max with
        a warning when it finds nothing); `density`: a density map (array or .npy path) to use instead of
        the counter, for this call only; `method`: persense or persense++ for this call (default: `open`'s).
        """
        method = self.method if method is None else _checked_method(method)
        if box is not None and text is not None:
            raise PersenseError("give the first exemplar as a box or as a text prompt, not both")
        self.check_reference(reference)
        tokens = self.text_tokens(text) if text is not None else None
        gate = self.detector.encode_text(all_caption(text), allow_unknown=True) if text is not None else None
        warnings = list(reference.warnings)
        rgb = _image(image, warnings)
        counter = self.counter if density is None else _density_counter(density)
        with self._turns:
            result = self._pipeline(counter, method).segment(rgb, reference.target, box, tokens, gate)
        result.warnings[:0] = warnings
        return result

    def text_tokens(self, text: str) -> TextTokens:
        """A text prompt tokenised for the detector (opened on first use); refuses what it cannot take."""
        return self.detector.encode_text(text)

    @property
    def detector(self) -> GroundingDino:
        """The Grounding DINO detector of the engines folder, opened and verified on first use."""
        with self._detector_lock:
            if self._detector is None:
                self._detector = GroundingDino.from_manifest(self.manifest, self.backend, self.threads, self.precision)
            return self._detector

    @property
    def features(self) -> FeatureEngine:
        """PerSense++'s ResNet-50 feature engine, opened and verified on first use."""
        with self._features_lock:
            if self._features is None:
                self._features = FeatureEngine.from_manifest(self.manifest, self.backend, self.threads, self.precision)
            return self._features

    def _pipeline(self, counter: Counter, method: str = "persense") -> PerSensePipeline:
        """A pipeline for one call: the shared engine sessions, its own launch count and counter."""
        if method == "persense++":
            from persense.runtime.plusplus.flow import PlusPlusPipeline  # scikit-learn only when it runs

            return PlusPlusPipeline(copy.copy(self.sam), counter, self._detector, self.features)
        return PerSensePipeline(copy.copy(self.sam), counter, self._detector)

    def check_reference(self, reference: Reference) -> None:
        """Refuse a reference encoded by other engines or another precision."""
        if not isinstance(reference, Reference):
            raise PersenseError(
                f"expected a Reference from PerSense.reference or Reference.load, got {type(reference).__name__}"
            )
        if (reference.manifest, reference.precision) != (self.manifest.digest(), self.precision):
            raise PersenseError(
                f"the reference was encoded by other engines (manifest {reference.manifest}, {reference.precision}) "
                f"than these ({self.manifest.folder}: manifest {self.manifest.digest()}, {self.precision}); "
                f"encode it again with these engines"
            )


def _checked_method(method: str) -> str:
    """The method name, or a one-line refusal naming the choices."""
    if method not in METHODS:
        raise PersenseError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _is_path(value: object) -> bool:
    """Whether an image/mask argument names a file."""
    return isinstance(value, (str, os.PathLike))


def _identity_bytes(value: ImageLike) -> bytes:
    """What identifies an image or mask argument: the file's bytes, or the array's dtype, shape and contents."""
    return Path(value).read_bytes() if _is_path(value) else array_bytes(np.asarray(value))


def _image(image: ImageLike, warnings: list[str]) -> np.ndarray:
    """An RGB uint8 image from a path (read as persense-infer reads it) or an array (checked the same way)."""
    return read_rgb(image, warnings) if _is_path(image) else rgb_from_array(image)


def _density_counter(density: np.ndarray | str | os.PathLike) -> Counter:
    """The .npy counter for one call, from a path or an array."""
    return NpyDensityCounter(density) if _is_path(density) else NpyDensityCounter.from_array(density)
