"""PerSense++'s ResNet-50 feature engine: export (`persense-export --method persense++`), its checkpoint, the
torch-free FeatureEngine and its NumPy RoI-align against the PyTorch oracle (export/oracle/diversity.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SEED
from PIL import Image

from persense.export.cli import main as export_main
from persense.export.features.resnet import (
    TORCHVISION_FILE,
    build_resnet,
    read_state_dict,
    resnet_backbone,
    resolve_feature_checkpoint,
)
from persense.export.oracle import diversity
from persense.export.precision.tensorrt import input_profiles
from persense.runtime.artefact_names import FEATURES, engine_name, variant_name
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import load_manifest
from persense.runtime.models.features import FeatureEngine, resnet_input, roi_align, side_engine_choice

FP16 = variant_name(FEATURES, "fp16")


def synthetic_state(seed: int) -> dict[str, torch.Tensor]:
    """A resnet50 state dict in torchvision's layout whose BatchNorm statistics fit its activations (as trained
    weights' do), so every layer carries signal."""
    resnet = build_resnet(seed=seed)
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = the batch's
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.1)
    resnet.train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet_backbone(resnet, torch.randn(2, 3, 224, 224))
    return resnet.eval().state_dict()


def structured_image() -> np.ndarray:
    """A 180x240 RGB image with structure (gradients, stripes) and noise."""
    yy, xx = np.mgrid[:180, :240]
    noise = np.random.default_rng(1).integers(0, 256, (180, 240))
    return np.stack([(xx + yy) % 256, (3 * xx) % 256, noise], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic resnet50-0676ba61.pth (torchvision's keys, num_batches_tracked included)."""
    path = tmp_path_factory.mktemp("resnet") / TORCHVISION_FILE
    torch.save(synthetic_state(3), path)
    return path


@pytest.fixture(scope="module")
def exported(tiny_engines: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny engines with `--method persense++ --feature-checkpoint` added, then `--fp16` added on top."""
    folder = tmp_path_factory.mktemp("plusplus") / "engines"
    shutil.copytree(tiny_engines, folder)
    before = json.loads((folder / "manifest.json").read_text())["artefacts"]
    argv = ["--method", "persense++", "--feature-checkpoint", str(checkpoint), "--out", str(folder), "-q"]
    assert export_main(argv) == 0
    fp32 = json.loads((folder / "manifest.json").read_text())["artefacts"]
    assert export_main([*argv, "--fp16"]) == 0
    return {"folder": folder, "before": before, "fp32": fp32, "manifest": load_manifest(folder)}


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> diversity.RoiFeatures:
    """The PyTorch oracle's RoiFeatures of the test image, from the same checkpoint."""
    torch.set_num_threads(2)
    return diversity.RoiFeatures(build_resnet(checkpoint), structured_image())


# --- export and manifest ------------------------------------------------------------------------------------


def test_method_persense_plus_plus_adds_the_feature_engine_and_keeps_the_rest(exported: dict) -> None:
    before, fp32, manifest = exported["before"], exported["fp32"], exported["manifest"]
    assert set(fp32) == set(before) | {FEATURES}
    assert all(fp32[name] == entry for name, entry in before.items())  # SAM's entries (hashes) untouched
    entry = manifest.artefacts[FEATURES]
    assert entry.kind == FEATURES and entry.model_type == "resnet50" and entry.precision == "fp32"
    assert [(t.name, t.shape, t.dtype) for t in entry.inputs] == [("image", (1, 3, 224, 224), "float32")]
    assert [(t.name, t.shape, t.dtype) for t in entry.outputs] == [("features", (1, 2048, 7, 7), "float32")]
    assert entry.source_checkpoint != "random" and entry.extra["source_key"].startswith("resnet50:")
    assert manifest.artefacts[FEATURES] == load_manifest(exported["folder"]).artefacts[FEATURES]
    assert json.loads((exported["folder"] / "manifest.json").read_text())["artefacts"][FEATURES] == fp32[FEATURES]
    assert FP16 in manifest.artefacts and manifest.artefacts[FP16].extra["fp32_sha256"] == entry.sha256
    assert input_profiles(entry) == {}  # static shapes: TensorRT needs no optimisation profile


def test_method_persense_changes_nothing(exported: dict) -> None:
    folder = exported["folder"]
    before = json.loads((folder / "manifest.json").read_text())["artefacts"]
    assert export_main(["--model", "tiny", "--seed", str(TINY_SEED), "--out", str(folder), "-q"]) == 0
    assert json.loads((folder / "manifest.json").read_text())["artefacts"] == before  # reused, feature engine kept


def test_missing_feature_engine_is_one_line_naming_the_export(tiny_engines: Path) -> None:
    with pytest.raises(PersenseError) as error:
        FeatureEngine.from_manifest(load_manifest(tiny_engines))
    message = str(error.value)
    assert "\n" not in message and "no ResNet-50 feature engine for --method persense++" in message
    assert f"`persense-export --method persense++ --out {tiny_engines}`" in message


def test_engine_choice_follows_precision_and_the_side_backend(exported: dict) -> None:
    manifest = exported["manifest"]
    assert side_engine_choice(manifest, FEATURES, "ort-cpu", "fp32") == (FEATURES, "ort-cpu")
    assert side_engine_choice(manifest, FEATURES, "ort-cpu", "fp16") == (FP16, "ort-cpu")
    assert side_engine_choice(manifest, FEATURES, "ort-cpu", "int8") == (FEATURES, "ort-cpu")  # not in RUNS_IN
    assert side_engine_choice(manifest, FEATURES, "openvino", "bf16") == (FEATURES, "ort-cpu")
    assert side_engine_choice(manifest, FEATURES, "ort-cuda", "fp16") == (FP16, "ort-cuda")


# --- checkpoint ---------------------------------------------------------------------------------------------


def test_torchvision_checkpoint_is_read_strictly(checkpoint: Path) -> None:
    state = torch.load(checkpoint)
    assert torch.equal(
        build_resnet(checkpoint).state_dict()["layer4.2.bn3.running_var"], state["layer4.2.bn3.running_var"]
    )
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # files before torch 0.4.1
    assert read_state_dict(old) is old
    cases = {
        "unexpected key 'model.conv1.weight'": {**state, "model.conv1.weight": state["conv1.weight"]},
        "missing key 'layer4.2.conv3.weight'": {k: v for k, v in state.items() if k != "layer4.2.conv3.weight"},
        "'fc.weight' is [10, 2048], expected [1000, 2048]": {**state, "fc.weight": torch.zeros(10, 2048)},
    }
    for text, bad in cases.items():
        with pytest.raises(PersenseError, match="not a torchvision ResNet-50 state dict") as error:
            read_state_dict(bad)
        assert text in str(error.value) and "\n" not in str(error.value)


def test_weights_come_from_the_flag_the_hub_cache_or_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / TORCHVISION_FILE
    with pytest.raises(PersenseError) as error:
        resolve_feature_checkpoint(None, random_weights=False)
    assert f"put torchvision's {TORCHVISION_FILE}" in str(error.value) and f"in {cached.parent}/" in str(error.value)
    assert resolve_feature_checkpoint(None, random_weights=True) is None
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_feature_checkpoint(None, random_weights=False) == cached
    given = tmp_path / "elsewhere.pth"
    with pytest.raises(PersenseError, match="feature checkpoint not found"):
        resolve_feature_checkpoint(given, random_weights=False)
    given.write_bytes(b"")
    assert resolve_feature_checkpoint(given, random_weights=True) == given


# --- engine parity ------------------------------------------------------------------------------------------


def test_preprocessing_is_torchvisions_transforms() -> None:
    image = structured_image()
    # ToPILImage, Resize((224, 224)) (PIL bilinear), ToTensor (/ 255), Normalize(ImageNet mean, std)
    resized = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR))
    tensor = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = ((tensor - mean[:, None, None]) / std[:, None, None])[None].numpy()
    got = resnet_input(image)
    assert got.shape == (1, 3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_tensorrt_engine_matches_onnx(exported: dict) -> None:
    from persense.runtime.backends.trt_engine import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no TensorRT engine here: {reason}")
    manifest = exported["manifest"]
    assert engine_name(FEATURES) in manifest.artefacts  # built by --fp16 where TensorRT is usable
    reference = FeatureEngine.from_manifest(manifest).feature_map(structured_image())
    got = FeatureEngine.from_manifest(manifest, "trt").feature_map(structured_image())
    assert np.abs(got - reference).max() <= 3e-2 * np.abs(reference).max()  # an FP16 engine: as the FP16 ONNX


def test_onnx_backbone_matches_torch(exported: dict, oracle: diversity.RoiFeatures) -> None:
    reference = oracle.feature_map[0].numpy()
    scale = np.abs(reference).max()
    fp32 = FeatureEngine.from_manifest(exported["manifest"], threads=2).feature_map(structured_image())
    fp16 = FeatureEngine.from_manifest(exported["manifest"], threads=2, precision="fp16").feature_map(
        structured_image()
    )
    assert fp32.shape == (2048, 7, 7) and fp32.dtype == np.float32
    # measured: FP32 max |error| 1.0e-5 of the map's largest value (126), FP16 6.6e-3
    assert np.abs(fp32 - reference).max() <= 1e-4 * scale
    assert np.abs(fp16 - reference).max() <= 3e-2 * scale


def test_runtime_roi_features_match_the_oracle(exported: dict, oracle: diversity.RoiFeatures) -> None:
    boxes = [
        [10, 20, 100, 200],
        [0, 0, 179, 239],
        [50, 50, 52, 51],
        [170, 230, 179, 239],
        [5, 5, 5, 5],
        [3.7, 1, 9.9, 8],
    ]
    reference = oracle(boxes)
    for precision, tolerance, min_cosine in (("fp32", 1e-4, 0.99999), ("fp16", 3e-2, 0.999)):
        engine = FeatureEngine.from_manifest(exported["manifest"], threads=2, precision=precision)
        got = engine.roi_features(structured_image())(boxes)
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        # measured: FP32 max |error| 5.7e-6 of the largest feature, cosine > 0.9999999; FP16 5.5e-3, 0.99993
        assert got.shape == (6, 2048) and got.dtype == np.float32
        assert np.abs(got - reference).max() <= tolerance * np.abs(reference).max(), precision
        assert cosine.min() >= min_cosine, precision


# --- RoI-align ------------------------------------------------------------------------------------------------


def test_roi_align_on_a_hand_computed_map() -> None:
    feature = np.array([[10.0 * y + x for x in range(4)] for y in range(4)], np.float32)[None]
    boxes = [[0, 0, 2, 2], [-4, -4, -2, -2], [3, 3, 5, 5], [1, 1, 1, 1]]  # as the oracle's test: 11, 0, 8.25, 16.5
    assert roi_align(feature, boxes, output_size=1, spatial_scale=1.0).flatten().tolist() == [11.0, 0.0, 8.25, 16.5]
    bins = roi_align(feature, [[0, 0, 6, 6]], output_size=3, spatial_scale=0.5)[0, 0]
    assert np.allclose(bins, [[10.0 * (i + 0.5) + j + 0.5 for j in range(3)] for i in range(3)])


def test_roi_align_matches_the_oracles_on_random_maps_and_boxes() -> None:
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(150):
        channels, height, width = rng.integers(1, 5), rng.integers(1, 12), rng.integers(1, 12)
        feature = rng.normal(size=(channels, height, width)).astype(np.float32)
        scale = float(rng.choice([1.0, 0.5, 7 / 224]))
        extent = max(height, width) / scale
        n = int(rng.integers(1, 16))
        x0, y0 = rng.uniform(-0.5 * extent, 1.3 * extent, (2, n))  # partly or wholly outside, at the far edge
        size = rng.uniform(0, extent, (2, n)) * rng.choice([0.0, 0.01, 1.0], (2, n))  # empty, tiny, any
        boxes = np.stack([x0, y0, x0 + size[0], y0 + size[1]], axis=1).astype(np.float32)
        boxes[0] = [width / scale - 1, height / scale - 1, width / scale, height / scale]  # the last cell
        got = roi_align(feature, boxes, 3, scale, 2)
        rois = torch.from_numpy(np.concatenate([np.zeros((n, 1), np.float32), boxes], axis=1))
        reference = diversity.roi_align(torch.from_numpy(feature)[None], rois, 3, scale, 2).numpy()
        assert got.shape == reference.shape == (n, channels, 3, 3)
        worst = max(worst, float(np.abs(got - reference).max()))
    assert worst <= 1e-6  # measured 2.4e-7 (float32 summation order) on values of about 1
