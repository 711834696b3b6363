"""Build SAM (vit_h / vit_l / vit_b / vit_t / tiny) with random weights or from the original checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from persense.export.checkpoints import load_strict, read_checkpoint
from persense.export.sam.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from persense.export.sam.tiny_vit import TinyViT, TinyViTConfig
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import GRID, LONG_SIDE, PATCH_SIZE, PIXEL_MEAN, PIXEL_STD
from persense.runtime.models.sam import EMBED_DIM


@dataclass(frozen=True)
class VitConfig:
    """Hyper-parameters of segment-anything's ImageEncoderViT."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14


@dataclass(frozen=True)
class SamConfig:
    """Encoder/decoder hyper-parameters of one SAM variant."""

    encoder: VitConfig | TinyViTConfig
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_h": SamConfig(VitConfig(1280, 32, 16, (7, 15, 23, 31))),
    "vit_l": SamConfig(VitConfig(1024, 24, 16, (5, 11, 17, 23))),
    "vit_b": SamConfig(VitConfig(768, 12, 12, (2, 5, 8, 11))),
    # MobileSAM: a TinyViT-5M image encoder with SAM's prompt encoder and mask decoder (SPEC-PLUSPLUS.md section 9)
    "vit_t": SamConfig(TinyViTConfig()),
    # Same I/O as the real models (1024 input, 256x64x64 embedding), a fraction of the compute: for tests.
    "tiny": SamConfig(VitConfig(32, 2, 2, (1,)), decoder_mlp_dim=128, iou_head_hidden_dim=64),
}
# The tiny configuration with the project's own weights: trained on persense-synth scenes by
# persense-train-tiny (export/training/train_tiny.py) and committed; it really segments synthetic objects.
SAM_CONFIGS["tiny-trained"] = SAM_CONFIGS["tiny"]
BUNDLED_CHECKPOINTS = {"tiny-trained": Path(__file__).resolve().parents[2] / "assets" / "tiny_sam.pt"}

CHECKPOINT_NAMES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_t": "mobile_sam.pt",
}
TINY_VIT_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # only a MobileSAM checkpoint has it
VIT_KEY = "image_encoder.patch_embed.proj.weight"


def is_tiny_vit(model_type: str) -> bool:
    """Whether `model_type`'s image encoder is TinyViT (MobileSAM) rather than segment-anything's ViT."""
    return model_type in SAM_CONFIGS and isinstance(SAM_CONFIGS[model_type].encoder, TinyViTConfig)


def _image_encoder(cfg: VitConfig | TinyViTConfig) -> torch.nn.Module:
    """The image encoder of a configuration (random initialisation)."""
    if isinstance(cfg, TinyViTConfig):
        return TinyViT(cfg, LONG_SIDE)
    return ImageEncoderViT(
        depth=cfg.depth,
        embed_dim=cfg.embed_dim,
        img_size=LONG_SIDE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=cfg.num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=cfg.global_attn_indexes,
        window_size=cfg.window_size,
        out_chans=EMBED_DIM,
    )


def build_sam(model_type: str) -> Sam:
    """An eval-mode SAM of the given type with default (random) initialisation."""
    if model_type not in SAM_CONFIGS:
        raise PersenseError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_CONFIGS)}")
    cfg = SAM_CONFIGS[model_type]
    sam = Sam(
        image_encoder=_image_encoder(cfg.encoder),
        prompt_encoder=PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(GRID, GRID),
            input_image_size=(LONG_SIDE, LONG_SIDE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=cfg.decoder_mlp_dim, num_heads=8),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=PIXEL_MEAN.tolist(),
        pixel_std=PIXEL_STD.tolist(),
    )
    return sam.eval()


def random_sam(model_type: str, seed: int = 0) -> Sam:
    """A SAM with seeded random weights (no checkpoint needed)."""
    torch.manual_seed(seed)
    return build_sam(model_type)


def _guess_model_type(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Which SAM variant a state dict belongs to: MobileSAM by its TinyViT keys, ViTs by encoder width and depth."""
    if TINY_VIT_KEY in state_dict:
        return next(name for name in SAM_CONFIGS if is_tiny_vit(name))
    weight = state_dict.get(VIT_KEY)
    if weight is None:
        return None
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, cfg in SAM_CONFIGS.items():
        encoder = cfg.encoder
        if isinstance(encoder, VitConfig) and encoder.embed_dim == weight.shape[0] and encoder.depth == depth:
            return name
    return None


def bundled_or_random_sam(model_type: str, seed: int = 0) -> Sam:
    """The weights this project ships for `model_type` (tiny-trained), else seeded random weights."""
    if model_type in BUNDLED_CHECKPOINTS:
        return load_sam(model_type, BUNDLED_CHECKPOINTS[model_type])
    return random_sam(model_type, seed)


def load_sam(model_type: str, checkpoint: str | Path) -> Sam:
    """A SAM built for `model_type` with the original checkpoint's weights (strict key and shape match)."""
    state_dict = read_checkpoint(checkpoint)
    if not isinstance(state_dict, dict) or not (VIT_KEY in state_dict or TINY_VIT_KEY in state_dict):
        raise PersenseError(f"{checkpoint}: not a SAM checkpoint (no image_encoder weights)")
    guessed = _guess_model_type(state_dict)
    if guessed is None or SAM_CONFIGS[guessed] != SAM_CONFIGS[model_type]:
        raise PersenseError(
            f"{checkpoint}: this is a {guessed or 'unknown'} SAM checkpoint but --model is "
            f"{model_type}; pass --model {guessed}"
            if guessed
            else f"{checkpoint}: SAM checkpoint of unknown size; expected {model_type}"
        )
    sam = build_sam(model_type)
    load_strict(sam, state_dict, f"{checkpoint}: does not fit SAM {model_type}")
    return sam
