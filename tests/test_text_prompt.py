"""The detector's text and image sides against the original's code (groundingdino/util/inference.py,
datasets/transforms.py), re-implemented literally here with torch and Pillow as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_detector import write_tokenizer, write_vocab
from PIL import Image

from persense.runtime.errors import PersenseError
from persense.runtime.manifest import sha256_file
from persense.runtime.models.detector import (
    BOX_THRESHOLD,
    TEXT_THRESHOLD,
    GroundingDino,
    postprocess,
    preprocess,
    resized_size,
)
from persense.runtime.models.text import TextEncoder, all_caption, caption_for


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test vocabulary (fake_detector.write_vocab)."""
    return write_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def tokenizer_file(vocab_file: Path) -> Path:
    """The test vocabulary as a `tokenizers` JSON."""
    return write_tokenizer(vocab_file, vocab_file.with_name("tokenizer.json"))


def original_preprocess_caption(caption: str) -> str:
    """groundingdino/util/inference.py preprocess_caption, verbatim."""
    result = caption.lower().strip()
    if result.endswith("."):
        return result
    return result + "."


@pytest.mark.parametrize("prompt", ["apple", "Apple", "  red apple  ", "apple.", "APPLES", "red car.", "a-b"])
def test_caption_is_the_originals(prompt):
    assert caption_for(prompt) == original_preprocess_caption(". ".join([prompt]))


@pytest.mark.parametrize(
    "prompt", ["apple", "Red Apple", "  apples ", "apple.", "red-car", "bottle?", "Pérson", "x9z", "orange  car"]
)
def test_tokens_match_transformers_bert_tokenizers(prompt, vocab_file, tokenizer_file):
    from transformers.models.bert import BertTokenizer, BertTokenizerLegacy

    encoded = TextEncoder(tokenizer_file, 256).encode(prompt)
    caption = original_preprocess_caption(prompt)
    assert encoded.caption == caption
    for oracle in (BertTokenizerLegacy(str(vocab_file)), BertTokenizer(str(vocab_file))):
        expected = oracle(caption, return_token_type_ids=True, return_attention_mask=True)
        assert encoded.input_ids.tolist() == [expected["input_ids"]], type(oracle).__name__
        assert encoded.token_type_ids.tolist() == [expected["token_type_ids"]]
        assert encoded.attention_mask.tolist() == [expected["attention_mask"]]
    assert encoded.input_ids.dtype == np.int64 and encoded.tokens[0] == "[CLS]" and encoded.tokens[-1] == "[SEP]"


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (" . ", "is empty"),
        ("\t\n", "is empty"),
        ("zebra€", "not in the detector's vocabulary"),
        ("red 日本", "not in the detector's vocabulary"),
        ("a " * 20, "tokens long; the detector takes at most 16"),
    ],
)
def test_prompts_the_detector_cannot_take_are_refused(prompt, message, tokenizer_file):
    with pytest.raises(PersenseError, match=message):
        TextEncoder(tokenizer_file, 16).encode(prompt)


@pytest.mark.parametrize(
    "word,plural",
    [
        ("apple", "all apples"),
        ("glass", "all glass"),  # ends with s: kept as is
        ("key", "all keys"),  # e + y
        ("berry", "all berries"),
        ("peach", "all peaches"),
        ("tomato", "all tomatoes"),  # a vowel (a, i, o, u) takes "es"
        ("kiwi", "all kiwies"),
        ("Apple", "all Apples"),  # the case is the word's; the caption lower-cases it
        ("red car", "all red cars"),
    ],
)
def test_second_detection_caption_is_the_originals_enhance_class_name(word, plural):
    assert all_caption(word) == plural


def test_a_derived_caption_may_hold_unknown_words(tokenizer_file):
    encoder = TextEncoder(tokenizer_file, 256)
    with pytest.raises(PersenseError, match="not in the detector's vocabulary"):
        encoder.encode("all apples\u00e9\u4e2d")
    tokens = encoder.encode("all apples\u00e9\u4e2d", allow_unknown=True)
    assert "[UNK]" in tokens.tokens


def test_unknown_word_is_named(tokenizer_file):
    with pytest.raises(PersenseError, match=r"'€uro' not in the detector's vocabulary"):
        TextEncoder(tokenizer_file, 16).encode("red €uro")


def test_longest_prompt_that_fits_is_taken(tokenizer_file):
    assert TextEncoder(tokenizer_file, 16).encode("a " * 13).input_ids.shape == (1, 16)  # 13 + '.' + CLS + SEP


def test_tokenizer_file_is_checked(tokenizer_file, tmp_path):
    good = sha256_file(tokenizer_file)
    assert TextEncoder.verified(tokenizer_file, good, 256).max_text_len == 256
    with pytest.raises(PersenseError, match="does not match the manifest"):
        TextEncoder.verified(tokenizer_file, "0" * 64, 256)
    with pytest.raises(PersenseError, match="tokenizer is missing"):
        TextEncoder.verified(tmp_path / "gone.json", good, 256)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PersenseError, match="not a tokenizers JSON"):
        TextEncoder(broken, 256)


def test_tokenizer_without_the_bert_template_is_refused(tokenizer_file, tmp_path):
    data = json.loads(tokenizer_file.read_text())
    data["post_processor"] = None
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    with pytest.raises(PersenseError, match=r"\[CLS\] ... \[SEP\]"):
        TextEncoder(bare, 256)


# ------------------------------------------------------------------------------------ image side


def original_size(image_size: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """datasets/transforms.py resize.get_size_with_aspect_ratio, verbatim: (w, h) in, (h, w) out."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))

    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)

    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)

    return (oh, ow)


SHAPES = [
    (480, 640),
    (640, 480),
    (800, 1200),
    (1200, 800),
    (800, 1333),
    (801, 1335),
    (10, 10),
    (1, 1),
    (3, 7),
    (2000, 3),
    (3, 2000),
    (1333, 800),
    (5000, 100),
    (100, 100000),
    (768, 1024),
    (1080, 1920),
    (4000, 3000),
]


@pytest.mark.parametrize("height,width", SHAPES)
def test_resized_size_is_the_originals(height, width):
    assert resized_size(height, width) == original_size((width, height), 800, 1333)


def original_pixels(image: np.ndarray) -> np.ndarray:
    """Model.preprocess_image on an RGB image: PIL bilinear resize (torchvision F.resize on a PIL image),
    ToTensor, Normalize."""
    pil = Image.fromarray(image)
    oh, ow = original_size(pil.size, 800, 1333)
    resized = pil.resize((ow, oh), Image.BILINEAR)
    tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((tensor - mean) / std).numpy()


@pytest.mark.parametrize("height,width", [(480, 640), (700, 300), (37, 53), (800, 1333), (90, 1500)])
def test_pixels_match_the_originals(height, width):
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 3 :, : width // 2] = 200  # flat regions and edges as well as noise
    ours, expected = preprocess(image), original_pixels(image)
    assert ours.shape == (1, *expected.shape) and ours.dtype == np.float32
    diff = np.abs(ours[0] - expected)
    # Pillow 13 may resample the vertical axis first: at most one grey level apart, in few pixels.
    assert diff.max() <= 1 / 255 / 0.224 + 1e-6
    assert (diff > 1e-6).mean() < 0.01


def test_too_elongated_image_is_refused():
    with pytest.raises(PersenseError, match=r"too elongated for the detector \(resized to 0x0; it takes sides of"):
        preprocess(np.zeros((10, 100000, 3), np.uint8))
    assert preprocess(np.zeros((100, 700, 3), np.uint8), 190).shape == (1, 3, 190, 1330)
    with pytest.raises(PersenseError, match=r"resized to 1336x167; it takes sides of at least 225 px"):
        preprocess(np.zeros((100, 800, 3), np.uint8), 225)


# ------------------------------------------------------------------------------------ post-processing


def original_predict(
    logits: np.ndarray, boxes: np.ndarray, height: int, width: int, box_threshold: float = BOX_THRESHOLD
):
    """inference.py predict (sigmoid, per-query max, > box_threshold) then Model.post_process_result
    (x (W,H,W,H), torchvision's cxcywh -> xyxy) on logits padded with -inf to 256 tokens, as the model gives them."""
    padded = torch.full((logits.shape[0], 256), float("-inf"))
    padded[:, : logits.shape[1]] = torch.from_numpy(logits)
    prediction_logits = padded.sigmoid()
    prediction_boxes = torch.from_numpy(boxes)
    mask = prediction_logits.max(dim=1)[0] > box_threshold
    kept_logits = prediction_logits[mask]
    kept_boxes = prediction_boxes[mask] * torch.Tensor([width, height, width, height])
    cx, cy, w, h = kept_boxes.unbind(-1)  # torchvision.ops.boxes._box_cxcywh_to_xyxy
    xyxy = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1).numpy()
    confidence = kept_logits.max(dim=1)[0].numpy()
    return xyxy, confidence, kept_logits


@pytest.mark.parametrize(
    "seed,queries,tokens,shift", [(0, 900, 5, -2.5), (1, 30, 12, -1.0), (2, 50, 3, 0.0), (3, 20, 7, -9.0)]
)
def test_postprocess_is_the_originals(seed, queries, tokens, shift):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(queries, tokens)) + shift).astype(np.float32)
    boxes = rng.uniform(0, 1, (queries, 4)).astype(np.float32)
    xyxy, confidence, _ = original_predict(logits, boxes, 480, 640)
    ours = postprocess(logits, boxes, (480, 640))
    assert np.array_equal(ours.boxes, xyxy)
    np.testing.assert_allclose(ours.confidence, confidence, rtol=1e-6, atol=0)
    if len(confidence):
        assert ours.best() == int(np.argmax(confidence))  # persense.py: index_conf = np.argmax(class_conf)
    else:
        assert ours.best() is None and ours.boxes.shape == (0, 4)  # the original crashes here (SPEC 4.1)
    assert (seed == 3) == (ours.best() is None)


def test_best_is_the_first_of_equal_confidences():
    logits = np.array([[0.0, 1.0], [2.0, -1.0], [-3.0, 2.0]], np.float32)
    boxes = np.tile(np.float32([0.5, 0.5, 0.2, 0.2]), (3, 1))
    assert postprocess(logits, boxes, (10, 10)).best() == 1


class FixedEngine:
    """An engine that returns given detector outputs whatever the input, and records the feeds."""

    def __init__(self, logits: np.ndarray, boxes: np.ndarray) -> None:
        self.logits, self.boxes, self.feeds = logits, boxes, None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds = feeds
        return {"logits": self.logits[None], "boxes": self.boxes[None]}


def original_phrase(probabilities: torch.Tensor, input_ids: list[int], tokenizer) -> str:
    """get_phrases_from_posmap(logit > text_threshold, tokenized, tokenizer).replace('.', '')."""
    posmap = probabilities > TEXT_THRESHOLD
    posmap[0:1] = False
    posmap[255:] = False
    non_zero_idx = posmap.nonzero(as_tuple=True)[0].tolist()
    return tokenizer.decode([input_ids[i] for i in non_zero_idx]).replace(".", "")


@pytest.mark.parametrize("seed", range(4))
def test_best_box_and_phrase_are_the_originals(seed, vocab_file, tokenizer_file):
    from transformers.models.bert import BertTokenizer

    text = TextEncoder(tokenizer_file, 256)
    tokens = text.encode("red apples")
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(40, tokens.input_ids.shape[1])) - 1.5).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, (40, 4)).astype(np.float32)
    engine = FixedEngine(logits, boxes)
    image = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    detection = GroundingDino(engine, text).best_box(image, tokens)
    xyxy, confidence, kept = original_predict(logits, boxes, 120, 90)
    best = int(np.argmax(confidence))
    assert np.array_equal(detection.box, xyxy[best]) and detection.confidence == pytest.approx(confidence[best], 1e-6)
    expected = original_phrase(kept[best].clone(), tokens.input_ids[0].tolist(), BertTokenizer(str(vocab_file)))
    assert detection.phrase == expected
    assert set(engine.feeds) == {"pixel_values", "input_ids", "attention_mask", "token_type_ids"}
    assert engine.feeds["pixel_values"].shape == (1, 3, *resized_size(120, 90))


def test_nothing_above_box_threshold_gives_no_box(tokenizer_file):
    text = TextEncoder(tokenizer_file, 256)
    tokens = text.encode("apple")
    engine = FixedEngine(
        np.full((10, tokens.input_ids.shape[1]), -1.735, np.float32),  # sigmoid = 0.1499
        np.full((10, 4), 0.5, np.float32),
    )
    assert GroundingDino(engine, text).best_box(np.zeros((64, 64, 3), np.uint8), tokens) is None


@pytest.mark.parametrize("prompt", ["apple", "Red Apples", "person. bottle", "dog?", "Zebra-crossing 42", "naïve"])
def test_exported_tokenizer_matches_transformers_bert(prompt, tmp_path):
    """The tokenizer JSON persense-export writes for --random-weights (its generated vocabulary), read by the runtime,
    tokenises as transformers' pure-Python BERT tokenizer does on the same vocab.txt."""
    from transformers.models.bert import BertTokenizerLegacy

    from persense.export.grounding_dino.vocab import bert_tokenizer_json, generated_vocab

    vocab = generated_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "tokenizer.json").write_text(bert_tokenizer_json(vocab))
    encoded = TextEncoder(tmp_path / "tokenizer.json", 256).encode(prompt)
    expected = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))(caption_for(prompt), return_token_type_ids=True)
    assert encoded.input_ids.tolist() == [expected["input_ids"]]
    assert encoded.token_type_ids.tolist() == [expected["token_type_ids"]]
    assert "[UNK]" not in encoded.tokens
