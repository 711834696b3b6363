"""A reference from a SAM prompt (box or clicks) instead of a mask: segment-anything's decode, the cache, the CLI."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from prompt_scenes import ellipse_scenes

from persense.export.sam.build import BUNDLED_CHECKPOINTS, load_sam
from persense.runtime.api import PerSense
from persense.runtime.cli.infer import main as infer
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.metrics import mask_iou
from persense.runtime.pipeline.reference_prompt import ObjectPrompt, prompt_mask

LOGIT_ATOL = 2e-3  # runtime (ONNX encoder + decoder) vs segment-anything in torch, on logits of magnitude ~1-10


@pytest.fixture(scope="module")
def scenes():
    """The reference and target ellipse scenes, the reference instance's mask and the box around it."""
    return ellipse_scenes()


@pytest.fixture(scope="module")
def ps(trained_tiny_engines):
    """The trained tiny SAM's engines, without the reference cache."""
    return PerSense.open(trained_tiny_engines, cache=False, threads=1)


def test_box_reference_follows_the_object_and_segments_the_target(ps, scenes):
    """A box around the reference instance gives SAM's mask with IoU 0.737 against the true mask (measured; >= 0.7
    asserted), and segmenting the target with it finds the same instances as with the true mask."""
    image, box, truth = scenes["reference"].image, scenes["box"], scenes["mask"]
    prompted = ps.reference(image, box=box)
    assert prompted.mask.shape == truth.shape and prompted.mask.dtype == bool
    assert mask_iou(prompted.mask, truth) >= 0.7
    target = scenes["target"]
    from_box = ps.segment(target.image, prompted, density=target.density)
    from_mask = ps.segment(target.image, ps.reference(image, truth), density=target.density)
    assert len(from_box.points) == len(from_mask.points) == 41  # 40 ellipses drawn
    assert mask_iou(from_box.union > 0, target.labels > 0) >= 0.8  # 0.845 measured


def test_reference_is_encoded_from_samS_mask_with_one_image_encoding(ps, scenes, monkeypatch):
    """The prompt's reference equals the reference encoded from the mask SAM made, and the encoder ran once."""
    image = scenes["reference"].image
    runs = []
    run = ps.sam.encoder.run
    monkeypatch.setattr(ps.sam.encoder, "run", lambda feeds: runs.append(1) or run(feeds))
    prompted = ps.reference(image, points=[(160, 140)])
    assert len(runs) == 1
    from_mask = ps.reference(image, prompted.mask)
    np.testing.assert_array_equal(prompted.target.embedding, from_mask.target.embedding)
    np.testing.assert_array_equal(prompted.target.feature, from_mask.target.feature)


def predictor_best(sam, image: np.ndarray, prompt: ObjectPrompt) -> tuple[np.ndarray, np.ndarray, float]:
    """segment-anything's SamPredictor.predict(multimask_output=True) step by step (its module imports torchvision,
    unusable here): prompt encoder given the points and the box (it pads points with (0, 0)/-1 only without a box),
    mask decoder, postprocess_masks > 0; then the best output by predicted IoU. (mask, low-res logits, score)."""
    transform = SamTransform(image.shape[:2])
    with torch.no_grad():
        features = sam.image_encoder(torch.from_numpy(transform.image_tensor(image)))
        points = None
        if prompt.points:
            coords = torch.as_tensor(transform.coords_to_input(np.array(prompt.points)))[None]
            points = (coords, torch.as_tensor(prompt.labels, dtype=torch.int64)[None])
        boxes = None if prompt.box is None else torch.as_tensor(transform.boxes_to_input(np.array(prompt.box)))[None]
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low, iou = sam.mask_decoder(
            image_embeddings=features,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        masks = sam.postprocess_masks(low, transform.input_size, transform.original_size) > 0
    best = int(torch.argmax(iou[0]))
    return masks[0, best].numpy(), low[0, best].numpy(), float(iou[0, best])


@pytest.mark.parametrize(
    "prompt",
    [
        {"box": "object"},
        {"points": [(160.0, 140.0)], "labels": [1]},
        {"points": [(160.0, 140.0), (40.0, 30.0)], "labels": [1, 0]},
        {"box": "object", "points": [(160.0, 140.0)], "labels": [1]},
    ],
    ids=["box", "point", "point_and_background_point", "box_and_point"],
)
def test_prompt_decode_matches_segment_anything(prompt, ps, scenes):
    """Box corners labelled 2/3, points with their labels, padding only without a box, multimask, best by IoU:
    the runtime's mask equals segment-anything's on the trained tiny SAM."""
    sam = load_sam("tiny-trained", BUNDLED_CHECKPOINTS["tiny-trained"]).eval()
    image = scenes["reference"].image
    checked = ObjectPrompt.make(image.shape[:2], **{**prompt, **({"box": scenes["box"]} if "box" in prompt else {})})
    expected_mask, expected_logits, expected_score = predictor_best(sam, image, checked)
    embedding, transform = ps.sam.encode(image)
    logits, scores = ps.sam.decode_best(embedding, checked.sam_prompts(transform))
    np.testing.assert_allclose(logits[0], expected_logits, atol=LOGIT_ATOL)
    assert scores[0] == pytest.approx(expected_score, abs=1e-4)
    mask, score = prompt_mask(ps.sam, embedding, transform, checked)
    assert score == scores[0]
    assert (mask != expected_mask).sum() <= 0.001 * mask.size  # pixels whose logit is within LOGIT_ATOL of 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"box": (10, 10, 500, 100)}, "is not inside the 384x288 reference image"),
        ({"box": (100, 100, 50, 150)}, "is inverted or empty"),
        ({"box": (1, 2, 3)}, "reference box must be four finite numbers (x0, y0, x1, y1), got (1, 2, 3)"),
        ({"box": np.ones(8)}, "reference box must be four finite numbers (x0, y0, x1, y1), got [1.0, 1.0"),
        ({"points": [(10, 300)]}, "reference point (10, 300) is outside the 384x288 reference image"),
        ({"points": [(-1, 3)]}, "is outside the 384x288 reference image"),
        ({"points": [(float("nan"), 3)]}, "reference points must be finite (x, y) pairs, got [(nan, 3)]"),
        ({"points": [(1, 2), (3,)]}, "reference points must be finite (x, y) pairs, got [(1, 2), (3,)]"),
        ({"points": [(10, 10), (20, 20)], "labels": [1]}, "got 1 point labels for 2 reference points"),
        ({"points": [(10, 10)], "labels": [2]}, "point labels must be 1 (on the object) or 0 (off it)"),
        ({"points": [(10, 10)], "labels": [0]}, "needs a box or at least one point on the object"),
        ({"labels": [1]}, "got 1 point labels for 0 reference points"),
        ({}, "give the reference object as a mask or as a prompt (box and/or points): none was given"),
        ({"mask": "true", "box": (1, 1, 50, 50)}, "not both"),
    ],
)
def test_bad_prompts_are_refused(kwargs, message, ps, scenes):
    image = scenes["reference"].image
    if kwargs.get("mask") == "true":
        kwargs = {**kwargs, "mask": scenes["mask"]}
    with pytest.raises(PersenseError) as refused:
        ps.reference(image, **kwargs)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_an_empty_sam_mask_is_refused(ps, scenes, monkeypatch):
    """Where SAM's best mask has no positive pixel the prompt is refused, not encoded."""
    embedding, transform = ps.sam.encode(scenes["reference"].image)
    monkeypatch.setattr(ps.sam, "decode_best", lambda *_: (np.full((1, 256, 256), -5, np.float32), np.ones(1)))
    with pytest.raises(PersenseError, match="SAM's mask for the reference prompt .* is empty"):
        prompt_mask(ps.sam, embedding, transform, ObjectPrompt.make((288, 384), points=[(5, 5)]))


def test_cache_keys_on_the_prompt_and_keeps_its_mask(trained_tiny_engines, scenes, tmp_path):
    """Same prompt: a hit with the same mask; another prompt or a mask: another key; a lost mask file: encoded again."""
    cached = PerSense.open(trained_tiny_engines, cache_dir=tmp_path, threads=1)
    image, box = scenes["reference"].image, scenes["box"]
    first = cached.reference(image, box=box)
    again = cached.reference(image, box=np.array(box))
    assert (first.source, again.source) == ("encoded", "cache") and again.key == first.key
    np.testing.assert_array_equal(again.mask, first.mask)
    np.testing.assert_array_equal(again.target.embedding, first.target.embedding)
    moved = cached.reference(image, box=(box[0] + 1, *box[1:]))
    clicked = cached.reference(image, points=[(160, 140)])
    given = cached.reference(image, first.mask)
    assert len({first.key, moved.key, clicked.key, given.key}) == 4
    assert given.mask is None
    (tmp_path / f"{first.key}.mask.png").unlink()
    assert cached.reference(image, box=box).source == "encoded"
    assert (tmp_path / f"{first.key}.mask.png").is_file()


def test_infer_with_a_reference_box_writes_the_mask_it_used(trained_tiny_engines, scenes, ps, tmp_path, capsys):
    """persense-infer TARGET REF --ref-box: SAM's mask for the box in out/reference_mask.png, the prompt in
    result.json (the reference image as its own target, with the SAM-only counter: a quick run)."""
    reference = scenes["reference"]
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), cv2.cvtColor(reference.image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    box = ",".join(f"{v:g}" for v in scenes["box"])
    flags = ["--engines", str(trained_tiny_engines), "--counter", "sam", "--no-cache", "--out", str(out)]
    assert infer([str(ref), str(ref), "--ref-box", box, *flags, "--json"]) == 0
    written = cv2.imread(str(out / "reference_mask.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(written > 0, ps.reference(reference.image, box=scenes["box"]).mask)
    summary = json.loads(capsys.readouterr().out)
    assert summary["reference"] == str(ref) and "reference_mask" not in summary
    assert summary["reference_prompt"] == {"box": list(scenes["box"]), "points": None, "labels": None}
    assert infer([str(ref), str(ref), "--ref-point", "160,140", "--ref-point", "40,30", "--ref-label", "1"] + flags)
    assert "got 1 point labels for 2 reference points" in capsys.readouterr().err
    assert infer([str(ref), str(ref), str(ref), "--ref-box", box, "--reference", "x.npz"] + flags) == 2
    assert "--ref-box and --ref-point encode a reference from REF" in capsys.readouterr().err
