"""Reading images and masks with clear errors, and writing outputs atomically."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from persense.runtime.errors import PersenseError

log = logging.getLogger(__name__)

# Keep 16-bit depth and grey/colour as stored, drop alpha, and apply EXIF orientation (as cv2.imread does).
READ_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3  # IHDR colour type of an indexed-colour PNG
_PNG_HEADER_BYTES = 1 << 16  # where a PNG's palette is looked for (it precedes the image data)
_OPENCV_LOG_PREFIX = re.compile(r"\[[A-Z]+:[^\]]*\] global \S+ ")
_STDERR_LOCK = threading.Lock()


def _decode_quietly(data: np.ndarray, flags: int) -> tuple[np.ndarray | None, str]:
    """cv2.imdecode with what the codec libraries print on stderr captured; (image or None, their message).

    File descriptor 2 is redirected for the duration of the call, so anything another thread writes to
    stderr meanwhile ends up in the message too.
    """
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:  # one redirection at a time: threads share fd 2
        sys.stderr.flush()
        saved, error = os.dup(2), ""
        os.dup2(capture.fileno(), 2)
        try:
            image = cv2.imdecode(data, flags)
        except cv2.error as exc:  # e.g. a header that claims more pixels than OpenCV's limit
            image, error = None, exc.err
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        printed = _OPENCV_LOG_PREFIX.sub("", capture.read().decode(errors="replace"))
    return image, " ".join(f"{printed} {error}".split())


def _refusal(path: Path, message: str) -> PersenseError:
    """The error for an image OpenCV could not decode, with the codec's own reason when it gave one."""
    if "CV_IO_MAX_IMAGE_PIXELS" in message:
        return PersenseError(
            f"{path}: image has more pixels than OpenCV allows (2^30 by default; set "
            f"OPENCV_IO_MAX_IMAGE_PIXELS to raise the limit if the file is genuine)"
        )
    reason = f" ({message[:200]})" if message else ""
    return PersenseError(f"{path}: not a readable image (truncated, corrupt or unsupported format){reason}")


def _file_bytes(path: Path) -> np.ndarray:
    """The bytes of an existing, non-empty regular file, or a PersenseError saying what is wrong."""
    if not path.exists():
        raise PersenseError(f"{path}: no such file")
    if path.is_dir():
        raise PersenseError(f"{path}: is a directory, expected an image file")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise PersenseError(f"{path}: file is empty")
    return data


def _decode(path: Path, data: np.ndarray, flags: int, warnings: list[str] | None) -> np.ndarray:
    """Decode file bytes; codec warnings on an image that still decodes are logged and added to `warnings`."""
    image, message = _decode_quietly(data, flags)
    if image is None:
        raise _refusal(path, message)
    if message:
        note = f"{path}: the decoder reported a problem but read the image: {message[:200]}"
        log.warning(note)
        if warnings is not None:
            warnings.append(note)
    return image


def read_raw(path: str | os.PathLike, flags: int = READ_FLAGS, warnings: list[str] | None = None) -> np.ndarray:
    """cv2.imdecode a file (works with non-ASCII paths), raising PersenseError when it cannot."""
    path = Path(path)
    return _decode(path, _file_bytes(path), flags, warnings)


def read_rgb(path: str | os.PathLike, warnings: list[str] | None = None) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (EXIF-oriented, grayscale expanded, alpha dropped, 16-bit scaled to 8)."""
    return _to_rgb(path, read_raw(path, READ_FLAGS, warnings), cv2.COLOR_BGR2RGB)


def rgb_from_array(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An in-memory RGB (or grey) 8/16-bit image as HxWx3 uint8 RGB, checked as `read_rgb` checks files."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]  # alpha dropped, as cv2 reads files
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)) or 0 in image.shape:
        raise PersenseError(f"{name}: expected an HxW or HxWx3 image array, got shape {image.shape}")
    return _to_rgb(name, image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image, None)


def _to_rgb(path: str | os.PathLike, image: np.ndarray, colour_code: int | None) -> np.ndarray:
    """8-bit RGB from a decoded 8/16-bit image: grey expanded, colour converted with `colour_code` (None: as is)."""
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise PersenseError(f"{path}: unsupported pixel type {image.dtype}; expected 8- or 16-bit integers")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(image) if colour_code is None else cv2.cvtColor(image, colour_code)


def png_palette_background(data: bytes) -> tuple[int, int, int] | None:
    """(R, G, B) of palette entry 0 of an indexed-colour PNG, or None for any other file."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 26 or data[25] != _PNG_PALETTE:
        return None
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"PLTE" and length >= 3 and offset + 11 <= len(data):
            return tuple(data[offset + 8 : offset + 11])
        if kind == b"IDAT":
            return None
        offset += 12 + length
    return None


def _foreground(path: Path, mask: np.ndarray, palette_background: tuple[int, int, int] | None) -> np.ndarray:
    """Foreground of a decoded mask: palette index > 0, else value > 0 in its only (or R) channel."""
    if mask.ndim == 3:
        if palette_background is not None:
            return (mask != np.array(palette_background[::-1], dtype=mask.dtype)).any(axis=2)
        mask = mask[..., 2]  # the R channel of BGR, as the original reads colour masks
    values = np.unique(mask)
    if values.size > 2:
        raise PersenseError(f"{path}: mask is not binary ({values.size} distinct values); expected 0 and 255")
    return mask > 0


def read_mask(
    path: str | os.PathLike, expected_size: tuple[int, int] | None = None, warnings: list[str] | None = None
) -> np.ndarray:
    """A mask file as an HxW bool array.

    Foreground: value > 0 for single-channel masks, which must hold at most two values (8/16-bit, 1-bit);
    palette index > 0 for indexed PNGs (pixels whose colour differs from palette entry 0); the R channel
    > 0 for other colour masks, as the original reads them (that channel must be binary too).
    """
    path = Path(path)
    data = _file_bytes(path)
    background = png_palette_background(data[:_PNG_HEADER_BYTES].tobytes())
    return _checked_mask(path, _foreground(path, _decode(path, data, READ_FLAGS, warnings), background), expected_size)


def mask_from_array(mask: np.ndarray, expected_size: tuple[int, int] | None = None, name: str = "mask") -> np.ndarray:
    """An in-memory HxW mask (bool, or numbers with at most two values; > 0 is foreground) as HxW bool,
    checked as `read_mask` checks files."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or mask.dtype.kind not in "biuf":
        raise PersenseError(f"{name}: expected an HxW mask array of numbers, got shape {mask.shape} dtype {mask.dtype}")
    return _checked_mask(name, _foreground(name, mask, None), expected_size)


def _checked_mask(path: str | os.PathLike, binary: np.ndarray, expected_size: tuple[int, int] | None) -> np.ndarray:
    """A boolean mask refused when its size differs from the reference image's or it has no foreground."""
    if expected_size is not None and binary.shape != tuple(expected_size):
        raise PersenseError(
            f"{path}: mask is {binary.shape[1]}x{binary.shape[0]} but the reference image is "
            f"{expected_size[1]}x{expected_size[0]}; they must have the same size"
        )
    if not binary.any():
        raise PersenseError(f"{path}: mask is empty (no foreground pixel)")
    return binary


def _current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same folder (`.<name>.<random>.tmp`), fsync and an
    atomic rename (os.replace): the package's one atomic writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stale_temporaries(path: Path) -> list[Path]:
    """The temporary files atomic_write_bytes(path) left next to `path` when a kill interrupted it."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode an image by the file's extension (RGB input for 3 channels) and write it atomically."""
    path = Path(path)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise PersenseError(f"{path}: could not encode image")
    atomic_write_bytes(path, encoded.tobytes())


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically."""
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2) + "\n").encode())
