"""Reading images and masks with clear errors, and writing outputs atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from persense.runtime.errors import PersenseError


def read_raw(path: str | os.PathLike, flags: int) -> np.ndarray:
    """cv2.imdecode a file (works with non-ASCII paths), raising PersenseError when it cannot."""
    path = Path(path)
    if not path.exists():
        raise PersenseError(f"{path}: no such file")
    if path.is_dir():
        raise PersenseError(f"{path}: is a directory, expected an image file")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise PersenseError(f"{path}: file is empty")
    image = cv2.imdecode(data, flags)
    if image is None:
        raise PersenseError(f"{path}: not a readable image (corrupt or unsupported format)")
    return image


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (grayscale expanded, alpha dropped, 16-bit scaled to 8)."""
    image = read_raw(path, cv2.IMREAD_UNCHANGED)
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise PersenseError(f"{path}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | os.PathLike, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as an HxW bool array (foreground = value > 0 in its first channel)."""
    mask = read_raw(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 3:
        mask = mask[..., 2] if mask.shape[2] >= 3 else mask[..., 0]  # the R channel, as the original
    binary = mask > 0
    if expected_size is not None and binary.shape != tuple(expected_size):
        raise PersenseError(
            f"{path}: mask is {binary.shape[1]}x{binary.shape[0]} but the reference image is "
            f"{expected_size[1]}x{expected_size[0]}; they must have the same size")
    if not binary.any():
        raise PersenseError(f"{path}: mask is empty (no foreground pixel)")
    values = np.unique(mask)
    if values.size > 2:
        raise PersenseError(f"{path}: mask is not binary ({values.size} distinct values); expected 0 and 255")
    return binary


def _current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same folder and an atomic rename."""
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
