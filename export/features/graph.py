"""The feature engine's graph: ResNet-50's backbone (conv1..layer4) on a (1, 3, 224, 224) image, to ONNX."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from persense.export.artefacts import describe
from persense.export.counters.dsalvanet import ResNet50
from persense.export.features.resnet import resnet_backbone
from persense.export.onnx_io import export_onnx
from persense.runtime.artefact_names import FEATURES
from persense.runtime.manifest import Artefact, tensor_names
from persense.runtime.models.features import FEATURES_IO, RESNET_SIZE, ROI_OUTPUT, ROI_SAMPLING

MODEL_TYPE = "resnet50"


class BackboneGraph(nn.Module):
    """What the engine computes: the normalised image -> the (1, 2048, 7, 7) map (RoI-align runs in NumPy)."""

    def __init__(self, resnet: ResNet50) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """conv1, bn1, relu, maxpool, layer1..4."""
        return resnet_backbone(self.resnet, image)


def export_features(resnet: ResNet50, path: Path, source_checkpoint: str) -> Artefact:
    """Write the feature engine's ONNX model (FP32, static shapes) and return its manifest entry."""
    example = (torch.randn(1, 3, RESNET_SIZE, RESNET_SIZE),)
    with torch.no_grad():
        seconds = export_onnx(
            BackboneGraph(resnet.eval()), example, path, tensor_names(FEATURES_IO[0]), tensor_names(FEATURES_IO[1])
        )
    roi = {"output_size": ROI_OUTPUT, "sampling_ratio": ROI_SAMPLING, "aligned": False}
    return describe(
        path, FEATURES, "fp32", MODEL_TYPE, source_checkpoint, {"export_seconds": round(seconds, 2), "roi_align": roi}
    )
