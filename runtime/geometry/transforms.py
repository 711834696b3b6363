"""SAM's geometry in NumPy: longest-side resize, normalisation and padding, coordinate and box frames.

Public boundaries use (x, y) points and (x0, y0, x1, y1) boxes in original-image pixels; the
counters' (y0, x0, y1, x1) rows and SAM's 1024 frame are converted here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from persense.runtime.geometry.resampling import resize_bilinear_pil
from persense.runtime.geometry.upsampling import Upsampler

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # SAM's, on 0..255 pixels
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
LONG_SIDE = 1024  # side of SAM's square input frame, which the longest image side is resized to
PATCH_SIZE = 16  # input pixels per embedding cell (the image encoder's patch size)
GRID = LONG_SIDE // PATCH_SIZE  # 64 embedding cells per side of the frame
LOW_RES = 256  # side of SAM's low-res mask logits
# ImageNet's mean and std on [0, 1] pixels: the normalisation of the detector and of DSALVANet (not SAM's)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size (h, w) after scaling the longest side to `long_side`, rounded like segment-anything.

    A side that would round to 0 (an image more than 2048 times longer than wide, where segment-anything
    fails) is kept at 1 pixel.
    """
    scale = long_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class SamTransform:
    """Maps one original image size to SAM's padded square input frame and back."""

    original_size: tuple[int, int]
    long_side: int = LONG_SIDE

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

    @cached_property
    def upsampler(self) -> Upsampler:
        """Composite bilinear maps from the 256x256 low-res frame to the original image."""
        return Upsampler(self.input_size, self.original_size, self.long_side, LOW_RES)

    def upsample_to_original(self, low_res: np.ndarray) -> np.ndarray:
        """A 256x256 map in SAM's padded frame -> original size float32, as SAM's postprocess_masks."""
        return self.upsampler.full(low_res)


def xyxy_to_yxyx(boxes: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) -> (y0, x0, y1, x1), the row format of the original counters."""
    return np.asarray(boxes)[..., [1, 0, 3, 2]]
