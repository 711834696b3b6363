"""PPSM: the count-adaptive threshold and the vectorised keep-mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from persense.runtime.errors import PersenseError
from persense.runtime.pipeline.ppsm import ppsm_threshold, select_points


def torch_style_threshold(s_max: float, count: float) -> np.float32:
    """The original's float32 arithmetic: S_max / sqrt(4) or S_max / (count / sqrt(2))."""
    a = np.sqrt(np.float32(4)) if count == 1 else np.float32(count) / np.sqrt(np.float32(2))
    return np.float32(s_max) / a


def test_threshold_count_zero_is_infinite() -> None:
    assert ppsm_threshold(0.9, 0) == math.inf
    assert ppsm_threshold(-0.3, 0.0) == math.inf


@pytest.mark.parametrize(
    ("count", "factor"),
    [
        (1, 0.5),
        (1.0, 0.5),
        (2, 1 / math.sqrt(2)),
        (3, math.sqrt(2) / 3),
        (1.5, math.sqrt(2) / 1.5),
        (0.5, 2 * math.sqrt(2)),
        (47, math.sqrt(2) / 47),
    ],
)
def test_threshold_formula(count: float, factor: float) -> None:
    tau = ppsm_threshold(0.8, count)
    assert isinstance(tau, float)
    assert tau == pytest.approx(0.8 * factor, rel=1e-6)
    assert tau == float(torch_style_threshold(0.8, count))  # bit-exact float32, as the original


def test_threshold_count_two_is_stricter_than_one() -> None:
    assert ppsm_threshold(1.0, 2) > ppsm_threshold(1.0, 1)
    assert ppsm_threshold(1.0, 1.2) > 1.0  # fractional counts below sqrt(2): nothing can pass


@pytest.mark.parametrize("count", [math.nan, math.inf, -math.inf])
def test_threshold_rejects_non_finite_counts(count: float) -> None:
    with pytest.raises(PersenseError, match="count"):
        ppsm_threshold(1.0, count)


@pytest.mark.parametrize("count", [-1.0, -0.5, -457.56])
def test_negative_counts_follow_the_original_formula(count: float) -> None:
    expected = np.float32(0.8) / (np.float32(count) / np.sqrt(np.float32(2.0)))
    assert ppsm_threshold(0.8, count) == float(expected) and expected < 0


def make_similarity(s_max: float = 0.8) -> np.ndarray:
    """A 6x8 float32 map with its maximum at (x=7, y=5) and small values elsewhere."""
    sim = np.linspace(-0.5, 0.1, 48, dtype=np.float32).reshape(6, 8)
    sim[5, 7] = s_max
    return sim


def test_keeps_exactly_at_threshold_and_drops_one_ulp_below() -> None:
    sim = make_similarity()
    tau = np.float32(ppsm_threshold(0.8, 2))
    sim[1, 2] = tau
    sim[3, 4] = np.nextafter(tau, np.float32(-1))
    sim[0, 0] = np.nextafter(tau, np.float32(1))
    keep = select_points(np.array([[2, 1], [4, 3], [0, 0], [7, 5]]), sim, 2)
    np.testing.assert_array_equal(keep, [True, False, True, True])


def test_order_preserved_and_matches_per_point_rule() -> None:
    rng = np.random.default_rng(3)
    sim = rng.uniform(-1, 1, (30, 40)).astype(np.float32)
    points = np.stack([rng.integers(0, 40, 200), rng.integers(0, 30, 200)], axis=1)
    for count in (1, 2, 3, 7.5):
        tau = ppsm_threshold(float(sim.max()), count)
        keep = select_points(points, sim, count)
        assert keep.dtype == bool and keep.shape == (200,)
        np.testing.assert_array_equal(keep, [sim[y, x] >= tau for x, y in points])
        np.testing.assert_array_equal(select_points(points[::-1], sim, count), keep[::-1])


def test_count_one_keeps_above_half_max() -> None:
    sim = make_similarity(1.0)
    sim[2, 3] = 0.5
    sim[2, 4] = 0.49
    np.testing.assert_array_equal(select_points(np.array([[3, 2], [4, 2], [7, 5]]), sim, 1), [True, False, True])


def test_count_zero_keeps_nothing_even_for_negative_maps() -> None:
    sim = np.full((4, 4), -0.5, np.float32)
    assert not select_points(np.array([[0, 0], [3, 3]]), sim, 0).any()


def test_float_points_are_truncated() -> None:
    sim = np.zeros((5, 5), np.float32)
    sim[3, 2] = 1.0  # row y=3, column x=2
    np.testing.assert_array_equal(
        select_points(np.array([[2.9, 3.7], [3.1, 2.9], [-0.5, 0.2]]), sim, 1), [True, False, False]
    )


@pytest.mark.parametrize("points", [np.empty((0, 2)), [], np.empty((0, 2), np.int64)])
def test_zero_points_give_empty_mask(points: np.ndarray) -> None:
    keep = select_points(points, make_similarity(), 3)
    assert keep.shape == (0,) and keep.dtype == bool


@pytest.mark.parametrize("point", [[8, 0], [0, 6], [-1, 0], [0, -2]])
def test_points_outside_the_map_raise(point: list[int]) -> None:
    with pytest.raises(PersenseError, match="outside"):
        select_points(np.array([[1, 1], point]), make_similarity(), 2)


def test_bad_inputs_raise() -> None:
    with pytest.raises(PersenseError, match=r"\(N, 2\)"):
        select_points(np.zeros((3, 3)), make_similarity(), 2)
    with pytest.raises(PersenseError, match="2-D"):
        select_points(np.zeros((1, 2)), np.zeros((1, 6, 8)), 2)
    with pytest.raises(PersenseError, match="NaN or inf"):
        select_points(np.array([[np.nan, 1.0]]), make_similarity(), 2)
    with pytest.raises(PersenseError, match="count"):
        select_points(np.zeros((1, 2)), make_similarity(), math.nan)


def test_huge_coordinates_raise_cleanly() -> None:
    with pytest.raises(PersenseError, match="outside"):
        select_points(np.array([[1e300, 0.0]]), make_similarity(), 2)


def test_idm_points_feed_ppsm() -> None:
    from persense.runtime.pipeline.idm import candidate_points

    yy, xx = np.mgrid[0:40, 0:60].astype(np.float32)
    density = np.exp(-((xx - 15) ** 2 + (yy - 20) ** 2) / 8) + np.exp(-((xx - 45) ** 2 + (yy - 20) ** 2) / 8)
    similarity = np.where(xx < 30, np.float32(0.9), np.float32(0.2))  # the left object looks like the reference
    points = candidate_points(density, (40, 60), 30)
    kept = points[select_points(points, similarity, 2)]
    assert len(kept) == 1 and np.abs(kept[0] - [15, 20]).max() <= 1


def test_second_detection_boxes_gate_points_edges_included() -> None:
    """persense.py point_prompt_select with text: keep a point iff sim >= tau and some box has
    x0 <= x <= x1 and y0 <= y <= y1 (float32 box, integer point); no box keeps nothing."""
    similarity = np.ones((20, 30), np.float32)
    points = np.array([[5, 5], [10, 10], [10.9, 4.0], [11, 10], [29, 19]])
    boxes = np.array([[5, 5, 10, 10], [29, 19, 29, 19]], np.float32)
    assert select_points(points, similarity, 1, boxes).tolist() == [True, True, False, False, True]
    assert select_points(points, similarity, 1, np.array([[5, 3.5, 10.5, 10]], np.float32)).tolist() == [
        True,
        True,
        True,  # x 10.9 truncates to 10, y 4 >= 3.5
        False,
        False,
    ]
    assert not select_points(points, similarity, 1, np.zeros((0, 4), np.float32)).any()
    assert select_points(points, similarity, 1, None).all()
    similarity[10, 10] = 0.1  # below tau = max/2: the box does not rescue it
    assert select_points(points, similarity, 1, boxes).tolist() == [True, False, False, False, True]


@pytest.mark.parametrize("seed", range(20))
def test_gated_selection_equals_the_per_point_original(seed: int) -> None:
    import torch

    from persense.export.oracle.glue import ppsm_points

    rng = np.random.default_rng(seed)
    similarity = rng.random((40, 60)).astype(np.float32)
    points = rng.integers(0, [60, 40], size=(25, 2))
    boxes = np.sort(rng.uniform(0, 60, (3, 2, 2)), axis=1).transpose(0, 2, 1).reshape(3, 4)[:, [0, 2, 1, 3]]
    count = float(rng.integers(1, 6))
    kept = points[select_points(points, similarity, count, boxes.astype(np.float32))]
    assert [tuple(p) for p in kept.tolist()] == ppsm_points(torch.as_tensor(similarity), points, count, boxes)
