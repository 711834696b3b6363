"""ONNX Runtime vs PyTorch: image encoder embeddings (tiny; random vit_b, marked slow: about 2 minutes of export and
torch on 2 cores) and vit_b decoder masks (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persense.export.sam.build import random_sam
from persense.export.sam.graphs import decoder_example_inputs, export_decoder, export_encoder
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.geometry.transforms import SamTransform

EMBED_ATOL = 5e-4  # absolute, on embeddings of magnitude ~1-5
EMBED_RTOL = 1e-4  # max abs error / max abs embedding
MASK_IOU = 0.99


def _image_tensor(seed: int = 0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    return SamTransform(image.shape[:2]).image_tensor(image)


def _assert_embeddings_close(got: np.ndarray, expected: np.ndarray) -> None:
    error = np.abs(got - expected).max()
    assert got.shape == (1, 256, 64, 64)
    assert error <= EMBED_ATOL, error
    assert error / np.abs(expected).max() <= EMBED_RTOL


def test_tiny_encoder_matches_torch(tiny_sam, tiny_engines):
    image = _image_tensor()
    with torch.no_grad():
        expected = tiny_sam.image_encoder(torch.as_tensor(image)).numpy()
    got = OrtEngine(tiny_engines / "sam_encoder.onnx", threads=2).run({"image": image})["image_embeddings"]
    _assert_embeddings_close(got, expected)


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    """Random vit_b exported once: (torch model, encoder engine, decoder engine)."""
    sam = random_sam("vit_b", seed=0)
    folder = tmp_path_factory.mktemp("vit_b")
    export_encoder(sam, folder / "sam_encoder.onnx", "vit_b", "random")
    export_decoder(sam, folder / "sam_decoder.onnx", "vit_b", "random")
    return sam, OrtEngine(folder / "sam_encoder.onnx"), OrtEngine(folder / "sam_decoder.onnx")


@pytest.mark.slow
def test_vit_b_encoder_matches_torch(vit_b):
    sam, encoder, _ = vit_b
    image = _image_tensor(1)
    with torch.no_grad():
        expected = sam.image_encoder(torch.as_tensor(image)).numpy()
    _assert_embeddings_close(encoder.run({"image": image})["image_embeddings"], expected)


@pytest.mark.slow
@pytest.mark.parametrize("batch,points,has_mask", [(1, 2, 0.0), (1, 3, 1.0), (64, 2, 0.0), (64, 3, 1.0)])
def test_vit_b_decoder_masks_match_torch(vit_b, batch, points, has_mask):
    sam, _, decoder = vit_b
    args = list(decoder_example_inputs(batch, points))
    args[2] = torch.tensor([1.0, 2.0, 3.0][:points] if points == 3 else [1.0, -1.0]).repeat(batch, 1)
    args[4] = torch.full((batch,), has_mask)
    args[7] = (torch.arange(batch) % 2).float()
    with torch.no_grad():
        expected, _ = PerSamDecoder(sam, best_only=True).eval()(*args)
    got = decoder.run({n: t.numpy() for n, t in zip(PerSamDecoder.input_names, args)})["low_res_masks"]
    for a, b in zip(got.reshape(batch, -1) > 0, expected.numpy().reshape(batch, -1) > 0):
        union = np.logical_or(a, b).sum()
        assert union == 0 or np.logical_and(a, b).sum() / union >= MASK_IOU


def test_row_blocked_global_attention_is_exact(tiny_sam):
    from persense.export.sam.cpu_encoder import RowBlockedAttention, cpu_encoder

    lean = cpu_encoder(tiny_sam.image_encoder, rows=5)  # 5 does not divide 64: a short last block
    assert sum(isinstance(b.attn, RowBlockedAttention) for b in lean.blocks) == 1
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(lean(image), tiny_sam.image_encoder(image), atol=1e-5, rtol=1e-5)
