"""The tiny SAM's training forward on crops of the 1024 frame, and SAM's losses.

The encoder runs on a crop with its positional embedding and its global blocks' relative-position
tables sliced at the crop's offset (exactly what those cells see in the full frame); the decoder is the
exported PerSAM decoder with its dense positional encoding sliced the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persense.export.sam.modeling import Sam, modeling
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.runtime.models.sam import EMBED_DIM

add_decomposed_rel_pos = modeling.image_encoder.add_decomposed_rel_pos
FOCAL_WEIGHT, DICE_WEIGHT = 20.0, 1.0


def _global_attention(attn: nn.Module, x: Tensor, offset: tuple[int, int], grid: int) -> Tensor:
    """segment-anything's Attention.forward on a crop, with the relative-position tables of its size."""
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * attn.num_heads, h * w, -1).unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    centre = grid - 1  # index of distance 0 in the full frame's (2 * grid - 1)-row tables
    rel_h = attn.rel_pos_h[centre - (h - 1) : centre + h]
    rel_w = attn.rel_pos_w[centre - (w - 1) : centre + w]
    scores = add_decomposed_rel_pos(scores, q, rel_h, rel_w, (h, w), (h, w)).softmax(dim=-1)
    out = (scores @ v).view(b, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def encode_crop(sam: Sam, image: Tensor, offset: tuple[int, int]) -> Tensor:
    """Image embeddings (B, 256, g, g) of normalised crops (B, 3, 16g, 16g) at a (row, col) cell offset."""
    encoder = sam.image_encoder
    grid = encoder.pos_embed.shape[1]
    x = encoder.patch_embed(image)
    g = x.shape[1]
    x = x + encoder.pos_embed[:, offset[0] : offset[0] + g, offset[1] : offset[1] + g]
    for block in encoder.blocks:
        if block.window_size > 0:
            x = block(x)
        else:
            x = x + _global_attention(block.attn, block.norm1(x), offset, grid)
            x = x + block.mlp(block.norm2(x))
    return encoder.neck(x.permute(0, 3, 1, 2))


class CropDecoder(PerSamDecoder):
    """The PerSAM decoder on a crop: its dense positional encoding is the crop's slice of the full one."""

    def __init__(self, sam: Sam) -> None:
        super().__init__(sam)
        self.full_pe = self.image_pe

    def at(self, offset: tuple[int, int], grid: int) -> CropDecoder:
        """Point the decoder at the crop of `grid` cells starting at `offset`; returns self."""
        self.image_pe = self.full_pe[:, :, offset[0] : offset[0] + grid, offset[1] : offset[1] + grid]
        return self

    def decode(
        self,
        embedding: Tensor,
        coords: Tensor,
        labels: Tensor,
        mask_input: Tensor | None = None,
        target: Tensor | None = None,
        attn_sim: Tensor | None = None,
        guided: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, 4, 4g, 4g) logits and (B, 4) IoU predictions; optional mask input and PerSAM guidance."""
        batch, grid = coords.shape[0], embedding.shape[-1]
        no_mask = mask_input is None
        mask_input = torch.zeros(batch, 1, 4 * grid, 4 * grid) if no_mask else mask_input
        return self(
            embedding,
            coords,
            labels,
            mask_input,
            torch.full((batch,), 0.0 if no_mask else 1.0),
            torch.zeros(1, EMBED_DIM) if target is None else target,
            torch.zeros(1, grid * grid) if attn_sim is None else attn_sim,
            torch.zeros(batch) if guided is None else guided,
        )


def location_prior(embedding: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """PerSAM's target embedding (256,) from one instance's cells, and every cell's standardised cosine
    similarity to it (g*g,): the location prior whose arg-max places PerSense's first point.

    The original standardises the cosine similarity at the image's size before resampling it to the
    64x64 grid; here it is standardised on the grid directly.
    """
    feats = embedding[0].flatten(1)  # (256, g*g)
    cells = F.interpolate(reference[None, None].float(), size=embedding.shape[-2:], mode="bilinear")[0, 0]
    weights = (cells.flatten() > 0).float()
    if weights.sum() == 0:
        weights = (cells.flatten() == cells.max()).float()
    target = (feats * weights).sum(1) / weights.sum()
    sim = F.normalize(target, dim=0) @ F.normalize(feats, dim=0)
    return target, (sim - sim.mean()) / sim.std()


def guidance(embedding: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """PerSAM's target embedding (1, 256) and attention similarity (1, g*g) from one instance's cells."""
    target, prior = location_prior(embedding, reference)
    return target[None], prior.sigmoid()[None]


def prior_loss(embedding: Tensor, reference: Tensor, instances: Tensor) -> Tensor:
    """Logistic loss making the location prior positive on the cells of every instance like the reference
    (area share > 0.5) and negative on background and distractors: the similarity PerSense's first point
    and the SAM-only counter search."""
    on = F.interpolate(instances[None, None].float(), size=embedding.shape[-2:], mode="area")[0, 0].flatten() > 0.5
    return F.binary_cross_entropy_with_logits(location_prior(embedding, reference)[1], on.float())


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss per mask, averaged over pixels: (..., H, W) -> (...).

    alpha = 0.5 weighs both classes alike: with detection's 0.25 the optimum for an uncertain pixel lies well
    below p = 0.5, and a young model's masks stay empty at SAM's threshold of 0 long after they have the shape.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Soft dice loss per mask: (..., H, W) -> (...)."""
    prob = logits.sigmoid().flatten(-2)
    target = target.flatten(-2)
    return 1 - (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)


def mask_iou(logits: Tensor, target: Tensor) -> Tensor:
    """IoU of the thresholded logits with the target, per mask (no gradient)."""
    pred = (logits > 0).flatten(-2)
    target = target.flatten(-2) > 0.5
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, (pred & target).sum(-1).float() / union.clamp(min=1), torch.ones_like(union))


def sam_loss(logits: Tensor, iou_pred: Tensor, target: Tensor, multimask: bool) -> tuple[Tensor, Tensor]:
    """SAM's loss for a batch (20:1 focal:dice, + MSE on predicted IoU) and the chosen masks' IoU.

    multimask: outputs 1..3, loss on the best of the three (ambiguous single-point prompts);
    otherwise output 0 alone. The IoU head learns the actual IoU of every output it is shown.
    """
    pick = slice(1, 4) if multimask else slice(0, 1)
    logits = F.interpolate(logits[:, pick], size=target.shape[-2:], mode="bilinear", align_corners=False)
    expanded = target[:, None].expand_as(logits)
    mask_loss = FOCAL_WEIGHT * focal_loss(logits, expanded) + DICE_WEIGHT * dice_loss(logits, expanded)
    actual = mask_iou(logits.detach(), expanded)
    best = mask_loss.argmin(1, keepdim=True)
    iou_loss = F.mse_loss(iou_pred[:, pick], actual)
    return mask_loss.gather(1, best).mean() + iou_loss, actual.gather(1, best)[:, 0]
