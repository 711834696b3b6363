"""Grounding DINO (transformers' GroundingDinoForObjectDetection) built, loaded and exported as `grounding_dino`.

Configurations: `grounding-dino` is the Swin-T OGC architecture (transformers' default GroundingDinoConfig, which
is IDEA-Research/grounding-dino-tiny); `grounding-dino-tiny` is a small random-only configuration with the same
I/O for tests and the demo. The ONNX model takes `pixel_values` [1,3,H,W] and `input_ids`, `attention_mask`,
`token_type_ids` [1,T] (H, W, T dynamic) and returns `logits` [1,Q,T] (raw, the T real tokens) and `boxes`
[1,Q,4] (cx, cy, w, h in [0, 1]); `grounding_dino_tokenizer.json` is written beside it, hashed in the manifest.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from persense.export.grounding_dino.vocab import TOKENIZER_FILE, delimiter_ids, tokenizer_json, vocab_size
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Artefact, sha256_file

log = logging.getLogger(__name__)

DETECTOR = "grounding_dino"  # the artefact name persense.runtime.models.detector opens
DETECTOR_CONFIGS = ("grounding-dino", "grounding-dino-tiny")
RANDOM_ONLY = ("grounding-dino-tiny",)
OPSET = 17
BERT_VOCAB = 30522  # bert-base-uncased, the text model of every released Grounding DINO
EXAMPLE_SIZE = (264, 328)  # traced image: not a multiple of the patch or window size, so every pad is traced
EXAMPLE_IDS = (".", "a", ".", "b", ".")  # traced caption: two phrases between delimiters


def detector_config(name: str, vocab: int | None = None) -> Any:
    """The GroundingDinoConfig of a configuration name (`vocab`: the text model's vocabulary size, if not BERT's)."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    from persense.export.grounding_dino.trace import exportable_config

    if name == "grounding-dino":
        config = GroundingDinoConfig(text_config=BertConfig(vocab_size=vocab) if vocab else None)
    elif name == "grounding-dino-tiny":
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(
                embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, out_indices=[2, 3, 4]
            ),
            text_config=BertConfig(
                vocab_size=vocab or 512,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=256,
            ),
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=20,
        )
    else:
        raise PersenseError(f"unknown detector {name!r}; choose one of {', '.join(DETECTOR_CONFIGS)}")
    return exportable_config(config)


def min_image_side(config: Any) -> int:
    """Smallest image side the export serves: every Swin stage must stay larger than its window (the window is not
    clamped in the graph)."""
    backbone = config.backbone_config
    stride = backbone.patch_size * 2 ** (len(backbone.depths) - 1)
    return stride * backbone.window_size + 1


def with_delimiters(model: Any, tokenizer: str) -> Any:
    """Point the model's phrase delimiters ([CLS], [SEP], ".", "?") at the tokenizer's ids; returns the model."""
    import torch

    model.model.special_tokens.copy_(torch.tensor(delimiter_ids(tokenizer), dtype=torch.long))
    return model.eval()


def random_detector(name: str, seed: int, tokenizer: str) -> Any:
    """A randomly initialised detector of configuration `name` for the vocabulary of `tokenizer`."""
    import torch
    from transformers import GroundingDinoForObjectDetection

    vocab = vocab_size(tokenizer)
    # grounding-dino keeps BERT's 30522-token embedding (the real architecture) unless the tokenizer needs more
    config = detector_config(name, vocab if name in RANDOM_ONLY or vocab > BERT_VOCAB else None)
    torch.manual_seed(seed)
    return with_delimiters(GroundingDinoForObjectDetection(config), tokenizer)


def load_detector(name: str, checkpoint: Path, tokenizer: str) -> Any:
    """The detector of a Hugging Face checkpoint folder (its config.json says the architecture) or of an original
    checkpoint file (groundingdino_swint_ogc.pth, configuration `name`), strictly loaded."""
    from persense.export.grounding_dino.hf_checkpoint import load_hf_folder
    from persense.export.grounding_dino.original_checkpoint import load_original

    if name in RANDOM_ONLY:
        raise PersenseError(
            f"{name} is a random-weight test configuration; use --random-weights or "
            f"--detector grounding-dino with a checkpoint"
        )
    if checkpoint.is_file() and checkpoint.suffix in (".pth", ".pt"):
        model = load_original(checkpoint, detector_config(name))
    else:
        model = load_hf_folder(checkpoint)
    if model.config.text_config.vocab_size < vocab_size(tokenizer):
        raise PersenseError(
            f"{checkpoint}: the tokenizer has {vocab_size(tokenizer)} tokens, the checkpoint's text "
            f"model {model.config.text_config.vocab_size}; pass the checkpoint's own tokenizer"
        )
    return with_delimiters(model, tokenizer)


def example_inputs(tokenizer: str, size: tuple[int, int] = EXAMPLE_SIZE) -> tuple[Any, ...]:
    """Traced inputs: a random image and the caption "[CLS] . a . b . [SEP]" (tokens present in every vocabulary)."""
    import torch
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer).encode(" ".join(EXAMPLE_IDS)).ids
    input_ids = torch.tensor([ids], dtype=torch.long)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    return image, input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids)


def export_graph(model: Any, path: Path, tokenizer: str) -> float:
    """Trace the detector to ONNX with dynamic H, W and T, simplify and check it; seconds taken."""
    import warnings

    import onnx
    import torch

    from persense.export.grounding_dino.trace import (
        INPUT_NAMES,
        OUTPUT_NAMES,
        GroundingDinoDetector,
        export_patches,
    )
    from persense.export.onnx_io import save_onnx, simplify

    start = time.perf_counter()
    dynamic = {
        "pixel_values": {2: "H", 3: "W"},
        "input_ids": {1: "T"},
        "attention_mask": {1: "T"},
        "token_type_ids": {1: "T"},
        "logits": {2: "T"},
    }
    size = max(EXAMPLE_SIZE[0], min_image_side(model.config)), max(EXAMPLE_SIZE[1], min_image_side(model.config))
    tmp = path.with_name(f".{path.name}.traced")
    with torch.no_grad(), export_patches(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the branches export_patches makes shape-agnostic
        torch.onnx.export(
            GroundingDinoDetector(model).eval(),
            example_inputs(tokenizer, size),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic,
        )
    try:
        graph = simplify(onnx.load(str(tmp)))
    finally:
        tmp.unlink(missing_ok=True)
    _output_dims(graph, model.config.num_queries)
    save_onnx(graph, path)
    onnx.checker.check_model(str(path))
    return time.perf_counter() - start


def _output_dims(graph: Any, queries: int) -> None:
    """Name the outputs' dimensions as the contract does: logits [1,Q,T], boxes [1,Q,4] (Q fixed by the model)."""
    for output in graph.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims, (1, queries, "T" if output.name == "logits" else 4)):
            dim.Clear()
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value


def export_onnx(model: Any, path: Path, config_name: str, source: str, tokenizer: str) -> Artefact:
    """Write the detector's ONNX model into `path`'s folder, beside the tokenizer the export job wrote there
    (write_tokenizer); returns its manifest entry."""
    from persense.export.artefacts import describe

    token_path = path.parent / TOKENIZER_FILE
    seconds = export_graph(model, path, tokenizer)
    log.info("exported %s in %.1f s", path.name, seconds)
    config = model.config
    return describe(
        path,
        DETECTOR,
        "fp32",
        config_name,
        source,
        {
            "export_seconds": round(seconds, 2),
            "config": config_name,
            "tokenizer": {"file": token_path.name, "sha256": sha256_file(token_path)},
            "max_text_len": config.max_text_len,
            "num_queries": config.num_queries,
            "min_image_side": min_image_side(config),
            "exporter": "torch.onnx (TorchScript tracer)",
        },
    )


def write_tokenizer(folder: Path, tokenizer: str) -> Path:
    """Write the tokenizer JSON into the engines folder (same text, same bytes: its hash is stable)."""
    from persense.runtime.imageio import atomic_write_bytes

    path = folder / TOKENIZER_FILE
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tokenizer.encode("utf-8"))
    return path


@functools.cache
def _cached_tokenizer(source: Path | None) -> str:
    """tokenizer_json, read once per source in a process."""
    return tokenizer_json(source)


def detector_tokenizer(checkpoint: Path | None, tokenizer: Path | None) -> str:
    """The tokenizer JSON: --detector-tokenizer, else the checkpoint folder's, else the generated vocabulary."""
    if checkpoint is not None and not checkpoint.exists():
        raise PersenseError(f"{checkpoint}: detector checkpoint not found")
    if tokenizer is not None:
        return _cached_tokenizer(tokenizer)
    if checkpoint is not None:
        return _cached_tokenizer(checkpoint if checkpoint.is_dir() else checkpoint.parent)
    return _cached_tokenizer(None)
