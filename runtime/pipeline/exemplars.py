"""The first exemplar given as a box in the target image (`--box`, `box=`), as the original's detector gives it.

The original (persense.py `filtered_similarity`) casts the detector's most confident box to int32 and
starts the exemplar cascade from its centre `((x0 + x1) // 2, (y0 + y1) // 2)`, a point prompt with
label 1; the box itself is never given to SAM. See docs/ALGORITHM.md, "First exemplar".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from persense.runtime.errors import PersenseError


def parse_box(text: str) -> np.ndarray:
    """ "x0,y0,x1,y1" -> a float64 array of four numbers (checked against the image later)."""
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise PersenseError(f"--box expects four numbers x0,y0,x1,y1 in target-image pixels, got {text!r}")
    return np.array(values, dtype=np.float64)


def check_box(
    box: Sequence[float] | np.ndarray, image_size: tuple[int, int], name: str = "box", image: str = "target"
) -> np.ndarray:
    """The box as float64 (x0, y0, x1, y1) if it is finite, not inverted or degenerate, and inside the image
    (`name` and `image` say which box and image in the message)."""
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.size != 4 or not np.isfinite(values).all():
        raise PersenseError(f"{name} must be four finite numbers (x0, y0, x1, y1), got {np.asarray(box).tolist()}")
    x0, y0, x1, y1 = values
    height, width = image_size
    if x1 <= x0 or y1 <= y0:
        raise PersenseError(f"{name} {values.tolist()} is inverted or empty: it needs x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise PersenseError(
            f"{name} {values.tolist()} is not inside the {width}x{height} {image} image "
            f"(it needs 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height})"
        )
    return values


def box_centre(box: np.ndarray) -> np.ndarray:
    """(x, y) where the cascade starts: the centre of the int32-truncated box, floored, as the original."""
    x0, y0, x1, y1 = np.trunc(box)
    return np.array([(x0 + x1) // 2, (y0 + y1) // 2], dtype=np.float64)
