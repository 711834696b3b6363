"""The PyTorch oracle: PerSense as the original runs it, one SAM decoder call per prompt.

Same algorithm as `persense.py` without text (first point = similarity argmax, or the centre of a
given detector box as with text), on the same
weights as the exported engines: torch models, the original predictor's pre/post-processing
(PIL resize, `postprocess_masks` of all three candidate masks), the 3-call exemplar cascade, and
the sequential per-point loops. It is the oracle for parity tests and the baseline of persense-bench.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from persense.export.oracle.glue import idm_points, ppsm_points
from persense.export.sam.modeling import Sam
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.runtime.counters.base import Counter, CountRequest, Density
from persense.runtime.geometry.transforms import GRID, LOW_RES, SamTransform, preprocess_shape
from persense.runtime.models.sam import EMBED_DIM
from persense.runtime.pipeline.exemplars import check_box
from persense.runtime.pipeline.flow import FEEDBACK_EXEMPLARS
from persense.runtime.pipeline.result import SegmentResult
from persense.runtime.pipeline.timing import StageTimer


def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """segment-anything's ResizeLongestSide.apply_image: a PIL bilinear resize."""
    return np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))


class TorchPredictor:
    """The original's (PerSAM-patched) SamPredictor: one image, one prompt per predict() call."""

    def __init__(self, sam: Sam) -> None:
        self.sam = sam.eval()
        self.decoder = PerSamDecoder(sam).eval()
        self.device = next(sam.parameters()).device  # the oracle runs where its model is (CPU or CUDA)
        self.calls = 0

    @torch.no_grad()
    def set_image(self, image: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor | None:
        """Encode an RGB image; a 3-channel 0/255 mask goes through the same resize and normalisation."""
        self.original_size = image.shape[:2]
        self.input_size = preprocess_shape(*self.original_size, self.sam.image_encoder.img_size)

        def to_input(array: np.ndarray) -> torch.Tensor:
            resized = torch.as_tensor(pil_resize(array, *self.input_size), device=self.device)
            resized = resized.permute(2, 0, 1)[None].float()
            return self.sam.preprocess(resized)

        self.features = self.sam.image_encoder(to_input(image))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # stage timings: the encoding ends here, not in the next stage
        return None if mask is None else to_input(mask)

    def predict(
        self,
        point: np.ndarray,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        attn_sim: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Multimask prediction for one positive point: (masks [3,H,W] bool, scores [3], low-res logits [3,256,256])."""
        transform = SamTransform(self.original_size, self.sam.image_encoder.img_size)
        coords = torch.as_tensor(transform.coords_to_input(np.asarray(point, float).reshape(1, 2)))
        if box is None:
            coords = torch.cat([coords, torch.zeros(1, 2)])
            labels = torch.tensor([1.0, -1.0])
        else:
            coords = torch.cat([coords, torch.as_tensor(transform.boxes_to_input(box.reshape(1, 4))).reshape(2, 2)])
            labels = torch.tensor([1.0, 2.0, 3.0])
        masks, scores, low = self.decode(coords[None], labels[None], mask_input, attn_sim, target_embedding)
        return masks[0], scores[0], low[0]

    @torch.no_grad()
    def decode(
        self,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: np.ndarray | None = None,
        attn_sim: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder call on B prompts (coords [B,N,2] in SAM's input frame, labels [B,N]), multimask:
        (masks [B,3,H,W] bool, scores [B,3], low-res logits [B,3,256,256])."""
        rows = coords.shape[0]
        guided = target_embedding is not None
        low, iou = self.decoder(
            *(
                tensor.to(self.device)
                for tensor in (
                    self.features,
                    coords,
                    labels,
                    torch.zeros(rows, 1, LOW_RES, LOW_RES)
                    if mask_input is None
                    else torch.as_tensor(mask_input).reshape(rows, 1, LOW_RES, LOW_RES),
                    torch.full((rows,), 0.0 if mask_input is None else 1.0),
                    target_embedding.reshape(1, -1) if guided else torch.zeros(1, EMBED_DIM),
                    attn_sim.reshape(1, -1) if guided else torch.zeros(1, GRID * GRID),
                    torch.full((rows,), 1.0 if guided else 0.0),
                )
            )
        )
        self.calls += rows
        low, iou = low[:, 1:], iou[:, 1:]
        masks = self.sam.postprocess_masks(low, self.input_size, self.original_size) > 0
        return masks.cpu().numpy(), iou.cpu().numpy(), low.cpu().numpy()


def result_fields(
    union: np.ndarray,
    points: list,
    masks: list[np.ndarray],
    scores: list[float],
    request: CountRequest,
    density: Density,
    first_pass_points: int,
    timer: StageTimer,
    warnings: list[str],
) -> dict:
    """The SegmentResult fields both oracles fill the same way (a warning when no point was found)."""
    if not points:
        warnings.append("no instance found: the counter's density map gave no candidate point")
    boxes = [inclusive_box(m) for m in masks]
    return {
        "union": union,
        "labels": None,
        "points": np.array(points, dtype=np.float64).reshape(-1, 2),
        "boxes": np.array([b if b is not None else [np.nan] * 4 for b in boxes]).reshape(-1, 4),
        "scores": np.array(scores),
        "exemplars": request.exemplars,
        "count": density.count,
        "first_pass_points": first_pass_points,
        "timings_ms": timer.ms,
        "warnings": warnings,
    }


def inclusive_box(mask: np.ndarray) -> np.ndarray | None:
    """The original's box of a mask: np.nonzero min/max as (x0, y0, x1, y1); None for an empty mask."""
    y, x = np.nonzero(mask)
    if len(x) == 0:
        return None
    return np.array([x.min(), y.min(), x.max(), y.max()], dtype=np.float64)


class OraclePipeline:
    """PerSense in PyTorch with the original's per-point sequential structure."""

    def __init__(self, sam: Sam, counter: Counter) -> None:
        self.predictor = TorchPredictor(sam)
        self.counter = counter

    @torch.no_grad()
    def reference(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(target_embedding [1,1,256], target_feat [1,256]) from the reference image and its boolean mask."""
        mask_rgb = np.repeat(np.where(mask, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
        ref_mask = self.predictor.set_image(image, mask_rgb)
        ref_feat = self.predictor.features.squeeze().permute(1, 2, 0)
        ref_mask = F.interpolate(ref_mask, size=ref_feat.shape[0:2], mode="bilinear").squeeze()[0]
        target_embedding = ref_feat[ref_mask > 0].mean(0).unsqueeze(0)
        target_feat = target_embedding / target_embedding.norm(dim=-1, keepdim=True)
        return target_embedding.unsqueeze(0), target_feat

    @torch.no_grad()
    def segment(
        self,
        image: np.ndarray,
        target: tuple[torch.Tensor, torch.Tensor],
        box: np.ndarray | None = None,
        gating_boxes: np.ndarray | None = None,
    ) -> SegmentResult:
        """Segment every instance, one decoder call per prompt, stage by stage as the original.

        `box`: the detector's box of the first exemplar; as persense.py's `filtered_similarity`, the
        cascade then starts from the centre of the int32-cast box instead of the similarity arg-max.
        `gating_boxes`: the second detection's ("all <plural>") xyxy boxes that PPSM's points must lie in.
        """
        target_embedding, target_feat = target
        if box is not None:
            box = check_box(box, image.shape[:2])
        predictor, timer, warnings = self.predictor, StageTimer(), []
        calls = predictor.calls
        with timer.stage("image_encoding"):
            predictor.set_image(image)
        with timer.stage("location_prior"):
            sim, attn_sim = self._location_prior(target_feat)
            flat = int(sim.flatten().topk(1)[1])
            first = np.array([flat % sim.shape[1], flat // sim.shape[1]], dtype=np.int64)
            if box is not None:
                corners = np.int32(box)
                first = np.int32(((corners[0] + corners[2]) // 2, (corners[1] + corners[3]) // 2)).astype(np.int64)
        with timer.stage("exemplar_cascade"):
            masks, scores, logits, best = self._guided_then_refined(first, attn_sim, target_embedding)
            box = inclusive_box(masks[best])
            if box is None:
                warnings.append("the initial exemplar mask is empty; using a one-pixel box at the best-matching point")
                box = np.array([first[0], first[1], first[0], first[1]], dtype=np.float64)
            predictor.predict(first, box=box, mask_input=logits[best : best + 1])
        transform = SamTransform(predictor.original_size)
        request = CountRequest(image, box[None], transform, predictor.features.cpu().numpy(), sim.cpu().numpy())
        _, first_pass, _ = self._candidates(request, sim, timer, gating_boxes)
        with timer.stage("feedback"):
            lines = []
            for point in first_pass:
                masks, scores, _, best = self._guided_then_refined(np.asarray(point), attn_sim, target_embedding)
                point_box = inclusive_box(masks[best])
                if point_box is None:
                    warnings.append("a feedback point gave an empty mask and was skipped")
                    continue
                lines.append((point_box, float(scores[best])))
            ranked = sorted(lines, key=lambda line: line[1], reverse=True)[:FEEDBACK_EXEMPLARS]
            request.exemplars = np.array([box] + [line[0] for line in ranked])
        all_points, points, density = self._candidates(request, sim, timer, gating_boxes)
        if not points and all_points:
            warnings.append(f"PPSM kept none of {len(all_points)} candidate points; using all of them")
            points = all_points
        with timer.stage("final_decoding"):
            chosen, final_scores = [], []
            for point in points:
                masks, scores, _ = predictor.predict(np.asarray(point, dtype=np.int64))
                best = int(np.argmax(scores))
                chosen.append(masks[best])
                final_scores.append(float(scores[best]))
        with timer.stage("merge"):
            union = np.zeros(predictor.original_size, dtype=np.uint8)
            for mask in chosen:
                union |= mask.astype(np.uint8) * 255
        prompts = predictor.calls - calls
        return SegmentResult(
            **result_fields(union, points, chosen, final_scores, request, density, len(first_pass), timer, warnings),
            decoder_prompts=prompts,
            decoder_launches=prompts,
        )

    def _guided_then_refined(
        self, point: np.ndarray, attn_sim: torch.Tensor, target_embedding: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """A PerSAM-guided call, then a plain call with its best logits: (masks, scores, logits, best index)."""
        _, scores, logits = self.predictor.predict(point, attn_sim=attn_sim, target_embedding=target_embedding)
        best = int(np.argmax(scores))
        masks, scores, logits = self.predictor.predict(point, mask_input=logits[best : best + 1])
        return masks, scores, logits, int(np.argmax(scores))

    def _location_prior(self, target_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity map at the original size and the attention similarity, as persense.py computes them."""
        predictor = self.predictor
        test_feat = predictor.features.squeeze()
        c, h, w = test_feat.shape
        test_feat = (test_feat / test_feat.norm(dim=0, keepdim=True)).reshape(c, h * w)
        sim = (target_feat @ test_feat).reshape(1, 1, h, w)
        sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
        sim = predictor.sam.postprocess_masks(sim, predictor.input_size, predictor.original_size).squeeze()
        sim_tgt = (sim - sim.mean()) / torch.std(sim)
        sim_tgt = F.interpolate(sim_tgt.unsqueeze(0).unsqueeze(0), size=(GRID, GRID), mode="bilinear")
        return sim, sim_tgt.sigmoid_().unsqueeze(0).flatten(3)

    def _candidates(
        self, request: CountRequest, sim: torch.Tensor, timer: StageTimer, gating_boxes: np.ndarray | None
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], Density]:
        """Counter -> IDM -> PPSM, per point: (all IDM points, the points PPSM keeps, the density)."""
        with timer.stage("counter"):
            density = self.counter.count(request)
        with timer.stage("idm"):
            points = [
                (int(x), int(y))
                for x, y in idm_points(density.map, request.transform.original_size, density.idm_threshold)[0]
            ]
        with timer.stage("ppsm"):
            kept = ppsm_points(sim, np.array(points).reshape(-1, 2), density.count, gating_boxes)
        return points, kept, density
