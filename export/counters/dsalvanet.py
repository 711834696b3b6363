"""DSALVANet (the few-shot density counter of PerSense) in plain PyTorch, with the original checkpoint's names.

Layout and arithmetic follow `DSALVANet/models/DSALVANet.py`; torchvision's ResNet-50 and
`deform_conv2d` are rewritten here (same parameter names, same semantics). Differences, all without
effect on the density map: layer4 of the backbone is kept for the checkpoint but not run (the original
computes and discards it); dropout layers (p = 0) are omitted; batch size is 1.

LVAM: PerSense leaves everything but the backbone in training mode, so the original samples
`mu + eps * exp(logvar / 2)` on every call. Our default (and the exported graph) returns `mu`, the
deterministic eval-mode output; `sample=True` with a seed reproduces the original's kind of sampling.

Exemplar ROIs: the original slices each box out of the current feature map and adaptive-max-pools it
to 3x3 before every DSAM block (Python ints, data-dependent shapes). `slice_roi_pool` does exactly that
for the torch reference; `index_roi_pool` gathers the same bins from precomputed indices
(`persense.runtime.counters.dsalvanet.roi_indices`) with fixed shapes, which is what gets exported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from persense.export.artefacts import describe
from persense.export.checkpoints import read_checkpoint
from persense.export.onnx_io import export_onnx
from persense.runtime.counters.base import CountRequest, Density, dsalvanet_count
from persense.runtime.counters.dsalvanet import (
    DSALVANET_IO,
    FEATURE_STRIDE,
    IDM_THRESHOLD,
    INPUT_SIZE,
    N_EXEMPLARS,
    POOL,
    roi_indices,
)
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import IMAGENET_MEAN, IMAGENET_STD, xyxy_to_yxyx
from persense.runtime.manifest import Artefact, tensor_names

EMBED_DIM = 256
SIMILARITY_GROUPS = 2
OFFSET_GROUPS = 8
ONNX_NAME = "counter_dsalvanet.onnx"

RoiPool = Callable[[torch.Tensor], torch.Tensor]  # current feature map [1,C,128,128] -> exemplars [3,C,3,3]


# --- ResNet-50 (torchvision layout) -------------------------------------------------------------


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck block (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn3(conv3(...)) + shortcut)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def resnet_stage(in_channels: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One `layerN` of torchvision's ResNet: a (possibly strided) first block, then identity blocks."""
    out_channels = planes * Bottleneck.expansion
    return nn.Sequential(
        Bottleneck(in_channels, planes, stride), *[Bottleneck(out_channels, planes) for _ in range(blocks - 1)]
    )


class ResNet50(nn.Module):
    """Parameter container with torchvision's resnet50 names (conv1, bn1, layer1..4, fc); run via Backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = resnet_stage(64, 64, 3, 1)
        self.layer2 = resnet_stage(256, 128, 4, 2)
        self.layer3 = resnet_stage(512, 256, 6, 2)
        self.layer4 = resnet_stage(1024, 512, 3, 2)
        self.fc = nn.Linear(2048, 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class Backbone(nn.Module):
    """ResNet-50 layers 1-3 resized to stride 4 and concatenated (1792 ch); modules aliased as layer0..4."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet50()
        r = self.resnet
        self.layer0 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.out_dim = 256 + 512 + 1024

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[1,3,512,512] -> [1,1792,128,128] (bilinear, align_corners=False, as F.interpolate by scale factor)."""
        feat1 = self.layer1(self.layer0(image))
        feat2 = self.layer2(feat1)
        feat3 = self.layer3(feat2)
        return torch.cat(
            [
                feat1,
                F.interpolate(feat2, scale_factor=2.0, mode="bilinear"),
                F.interpolate(feat3, scale_factor=4.0, mode="bilinear"),
            ],
            dim=1,
        )


# --- exemplar ROI pooling -----------------------------------------------------------------------


def slice_roi_pool(boxes: torch.Tensor) -> RoiPool:
    """The original `crop_roi_feat` for (3, 4) float64 (y0, x0, y1, x1) boxes in the 512 frame."""

    def pool(feat: torch.Tensor) -> torch.Tensor:
        _, _, h, w = feat.shape
        scaled = boxes / FEATURE_STRIDE
        scaled[:, :2] = torch.floor(scaled[:, :2]).clamp_min(0)
        scaled[:, 2:] = torch.ceil(scaled[:, 2:])
        scaled[:, 2] = scaled[:, 2].clamp_max(h)
        scaled[:, 3] = scaled[:, 3].clamp_max(w)
        crops = [
            F.adaptive_max_pool2d(feat[0, :, int(y0) : int(y1) + 1, int(x0) : int(x1) + 1], POOL)
            for y0, x0, y1, x1 in scaled.tolist()
        ]
        return torch.stack(crops)

    return pool


def index_roi_pool(roi_rows: torch.Tensor, roi_cols: torch.Tensor) -> RoiPool:
    """The same pooling from [3, POOL, L] bin indices: gather rows, max, gather columns, max (fixed shapes)."""

    def pool(feat: torch.Tensor) -> torch.Tensor:
        exemplars, bins, length = roi_cols.shape
        channels = feat.shape[1]
        row_max = feat[0][:, roi_rows].amax(dim=3).permute(1, 2, 0, 3)  # [E, row bin, C, W]
        index = roi_cols.reshape(exemplars, 1, 1, bins * length).expand(exemplars, bins, channels, bins * length)
        cells = torch.gather(row_max, 3, index).reshape(exemplars, bins, channels, bins, length)
        return cells.amax(dim=4).permute(0, 2, 1, 3)  # [E, C, row bin, col bin]

    return pool


# --- DSAM ---------------------------------------------------------------------------------------


def channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW tensor."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def grouped_matmul(weight: torch.Tensor, columns: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped 1x1 convolution as a matmul: weight [O, C/groups], columns [C, P] -> [O, P]."""
    out_channels = weight.shape[0]
    per_group = columns.reshape(groups, columns.shape[0] // groups, columns.shape[1])
    return torch.matmul(weight.reshape(groups, out_channels // groups, -1), per_group).reshape(out_channels, -1)


def modulated_deform_conv2d(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, dilation: int, groups: int
) -> torch.Tensor:
    """torchvision.ops.deform_conv2d for batch 1, stride 1, padding = dilation*(k//2), no bias.

    offset [1, 2*G*k*k, H, W] holds (dy, dx) per offset group G and kernel tap; mask [1, G*k*k, H, W];
    weight [O, C/groups, k, k]; G must be a multiple of `groups`. Samples outside the map read zero, as in
    torchvision. Bilinear sampling is linear, so each tap's weights are applied first (a 1x1 projection of
    every offset group to the O/groups outputs of its conv group) and the few projected maps are then
    sampled with grid_sample: k*k*G*O/groups sampled maps instead of k*k*C.
    """
    _, channels, h, w = x.shape
    out_channels, _, kernel, _ = weight.shape
    taps = kernel * kernel
    offset_groups = offset.shape[1] // (2 * taps)
    outs_per_group = out_channels // groups
    per_offset_group = channels // offset_groups
    # [O, C/groups, k, k] -> [G, taps*O/groups, C/G]: the kernel slice each offset group sees, per tap and output
    kernels = weight.reshape(groups, outs_per_group, offset_groups // groups, per_offset_group, taps)
    kernels = kernels.permute(0, 2, 4, 1, 3).reshape(offset_groups, taps * outs_per_group, per_offset_group)
    projected = torch.matmul(kernels, x.reshape(offset_groups, per_offset_group, h * w))
    steps = (torch.arange(kernel, dtype=x.dtype, device=x.device) - kernel // 2) * dilation
    tap_y = steps.repeat_interleave(kernel).view(1, taps, 1, 1)
    tap_x = steps.repeat(kernel).view(1, taps, 1, 1)
    rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, w)
    delta = offset.view(offset_groups, taps, 2, h, w)
    y_pos = rows + tap_y + delta[:, :, 0]  # [G, taps, H, W] absolute sampling positions
    x_pos = cols + tap_x + delta[:, :, 1]
    grid = torch.stack([x_pos * (2 / (w - 1)) - 1, y_pos * (2 / (h - 1)) - 1], dim=-1)
    sampled = F.grid_sample(
        projected.view(offset_groups * taps, outs_per_group, h, w),
        grid.view(offset_groups * taps, h, w, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    modulated = sampled * mask.view(offset_groups * taps, 1, h, w)
    return modulated.view(groups, -1, outs_per_group, h, w).sum(dim=1).view(1, out_channels, h, w)


class MDM(nn.Module):
    """Modulated deformable conv whose kernels are the exemplar features (offsets, softmax mask from the query)."""

    def __init__(self, dilation: int, channels: int = EMBED_DIM, kernel: int = POOL) -> None:
        super().__init__()
        taps = kernel * kernel
        self.dilation = dilation
        self.conv_offset = nn.Conv2d(channels, 2 * OFFSET_GROUPS * taps, kernel, padding=kernel // 2)
        self.conv_mask = nn.Conv2d(channels, OFFSET_GROUPS * taps, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv_offset.weight)  # the original's initialisation
        nn.init.constant_(self.conv_mask.weight, 0.5)

    def forward(self, query: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
        """[1,C,H,W] query, [3,C,3,3] exemplars -> [1, 2*3, H, W] responses."""
        weight = exemplars.reshape(exemplars.shape[0] * SIMILARITY_GROUPS, -1, *exemplars.shape[-2:])
        mask = torch.softmax(self.conv_mask(query), dim=1)
        return modulated_deform_conv2d(query, self.conv_offset(query), mask, weight, self.dilation, SIMILARITY_GROUPS)


class SimilarityCal(nn.Module):
    """Query/exemplar similarity: a grouped 1x1 conv with max-pooled exemplars plus 3 dilated MDMs -> 256 ch."""

    def __init__(self, channels: int = EMBED_DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.in_conv = nn.Conv2d(channels, channels, 1)
        self.out_conv = nn.Conv2d(SIMILARITY_GROUPS * N_EXEMPLARS * 4, channels, 1)
        self.mdm_d1, self.mdm_d2, self.mdm_d4 = MDM(1), MDM(2), MDM(4)

    def forward(self, query: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
        """[1,C,H,W], [3,C,3,3] -> [1,C,H,W]."""
        query = channel_norm(self.norm, self.in_conv(query))
        exemplars = channel_norm(self.norm, self.in_conv(exemplars))
        _, channels, h, w = query.shape
        pooled = exemplars.amax(dim=(2, 3)).reshape(exemplars.shape[0] * SIMILARITY_GROUPS, -1)
        global_response = grouped_matmul(pooled, query.reshape(channels, h * w), SIMILARITY_GROUPS).view(1, -1, h, w)
        responses = [global_response] + [mdm(query, exemplars) for mdm in (self.mdm_d1, self.mdm_d2, self.mdm_d4)]
        return self.out_conv(torch.cat(responses, dim=1))


class DSAM(nn.Module):
    """One DSAM block: similarity residual + LN, then a 3x3 conv feed-forward residual + LN."""

    def __init__(self, channels: int = EMBED_DIM) -> None:
        super().__init__()
        self.similarity_cal = SimilarityCal(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.activation = nn.LeakyReLU()

    def forward(self, query: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
        """[1,C,H,W], [3,C,3,3] -> [1,C,H,W]."""
        query = channel_norm(self.norm1, query + self.similarity_cal(query, exemplars))
        return channel_norm(self.norm2, query + self.conv2(self.activation(self.conv1(query))))


class DSAMStack(nn.Module):
    """The 4 DSAM blocks; exemplar features are re-pooled from the current map before each block."""

    def __init__(self, n_block: int = 4) -> None:
        super().__init__()
        self.dsam_blocks = nn.ModuleList(DSAM() for _ in range(n_block))

    def forward(self, feat: torch.Tensor, roi_pool: RoiPool) -> torch.Tensor:
        """[1,C,128,128] -> [1,C,128,128]."""
        for block in self.dsam_blocks:
            feat = block(feat, roi_pool(feat))
        return feat


# --- LVAM, regressor, the whole network ---------------------------------------------------------


class LVAM(nn.Module):
    """Latent variable module: mu/logvar heads; returns mu, or mu + eps*exp(logvar/2) when sampling."""

    def __init__(self, in_dim: int = EMBED_DIM, mid_dim: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, mid_dim, 3, padding=1)
        self.ln1 = nn.LayerNorm(mid_dim)
        self.conv2 = nn.Conv2d(mid_dim, mid_dim, 3, padding=1)
        self.ln2 = nn.LayerNorm(mid_dim)
        self.mu = nn.Conv2d(mid_dim, in_dim, 1)
        self.ln_mu = nn.LayerNorm(in_dim)
        self.logvar = nn.Conv2d(mid_dim, in_dim, 1)
        self.ln_logvar = nn.LayerNorm(in_dim)
        self.relu = nn.LeakyReLU()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each LeakyReLU(LN(conv1x1(...)))."""
        x = self.relu(channel_norm(self.ln1, self.conv1(x)))
        x = self.relu(channel_norm(self.ln2, self.conv2(x)))
        return (
            self.relu(channel_norm(self.ln_mu, self.mu(x))),
            self.relu(channel_norm(self.ln_logvar, self.logvar(x))),
        )

    def forward(self, x: torch.Tensor, sample: bool = False, seed: int = 0) -> torch.Tensor:
        """mu (deterministic), or one seeded sample mu + eps*exp(logvar/2) as the original's train mode."""
        mu, logvar = self.encode(x)
        if not sample:
            return mu
        eps = torch.randn(
            mu.shape, generator=torch.Generator(device=mu.device).manual_seed(seed), dtype=mu.dtype, device=mu.device
        )
        return mu + eps * torch.exp(0.5 * logvar)


class Regressor(nn.Module):
    """Density head: conv5x5, x2 up, conv3x3, x2 up, two 1x1 convs, final ReLU (indices as the original)."""

    def __init__(self, in_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_dim, in_dim // 2, 5, padding=2),
            nn.LeakyReLU(),
            nn.UpsamplingBilinear2d(scale_factor=2),
            nn.Conv2d(in_dim // 2, in_dim // 4, 3, padding=1),
            nn.LeakyReLU(),
            nn.UpsamplingBilinear2d(scale_factor=2),
            nn.Conv2d(in_dim // 4, in_dim // 8, 1),
            nn.LeakyReLU(),
            nn.Conv2d(in_dim // 8, 1, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[1,256,128,128] -> [1,1,512,512]."""
        return self.regressor(x)


class DSALVANet(nn.Module):
    """Backbone -> 1x1 in_conv -> 4 DSAM blocks -> LVAM -> regressor: image + exemplars -> density."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.in_conv = nn.Conv2d(self.backbone.out_dim, EMBED_DIM, 1)
        self.dsam_blocks = DSAMStack()
        self.lvam = LVAM()
        self.count_regressor = Regressor()

    def forward(self, image: torch.Tensor, roi_pool: RoiPool, sample: bool = False, seed: int = 0) -> torch.Tensor:
        """[1,3,512,512] normalised image -> [1,1,512,512] density (LVAM mu unless `sample`)."""
        feat = self.dsam_blocks(self.in_conv(self.backbone(image)), roi_pool)
        return self.count_regressor(self.lvam(feat, sample, seed))


class DsalvanetGraph(nn.Module):
    """The exported graph: `image`, `roi_rows`, `roi_cols` -> `density` (LVAM mu)."""

    input_names = tensor_names(DSALVANET_IO[0])
    output_names = tensor_names(DSALVANET_IO[1])

    def __init__(self, model: DSALVANet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, roi_rows: torch.Tensor, roi_cols: torch.Tensor) -> torch.Tensor:
        """Density from the image and precomputed exemplar bin indices."""
        return self.model(image, index_roi_pool(roi_rows, roi_cols))


# --- building, loading, export ------------------------------------------------------------------


def random_dsalvanet(seed: int = 0) -> DSALVANet:
    """An eval-mode DSALVANet with seeded random weights.

    Unlike the original's init (offset convs zero, mask convs 0.5), the MDM offset and mask convs get
    random weights giving offsets of about a pixel, so that random models exercise deformable sampling.
    """
    torch.manual_seed(seed)
    model = DSALVANet()
    for module in model.modules():
        if isinstance(module, MDM):
            for conv in (module.conv_offset, module.conv_mask):
                fan_in = conv.weight[0].numel()
                nn.init.normal_(conv.weight, std=fan_in**-0.5)
    return model.eval()


def load_dsalvanet(path: str | Path) -> DSALVANet:
    """DSALVANet from the original `checkpoint_200.pth` layout (`["state_dict"]`, strict key match)."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise PersenseError(f"{path}: not a DSALVANet checkpoint (expected a dict with a 'state_dict' entry)")
    model = DSALVANet()
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise PersenseError(f"{path}: does not fit DSALVANet ({detail})") from exc
    return model.eval()


def export_dsalvanet(model: DSALVANet, out_dir: Path, source_checkpoint: str) -> Artefact:
    """Write `counter_dsalvanet.onnx` (image [1,3,512,512], roi_rows/roi_cols [3,3,44] int64 -> density)."""
    path = Path(out_dir) / ONNX_NAME
    rows, cols = roi_indices(np.array([[0, 0, 511, 511], [100, 40, 180, 200], [300, 300, 310, 305]], np.float64))
    example = (torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE), torch.from_numpy(rows), torch.from_numpy(cols))
    with torch.no_grad():
        seconds = export_onnx(
            DsalvanetGraph(model.eval()), example, path, DsalvanetGraph.input_names, DsalvanetGraph.output_names
        )
    return describe(
        path,
        "counter_dsalvanet",
        "fp32",
        "dsalvanet",
        source_checkpoint,
        {"export_seconds": round(seconds, 2), "lvam": "mu", "idm_threshold": IDM_THRESHOLD},
    )


# --- the torch reference counter ----------------------------------------------------------------


def reference_boxes(exemplars: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """The original `preprocess` box handling, Python lists and int() as written there -> (3, 4) float64 yxyx."""
    boxes = [list(map(float, row)) for row in xyxy_to_yxyx(np.asarray(exemplars, dtype=np.float64).reshape(-1, 4))]
    if not boxes:
        raise PersenseError("DSALVANet needs at least one exemplar box")
    boxes = boxes[:N_EXEMPLARS]
    for i in range(N_EXEMPLARS - len(boxes)):
        boxes.append(boxes[i])
    h_scale, w_scale = INPUT_SIZE / image_size[0], INPUT_SIZE / image_size[1]
    return torch.tensor(
        [[int(y0 * h_scale), int(x0 * w_scale), int(y1 * h_scale), int(x1 * w_scale)] for y0, x0, y1, x1 in boxes],
        dtype=torch.float64,
    )


def reference_image(image_rgb: np.ndarray) -> torch.Tensor:
    """cv2.resize to 512x512, ToTensor, Normalize(ImageNet) as torchvision does it -> [1,3,512,512]."""
    resized = torch.from_numpy(cv2.resize(image_rgb, (INPUT_SIZE, INPUT_SIZE)))
    tensor = resized.permute(2, 0, 1).float().div(255)
    mean, std = torch.from_numpy(IMAGENET_MEAN), torch.from_numpy(IMAGENET_STD)
    return tensor.sub(mean[:, None, None]).div(std[:, None, None]).unsqueeze(0)


class TorchDsalvanetCounter:
    """Counter protocol the original way in torch: slice-based exemplar crops, count = ceil(sum), threshold 30.

    The request image is already RGB (the original's BGR->RGB happens when the pipeline reads it).
    """

    name = "dsalvanet-torch"

    def __init__(self, model: DSALVANet, sample: bool = False, seed: int = 0) -> None:
        self.model = model.eval()
        self.sample = sample
        self.seed = seed

    def density(self, image_rgb: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
        """[512, 512] float32 density for an RGB image and (x0, y0, x1, y1) exemplars."""
        boxes = reference_boxes(exemplars, image_rgb.shape[:2])
        with torch.no_grad():
            out = self.model(reference_image(image_rgb), slice_roi_pool(boxes), self.sample, self.seed)
        return out[0, 0].numpy()

    def count(self, request: CountRequest) -> Density:
        """Density map at 512x512 and ceil(sum) count."""
        density = self.density(request.image, request.exemplars)
        return Density(density, dsalvanet_count(density), IDM_THRESHOLD)
