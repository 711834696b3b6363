"""The mask stage (masks.rasterise): exactly the boxes, non-empty flags and label map of thresholding every mask
upsampled in full."""

from __future__ import annotations

import numpy as np
import pytest

from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.pipeline.masks import LARGE, rasterise


def oracle(logits: np.ndarray, transform: SamTransform, with_labels: bool):
    """The straightforward way: upsample each whole map, threshold, box the pixels, paint in order."""
    boxes = np.full((len(logits), 4), np.nan)
    labels = np.zeros(transform.original_size, np.uint16)
    areas = np.zeros(len(logits), np.int64)
    for i, low in enumerate(logits):
        with np.errstate(invalid="ignore"):  # 0 x inf in the non-finite cases, as in `rasterise`'s exact taps
            mask = transform.upsample_to_original(low) > 0
        ys, xs = np.nonzero(mask)
        areas[i] = len(ys)
        if len(ys):
            boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
        labels[mask] = i + 1  # a later instance wins overlaps
    return boxes, ~np.isnan(boxes[:, 0]), labels if with_labels else None, areas


def object_logits(count: int, seed: int, radius: float = 10.0, noise: float = 0.3) -> np.ndarray:
    """Object-sized masks: discs of `radius` low-res cells with noisy edges, anywhere in the 256 grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256].astype(np.float32)
    centres = rng.uniform(-5, 260, (count, 2))
    dist = np.sqrt((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2)
    return (radius - dist + rng.normal(0, noise, (count, 256, 256))).astype(np.float32)


def image_logits(count: int, seed: int) -> np.ndarray:
    """Image-sized masks, as random weights give: smooth noise that is positive almost everywhere."""
    rng = np.random.default_rng(seed)
    return (np.kron(rng.normal(0, 1, (count, 64, 64)), np.ones((4, 4))) + 1.5).astype(np.float32)


def random_logits(count: int, seed: int) -> np.ndarray:
    """Unstructured logits around 0: many tiny components, values near 0 everywhere."""
    return (np.random.default_rng(seed).normal(size=(count, 256, 256)) - 1.2).astype(np.float32)


SIZES = [(768, 1024), (333, 517), (1, 7), (50, 3000), (1500, 1031), (97, 61)]
KINDS = {"object": object_logits, "image": image_logits, "random": random_logits}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("with_labels", [True, False])
def test_rasterise_equals_the_full_upsampling_oracle(size, kind, with_labels):
    transform = SamTransform(size)
    logits = KINDS[kind]({"object": 40, "image": 4, "random": 3}[kind], seed=len(size) + size[0])
    got = rasterise(logits, transform, with_labels)
    boxes, valid, labels, areas = oracle(logits, transform, with_labels)
    np.testing.assert_array_equal(got.boxes, boxes)
    np.testing.assert_array_equal(got.valid, valid)
    if with_labels:
        np.testing.assert_array_equal(got.labels, labels)
        np.testing.assert_array_equal(got.areas, areas)  # each whole mask, overlaps with others included
    else:
        assert got.labels is None and got.areas is None


def test_values_on_the_rounding_margin_are_decided_by_the_exact_float32_taps():
    """Logits that put upsampled values within float32 rounding of 0 (exact cancellations and ties)."""
    transform = SamTransform((768, 1024))
    low = np.zeros((3, 256, 256), np.float32)
    low[0, 100:120, 50:90] = 1.0
    low[0, 100:120, 90:130] = -1.0  # an exact 0.5/0.5 cancellation along a column band
    low[1, 10:200:2, :] = 3e-8  # tiny positives next to zeros
    low[2] = np.where(np.indices((256, 256)).sum(axis=0) % 2, 1e-3, -1e-3)  # a checkerboard around 0
    got = rasterise(low, transform, True)
    boxes, valid, labels, areas = oracle(low, transform, True)
    np.testing.assert_array_equal(got.boxes, boxes)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(got.areas, areas)
    assert valid.all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0 weights, as meant
def test_non_finite_logits_give_what_the_full_upsampling_gives():
    transform = SamTransform((333, 517))
    low = object_logits(4, seed=1, radius=30)
    low[0, 60, 70] = np.nan
    low[1, 80, 90] = np.inf
    low[2, 100, 100] = -np.inf
    low[3, 40:45, 40:45] = 3e38  # products overflow float32 range
    got = rasterise(low, transform, True)
    boxes, valid, labels, areas = oracle(low, transform, True)
    np.testing.assert_array_equal(got.boxes, boxes)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(got.areas, areas)


def test_large_and_tiled_masks_mix_with_later_instances_winning():
    """Image-sized maps (labelled whole) between object-sized ones (labelled in tiles) over the same pixels."""
    transform = SamTransform((768, 1024))
    objects = object_logits(6, seed=7, radius=40)
    logits = np.concatenate([objects[:3], image_logits(1, seed=2), objects[3:], -image_logits(1, seed=3)])
    assert (transform.upsampler.tiles.counts(*transform.upsampler.tiles.windows(logits)) > LARGE).sum() >= 1
    got = rasterise(logits, transform, True)
    boxes, valid, labels, areas = oracle(logits, transform, True)
    np.testing.assert_array_equal(got.boxes, boxes)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(got.areas, areas)
    assert len(np.unique(labels)) > 4  # overlaps really happen and several instances remain visible


def test_empty_and_all_negative_stacks():
    transform = SamTransform((64, 80))
    empty = rasterise(np.zeros((0, 256, 256), np.float32), transform, True)
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (64, 80) and not empty.labels.any()
    negative = rasterise(np.full((2, 256, 256), -1.0, np.float32), transform, False)
    assert not negative.valid.any() and np.isnan(negative.boxes).all()
