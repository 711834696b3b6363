"""Grounding DINO export: ONNX vs PyTorch parity over image sizes and text lengths, FP16, checkpoint loading,
tokenizer, manifest entry and the CLI, on the tiny random configuration (one export shared by the module)."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tokenizers import Tokenizer

from persense.export.cli import main as export_main
from persense.export.exporter import export_detector
from persense.export.grounding_dino.model import DETECTOR, load_detector, random_detector
from persense.export.grounding_dino.trace import GroundingDinoDetector, phrase_masks
from persense.export.grounding_dino.vocab import (
    TOKENIZER_FILE,
    bert_tokenizer_json,
    generated_vocab,
    tokenizer_json,
)
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import load_manifest, sha256_file

TINY = "grounding-dino-tiny"
SEED = 3
# measured: logits max abs error 2.5e-5 (values of order 1-10), boxes 1.2e-7 over sizes 160x224 .. 321x479
LOGITS_ATOL, BOXES_ATOL = 1e-4, 1e-5
# FP16 (FP32 islands around normalisation/softmax), measured: matched queries within 0.09 (logits) and 2e-4
# (boxes), median logits error 0.01-0.02; 1-2 of 20 queries differ (near-tied top-k proposals swap or change)
FP16_LOGITS_ATOL, FP16_BOXES_ATOL, FP16_MIN_MATCHED = 0.15, 2e-3, 0.85
SIZES = [(160, 232), (301, 257)]  # neither a multiple of the patch (4) nor of the window (4 x stride)
CAPTIONS = ["apple.", "red apple . green pear . cat in a box ."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """The tiny detector exported once with the CLI (random weights, FP16 too): (folder, manifest)."""
    folder = tmp_path_factory.mktemp("gdino")
    assert (
        export_main(["--detector", TINY, "--random-weights", "--seed", str(SEED), "--fp16", "--out", str(folder), "-q"])
        == 0
    )
    return folder, load_manifest(folder)


@pytest.fixture(scope="module")
def tokenizer_text(exported) -> str:
    """The exported tokenizer JSON."""
    return (exported[0] / TOKENIZER_FILE).read_text()


@pytest.fixture(scope="module")
def torch_model(tokenizer_text):
    """The PyTorch detector the export was made from (rebuilt from the same seed)."""
    return random_detector(TINY, SEED, tokenizer_text)


def _feeds(tokenizer_text: str, caption: str, size: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Detector inputs: a random normalised image and the caption tokenised as the runtime does."""
    ids = np.array([Tokenizer.from_str(tokenizer_text).encode(caption).ids], np.int64)
    image = np.random.default_rng(seed).standard_normal((1, 3, *size), dtype=np.float32)
    return {
        "pixel_values": image,
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }


def _torch_run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unpatched transformers model on the same feeds."""
    with torch.no_grad():
        logits, boxes = GroundingDinoDetector(model)(
            *(torch.from_numpy(feeds[k]) for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids"))
        )
    return {"logits": logits.numpy(), "boxes": boxes.numpy()}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("caption", CAPTIONS)
def test_onnx_matches_pytorch(exported, tokenizer_text, torch_model, size, caption):
    folder, manifest = exported
    feeds = _feeds(tokenizer_text, caption, size)
    got = OrtEngine(folder / manifest.artefact(DETECTOR).file).run(feeds)
    want = _torch_run(torch_model, feeds)
    tokens = feeds["input_ids"].shape[1]
    assert got["logits"].shape == want["logits"].shape == (1, 20, tokens)
    assert got["boxes"].shape == (1, 20, 4)
    assert np.isfinite(got["logits"]).all()
    assert np.abs(got["logits"] - want["logits"]).max() <= LOGITS_ATOL
    assert np.abs(got["boxes"] - want["boxes"]).max() <= BOXES_ATOL


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("caption", CAPTIONS)
def test_fp16_matches_pytorch_loosely(exported, tokenizer_text, torch_model, size, caption):
    folder, manifest = exported
    entry = manifest.artefact(f"{DETECTOR}_fp16")
    assert entry.precision == "fp16" and entry.extra["fp32_sha256"] == manifest.artefact(DETECTOR).sha256
    feeds = _feeds(tokenizer_text, caption, size)
    got = OrtEngine(folder / entry.file).run(feeds)
    want = _torch_run(torch_model, feeds)
    # a query of the FP16 model matches one of PyTorch's when its logits and box are both within tolerance;
    # the two-stage top-k may pick or order a near-tied proposal differently, so a few queries may not
    logits_err = np.abs(got["logits"][0][:, None] - want["logits"][0][None]).max(-1)
    boxes_err = np.abs(got["boxes"][0][:, None] - want["boxes"][0][None]).max(-1)
    matched = ((logits_err <= FP16_LOGITS_ATOL) & (boxes_err <= FP16_BOXES_ATOL)).any(1)
    assert matched.mean() >= FP16_MIN_MATCHED
    assert np.median(np.abs(got["logits"] - want["logits"])) <= FP16_LOGITS_ATOL / 2


def test_phrase_masks_equal_transformers():
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map as reference,
    )

    special = torch.tensor([101, 102, 1012, 1029])
    alphabet = torch.tensor([101, 102, 1012, 1029, 2000, 3000])
    rng = torch.Generator().manual_seed(0)
    for length in (1, 2, 3, 7, 40):
        for _ in range(50):
            ids = alphabet[torch.randint(0, len(alphabet), (2, length), generator=rng)]
            for a, b in zip(reference(ids, special), phrase_masks(ids, special)):
                assert torch.equal(a, b)


def test_manifest_entry(exported, tokenizer_text):
    folder, manifest = exported
    entry = manifest.artefact(DETECTOR)
    assert (entry.kind, entry.precision, entry.model_type, entry.source_checkpoint) == (
        DETECTOR,
        "fp32",
        TINY,
        "random",
    )
    assert entry.extra["tokenizer"] == {"file": TOKENIZER_FILE, "sha256": sha256_file(folder / TOKENIZER_FILE)}
    assert (entry.extra["max_text_len"], entry.extra["num_queries"]) == (256, 20)
    assert [(s.name, s.shape, s.dtype) for s in entry.inputs] == [
        ("pixel_values", (1, 3, "H", "W"), "float32"),
        ("input_ids", (1, "T"), "int64"),
        ("attention_mask", (1, "T"), "int64"),
        ("token_type_ids", (1, "T"), "int64"),
    ]
    assert [(s.name, s.shape) for s in entry.outputs] == [("logits", (1, 20, "T")), ("boxes", (1, 20, 4))]
    manifest.verified_path(DETECTOR)


def test_runtime_opens_the_export(exported):
    from persense.runtime.models.detector import GroundingDino

    folder, manifest = exported
    detector = GroundingDino.from_manifest(manifest)
    image = np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    detections = detector.detect(image, detector.encode_text("apple"))
    assert detections.boxes.shape[1] == 4


def test_cli_reuses_an_unchanged_export(exported, capsys):
    folder, manifest = exported
    assert (
        export_main(["--detector", TINY, "--random-weights", "--seed", str(SEED), "--fp16", "--out", str(folder), "-v"])
        == 0
    )
    assert "grounding_dino unchanged" in capsys.readouterr().err
    again = load_manifest(folder)
    assert again.artefact(DETECTOR).sha256 == manifest.artefact(DETECTOR).sha256
    assert [a.file for a in export_detector(folder, TINY, seed=SEED, fp16=True)] == [
        again.artefact(DETECTOR).file,
        again.artefact(f"{DETECTOR}_fp16").file,
    ]


def test_generated_vocabulary_has_no_unknown_ascii_word(tokenizer_text):
    tokenizer = Tokenizer.from_str(tokenizer_text)
    for word in ("apple", "Zebra42", "xylophone", "q", string.ascii_letters + string.digits):
        tokens = tokenizer.encode(word + ".").tokens
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[UNK]" not in tokens


def test_vocab_txt_and_tokenizer_json_tokenise_alike(tmp_path):
    vocab = generated_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    from_txt = Tokenizer.from_str(tokenizer_json(tmp_path / "vocab.txt"))
    (tmp_path / "tokenizer.json").write_text(bert_tokenizer_json(vocab))
    from_json = Tokenizer.from_str(tokenizer_json(tmp_path))  # the folder: its tokenizer.json
    for caption in CAPTIONS:
        assert from_txt.encode(caption).ids == from_json.encode(caption).ids
    # one token per "\n"-ended line, as transformers reads vocab.txt (U+2028 does not end a line)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab + ["a\u2028b", "zebra"]) + "\n", encoding="utf-8")
    assert Tokenizer.from_str(tokenizer_json(tmp_path / "vocab.txt")).token_to_id("zebra") == len(vocab) + 1


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, torch_model, tokenizer_text):
    """A Hugging Face checkpoint folder (save_pretrained: config.json + model.safetensors) plus tokenizer.json."""
    folder = tmp_path_factory.mktemp("hf_checkpoint")
    torch_model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_text)
    return folder


def test_hf_checkpoint_folder_loads_identically(hf_folder, torch_model, tokenizer_text):
    loaded = load_detector("grounding-dino", hf_folder, tokenizer_text)
    feeds = _feeds(tokenizer_text, CAPTIONS[1], SIZES[0])
    want, got = _torch_run(torch_model, feeds), _torch_run(loaded, feeds)
    assert np.array_equal(want["logits"], got["logits"]) and np.array_equal(want["boxes"], got["boxes"])


def _transformers4_swin_names(name: str) -> str:
    """A weight name as transformers 4 saved it (the layout of the hub's grounding-dino-tiny): Swin without the
    `swin.` level, separate query/key/value under `attention.self`, `attention.output.dense`, `intermediate.dense`."""
    import re

    name = name.replace("conv_encoder.model.swin.", "conv_encoder.model.")
    full = {"q": "query", "k": "key", "v": "value"}
    name = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.self." + full[m[1]], name)
    for new, old in (
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
        (
            "attention.relative_position_bias.relative_position_bias_table",
            "attention.self.relative_position_bias_table",
        ),
    ):
        name = name.replace(new, old)
    return name


def test_transformers4_checkpoint_folder_loads_identically(hf_folder, tmp_path, torch_model, tokenizer_text):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    weights = {
        _transformers4_swin_names(k): v
        for k, v in load_file(hf_folder / "model.safetensors").items()
        if ".swin.layernorm." not in k
    }  # transformers 4's Swin backbone had no final norm
    assert "model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.query.weight" in weights
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_detector("grounding-dino", tmp_path, tokenizer_text).state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in torch_model.state_dict().items())


def test_missing_weights_are_named(hf_folder, tmp_path, tokenizer_text):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    weights = load_file(hf_folder / "model.safetensors")
    dropped = sorted(k for k in weights if "text_projection" in k)
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(PersenseError, match="lacks 2 detector weights.*text_projection"):
        load_detector("grounding-dino", tmp_path, tokenizer_text)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("absent", "detector checkpoint not found"),
        ("file", "expected a Hugging Face checkpoint folder"),
        ("no_config", "no config.json"),
        ("no_weights", "no weights"),
        ("other_model", "'bert' model, not Grounding DINO"),
    ],
)
def test_wrong_checkpoint_is_refused(tmp_path, tokenizer_text, layout, message):
    path = tmp_path / "ckpt"
    if layout == "file":
        path.write_bytes(b"not a folder")
    elif layout != "absent":
        path.mkdir()
        if layout != "no_config":
            (path / "config.json").write_text(
                json.dumps({"model_type": "bert" if layout == "other_model" else "grounding-dino"})
            )
        if layout != "no_weights":
            (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PersenseError, match=message):
        load_detector("grounding-dino", path, tokenizer_text)


def test_tiny_configuration_takes_no_checkpoint(hf_folder, tokenizer_text):
    with pytest.raises(PersenseError, match="random-weight test configuration"):
        load_detector(TINY, hf_folder, tokenizer_text)


def test_cli_requires_weights_or_random(tmp_path, capsys):
    assert export_main(["--detector", "grounding-dino", "--out", str(tmp_path)]) == 2
    assert "--detector-checkpoint FOLDER" in capsys.readouterr().err


# transformers name -> the original repository's name, written from the original's module names (the inverse of
# persense.export.grounding_dino.original_checkpoint's rules, kept separate so one checks the other)
_ORIGINAL_NAMES = [
    (
        r"model\.backbone\.conv_encoder\.model\.swin\.embeddings\.patch_embeddings\.projection\.",
        "backbone.0.patch_embed.proj.",
    ),
    (r"model\.backbone\.conv_encoder\.model\.swin\.embeddings\.norm\.", "backbone.0.patch_embed.norm."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.", "backbone.0.layers."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.relative_position_bias\.", ".attn."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.attention\.([qkv])_proj\.", r".attn.\1_proj."),
    (
        r"model\.backbone\.conv_encoder\.model\.hidden_states_norms\.stage(\d)\.",
        lambda m: f"backbone.0.norm{int(m[1]) - 1}.",
    ),
    (r"model\.input_proj_vision\.", "input_proj."),
    (r"model\.text_backbone\.", "bert."),
    (r"model\.text_projection\.", "feat_map."),
    (r"model\.level_embed", "transformer.level_embed"),
    (r"model\.query_position_embeddings\.", "transformer.tgt_embed."),
    (r"model\.enc_output", "transformer.enc_output"),
    (r"model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."),
    (
        r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn_layer_norm\.",
        r"transformer.encoder.layers.\1.norm1.",
    ),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.fc(\d)\.", r"transformer.encoder.layers.\1.linear\2."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.", r"transformer.encoder.layers.\1."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc(\d)\.", r"transformer.encoder.text_layers.\1.linear\2."),
    (
        r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_before\.",
        r"transformer.encoder.text_layers.\1.norm1.",
    ),
    (
        r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_after\.",
        r"transformer.encoder.text_layers.\1.norm2.",
    ),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.", r"transformer.encoder.text_layers.\1."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.", r"transformer.encoder.fusion_layers.\1."),
    (r"vision_param", "gamma_v"),
    (r"text_param", "gamma_l"),
    (r"layer_norm_vision", "layer_norm_v"),
    (r"layer_norm_text", "layer_norm_l"),
    (r"vision_proj", "v_proj"),
    (r"text_proj", "l_proj"),
    (r"model\.decoder\.layers\.(\d+)\.", r"transformer.decoder.layers.\1."),
    (r"\.encoder_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_text_layer_norm\.", ".catext_norm."),
    (r"\.encoder_attn_text\.", ".ca_text."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.self_attn_layer_norm\.", ".norm2."),
    (r"\.final_layer_norm\.", ".norm3."),
    (r"(transformer\.decoder\.layers\.\d+)\.fc(\d)\.", r"\1.linear\2."),
    (r"model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"model\.decoder\.bbox_embed\.", "transformer.decoder.bbox_embed."),
]
_FUSED = [
    (r"(backbone\.0\..*\.attn)\.[qkv]_proj\.(\w+)", r"\1.qkv.\2"),
    (r"(.*)\.(?:query|key|value)\.(\w+)", r"\1.in_proj_\2"),
]


def _original_layout(model) -> dict:
    """The model's weights under the original repository's names, with fused qkv / in_proj tensors."""
    import re

    out, fused = {}, {}
    for name, tensor in model.state_dict().items():
        if ".swin.layernorm." in name:
            continue  # not in the original (Swin's final norm is unused)
        for pattern, replacement in _ORIGINAL_NAMES:
            name = re.sub(pattern, replacement, name)
        for pattern, replacement in _FUSED:
            if re.fullmatch(pattern, name) and "text_backbone" not in name and not name.startswith("bert."):
                fused.setdefault(re.sub(pattern, replacement, name), []).append(tensor)
                break
        else:
            out[f"module.{name}"] = tensor
    out.update({f"module.{k}": torch.cat(v) for k, v in fused.items()})
    out["module.bert.pooler.dense.weight"] = torch.zeros(2, 2)  # in the original file, unused by the detector
    return out


def test_original_checkpoint_layout_loads_identically(tmp_path, torch_model, tokenizer_text):
    from persense.export.grounding_dino.original_checkpoint import load_original

    original = _original_layout(torch_model)
    assert "module.backbone.0.layers.0.blocks.0.attn.qkv.weight" in original
    assert "module.transformer.encoder.text_layers.0.self_attn.in_proj_weight" in original
    torch.save({"model": original}, tmp_path / "groundingdino_tiny.pth")
    loaded = load_original(tmp_path / "groundingdino_tiny.pth", torch_model.config)
    loaded.model.special_tokens.copy_(torch_model.model.special_tokens)
    feeds = _feeds(tokenizer_text, CAPTIONS[1], SIZES[1])
    want, got = _torch_run(torch_model, feeds), _torch_run(loaded, feeds)
    assert np.array_equal(want["logits"], got["logits"]) and np.array_equal(want["boxes"], got["boxes"])
    del original["module.transformer.level_embed"]
    torch.save({"model": original}, tmp_path / "incomplete.pth")
    with pytest.raises(PersenseError, match="lacks 1 detector weights.*model.level_embed"):
        load_original(tmp_path / "incomplete.pth", torch_model.config)
    torch.save({"model": {"image_encoder.x": torch.zeros(1)}}, tmp_path / "sam.pth")
    with pytest.raises(PersenseError, match="not an original Grounding DINO checkpoint"):
        load_original(tmp_path / "sam.pth", torch_model.config)
