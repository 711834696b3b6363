"""PerSense++'s ResNet-50 RoI features on an engine: the backbone once per image, RoI-align per box in NumPy.

The original (persense++.py `extract_visual_features`) runs torchvision's ResNet-50 without avgpool and fc on
the image resized to 224x224 (PIL bilinear, ImageNet mean/std), then `roi_align(output_size=3,
spatial_scale=7/224, sampling_ratio=2, aligned=False)` on the (1, 2048, 7, 7) map and averages the 3x3 bins.
The backbone does not depend on the boxes, so it runs once per image here and every box of the diversity-aware
selection reads the same map (the original reruns it for each call).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from persense.runtime.artefact_names import FEATURES
from persense.runtime.backends.choice import open_engine, side_engine_choice
from persense.runtime.backends.engine import Engine
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import IMAGENET_MEAN, IMAGENET_STD
from persense.runtime.manifest import IoSpec, Manifest, TensorSpec

RESNET_SIZE = 224  # the original's transforms.Resize((224, 224))
FEATURE_CHANNELS = 2048
FEATURE_STRIDE = 32
FEATURE_GRID = RESNET_SIZE // FEATURE_STRIDE  # 7
ROI_OUTPUT = 3
ROI_SAMPLING = 2
FEATURES_IO: IoSpec = (
    [TensorSpec("image", (1, 3, RESNET_SIZE, RESNET_SIZE), "float32")],
    [TensorSpec("features", (1, FEATURE_CHANNELS, FEATURE_GRID, FEATURE_GRID), "float32")],
)


def resnet_input(image: np.ndarray) -> np.ndarray:
    """ToPILImage, Resize((224, 224)) (PIL bilinear), ToTensor, Normalize: RGB uint8 HxWx3 -> (1, 3, 224, 224)."""
    resized = np.asarray(Image.fromarray(image).resize((RESNET_SIZE, RESNET_SIZE), Image.BILINEAR), np.float32)
    normalised = (resized / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None], dtype=np.float32)


def _axis_weights(start: np.ndarray, size: np.ndarray, length: int, output: int, ratio: int) -> np.ndarray:
    """(R, output, length) float32: per ROI and bin, the mean bilinear weight of each cell over the bin's
    `ratio` samples along one axis, as torchvision's roi_align places and interpolates them (float32 maths).

    Sample i of bin p sits at `start + p * bin + (i + 0.5) * bin / ratio`; one below -1 or above `length`
    weighs nothing; else it is clamped to >= 0 and split between floor and floor + 1 (the last cell takes all).
    """
    bin_size = size / np.float32(output)  # (R,)
    steps = np.arange(output, dtype=np.float32)[:, None]
    offsets = (np.arange(ratio, dtype=np.float32) + np.float32(0.5))[None, :]
    bins = bin_size[:, None, None]
    coords = (start[:, None, None] + steps * bins) + offsets * bins / np.float32(ratio)  # (R, output, ratio)
    outside = (coords < -1) | (coords > length)
    coords = np.maximum(coords, np.float32(0))
    low = np.floor(coords).astype(np.int64)
    last = low >= length - 1
    low = np.where(last, length - 1, low)
    high = np.where(last, low, low + 1)
    frac = np.where(last, np.float32(0), coords - low.astype(np.float32))
    keep = ~outside
    cells = np.arange(length)
    weights = ((low[..., None] == cells) * ((np.float32(1) - frac) * keep)[..., None]).astype(np.float32)
    weights += (high[..., None] == cells) * (frac * keep)[..., None]
    return weights.sum(axis=2, dtype=np.float32) / np.float32(ratio)


def roi_align(
    features: np.ndarray,
    boxes: np.ndarray,
    output_size: int = ROI_OUTPUT,
    spatial_scale: float = 1.0,
    sampling_ratio: int = ROI_SAMPLING,
) -> np.ndarray:
    """torchvision.ops.roi_align (aligned=False, a fixed sampling ratio) of every box at once.

    `features` (C, H, W); `boxes` (R, 4) `[x0, y0, x1, y1]` in the frame `spatial_scale` maps onto the map.
    Per box: start = coord * scale, size = max(end - start, 1), bins of size / output. Bilinear sampling is
    separable: each bin weighs the map's cells by the outer product of per-axis mean weights, and one matrix
    product gives every bin of every box: (R, C, output, output) float32.
    """
    rois = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32(spatial_scale)
    _, height, width = features.shape
    size_w = np.maximum(rois[:, 2] - rois[:, 0], np.float32(1))
    size_h = np.maximum(rois[:, 3] - rois[:, 1], np.float32(1))
    wx = _axis_weights(rois[:, 0], size_w, width, output_size, sampling_ratio)  # (R, Q, W)
    wy = _axis_weights(rois[:, 1], size_h, height, output_size, sampling_ratio)  # (R, P, H)
    taps = (wy[:, :, None, :, None] * wx[:, None, :, None, :]).reshape(-1, height * width)  # (R*P*Q, H*W)
    bins = taps @ features.astype(np.float32).reshape(len(features), height * width).T  # (R*P*Q, C)
    return bins.reshape(len(rois), output_size, output_size, len(features)).transpose(0, 3, 1, 2)


class RoiFeatures:
    """One image's backbone map and its 2048-d RoI features of `[y0, x0, y1, x1]` boxes in image pixels."""

    def __init__(self, feature_map: np.ndarray, image_size: tuple[int, int]) -> None:
        self.feature_map = feature_map  # (2048, 7, 7)
        self.size = image_size

    def __call__(self, boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """(N, 2048) float32: boxes int()-cast, mapped to the 224 frame, RoI-aligned to 3x3 and averaged."""
        yxyx = np.array([[int(v) for v in box] for box in boxes], dtype=np.float64).reshape(-1, 4)
        height, width = self.size
        scale = np.array([RESNET_SIZE / width, RESNET_SIZE / height] * 2)
        rois = (yxyx[:, [1, 0, 3, 2]] * scale).astype(np.float32)  # [x0, y0, x1, y1] in the 224 frame
        pooled = roi_align(self.feature_map, rois, ROI_OUTPUT, FEATURE_GRID / RESNET_SIZE, ROI_SAMPLING)
        return pooled.mean(axis=(2, 3), dtype=np.float32)


class FeatureEngine:
    """The ResNet-50 feature engine: an RGB image in, its RoiFeatures out (one engine run per image)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def from_manifest(
        manifest: Manifest, backend: str = "ort-cpu", threads: int | None = None, precision: str = "fp32"
    ) -> FeatureEngine:
        """Open and verify the feature engine of an engines folder (refused with the export command when absent)."""
        if FEATURES not in manifest.artefacts:
            raise PersenseError(
                f"{manifest.folder}: no ResNet-50 feature engine for --method persense++; export it with "
                f"`persense-export --method persense++ --out {manifest.folder}`"
            )
        name, engine_backend = side_engine_choice(manifest, FEATURES, backend, precision)
        return FeatureEngine(open_engine(manifest, name, engine_backend, threads, io=FEATURES_IO))

    def feature_map(self, image: np.ndarray) -> np.ndarray:
        """(2048, 7, 7) float32 backbone output of an RGB uint8 image."""
        return self.engine.run({"image": resnet_input(image)})["features"][0]

    def roi_features(self, image: np.ndarray) -> RoiFeatures:
        """The image's RoiFeatures (the backbone runs here, once)."""
        return RoiFeatures(self.feature_map(image), image.shape[:2])
