"""SAM's geometry in NumPy: longest-side resize, normalisation and padding, coordinate and box frames.

Public boundaries use (x, y) points and (x0, y0, x1, y1) boxes in original-image pixels; the
counters' (y0, x0, y1, x1) rows and SAM's 1024 frame are converted here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from persense.runtime.resize import resize_bilinear_pil

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size (h, w) after scaling the longest side to `long_side`, rounded like segment-anything."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class SamTransform:
    """Maps one original image size to SAM's padded square input frame and back."""

    original_size: tuple[int, int]
    long_side: int = 1024

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the resized image inside the padded square."""
        return preprocess_shape(*self.original_size, self.long_side)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """Resize a uint8 HxW(xC) image to the input size (Pillow-exact bilinear, as ResizeLongestSide)."""
        return resize_bilinear_pil(image, *self.input_size)

    def normalize_pad(self, resized: np.ndarray) -> np.ndarray:
        """Normalise an RGB uint8 input-size image and zero-pad it to a 1x3xLxL float32 tensor."""
        out = np.zeros((1, 3, self.long_side, self.long_side), dtype=np.float32)
        h, w = resized.shape[:2]
        out[0, :, :h, :w] = ((resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)
        return out

    def image_tensor(self, image_rgb: np.ndarray) -> np.ndarray:
        """The encoder input for an original RGB uint8 image."""
        return self.normalize_pad(self.resize(image_rgb))

    def coords_to_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) (x, y) original pixels -> SAM input frame (as SamPredictor.apply_coords)."""
        h, w = self.original_size
        new_h, new_w = self.input_size
        out = np.asarray(points, dtype=np.float64).copy()
        out[..., 0] *= new_w / w
        out[..., 1] *= new_h / h
        return out.astype(np.float32)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(..., 4) (x0, y0, x1, y1) original pixels -> SAM input frame."""
        boxes = np.asarray(boxes)
        return self.coords_to_input(boxes.reshape(boxes.shape[:-1] + (2, 2))).reshape(boxes.shape)

    def coords_from_input(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) SAM input frame -> (x, y) original pixels."""
        h, w = self.original_size
        new_h, new_w = self.input_size
        out = np.asarray(points, dtype=np.float64).copy()
        out[..., 0] *= w / new_w
        out[..., 1] *= h / new_h
        return out

    def upsample_to_original(self, low_res: np.ndarray) -> np.ndarray:
        """A (h, w) map in SAM's padded frame (e.g. 256x256 logits) -> original size, as postprocess_masks."""
        full = cv2.resize(np.ascontiguousarray(low_res, dtype=np.float32), (self.long_side, self.long_side),
                          interpolation=cv2.INTER_LINEAR)
        h, w = self.input_size
        crop = np.ascontiguousarray(full[:h, :w])
        oh, ow = self.original_size
        return cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_LINEAR)


def xyxy_to_yxyx(boxes: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) -> (y0, x0, y1, x1), the row format of the original counters."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]


def yxyx_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(y0, x0, y1, x1) -> (x0, y0, x1, y1)."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]


def mask_box_xyxy(mask: np.ndarray) -> np.ndarray:
    """Tight inclusive (x0, y0, x1, y1) box of a boolean mask, as the original's np.nonzero min/max."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)
