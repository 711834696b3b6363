"""Hypothesis properties of SAM's preprocessing, coordinate frames and mask upsampling over arbitrary sizes."""

from __future__ import annotations

from unittest import mock

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
import torch.nn.functional as F
from conftest import positive_window
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from persense.runtime.geometry import resampling as resize
from persense.runtime.geometry.axis_taps import AxisTaps
from persense.runtime.geometry.resampling import bilinear_matrix, resize_bilinear, resize_bilinear_pil
from persense.runtime.geometry.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    SamTransform,
    preprocess_shape,
    xyxy_to_yxyx,
)

BOUNDED = settings(max_examples=50, deadline=None)

sides = st.integers(1, 1200)
sizes = st.tuples(sides, sides)
long_sides = st.sampled_from([1024, 512, 64, 7])
small_images = st.integers(1, 48).flatmap(
    lambda h: st.integers(1, 48).flatmap(
        lambda w: st.sampled_from([(h, w), (h, w, 3)]).flatmap(lambda shape: hnp.arrays(np.uint8, shape))
    )
)
logits = hnp.arrays(np.float32, (256, 256), elements=st.floats(-30, 30, width=32))


def pillow_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's BILINEAR resize of a uint8 grey or RGB array."""
    return np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def postprocess_masks(low_res: np.ndarray, transform: SamTransform) -> np.ndarray:
    """segment-anything's Sam.postprocess_masks on one map: bilinear to the square, crop, bilinear to the image."""
    square = transform.long_side
    in_h, in_w = transform.input_size
    tensor = F.interpolate(
        torch.as_tensor(low_res)[None, None], (square, square), mode="bilinear", align_corners=False
    )[..., :in_h, :in_w]
    return F.interpolate(tensor, transform.original_size, mode="bilinear", align_corners=False)[0, 0].numpy()


@BOUNDED
@given(size=sizes, long_side=long_sides)
def test_preprocess_shape_scales_the_long_side_and_keeps_the_aspect(size: tuple[int, int], long_side: int) -> None:
    height, width = size
    new_h, new_w = preprocess_shape(height, width, long_side)
    scale = long_side / max(height, width)
    assert max(new_h, new_w) == long_side and 1 <= min(new_h, new_w) <= long_side
    for new, old in ((new_h, height), (new_w, width)):
        assert abs(new - old * scale) <= 0.5 or new == 1  # rounded, or kept at 1 px instead of 0


@BOUNDED
@given(image=small_images, out=st.integers(1, 96), axis=st.sampled_from([0, 1]))
def test_resize_is_pillow_exact_along_each_axis(image: np.ndarray, out: int, axis: int) -> None:
    height, width = (out, image.shape[1]) if axis == 0 else (image.shape[0], out)
    assert np.array_equal(resize_bilinear_pil(image, height, width), pillow_resize(image, height, width))


@BOUNDED
@given(image=small_images, height=st.integers(1, 96), width=st.integers(1, 96), block=st.integers(1, 64))
def test_resize_does_not_depend_on_its_block_size_and_stays_in_range(
    image: np.ndarray, height: int, width: int, block: int
) -> None:
    expected = resize_bilinear_pil(image, height, width)
    with mock.patch.object(resize, "_BLOCK_ELEMENTS", block):
        assert np.array_equal(resize_bilinear_pil(image, height, width), expected)
    assert expected.shape == (height, width) + image.shape[2:] and expected.dtype == np.uint8
    assert image.min() <= expected.min() and expected.max() <= image.max()


@BOUNDED
@given(
    size=st.tuples(st.integers(1, 48), st.integers(1, 48)),
    value=st.integers(0, 255),
    out=st.tuples(st.integers(1, 200), st.integers(1, 200)),
)
def test_resize_keeps_a_constant_image_constant(size: tuple[int, int], value: int, out: tuple[int, int]) -> None:
    image = np.full(size + (3,), value, np.uint8)
    assert (resize_bilinear_pil(image, *out) == value).all()


@BOUNDED
@given(image=hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3))))
def test_image_tensor_is_the_normalised_resize_zero_padded(image: np.ndarray) -> None:
    transform = SamTransform(image.shape[:2], long_side=64)
    tensor = transform.image_tensor(image)
    in_h, in_w = transform.input_size
    expected = (resize_bilinear_pil(image, in_h, in_w).astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0, :, :in_h, :in_w], expected.transpose(2, 0, 1), rtol=0, atol=1e-6)
    assert not tensor[0, :, in_h:].any() and not tensor[0, :, :, in_w:].any()


@BOUNDED
@given(size=sizes, data=st.data())
def test_coordinates_round_trip_and_stay_in_the_frame(size: tuple[int, int], data: st.DataObject) -> None:
    height, width = size
    transform = SamTransform(size)
    fractions = data.draw(hnp.arrays(np.float64, (data.draw(st.integers(0, 20)), 2), elements=st.floats(0, 1)))
    points = fractions * [width, height]
    mapped = transform.coords_to_input(points)
    in_h, in_w = transform.input_size
    assert mapped.dtype == np.float32 and mapped.shape == points.shape
    assert (mapped >= 0).all() and (mapped <= np.array([in_w, in_h]) * (1 + 1e-6)).all()
    np.testing.assert_allclose(mapped / np.array([in_w / width, in_h / height]), points, rtol=1e-6, atol=1e-3)
    order = np.argsort(points[:, 0], kind="stable")
    assert (np.diff(mapped[order, 0]) >= 0).all()


@BOUNDED
@given(size=sizes, boxes=hnp.arrays(np.float64, st.tuples(st.integers(0, 8), st.just(4)), elements=st.floats(0, 5000)))
def test_boxes_map_like_their_corners_and_formats_round_trip(size: tuple[int, int], boxes: np.ndarray) -> None:
    transform = SamTransform(size)
    corners = transform.coords_to_input(boxes.reshape(-1, 2, 2)).reshape(-1, 4)
    np.testing.assert_array_equal(transform.boxes_to_input(boxes), corners)
    np.testing.assert_array_equal(xyxy_to_yxyx(xyxy_to_yxyx(boxes)), boxes)
    np.testing.assert_array_equal(xyxy_to_yxyx(boxes)[:, [1, 0, 3, 2]], boxes)


@BOUNDED
@given(in_size=st.integers(1, 1100), out_size=st.integers(1, 3000))
def test_axis_taps_are_convex_and_reproduce_the_matrix(in_size: int, out_size: int) -> None:
    matrix = bilinear_matrix(in_size, out_size)
    taps = AxisTaps(matrix)
    assert (taps.weight >= 0).all() and taps.index.shape[1] <= 2
    np.testing.assert_allclose(taps.weight.sum(axis=1), 1.0, atol=1e-6)
    rebuilt = np.zeros_like(matrix)
    np.add.at(rebuilt, (np.arange(out_size)[:, None], taps.index), taps.weight)
    np.testing.assert_allclose(rebuilt, matrix, atol=1e-7)


@BOUNDED
@given(size=sizes, low=logits)
def test_upsampling_equals_postprocess_masks_and_stays_in_range(size: tuple[int, int], low: np.ndarray) -> None:
    transform = SamTransform(size)
    got = transform.upsample_to_original(low)
    assert got.shape == size and got.dtype == np.float32
    np.testing.assert_allclose(got, postprocess_masks(low, transform), rtol=0, atol=5e-5 * (1 + np.abs(low).max()))
    assert low.min() - 1e-4 <= got.min() and got.max() <= low.max() + 1e-4


@BOUNDED
@given(size=sizes, low=logits, shift=st.floats(-35, 35))
def test_positive_window_is_exactly_the_thresholded_full_map(
    size: tuple[int, int], low: np.ndarray, shift: float
) -> None:
    transform = SamTransform(size)
    low = (low - np.float32(shift)).astype(np.float32)
    full = transform.upsample_to_original(low) > 0
    rebuilt = np.zeros_like(full)
    window = positive_window(transform.upsampler, low)
    if window is not None:
        y0, x0, mask = window
        rebuilt[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    assert np.array_equal(rebuilt, full)


@BOUNDED
@given(
    image=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 80), st.integers(1, 80)), elements=st.floats(-1e3, 1e3, width=32)
    ),
    out=st.tuples(st.integers(1, 160), st.integers(1, 160)),
)
def test_float_bilinear_resize_equals_torch_and_stays_in_range(image: np.ndarray, out: tuple[int, int]) -> None:
    got = resize_bilinear(image, *out)
    expected = F.interpolate(torch.as_tensor(image)[None, None], out, mode="bilinear", align_corners=False)[0, 0]
    assert got.shape == out and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5 * (1 + np.abs(image).max()))  # torch: f32 taps
    assert image.min() - 1e-3 <= got.min() and got.max() <= image.max() + 1e-3
