"""DSALVANet: checkpoint layout, deformable conv, exemplar ROI bins, LVAM modes, ONNX parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from persense.export.counters.dsalvanet import (
    LVAM,
    TorchDsalvanetCounter,
    export_dsalvanet,
    index_roi_pool,
    load_dsalvanet,
    modulated_deform_conv2d,
    random_dsalvanet,
    reference_boxes,
    reference_image,
    slice_roi_pool,
)
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.counters.base import CountRequest
from persense.runtime.counters.choice import make_counter
from persense.runtime.counters.dsalvanet import (
    BIN_LENGTH,
    FEATURE_SIZE,
    POOL,
    DsalvanetCounter,
    engine_feeds,
    exemplar_rows,
    image_tensor,
    roi_indices,
)
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.manifest import Manifest, load_manifest

BACKBONE_KEYS = 638  # torchvision resnet50 (320 keys) under backbone.resnet + 318 aliased under layer0..layer4
TOTAL_KEYS = 768


@pytest.fixture(scope="module")
def model():
    return random_dsalvanet(seed=0)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("dsalvanet") / "checkpoint_200.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 200}, path)
    return path


@pytest.fixture(scope="module")
def engines(model, tmp_path_factory) -> Path:
    """The random model exported once to ONNX, in an engines folder with its manifest."""
    folder = tmp_path_factory.mktemp("engines")
    artefact = export_dsalvanet(model, folder, "random")
    assert [(t.name, t.shape, t.dtype) for t in artefact.inputs] == [
        ("image", (1, 3, 512, 512), "float32"),
        ("roi_rows", (3, 3, BIN_LENGTH), "int64"),
        ("roi_cols", (3, 3, BIN_LENGTH), "int64"),
    ]
    assert artefact.kind == "counter_dsalvanet" and artefact.outputs[0].shape == (1, 1, 512, 512)
    Manifest(folder, "dsalvanet", {}, {artefact.kind: artefact}).save()
    return folder


@pytest.fixture(scope="module")
def engine(engines):
    return OrtEngine(engines / "counter_dsalvanet.onnx", threads=2)


# --- checkpoints ---------------------------------------------------------------------------------


def test_original_layout_loads_strict(model, checkpoint):
    keys = list(model.state_dict())
    assert len(keys) == TOTAL_KEYS
    assert sum(k.startswith("backbone.") for k in keys) == BACKBONE_KEYS
    for key in (
        "backbone.resnet.fc.weight",
        "backbone.resnet.layer4.2.bn3.running_var",
        "backbone.layer0.1.weight",
        "backbone.layer4.0.downsample.1.num_batches_tracked",
        "dsam_blocks.dsam_blocks.3.similarity_cal.mdm_d4.conv_mask.weight",
        "count_regressor.regressor.8.bias",
    ):
        assert key in keys
    assert sum(p.numel() for p in model.parameters()) == 41_707_081
    loaded = load_dsalvanet(checkpoint)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert loaded.backbone.layer1 is loaded.backbone.resnet.layer1


def test_wrong_and_truncated_checkpoints(model, checkpoint, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": model.state_dict()}, wrong)
    with pytest.raises(PersenseError, match="state_dict"):
        load_dsalvanet(wrong)
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.resnet.")}
    torch.save({"state_dict": partial}, wrong)
    with pytest.raises(PersenseError, match="does not fit DSALVANet.*backbone.resnet"):
        load_dsalvanet(wrong)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:1_000_000])
    with pytest.raises(PersenseError, match="not a readable PyTorch checkpoint"):
        load_dsalvanet(truncated)
    with pytest.raises(PersenseError, match="not found"):
        load_dsalvanet(tmp_path / "missing.pth")


# --- modulated deformable convolution ------------------------------------------------------------


def bilinear_zero(plane: np.ndarray, y: float, x: float) -> float:
    """torchvision's deform_conv2d bilinear_interpolate: corners outside the map read zero."""
    h, w = plane.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    value = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                value += wy * wx * plane[yy, xx]
    return value


def loop_deform_conv(x, offset, mask, weight, dilation, groups):
    """Direct modulated deformable conv (stride 1, padding = dilation*(k//2)), one output value at a time."""
    _, channels, h, w = x.shape
    out_channels, group_channels, k, _ = weight.shape
    offset_groups = offset.shape[1] // (2 * k * k)
    pad = dilation * (k // 2)
    out = np.zeros((1, out_channels, h, w))
    for o in range(out_channels):
        for cg in range(group_channels):
            c = (o // (out_channels // groups)) * group_channels + cg
            g = c // (channels // offset_groups)
            for i in range(k):
                for j in range(k):
                    t = i * k + j
                    for py in range(h):
                        for px in range(w):
                            y = py - pad + i * dilation + offset[0, 2 * (g * k * k + t), py, px]
                            xx = px - pad + j * dilation + offset[0, 2 * (g * k * k + t) + 1, py, px]
                            out[0, o, py, px] += (
                                weight[o, cg, i, j] * mask[0, g * k * k + t, py, px] * bilinear_zero(x[0, c], y, xx)
                            )
    return out


@pytest.mark.parametrize("dilation", [1, 2])
def test_deform_conv_matches_loop_reference(dilation):
    rng = np.random.default_rng(dilation)
    x = rng.standard_normal((1, 8, 5, 6))
    offset = rng.uniform(-3, 3, (1, 2 * 4 * 9, 5, 6))  # 4 offset groups; many samples fall outside
    mask = rng.uniform(0, 1, (1, 4 * 9, 5, 6))
    weight = rng.standard_normal((4, 4, 3, 3))  # 4 outputs, 2 conv groups
    ours = modulated_deform_conv2d(*(torch.from_numpy(a) for a in (x, offset, mask, weight)), dilation, groups=2)
    np.testing.assert_allclose(
        ours.numpy(), loop_deform_conv(x, offset, mask, weight, dilation, 2), rtol=1e-10, atol=1e-10
    )


# --- exemplar ROI bins ---------------------------------------------------------------------------

ROI_BOXES = [
    [[0, 0, 511, 511], [508, 508, 511, 511], [0, 300, 7, 511]],  # whole image, bottom-right corner, top border
    [[200, 200, 200, 200], [3, 5, 4, 6], [130, 64, 137, 65]],  # single pixels / tiny boxes
    [[10, 20, 500, 300], [1, 1, 511, 2], [255, 0, 256, 511]],  # large and elongated
]


@pytest.mark.parametrize("boxes", ROI_BOXES)
def test_roi_bins_reproduce_slice_and_adaptive_max_pool(boxes):
    feat = torch.randn(1, 16, FEATURE_SIZE, FEATURE_SIZE, generator=torch.Generator().manual_seed(0))
    boxes = np.array(boxes, dtype=np.float64)
    rows, cols = roi_indices(boxes)
    expected = slice_roi_pool(torch.from_numpy(boxes))(feat)
    assert torch.equal(index_roi_pool(torch.from_numpy(rows), torch.from_numpy(cols))(feat), expected)


def test_bin_length_is_the_longest_adaptive_pool_bin():
    longest = max(-(-((i + 1) * n) // POOL) - (i * n) // POOL for n in range(1, FEATURE_SIZE + 1) for i in range(POOL))
    assert BIN_LENGTH == longest


def test_unusable_boxes_are_refused():
    with pytest.raises(PersenseError, match="covers no feature cell"):
        roi_indices(np.array([[100, 100, 20, 20]] * 3, dtype=np.float64))
    with pytest.raises(PersenseError, match="at least one exemplar"):
        exemplar_rows(np.zeros((0, 4)), (100, 100))
    with pytest.raises(PersenseError, match="finite"):
        exemplar_rows(np.array([[0, 0, np.nan, 5]]), (100, 100))


# --- pre-processing as the original --------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exemplar_count_handled_as_original(k):
    xyxy = np.array([[10, 20, 60, 80], [100, 101, 140, 150], [3, 4, 399, 298], [5, 6, 9, 9]], float)[:k]
    rows = exemplar_rows(xyxy, (300, 400))
    np.testing.assert_array_equal(rows, reference_boxes(xyxy, (300, 400)).numpy())
    expected_order = {1: [0, 0, 0], 2: [0, 1, 0], 3: [0, 1, 2], 4: [0, 1, 2]}[k]
    np.testing.assert_array_equal(rows, exemplar_rows(xyxy[expected_order], (300, 400)))
    assert rows[0].tolist() == [int(20 * 512 / 300), int(10 * 512 / 400), int(80 * 512 / 300), int(60 * 512 / 400)]


def test_image_preprocessing_matches_torchvision_way():
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    np.testing.assert_array_equal(image_tensor(image), reference_image(image).numpy())


# --- LVAM ----------------------------------------------------------------------------------------


def test_lvam_mu_is_deterministic_and_sampling_only_adds_noise():
    torch.manual_seed(0)
    lvam = LVAM(in_dim=16, mid_dim=32)
    x = torch.randn(1, 16, 6, 6)
    mu, logvar = lvam.encode(x)
    assert torch.equal(lvam(x), lvam(x)) and torch.equal(lvam(x), mu)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(lvam(x, sample=True, seed=7), mu + eps * torch.exp(0.5 * logvar), rtol=0, atol=0)
    assert not torch.equal(lvam(x, sample=True, seed=7), lvam(x, sample=True, seed=8))


# --- ONNX vs PyTorch -----------------------------------------------------------------------------


def test_onnx_density_matches_torch_reference(model, engine):
    image = np.random.default_rng(1).integers(0, 256, (360, 480, 3), dtype=np.uint8)
    exemplars = np.array([[0, 0, 30, 25], [200, 150, 479, 359], [100, 50, 104, 53], [10, 10, 40, 40]], float)
    request = CountRequest(image, exemplars, SamTransform((360, 480)))
    ours = DsalvanetCounter(engine).count(request)
    reference = TorchDsalvanetCounter(model).count(request)
    assert ours.map.shape == (512, 512) and ours.idm_threshold == reference.idm_threshold == 30
    scale = float(np.abs(reference.map).max())
    assert scale > 0 and (reference.map > 0).mean() > 0.1  # the random model gives a non-trivial map
    np.testing.assert_allclose(ours.map, reference.map, rtol=0, atol=1e-4 * scale)
    assert abs(ours.map.sum(dtype=np.float64) / reference.map.sum(dtype=np.float64) - 1) < 1e-5
    assert abs(ours.count - reference.count) / reference.count < 1e-3
    one = engine_feeds(image, exemplars[:1])
    for name, value in engine_feeds(image, exemplars[[0, 0, 0]]).items():
        np.testing.assert_array_equal(one[name], value)


# --- the engine's manifest entry -----------------------------------------------------------------


def test_engine_opens_from_its_manifest(engines):
    counter = make_counter("dsalvanet", load_manifest(engines), "ort-cpu", 1)
    assert isinstance(counter, DsalvanetCounter) and isinstance(counter.engine, OrtEngine)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda a: a["inputs"][0].update(shape=[1, 3, 384, 384]), r"input 'image' is float32\[1, 3, 384, 384\]"),
        (lambda a: a["inputs"][1].update(dtype="int32"), "input 'roi_rows' is int32"),
        (lambda a: a["inputs"].pop(), "input 'roi_cols' missing from the artefact"),
        (lambda a: a["outputs"][0].update(shape=[1, 512, 512]), "output 'density' is float32"),
    ],
)
def test_engine_with_other_io_is_refused(engines, tmp_path, edit, message):
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data["artefacts"]["counter_dsalvanet"])
    path.write_text(json.dumps(data))
    with pytest.raises(PersenseError, match=f"counter_dsalvanet: {message}.*re-export with `persense-export --out"):
        make_counter("dsalvanet", load_manifest(folder), "ort-cpu", 1)
