"""The CounTR counter around an engine: PerSense's CounTR procedure (`CounTR/demo.py`) in NumPy/OpenCV.

Procedure (`load_image` + `run_one_image`), and how it is matched here:
- Image: height 384, width `new_w = 16 * int(W / H * 384 / 16)`, Pillow BILINEAR (torchvision `Resize`
  on a PIL image) reproduced bit-exactly by `resize_bilinear_pil`; `ToTensor` (/255, no mean/std); centre
  zero padding `(384 - new_w) // 2` on each side when narrower than 384.
- Exemplars: the (x0, y0, x1, y1) boxes become `bbox.txt`'s integer (y0, x0, y1, x1) rows (truncated),
  scaled by `384 / H` and `new_w / W` and truncated again; the crop `[y0:y1+1, x0:x1+1]` is resized to 64x64
  as torchvision 0.17's tensor `Resize` does (bilinear with antialias, the PIL-style triangle filter in
  float): here a separable product with weight matrices computed in float32 as torch computes them (equal
  weights), within 1e-6 of torch on [0, 1] pixels (summation order).
  At most `MAX_SHOTS` (5) crops reach the network (the original's `forward_decoder` cap).
- Windows: 384 wide, stride 128, the last one snapped to the right edge, all in ONE engine call. The
  original merges them one by one as `old_left + old_right + old_overlap/2 + new_overlap/2 + new_rest`;
  so a column covered by windows 1..m gets weights 1/2^(m-1), 1/2^(m-1), 1/2^(m-2), ..., 1/2. `blend_windows`
  adds the outputs in window order with these power-of-two weights, which gives bit-identical floats.
- Tiling: if any scaled exemplar is under 10 px in both height and width, the padded image is cut into
  3x3 tiles (`int(h/3)`, `int(w/3)` sizes and offsets, so the last column may be dropped), each resized
  back to the full size (antialiased bilinear) and slid separately; the count is the sum over tiles.
- Count: `sum(density / 60)`, then `e = sum over all rects of sum(density[rect] / 60) / 3` (3 whatever K);
  if `e > 1.8` the count is divided by e. The count stays a float.
- Map for IDM: the padding columns cropped, `cv2.resize` to (W, H) bilinear, min-max normalised.

Quirks of the original kept because they change results (docs/ALGORITHM.md §4):
- exemplar crops and calibration rects ignore the side padding (they index the padded image/map with
  unpadded coordinates);
- the calibration divides by 3 for any number of exemplars and uses all of them (even beyond 5);
- in the tiled branch the calibration and the returned map use only the last (bottom-right) tile's density.
Known divergence: an exemplar crop lying wholly in the side padding (portrait images, through the first
quirk) is all zeros; the exemplar CNN's InstanceNorm then normalises an exactly constant map (conv bias), so
the token is rounding noise amplified by 1/sqrt(eps), different in torch and ONNX Runtime (and across builds).
Counts differ there (4.6% in one random-weights test); a warning is logged. Partly covered crops are fine.
Deliberate differences: a constant density map (0/0 in the original) gives an all-zero map instead of NaN;
the image is the RGB array of the pipeline (the original opens the file with PIL without `convert('RGB')`);
images too tall for a 16-px-wide resize and empty exemplar crops raise PersenseError (the original crashes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from persense.runtime.backends.choice import open_engine
from persense.runtime.backends.engine import Engine
from persense.runtime.counters.base import CountRequest, Density
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.resampling import resize_bilinear_pil
from persense.runtime.geometry.transforms import xyxy_to_yxyx
from persense.runtime.manifest import IoSpec, Manifest, TensorSpec, tensor_names

log = logging.getLogger(__name__)

WINDOW = 384
STRIDE = 128
WIDTH_STEP = 16
EXEMPLAR_SIZE = 64
MAX_SHOTS = 5
MAX_BATCH = 256
COUNT_SCALE = 60.0
CALIBRATION_SHOTS = 3.0
CALIBRATION_LIMIT = 1.8
TINY_EXEMPLAR = 10
IDM_THRESHOLD = 20  # CounTR's own (DSALVANet's is 30)
ARTEFACT = "counter_countr"
# N windows (all of an image's, all 9 tiles' in the tiled branch) and K exemplar crops per call
COUNTR_IO: IoSpec = (
    [
        TensorSpec("windows", ("N", 3, WINDOW, WINDOW), "float32"),
        TensorSpec("exemplars", (1, "K", 3, EXEMPLAR_SIZE, EXEMPLAR_SIZE), "float32"),
    ],
    [TensorSpec("density", ("N", WINDOW, WINDOW), "float32")],
)
INPUT_NAMES = tuple(tensor_names(COUNTR_IO[0]))
OUTPUT_NAMES = tuple(tensor_names(COUNTR_IO[1]))


@dataclass(frozen=True)
class CountrGeometry:
    """Sizes of one image in CounTR's frame and its exemplar rectangles there."""

    height: int
    width: int
    new_w: int
    rects: np.ndarray  # (K, 4) int (y0, x0, y1, x1) inclusive, in the resized frame without the pad offset

    @property
    def pad(self) -> int:
        """Zero columns added on each side when the resized image is narrower than a window."""
        return max(WINDOW - self.new_w, 0) // 2

    @property
    def padded_w(self) -> int:
        """Width of the padded image the windows slide over."""
        return self.new_w + 2 * self.pad

    @property
    def tiny_exemplar(self) -> bool:
        """Whether some exemplar is under 10 px in both directions (the 3x3 tiling branch)."""
        heights, widths = self.rects[:, 2] - self.rects[:, 0], self.rects[:, 3] - self.rects[:, 1]
        return bool(np.any((heights < TINY_EXEMPLAR) & (widths < TINY_EXEMPLAR)))

    @staticmethod
    def of(image_size: tuple[int, int], exemplars: np.ndarray) -> CountrGeometry:
        """Geometry of an (H, W) image and (K, 4) (x0, y0, x1, y1) exemplar boxes in original pixels."""
        height, width = image_size
        new_w = WIDTH_STEP * int((width / height * WINDOW) / WIDTH_STEP)
        if new_w < WIDTH_STEP:
            raise PersenseError(f"image {width}x{height} is too narrow for CounTR (width/height below 1/24)")
        boxes = np.asarray(exemplars, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0 or not np.all(np.isfinite(boxes)):
            raise PersenseError("CounTR needs at least one finite exemplar box")
        scale = np.array([WINDOW / height, new_w / width] * 2)
        rects = np.trunc(np.trunc(xyxy_to_yxyx(boxes)) * scale).astype(np.int64)
        geometry = CountrGeometry(height, width, new_w, rects)
        bad = (
            (rects[:, 0] < 0)
            | (rects[:, 1] < 0)
            | (rects[:, 2] < rects[:, 0])
            | (rects[:, 3] < rects[:, 1])
            | (rects[:, 0] >= WINDOW)
            | (rects[:, 1] >= geometry.padded_w)
        )
        if np.any(bad):
            raise PersenseError(f"exemplar boxes {boxes[bad].tolist()} are empty or outside the {width}x{height} image")
        return geometry


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of antialiased bilinear resampling, in float32 like torch `interpolate(antialias=True)`."""
    scale = np.float32(in_size / out_size)
    inverse = np.float32(1) / scale if scale >= 1 else np.float32(1)
    centers = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
    distance = (np.arange(in_size, dtype=np.float32)[None, :] + np.float32(0.5) - centers[:, None]) * inverse
    weights = np.clip(np.float32(1) - np.abs(distance), np.float32(0), None)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a (C, h, w) float32 image to (C, height, width) with antialiased bilinear weights."""
    rows = resize_matrix(image.shape[1], height)
    cols = resize_matrix(image.shape[2], width)
    return np.matmul(np.matmul(rows, image), cols.T)


def prepare_image(image_rgb: np.ndarray, geometry: CountrGeometry) -> np.ndarray:
    """(3, 384, padded_w) float32 in [0, 1]: Pillow-exact resize to height 384, centre zero padding."""
    resized = resize_bilinear_pil(np.ascontiguousarray(image_rgb), WINDOW, geometry.new_w)
    out = np.zeros((3, WINDOW, geometry.padded_w), dtype=np.float32)
    out[:, :, geometry.pad : geometry.pad + geometry.new_w] = resized.transpose(2, 0, 1).astype(np.float32) / 255
    return out


def exemplar_crops(image: np.ndarray, geometry: CountrGeometry) -> np.ndarray:
    """(1, K, 3, 64, 64) crops of the padded image at the (unpadded) rects, at most MAX_SHOTS of them."""
    crops = np.stack(
        [
            resize_aa(image[:, y0 : y1 + 1, x0 : x1 + 1], EXEMPLAR_SIZE, EXEMPLAR_SIZE)
            for y0, x0, y1, x1 in geometry.rects[:MAX_SHOTS]
        ]
    )
    blank = ~crops.reshape(len(crops), -1).any(axis=1)
    if blank.any():
        log.warning(
            "CounTR exemplar crops %s are blank (in the side padding, as the original crops without "
            "the pad offset): their tokens are numerically undefined in the original",
            np.flatnonzero(blank).tolist(),
        )
    return crops[None]


def tile_origins(height: int, width: int) -> list[tuple[int, int]]:
    """(top, left) of the 3x3 tiles in row-major order; each tile is int(height/3) x int(width/3)."""
    rows = (0, int(height / 3), int(height * 2 / 3))
    cols = (0, int(width / 3), int(width * 2 / 3))
    return [(top, left) for top in rows for left in cols]


def tile_images(image: np.ndarray) -> list[np.ndarray]:
    """The 9 tiles of a (3, h, w) image, each resized back to (3, h, w)."""
    _, h, w = image.shape
    return [
        resize_aa(image[:, top : top + int(h / 3), left : left + int(w / 3)], h, w) for top, left in tile_origins(h, w)
    ]


def window_starts(width: int) -> np.ndarray:
    """Left edges of the windows over a width >= 384: stride 128, the last one flush with the right edge."""
    starts = list(range(0, width - WINDOW + 1, STRIDE))
    if starts[-1] != width - WINDOW:
        starts.append(width - WINDOW)
    return np.array(starts)


def blend_weights(starts: np.ndarray, width: int) -> np.ndarray:
    """(N, width) weight of each window per column: 1/2 per later window covering it, 1/2 if an earlier one did."""
    columns = np.arange(width)
    cover = (columns >= starts[:, None]) & (columns < starts[:, None] + WINDOW)
    later = np.cumsum(cover[::-1], axis=0)[::-1] - cover
    earlier = np.cumsum(cover, axis=0) - cover
    return np.where(cover, 0.5**later * np.where(earlier > 0, 0.5, 1.0), 0.0).astype(np.float32)


def blend_windows(outputs: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Merge (N, 384, 384) window densities into (384, width) exactly as the original's sequential halving."""
    weights = blend_weights(starts, width)
    density = np.zeros((outputs.shape[1], width), dtype=np.float32)
    for output, start, weight in zip(outputs, starts, weights):
        density[:, start : start + WINDOW] += output * weight[start : start + WINDOW]
    return density


def density_count(density: np.ndarray) -> float:
    """CounTR's count of a density map: sum(density / 60)."""
    return float(np.sum(density / np.float32(COUNT_SCALE), dtype=np.float64))


def calibrate(count: float, density: np.ndarray, rects: np.ndarray) -> float:
    """Divide the count by the mean exemplar count (over 3) when that exceeds 1.8."""
    shots = sum(density_count(density[y0 : y1 + 1, x0 : x1 + 1]) for y0, x0, y1, x1 in rects) / CALIBRATION_SHOTS
    return count / shots if shots > CALIBRATION_LIMIT else count


def idm_map(density: np.ndarray, geometry: CountrGeometry) -> np.ndarray:
    """The map IDM gets: padding columns cropped, bilinear resize to (H, W), min-max normalised (float32)."""
    crop = np.ascontiguousarray(density[:, geometry.pad : geometry.pad + geometry.new_w], dtype=np.float32)
    resized = cv2.resize(crop, (geometry.width, geometry.height), interpolation=cv2.INTER_LINEAR)
    low, high = resized.min(), resized.max()
    return (resized - low) / (high - low) if high > low else np.zeros_like(resized)


class CountrCounter:
    """PerSense's CounTR counter: every window of an image (all 9 tiles' in the tiled branch) in one engine call."""

    name = "countr"

    def __init__(self, engine: Engine) -> None:
        names = {spec.name for spec in engine.inputs}
        if not set(INPUT_NAMES) <= names:
            raise PersenseError(
                f"engine inputs {sorted(names)} are not CounTR's {list(INPUT_NAMES)}; "
                "re-export the counter with `persense-export`"
            )
        self.engine = engine

    @staticmethod
    def from_manifest(manifest: Manifest, backend: str = "ort-cpu", threads: int | None = None) -> CountrCounter:
        """Open and verify the `counter_countr` engine of an engines folder on `backend` (the side models')."""
        return CountrCounter(open_engine(manifest, ARTEFACT, backend, threads, io=COUNTR_IO))

    def densities(self, planes: list[np.ndarray], crops: np.ndarray) -> list[np.ndarray]:
        """Merged (384, w) density of each (3, 384, w) plane, from one batched engine call."""
        width = planes[0].shape[-1]
        starts = window_starts(width)
        windows = np.stack([plane[:, :, start : start + WINDOW] for plane in planes for start in starts])
        outputs = self.engine.run({"windows": windows, "exemplars": crops})[OUTPUT_NAMES[0]]
        return [blend_windows(chunk, starts, width) for chunk in np.split(outputs, len(planes))]

    def count(self, request: CountRequest) -> Density:
        """Density map for IDM (normalised, H x W), the calibrated float count and IDM threshold 20."""
        geometry = CountrGeometry.of(request.image.shape[:2], request.exemplars)
        image = prepare_image(request.image, geometry)
        planes = tile_images(image) if geometry.tiny_exemplar else [image]
        densities = self.densities(planes, exemplar_crops(image, geometry))
        count = sum(density_count(d) for d in densities)
        count = calibrate(count, densities[-1], geometry.rects)
        return Density(idm_map(densities[-1], geometry), float(count), IDM_THRESHOLD)
