"""Hypothesis properties of the IDM/PPSM glue on arbitrary maps, sizes, points and counts."""

from __future__ import annotations

import cv2
import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from persense.runtime.errors import PersenseError
from persense.runtime.pipeline.idm import candidate_points
from persense.runtime.pipeline.ppsm import ppsm_threshold, select_points

BOUNDED = settings(max_examples=50, deadline=None)

finite_maps = st.sampled_from([(0.0, 1.0), (-(2.0**100), 2.0**100)]).flatmap(
    lambda bounds: hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
        elements=st.floats(*bounds, width=32),
        fill=st.nothing(),  # draw every element: textured maps with many contours
    )
)
image_sizes = st.tuples(st.integers(1, 120), st.integers(1, 120))
thresholds = st.integers(0, 254)


def external_contour_count(density: np.ndarray, image_size: tuple[int, int], threshold: int) -> int:
    """External contours of the original's eroded binary map, computed the plain way."""
    dm = cv2.resize(density.astype(np.float32), image_size[::-1])
    if dm.max() == dm.min():
        return 0
    gray = ((dm - dm.min()) / (dm.max() - dm.min()) * 255).astype(np.uint8)
    binary = cv2.erode(np.uint8(gray > threshold), np.ones((3, 3), np.uint8))
    return len(cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0])


@BOUNDED
@given(density=finite_maps, image_size=image_sizes, threshold=thresholds)
def test_points_lie_in_the_image_and_cover_every_contour(
    density: np.ndarray, image_size: tuple[int, int], threshold: int
) -> None:
    points = candidate_points(density, image_size, threshold)
    height, width = image_size
    assert points.dtype == np.float64 and points.ndim == 2 and points.shape[1] == 2
    assert np.array_equal(points, np.trunc(points))
    assert ((points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)).all()
    assert len(points) >= external_contour_count(density, image_size, threshold)


@BOUNDED
@given(
    density=finite_maps,
    image_size=image_sizes,
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.tuples(st.integers(0, 23), st.integers(0, 23)),
)
def test_non_finite_maps_raise_only_persense_error(
    density: np.ndarray, image_size: tuple[int, int], bad: float, where: tuple[int, int]
) -> None:
    density = density.copy()
    density[where[0] % density.shape[0], where[1] % density.shape[1]] = bad
    try:
        candidate_points(density, image_size, 30)
    except PersenseError:
        return
    raise AssertionError("a non-finite density map was accepted")


@BOUNDED
@given(
    similarity=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 20), st.integers(1, 20)), elements=st.floats(-1, 1, width=32)
    ),
    fractions=hnp.arrays(
        np.float64, st.tuples(st.integers(0, 30), st.just(2)), elements=st.floats(0, 1, exclude_max=True)
    ),
    count=st.one_of(st.integers(0, 500), st.floats(0, 500)),
)
def test_select_points_is_the_per_point_rule(similarity: np.ndarray, fractions: np.ndarray, count: float) -> None:
    height, width = similarity.shape
    points = fractions * [width, height]  # float (x, y) inside the map
    keep = select_points(points, similarity, count)
    tau = ppsm_threshold(float(similarity.max()), count)
    expected = [bool(similarity[int(y), int(x)] >= tau) for x, y in points]
    assert keep.dtype == bool and keep.tolist() == expected
    if count == 0:
        assert not keep.any()
