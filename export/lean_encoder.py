"""SAM's image encoder for export with its global attentions computed in blocks of query rows.

A global-attention block of ViT-B/L/H attends 4096 tokens to 4096 tokens: its attention map (and the
relative-position terms added to it, and its softmax) is 4096 x 4096 per head, about 0.8 GB per copy for
ViT-B's 12 heads. Softmax is per query row, so computing the rows in blocks is exact; with 1024 query
rows per block the transient memory of the largest layer drops four-fold. Windowed blocks are unchanged.
This is the CPU export (`sam_encoder`, also TensorRT's source); on ONNX Runtime CUDA the runtime uses
`sam_encoder_gpu` (`gpu_encoder`: one fused attention per block, no row blocks) where it was exported.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from persense.export.sam_modeling import modeling

QUERY_ROWS = 16  # token rows of the 64x64 grid per block: 1024 queries


class RowBlockedAttention(nn.Module):
    """segment-anything's image-encoder Attention, computed `rows` query rows at a time."""

    def __init__(self, attention: nn.Module, rows: int = QUERY_ROWS) -> None:
        super().__init__()
        self.inner = attention
        self.rows = rows

    def forward(self, x: Tensor) -> Tensor:
        """Same output as Attention.forward (decomposed relative positions included)."""
        inner = self.inner
        b, h, w, _ = x.shape
        qkv = inner.qkv(x).reshape(b, h * w, 3, inner.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * inner.num_heads, h * w, -1).unbind(0)
        rel_h = modeling.image_encoder.get_rel_pos(h, h, inner.rel_pos_h)
        rel_w = modeling.image_encoder.get_rel_pos(w, w, inner.rel_pos_w)
        blocks = []
        for top in range(0, h, self.rows):
            bottom = min(h, top + self.rows)
            query = q[:, top * w:bottom * w]
            attn = (query * inner.scale) @ k.transpose(-2, -1)
            grid_q = query.reshape(query.shape[0], bottom - top, w, -1)
            term_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h[top:bottom])
            term_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w)
            attn = (attn.view(-1, bottom - top, w, h, w) + term_h[:, :, :, :, None]
                    + term_w[:, :, :, None, :]).view(-1, (bottom - top) * w, h * w)
            blocks.append(attn.softmax(dim=-1) @ v)
        out = torch.cat(blocks, dim=1)
        out = out.view(b, inner.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return inner.proj(out)


def lean_encoder(encoder: nn.Module, rows: int = QUERY_ROWS) -> nn.Module:
    """A copy of the image encoder whose global-attention blocks use RowBlockedAttention."""
    lean = copy.deepcopy(encoder)
    for block in lean.blocks:
        if block.window_size == 0 and block.attn.use_rel_pos:
            block.attn = RowBlockedAttention(block.attn, rows)
    return lean.eval()
