"""The PerSense pipeline on engines: NumPy between engine calls, prompts decoded in batches."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from persense.runtime.counters.base import Counter, CountRequest, Density
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.models.sam import Guidance, Prompts, SamEngines
from persense.runtime.pipeline.exemplars import box_centre, check_box
from persense.runtime.pipeline.idm import candidate_points
from persense.runtime.pipeline.masks import rasterise
from persense.runtime.pipeline.ppsm import select_points
from persense.runtime.pipeline.prior import (
    Target,
    attention_similarity,
    best_point,
    reference_target,
    similarity_map,
)
from persense.runtime.pipeline.result import SegmentResult
from persense.runtime.pipeline.timing import StageTimer

if TYPE_CHECKING:
    from persense.runtime.models.detector import GroundingDino
    from persense.runtime.models.text import TextTokens

log = logging.getLogger(__name__)

FEEDBACK_EXEMPLARS = 3  # best-scoring point boxes added to the initial exemplar for the second pass


class PerSensePipeline:
    """Reference object in, one mask per similar instance out."""

    def __init__(self, sam: SamEngines, counter: Counter, detector: GroundingDino | None = None) -> None:
        self.sam = sam
        self.counter = counter
        self.detector = detector

    def reference(self, image: np.ndarray, mask: np.ndarray) -> Target:
        """Encode the reference image once and keep the mean feature under its mask."""
        embedding, transform = self.sam.encode(image)
        return reference_target(embedding, mask, transform)

    def segment(
        self,
        image: np.ndarray,
        target: Target,
        box: np.ndarray | None = None,
        text: TextTokens | None = None,
        gate: TextTokens | None = None,
    ) -> SegmentResult:
        """Segment every instance of the target object in an RGB uint8 image.

        `box` (x0, y0, x1, y1), the first exemplar as a detector gives it: the cascade starts from its
        centre instead of the similarity arg-max (see persense.runtime.pipeline.exemplars). `text`: a tokenised
        prompt for this pipeline's detector, whose most confident box is used the same way. `gate`: the tokenised
        "all <plural>" caption whose detections gate PPSM's points, as the original's second detection.
        """
        timer, warnings = StageTimer(), []
        start, first_exemplar = self._start(image, box, text, timer, warnings)
        gate_boxes, gating = self._gate(image, gate, timer)
        launches = self.sam.decoder_launches
        with timer.stage("image_encoding"):
            embedding, transform = self.sam.encode(image)
        with timer.stage("location_prior"):
            similarity = similarity_map(embedding, target, transform)
            guidance = Guidance(target.embedding.reshape(1, -1), attention_similarity(similarity))
            first = best_point(similarity) if start is None else start
            first_exemplar["point"] = [float(v) for v in first]
        with timer.stage("exemplar_cascade"):
            exemplar = self._initial_exemplar(embedding, transform, first, guidance, warnings)
        request = CountRequest(image, exemplar[None], transform, embedding, similarity)
        first_pass = self._candidates(request, similarity, timer, gate_boxes)[0]
        with timer.stage("feedback"):
            boxes, scores = self._point_boxes(embedding, transform, first_pass, guidance, warnings)
            best = np.argsort(-scores, kind="stable")[:FEEDBACK_EXEMPLARS]
            request.exemplars = np.concatenate([exemplar[None], boxes[best]])
        points, density = self._candidates(request, similarity, timer, gate_boxes, fallback=True, warnings=warnings)
        with timer.stage("final_decoding"):
            logits, final_scores = self.sam.decode_best(embedding, Prompts.points(transform.coords_to_input(points)))
        with timer.stage("merge"):
            instances = rasterise(logits, transform, with_labels=True)
            union = instances.union()
        if len(points) == 0:
            warnings.append("no instance found: the counter's density map gave no candidate point")
        for message in warnings:
            log.warning(message)
        return SegmentResult(
            union=union,
            labels=instances.labels,
            points=points,
            boxes=instances.boxes,
            scores=final_scores,
            exemplars=request.exemplars,
            count=density.count,
            first_pass_points=len(first_pass),
            decoder_prompts=2 + 2 * len(first_pass) + len(points),
            decoder_launches=self.sam.decoder_launches - launches,
            timings_ms=timer.ms,
            warnings=warnings,
            logits=logits,
            transform=transform,
            first_exemplar=first_exemplar,
            ppsm_gating=gating,
        )

    def _start(
        self, image: np.ndarray, box: np.ndarray | None, text: TextTokens | None, timer: StageTimer, warnings: list[str]
    ) -> tuple[np.ndarray | None, dict]:
        """The first point when a box or the detector gives it (None: the similarity arg-max), and its record
        (`source` "box", "text" or "similarity"; the detector's box, confidence and phrase for "text")."""
        if box is not None:
            checked = check_box(box, image.shape[:2])
            return box_centre(checked), {"source": "box", "box": checked.tolist()}
        if text is None:
            return None, {"source": "similarity"}
        if self.detector is None:
            raise ValueError("a text prompt needs a pipeline with a detector")
        with timer.stage("detector"):
            detection = self.detector.best_box(image, text)
        if detection is None:
            warnings.append(
                f"the detector found no {text.caption!r} above box_threshold "
                f"{self.detector.box_threshold}; starting from the best-matching point instead"
            )
            return None, {"source": "similarity", "text": text.prompt, "detection": None}
        return box_centre(detection.box), {"source": "text", "text": text.prompt, "detection": detection.summary()}

    def _gate(self, image: np.ndarray, gate: TextTokens | None, timer: StageTimer) -> tuple[np.ndarray | None, dict]:
        """The second detection's boxes that gate PPSM (None: no gating) and their record for result.json."""
        if gate is None:
            return None, {"caption": None, "boxes": None, "note": "no text prompt: PPSM is not gated by boxes"}
        if self.detector is None:
            raise ValueError("a gating caption needs a pipeline with a detector")
        with timer.stage("detector"):
            boxes = self.detector.detect(image, gate).boxes
        return boxes, {"caption": gate.caption, "boxes": [[float(v) for v in b] for b in boxes]}

    def _candidates(
        self,
        request: CountRequest,
        similarity: np.ndarray,
        timer: StageTimer,
        gate_boxes: np.ndarray | None = None,
        fallback: bool = False,
        warnings: list[str] | None = None,
    ) -> tuple[np.ndarray, Density]:
        """Counter -> IDM -> PPSM (gated by `gate_boxes` when given); with `fallback`, all IDM points when PPSM keeps
        none (as the original)."""
        with timer.stage("counter"):
            density = self.counter.count(request)
        with timer.stage("idm"):
            points = candidate_points(density.map, request.transform.original_size, density.idm_threshold)
        with timer.stage("ppsm"):
            kept = points[select_points(points, similarity, density.count, gate_boxes)]
        if fallback and len(kept) == 0 and len(points) > 0:
            warnings.append(f"PPSM kept none of {len(points)} candidate points; using all of them (as the original)")
            kept = points
        return kept, density

    def _initial_exemplar(
        self, embedding: np.ndarray, transform: SamTransform, point: np.ndarray, guidance: Guidance, warnings: list[str]
    ) -> np.ndarray:
        """The exemplar cascade: guided point call, then the point with its best logits; the box of that mask.

        The original's third call (point + box + logits) is skipped: its mask is discarded and its score
        only labels the initial exemplar, which is never re-ranked, so no output depends on it.
        """
        prompt = transform.coords_to_input(point[None])
        guided, _ = self.sam.decode_best(embedding, Prompts.points(prompt), guidance)
        refined, _ = self.sam.decode_best(embedding, Prompts.points(prompt, guided[:, None]))
        box = rasterise(refined, transform, with_labels=False).boxes[0]
        if np.isnan(box).any():
            warnings.append("the initial exemplar mask is empty; using a one-pixel box at the best-matching point")
            box = np.array([point[0], point[1], point[0], point[1]], dtype=np.float64)
        return box

    def _point_boxes(
        self,
        embedding: np.ndarray,
        transform: SamTransform,
        points: np.ndarray,
        guidance: Guidance,
        warnings: list[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feedback: per point a guided call then a refined call (batched); boxes and scores of non-empty masks."""
        prompts = transform.coords_to_input(points)
        guided, _ = self.sam.decode_best(embedding, Prompts.points(prompts), guidance)
        refined, scores = self.sam.decode_best(embedding, Prompts.points(prompts, guided[:, None]))
        instances = rasterise(refined, transform, with_labels=False)
        if not instances.valid.all():
            warnings.append(f"{int((~instances.valid).sum())} feedback point(s) gave an empty mask and were skipped")
        return instances.boxes[instances.valid], scores[instances.valid]
