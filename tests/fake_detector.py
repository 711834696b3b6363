"""Test helpers for --text: a small BERT vocabulary and tokenizer, and a detector engine with fixed outputs.

The fixed detector is an ONNX graph with the contract's I/O (persense.runtime.models.detector.DETECTOR_IO) whose
logits [1,Q,T] repeat one given logit per query over the T tokens and whose boxes are given: it makes
the pipeline's use of the detector exactly checkable, including a detector that finds nothing.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WORDS = ["apple", "red", "car", "person", "bottle", "orange", "-", "?"]


def write_vocab(folder: Path) -> Path:
    """vocab.txt: specials, '.', whole words, and single letters/digits with their ## forms (any ASCII word fits)."""
    letters = list(string.ascii_lowercase + string.digits)
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ".",
        *WORDS,
        *letters,
        *(f"##{c}" for c in letters),
        "##s",
        "##le",
    ]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def write_tokenizer(vocab: Path, path: Path) -> Path:
    """The vocabulary as a `tokenizers` JSON (BERT uncased normaliser, WordPiece, [CLS] x [SEP])."""
    from tokenizers.implementations import BertWordPieceTokenizer

    BertWordPieceTokenizer(str(vocab), lowercase=True).save(str(path))
    return path


def fixed_detector(path: Path, query_logits: list[float], boxes_cxcywh: list[list[float]]) -> Path:
    """An ONNX detector whose outputs are `query_logits` (one per query, over every token) and the boxes."""
    queries = len(query_logits)
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, "H", "W"])]
    inputs += [
        helper.make_tensor_value_info(name, TensorProto.INT64, [1, "T"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, queries, "T"]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, queries, 4]),
    ]
    constants = [
        numpy_helper.from_array(np.float32(query_logits).reshape(1, queries, 1), "query_logits"),
        numpy_helper.from_array(np.float32(boxes_cxcywh).reshape(1, queries, 4), "fixed_boxes"),
        numpy_helper.from_array(np.array([1, queries], np.int64), "leading"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
    ]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "one", "two"], ["length"]),
        helper.make_node("Concat", ["leading", "length"], ["logits_shape"], axis=0),
        helper.make_node("Expand", ["query_logits", "logits_shape"], ["logits"]),
        helper.make_node("Identity", ["fixed_boxes"], ["boxes"]),
    ]
    graph = helper.make_graph(nodes, "fixed_detector", inputs, outputs, constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def add_fixed_detector(
    engines: Path, folder: Path, query_logits: list[float], boxes_cxcywh: list[list[float]], max_text_len: int = 256
) -> Path:
    """A copy of an engines folder with a fixed detector and the test tokenizer recorded in its manifest."""
    from persense.export.artefacts import describe
    from persense.runtime.manifest import load_manifest, sha256_file
    from persense.runtime.models.detector import DETECTOR

    shutil.copytree(engines, folder)
    tokenizer = write_tokenizer(write_vocab(folder), folder / "grounding_dino_tokenizer.json")
    model = fixed_detector(folder / "grounding_dino.onnx", query_logits, boxes_cxcywh)
    manifest = load_manifest(folder)
    manifest.artefacts[DETECTOR] = describe(
        model,
        "detector",
        "fp32",
        "fixed-test-detector",
        "random",
        {
            "tokenizer": {"file": tokenizer.name, "sha256": sha256_file(tokenizer)},
            "max_text_len": max_text_len,
            "num_queries": len(query_logits),
        },
    )
    manifest.save()
    return folder
