"""Content-addressed cache of reference results (`Target`), verified on every read.

Wiring it in (persense.PerSense, persense-infer, persense-eval --run, the Ray workers):

    cache = ReferenceCache.disabled() if args.no_cache else ReferenceCache(args.cache_dir or default_cache_dir())
    key = cache_key(ref_file_bytes, mask_file_bytes, encoder_digest(manifest.artefact(encoder_name)),
                    precision, backend)
    target = cache.get(key)                     # None on a miss, or on a bad entry (logged, never trusted)
    from_cache = target is not None             # -> result.json
    if target is None:
        target = pipeline.reference(ref_image, ref_mask)
        cache.put(key, target)                  # atomic; never raises (an unwritable folder disables the cache)

Key the files' bytes as read from disk (a hit then needs no decoding); for in-memory arrays use
`array_bytes(image)`, which includes shape and dtype. `encoder_name` is the encoder artefact actually
opened (`sam_encoder`, `sam_encoder_int8`, ...); `backend` the resolved one (`ort-cpu`, not `auto`).
`write_entry` / `read_entry` read and write one verified entry file, with the key recorded inside. A
reference the user saves (`--save-reference apple.npz`) is a different file: `Reference.save` in
runtime/api.py, tied to the manifest digest and precision rather than to the reference's bytes. Both
hold the vectors through the same codec, runtime/reference_codec.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from persense.runtime.imageio import atomic_write_bytes
from persense.runtime.manifest import Artefact
from persense.runtime.pipeline.prior import Target
from persense.runtime.reference_codec import (
    DECODE_ERRORS,
    VECTORS,
    checked_target,
    checked_vector,
    checksum,
    decode,
    encode,
)

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
SUFFIX = ".npz"


class BadEntry(ValueError):
    """A cache entry that cannot be trusted: unreadable, truncated, corrupt or for another key."""


def default_cache_dir() -> Path:
    """$PERSENSE_CACHE_DIR, else $XDG_CACHE_HOME/persense, else ~/.cache/persense."""
    if os.environ.get("PERSENSE_CACHE_DIR"):
        return Path(os.environ["PERSENSE_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "persense"
    return Path.home() / ".cache" / "persense"


def encoder_digest(artefact: Artefact) -> str:
    """Hex sha256 naming an encoder artefact's numbers: file and external-data hashes, precision, model type."""
    fields = (
        "persense-encoder",
        artefact.sha256,
        str(artefact.extra.get("data_sha256", "")),
        artefact.precision,
        artefact.model_type,
    )
    return _hash_fields(field.encode() for field in fields)


def array_bytes(array: np.ndarray) -> bytes:
    """Bytes identifying an in-memory image or mask: dtype, shape and contents."""
    array = np.ascontiguousarray(array)
    return f"{array.dtype.str}{array.shape}".encode() + b"\0" + array.tobytes()


def cache_key(image_bytes: bytes, mask_bytes: bytes, manifest_digest: str, precision: str, backend: str) -> str:
    """Hex sha256 over the reference inputs and everything that decides the numbers computed from them."""
    return _hash_fields(
        [b"persense-reference", image_bytes, mask_bytes, manifest_digest.encode(), precision.encode(), backend.encode()]
    )


def _hash_fields(fields) -> str:
    """sha256 over length-prefixed fields (no two field lists give the same byte stream)."""
    digest = hashlib.sha256()
    for field in fields:
        digest.update(len(field).to_bytes(8, "little"))
        digest.update(field)
    return digest.hexdigest()


def entry_bytes(key: str, target: Target) -> bytes:
    """The serialised entry (reference_codec): both arrays as float32 [256], format, key and their checksum."""
    checked = Target(
        checked_vector(target.embedding, "embedding", ValueError), checked_vector(target.feature, "feature", ValueError)
    )
    return encode(checked, format=ENTRY_FORMAT, key=key, checksum=checksum(checked))


def parse_entry(data: bytes, key: str) -> Target:
    """The Target stored in `data`, or BadEntry saying why it cannot be trusted for `key`."""
    try:
        fields = decode(data, ("format", "key", *VECTORS, "checksum"))
    except DECODE_ERRORS as exc:
        raise BadEntry(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if fields["format"].shape != () or fields["format"].dtype.kind not in "iu" or int(fields["format"]) != ENTRY_FORMAT:
        raise BadEntry(f"entry format {fields['format'].tolist()!r} is not {ENTRY_FORMAT}")
    if fields["key"].shape != () or str(fields["key"]) != key:
        raise BadEntry("it was written for another key (other reference, engines, precision or backend)")
    target = checked_target(fields, BadEntry)
    if fields["checksum"].shape != () or str(fields["checksum"]) != checksum(target):
        raise BadEntry("payload checksum mismatch")
    return target


def write_entry(path: str | Path, key: str, target: Target) -> Path:
    """Write an entry atomically (temp file in the same folder, fsync, os.replace); OSError if unwritable."""
    path = Path(path)
    atomic_write_bytes(path, entry_bytes(key, target))
    return path


def read_entry(path: str | Path, key: str) -> Target:
    """The verified Target in the entry at `path`; OSError if it cannot be read, BadEntry if not trusted."""
    return parse_entry(Path(path).read_bytes(), key)


class ReferenceCache:
    """A folder of verified entries `<key>.npz`; every failure is logged and turns into a miss, never an error."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder).expanduser()
        self._warned = False

    @staticmethod
    def disabled() -> ReferenceCache:
        """A cache that never stores nor finds anything (`--no-cache`)."""
        return ReferenceCache(None)

    @property
    def enabled(self) -> bool:
        """False for a disabled cache, or once its folder turned out unwritable."""
        return self.folder is not None

    def path(self, key: str) -> Path:
        """Where the entry for `key` lives."""
        if self.folder is None:
            raise ValueError("a disabled reference cache has no entries")
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key (64 hex digits): {key!r}")
        return self.folder / (key + SUFFIX)

    def get(self, key: str) -> Target | None:
        """The stored Target for `key`, or None on a miss or an entry that fails verification (logged)."""
        if self.folder is None:
            return None
        path = self.path(key)
        try:
            target = read_entry(path, key)
        except FileNotFoundError:
            log.debug("reference cache miss %s", key[:12])
            return None
        except OSError as exc:
            log.warning("reference cache: cannot read %s (%s); encoding the reference", path, exc)
            return None
        except BadEntry as exc:
            log.warning("reference cache: ignoring %s: %s; it will be rewritten", path, exc)
            return None
        log.info("reference cache hit %s", key[:12])
        return target

    def put(self, key: str, target: Target) -> Path | None:
        """Store `target` under `key` atomically; None if disabled, unwritable (warned once) or not finite."""
        if self.folder is None:
            return None
        path = self.path(key)
        try:
            return write_entry(path, key, target)
        except OSError as exc:
            if not self._warned:
                log.warning(
                    "reference cache disabled: cannot write to %s (%s); use --cache-dir or --no-cache", self.folder, exc
                )
                self._warned = True
            self.folder = None
            return None
        except ValueError as exc:
            log.warning("reference cache: not storing %s: %s", key[:12], exc)
            return None
