"""A reference object given as a SAM prompt (a box, or clicked points) instead of a mask.

SAM segments the object with a plain prompt, as segment-anything's predictor takes it: the points (label 1
on the object, 0 off it) first, then the box as two corner points labelled 2 and 3; without a box the
prompt ends with SAM's padding point (0, 0) labelled -1 (the ONNX decoder's convention, which is what
`SamPredictor` embeds). Multimask output, the best of outputs 1..3 by predicted IoU (chosen in the exported
decoder's graph), no PerSAM guidance. The reference is then encoded from that mask with the same image
embedding, so the image is encoded once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.models.sam import PAD_LABEL, Prompts, SamEngines
from persense.runtime.pipeline.exemplars import check_box
from persense.runtime.pipeline.prior import Target, reference_target

BOX_LABELS = (2.0, 3.0)  # SAM's labels of a box's top-left and bottom-right corners
POINT_LABELS = (0, 1)  # background (off the object), foreground (on it)


@dataclass(frozen=True)
class ObjectPrompt:
    """A checked prompt in reference-image pixels: an optional box (x0, y0, x1, y1) and points with labels."""

    box: tuple[float, float, float, float] | None
    points: tuple[tuple[float, float], ...]
    labels: tuple[int, ...]

    @staticmethod
    def make(
        size: tuple[int, int],
        box: Sequence[float] | np.ndarray | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> ObjectPrompt:
        """The prompt if it fits an image of `size` (h, w): a box or at least one point with label 1; one label
        (0 or 1, default 1) per point; everything finite and inside the image; the box not inverted."""
        height, width = size
        checked_box = _checked_box(box, width, height) if box is not None else None
        coords = _checked_points(points, width, height)
        values = [1] * len(coords) if labels is None else _checked_labels(labels, len(coords))
        if checked_box is None and 1 not in values:
            raise PersenseError(
                "a reference prompt needs a box or at least one point on the object (label 1); "
                "points labelled 0 only say where the object is not"
            )
        return ObjectPrompt(checked_box, coords, tuple(values))

    def identity(self) -> bytes:
        """Bytes naming the prompt in the reference-cache key (never equal to a mask file's or array's bytes)."""
        fields = {"box": self.box, "points": self.points, "labels": self.labels}
        return b"persense-prompt\0" + json.dumps(fields, sort_keys=True).encode()

    def describe(self) -> dict:
        """The prompt as plain values, for messages."""
        box = None if self.box is None else list(self.box)
        return {"box": box, "points": [list(point) for point in self.points], "labels": list(self.labels)}

    def sam_prompts(self, transform: SamTransform) -> Prompts:
        """One prompt in SAM's input frame: points then box corners, or points then the padding point."""
        coords = [transform.coords_to_input(np.array(self.points, np.float64).reshape(-1, 2))]
        labels = [np.array(self.labels, np.float32)]
        if self.box is not None:
            coords.append(transform.boxes_to_input(np.array(self.box, np.float64)).reshape(2, 2))
            labels.append(np.array(BOX_LABELS, np.float32))
        else:
            coords.append(np.zeros((1, 2), np.float32))
            labels.append(np.array([PAD_LABEL], np.float32))
        return Prompts(np.concatenate(coords)[None].astype(np.float32), np.concatenate(labels)[None])


def prompt_mask(
    sam: SamEngines, embedding: np.ndarray, transform: SamTransform, prompt: ObjectPrompt
) -> tuple[np.ndarray, float]:
    """SAM's mask for the prompt (HxW bool, as SamPredictor thresholds it: upsampled logits > 0) and its predicted
    IoU; an empty mask is refused."""
    logits, scores = sam.decode_best(embedding, prompt.sam_prompts(transform))
    mask = transform.upsample_to_original(logits[0]) > 0
    if not mask.any():
        raise PersenseError(
            f"SAM's mask for the reference prompt {prompt.describe()} is empty; "
            f"put the box or point on the object, or give a mask"
        )
    return mask, float(scores[0])


def prompt_reference(sam: SamEngines, image: np.ndarray, prompt: ObjectPrompt) -> tuple[Target, np.ndarray]:
    """The reference encoded from SAM's mask for the prompt, with one image encoding; and that mask."""
    embedding, transform = sam.encode(image)
    mask, _ = prompt_mask(sam, embedding, transform, prompt)
    return reference_target(embedding, mask, transform), mask


def _rows(values: Sequence | np.ndarray, columns: int, what: str) -> np.ndarray:
    """`values` as finite float64 rows of `columns` numbers ([N, columns]), else a PersenseError saying `what`."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):  # ragged, or not numbers
        array = np.full(1, np.nan)
    if array.size % columns or not np.isfinite(array).all():
        raise PersenseError(f"{what}, got {_shown(values)}")
    return array.reshape(-1, columns)


def _shown(values: object) -> str:
    """A refused value as the message shows it (lists for arrays, at most 200 characters)."""
    text = str(values.tolist() if isinstance(values, np.ndarray) else values)
    return text if len(text) <= 200 else text[:197] + "..."


def _checked_box(box: Sequence[float] | np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """The reference box if it is four finite numbers, not inverted, inside the image."""
    what = "reference box must be four finite numbers (x0, y0, x1, y1)"
    rows = _rows(box, 4, what)
    if len(rows) != 1:
        raise PersenseError(f"{what}, got {_shown(box)}")
    x0, y0, x1, y1 = check_box(rows[0], (height, width), "reference box", "reference").tolist()
    return x0, y0, x1, y1


def _checked_points(
    points: Sequence[Sequence[float]] | np.ndarray | None, width: int, height: int
) -> tuple[tuple[float, float], ...]:
    """The reference points if each is a finite (x, y) inside the image."""
    if points is None:
        return ()
    array = _rows(points, 2, "reference points must be finite (x, y) pairs")
    for x, y in array:
        if not (0 <= x < width and 0 <= y < height):
            raise PersenseError(
                f"reference point ({x:g}, {y:g}) is outside the {width}x{height} reference image "
                f"(it needs 0 <= x < {width} and 0 <= y < {height})"
            )
    return tuple((float(x), float(y)) for x, y in array)


def _checked_labels(labels: Sequence[int] | np.ndarray, count: int) -> list[int]:
    """One label per point, each 0 or 1."""
    values = np.asarray(labels).reshape(-1).tolist()
    if len(values) != count:
        raise PersenseError(f"got {len(values)} point labels for {count} reference points; give one label per point")
    if any(value not in POINT_LABELS for value in values):
        raise PersenseError(f"point labels must be 1 (on the object) or 0 (off it), got {values}")
    return [int(value) for value in values]


def parse_numbers(text: str, count: int, what: str, image: str = "reference") -> list[float]:
    """ "a,b,..." (a command-line flag or a form field) -> exactly `count` numbers in `image`'s pixels, else a
    PersenseError."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        form = "x0,y0,x1,y1" if count == 4 else "x,y"
        raise PersenseError(f"{what} expects {count} numbers {form} in {image}-image pixels, got {text!r}")
    return values
