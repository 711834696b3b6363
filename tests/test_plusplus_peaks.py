"""The runtime's NumPy/OpenCV peak_local_max against scikit-image's (identical arrays, order included) on many
random maps: blobs, plateaus and ties, small images, flat images, images smaller than the window."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.feature import peak_local_max as skimage_peaks

from persense.runtime.plusplus.peaks import peak_local_max

CASES = 120  # per kind


def blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Smoothed noise scaled to uint8: many local maxima, plateaus where the quantisation flattens tops."""
    smooth = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), float(rng.uniform(0.7, 4.0)))
    return (smooth / smooth.max() * 255).astype(np.uint8)


def plateaus(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Few grey levels: large equal-valued regions, so every candidate ties with its neighbours."""
    return (rng.integers(0, 4, shape) * 60).astype(np.uint8)


def noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, shape).astype(np.uint8)


def near_flat(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A constant map, half the time with one pixel one level higher."""
    image = np.full(shape, rng.integers(0, 255), np.uint8)
    if rng.random() < 0.5:
        image[rng.integers(0, shape[0]), rng.integers(0, shape[1])] += 1
    return image


def assert_same(image: np.ndarray, min_distance: int, threshold: float) -> None:
    expected = skimage_peaks(image, min_distance=min_distance, threshold_abs=threshold)
    got = peak_local_max(image, min_distance, threshold)
    assert got.dtype == np.int64 and got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("make", [blobs, plateaus, noise, near_flat])
def test_identical_to_scikit_image_on_random_maps(make) -> None:
    rng = np.random.default_rng(7)
    for _ in range(CASES):
        image = make(rng, tuple(int(v) for v in rng.integers(1, 48, 2)))  # many smaller than the 11x11 window
        threshold = float(image.mean() + rng.uniform(-1.0, 2.5) * image.std())
        assert_same(image, 5, threshold)
        assert_same(image, int(rng.integers(1, 8)), threshold)


@pytest.mark.filterwarnings("ignore:When min_distance < 1")
def test_min_distance_zero_and_negative_thresholds_match() -> None:
    """min_distance 0 is a plain threshold; a negative threshold admits zeros, which the wrapped uint8
    negation in scikit-image's sort puts first."""
    rng = np.random.default_rng(3)
    for _ in range(CASES):
        image = plateaus(rng, tuple(int(v) for v in rng.integers(1, 30, 2)))
        assert_same(image, 0, float(rng.integers(-2, 200)))
        assert_same(image, int(rng.integers(1, 6)), -1.0)


def test_large_maps_and_float_images_match() -> None:
    """Hundreds of candidates (scikit-image thins them in batches) and a float32 map."""
    rng = np.random.default_rng(11)
    for size in [(300, 420), (512, 512)]:
        image = blobs(rng, size)
        assert_same(image, 5, float(image.mean()))
        smooth = cv2.GaussianBlur(rng.random(size).astype(np.float32), (0, 0), 2.0)
        assert_same(smooth, 5, float(smooth.mean() + smooth.std()))


def test_literal_rules_on_constructed_maps() -> None:
    image = np.zeros((30, 30), np.uint8)
    image[10, 10], image[10, 14], image[20, 20] = 200, 250, 90
    # (10, 14) is brighter and accepted first; (10, 10) is at Chebyshev distance 4 < 5 and dropped
    np.testing.assert_array_equal(peak_local_max(image, 5, 50.0), [[10, 14], [20, 20]])
    assert len(peak_local_max(image, 5, 90.0)) == 1  # strictly above the threshold
    image[2, 2] = 255
    assert [2, 2] not in peak_local_max(image, 5, 50.0).tolist()  # inside the 5-pixel border
    tie = np.zeros((30, 30), np.uint8)
    tie[15, 12] = tie[15, 15] = 100  # equal values at distance 3: the first in row-major order wins
    np.testing.assert_array_equal(peak_local_max(tie, 5, 0.0), [[15, 12]])
    assert peak_local_max(np.full((30, 30), 9, np.uint8), 5, 0.0).shape == (0, 2)  # flat: no peak
