"""MobileSAM (--model vit_t): TinyViT as the original computes it, the original checkpoint layout, BatchNorm
folding, ONNX parity and pipeline parity against the PyTorch oracle."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from persense.export.checkpoints import read_checkpoint
from persense.export.oracle.pipeline import OraclePipeline
from persense.export.sam.build import build_sam, load_sam
from persense.export.sam.tiny_vit import PatchMerging, TinyViT, TinyViTBlock, fold_batchnorm
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.counters.base import NpyDensityCounter
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.manifest import load_manifest
from persense.runtime.metrics import mask_iou
from persense.runtime.models.sam import SamEngines
from persense.runtime.pipeline.flow import PerSensePipeline

EMBED_ATOL = 1e-4  # ONNX (BatchNorm folded) vs PyTorch, embeddings of magnitude ~1-5 (measured: ~4e-6)
FOLD_ATOL = 1e-5  # folded vs unfolded Conv-BN, outputs of magnitude ~1


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random non-init values in every float tensor (BatchNorm statistics, attention biases included), so that
    folding and the bias table matter (at init the biases are zero and BatchNorm is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.dtype.is_floating_point:
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            else:
                value.add_(torch.randn(value.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def mobile_sam(tmp_path_factory):
    """A synthetic weights/mobile_sam.pt in the original layout (a bare state dict) and the SAM loaded from it."""
    torch.manual_seed(3)
    sam = build_sam("vit_t")
    _perturb(sam, 3)
    path = tmp_path_factory.mktemp("weights") / "mobile_sam.pt"
    torch.save(sam.state_dict(), path)
    return path, load_sam("vit_t", path)


@pytest.fixture(scope="module")
def engines(mobile_sam, tmp_path_factory):
    """persense-export --model vit_t --checkpoint mobile_sam.pt (encoder and decoder)."""
    from persense.export.cli import main

    folder = tmp_path_factory.mktemp("engines_vit_t")
    assert main(["--model", "vit_t", "--checkpoint", str(mobile_sam[0]), "--out", str(folder), "-q"]) == 0
    return folder


def test_checkpoint_has_the_original_keys(mobile_sam):
    state = read_checkpoint(mobile_sam[0])
    shapes = {
        "image_encoder.patch_embed.seq.0.c.weight": (32, 3, 3, 3),
        "image_encoder.patch_embed.seq.2.bn.running_var": (64,),
        "image_encoder.layers.0.blocks.1.conv3.bn.weight": (64,),
        "image_encoder.layers.2.downsample.conv2.c.weight": (320, 1, 3, 3),
        "image_encoder.layers.1.blocks.0.attn.attention_biases": (4, 49),
        "image_encoder.layers.2.blocks.5.attn.attention_biases": (5, 196),
        "image_encoder.layers.3.blocks.1.attn.qkv.weight": (960, 320),
        "image_encoder.layers.3.blocks.1.local_conv.c.weight": (320, 1, 3, 3),
        "image_encoder.layers.3.blocks.1.mlp.fc1.weight": (1280, 320),
        "image_encoder.norm_head.weight": (320,),
        "image_encoder.head.weight": (1000, 320),
        "image_encoder.neck.0.weight": (256, 320, 1, 1),
        "image_encoder.neck.3.bias": (256,),
        "prompt_encoder.no_mask_embed.weight": (1, 256),
        "mask_decoder.iou_token.weight": (1, 256),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any("attention_bias_idxs" in k for k in state)  # a non-persistent buffer, as in the original
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    loaded = mobile_sam[1].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_parameter_count_of_the_used_path():
    encoder = TinyViT()
    used = sum(p.numel() for k, p in encoder.named_parameters() if not k.startswith(("norm_head.", "head.")))
    assert 5.0e6 <= used <= 6.5e6, used  # "about 5.7 M parameters"


_BIAS = "image_encoder.layers.1.blocks.0.attn.attention_biases"


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda s: s.update({"image_encoder.layers.1.blocks.0.attn.bias_table": s.pop(_BIAS)}),
            f"missing {_BIAS}; unexpected image_encoder.layers.1.blocks.0.attn.bias_table",
        ),
        (lambda s: s.update({_BIAS: torch.zeros(4, 196)}), f"wrong shape {_BIAS} [4, 196] (expected [4, 49])"),
    ],
    ids=["renamed_key", "wrong_shape"],
)
def test_wrong_key_or_shape_is_refused_naming_it(mobile_sam, tmp_path, edit, message):
    state = read_checkpoint(mobile_sam[0])
    edit(state)
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    with pytest.raises(PersenseError, match="does not fit SAM vit_t: ") as error:
        load_sam("vit_t", path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_wrong_model_for_a_mobile_sam_checkpoint(mobile_sam):
    with pytest.raises(PersenseError, match="this is a vit_t SAM checkpoint but --model is vit_b; pass --model vit_t"):
        load_sam("vit_b", mobile_sam[0])


def _reference_block(block: TinyViTBlock, x: torch.Tensor) -> torch.Tensor:
    """The original's TinyViTBlock written out: zero-pad to a window multiple, then per window LayerNorm, qkv,
    softmax(q.k/sqrt(d) + bias[head, offset number]) over all window tokens (no mask), proj; crop; residual;
    local_conv; MLP with residual."""
    attn, size = block.attn, block.window
    _, h, w, c = x.shape
    head_dim = c // attn.num_heads
    padded = F.pad(x, (0, 0, 0, -w % size, 0, -h % size))[0]
    points = list(itertools.product(range(size), range(size)))
    numbers: dict[tuple[int, int], int] = {}  # offsets numbered in order of first appearance
    index = [[numbers.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(numbers)) for b in points] for a in points]
    bias = attn.attention_biases[:, torch.tensor(index)]
    out = torch.zeros_like(padded)
    for top, left in itertools.product(range(0, padded.shape[0], size), range(0, padded.shape[1], size)):
        tokens = padded[top : top + size, left : left + size].reshape(-1, c)
        qkv = attn.qkv(F.layer_norm(tokens, (c,), attn.norm.weight, attn.norm.bias, 1e-5))
        q, k, v = qkv.view(-1, attn.num_heads, 3, head_dim).permute(2, 1, 0, 3)
        weights = torch.softmax(q @ k.transpose(1, 2) / head_dim**0.5 + bias, dim=-1)
        window = attn.proj((weights @ v).transpose(0, 1).reshape(-1, c))
        out[top : top + size, left : left + size] = window.view(size, size, c)
    x = x + out[:h, :w][None]
    x = block.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return x + block.mlp(x)


def test_loaded_attention_biases_and_padding_as_the_original(mobile_sam):
    """A block of the loaded checkpoint (non-zero biases; 64x64 grid padded to 70x70 for window 14) computes what
    the written-out original computes, and the loaded biases matter."""
    block = mobile_sam[1].image_encoder.layers[2].blocks[0]
    assert block.window == 14 and block.attn.attention_biases.abs().max() > 0.1
    x = torch.randn(1, 64, 64, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = block(x)
        torch.testing.assert_close(got, _reference_block(block, x), atol=1e-5, rtol=1e-5)
        unbiased = copy.deepcopy(block)
        unbiased.attn.attention_biases.zero_()
        assert (unbiased(x) - got).abs().max() > 1e-3


def test_batchnorm_folding_keeps_outputs():
    torch.manual_seed(0)
    merging = PatchMerging(64, 128, 2).eval()
    _perturb(merging, 1)
    folded = fold_batchnorm(merging)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 64, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), merging(x), atol=FOLD_ATOL, rtol=FOLD_ATOL)


def test_onnx_encoder_matches_torch(mobile_sam, engines):
    """The exported encoder (BatchNorm folded) computes the loaded model: its error is within EMBED_ATOL, far
    below the change that the init (zero) attention biases would make, so the graph holds the loaded biases."""
    sam = mobile_sam[1]
    image = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    tensor = torch.as_tensor(SamTransform(image.shape[:2]).image_tensor(image))
    init_biases = copy.deepcopy(sam.image_encoder)
    for name, parameter in init_biases.named_parameters():
        if name.endswith("attention_biases"):
            parameter.data.zero_()
    with torch.no_grad():
        expected = sam.image_encoder(tensor).numpy()
        bias_effect = np.abs(init_biases(tensor).numpy() - expected).max()
    got = OrtEngine(engines / "sam_encoder.onnx", threads=2).run({"image": tensor.numpy()})["image_embeddings"]
    error = np.abs(got - expected).max()
    assert got.shape == (1, 256, 64, 64) and error <= EMBED_ATOL, error
    assert bias_effect > 100 * EMBED_ATOL, bias_effect
    manifest = load_manifest(engines)
    assert manifest.model_type == "vit_t" and manifest.artefacts["sam_encoder"].model_type == "vit_t"


def test_pipeline_matches_the_oracle(mobile_sam, engines, tmp_path):
    """The same machinery as tests/test_pipeline.py on a 3-disc scene (the oracle's full-size decoder costs about
    0.7 s of CPU per prompt)."""
    from conftest import draw_scene

    scene = draw_scene(rows=1, cols=3)
    np.save(tmp_path / "density.npy", scene["density"])
    counter = NpyDensityCounter(tmp_path / "density.npy")
    runtime = PerSensePipeline(SamEngines.from_manifest(load_manifest(engines), "ort-cpu", threads=2), counter)
    oracle = OraclePipeline(mobile_sam[1], counter)
    got = runtime.segment(scene["image"], runtime.reference(scene["image"], scene["reference"] > 0))
    expected = oracle.segment(scene["image"], oracle.reference(scene["image"], scene["reference"] > 0))
    assert len(expected.points) == 3 and got.count == expected.count == 3
    np.testing.assert_array_equal(got.points, expected.points)
    assert mask_iou(got.union > 0, expected.union > 0) >= 0.99
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4)


def test_default_checkpoint_is_weights_mobile_sam_pt(mobile_sam, tmp_path):
    from persense.export.exporter import resolve_checkpoint

    with pytest.raises(PersenseError, match="put mobile_sam.pt in"):
        resolve_checkpoint("vit_t", None, False, tmp_path)
    assert resolve_checkpoint("vit_t", None, False, mobile_sam[0].parent) == mobile_sam[0]
