"""CounTR (`mae_vit_base_patch16`, BMVC'22) in plain PyTorch, its checkpoint loader, ONNX export and the
reference counter that runs PerSense's CounTR procedure literally (`CounTR/demo.py`).

Network (`CounTR/models_mae_cross.py`, `models_crossvit.py`; parameter names equal the checkpoint's):
ViT-B/16 encoder on 384x384 windows with fixed sin-cos position embeddings (timm `Block` names),
a CNN that turns each 64x64 exemplar crop into one token, two blocks of self-attention + cross-attention
to the exemplar tokens, and four conv heads with x2 bilinear upsampling -> a 384x384 density per window.
Differences from the original module, none of which changes a result:
- `forward(windows [N,3,384,384], exemplars [1,K,3,64,64]) -> [N,384,384]`: the exemplar tokens are
  computed once and shared by all windows (the original recomputes them per window call); K is what the
  caller passes (the original re-reads K from `bbox.txt` inside `forward_decoder`, capped at 5: callers
  pass at most `MAX_SHOTS` crops, see `TorchCountrCounter`).
- Attention uses `scaled_dot_product_attention` with the original scale `head_dim ** -0.5`.
- The zero-shot `shot_token` is kept for the checkpoint but unused: PerSense always has an exemplar.

Export: `counter_countr.onnx` with dynamic N (1..256 windows: all windows of an image, all 9 tiles' in the
tiled branch, in one call) and K (1..5 exemplar crops; PerSense passes 1, then up to 4).

`TorchCountrCounter` is the oracle for `persense.runtime.counters.countr.CountrCounter`: PIL resize of the image,
torch `interpolate(antialias=True)` for the crops and tiles (torchvision 0.17 `Resize` on tensors, the
version PerSense's README installs), windows run one at a time and merged with the original zero-pad
formula. The quirks that change results are reproduced; see `persense.runtime.counters.countr` for the list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from persense.export.artefacts import describe
from persense.export.checkpoints import read_checkpoint
from persense.export.onnx_io import export_onnx
from persense.runtime.counters.base import CountRequest, Density
from persense.runtime.counters.countr import (
    CALIBRATION_LIMIT,
    CALIBRATION_SHOTS,
    COUNT_SCALE,
    EXEMPLAR_SIZE,
    IDM_THRESHOLD,
    INPUT_NAMES,
    MAX_BATCH,
    MAX_SHOTS,
    OUTPUT_NAMES,
    STRIDE,
    WINDOW,
    CountrGeometry,
    idm_map,
)
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Artefact

log = logging.getLogger(__name__)

PATCH_SIZE = 16
ARTEFACT_FILE = "counter_countr.onnx"


@dataclass(frozen=True)
class CountrConfig:
    """Widths and depths of a CounTR variant (image size, patch size and I/O are fixed)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    exemplar_channels: tuple[int, int, int] = (64, 128, 256)
    head_channels: int = 256
    head_groups: int = 8
    mlp_ratio: int = 4


COUNTR_CONFIGS: dict[str, CountrConfig] = {
    "base": CountrConfig(),  # mae_vit_base_patch16, the architecture of FSC147.pth
    "tiny": CountrConfig(32, 2, 2, 32, 2, 2, (8, 8, 16), 16, 8),  # same I/O and code paths, for fast tests
}


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos embedding (grid*grid, dim): first half encodes the column, second the row."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:
        """sin and cos of each position times each frequency."""
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


class PatchEmbed(nn.Module):
    """16x16 patches of a 384x384 window -> (N, 576, dim) tokens (timm PatchEmbed without norm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, 384, 384) -> (N, 576, dim)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm Mlp)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Token-wise MLP."""
        return self.fc2(self.act(self.fc1(x)))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(N, L, C) -> (N, heads, L, C / heads)."""
    n, length, c = x.shape
    return x.reshape(n, length, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(N, heads, L, D) -> (N, L, heads * D)."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm Attention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the tokens of x."""
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to exemplar tokens (keys/values) (models_crossvit.CrossAttention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x (N, L, C) attends to y (N, K, C)."""
        q, k, v = (split_heads(t, self.num_heads) for t in (self.wq(x), self.wk(y), self.wv(y)))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class Block(nn.Module):
    """Pre-norm transformer block (timm Block): x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        """One encoder block."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Decoder block: self-attention, cross-attention to the exemplars, MLP, each pre-norm and residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-6)
        self.selfattn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """One decoder block over image tokens x and exemplar tokens y."""
        x = x + self.selfattn(self.norm0(x))
        x = x + self.attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


def exemplar_stage(cin: int, cout: int, pool: nn.Module) -> nn.Sequential:
    """Conv3x3 -> InstanceNorm (no affine) -> ReLU -> pool: one `decoder_projN` of the exemplar CNN."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU(), pool)


def decode_head(cin: int, cfg: CountrConfig, last: bool) -> nn.Sequential:
    """Conv3x3 -> GroupNorm -> ReLU (+ Conv1x1 to one channel for the last head): one `decode_headN`."""
    layers = [
        nn.Conv2d(cin, cfg.head_channels, 3, padding=1),
        nn.GroupNorm(cfg.head_groups, cfg.head_channels),
        nn.ReLU(),
    ]
    if last:
        layers.append(nn.Conv2d(cfg.head_channels, 1, 1))
    return nn.Sequential(*layers)


class CounTR(nn.Module):
    """CounTR's SupervisedMAE: windows and exemplar crops -> one density map per window."""

    def __init__(self, cfg: CountrConfig = CountrConfig()) -> None:
        super().__init__()
        grid = WINDOW // PATCH_SIZE
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.decoder_dim), requires_grad=False)
        self.shot_token = nn.Parameter(torch.zeros(cfg.decoder_dim))
        c1, c2, c3 = cfg.exemplar_channels
        self.decoder_proj1 = exemplar_stage(3, c1, nn.MaxPool2d(2))
        self.decoder_proj2 = exemplar_stage(c1, c2, nn.MaxPool2d(2))
        self.decoder_proj3 = exemplar_stage(c2, c3, nn.MaxPool2d(2))
        self.decoder_proj4 = exemplar_stage(c3, cfg.decoder_dim, nn.AdaptiveAvgPool2d(1))
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.decode_head0 = decode_head(cfg.decoder_dim, cfg, last=False)
        self.decode_head1 = decode_head(cfg.head_channels, cfg, last=False)
        self.decode_head2 = decode_head(cfg.head_channels, cfg, last=False)
        self.decode_head3 = decode_head(cfg.head_channels, cfg, last=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original initialisation: sin-cos position embeddings, xavier linears, unit LayerNorms."""
        grid = WINDOW // PATCH_SIZE
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(self.config.embed_dim, grid)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed(self.config.decoder_dim, grid)).float()[None]
        )
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.data.view(self.config.embed_dim, -1))
        nn.init.normal_(self.shot_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, windows: Tensor) -> Tensor:
        """ViT encoder: (N, 3, 384, 384) -> (N, 576, embed_dim)."""
        x = self.patch_embed(windows) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def exemplar_tokens(self, exemplars: Tensor) -> Tensor:
        """(1, K, 3, 64, 64) crops -> (1, K, decoder_dim) tokens."""
        y = exemplars.flatten(0, 1)
        for stage in (self.decoder_proj1, self.decoder_proj2, self.decoder_proj3, self.decoder_proj4):
            y = stage(y)
        return y.flatten(1).unsqueeze(0)

    def regress(self, x: Tensor) -> Tensor:
        """(N, 576, decoder_dim) tokens -> (N, 384, 384) density via four conv heads with x2 upsampling."""
        n, hw, c = x.shape
        side = WINDOW // PATCH_SIZE
        x = x.transpose(1, 2).reshape(n, c, side, side)
        for head in (self.decode_head0, self.decode_head1, self.decode_head2, self.decode_head3):
            x = F.interpolate(head(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return x.squeeze(1)

    def forward(self, windows: Tensor, exemplars: Tensor) -> Tensor:
        """(N, 384, 384) densities of N windows (N, 3, 384, 384) given K exemplar crops (1, K, 3, 64, 64)."""
        x = self.decoder_embed(self.encode(windows)) + self.decoder_pos_embed
        y = self.exemplar_tokens(exemplars).expand(windows.shape[0], -1, -1)
        for block in self.decoder_blocks:
            x = block(x, y)
        return self.regress(self.decoder_norm(x))


def config_name(cfg: CountrConfig) -> str:
    """The name of a configuration in COUNTR_CONFIGS, or 'custom'."""
    return next((name for name, known in COUNTR_CONFIGS.items() if known == cfg), "custom")


def build_countr(config: str = "base") -> CounTR:
    """An eval-mode CounTR of a named configuration with the original (random) initialisation."""
    if config not in COUNTR_CONFIGS:
        raise PersenseError(f"unknown CounTR configuration {config!r}; choose one of {', '.join(COUNTR_CONFIGS)}")
    return CounTR(COUNTR_CONFIGS[config]).eval()


def random_countr(seed: int = 0, config: str = "base") -> CounTR:
    """A CounTR with seeded random weights (no checkpoint needed)."""
    torch.manual_seed(seed)
    return build_countr(config)


def _not_countr_reason(checkpoint: object) -> str | None:
    """Why a loaded checkpoint object is not CounTR's {'model': state_dict, ...}, or None if it may be."""
    if not isinstance(checkpoint, dict):
        return f"expected a dict with a 'model' entry, found {type(checkpoint).__name__}"
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return None
    if "state_dict" in checkpoint:
        return "it has a 'state_dict' entry but no 'model' (a DSALVANet-style checkpoint?)"
    if any(str(k).startswith("image_encoder.") for k in checkpoint):
        return "it is a flat state dict with SAM's image_encoder weights (a SAM checkpoint?)"
    return f"no 'model' entry (top-level keys: {', '.join(map(str, list(checkpoint)[:6]))})"


def countr_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The 'model' state dict of a CounTR checkpoint; training extras (args Namespace, optimizer) are allowed."""
    checkpoint = read_checkpoint(path)
    reason = _not_countr_reason(checkpoint)
    if reason:
        raise PersenseError(f"{path}: not a CounTR checkpoint: {reason}")
    return checkpoint["model"]


def load_countr(path: str | Path) -> CounTR:
    """CounTR base from an FSC147.pth-style file: extra keys ignored (strict=False), missing or mis-shaped refused."""
    state = countr_state_dict(path)
    model = build_countr("base")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if len(missing) == len(expected):
        raise PersenseError(f"{path}: not a CounTR checkpoint: its 'model' has none of CounTR's weights")
    if missing:
        raise PersenseError(
            f"{path}: incomplete CounTR checkpoint, {len(missing)} weights missing (e.g. {', '.join(missing[:4])})"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise PersenseError(f"{path}: not CounTR mae_vit_base_patch16: {'; '.join(wrong[:3])}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        log.warning("%s: ignoring %d keys CounTR does not use (e.g. %s)", path, len(unexpected), unexpected[0])
    model.load_state_dict(state, strict=False)
    return model.eval()


def example_inputs(windows: int = 2, shots: int = 3) -> tuple[Tensor, Tensor]:
    """Example (windows, exemplars) inputs of the exported graph."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.rand(windows, 3, WINDOW, WINDOW, generator=g),
        torch.rand(1, shots, 3, EXEMPLAR_SIZE, EXEMPLAR_SIZE, generator=g),
    )


def export_countr(model: CounTR, out_dir: str | Path, source_checkpoint: str) -> Artefact:
    """Write `counter_countr.onnx`: windows [N,3,384,384] + exemplars [1,K,3,64,64] -> density [N,384,384]."""
    path = Path(out_dir) / ARTEFACT_FILE
    dynamic = {
        "windows": {0: torch.export.Dim("N", min=1, max=MAX_BATCH)},
        "exemplars": {1: torch.export.Dim("K", min=1, max=MAX_SHOTS)},
    }
    with torch.no_grad():
        seconds = export_onnx(model.eval(), example_inputs(), path, list(INPUT_NAMES), list(OUTPUT_NAMES), dynamic)
    return describe(
        path,
        "counter_countr",
        "fp32",
        f"countr_{config_name(model.config)}",
        source_checkpoint,
        {"export_seconds": round(seconds, 2)},
    )


class TorchCountrCounter:
    """The original CounTR procedure of PerSense in torch (`load_image` + `run_one_image`), window by window."""

    name = "countr-reference"

    def __init__(self, model: CounTR) -> None:
        self.model = model.eval()

    def count(self, request: CountRequest) -> Density:
        """Density map for IDM (normalised, H x W) and the calibrated float count."""
        geometry = CountrGeometry.of(request.image.shape[:2], request.exemplars)
        device = next(self.model.parameters()).device
        image, crops = (t.to(device) for t in load_image(request.image, geometry))
        with torch.inference_mode():
            if geometry.tiny_exemplar:
                count, density = self.count_tiles(image, crops)
            else:
                density = slide_sequential(image, lambda window: self.model(window, crops)[0])
                count = torch.sum(density / COUNT_SCALE).item()
            shots = (
                sum(
                    torch.sum(density[y0 : y1 + 1, x0 : x1 + 1] / COUNT_SCALE).item()
                    for y0, x0, y1, x1 in geometry.rects
                )
                / CALIBRATION_SHOTS
            )
        if shots > CALIBRATION_LIMIT:
            count /= shots
        return Density(idm_map(density.cpu().numpy(), geometry), float(count), IDM_THRESHOLD)

    def count_tiles(self, image: Tensor, crops: Tensor) -> tuple[float, Tensor]:
        """The 3x3 branch: each tile upscaled to the full size and slid; sum of counts, last tile's density."""
        _, _, h, w = image.shape
        count, density = 0.0, None
        for top in (0, int(h / 3), int(h * 2 / 3)):
            for left in (0, int(w / 3), int(w * 2 / 3)):
                tile = image[:, :, top : top + int(h / 3), left : left + int(w / 3)]
                tile = F.interpolate(tile, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
                density = slide_sequential(tile, lambda window: self.model(window, crops)[0])
                count += torch.sum(density / COUNT_SCALE).item()
        return count, density


def load_image(image_rgb: np.ndarray, geometry: CountrGeometry) -> tuple[Tensor, Tensor]:
    """demo.load_image: (1, 3, 384, w) image in [0, 1] (PIL bilinear, centre zero-pad) and (1, K, 3, 64, 64) crops."""
    pil = Image.fromarray(image_rgb).resize((geometry.new_w, WINDOW), Image.BILINEAR)
    image = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div(255)
    image = F.pad(image, (geometry.pad, geometry.pad))
    crops = [
        F.interpolate(
            image[None, :, y0 : y1 + 1, x0 : x1 + 1],
            size=(EXEMPLAR_SIZE, EXEMPLAR_SIZE),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        for y0, x0, y1, x1 in geometry.rects[:MAX_SHOTS]
    ]
    return image[None], torch.stack(crops)[None]


def slide_sequential(image: Tensor, infer: Callable[[Tensor], Tensor]) -> Tensor:
    """run_one_image's loop: 384-wide windows, stride 128, last one snapped right, merged by zero-padded halves."""
    w = image.shape[-1]
    density = image.new_zeros(image.shape[-2], w)
    start, prev = 0, -1
    while start + WINDOW - 1 < w:
        output = infer(image[:, :, :, start : start + WINDOW])
        pad_mid = nn.ZeroPad2d((start, w - prev - 1, 0, 0))
        fresh_overlap = pad_mid(output[:, : prev - start + 1])
        fresh_new = nn.ZeroPad2d((prev + 1, w - start - WINDOW, 0, 0))(output[:, prev - start + 1 : WINDOW])
        old_left = nn.ZeroPad2d((0, w - start, 0, 0))(density[:, :start])
        old_overlap = pad_mid(density[:, start : prev + 1])
        old_right = nn.ZeroPad2d((prev + 1, 0, 0, 0))(density[:, prev + 1 : w])
        density = old_left + old_right + old_overlap / 2 + fresh_overlap / 2 + fresh_new
        prev = start + WINDOW - 1
        start += STRIDE
        if start + WINDOW - 1 >= w:
            if start == w - WINDOW + STRIDE:
                break
            start = w - WINDOW
    return density
