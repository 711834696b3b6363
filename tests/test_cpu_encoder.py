"""The CPU encoder export (export/sam/cpu_encoder.py): lean windowed blocks and row-blocked global attention
against segment-anything's modules, in PyTorch and through ONNX Runtime, with non-zero relative positions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from persense.export.onnx_io import export_onnx
from persense.export.sam.cpu_encoder import RowBlockedAttention, WindowedBlock, cpu_encoder, key_positions
from persense.export.sam.modeling import modeling
from persense.runtime.backends.ort_engine import OrtEngine

TORCH_ATOL = 2e-5  # same math, other summation order (float32, activations ~1-5)
ORT_ATOL = 2e-4


def _with_rel_pos(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`module` with random relative-position tables (SAM initialises them to zero, which would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if "rel_pos" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.5
    return module


def _block(window: int, dim: int = 64, heads: int = 4) -> torch.nn.Module:
    """A segment-anything Block with relative positions, random weights and tables."""
    torch.manual_seed(1)
    size = (window, window) if window else (64, 64)
    block = modeling.image_encoder.Block(dim, heads, use_rel_pos=True, window_size=window, input_size=size)
    return _with_rel_pos(block).eval()


def test_key_positions_one_hot_row_then_column() -> None:
    table = key_positions(2, 3, torch.float32)
    assert table.shape == (6, 5)
    assert table[4].tolist() == [0, 1, 0, 1, 0]  # key 4 = row 1, column 1
    assert (table.sum(dim=1) == 2).all()


@pytest.mark.parametrize("height,width", [(64, 64), (56, 56), (30, 45)])  # padded, exact windows, uneven pads
def test_windowed_block_matches_segment_anything(height: int, width: int) -> None:
    block = _block(14)
    x = torch.randn(1, height, width, 64)
    with torch.no_grad():
        torch.testing.assert_close(WindowedBlock(block)(x), block(x), atol=TORCH_ATOL, rtol=0)


def test_windowed_block_through_onnx_runtime(tmp_path) -> None:
    block = _block(14)
    x = torch.randn(1, 64, 64, 64)
    path = tmp_path / "block.onnx"
    with torch.no_grad():
        expected = block(x).numpy()
        export_onnx(WindowedBlock(block).eval(), (x,), path, ["x"], ["y"])
    got = OrtEngine(path, threads=2).run({"x": x.numpy()})["y"]
    assert np.abs(got - expected).max() <= ORT_ATOL


def test_cpu_encoder_replaces_every_block_and_matches(tiny_sam) -> None:
    encoder = _with_rel_pos(copy.deepcopy(tiny_sam.image_encoder))  # the fixture is shared: not in place
    lean = cpu_encoder(encoder, rows=5)  # 5 does not divide 64: a short last row block
    kinds = [(isinstance(b, WindowedBlock), isinstance(b.attn, RowBlockedAttention)) for b in lean.blocks]
    assert kinds == [(b.window_size > 0, b.window_size == 0) for b in encoder.blocks]
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(lean(image), encoder(image), atol=TORCH_ATOL, rtol=0)
