"""PerSense++ on engines (persense++.py, SPEC-PLUSPLUS §1): PerSense's opening stages, then hybrid IDM, PPSM as
spatial gating, diversity-aware exemplars and IMRM, every decode batched as PerSense's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from persense.runtime.counters.base import Counter, Density
from persense.runtime.models.sam import SamEngines
from persense.runtime.pipeline.flow import Opening, PerSensePipeline
from persense.runtime.pipeline.masks import rasterise
from persense.runtime.pipeline.ppsm import inside_any_box
from persense.runtime.pipeline.prior import Target
from persense.runtime.pipeline.result import SegmentResult
from persense.runtime.plusplus.diversity import select_exemplars
from persense.runtime.plusplus.hybrid_idm import hybrid_points
from persense.runtime.plusplus.imrm import ImrmDecision, refine

if TYPE_CHECKING:
    from persense.runtime.models.detector import GroundingDino
    from persense.runtime.models.features import FeatureEngine
    from persense.runtime.models.text import TextTokens

DIVERSITY_MIN_LINES = 3  # feedback boxes from which exemplars are chosen for diversity (the original: > 3 lines)
METHOD = "persense++"


def yxyx(boxes: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) float boxes -> the original's int `[y0, x0, y1, x1]` lines."""
    return np.asarray(boxes, np.float64).reshape(-1, 4)[:, [1, 0, 3, 2]].astype(np.int64)


def xyxy(boxes: np.ndarray) -> np.ndarray:
    """`[y0, x0, y1, x1]` boxes -> (x0, y0, x1, y1) float64 exemplars for the counter."""
    return np.asarray(boxes, np.float64).reshape(-1, 4)[:, [1, 0, 3, 2]]


def points_json(points: np.ndarray) -> list[list[int]]:
    """(x, y) points as JSON integers."""
    return [[int(x), int(y)] for x, y in points]


class PlusPlusPipeline(PerSensePipeline):
    """PerSense++: reference object in, one mask per similar instance out (IMRM's outliers left out)."""

    def __init__(
        self,
        sam: SamEngines,
        counter: Counter,
        detector: GroundingDino | None = None,
        features: FeatureEngine | None = None,
    ) -> None:
        super().__init__(sam, counter, detector)
        self.features = features

    def segment(
        self,
        image: np.ndarray,
        target: Target,
        box: np.ndarray | None = None,
        text: TextTokens | None = None,
        gate: TextTokens | None = None,
    ) -> SegmentResult:
        """As PerSensePipeline.segment, with PerSense++'s stages; `result.stages` records what they decided."""
        opening = self._open(image, target, box, text, gate)
        timer, warnings = opening.timer, opening.warnings
        header = yxyx(opening.request.exemplars)[0]
        first_points, first_pass, _ = self._candidates_plus(opening, "pass 1")
        with timer.stage("feedback"):
            boxes, scores = self._point_boxes(
                opening.embedding, opening.transform, first_pass, opening.guidance, warnings
            )
            lines = yxyx(boxes)
        diversity = None
        with timer.stage("exemplar_selection"):
            if len(lines) >= DIVERSITY_MIN_LINES:
                if self.features is None:
                    raise ValueError("PerSense++ needs a pipeline with a feature engine")
                diversity = select_exemplars(
                    lines, scores.astype(np.float64), header, self.features.roi_features(image)
                )
                chosen = np.asarray(diversity.boxes, np.int64).reshape(-1, 4)
            else:
                chosen = np.concatenate([header[None], lines])
            opening.request.exemplars = xyxy(chosen)
        second_points, points, density = self._candidates_plus(opening, "pass 2")
        with timer.stage("final_decoding"):
            logits, final_scores = self._decode_points(opening, points)
        with timer.stage("merge"):
            instances = rasterise(logits, opening.transform, with_labels=True)
            decision = refine(instances.areas, instances.boxes, opening.detections) if len(points) >= 2 else None
            kept = np.ones(len(points), bool) if decision is None else decision.kept
            if not kept.all():
                instances = rasterise(logits[kept], opening.transform, with_labels=True)
            union = instances.union()
        rejected = [
            {"point": [int(v) for v in points[i]], "score": float(final_scores[i])} for i in np.flatnonzero(~kept)
        ]
        stages = {
            "hybrid_idm": {"first_pass": points_json(first_points), "second_pass": points_json(second_points)},
            "feedback_boxes": [[*map(int, box), float(score)] for box, score in zip(lines, scores)],
            "exemplar_selection": (
                diversity.summary()
                if diversity is not None
                else {"diversity": False, "reason": f"{len(lines)} feedback box(es) < {DIVERSITY_MIN_LINES}"}
            ),
            "imrm": _imrm_record(decision, rejected, len(points)),
        }
        return self._result(
            opening,
            points[kept],
            first_pass,
            density,
            logits[kept],
            final_scores[kept],
            instances,
            union,
            decoded=len(points),
            method=METHOD,
            stages=stages,
        )

    def _candidates_plus(self, opening: Opening, name: str) -> tuple[np.ndarray, np.ndarray, Density]:
        """Counter -> hybrid IDM -> spatial gating (all points when gating keeps none): (IDM points, points kept,
        density)."""
        request, timer = opening.request, opening.timer
        with timer.stage("counter"):
            density = self.counter.count(request)
        with timer.stage("idm"):
            points = hybrid_points(density.map, request.transform.original_size, density.idm_threshold)
        with timer.stage("ppsm"):
            if opening.gate_boxes is None:
                return points, points, density
            kept = points[inside_any_box(np.trunc(points).astype(np.int64), opening.gate_boxes)]
        if len(kept) == 0 and len(points) > 0:
            opening.warnings.append(f"{name}: gating kept none of {len(points)} points; using all of them")
            kept = points
        return points, kept, density


def _imrm_record(decision: ImrmDecision | None, rejected: list[dict], masks: int) -> dict[str, Any]:
    """result.json's account of IMRM: what it decided, or why it did not run."""
    if decision is None:
        return {"ran": False, "reason": f"{masks} final mask(s) < 2"}
    summary = decision.summary()
    for entry, where in zip(summary.get("rejected", []), rejected):
        entry.update(where)
    return {"ran": True, **summary}
