"""The PerSense pipeline on engines: NumPy between engine calls, prompts decoded in batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from persense.runtime.counters.base import Counter, CountRequest, Density
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.models.sam import Guidance, Prompts, SamEngines
from persense.runtime.pipeline.exemplars import box_centre, check_box
from persense.runtime.pipeline.idm import candidate_points
from persense.runtime.pipeline.masks import Instances, rasterise
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


@dataclass
class Opening:
    """One image's state after the stages both methods share (up to the first counter pass)."""

    timer: StageTimer
    warnings: list[str]
    embedding: np.ndarray
    transform: SamTransform
    similarity: np.ndarray
    guidance: Guidance
    request: CountRequest  # exemplars: the cascade's box
    first_exemplar: dict
    detections: np.ndarray | None  # every box of the text prompt's detection (None without text)
    gate_boxes: np.ndarray | None
    gating: dict
    launches: int  # decoder launches before this image


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
        opening = self._open(image, target, box, text, gate)
        timer, warnings, similarity = opening.timer, opening.warnings, opening.similarity
        request = opening.request
        first_pass = self._candidates(request, similarity, timer, opening.gate_boxes)[0]
        with timer.stage("feedback"):
            boxes, scores = self._point_boxes(
                opening.embedding, opening.transform, first_pass, opening.guidance, warnings
            )
            best = np.argsort(-scores, kind="stable")[:FEEDBACK_EXEMPLARS]
            request.exemplars = np.concatenate([request.exemplars[:1], boxes[best]])
        points, density = self._candidates(
            request, similarity, timer, opening.gate_boxes, fallback=True, warnings=warnings
        )
        with timer.stage("final_decoding"):
            logits, final_scores = self._decode_points(opening, points)
        with timer.stage("merge"):
            instances = rasterise(logits, opening.transform, with_labels=True)
            union = instances.union()
        return self._result(opening, points, first_pass, density, logits, final_scores, instances, union, len(points))

    def _open(
        self,
        image: np.ndarray,
        target: Target,
        box: np.ndarray | None,
        text: TextTokens | None,
        gate: TextTokens | None,
    ) -> Opening:
        """What both methods do first: detections, image encoding, location prior, the exemplar cascade."""
        timer, warnings = StageTimer(), []
        start, first_exemplar, detections = self._start(image, box, text, timer, warnings)
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
        return Opening(
            timer,
            warnings,
            embedding,
            transform,
            similarity,
            guidance,
            request,
            first_exemplar,
            detections,
            gate_boxes,
            gating,
            launches,
        )

    def _decode_points(self, opening: Opening, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The final plain single-point decodes: best logits [M,256,256] and scores [M]."""
        return self.sam.decode_best(opening.embedding, Prompts.points(opening.transform.coords_to_input(points)))

    def _result(
        self,
        opening: Opening,
        points: np.ndarray,
        first_pass: np.ndarray,
        density: Density,
        logits: np.ndarray,
        scores: np.ndarray,
        instances: Instances,
        union: np.ndarray,
        decoded: int,
        **extra: Any,
    ) -> SegmentResult:
        """The SegmentResult of a finished run (`decoded`: final prompts decoded; warnings logged once here)."""
        if len(points) == 0:
            opening.warnings.append("no instance found: the counter's density map gave no candidate point")
        for message in opening.warnings:
            log.warning(message)
        return SegmentResult(
            union=union,
            labels=instances.labels,
            points=points,
            boxes=instances.boxes,
            scores=scores,
            exemplars=opening.request.exemplars,
            count=density.count,
            first_pass_points=len(first_pass),
            decoder_prompts=2 + 2 * len(first_pass) + decoded,
            decoder_launches=self.sam.decoder_launches - opening.launches,
            timings_ms=opening.timer.ms,
            warnings=opening.warnings,
            logits=logits,
            transform=opening.transform,
            first_exemplar=opening.first_exemplar,
            ppsm_gating=opening.gating,
            **extra,
        )

    def _start(
        self, image: np.ndarray, box: np.ndarray | None, text: TextTokens | None, timer: StageTimer, warnings: list[str]
    ) -> tuple[np.ndarray | None, dict, np.ndarray | None]:
        """The first point when a box or the detector gives it (None: the similarity arg-max), its record
        (`source` "box", "text" or "similarity"; the detector's box, confidence and phrase for "text") and every
        box of that detection (None without a text prompt; PerSense++'s IMRM rescues masks with them)."""
        if box is not None:
            checked = check_box(box, image.shape[:2])
            return box_centre(checked), {"source": "box", "box": checked.tolist()}, None
        if text is None:
            return None, {"source": "similarity"}, None
        if self.detector is None:
            raise ValueError("a text prompt needs a pipeline with a detector")
        with timer.stage("detector"):
            detections = self.detector.detect(image, text)
            detection = self.detector.best_of(detections, text)
        if detection is None:
            warnings.append(
                f"the detector found no {text.caption!r} above box_threshold "
                f"{self.detector.box_threshold}; starting from the best-matching point instead"
            )
            return None, {"source": "similarity", "text": text.prompt, "detection": None}, detections.boxes
        record = {"source": "text", "text": text.prompt, "detection": detection.summary()}
        return box_centre(detection.box), record, detections.boxes

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
