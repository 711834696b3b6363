"""Export SAM's image encoder and the batched PerSAM decoder to ONNX."""

from __future__ import annotations

from pathlib import Path

import torch

from persense.export.artefacts import describe
from persense.export.onnx_io import export_onnx
from persense.export.sam.cpu_encoder import cpu_encoder
from persense.export.sam.modeling import Sam
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.export.sam.reassociated_decoder import UPSCALE_PRODUCTS, ReassociatedDecoder
from persense.export.sam.tiny_vit import TinyViT, fold_batchnorm
from persense.runtime.geometry.transforms import GRID, LONG_SIDE, LOW_RES
from persense.runtime.manifest import Artefact, tensor_names
from persense.runtime.models.sam import EMBED_DIM, ENCODER_IO

MAX_PROMPTS = 1024
MAX_POINTS = 64


def decoder_example_inputs(batch: int = 4, points: int = 2) -> tuple[torch.Tensor, ...]:
    """Example inputs of PerSamDecoder (also the shapes the export traces)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, EMBED_DIM, GRID, GRID, generator=g),
        torch.rand(batch, points, 2, generator=g) * LONG_SIDE,
        torch.ones(batch, points),
        torch.randn(batch, 1, LOW_RES, LOW_RES, generator=g),
        torch.ones(batch),
        torch.randn(1, EMBED_DIM, generator=g),
        torch.rand(1, GRID * GRID, generator=g),
        torch.ones(batch),
    )


def encoder_example_inputs() -> tuple[torch.Tensor]:
    """A random example `image` of the encoder graphs (its fixed shape)."""
    return (torch.randn(*ENCODER_IO[0][0].shape),)


def lean_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """The encoder as exported: TinyViT with BatchNorm folded; ViT with row-blocked global attention (cpu_encoder)."""
    return fold_batchnorm(encoder) if isinstance(encoder, TinyViT) else cpu_encoder(encoder)


def export_encoder(sam: Sam, path: Path, model_type: str, source: str) -> Artefact:
    """`image` [1,3,1024,1024] (normalised, padded) -> `image_embeddings` [1,256,64,64]."""
    with torch.no_grad():
        seconds = export_onnx(
            lean_encoder(sam.image_encoder),
            encoder_example_inputs(),
            path,
            tensor_names(ENCODER_IO[0]),
            tensor_names(ENCODER_IO[1]),
        )
    return describe(path, "sam_encoder", "fp32", model_type, source, {"export_seconds": round(seconds, 2)})


def export_decoder(sam: Sam, path: Path, model_type: str, source: str) -> Artefact:
    """The batched PerSAM decoder (re-associated form, best multimask output chosen in the graph:
    `low_res_masks` [B,256,256], `iou_predictions` [B]) with a dynamic prompt batch B and points per prompt N."""
    with torch.no_grad():
        seconds = export_decoder_graph(ReassociatedDecoder(sam, best_only=True).eval(), path)
    return describe(path, "sam_decoder", "fp32", model_type, source, {"export_seconds": round(seconds, 2)})


def export_decoder_graph(decoder: PerSamDecoder, path: Path) -> float:
    """Export a PerSamDecoder module (either output form) with the decoder's names and dynamic axes; seconds taken."""
    batch = torch.export.Dim("B", min=1, max=MAX_PROMPTS)
    points = torch.export.Dim("N", min=1, max=MAX_POINTS)
    dynamic = {
        "image_embeddings": None,
        "point_coords": {0: batch, 1: points},
        "point_labels": {0: batch, 1: points},
        "mask_input": {0: batch},
        "has_mask_input": {0: batch},
        "target_embedding": None,
        "attn_sim": None,
        "persam_weight": {0: batch},
    }
    return export_onnx(
        decoder,
        decoder_example_inputs(),
        path,
        PerSamDecoder.input_names,
        PerSamDecoder.output_names,
        dynamic,
        named_scopes=UPSCALE_PRODUCTS if isinstance(decoder, ReassociatedDecoder) else (),
    )
