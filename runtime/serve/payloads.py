"""What the service reads from uploads and writes into its JSON: images, COCO RLE masks, PNGs as base64."""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from persense.runtime.errors import PersenseError
from persense.runtime.imageio import read_rgb
from persense.runtime.pipeline.result import SegmentResult


class TooLarge(PersenseError):
    """An upload or an image over the server's bounds: HTTP 413."""


def rle(mask: np.ndarray) -> dict:
    """COCO RLE of an HxW mask, as pycocotools writes it: {"size": [h, w], "counts": "<compressed string>"}."""
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def png_base64(image: np.ndarray) -> str:
    """A uint8/uint16 image as a base64 PNG (16-bit label maps stay 16-bit)."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise PersenseError("could not encode a PNG")
    return base64.b64encode(data.tobytes()).decode("ascii")


def instances(result: SegmentResult) -> list[dict]:
    """Each instance's box (x0, y0, x1, y1; null when its mask is empty), score, prompt point and whole mask."""
    boxes = [None if np.isnan(box).any() else [float(v) for v in box] for box in result.boxes]
    return [
        {"box": box, "score": float(score), "point": [float(v) for v in point], "mask": rle(mask)}
        for box, score, point, mask in zip(boxes, result.scores, result.points, result.instance_masks())
    ]


@contextmanager
def upload_folder() -> Iterator[Path]:
    """A private temporary folder for one request's uploads, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="persense-serve-") as folder:
        yield Path(folder)


def saved(folder: Path, name: str, data: bytes) -> Path:
    """An uploaded file written as `folder/name` (the runtime's readers then check it as they check files)."""
    path = folder / name
    path.write_bytes(data)
    return path


def read_image(path: Path, max_side: int, warnings: list[str]) -> np.ndarray:
    """An uploaded image as RGB, refused over `max_side` pixels on a side."""
    rgb = read_rgb(path, warnings)
    height, width = rgb.shape[:2]
    if max(height, width) > max_side:
        raise TooLarge(f"{path.name}: image is {width}x{height}; this server takes at most {max_side} px on a side")
    return rgb


def client_message(error: Exception, folder: Path | None) -> str:
    """A one-line message for the client, without the server's temporary paths."""
    text = " ".join(str(error).split())
    return text.replace(f"{folder}{os.sep}", "") if folder is not None else text
