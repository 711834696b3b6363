"""CounTR: checkpoint layout and refusals, ONNX parity, and the NumPy procedure against the literal torch one.

Tolerances: ONNX vs torch network (fp32, tiny config) max |diff| < 1e-4 on densities of magnitude ~1 and
count relative error < 1e-3; NumPy antialiased resize vs torch within 1e-6 on [0, 1] pixels; window
blending bit-identical to the original's sequential formula.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from persense.export.counters.countr import (
    TorchCountrCounter,
    export_countr,
    load_countr,
    load_image,
    random_countr,
    slide_sequential,
)
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.counters.base import CountRequest
from persense.runtime.counters.choice import make_counter
from persense.runtime.counters.countr import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    WINDOW,
    CountrCounter,
    CountrGeometry,
    blend_windows,
    calibrate,
    exemplar_crops,
    prepare_image,
    resize_aa,
    window_starts,
)
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.manifest import Manifest, TensorSpec, load_manifest

# A few keys and shapes of the original FSC147.pth 'model' (CounTR mae_vit_base_patch16).
ORIGINAL_KEYS = {
    "pos_embed": (1, 576, 768),
    "decoder_pos_embed": (1, 576, 512),
    "shot_token": (512,),
    "patch_embed.proj.weight": (768, 3, 16, 16),
    "blocks.0.attn.qkv.weight": (2304, 768),
    "blocks.11.mlp.fc2.weight": (768, 3072),
    "norm.weight": (768,),
    "decoder_embed.weight": (512, 768),
    "decoder_proj1.0.weight": (64, 3, 3, 3),
    "decoder_proj4.0.weight": (512, 256, 3, 3),
    "decoder_blocks.1.norm0.bias": (512,),
    "decoder_blocks.0.selfattn.qkv.weight": (1536, 512),
    "decoder_blocks.1.attn.wv.weight": (512, 512),
    "decoder_blocks.1.mlp.fc1.weight": (2048, 512),
    "decoder_norm.weight": (512,),
    "decode_head0.0.weight": (256, 512, 3, 3),
    "decode_head2.1.weight": (256,),
    "decode_head3.3.weight": (1, 256, 1, 1),
}

# (H, W), exemplar boxes (x0, y0, x1, y1): wider than a window, narrower (padding), exactly one window.
IMAGES = {
    "wide": ((60, 150), [[10, 5, 40, 30], [60, 20, 90, 50]]),
    "narrow": ((120, 50), [[30, 10, 49, 40]]),  # crop half in the padding (pad offset ignored), half in the image
    "one_window": ((77, 77), [[3, 3, 40, 50], [20, 30, 60, 70]]),
}
TILED = ((90, 130), [[3, 3, 5, 5], [20, 20, 60, 60]])  # first box is < 10 px after scaling: 3x3 tiling


class TorchEngine:
    """The torch model behind the Engine protocol, recording the batch of every call."""

    inputs = [TensorSpec(name, (), "float32") for name in INPUT_NAMES]
    outputs = [TensorSpec(name, (), "float32") for name in OUTPUT_NAMES]

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.batches: list[int] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on numpy feeds."""
        self.batches.append(len(feeds["windows"]))
        with torch.inference_mode():
            out = self.model(torch.from_numpy(feeds["windows"]), torch.from_numpy(feeds["exemplars"]))
        return {OUTPUT_NAMES[0]: out.numpy()}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """Tiny random CounTR whose densities are mostly positive (so calibration and normalisation matter)."""
    model = random_countr(0, "tiny")
    with torch.no_grad():
        model.decode_head3[3].bias.fill_(0.3)
    return model


@pytest.fixture(scope="module")
def engines(model, tmp_path_factory) -> Path:
    """The tiny model exported once to ONNX, in an engines folder with its manifest."""
    folder = tmp_path_factory.mktemp("countr")
    artefact = export_countr(model, folder, "random")
    assert artefact.kind == "counter_countr" and artefact.file == "counter_countr.onnx"
    Manifest(folder, "tiny", {}, {artefact.kind: artefact}).save()
    return folder


@pytest.fixture(scope="module")
def ort_engine(engines) -> OrtEngine:
    """The exported tiny model opened with ONNX Runtime."""
    return OrtEngine(engines / "counter_countr.onnx", threads=2)


def test_engine_opens_from_its_manifest(engines):
    counter = make_counter("countr", load_manifest(engines), "ort-cpu", 1)
    assert isinstance(counter, CountrCounter) and isinstance(counter.engine, OrtEngine)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda a: a["inputs"][1].update(shape=[1, "K", 3, 32, 32]),
            r"input 'exemplars' is float32\[1, 'K', 3, 32, 32\]",
        ),
        (lambda a: a["inputs"][0].update(dtype="float16"), "input 'windows' is float16"),
        (lambda a: a["inputs"].pop(), "input 'exemplars' missing from the artefact"),
        (lambda a: a["outputs"][0].update(name="logits"), "output 'density' missing from the artefact"),
    ],
)
def test_engine_with_other_io_is_refused(engines, tmp_path, edit, message):
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data["artefacts"]["counter_countr"])
    path.write_text(json.dumps(data))
    with pytest.raises(PersenseError, match=f"counter_countr: {message}.*re-export with `persense-export --out"):
        make_counter("countr", load_manifest(folder), "ort-cpu", 1)


def request(size: tuple[int, int], boxes: list[list[int]], seed: int = 0) -> CountRequest:
    """A random-image count request."""
    image = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    return CountRequest(image, np.array(boxes, dtype=np.float64), SamTransform(size))


def save(obj: object, path: Path) -> Path:
    """torch.save and return the path."""
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    """State dict of a random full-size CounTR (mae_vit_base_patch16)."""
    return random_countr(1).state_dict()


def test_original_checkpoint_layout_loads(base_state, tmp_path):
    assert len(base_state) == 225 and sum(v.numel() for v in base_state.values()) == 99_690_625
    assert {k: tuple(base_state[k].shape) for k in ORIGINAL_KEYS} == ORIGINAL_KEYS
    checkpoint = {
        "model": {**base_state, "unused.extra": torch.zeros(1)},
        "optimizer": {"state": {}},
        "epoch": 199,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="mae_vit_base_patch16", lr=1e-4),
    }
    loaded = load_countr(save(checkpoint, tmp_path / "FSC147.pth")).state_dict()
    assert loaded.keys() == base_state.keys()
    assert all(torch.equal(loaded[k], base_state[k]) for k in base_state)


def test_wrong_checkpoints_are_refused(base_state, tmp_path):
    stubs = {k: torch.zeros(1) for k in base_state}  # every key, wrong shapes: small files
    cases = {
        "DSALVANet": {"state_dict": {"backbone.resnet.conv1.weight": torch.zeros(64, 3, 7, 7)}},
        "SAM": {"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)},
        "none of CounTR": {"model": {"fc.weight": torch.zeros(2, 2)}},
        "6 weights missing": {"model": {k: v for k, v in stubs.items() if not k.startswith("decode_head3")}},
        "not CounTR mae_vit_base": {"model": stubs},
    }
    for message, checkpoint in cases.items():
        with pytest.raises(PersenseError, match=message):
            load_countr(save(checkpoint, tmp_path / "wrong.pth"))
    whole = save({"model": {"shot_token": torch.zeros(512)}}, tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PersenseError, match="not a readable PyTorch checkpoint"):
        load_countr(tmp_path / "truncated.pth")
    with pytest.raises(PersenseError, match="not found"):
        load_countr(tmp_path / "missing.pth")


def test_onnx_matches_torch(model, ort_engine):
    g = torch.Generator().manual_seed(3)
    for windows, shots in ((1, 1), (3, 4)):
        feeds = {
            "windows": torch.rand(windows, 3, WINDOW, WINDOW, generator=g),
            "exemplars": torch.rand(1, shots, 3, 64, 64, generator=g),
        }
        with torch.inference_mode():
            expected = model(feeds["windows"], feeds["exemplars"]).numpy()
        got = ort_engine.run({k: v.numpy() for k, v in feeds.items()})["density"]
        assert got.shape == (windows, WINDOW, WINDOW)
        assert np.abs(got - expected).max() < 1e-4
        assert abs(got.sum() - expected.sum()) / abs(expected.sum()) < 1e-3


def test_counter_onnx_matches_reference(model, ort_engine):
    req = request(*IMAGES["wide"])
    expected = TorchCountrCounter(model).count(req)
    got = CountrCounter(ort_engine).count(req)
    assert abs(got.count - expected.count) / abs(expected.count) < 1e-3
    assert np.abs(got.map - expected.map).max() < 1e-3 and got.idm_threshold == 20


@pytest.mark.parametrize("width", [384, 400, 512, 576, 640, 1008, 1152, 2000])
def test_blending_is_bit_identical_to_sequential(width):
    starts = window_starts(width)
    outputs = np.random.default_rng(width).standard_normal((len(starts), WINDOW, WINDOW)).astype(np.float32)
    visited = []

    def infer(window: torch.Tensor) -> torch.Tensor:
        """The next stored output; records the window's start (its first pixel holds its column)."""
        visited.append(int(window[0, 0, 0, 0]))
        return torch.from_numpy(outputs[len(visited) - 1])

    columns = torch.arange(width, dtype=torch.float32).expand(1, 3, WINDOW, width)
    sequential = slide_sequential(columns, infer).numpy()
    assert visited == starts.tolist() and starts[-1] == width - WINDOW
    assert np.array_equal(blend_windows(outputs, starts, width), sequential)


def test_preprocessing_matches_pil_and_torchvision():
    req = request(*IMAGES["wide"])
    geometry = CountrGeometry.of(req.image.shape[:2], req.exemplars)
    assert geometry.new_w == 960 and geometry.rects.tolist() == [[32, 64, 192, 256], [128, 384, 320, 576]]
    image, crops = load_image(req.image, geometry)
    ours = prepare_image(req.image, geometry)
    assert np.array_equal(ours, image[0].numpy())
    assert np.abs(exemplar_crops(ours, geometry) - crops.numpy()).max() < 1e-6
    tile = torch.rand(1, 3, 128, 133, generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(tile, size=(384, 400), mode="bilinear", align_corners=False, antialias=True)
    assert np.abs(resize_aa(tile[0].numpy(), 384, 400) - up[0].numpy()).max() < 1e-6


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_runtime_procedure_matches_reference(model, case):
    req = request(*IMAGES[case])
    engine = TorchEngine(model)
    expected = TorchCountrCounter(model).count(req)
    got = CountrCounter(engine).count(req)
    geometry = CountrGeometry.of(req.image.shape[:2], req.exemplars)
    assert engine.batches == [len(window_starts(geometry.padded_w))]
    assert got.map.shape == req.image.shape[:2] and got.map.dtype == np.float32
    assert abs(got.count - expected.count) / abs(expected.count) < 1e-5
    assert np.abs(got.map - expected.map).max() < 1e-5


def test_tiling_branch_matches_reference(model):
    req = request(*TILED)
    geometry = CountrGeometry.of(req.image.shape[:2], req.exemplars)
    assert geometry.tiny_exemplar and geometry.padded_w == 544
    engine = TorchEngine(model)
    expected = TorchCountrCounter(model).count(req)
    got = CountrCounter(engine).count(req)
    assert engine.batches == [9 * len(window_starts(544))]
    assert abs(got.count - expected.count) / abs(expected.count) < 1e-5
    assert np.abs(got.map - expected.map).max() < 1e-5


def test_calibration_and_geometry_errors():
    density = np.full((WINDOW, 400), 0.6, dtype=np.float32)  # a 10x10 rect holds 100 * 0.6 / 60 = 1 object
    rects = np.array([[0, 0, 9, 9]] * 6)
    assert calibrate(30.0, density, rects[:5]) == 30.0  # e = 5/3 <= 1.8
    assert calibrate(30.0, density, rects) == pytest.approx(15.0)  # e = 6/3 = 2 > 1.8
    with pytest.raises(PersenseError, match="too narrow"):
        CountrGeometry.of((1000, 40), np.array([[0, 0, 5, 5]]))
    with pytest.raises(PersenseError, match="outside"):
        CountrGeometry.of((100, 100), np.array([[0, 0, 5, 5], [50, 150, 60, 160]]))
    with pytest.raises(PersenseError, match="at least one"):
        CountrGeometry.of((100, 100), np.zeros((0, 4)))
