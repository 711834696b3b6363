"""IDM: blob centres on synthetic density maps, composite splitting, degenerate maps, and bit-equality
with a literal transcription of the original algorithm."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from persense.export.oracle.glue import idm_points as original_idm
from persense.runtime.errors import PersenseError
from persense.runtime.pipeline.idm import candidate_points


def gaussians(shape: tuple[int, int], centres: np.ndarray, sigma: float, amps: np.ndarray | None = None) -> np.ndarray:
    """Sum of isotropic Gaussian blobs at (x, y) centres, float32."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    amps = np.ones(len(centres)) if amps is None else amps
    out = np.zeros(shape, np.float32)
    for (x, y), a in zip(centres, amps):
        out += np.float32(a) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / np.float32(2 * sigma**2))
    return out


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """Flat-topped blobs: filled discs softened by a small Gaussian blur, float32."""
    out = np.zeros(shape, np.float32)
    for x, y in centres:
        cv2.circle(out, (x, y), radius, 1.0, thickness=-1)
    return cv2.GaussianBlur(out, (0, 0), 1.0)


def grid_centres(rows: int, cols: int, step: float, offset: float) -> np.ndarray:
    """(x, y) centres on a regular grid."""
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs.ravel() * step + offset, ys.ravel() * step + offset], axis=1).astype(np.float64)


def nearest(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distance from each point to its nearest target."""
    return np.linalg.norm(points[:, None, :] - targets[None, :, :], axis=2).min(axis=1)


def test_separated_blobs_same_size() -> None:
    centres = grid_centres(4, 5, 20.0, 12.0)
    points = candidate_points(gaussians((90, 110), centres, 2.5), (90, 110), 30)
    assert points.dtype == np.float64 and points.shape[1] == 2
    assert len(points) >= len(centres)
    assert nearest(centres, points).max() <= 1.5  # every blob found
    assert nearest(points, centres).max() <= 1.5  # no spurious points


def test_low_res_density_mapped_to_larger_image() -> None:
    centres = grid_centres(3, 4, 16.0, 10.0)  # density pixels of a 64x56 map
    scale_x, scale_y = 640 / 64, 448 / 56
    points = candidate_points(gaussians((56, 64), centres, 2.0), (448, 640), 30)
    # cv2.resize maps pixel centres: x_img = (x + 0.5) * scale - 0.5
    truth = (centres + 0.5) * [scale_x, scale_y] - 0.5
    assert nearest(truth, points).max() <= 2.0
    assert nearest(points, truth).max() <= 2.0


def test_touching_blobs_are_split_into_children() -> None:
    singles = [(12 + 25 * i, 12) for i in range(8)]
    pair = [(30, 50), (46, 50)]  # two discs of radius 8 touching: one contour twice the usual area
    density = discs((70, 210), singles + pair, 8)
    points = candidate_points(density, (70, 210), 30)
    assert len(points) == 2 + 9  # two children first, then one centroid per contour (8 singles + pair)
    assert nearest(np.array(pair, float), points[:2]).max() <= 2.0
    assert nearest(np.array(singles, float), points[2:]).max() <= 1.5  # the singles' centroids
    assert nearest(np.array([[38.0, 50.0]]), points[2:]).min() <= 1.0  # the composite's own centroid


def test_three_blob_chain_children_near_each_centre() -> None:
    singles = [(12 + 25 * i, 12) for i in range(10)]
    cluster = [(40, 52), (56, 52), (72, 53)]  # a chain of three touching discs
    points = candidate_points(discs((90, 260), singles + cluster, 8), (90, 260), 30)
    assert len(points) == 3 + 11
    assert nearest(np.array(cluster, float), points[:3]).max() <= 2.0


def test_one_huge_blob_gives_its_centre() -> None:
    points = candidate_points(gaussians((101, 151), np.array([[70.0, 45.0]]), 15.0), (101, 151), 30)
    np.testing.assert_array_equal(points, [[70.0, 45.0]])


def test_huge_blob_among_small_ones_is_split_to_one_child() -> None:
    small = grid_centres(2, 8, 15.0, 8.0)
    density = gaussians((160, 130), small, 2.0) + gaussians((160, 130), np.array([[64.0, 100.0]]), 12.0)
    points = candidate_points(density, (160, 130), 30)
    assert len(points) == len(small) + 2  # one child for the big blob, then every contour's centroid
    assert np.abs(points[0] - [64, 100]).max() <= 1.0


@pytest.mark.parametrize("density", [np.zeros((32, 32)), np.full((9, 7), 3.5), np.zeros((0, 0)), np.zeros((0, 5))])
def test_no_contrast_gives_empty(density: np.ndarray) -> None:
    points = candidate_points(density, (48, 40), 30)
    assert points.shape == (0, 2) and points.dtype == np.float64


def test_threshold_above_everything_gives_empty() -> None:
    assert candidate_points(gaussians((20, 20), np.array([[10.0, 10.0]]), 3.0), (20, 20), 255).shape == (0, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_density_raises(bad: float) -> None:
    density = np.ones((16, 16))
    density[3, 4] = bad
    with pytest.raises(PersenseError, match="NaN or inf"):
        candidate_points(density, (16, 16), 30)


@pytest.mark.parametrize("shape", [(16,), (1, 16, 16), (16, 16, 1), ()])
def test_non_2d_density_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(PersenseError, match="2-D"):
        candidate_points(np.ones(shape), (16, 16), 30)


def test_bad_image_size_raises() -> None:
    with pytest.raises(PersenseError, match="positive"):
        candidate_points(np.ones((4, 4)), (0, 16), 30)


def test_zero_area_contour_gives_origin() -> None:
    density = np.zeros((20, 20), np.float32)
    density[5:8, 10:13] = 1.0  # a 3x3 square erodes to one pixel: a zero-area contour
    np.testing.assert_array_equal(candidate_points(density, (20, 20), 30), [[0.0, 0.0]])


def test_small_contour_integer_centroid_drops_one_pixel_like_the_original() -> None:
    # A symmetric contour of area 14 centred on (15, 20): m00 + 1e-15 > m00 below area 16, so the
    # original's int(m10 / (m00 + eps)) gives 14.999... -> 14. Kept for parity.
    yy, xx = np.mgrid[0:40, 0:30].astype(np.float32)
    density = np.exp(-((xx - 15) ** 2 + (yy - 20) ** 2) / 8)
    np.testing.assert_array_equal(candidate_points(density, (40, 30), 30), [[14.0, 19.0]])


def test_integer_density_accepted() -> None:
    density = np.zeros((20, 30), np.uint8)
    density[4:12, 6:16] = 200
    np.testing.assert_array_equal(candidate_points(density, (20, 30), 30), original_idm(density, (20, 30), 30)[0])


def random_density(rng: np.random.Generator) -> np.ndarray:
    """A low-res density with random blobs (some overlapping, some at the border) plus faint noise."""
    h, w = (int(v) for v in rng.integers(15, 90, size=2))
    n = int(rng.integers(1, 40))
    centres = np.stack([rng.uniform(-2, w + 2, n), rng.uniform(-2, h + 2, n)], axis=1)
    density = gaussians((h, w), centres, float(rng.uniform(0.8, 4.0)), rng.uniform(0.2, 1.0, n))
    if rng.random() < 0.5:  # a few big blobs make composite contours likely
        big = np.stack([rng.uniform(0, w, 2), rng.uniform(0, h, 2)], axis=1)
        density += gaussians((h, w), big, float(rng.uniform(4.0, 9.0)))
    return density + rng.uniform(0, 0.05, density.shape).astype(np.float32)


def test_matches_original_on_random_maps() -> None:
    # Seed 1234 includes a composite whose distance transform, cropped at an unaligned column, differs
    # from the full-image one by one ulp and moves a child centroid by a pixel (OpenCV's IPP path).
    rng = np.random.default_rng(1234)
    with_children = 0
    for _ in range(120):
        density = random_density(rng)
        if rng.random() < 0.3:
            size = density.shape
        else:
            size = (int(rng.integers(11, 301)) | 1, int(rng.integers(11, 301)) | 1)  # odd sizes
        threshold = int(rng.choice([20, 30, 60]))
        expected, n_children = original_idm(density, size, threshold)
        np.testing.assert_array_equal(candidate_points(density, size, threshold), expected)
        with_children += n_children > 0
    assert with_children >= 30  # the composite path was exercised


def test_matches_original_on_noise_maps() -> None:
    rng = np.random.default_rng(99)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(3, 40, size=2))
        density = rng.random((h, w)).astype(np.float32) ** 3
        size = (int(rng.integers(5, 200)), int(rng.integers(5, 200)))
        for threshold in (20, 30):
            np.testing.assert_array_equal(
                candidate_points(density, size, threshold), original_idm(density, size, threshold)[0]
            )


@pytest.mark.parametrize("y", [3, 40, 69])  # cut by the top edge, inside, cut by the bottom edge
def test_composite_at_every_column_offset_matches_original(y: int) -> None:
    singles = [(10 + 20 * i, 20) for i in range(7)] + [(10 + 20 * i, 55) for i in range(7)]
    for x in range(-10, 120):  # every alignment, cut by the left image edge through cut by the right one
        density = discs((72, 136), singles + [(x, y), (x + 12, y + 3), (x + 24, y)], 7)
        expected, n_children = original_idm(density, (72, 136), 30)
        assert n_children >= 1
        np.testing.assert_array_equal(candidate_points(density, (72, 136), 30), expected)
