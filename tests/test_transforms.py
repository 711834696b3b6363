"""SAM geometry in NumPy equals segment-anything's own transforms and torch's resizes."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import positive_window
from PIL import Image

from persense.runtime.geometry.resampling import resize_bilinear, resize_bilinear_pil
from persense.runtime.geometry.transforms import SamTransform, xyxy_to_yxyx
from persense.runtime.pipeline.prior import attention_similarity, reference_target, similarity_map

SIZES = [(333, 517), (517, 333), (1024, 1024), (100, 90), (2000, 3000), (768, 1024)]


@pytest.fixture(scope="module")
def sam_transforms(tmp_path_factory):
    """segment-anything's utils/transforms.py, loaded with torchvision's two PIL helpers provided by PIL itself."""
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = lambda img, size: img.resize((size[1], size[0]), Image.BILINEAR)
    functional.to_pil_image = Image.fromarray
    saved = {
        name: sys.modules.get(name)
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    }
    sys.modules.update(
        {
            "torchvision": types.ModuleType("torchvision"),
            "torchvision.transforms": types.ModuleType("torchvision.transforms"),
            "torchvision.transforms.functional": functional,
        }
    )
    try:
        origin = importlib.util.find_spec("segment_anything").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location("_sam_utils_transforms", f"{origin}/utils/transforms.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    return module.ResizeLongestSide(1024)


@pytest.mark.parametrize("size", SIZES)
def test_image_preprocessing_equals_segment_anything(size, sam_transforms, tiny_sam):
    image = np.random.default_rng(sum(size)).integers(0, 256, size + (3,), dtype=np.uint8)
    expected = tiny_sam.preprocess(torch.as_tensor(sam_transforms.apply_image(image)).permute(2, 0, 1)[None].float())
    got = SamTransform(size).image_tensor(image)
    assert got.shape == (1, 3, 1024, 1024)
    # at most one grey level (Pillow 13 may order its two passes differently), i.e. 1/57.12 after normalising
    np.testing.assert_allclose(got, expected.numpy(), atol=1.0 / 57.12 + 1e-5, rtol=0)
    assert np.mean(np.abs(got - expected.numpy()) > 1e-5) < 0.3


@pytest.mark.parametrize("size", SIZES)
def test_coordinates_and_boxes_equal_segment_anything(size, sam_transforms):
    rng = np.random.default_rng(1)
    points = rng.uniform(0, min(size), (7, 2))
    boxes = np.sort(rng.uniform(0, min(size), (5, 2, 2)), axis=1).reshape(5, 4)
    transform = SamTransform(size)
    np.testing.assert_allclose(transform.coords_to_input(points), sam_transforms.apply_coords(points, size), rtol=1e-6)
    np.testing.assert_allclose(transform.boxes_to_input(boxes), sam_transforms.apply_boxes(boxes, size), rtol=1e-6)


@pytest.mark.parametrize("shape", [(333, 517), (10, 10), (4000, 3)])
def test_resize_matches_pillow_exactly_per_axis_and_within_one_level_in_2d(shape):
    image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    h, w = shape
    for out in [(h, 1024), (h, 7), (1024, w), (5, w)]:
        expected = np.array(Image.fromarray(image).resize((out[1], out[0]), Image.BILINEAR))
        assert np.array_equal(resize_bilinear_pil(image, *out), expected)
    for out in [(1024, 700), (64, 64), (7, 1000)]:
        expected = np.array(Image.fromarray(image).resize((out[1], out[0]), Image.BILINEAR)).astype(int)
        assert np.abs(resize_bilinear_pil(image, *out) - expected).max() <= 1


def test_resize_of_non_uint8_is_refused():
    with pytest.raises(TypeError):
        resize_bilinear_pil(np.zeros((4, 4), np.float32), 8, 8)


@pytest.mark.parametrize("size", SIZES)
def test_low_res_upsampling_equals_postprocess_masks(size, tiny_sam):
    logits = np.random.default_rng(2).normal(size=(256, 256)).astype(np.float32)
    transform = SamTransform(size)
    expected = tiny_sam.postprocess_masks(torch.as_tensor(logits)[None, None], transform.input_size, size)[0, 0]
    got = transform.upsample_to_original(logits)
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-4)
    assert ((got > 0) != (expected.numpy() > 0)).mean() < 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_positive_window_reproduces_the_full_thresholded_mask(size):
    transform = SamTransform(size)
    for shift in (0.0, 1.5, 3.0, 9.0):
        logits = np.random.default_rng(3).normal(size=(256, 256)).astype(np.float32) - shift
        full = transform.upsample_to_original(logits) > 0
        rebuilt = np.zeros_like(full)
        window = positive_window(transform.upsampler, logits)
        if window is not None:
            y0, x0, mask = window
            rebuilt[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
        assert np.array_equal(rebuilt, full)


@pytest.mark.parametrize("src,dst", [((64, 64), (256, 256)), ((333, 517), (64, 64)), ((50, 70), (123, 31))])
def test_resize_bilinear_equals_torch_interpolate(src, dst):
    image = np.random.default_rng(4).normal(size=src).astype(np.float32)
    expected = F.interpolate(torch.as_tensor(image)[None, None], size=dst, mode="bilinear")[0, 0].numpy()
    np.testing.assert_allclose(resize_bilinear(image, *dst), expected, atol=3e-5)


def test_box_format_conversions_round_trip():
    boxes = np.array([[1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40]])
    assert xyxy_to_yxyx(boxes).tolist() == [[2, 1, 4, 3], [20, 10, 40, 30]]
    np.testing.assert_array_equal(xyxy_to_yxyx(xyxy_to_yxyx(boxes)), boxes)


@pytest.mark.parametrize("size", [(300, 420), (420, 300)])
def test_location_prior_equals_the_reference(size, tiny_sam):
    from persense.export.oracle.pipeline import OraclePipeline

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    mask = np.zeros(size, bool)
    mask[40:200, 60:220] = True
    reference = OraclePipeline(tiny_sam, counter=None)
    target_embedding, target_feat = reference.reference(image, mask)
    embedding = reference.predictor.features.numpy()
    transform = SamTransform(size)
    target = reference_target(embedding, mask, transform)
    np.testing.assert_allclose(target.embedding, target_embedding.reshape(-1).numpy(), rtol=1e-4, atol=1e-6)
    sim_ref, attn_ref = reference._location_prior(target_feat)
    sim = similarity_map(embedding, target, transform)
    np.testing.assert_allclose(sim, sim_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(attention_similarity(sim), attn_ref.reshape(1, -1).numpy(), atol=1e-5)
