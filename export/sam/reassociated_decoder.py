"""The exported decoder: PerSamDecoder with its image-sized attention products re-associated.

In SAM's two-way transformer the few prompt tokens (T = 7 or 8) attend to 4096 image tokens and back.
Written as in segment-anything, every attention first projects all 4096 image tokens to the
128-wide attention space, once per prompt. Since T x heads (56-64) is smaller than that width, the
same products are computed here with the projection weights moved onto the token side:

- tokens -> image: `softmax((q W_k) K^T)` and `(attn K) W_v^T + b_v` instead of projecting K;
  the key bias adds a constant per query row, which softmax ignores; value rows of attn sum to 1.
- image -> tokens: `(k W_q) Q^T + b_q k^T` and `attn^T (v W_out^T + b_out / heads)` instead of projecting Q and
  the output; each image token's attention sums to 1 per head, so the output bias rides on the T token rows.

The mask upscaling (two stride-2 transposed convolutions with a channel LayerNorm) is written as
per-pixel matrix products on token-major data, with the LayerNorm over the last axis, which avoids
NCHW channel reductions; the output pixels are reordered once at the end. Each of the two products runs in its own
`NamedProduct` module, so its ONNX node carries a stable name (`--int8` quantises these two only).

This is exact algebra (float rounding aside; tests hold it to 1e-4 of the literal module) and halves the
multiply-adds of the transformer per prompt. The token MLPs and the prediction heads are unchanged.

Laid out for ONNX Runtime's CPU kernels (each choice measured in benchmarks/README.md "CPU decoder levers"):
the image-to-token softmax runs over T on a (B,h,T,N) layout, not over a 7-wide last axis; the residual LayerNorm
of the image tokens is applied on a (B,64,64,C) view, which ORT keeps as Add + LayerNormalization (the 3-D form
becomes the slower SkipLayerNormalization); the upscaling products are 2-D over all prompts' pixels with their
biases tiled per output pixel, so ORT runs each as one Gemm with its bias and the GELU after it alone (not as
BiasGelu); the dense prompt reaches the image tokens through a token-major product, not a 256-channel NCHW
convolution + transpose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persense.export.sam.modeling import Sam
from persense.export.sam.persam_decoder import PerSamDecoder


def _head_weights(linear: nn.Linear, heads: int) -> Tensor:
    """A (out, in) projection as per-head blocks (heads, out // heads, in)."""
    out, inp = linear.weight.shape
    return linear.weight.reshape(heads, out // heads, inp)


def tokens_to_image(
    module: nn.Module, q: Tensor, k: Tensor, v: Tensor, attn_sim: Tensor | None = None, guided: Tensor | None = None
) -> Tensor:
    """Attention of few query tokens (B,T,C) over many image tokens k, v (B,N,C), re-associated."""
    heads = module.num_heads
    b, t, _ = q.shape
    query = module.q_proj(q).reshape(b, t, heads, -1).transpose(1, 2)  # (B,h,T,d)
    d = query.shape[-1]
    qk = torch.einsum("bhtd,hdc->bhtc", query, _head_weights(module.k_proj, heads)) / math.sqrt(d)
    scores = (qk.reshape(b, heads * t, -1) @ k.transpose(1, 2)).reshape(b, heads, t, -1)
    attn = torch.softmax(scores, dim=-1)
    if attn_sim is not None:
        attn = torch.where(guided, torch.softmax(attn + attn_sim, dim=-1), attn)
    pooled = (attn.reshape(b, heads * t, -1) @ v).reshape(b, heads, t, -1)  # (B,h,T,C)
    out = torch.einsum("bhtc,hdc->bhtd", pooled, _head_weights(module.v_proj, heads))
    out = out + module.v_proj.bias.reshape(heads, 1, d)
    return module.out_proj(out.transpose(1, 2).reshape(b, t, heads * d))


def image_to_tokens(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of many image tokens q (B,N,C) over few tokens k, v (B,T,C), re-associated; the softmax over the T
    tokens reduces across rows of N contiguous scores (B,h,T,N)."""
    heads = module.num_heads
    b, t, _ = k.shape
    key = module.k_proj(k).reshape(b, t, heads, -1).transpose(1, 2)  # (B,h,T,d)
    value = module.v_proj(v).reshape(b, t, heads, -1).transpose(1, 2)
    d = key.shape[-1]
    kq = torch.einsum("bhtd,hdc->bhtc", key, _head_weights(module.q_proj, heads)) / math.sqrt(d)  # (B,h,T,C)
    bias = (key @ module.q_proj.bias.reshape(heads, d, 1)) / math.sqrt(d)  # (B,h,T,1)
    scores = (kq.reshape(b, heads * t, -1) @ q.transpose(1, 2)).reshape(b, heads, t, -1) + bias  # (B,h,T,N)
    attn = torch.exp(scores - scores.amax(dim=2, keepdim=True))
    attn = (attn / attn.sum(dim=2, keepdim=True)).reshape(b, heads * t, -1)
    w_out = module.out_proj.weight.reshape(-1, heads, d).permute(1, 2, 0)  # (h,d,C)
    projected = (value @ w_out).reshape(b, heads * t, -1) + module.out_proj.bias / heads  # (B,hT,C)
    return attn.transpose(1, 2) @ projected


class NamedProduct(nn.Module):
    """`x @ weight` as its own module, so the exported graph names its MatMul node after the attribute holding it."""

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight


# the upscaling's two per-pixel products, by their module (= ONNX node) names: what the --int8 decoder quantises
UPSCALE_PRODUCTS = ("upscale_product_1", "upscale_product_2")


def image_norm(norm: nn.Module, keys: Tensor, update: Tensor) -> Tensor:
    """Residual add and LayerNorm of the image tokens (B,N,C), computed on a (B,rows,cols,C) view so that ONNX
    Runtime does not fuse them into SkipLayerNormalization (a 3-D-only fusion, slower here)."""
    b, n, c = keys.shape
    rows = math.isqrt(n)
    grid = (b, rows, n // rows, c)
    return norm(keys.reshape(grid) + update.reshape(grid)).reshape(b, n, c)


class ReassociatedDecoder(PerSamDecoder):
    """PerSamDecoder with the re-associated attentions (same inputs, outputs, weights and `best_only` forms)."""

    tokens_to_image = staticmethod(tokens_to_image)
    image_to_tokens = staticmethod(image_to_tokens)
    image_norm = staticmethod(image_norm)

    def __init__(self, sam: Sam, best_only: bool = False) -> None:
        super().__init__(sam, best_only)
        for name in UPSCALE_PRODUCTS:
            setattr(self, name, NamedProduct())

    def image_tokens(self, image_embeddings: Tensor, mask_input: Tensor, has_mask_input: Tensor) -> Tensor:
        """The embedding plus the dense prompt as tokens (B,N,C): the mask branch's last 1x1 convolution is a product
        on token-major data (its 16 input channels transposed instead of 256 output channels), with the has-mask
        choice as one more input channel: use (x W + b) + (1 - use) e = [use x, use] [W; b - e] + e."""
        pe = self.prompt_encoder
        last = pe.mask_downscaling[-1]
        x = pe.mask_downscaling[:-1](mask_input).flatten(2).transpose(1, 2)  # (B,N,16)
        use = has_mask_input.reshape(-1, 1, 1)
        no_mask = pe.no_mask_embed.weight  # (1,C)
        weight = torch.cat([last.weight.flatten(1).T, last.bias.reshape(1, -1) - no_mask])  # (17,C)
        inputs = torch.cat([x * use, use.expand(-1, x.shape[1], 1)], dim=-1)
        return inputs @ weight + (image_embeddings.flatten(2).transpose(1, 2) + no_mask)

    def masks(self, keys: Tensor, hyper_in: Tensor, grid: int) -> Tensor:
        """output_upscaling + hypernetwork product as matrix products on (B, pixels, channels) data; each transposed
        convolution is one 2-D product over every prompt's pixels, its bias tiled over the 4 output pixels."""
        up1, norm, _, up2, _ = self.mask_decoder.output_upscaling
        b, n, c = keys.shape
        c1, c2 = up1.out_channels, up2.out_channels
        w1 = up1.weight.permute(0, 2, 3, 1).reshape(up1.in_channels, 4 * c1)  # (C, (a, b, o))
        h1 = (self.upscale_product_1(keys.reshape(b * n, c), w1) + up1.bias.repeat(4)).reshape(b, n * 4, c1)
        h1 = F.gelu(F.layer_norm(h1, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)  # (o, (p, q, r))
        h2 = F.gelu(self.upscale_product_2(h1.reshape(b * n * 4, c1), w2) + up2.bias.repeat(4)).reshape(b, n * 16, c2)
        logits = (h2 @ hyper_in.transpose(1, 2)).reshape(b, grid, grid, 2, 2, 2, 2, -1)  # (b, i, j, a, b, p, q, m)
        side = grid * 4
        return logits.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, -1, side, side)
