"""torchvision's ResNet-50 (IMAGENET1K_V1 layout) as PerSense++ runs it: its weights, input and backbone.

The weights are torchvision's `resnet50-0676ba61.pth`, which torchvision downloads into the torch hub cache the
first time `resnet50(pretrained=True)` runs (as persense++.py does); `--feature-checkpoint` reads the same file
from anywhere. The model is export/counters/dsalvanet.py's ResNet50 (torchvision's parameter names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from persense.export.checkpoints import read_checkpoint
from persense.export.counters.dsalvanet import ResNet50
from persense.runtime.errors import PersenseError
from persense.runtime.models import features

TORCHVISION_FILE = "resnet50-0676ba61.pth"  # torchvision's ResNet50_Weights.IMAGENET1K_V1
TORCHVISION_URL = f"https://download.pytorch.org/models/{TORCHVISION_FILE}"
OPTIONAL_KEYS = "num_batches_tracked"  # BatchNorm counters: absent from files saved before torch 0.4.1


def hub_checkpoint() -> Path:
    """Where torchvision keeps the file: `$TORCH_HOME/hub/checkpoints/` (default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE


def resolve_feature_checkpoint(checkpoint: Path | None, random_weights: bool) -> Path | None:
    """The ResNet-50 weights to export: the given file, else (unless random) the torch hub cache's; None = random."""
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise PersenseError(f"{checkpoint}: feature checkpoint not found (torchvision's {TORCHVISION_FILE})")
        return checkpoint
    if random_weights:
        return None
    cached = hub_checkpoint()
    if cached.is_file():
        return cached
    raise PersenseError(
        f"no ResNet-50 weights for --method persense++: put torchvision's {TORCHVISION_FILE} ({TORCHVISION_URL}) "
        f"in {cached.parent}/, pass --feature-checkpoint PATH, or use --random-weights"
    )


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict key of torchvision's resnet50 and its shape (built on the meta device: no weights)."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in ResNet50().state_dict().items()}


def read_state_dict(weights: dict | str | Path) -> dict[str, torch.Tensor]:
    """A checked torchvision ResNet-50 state dict (a dict or a file); a wrong key or shape is refused by name."""
    origin = "ResNet-50 weights" if isinstance(weights, dict) else str(weights)
    state = weights if isinstance(weights, dict) else read_checkpoint(weights)
    prefix = f"{origin}: not a torchvision ResNet-50 state dict"
    if not isinstance(state, dict):
        raise PersenseError(f"{prefix} (a {type(state).__name__})")
    shapes = _expected_shapes()
    unexpected = [k for k in state if k not in shapes]
    if unexpected:
        raise PersenseError(f"{prefix}: unexpected key '{unexpected[0]}' ({len(unexpected)} in all)")
    missing = [k for k in shapes if k not in state and not k.endswith(OPTIONAL_KEYS)]
    if missing:
        raise PersenseError(f"{prefix}: missing key '{missing[0]}' ({len(missing)} in all)")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shapes[key]:
            found = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PersenseError(f"{prefix}: '{key}' is {found}, expected {list(shapes[key])}")
    return state


def build_resnet(weights: dict | str | Path | None = None, seed: int = 0) -> ResNet50:
    """torchvision's resnet50 layout, eval mode: from a `resnet50-0676ba61.pth`-layout state dict (a dict or a
    path), else seeded random weights. Missing BatchNorm `num_batches_tracked` entries are allowed (old files)."""
    state = None if weights is None else read_state_dict(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = ResNet50()
    if state is not None:
        resnet.load_state_dict(state, strict=False)  # read_state_dict checked every key and shape
    return resnet.eval()


def resnet_input(image: np.ndarray) -> torch.Tensor:
    """The runtime's preprocessing (PIL bilinear to 224x224, ImageNet mean/std) as a (1, 3, 224, 224) tensor."""
    return torch.from_numpy(features.resnet_input(image))


def resnet_backbone(resnet: ResNet50, image: torch.Tensor) -> torch.Tensor:
    """`nn.Sequential(*list(resnet50.children())[:-2])`: conv1, bn1, relu, maxpool, layer1..4 -> (1, 2048, 7, 7)."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(image))))
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))
