"""MobileSAM's image encoder (TinyViT-5M at 1024 input) with the original checkpoint's `image_encoder.*` keys.

Written from the architecture in SPEC-PLUSPLUS.md section 9. Two behaviours of the original are kept on purpose:
- a windowed block pads its grid bottom/right with zeros to a window multiple and attends without a mask; the
  LayerNorm sits inside the attention, so the padded tokens enter it as the LayerNorm bias and take part;
- the per-head attention bias is a table indexed by (|dy|, |dx|). The original caches the gathered table when
  `.eval()` runs (so a model loaded after `.eval()` keeps the init values until `.eval()` runs again); here the
  table is gathered in every forward, so the loaded biases are always the ones used (and exported: the gather of
  two constants is folded by the ONNX simplifier).
`norm_head` and `head` (the ImageNet classifier) exist only so that the checkpoint loads strictly; they are unused.
BatchNorm is folded into the convolutions for export by `fold_batchnorm`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persense.export.sam.modeling import LayerNorm2d
from persense.runtime.geometry.transforms import LONG_SIDE
from persense.runtime.models.sam import EMBED_DIM

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as the original (the neck's LayerNorm2d: 1e-6)


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT hyper-parameters (the defaults: MobileSAM's tiny_vit_5m at 1024 input)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0 is convolutional: its entry is unused
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)  # the last merging keeps 64x64 (the original: out dim 320/448/576)
    mlp_ratio: int = 4
    mbconv_expand_ratio: int = 4
    local_conv_size: int = 3
    num_classes: int = 1000  # the unused classifier `head`


class Conv2dBN(nn.Sequential):
    """Bias-free convolution `c` then BatchNorm `bn` (the original's Conv2d_BN keys)."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn_weight_init: float = 1.0
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def folded(self) -> nn.Conv2d:
        """One convolution with the (eval-mode) BatchNorm folded into its weight and bias."""
        conv, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups
        )
        with torch.no_grad():
            fused.weight.copy_(conv.weight * scale[:, None, None, None])
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of `module` with every Conv2dBN replaced by its folded convolution (fewer ops to export)."""
    folded = copy.deepcopy(module).eval()
    for parent in list(folded.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Conv2dBN):
                setattr(parent, name, child.folded())
    return folded


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = dim * expand_ratio
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,C,H,W]."""
        y = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return F.gelu(x + y)


class PatchMerging(nn.Module):
    """1x1 conv, GELU, depthwise 3x3 with `stride`, GELU, 1x1 conv: the change of width between stages."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,out_dim,H/stride,W/stride]."""
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def bias_index(window: int) -> Tensor:
    """[S,S] (S = window²): the bias-table column of each query/key pair, |dy| * window + |dx| (row-major tokens).

    This is the original's numbering (offsets numbered in order of first appearance, which from query (0, 0)
    is row-major over (|dy|, |dx|))."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()


class Attention(nn.Module):
    """Window self-attention: LayerNorm, qkv (per head: q, k, v), softmax(q.k * scale + learned bias), proj."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", bias_index(window), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """[W,S,C] windows of S tokens -> [W,S,C]."""
        n, s, c = x.shape
        qkv = self.qkv(self.norm(x)).view(n, s, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # gathered now: always the loaded values
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, s, c))


class Mlp(nn.Module):
    """LayerNorm, fc1, GELU, fc2 (the residual is the block's)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """[..., C] -> [..., C]."""
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Padded window attention (no mask) with residual, depthwise Conv-BN `local_conv`, MLP with residual."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: int, local_conv_size: int) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B,H,W,C] -> [B,H,W,C]."""
        b, h, w, c = x.shape
        size = self.window
        padded = F.pad(x, (0, 0, 0, -w % size, 0, -h % size))  # zeros; attention's LayerNorm turns them into its bias
        rows, cols = padded.shape[1] // size, padded.shape[2] // size
        windows = padded.view(b, rows, size, cols, size, c).transpose(2, 3).reshape(-1, size * size, c)
        out = self.attn(windows).view(b, rows, cols, size, size, c).transpose(2, 3)
        x = x + out.reshape(b, rows * size, cols * size, c)[:, :h, :w]
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class Stage(nn.Module):
    """A stage's `blocks` then its optional `downsample` (PatchMerging), NCHW in and out."""

    def __init__(self, blocks: list[nn.Module], downsample: PatchMerging | None, channels_last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.channels_last = channels_last  # attention blocks work on [B,H,W,C]

    def forward(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,C',H',W']."""
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Two stride-2 Conv-BN with a GELU between: [B,3,1024,1024] -> [B,C,256,256]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(3, dim // 2, 3, 2), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2))

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] -> [B,C,H/4,W/4]."""
        return self.seq(x)


class TinyViT(nn.Module):
    """MobileSAM's image encoder: `image` [B,3,1024,1024] (normalised, padded) -> embeddings [B,256,64,64]."""

    def __init__(self, cfg: TinyViTConfig | None = None, img_size: int = LONG_SIDE) -> None:
        super().__init__()
        cfg = cfg or TinyViTConfig()
        self.img_size = img_size  # Sam.preprocess pads to it
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(dims[0])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            merge = PatchMerging(dims[i], dims[i + 1], cfg.merge_strides[i]) if i + 1 < len(dims) else None
            if i == 0:
                blocks = [MBConv(dims[0], cfg.mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(dims[i], cfg.num_heads[i], cfg.window_sizes[i], cfg.mlp_ratio, cfg.local_conv_size)
                    for _ in range(depth)
                ]
            self.layers.append(Stage(blocks, merge, channels_last=i > 0))
        self.norm_head = nn.LayerNorm(dims[-1], eps=LAYER_NORM_EPS)  # classifier: loads, never runs
        self.head = nn.Linear(dims[-1], cfg.num_classes)
        self.apply(_init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], EMBED_DIM, 1, bias=False),
            LayerNorm2d(EMBED_DIM),
            nn.Conv2d(EMBED_DIM, EMBED_DIM, 3, padding=1, bias=False),
            LayerNorm2d(EMBED_DIM),
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,1024,1024] -> [B,256,64,64]."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def _init_weights(module: nn.Module) -> None:
    """The original's initialisation: truncated-normal Linear weights (std 0.02), zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
