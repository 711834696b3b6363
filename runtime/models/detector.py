"""Grounding DINO as an engine: the original's pre-processing, thresholds and best box for `--text`.

The original (groundingdino/util/inference.py, `Model.predict_with_classes` as persense.py calls it with
box_threshold 0.15, text_threshold 0.10) resizes the RGB image with `RandomResize([800], max_size=1333)`
(PIL bilinear), normalises it with ImageNet's mean and std, keeps the queries whose largest token
sigmoid exceeds box_threshold (that maximum is the detection's confidence) and scales their cxcywh
boxes by (W, H, W, H) to xyxy pixels. persense.py then takes the most confident box.

text_threshold cannot change that box: `predict` uses it only to name each kept query's phrase
(tokens whose sigmoid exceeds it, `get_phrases_from_posmap`), which becomes `class_id`; persense.py
reads only `confidence` and `xyxy`. Every kept query's best token passes it anyway (0.15 > 0.10).
The phrase is reported here for information.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persense.runtime.artefact_names import DETECTOR
from persense.runtime.backends.choice import open_engine, side_engine_choice
from persense.runtime.backends.engine import Engine
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.resampling import resize_bilinear_pil
from persense.runtime.geometry.transforms import IMAGENET_MEAN, IMAGENET_STD
from persense.runtime.manifest import REEXPORT_HINT, IoSpec, Manifest, TensorSpec
from persense.runtime.models.text import TextEncoder, TextTokens

BOX_THRESHOLD = 0.15
TEXT_THRESHOLD = 0.10
SHORT_SIDE, MAX_SIZE = 800, 1333
MEAN = IMAGENET_MEAN.reshape(3, 1, 1)  # channel-first
STD = IMAGENET_STD.reshape(3, 1, 1)
PHRASE_END = 255  # get_phrases_from_posmap's default right_idx: tokens from here on never name a phrase
DETECTOR_IO: IoSpec = (
    [
        TensorSpec("pixel_values", (1, 3, "H", "W"), "float32"),
        TensorSpec("input_ids", (1, "T"), "int64"),
        TensorSpec("attention_mask", (1, "T"), "int64"),
        TensorSpec("token_type_ids", (1, "T"), "int64"),
    ],
    [TensorSpec("logits", (1, "Q", "T"), "float32"), TensorSpec("boxes", (1, "Q", 4), "float32")],
)


def resized_size(height: int, width: int, size: int = SHORT_SIDE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(height, width) the original resizes an image to (datasets/transforms.py get_size_with_aspect_ratio)."""
    w, h = width, height
    min_original_size = float(min((w, h)))
    max_original_size = float(max((w, h)))
    if max_original_size / min_original_size * size > max_size:
        size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def preprocess(image_rgb: np.ndarray, min_side: int = 1) -> np.ndarray:
    """pixel_values [1,3,h,w] float32: the RGB uint8 image resized as the original, /255, ImageNet-normalised.

    `min_side`: the smallest side the exported graph serves (its Swin stages must stay larger than their window).
    """
    height, width = resized_size(*image_rgb.shape[:2])
    if min(height, width) < max(min_side, 1):
        raise PersenseError(
            f"a {image_rgb.shape[1]}x{image_rgb.shape[0]} image is too elongated for the detector "
            f"(resized to {width}x{height}; it takes sides of at least {max(min_side, 1)} px): "
            f"crop it, or give --box instead of --text"
        )
    resized = resize_bilinear_pil(np.ascontiguousarray(image_rgb), height, width)
    chw = resized.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return ((chw - MEAN) / STD)[None]


def sigmoid(values: np.ndarray) -> np.ndarray:
    """Logistic function in float32."""
    return np.float32(1) / (np.float32(1) + np.exp(-values.astype(np.float32)))


@dataclass
class Detections:
    """Queries that pass box_threshold: boxes [N,4] xyxy in original pixels, confidence [N]."""

    boxes: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray  # [N,T] token sigmoids of the kept queries

    def best(self) -> int | None:
        """Index of the most confident detection (the first on ties, as np.argmax), or None when there is none."""
        return int(np.argmax(self.confidence)) if len(self.confidence) else None


def postprocess(
    logits: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], box_threshold: float = BOX_THRESHOLD
) -> Detections:
    """The original's `predict` + `post_process_result` on one image's logits [Q,T] and cxcywh boxes [Q,4]."""
    probabilities = sigmoid(logits)
    confidence = probabilities.max(axis=1)
    keep = np.flatnonzero(confidence > box_threshold)
    height, width = image_size
    scaled = boxes[keep].astype(np.float32) * np.array([width, height, width, height], np.float32)
    centre, extent = scaled[:, :2], scaled[:, 2:]
    half = np.float32(0.5) * extent
    xyxy = np.concatenate([centre - half, centre + half], axis=1)
    return Detections(xyxy, confidence[keep], probabilities[keep])


@dataclass(frozen=True)
class Detection:
    """The detector's most confident box for a prompt: xyxy in image pixels, its confidence and phrase."""

    box: np.ndarray
    confidence: float
    phrase: str

    def summary(self) -> dict:
        """JSON-ready form."""
        return {"box": [float(v) for v in self.box], "confidence": float(self.confidence), "phrase": self.phrase}


class GroundingDino:
    """The detector engine and its tokenizer: a text prompt in, the most confident box of an image out."""

    def __init__(
        self,
        engine: Engine,
        text: TextEncoder,
        min_side: int = 1,
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
    ) -> None:
        self.engine = engine
        self.text = text
        self.min_side = min_side
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    @staticmethod
    def from_manifest(
        manifest: Manifest, backend: str = "ort-cpu", threads: int | None = None, precision: str = "fp32"
    ) -> GroundingDino:
        """Open and verify the detector of an engines folder (its FP16 form for fp16 where exported)."""
        text, min_side = detector_text(manifest)
        name, engine_backend = side_engine_choice(manifest, DETECTOR, backend, precision)
        return GroundingDino(open_engine(manifest, name, engine_backend, threads, io=DETECTOR_IO), text, min_side)

    def encode_text(self, prompt: str, allow_unknown: bool = False) -> TextTokens:
        """The prompt's caption tokenised (refused when empty, unknown to the vocabulary or too long)."""
        return self.text.encode(prompt, allow_unknown)

    def detect(self, image_rgb: np.ndarray, tokens: TextTokens) -> Detections:
        """Every detection of the caption in an RGB uint8 image that passes box_threshold."""
        out = self.engine.run({"pixel_values": preprocess(image_rgb, self.min_side), **tokens.feeds()})
        return postprocess(out["logits"][0], out["boxes"][0], image_rgb.shape[:2], self.box_threshold)

    def best_box(self, image_rgb: np.ndarray, tokens: TextTokens) -> Detection | None:
        """The most confident detection, or None when no query passes box_threshold."""
        return self.best_of(self.detect(image_rgb, tokens), tokens)

    def best_of(self, detections: Detections, tokens: TextTokens) -> Detection | None:
        """The most confident of an image's detections with its phrase, or None when there is none."""
        best = detections.best()
        if best is None:
            return None
        phrase = self.phrase(detections.probabilities[best], tokens)
        return Detection(detections.boxes[best], float(detections.confidence[best]), phrase)

    def phrase(self, probabilities: np.ndarray, tokens: TextTokens) -> str:
        """The original's phrase of a detection: its tokens above text_threshold after [CLS], dots removed."""
        posmap = probabilities > self.text_threshold
        posmap[:1] = False
        posmap[PHRASE_END:] = False
        ids = tokens.input_ids[0][np.flatnonzero(posmap)]
        return self.text.decode([int(i) for i in ids]).replace(".", "")


def detector_text(manifest: Manifest) -> tuple[TextEncoder, int]:
    """The detector's verified tokenizer and the smallest image side its export serves (the manifest entry's)."""
    if DETECTOR not in manifest.artefacts:
        raise PersenseError(
            f"{manifest.folder}: no Grounding DINO detector for --text; export it with "
            f"`persense-export --detector grounding-dino --out {manifest.folder}`"
        )
    extra = manifest.artefact(DETECTOR).extra
    try:
        tokenizer, max_text_len = extra["tokenizer"], int(extra["max_text_len"])
        text = TextEncoder.verified(manifest.folder / tokenizer["file"], tokenizer["sha256"], max_text_len)
        return text, int(extra.get("min_image_side", 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise PersenseError(
            f"{DETECTOR}: the manifest entry lacks its tokenizer or max_text_len; "
            + REEXPORT_HINT.format(folder=manifest.folder)
        ) from exc
