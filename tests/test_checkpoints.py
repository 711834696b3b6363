"""SAM checkpoints in the original layout load strictly; wrong, corrupt and missing files give clear errors."""

from __future__ import annotations

import pytest
import torch

from persense.export.checkpoints import read_checkpoint
from persense.export.exporter import resolve_checkpoint
from persense.export.sam.build import BUNDLED_CHECKPOINTS, build_sam, load_sam
from persense.runtime.errors import PersenseError


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """A vit_b checkpoint written as the official sam_vit_b_01ec64.pth is: a bare state dict."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_01ec64.pth"
    torch.save(build_sam("vit_b").state_dict(), path)
    return path


def test_original_layout_loads_with_every_key(vit_b_checkpoint):
    state = read_checkpoint(vit_b_checkpoint)
    sam = load_sam("vit_b", vit_b_checkpoint)
    assert set(sam.state_dict()) == set(state)
    for key in ("image_encoder.pos_embed", "mask_decoder.iou_token.weight", "prompt_encoder.no_mask_embed.weight"):
        assert torch.equal(sam.state_dict()[key], state[key])


def test_wrong_model_type_names_the_right_one(vit_b_checkpoint):
    with pytest.raises(PersenseError, match="vit_b SAM checkpoint but --model is vit_l; pass --model vit_b"):
        load_sam("vit_l", vit_b_checkpoint)


def test_truncated_file(vit_b_checkpoint, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(vit_b_checkpoint.read_bytes()[:1_000_000])
    with pytest.raises(PersenseError, match="not a readable PyTorch checkpoint"):
        load_sam("vit_b", broken)


def test_missing_file_and_not_a_sam_checkpoint(tmp_path):
    with pytest.raises(PersenseError, match="checkpoint not found"):
        load_sam("vit_b", tmp_path / "absent.pth")
    other = tmp_path / "counter.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, other)
    with pytest.raises(PersenseError, match="not a SAM checkpoint"):
        load_sam("vit_b", other)


def test_missing_key_is_refused(vit_b_checkpoint, tmp_path):
    state = read_checkpoint(vit_b_checkpoint)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(PersenseError, match="does not fit SAM vit_b"):
        load_sam("vit_b", path)


def test_default_checkpoint_location(tmp_path, vit_b_checkpoint):
    with pytest.raises(PersenseError, match="put sam_vit_h_4b8939.pth in"):
        resolve_checkpoint("vit_h", None, False, tmp_path)
    assert resolve_checkpoint("vit_b", None, False, vit_b_checkpoint.parent) == vit_b_checkpoint
    assert resolve_checkpoint("vit_b", None, True, tmp_path) is None


def test_tiny_loads_a_given_checkpoint(tmp_path):
    """--model tiny is random by default but loads --checkpoint when given (it once ignored it silently)."""
    weights = BUNDLED_CHECKPOINTS["tiny-trained"]
    assert resolve_checkpoint("tiny", None, False, tmp_path) is None
    assert resolve_checkpoint("tiny", weights, False, tmp_path) == weights
    assert resolve_checkpoint("tiny", weights, True, tmp_path) is None
