"""persense.runtime.metrics against literal statements on constructed cases: mask IoU (one pair, stacks, eval_miou's
summed form), cosine similarity and the latency percentiles."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from persense.runtime.metrics import (
    cosine,
    latency_summary,
    mask_iou,
    mask_ious,
    mean_mask_iou,
    midpoint_median,
    percentile,
    summed_iou,
)


def _rows(first: int, last: int, size: int = 4) -> np.ndarray:
    """A size x size bool mask with rows first..last (inclusive) set."""
    mask = np.zeros((size, size), bool)
    mask[first : last + 1] = True
    return mask


TOP, MIDDLE, BOTTOM, EMPTY = _rows(0, 1), _rows(1, 2), _rows(3, 3), np.zeros((4, 4), bool)


def test_mask_iou_of_known_overlap():
    assert mask_iou(TOP, MIDDLE) == 4 / 12  # 8 + 8 pixels, one shared row of 4
    assert mask_iou(TOP, TOP) == 1.0
    assert mask_iou(TOP, BOTTOM) == 0.0
    assert mask_iou(TOP, EMPTY) == 0.0
    assert mask_iou(TOP.astype(np.uint8) * 255, MIDDLE.astype(np.uint8)) == 4 / 12  # nonzero is inside


def test_mask_iou_of_two_empty_masks_is_the_given_convention():
    assert mask_iou(EMPTY, EMPTY) == 1.0
    assert mask_iou(EMPTY, EMPTY, empty=0.0) == 0.0
    assert isinstance(mask_iou(TOP, MIDDLE), float)


def test_mask_ious_per_mask_of_a_stack():
    a, b = np.stack([TOP, EMPTY, TOP]), np.stack([MIDDLE, EMPTY, BOTTOM])
    ious = mask_ious(a, b)
    assert ious.dtype == np.float64 and ious.shape == (3,)
    assert ious.tolist() == [4 / 12, 1.0, 0.0]
    assert mask_ious(a, b, empty=0.0).tolist() == [4 / 12, 0.0, 0.0]
    assert mask_ious(np.stack([a, a]), np.stack([b, b])).tolist() == [4 / 12, 1.0, 0.0] * 2  # leading axes flatten


def test_mean_mask_iou_thresholds_logits_at_zero():
    ref = np.where(np.stack([TOP, EMPTY, TOP]), 1.0, -1.0).astype(np.float32)
    got = np.where(np.stack([MIDDLE, EMPTY, BOTTOM]), 2.0, -3.0).astype(np.float32)
    assert mean_mask_iou(ref, got) == np.mean([4 / 12, 1.0, 0.0])
    assert mean_mask_iou(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))) == 1.0  # logit 0 is outside: both empty


def test_summed_iou_is_eval_miou_formula():
    assert summed_iou(5, 8) == 5 / (8 + 1e-10)
    assert summed_iou(0, 0) == 0.0  # both empty: 0 / (0 + 1e-10)
    assert summed_iou(4, 4) < 1.0


def test_cosine_of_constructed_vectors():
    x, y = np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])
    assert cosine(x, y) == 0.0  # orthogonal
    assert cosine(x, 3 * x) == 1.0  # parallel, any length
    assert cosine(x, -x) == -1.0  # opposite
    assert cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(math.sqrt(0.5), abs=1e-15)  # 45 degrees
    assert cosine(np.eye(2), np.array([[1.0, 0.0], [0.0, -1.0]])) == 0.0  # arrays are flattened


def test_cosine_is_computed_in_float64():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(1000, dtype=np.float32), rng.standard_normal(1000, dtype=np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert cosine(a, b) == float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def test_cosine_of_a_zero_vector_is_the_given_convention():
    zero, x = np.zeros(3), np.array([1.0, 2.0, 3.0])
    assert cosine(zero, zero) == 1.0 and cosine(zero, x) == 1.0  # parity's convention: either norm 0 -> 1
    assert cosine(zero, x, zero=0.0) == 0.0
    with np.errstate(invalid="ignore"):
        assert math.isnan(cosine(zero, x, zero=None))  # no guard: 0 / 0


def test_percentile_is_numpy_linear_interpolation():
    samples = [4.0, 1.0, 3.0, 2.0]
    assert percentile(samples, 50) == 2.5  # halfway between 2 and 3
    assert percentile(samples, 90) == pytest.approx(3.7, abs=1e-12)  # position 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(samples, 0) == 1.0 and percentile(samples, 100) == 4.0
    rng = np.random.default_rng(1)
    values = rng.random(11) * 100
    for q in (10, 50, 90):
        assert percentile(values, q) == float(np.percentile(values, q, method="linear"))


def test_midpoint_median_against_percentile():
    assert midpoint_median([3.0, 1.0, 2.0]) == percentile([3.0, 1.0, 2.0], 50) == 2.0  # odd count: the middle one
    samples = [13.51, 72.149]
    assert midpoint_median(samples) == (13.51 + 72.149) / 2 == statistics.median(samples)
    assert percentile(samples, 50) == 72.149 - (72.149 - 13.51) / 2  # numpy's lerp from the upper side
    assert midpoint_median(samples) != percentile(samples, 50)  # one bit apart, and it shows after rounding:
    assert (round(midpoint_median(samples), 3), round(percentile(samples, 50), 3)) == (42.83, 42.829)


def test_latency_summary():
    summary = latency_summary([4.0, 1.0, 3.0, 2.0])
    assert list(summary) == ["p50", "p90", "min", "max"]
    assert summary == {"p50": 2.5, "p90": 3.7, "min": 1.0, "max": 4.0}
    assert latency_summary([1.0004, 1.0016], digits=3) == {"p50": 1.001, "p90": 1.001, "min": 1.0, "max": 1.002}
    assert latency_summary([1.0004, 1.0016], digits=1) == {"p50": 1.0, "p90": 1.0, "min": 1.0, "max": 1.0}
    assert latency_summary([13.51, 72.149])["p50"] == 42.829
    assert latency_summary([13.51, 72.149], midpoint=True)["p50"] == 42.83
    assert latency_summary(np.array([13.51, 72.149]), midpoint=True)["p50"] == 42.83
