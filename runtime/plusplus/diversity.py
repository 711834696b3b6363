"""PerSense++'s diversity-aware exemplar selection (SPEC-PLUSPLUS §4, persense++.py L731-1033).

Picks 1-3 exemplars for the second counter pass from the K feedback boxes, with the original's rules and quirks:
KMeans(3, seed 42) on StandardScaler'd RoI features of the boxes scoring > 0 (one region when fewer than 3),
boxes scoring > 0.8 per region (the unfiltered regions when fewer than 3 survive), a weighted score
`-0.25 ln|area - mean area| + 0.25 cluster similarity + 0.25 reference similarity - 0.25 |aspect - mean aspect|`
whose cluster similarity is read at the box's position in the *filtered* region from the *unfiltered* cluster's
list (misaligned when the 0.8 filter dropped anything), ln(0) giving a score of +inf, the best box (first on
ties) of each area tertile (small <= p33 < medium <= p66 < large), and overlap removal (IoU > 0.5 drops the
smaller) refilling from the score list by list position, so a just-removed box can come back.

The feature callable is called once, for every box that can be scored plus the reference; the cosine
similarities are taken row by row as the original (a BLAS product's rounding depends on its shape), so the
scores are those of the oracle bit for bit (with NumPy >= 2's scalar promotion, as the original's expression).
Departures where the original raises: a zero side counts as 1 in the aspect ratio; a zero union has IoU 0.
The caller runs this only for K >= 3 feedback lines (fewer: the header box and the K boxes as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persense.runtime.plusplus.boxes import box_areas, box_iou_matrix
from persense.runtime.plusplus.clusters import kmeans, standardised

CLUSTERS = 3
CLUSTER_SEED = 42
POSITIVE_SCORE = 0.0  # only boxes scoring above it are clustered (all boxes if none does)
HIGH_SCORE = 0.8
MIN_HIGH_SCORERS = 3
OVERLAP_IOU = 0.5
MAX_EXEMPLARS = 3
WEIGHT = 0.25  # of each of the four score terms

BoxFeatures = Callable[[list[list[int]]], np.ndarray]  # [y0, x0, y1, x1] int boxes -> (N, 2048) float32


@dataclass
class DiversityResult:
    """The exemplars chosen and how: boxes `[y0, x0, y1, x1]` ints (1-3), their scores, the regions."""

    boxes: np.ndarray  # (E, 4) int64 [y0, x0, y1, x1]
    scores: np.ndarray  # (E,) float64 weighted scores (+inf where a box has exactly the mean area)
    lines: np.ndarray  # (E,) int64: which of the K feedback lines each exemplar is
    clustered: bool  # KMeans ran (>= 3 boxes with score > 0); else one region, similarities 1
    regions: dict[int, list[int]] = field(default_factory=dict)  # KMeans label -> feedback line indices

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the chosen feedback lines and their scores (non-finite ones as strings), the clusters."""
        return {
            "exemplar_lines": self.lines.tolist(),
            "exemplar_scores": [float(s) if np.isfinite(s) else str(float(s)) for s in self.scores],
            "clustered": self.clustered,
            "regions": {str(label): members for label, members in self.regions.items()},
        }


def select_exemplars(
    boxes: np.ndarray, scores: np.ndarray, reference: list[int] | np.ndarray, features: BoxFeatures
) -> DiversityResult:
    """The K >= 1 feedback lines (`[y0, x0, y1, x1]`, SAM score) -> 1-3 exemplars, as the oracle's select_exemplars.

    `reference`: the cascade box `[y0, x0, y1, x1]`; `features`: the image's RoI features of int boxes.
    """
    coords = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(coords) or len(coords) != len(scores):
        raise ValueError(f"diversity selection needs K >= 1 boxes with a score each, got {len(coords)}, {len(scores)}")
    positive = np.flatnonzero(scores > POSITIVE_SCORE)
    pool = positive if len(positive) else np.arange(len(coords))  # the boxes clustered, in line order
    sides = coords[pool, 2:] - coords[pool, :2]  # (y1 - y0, x1 - x0)
    mean_area = np.mean(sides[:, 0] * sides[:, 1])
    mean_aspect = np.mean(_aspect_ratios(sides))
    vectors = np.asarray(features([_int_box(b) for b in coords[pool]] + [_int_box(reference)]))
    pool_vectors, reference_vector = vectors[:-1], vectors[-1:]
    regions, similarities = _regions(pool, pool_vectors)
    chosen = _high_scorers(regions, scores)
    order = np.concatenate(list(chosen.values()))  # scored boxes: line indices, region by region
    cluster_similarity = np.concatenate([similarities[label][: len(m)] for label, m in chosen.items()])
    reference_similarity = _cosine_rows(pool_vectors[np.searchsorted(pool, order)], reference_vector)  # pool sorted
    reference_similarity = np.where(reference_similarity < 0, (reference_similarity + 1) / 2, reference_similarity)
    whole = np.trunc(coords[order])
    deviation = np.abs(_aspect_ratios(whole[:, 2:] - whole[:, :2]) - mean_aspect)
    areas = box_areas(coords[order])
    with np.errstate(divide="ignore"):
        log_distance = np.log(np.abs(areas - mean_area))  # ln(0) = -inf: the score becomes +inf
    weighted = (
        -WEIGHT * log_distance + WEIGHT * cluster_similarity + WEIGHT * reference_similarity + -WEIGHT * deviation
    )
    picked = _remove_overlaps(_by_size(areas, weighted), coords[order], weighted)
    return DiversityResult(
        boxes=coords[order[picked]].astype(np.int64),
        scores=weighted[picked],
        lines=order[picked].astype(np.int64),
        clustered=len(pool) >= CLUSTERS,
        regions={label: members.tolist() for label, members in regions.items()},
    )


def _int_box(box: np.ndarray | list) -> list[int]:
    """A box as the original hands it to the feature extractor: int()-truncated coordinates."""
    return [int(v) for v in box]


def _aspect_ratios(sides: np.ndarray) -> np.ndarray:
    """max(side) / min(side) per row of two sides; a zero side counts as 1 (the original raises there)."""
    small = sides.min(axis=1)
    return sides.max(axis=1) / np.where(small != 0, small, 1)


def _regions(pool: np.ndarray, vectors: np.ndarray) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(label -> line indices, label -> cluster similarity per member), labels ascending; one region, all 1s, for
    fewer than 3 boxes."""
    if len(pool) < CLUSTERS:
        return {0: pool}, {0: np.ones(len(pool), dtype=np.int64)}
    from sklearn.metrics.pairwise import cosine_similarity

    scaled = standardised(vectors)
    labels, centres = kmeans(scaled, CLUSTERS, CLUSTER_SEED)
    regions, similarities = {}, {}
    for label in np.unique(labels):
        members = labels == label
        regions[int(label)] = pool[members]
        similarities[int(label)] = (cosine_similarity(scaled[members], centres[label].reshape(1, -1)).flatten() + 1) / 2
    return regions, similarities


def _high_scorers(regions: dict[int, np.ndarray], scores: np.ndarray) -> dict[int, np.ndarray]:
    """Boxes scoring > 0.8 per region (empty regions dropped), or the regions as they are if fewer than 3 do."""
    kept = {label: members[scores[members] > HIGH_SCORE] for label, members in regions.items()}
    kept = {label: members for label, members in kept.items() if len(members)}
    return kept if sum(map(len, kept.values())) >= MIN_HIGH_SCORERS else regions


def _cosine_rows(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """scikit-learn's cosine_similarity of each row alone with the (1, D) reference: L2-normalised, one product
    per row, as the original's per-box calls round it."""
    from sklearn.preprocessing import normalize

    if not len(rows):
        return np.zeros(0, dtype=rows.dtype)
    unit_rows, unit_reference = normalize(rows), normalize(reference).T
    return np.array([(unit_rows[i : i + 1] @ unit_reference)[0, 0] for i in range(len(rows))])


def _by_size(areas: np.ndarray, weighted: np.ndarray) -> list[int]:
    """The best-scoring box (first of equals) of the small, medium and large area tertiles, in that order."""
    p33, p66 = np.percentile(areas, [33, 66])
    bins = np.where(areas <= p33, 0, np.where(areas <= p66, 1, 2))
    best = []
    for size in range(3):
        members = np.flatnonzero(bins == size)
        if len(members):
            best.append(int(members[np.argmax(weighted[members])]))
    return best


def _remove_overlaps(selection: list[int], coords: np.ndarray, weighted: np.ndarray) -> list[int]:
    """Drop the smaller box of each selected pair with IoU > 0.5, refill to 3 by scored-list position from where
    the last refill stopped (skipping boxes equal to a selected one, as the original's `in`); until none overlap."""
    start = len(selection)
    while True:
        chosen = coords[selection]
        iou, areas = box_iou_matrix(chosen, chosen), box_areas(chosen)
        rows, cols = np.nonzero(np.triu(iou > OVERLAP_IOU, k=1))
        marked = set(np.where(areas[rows] > areas[cols], cols, rows).tolist())
        if not marked:
            return selection
        selection = [box for i, box in enumerate(selection) if i not in marked]
        idx = start
        while len(selection) < MAX_EXEMPLARS and idx < len(coords):
            if not any(_same(idx, other, coords, weighted) for other in selection):
                selection.append(idx)
            idx += 1
        start = idx


def _same(a: int, b: int, coords: np.ndarray, weighted: np.ndarray) -> bool:
    """The original's dict equality of two scored boxes: same coordinates and score (the area follows)."""
    return bool((coords[a] == coords[b]).all() and weighted[a] == weighted[b])
