"""SAM as two engines: the image encoder and the batched PerSAM decoder, with SAM's prompt conventions."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from persense.runtime.artefact_names import RUNS_IN, variant_name
from persense.runtime.backends.choice import open_engine
from persense.runtime.backends.engine import Engine
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.backends.table import backend as backend_row
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import GRID, LONG_SIDE, LOW_RES, SamTransform
from persense.runtime.manifest import IoSpec, Manifest, TensorSpec

ENCODER = "sam_encoder"
GPU_ENCODER = "sam_encoder_gpu"  # the encoder with fused attention, exported for ort-cuda (--gpu-encoder)
DECODER = "sam_decoder"
EMBED_DIM = 256  # channels of SAM's image embedding and of its prompt tokens
PAD_LABEL = -1.0
ENCODER_IO: IoSpec = (
    [TensorSpec("image", (1, 3, LONG_SIDE, LONG_SIDE), "float32")],
    [TensorSpec("image_embeddings", (1, EMBED_DIM, GRID, GRID), "float32")],
)
# The decoder returns, per prompt, SAM's best multimask output chosen inside the graph (index 1..3 by
# predicted IoU, the first maximum on ties): its low-res logits [B,256,256] and its predicted IoU [B].
DECODER_IO: IoSpec = (
    [
        TensorSpec("image_embeddings", (1, EMBED_DIM, GRID, GRID), "float32"),
        TensorSpec("point_coords", ("B", "N", 2), "float32"),
        TensorSpec("point_labels", ("B", "N"), "float32"),
        TensorSpec("mask_input", ("B", 1, LOW_RES, LOW_RES), "float32"),
        TensorSpec("has_mask_input", ("B",), "float32"),
        TensorSpec("target_embedding", (1, EMBED_DIM), "float32"),
        TensorSpec("attn_sim", (1, GRID * GRID), "float32"),
        TensorSpec("persam_weight", ("B",), "float32"),
    ],
    [TensorSpec("low_res_masks", ("B", LOW_RES, LOW_RES), "float32"), TensorSpec("iou_predictions", ("B",), "float32")],
)


@dataclass
class Guidance:
    """PerSAM's per-image guidance: target embedding [1,256] and attention similarity [1,4096]."""

    target_embedding: np.ndarray
    attn_sim: np.ndarray

    @staticmethod
    def none() -> Guidance:
        """Placeholder guidance for plain SAM calls (ignored when persam_weight is 0)."""
        return Guidance(np.zeros((1, EMBED_DIM), np.float32), np.zeros((1, GRID * GRID), np.float32))


@dataclass
class Prompts:
    """A batch of B prompts in SAM's input frame: points [B,N,2], labels [B,N], optional mask logits."""

    coords: np.ndarray
    labels: np.ndarray
    mask_input: np.ndarray | None = None  # [B,1,256,256] low-res logits

    def __len__(self) -> int:
        return self.coords.shape[0]

    @staticmethod
    def points(coords: np.ndarray, mask_input: np.ndarray | None = None) -> Prompts:
        """One positive point per prompt plus SAM's padding point, as SamPredictor does without a box."""
        coords = np.asarray(coords, np.float32).reshape(-1, 2)
        batch = coords.shape[0]
        padded = np.concatenate([coords[:, None, :], np.zeros((batch, 1, 2), np.float32)], axis=1)
        labels = np.tile(np.array([[1.0, PAD_LABEL]], np.float32), (batch, 1))
        return Prompts(padded, labels, mask_input)

    def chunk(self, start: int, stop: int) -> Prompts:
        """Prompts start..stop-1."""
        mask = None if self.mask_input is None else self.mask_input[start:stop]
        return Prompts(self.coords[start:stop], self.labels[start:stop], mask)


class SamEngines:
    """The encoder and decoder engines of one manifest, used with SAM's geometry."""

    def __init__(self, encoder: Engine, decoder: Engine, decode_chunk: int = 1) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.decode_chunk = max(1, decode_chunk)
        self.decoder_launches = 0
        self._resident: tuple[np.ndarray, object] | None = None  # (host embedding, its copy on the decoder's device)

    @staticmethod
    def from_manifest(
        manifest: Manifest,
        backend: str = "ort-cpu",
        threads: int | None = None,
        decode_chunk: int | None = None,
        precision: str = "fp32",
    ) -> SamEngines:
        """Open and verify both SAM engines; `precision` picks the ONNX models (see `engine_names`; TensorRT
        uses its own engines; OpenVINO takes it as the encoder's inference precision, the decoder staying f32: in
        bf16 its masks missed the IoU gate, docs/DESIGN.md "OpenVINO decoder"); the decoder chunk size defaults per
        backend (the backend table's)."""
        names = engine_names(manifest, backend, precision)
        return SamEngines(
            open_engine(manifest, names[ENCODER], backend, threads, arena=False, ov_precision=precision, io=ENCODER_IO),
            open_engine(manifest, names[DECODER], backend, threads, io=DECODER_IO),
            decode_chunk or backend_row(backend).decode_chunk,
        )

    def encode(self, image_rgb: np.ndarray) -> tuple[np.ndarray, SamTransform]:
        """Image embedding [1,256,64,64] of an RGB uint8 image, and the transform of its geometry."""
        transform = transform_for(image_rgb.shape[:2])
        embedding = self.encoder.run({"image": transform.image_tensor(image_rgb)})["image_embeddings"]
        return embedding, transform

    def decode_best(
        self, embedding: np.ndarray, prompts: Prompts, guidance: Guidance | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per prompt, SAM's best multimask output (chosen in the graph): logits [B,256,256] and score [B],
        in launches of `decode_chunk` prompts; PerSAM guidance applies to every prompt when given."""
        logits = np.empty((len(prompts), LOW_RES, LOW_RES), np.float32)
        scores = np.empty(len(prompts), np.float32)
        guide = guidance or Guidance.none()
        weight = 1.0 if guidance is not None else 0.0
        for start in range(0, len(prompts), self.decode_chunk):
            stop = min(start + self.decode_chunk, len(prompts))
            out = self._launch(embedding, prompts.chunk(start, stop), guide, weight)
            logits[start:stop] = out["low_res_masks"]
            scores[start:stop] = out["iou_predictions"]
        return logits, scores

    def _launch(self, embedding: np.ndarray, prompts: Prompts, guide: Guidance, weight: float) -> dict[str, np.ndarray]:
        """One decoder launch."""
        batch = len(prompts)
        has_mask = prompts.mask_input is not None
        feeds = {
            "image_embeddings": self._embedding_feed(embedding),
            "point_coords": prompts.coords.astype(np.float32),
            "point_labels": prompts.labels.astype(np.float32),
            "mask_input": (
                prompts.mask_input.reshape(batch, 1, LOW_RES, LOW_RES).astype(np.float32)
                if has_mask
                else np.zeros((batch, 1, LOW_RES, LOW_RES), np.float32)
            ),
            "has_mask_input": np.full(batch, 1.0 if has_mask else 0.0, np.float32),
            "target_embedding": guide.target_embedding.reshape(1, EMBED_DIM).astype(np.float32),
            "attn_sim": guide.attn_sim.reshape(1, GRID * GRID).astype(np.float32),
            "persam_weight": np.full(batch, weight, np.float32),
        }
        out = self.decoder.run(feeds)
        self.decoder_launches += 1
        return out

    def _embedding_feed(self, embedding: np.ndarray) -> np.ndarray:
        """The image embedding as a decoder launch takes it: where the decoder binds device values (ORT IO
        binding), one copy on its device per image (per embedding array; never mutate it in place), else as is."""
        if not (isinstance(self.decoder, OrtEngine) and self.decoder.io_binding):
            return embedding
        if self._resident is None or self._resident[0] is not embedding:
            self._resident = (embedding, self.decoder.upload("image_embeddings", embedding))
        return self._resident[1]


def engine_names(manifest: Manifest, backend: str, precision: str) -> dict[str, str]:
    """Encoder and decoder artefact names for a backend and precision.

    fp32: `<name>` (TensorRT maps them to its engines); fp16: `<name>_fp16`; int8: `<name>_int8` (the decoder's
    upscaling products only, docs/DESIGN.md "INT8"); on openvino fp32 and bf16 from the FP32 ONNX models (bf16 is the
    encoder's inference precision, not an artefact), int8 the NNCF-quantised encoder (`sam_encoder_ov_int8`) with
    the FP32 decoder.
    On ort-cuda the encoder is `sam_encoder_gpu[_<precision>]` where the manifest has it.
    """
    row = backend_row(backend)
    if precision not in row.precisions:
        raise PersenseError(
            f"precision {precision} does not run on backend {backend}: it runs {' or '.join(row.precisions)}"
        )
    names = {ENCODER: ENCODER, DECODER: DECODER}
    if precision in ("fp16", "int8") and not row.own_engines:
        variant = row.encoder_variant(precision)
        names[ENCODER] = variant_name(ENCODER, variant)
        names[DECODER] = variant_name(DECODER, variant) if DECODER in RUNS_IN[variant] else DECODER
    gpu = names[ENCODER].replace(ENCODER, GPU_ENCODER, 1)
    if row.on_gpu and not row.own_engines and gpu in manifest.artefacts:  # ORT-CUDA
        names[ENCODER] = gpu
    return names


@functools.lru_cache(maxsize=16)
def transform_for(size: tuple[int, int]) -> SamTransform:
    """One SamTransform per image size, so its upsampling maps are built once per size, not per image."""
    return SamTransform(size)
