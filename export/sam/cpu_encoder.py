"""SAM's image encoder for the CPU export: global attention in blocks of query rows, lean windowed blocks.

A global-attention block of ViT-B/L/H attends 4096 tokens to 4096 tokens: its attention map (and the
relative-position terms added to it, and its softmax) is 4096 x 4096 per head, about 0.8 GB per copy for
ViT-B's 12 heads. Softmax is per query row, so computing the rows in blocks is exact; with 512 query rows
(8 token rows) per block the transient memory of the largest layer drops eight-fold.

A windowed block (`WindowedBlock`) computes what segment-anything's Block does with fewer memory passes:
the windows are cut from the qkv projection by one transpose (not from the input, then again per head), the
output is put back by one transpose and cropped before the output projection (which then runs on 4096 tokens,
not on the 4900 of the padded grid), and the relative-position terms are folded into the query-key product
(q' = [q * scale, q.Rh, q.Rw], k' = [k, one-hot key row, one-hot key column]), so no broadcast additions over
the 196 x 196 maps remain. Both are exact up to float rounding.
This is the CPU export (`sam_encoder`, also TensorRT's source); on ONNX Runtime CUDA the runtime uses
`sam_encoder_gpu` (`gpu_encoder`: one fused attention per block, no row blocks) where it was exported.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persense.export.sam.modeling import modeling

QUERY_ROWS = 8  # token rows of the 64x64 grid per block: 512 queries

get_rel_pos = modeling.image_encoder.get_rel_pos


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
        rel_h = get_rel_pos(h, h, inner.rel_pos_h)
        rel_w = get_rel_pos(w, w, inner.rel_pos_w)
        blocks = []
        for top in range(0, h, self.rows):
            bottom = min(h, top + self.rows)
            query = q[:, top * w : bottom * w]
            attn = (query * inner.scale) @ k.transpose(-2, -1)
            grid_q = query.reshape(query.shape[0], bottom - top, w, -1)
            term_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h[top:bottom])
            term_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w)
            attn = (attn.view(-1, bottom - top, w, h, w) + term_h[:, :, :, :, None] + term_w[:, :, :, None, :]).view(
                -1, (bottom - top) * w, h * w
            )
            blocks.append(attn.softmax(dim=-1) @ v)
        out = torch.cat(blocks, dim=1)
        out = out.view(b, inner.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return inner.proj(out)


def key_positions(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """[rows*cols, rows+cols]: each key's one-hot row, then its one-hot column (row-major keys)."""
    key_row = torch.eye(rows, dtype=dtype).repeat_interleave(cols, dim=0)
    key_col = torch.eye(cols, dtype=dtype).repeat(rows, 1)
    return torch.cat([key_row, key_col], dim=1)


def folded_logits(q: Tensor, k: Tensor, attention: nn.Module, size: int) -> Tensor:
    """Attention logits of `size` x `size` windows with decomposed relative positions, as one product.

    q/k [N, S, C] (S = size * size) -> [N, S, S] = scale q.k + q.Rh[query row, key row] + q.Rw[query column,
    key column], computed as q'.k' with q' = [q * scale, q.Rh, q.Rw] and k' = [k, one-hot key row and column].
    """
    n, s, c = q.shape
    grid = q.reshape(n, size, size, c)
    term_h = torch.einsum("bhwc,hkc->bhwk", grid, get_rel_pos(size, size, attention.rel_pos_h)).reshape(n, s, size)
    term_w = torch.einsum("bhwc,wkc->bhwk", grid, get_rel_pos(size, size, attention.rel_pos_w)).reshape(n, s, size)
    query = torch.cat([q * attention.scale, term_h, term_w], dim=-1)
    # zero-padding k and adding the padded one-hot table broadcasts it over the windows without a stored copy
    key = F.pad(k, (0, 2 * size)) + F.pad(key_positions(size, size, q.dtype), (c, 0))
    return query @ key.transpose(-2, -1)


class WindowedBlock(nn.Module):
    """segment-anything's windowed Block (window attention, MLP, residuals) with fewer memory passes; it keeps
    the Block's submodules and attribute names (norm1, attn, norm2, mlp, window_size)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size

    def forward(self, x: Tensor) -> Tensor:
        """Same output as Block.forward with window_size > 0 and relative positions."""
        attention, size = self.attn, self.window_size
        heads = attention.num_heads
        b, h, w, c = x.shape
        pad_h, pad_w = -h % size, -w % size
        rows, cols = (h + pad_h) // size, (w + pad_w) // size
        # padded tokens are zeros after norm1, as in window_partition: their keys and values are qkv's bias
        qkv = attention.qkv(F.pad(self.norm1(x), (0, 0, 0, pad_w, 0, pad_h)))
        qkv = qkv.reshape(b, rows, size, cols, size, 3, heads, c // heads).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, b * rows * cols * heads, size * size, c // heads).unbind(0)
        out = folded_logits(q, k, attention, size).softmax(dim=-1) @ v
        out = out.view(b, rows, cols, heads, size, size, -1).permute(0, 1, 4, 2, 5, 3, 6)
        x = x + attention.proj(out.reshape(b, rows * size, cols * size, c)[:, :h, :w])
        return x + self.mlp(self.norm2(x))


def cpu_encoder(encoder: nn.Module, rows: int = QUERY_ROWS) -> nn.Module:
    """A copy of the image encoder with RowBlockedAttention in its global blocks and WindowedBlock for the others."""
    lean = copy.deepcopy(encoder)
    for i, block in enumerate(lean.blocks):
        if block.window_size == 0 and block.attn.use_rel_pos:
            block.attn = RowBlockedAttention(block.attn, rows)
        elif block.window_size > 0 and block.attn.use_rel_pos:
            lean.blocks[i] = WindowedBlock(block)
    return lean.eval()
