"""What one segmented image produces, shared by the runtime pipeline and the PyTorch oracle."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persense.runtime.geometry.transforms import SamTransform


@dataclass
class SegmentResult:
    """Union mask, per-instance data, the exemplars and counts used, timings and decoder work."""

    union: np.ndarray  # HxW uint8 0/255
    labels: np.ndarray | None  # HxW uint16 instance map (runtime only)
    points: np.ndarray  # [M, 2] (x, y) final prompts
    boxes: np.ndarray  # [M, 4] (x0, y0, x1, y1); NaN where the mask is empty
    scores: np.ndarray  # [M] SAM IoU predictions of the chosen masks
    exemplars: np.ndarray  # [K, 4] exemplar boxes given to the second counter pass
    count: float  # the second counter pass's count (what PPSM used)
    first_pass_points: int  # points kept by PPSM in the first pass (each costs 2 decoder prompts)
    decoder_prompts: int  # prompts decoded in total
    decoder_launches: int  # decoder engine/module calls made
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    logits: np.ndarray | None = field(default=None, repr=False)  # [M, 256, 256] chosen low-res logits (runtime)
    transform: SamTransform | None = field(default=None, repr=False)  # the image's geometry (runtime)
    first_exemplar: dict[str, Any] = field(default_factory=dict)  # source ("box"/"text"/"similarity"), point, box
    ppsm_gating: dict[str, Any] = field(default_factory=dict)  # the second detection's caption and boxes, or why none
    method: str = "persense"  # the method that produced it: persense or persense++
    stages: dict[str, Any] = field(default_factory=dict)  # what the method's own stages decided (PerSense++'s)

    def instance_mask(self, index: int) -> np.ndarray:
        """HxW bool mask of instance `index`, whole (where instances overlap, `labels` keeps only the later one)."""
        if self.logits is None or self.transform is None:
            raise ValueError("this result keeps no per-instance logits (only the runtime pipeline's results do)")
        if not 0 <= index < len(self.logits):
            raise IndexError(f"instance {index} out of range: the result has {len(self.logits)} instance(s)")
        return self.transform.upsample_to_original(self.logits[index]) > 0

    def instance_masks(self) -> Iterator[np.ndarray]:
        """Each instance's HxW bool mask in turn, computed on demand (nothing is stored)."""
        return (self.instance_mask(i) for i in range(len(self.points)))

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (without the pixel arrays)."""

        def boxes_json(boxes: np.ndarray) -> list[list[float] | None]:
            return [None if np.isnan(b).any() else [float(v) for v in b] for b in boxes]

        return {
            "method": self.method,
            "instances": int(len(self.points)),
            "count_estimate": float(self.count),
            "points": [[float(x), float(y)] for x, y in self.points],
            "boxes": boxes_json(self.boxes),
            "scores": [float(s) for s in self.scores],
            "exemplars": boxes_json(self.exemplars),
            "first_exemplar": self.first_exemplar,
            "ppsm_gating": self.ppsm_gating,
            **({"stages": self.stages} if self.stages else {}),
            "first_pass_points": self.first_pass_points,
            "decoder_prompts": self.decoder_prompts,
            "decoder_launches": self.decoder_launches,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "warnings": list(self.warnings),
        }
