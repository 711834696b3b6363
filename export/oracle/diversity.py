"""PerSense++'s diversity-aware exemplar selection, literally (SPEC-PLUSPLUS §4, persense++.py L731-1033).

Runs when the feedback pass gave K >= 3 lines. Input: the K lines as `[y0, x0, y1, x1]` floats and SAM's
score; the cascade box (`[y0, x0, y1, x1]`) as the reference. Output: 1-3 exemplar boxes.

Quirks reproduced:
- the per-box cluster similarity is `similarities[region][idx]` with `idx` indexing the high-scorer-filtered
  region while the similarities belong to the unfiltered cluster (misaligned when step 3 filtered anything);
- `ln|area - mean_area|` of 0 is -inf, so the box scores +inf (no error);
- size tertiles by `np.percentile(areas, [33, 66])`, small <= p33 < medium <= p66 < large; equal areas put
  every box in "small" and give one exemplar;
- overlap removal refills from the score list by list position starting after the last index tried (a
  just-removed box can come back);
- KMeans(3, random_state=42, n_init=10) on StandardScaler'd ResNet-50 RoI features, labels ascending.

Departures (where the original raises): a box with a zero side (a one-pixel-wide mask's inclusive box) has
aspect ratio `max(w, h) / min(w, h)` with the zero side counted as 1 (the original raises ZeroDivisionError);
the IoU of two zero-area boxes is 0 (the original divides 0 by 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.preprocessing import StandardScaler

from persense.export.counters.dsalvanet import ResNet50
from persense.export.features.resnet import resnet_backbone, resnet_input
from persense.runtime.models.features import ROI_OUTPUT, ROI_SAMPLING
from persense.runtime.plusplus.clusters import KMEANS_N_INIT
from persense.runtime.plusplus.diversity import (
    CLUSTER_SEED,
    CLUSTERS,
    HIGH_SCORE,
    MAX_EXEMPLARS,
    MIN_HIGH_SCORERS,
    OVERLAP_IOU,
)

BoxFeatures = Callable[[list[list[int]]], np.ndarray]  # [y0, x0, y1, x1] int boxes -> (N, 2048) float32


# --- ResNet-50 RoI features --------------------------------------------------------------------------------


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int = ROI_OUTPUT,
    spatial_scale: float = 1.0,
    sampling_ratio: int = ROI_SAMPLING,
) -> torch.Tensor:
    """torchvision.ops.roi_align with aligned=False and a fixed sampling ratio, in plain torch.

    `features` (N, C, H, W); `rois` (R, 5) float32 `[batch, x0, y0, x1, y1]`. Per ROI: start = coord * scale,
    size = max(end - start, 1), bin = size / output; in each bin `sampling_ratio`^2 points at
    `start + p * bin + (i + 0.5) * bin / ratio`; a point with y < -1 or y > H (x likewise) contributes 0, else
    it is clamped to >= 0 and bilinearly sampled (the last row/column clamps); the bin is the mean of its
    samples. Returns (R, C, output, output).
    """
    _, channels, height, width = features.shape
    rois = rois.to(torch.float32)
    scale = torch.tensor(spatial_scale, dtype=torch.float32)
    out = torch.zeros(len(rois), channels, output_size, output_size, dtype=features.dtype)
    steps = torch.arange(output_size, dtype=torch.float32)
    offsets = (torch.arange(sampling_ratio, dtype=torch.float32) + 0.5)[None, :]
    for r, (batch, x0, y0, x1, y1) in enumerate(rois):
        start_x, start_y = x0 * scale, y0 * scale
        size_w = torch.clamp(x1 * scale - start_x, min=1.0)
        size_h = torch.clamp(y1 * scale - start_y, min=1.0)
        bin_w, bin_h = size_w / output_size, size_h / output_size
        xs = (start_x + steps[:, None] * bin_w + offsets * bin_w / sampling_ratio).reshape(-1)  # (P*S,)
        ys = (start_y + steps[:, None] * bin_h + offsets * bin_h / sampling_ratio).reshape(-1)
        wy, iy = _bilinear_taps(ys, height)  # (P*S, 2) weights and indices
        wx, ix = _bilinear_taps(xs, width)
        fmap = features[int(batch)]
        rows = fmap[:, iy.reshape(-1), :].reshape(channels, len(ys), 2, width)
        taps = rows[:, :, :, ix.reshape(-1)].reshape(channels, len(ys), 2, len(xs), 2)
        weights = wy[:, :, None, None] * wx[None, None, :, :]  # (Y, 2, X, 2)
        samples = (taps * weights.to(features.dtype)).sum(dim=(2, 4))  # (C, Y, X)
        samples = samples.reshape(channels, output_size, sampling_ratio, output_size, sampling_ratio)
        out[r] = samples.mean(dim=(2, 4))
    return out


def _bilinear_taps(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's bilinear_interpolate along one axis: (weights (n, 2), indices (n, 2)); outside -> weight 0."""
    outside = (coords < -1.0) | (coords > size)
    coords = torch.clamp(coords, min=0.0)
    low = coords.floor().to(torch.int64)
    last = low >= size - 1
    low = torch.where(last, torch.full_like(low, size - 1), low)
    high = torch.where(last, low, low + 1)
    coords = torch.where(last, low.to(coords.dtype), coords)
    frac = coords - low.to(coords.dtype)
    weights = torch.stack([1.0 - frac, frac], dim=1)
    weights = torch.where(outside[:, None], torch.zeros_like(weights), weights)
    return weights, torch.stack([low, high], dim=1)


class RoiFeatures:
    """extract_visual_features: the backbone once per image, then one RoI-aligned 2048-d vector per box."""

    def __init__(self, resnet: ResNet50, image: np.ndarray) -> None:
        self.size = image.shape[:2]
        with torch.no_grad():
            self.feature_map = resnet_backbone(resnet, resnet_input(image).to(next(resnet.parameters()).device))
        self.feature_map = self.feature_map.float().cpu()

    def __call__(self, boxes: list[list[int]]) -> np.ndarray:
        """(N, 2048) float32 features of `[y0, x0, y1, x1]` boxes (int()-cast as the original)."""
        orig_h, orig_w = self.size
        target_h, target_w = self.feature_map.shape[-2] * 32, self.feature_map.shape[-1] * 32  # 224 x 224
        sx, sy = target_w / orig_w, target_h / orig_h
        rois = []
        for box in boxes:
            y0, x0, y1, x1 = (int(v) for v in box)
            rois.append([0, x0 * sx, y0 * sy, x1 * sx, y1 * sy])
        rois = torch.tensor(rois, dtype=torch.float32).reshape(-1, 5)
        scale = self.feature_map.shape[-2] / target_h
        pooled = roi_align(self.feature_map, rois, ROI_OUTPUT, scale, ROI_SAMPLING)
        return pooled.mean(dim=(2, 3)).numpy()


# --- the selection -----------------------------------------------------------------------------------------


@dataclass
class DiversityResult:
    """The exemplars chosen and how: boxes `[y0, x0, y1, x1]` ints (1-3), their weighted scores, the regions."""

    boxes: list[list[int]]
    scores: list[float]
    clustered: bool  # KMeans ran (>= 3 boxes with score > 0); else one region, similarities 1
    regions: dict[int, list[int]] = field(default_factory=dict)  # label -> indices into the K lines
    scored: list[dict] = field(default_factory=list)  # every scored box: coords, score, area (list order)

    def lines(self) -> list[str]:
        """The bbox.txt lines the original writes."""
        return [f"{b[0]} {b[1]} {b[2]} {b[3]} {s}\n" for b, s in zip(self.boxes, self.scores)]


def aspect_ratio(width: float, height: float) -> float:
    """max/min side; a zero side counts as 1 (the original raises ZeroDivisionError there)."""
    small = min(width, height)
    return max(width, height) / (small if small != 0 else 1)


def box_area(box: list[float]) -> float:
    """calculate_area of `[y0, x0, y1, x1]`: (x1 - x0) * (y1 - y0), no +1."""
    return (box[3] - box[1]) * (box[2] - box[0])


def box_iou(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """calculate_intersection_over_union of two `[y0, x0, y1, x1]` boxes: (IoU, area a, area b); no +1."""
    inter = max(0, min(a[3], b[3]) - max(a[1], b[1])) * max(0, min(a[2], b[2]) - max(a[0], b[0]))
    area_a, area_b = box_area(a), box_area(b)
    union = float(area_a + area_b - inter)
    return (inter / union if union != 0 else 0.0), area_a, area_b


def cluster(entries: list[dict], features: BoxFeatures) -> tuple[dict, dict, bool, float, float]:
    """cluster_by_visual_similarity: (regions, similarities, clustered, mean area, mean aspect ratio)."""
    filtered = [e for e in entries if e["score"] > 0] or entries
    areas, aspects = [], []
    for entry in filtered:
        a, b, c, d = entry["coords"]  # the original names them x1, y1, x2, y2 (they are y0, x0, y1, x1)
        width, height = c - a, d - b
        areas.append(width * height)
        aspects.append(aspect_ratio(width, height))
    mean_area = np.mean(areas) if areas else 0
    mean_aspect = np.mean(aspects) if aspects else 1
    if len(filtered) < CLUSTERS:
        return {0: filtered}, {0: [1] * len(filtered)}, False, mean_area, mean_aspect
    standardised = StandardScaler().fit_transform(features([e["coords"] for e in filtered]))
    kmeans = KMeans(n_clusters=CLUSTERS, random_state=CLUSTER_SEED, n_init=KMEANS_N_INIT)
    labels = kmeans.fit_predict(standardised)
    regions, similarities = {}, {}
    for label in np.unique(labels):
        members = labels == label
        centre = kmeans.cluster_centers_[label].reshape(1, -1)
        regions[label] = [e for e, m in zip(filtered, members) if m]
        similarities[label] = (cosine_similarity(standardised[members], centre).flatten() + 1) / 2
    return regions, similarities, True, mean_area, mean_aspect


def high_scorers(regions: dict) -> dict:
    """select_highest_scorers: boxes with score > 0.8 per region (empty regions dropped); the unfiltered regions
    when fewer than 3 survive in total."""
    kept = {label: [e for e in boxes if e["score"] > HIGH_SCORE] for label, boxes in regions.items()}
    kept = {label: boxes for label, boxes in kept.items() if boxes}
    return kept if sum(map(len, kept.values())) >= MIN_HIGH_SCORERS else regions


def weighted_scores(
    regions: dict, similarities: dict, reference: list[int], features: BoxFeatures, mean_area: float, mean_aspect: float
) -> list[dict]:
    """The scoring loop of select_exemplars_by_size, in region (dict) order then box order."""
    ref_vector = np.mean([features([[int(v) for v in reference]])[0]], axis=0).reshape(1, -1)
    scored = []
    for region, boxes in regions.items():
        region_features = features([b["coords"] for b in boxes])
        for idx, box in enumerate(boxes):
            area = box_area(box["coords"])
            closeness = abs(area - mean_area)
            y0, x0, y1, x1 = (int(v) for v in box["coords"])
            deviation = abs(aspect_ratio(x1 - x0, y1 - y0) - mean_aspect)
            sim_ref = cosine_similarity(region_features[idx].reshape(1, -1), ref_vector).flatten()[0]
            if sim_ref < 0:
                sim_ref = (sim_ref + 1) / 2
            with np.errstate(divide="ignore"):
                log_dist = np.log(closeness)  # ln(0) = -inf: the score becomes +inf
            score = -0.25 * log_dist + 0.25 * similarities[region][idx] + 0.25 * sim_ref + -0.25 * deviation
            scored.append({"coords": box["coords"], "score": score, "area": area})
    return scored


def by_size(scored: list[dict]) -> list[dict]:
    """categorize_by_area_distribution + the top box (stable sort on -score) of small, medium, large."""
    areas = np.array([box_area(b["coords"]) for b in scored])
    p33, p66 = np.percentile(areas, [33, 66])
    bins: dict[str, list[dict]] = {"small": [], "medium": [], "large": []}
    for box, area in zip(scored, areas):
        bins["small" if area <= p33 else "medium" if area <= p66 else "large"].append(box)
    return [sorted(boxes, key=lambda b: -b["score"])[0] for boxes in bins.values() if boxes]


def remove_overlaps(selection: list[dict], scored: list[dict]) -> list[dict]:
    """remove_overlapping_boxes: drop the smaller of each pair with IoU > 0.5, refill by list position."""
    start = len(selection)
    while True:
        marked = []
        for i in range(len(selection)):
            for j in range(i + 1, len(selection)):
                iou, area_i, area_j = box_iou(selection[i]["coords"], selection[j]["coords"])
                if iou > OVERLAP_IOU:
                    marked.append(j if area_i > area_j else i)
        remaining = [box for idx, box in enumerate(selection) if idx not in marked]
        if len(remaining) == len(selection):
            return selection
        selection = remaining
        idx = start
        while len(selection) < MAX_EXEMPLARS and idx < len(scored):
            if scored[idx] not in selection:  # dict equality, as the original's `in`
                selection.append(scored[idx])
            idx += 1
        start = idx


def select_exemplars(
    boxes: list[list[float]], scores: list[float], reference: list[int], features: BoxFeatures
) -> DiversityResult:
    """diversity_aware_exemplar_selection on the K feedback lines (`[y0, x0, y1, x1]`, SAM score).

    `reference`: the cascade box `[y0, x0, y1, x1]`; `features`: the image's RoI features (RoiFeatures).
    """
    entries = [{"coords": [float(v) for v in box], "score": float(s)} for box, s in zip(boxes, scores)]
    regions, similarities, clustered, mean_area, mean_aspect = cluster(entries, features)
    chosen = high_scorers(regions)
    scored = weighted_scores(chosen, similarities, reference, features, mean_area, mean_aspect)
    selection = remove_overlaps(by_size(scored), scored)
    index = {id(e): i for i, e in enumerate(entries)}
    return DiversityResult(
        boxes=[[int(v) for v in b["coords"]] for b in selection],
        scores=[b["score"] for b in selection],
        clustered=clustered,
        regions={int(label): [index[id(e)] for e in members] for label, members in regions.items()},
        scored=scored,
    )
