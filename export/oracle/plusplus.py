"""The PyTorch oracle of PerSense++ (`persense++.py`), beside the PerSense one (SPEC-PLUSPLUS §1, §5).

Same seams as `OraclePipeline`: torch models, the original predictor's pre/post-processing (TorchPredictor),
density from a Counter, the first exemplar from a box (its int32 centre) or the similarity arg-max, and the
3-call cascade. What PerSense++ changes (§0):
- hybrid IDM (`hybrid_idm`) in both counter passes, points in the original's set order;
- PPSM = spatial gating by the second detection's boxes (`gating`); `gating_boxes=None` (no text prompt, no
  second detection) means no gating; an empty result falls back to all IDM points;
- feedback decoding in batches of <= 16 prompts (B1 PerSAM-guided, B2 with B1's best logits), one line per
  non-empty mask; K feedback lines;
- K >= 3: diversity-aware selection (`diversity`) gives 1-3 exemplars; else `[cascade box] + K boxes` in
  point order (unsorted, unlike PerSense's top-2 by score);
- final plain decoding in batches of <= 16; one mask -> as is; >= 2 -> IMRM (`imrm`) against the first
  detection's boxes (`detections`; None = no boxes, nothing rescued), then the OR of the kept masks.

Departures where the original crashes:
- an empty cascade mask: a one-pixel box at the first point, as OraclePipeline (the original: x.min() of empty);
- an empty feedback mask is skipped, as the original (it catches that one);
- no IDM point at all (a flat density map): the original's np.stack of an empty list raises; here no feedback
  lines (pass 1) or an empty union with a warning (pass 2);
- a zero-width/height feedback box in diversity selection's aspect ratio: the zero side counts as 1
  (`diversity.aspect_ratio`; the original raises ZeroDivisionError);
- the original skips images whose output PNG exists (a file-system concern, not the oracle's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from persense.export.features.resnet import build_resnet
from persense.export.oracle.diversity import DiversityResult, RoiFeatures, select_exemplars
from persense.export.oracle.gating import gate_or_all
from persense.export.oracle.hybrid_idm import hybrid_idm
from persense.export.oracle.imrm import ImrmResult, imrm
from persense.export.oracle.pipeline import OraclePipeline, inclusive_box, result_fields
from persense.export.sam.modeling import Sam
from persense.runtime.counters.base import Counter, CountRequest, Density
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.pipeline.exemplars import check_box
from persense.runtime.pipeline.result import SegmentResult
from persense.runtime.pipeline.timing import StageTimer
from persense.runtime.plusplus.flow import DIVERSITY_MIN_LINES

DECODE_BATCH = 16


@dataclass
class PlusPlusResult(SegmentResult):
    """SegmentResult plus what PerSense++ decided on the way."""

    first_idm_points: list[tuple[int, int]] = field(default_factory=list)  # pass-1 hybrid IDM, set order
    second_idm_points: list[tuple[int, int]] = field(default_factory=list)  # pass-2 hybrid IDM, set order
    first_pass_fallback: bool = False  # gating kept none in pass 1: all points used
    second_pass_fallback: bool = False
    feedback_lines: list[str] = field(default_factory=list)  # "y0 x0 y1 x1 score" per non-empty B2 mask
    header_line: str = ""  # the cascade box and A3's score, the file's first line
    diversity: DiversityResult | None = None  # when K >= 3
    imrm: ImrmResult | None = None  # when >= 2 final masks
    kept: np.ndarray | None = None  # [M] bool: final masks merged (IMRM's decision, all True below 2 masks)


class OraclePlusPlus:
    """PerSense++ in PyTorch, the original's stages and batches."""

    def __init__(
        self, sam: Sam, counter: Counter, resnet_weights: dict | str | Path | None = None, resnet_seed: int = 0
    ) -> None:
        self.persense = OraclePipeline(sam, counter)  # predictor, reference, location prior, cascade
        self.predictor = self.persense.predictor
        self.counter = counter
        self.resnet = build_resnet(resnet_weights, resnet_seed).to(self.predictor.device)
        self.launches = 0

    def reference(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(target_embedding, target_feat) as PerSense."""
        return self.persense.reference(image, mask)

    @torch.no_grad()
    def segment(
        self,
        image: np.ndarray,
        target: tuple[torch.Tensor, torch.Tensor],
        box: np.ndarray | None = None,
        detections: np.ndarray | None = None,
        gating_boxes: np.ndarray | None = None,
    ) -> PlusPlusResult:
        """Segment every instance as persense++.py does for one image.

        `box`: the first exemplar's detector box (xyxy; None = similarity arg-max); `detections`: the first
        detection's xyxy boxes (IMRM's rescue); `gating_boxes`: the second detection's xyxy boxes (PPSM;
        None = no gating, an empty array = nothing kept, i.e. the fallback to all points).
        """
        target_embedding, target_feat = target
        source = "similarity" if box is None else "box"
        if box is not None:
            box = check_box(box, image.shape[:2])
        predictor, timer, warnings = self.predictor, StageTimer(), []
        calls, self.launches = predictor.calls, 0
        with timer.stage("image_encoding"):
            predictor.set_image(image)
        with timer.stage("location_prior"):
            sim, attn_sim = self.persense._location_prior(target_feat)
            flat = int(sim.flatten().topk(1)[1])
            first = np.array([flat % sim.shape[1], flat // sim.shape[1]], dtype=np.int64)
            if box is not None:
                corners = np.int32(box)
                first = np.int32(((corners[0] + corners[2]) // 2, (corners[1] + corners[3]) // 2)).astype(np.int64)
        with timer.stage("exemplar_cascade"):
            masks, _, logits, best = self.persense._guided_then_refined(first, attn_sim, target_embedding)
            box = inclusive_box(masks[best])
            if box is None:
                warnings.append("the initial exemplar mask is empty; using a one-pixel box at the best-matching point")
                box = np.array([first[0], first[1], first[0], first[1]], dtype=np.float64)
            _, scores, _ = predictor.predict(first, box=box, mask_input=logits[best : best + 1])
        self.launches += predictor.calls - calls
        header = [int(box[1]), int(box[0]), int(box[3]), int(box[2])]  # [y0, x0, y1, x1]
        header_line = f"{header[0]} {header[1]} {header[2]} {header[3]} {scores[int(np.argmax(scores))]}"
        request = CountRequest(
            image, box[None], SamTransform(predictor.original_size), predictor.features.cpu().numpy(), sim.cpu().numpy()
        )
        first_points, first_pass, fallback1, _ = self._candidates(request, gating_boxes, timer)
        if fallback1:
            warnings.append(f"pass 1: gating kept none of {len(first_points)} points; using all of them")
        with timer.stage("feedback"):
            lines, boxes, line_scores = self._feedback(first_pass, attn_sim, target_embedding, warnings)
        diversity = None
        with timer.stage("exemplar_selection"):
            if len(lines) >= DIVERSITY_MIN_LINES:
                diversity = select_exemplars(boxes, line_scores, header, RoiFeatures(self.resnet, image))
                chosen_boxes = diversity.boxes
            else:
                chosen_boxes = [header, *boxes]
            request.exemplars = np.array([[x0, y0, x1, y1] for y0, x0, y1, x1 in chosen_boxes], dtype=np.float64)
        second_points, points, fallback2, density = self._candidates(request, gating_boxes, timer)
        if fallback2:
            warnings.append(f"pass 2: gating kept none of {len(second_points)} points; using all of them")
        with timer.stage("final_decoding"):
            final_masks, final_scores = self._final(points)
        with timer.stage("merge"):
            union, kept, refined = self._merge(final_masks, detections)
        return PlusPlusResult(
            **result_fields(
                union, points, final_masks, final_scores, request, density, len(first_pass), timer, warnings
            ),
            decoder_prompts=predictor.calls - calls,
            decoder_launches=self.launches,
            first_exemplar={"source": source, "point": [int(v) for v in first]},
            method="persense++",
            first_idm_points=first_points,
            second_idm_points=second_points,
            first_pass_fallback=fallback1,
            second_pass_fallback=fallback2,
            feedback_lines=lines,
            header_line=header_line,
            diversity=diversity,
            imrm=refined,
            kept=kept,
        )

    def _candidates(
        self, request: CountRequest, gating_boxes: np.ndarray | None, timer: StageTimer
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool, Density]:
        """Counter -> hybrid IDM -> gating: (all IDM points, points to decode, fallback taken, density)."""
        with timer.stage("counter"):
            density = self.counter.count(request)
        with timer.stage("idm"):
            points = hybrid_idm(density.map, request.transform.original_size, density.idm_threshold)
        with timer.stage("ppsm"):
            kept, fallback = gate_or_all(points, gating_boxes)
        return points, kept, fallback, density

    def _feedback(
        self, points: list[tuple[int, int]], attn_sim: torch.Tensor, target_embedding: torch.Tensor, warnings: list
    ) -> tuple[list[str], list[list[int]], list[float]]:
        """B1 (guided) then B2 (B1's best logits) per batch of 16: (lines, [y0, x0, y1, x1] boxes, scores)."""
        lines, boxes, scores = [], [], []
        for start in range(0, len(points), DECODE_BATCH):
            batch = np.array(points[start : start + DECODE_BATCH], dtype=np.int64)
            _, scores1, low1 = self.predict_batch(batch, attn_sim=attn_sim, target_embedding=target_embedding)
            best1 = scores1.argmax(axis=1)
            masks2, scores2, _ = self.predict_batch(batch, mask_input=low1[np.arange(len(batch)), best1])
            for row in range(len(batch)):
                best2 = int(scores2[row].argmax())
                box = inclusive_box(masks2[row, best2])
                if box is None:
                    warnings.append(f"feedback point {tuple(batch[row])} gave an empty mask and was skipped")
                    continue
                x0, y0, x1, y1 = (int(v) for v in box)
                score = float(scores2[row, best2])
                lines.append(f"{y0} {x0} {y1} {x1} {score!r}")
                boxes.append([y0, x0, y1, x1])
                scores.append(score)
        return lines, boxes, scores

    def _final(self, points: list[tuple[int, int]]) -> tuple[list[np.ndarray], list[float]]:
        """C: plain point prompts per batch of 16; each row's best mask and score."""
        masks, scores = [], []
        for start in range(0, len(points), DECODE_BATCH):
            batch = np.array(points[start : start + DECODE_BATCH], dtype=np.int64)
            batch_masks, batch_scores, _ = self.predict_batch(batch)
            best = batch_scores.argmax(axis=1)
            for row in range(len(batch)):
                masks.append(batch_masks[row, best[row]])
                scores.append(float(batch_scores[row, best[row]]))
        return masks, scores

    def _merge(
        self, masks: list[np.ndarray], detections: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, ImrmResult | None]:
        """One mask as is; >= 2 through IMRM, then the OR of the kept ones x255: (union, kept flags, IMRM)."""
        union = np.zeros(self.predictor.original_size, dtype=np.uint8)
        if len(masks) < 2:
            for mask in masks:
                union |= mask.astype(np.uint8) * 255
            return union, np.ones(len(masks), dtype=bool), None
        refined = imrm(masks, detections)
        for mask, keep in zip(masks, refined.kept):
            if keep:
                union |= mask.astype(np.uint8)
        return union * 255, np.array(refined.kept), refined

    def predict_batch(
        self,
        points: np.ndarray,
        mask_input: np.ndarray | None = None,
        attn_sim: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """predict_torch on M single-point prompts in one decoder call (rows as TorchPredictor.predict's):
        (masks [M,3,H,W] bool, scores [M,3], low-res logits [M,3,256,256])."""
        predictor = self.predictor
        rows = len(points)
        transform = SamTransform(predictor.original_size, predictor.sam.image_encoder.img_size)
        coords = torch.as_tensor(transform.coords_to_input(np.asarray(points, float).reshape(rows, 1, 2)))
        coords = torch.cat([coords, torch.zeros(rows, 1, 2, dtype=coords.dtype)], dim=1)
        labels = torch.tensor([1.0, -1.0]).expand(rows, 2)
        self.launches += 1
        return predictor.decode(coords, labels, mask_input, attn_sim, target_embedding)
