"""The original repository's checkpoint layout (groundingdino_swint_ogc.pth) mapped onto transformers' model.

The original (IDEA-Research/GroundingDINO) stores `{"model": state_dict}` with names such as
`backbone.0.layers.0.blocks.0.attn.qkv.weight`, `transformer.encoder.text_layers.0.self_attn.in_proj_weight` and
`bert.encoder.layer.0...`. Each name maps by one rule below (learned from transformers'
convert_grounding_dino_to_hf.py, here written as rules over the installed model's names); fused projections
(Swin's qkv, nn.MultiheadAttention's in_proj) are split into query, key and value. Buffers and parameter-free
heads are dropped; every weight of the model must come from the file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from persense.runtime.errors import PersenseError

log = logging.getLogger(__name__)

SWIN = "model.backbone.conv_encoder.model"
SPLIT = "{qkv}"  # a target holding this placeholder receives the fused tensor's three thirds
BLOCK = r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\."  # an original Swin block; SWIN_BLOCK: its transformers name
SWIN_BLOCK = SWIN + r".swin.encoder.layers.\1.blocks.\2."
ENC, DEC = r"transformer\.encoder\.", r"transformer\.decoder\.layers\.(\d+)\."
DEFORM, TEXT, FUSION = (
    r"model.encoder.layers.\1.deformable_layer.",
    r"model.encoder.layers.\1.text_enhancer_layer.",
    r"model.encoder.layers.\1.fusion_layer.",
)
HF_DEC = r"model.decoder.layers.\1."
# (original name pattern, transformers name); the first full match wins
RULES: list[tuple[str, str]] = [
    (r"backbone\.0\.patch_embed\.proj\.(\w+)", SWIN + r".swin.embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.0\.patch_embed\.norm\.(\w+)", SWIN + r".swin.embeddings.norm.\1"),
    (BLOCK + r"norm1\.(\w+)", SWIN_BLOCK + r"layernorm_before.\3"),
    (BLOCK + r"norm2\.(\w+)", SWIN_BLOCK + r"layernorm_after.\3"),
    (
        BLOCK + r"attn\.relative_position_bias_table",
        SWIN_BLOCK + "attention.relative_position_bias.relative_position_bias_table",
    ),
    (BLOCK + r"attn\.qkv\.(\w+)", SWIN_BLOCK + r"attention.{qkv}_proj.\3"),
    (BLOCK + r"attn\.proj\.(\w+)", SWIN_BLOCK + r"attention.o_proj.\3"),
    (BLOCK + r"mlp\.(fc\d)\.(\w+)", SWIN_BLOCK + r"mlp.\3.\4"),
    (r"backbone\.0\.layers\.(\d+)\.downsample\.(\w+)\.(\w+)", SWIN + r".swin.encoder.layers.\1.downsample.\2.\3"),
    (r"backbone\.0\.norm(\d)\.(\w+)", SWIN + r".hidden_states_norms.stage{\1+1}.\2"),
    (r"input_proj\.(.+)", r"model.input_proj_vision.\1"),
    (r"bert\.(embeddings|encoder)\.(.+)", r"model.text_backbone.\1.\2"),
    (r"feat_map\.(\w+)", r"model.text_projection.\1"),
    (r"transformer\.level_embed", "model.level_embed"),
    (r"transformer\.tgt_embed\.weight", "model.query_position_embeddings.weight"),
    (r"transformer\.enc_output\.(\w+)", r"model.enc_output.\1"),
    (r"transformer\.enc_output_norm\.(\w+)", r"model.enc_output_norm.\1"),
    (r"transformer\.enc_out_bbox_embed\.(.+)", r"model.encoder_output_bbox_embed.\1"),
    (ENC + r"layers\.(\d+)\.self_attn\.(.+)", DEFORM + r"self_attn.\2"),
    (ENC + r"layers\.(\d+)\.norm1\.(\w+)", DEFORM + r"self_attn_layer_norm.\2"),
    (ENC + r"layers\.(\d+)\.linear(\d)\.(\w+)", DEFORM + r"fc\2.\3"),
    (ENC + r"layers\.(\d+)\.norm2\.(\w+)", DEFORM + r"final_layer_norm.\2"),
    (ENC + r"text_layers\.(\d+)\.self_attn\.in_proj_(\w+)", TEXT + r"self_attn.{qkv}.\2"),
    (ENC + r"text_layers\.(\d+)\.self_attn\.out_proj\.(\w+)", TEXT + r"self_attn.out_proj.\2"),
    (ENC + r"text_layers\.(\d+)\.linear(\d)\.(\w+)", TEXT + r"fc\2.\3"),
    (ENC + r"text_layers\.(\d+)\.norm1\.(\w+)", TEXT + r"layer_norm_before.\2"),
    (ENC + r"text_layers\.(\d+)\.norm2\.(\w+)", TEXT + r"layer_norm_after.\2"),
    (ENC + r"fusion_layers\.(\d+)\.gamma_v", FUSION + "vision_param"),
    (ENC + r"fusion_layers\.(\d+)\.gamma_l", FUSION + "text_param"),
    (ENC + r"fusion_layers\.(\d+)\.layer_norm_v\.(\w+)", FUSION + r"layer_norm_vision.\2"),
    (ENC + r"fusion_layers\.(\d+)\.layer_norm_l\.(\w+)", FUSION + r"layer_norm_text.\2"),
    (ENC + r"fusion_layers\.(\d+)\.attn\.(out_|values_|)v_proj\.(\w+)", FUSION + r"attn.\2vision_proj.\3"),
    (ENC + r"fusion_layers\.(\d+)\.attn\.(out_|values_|)l_proj\.(\w+)", FUSION + r"attn.\2text_proj.\3"),
    (DEC + r"cross_attn\.(.+)", HF_DEC + r"encoder_attn.\2"),
    (DEC + r"norm1\.(\w+)", HF_DEC + r"encoder_attn_layer_norm.\2"),
    (DEC + r"ca_text\.in_proj_(\w+)", HF_DEC + r"encoder_attn_text.{qkv}.\2"),
    (DEC + r"ca_text\.out_proj\.(\w+)", HF_DEC + r"encoder_attn_text.out_proj.\2"),
    (DEC + r"catext_norm\.(\w+)", HF_DEC + r"encoder_attn_text_layer_norm.\2"),
    (DEC + r"self_attn\.in_proj_(\w+)", HF_DEC + r"self_attn.{qkv}.\2"),
    (DEC + r"self_attn\.out_proj\.(\w+)", HF_DEC + r"self_attn.out_proj.\2"),
    (DEC + r"norm2\.(\w+)", HF_DEC + r"self_attn_layer_norm.\2"),
    (DEC + r"linear(\d)\.(\w+)", HF_DEC + r"fc\2.\3"),
    (DEC + r"norm3\.(\w+)", HF_DEC + r"final_layer_norm.\2"),
    (r"transformer\.decoder\.norm\.(\w+)", r"model.decoder.layer_norm.\1"),
    (r"transformer\.decoder\.ref_point_head\.(.+)", r"model.decoder.reference_points_head.\1"),
    (r"transformer\.decoder\.bbox_embed\.(.+)", r"model.decoder.bbox_embed.\1"),
    (r"bbox_embed\.(.+)", r"bbox_embed.\1"),
]
DROPPED = re.compile(r".*relative_position_index|bert\.pooler\..*|bert\.embeddings\.position_ids")
NOT_IN_FILE = re.compile(r".*\.swin\.layernorm\.\w+")  # Swin's final norm: built by transformers, never used
_STAGE = re.compile(r"stage\{(\d)\+1\}")
_QKV_NAMES = {"_proj": ("q", "k", "v"), "": ("query", "key", "value")}


def _target(name: str) -> str | None:
    """The transformers name of one original name (None when no rule matches)."""
    for pattern, replacement in RULES:
        match = re.fullmatch(pattern, name)
        if match:
            return _STAGE.sub(lambda m: f"stage{int(m.group(1)) + 1}", match.expand(replacement))
    return None


def _split(target: str, tensor: Any) -> dict[str, Any]:
    """A fused query/key/value tensor as its three named thirds."""
    names = _QKV_NAMES["_proj"] if SPLIT + "_proj" in target else _QKV_NAMES[""]
    return {target.replace(SPLIT, n): part for n, part in zip(names, tensor.chunk(3, dim=0))}


def convert_state_dict(original: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """transformers' state dict from the original's; returns it and the original names no rule knows."""
    converted: dict[str, Any] = {}
    unknown: list[str] = []
    for name, tensor in original.items():
        name = name.removeprefix("module.")
        if DROPPED.fullmatch(name):
            continue
        target = _target(name)
        if target is None:
            unknown.append(name)
        elif SPLIT in target:
            converted.update(_split(target, tensor))
        else:
            converted[target] = tensor
    return converted, unknown


def load_original(path: Path, config: Any) -> Any:
    """GroundingDinoForObjectDetection of `config` with the weights of an original-layout checkpoint."""
    from transformers import GroundingDinoForObjectDetection

    from persense.export.checkpoints import read_checkpoint

    data = read_checkpoint(path)
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not any(str(k).removeprefix("module.").startswith("transformer.") for k in state):
        raise PersenseError(f"{path}: not an original Grounding DINO checkpoint (no transformer.* weights)")
    converted, unknown = convert_state_dict(state)
    if unknown:
        log.warning("%s: %d weights not used by the detector (%s)", path, len(unknown), ", ".join(unknown[:5]))
    model = GroundingDinoForObjectDetection(config)
    expected = {k for k in model.state_dict() if not NOT_IN_FILE.fullmatch(k)}
    missing = sorted(expected - converted.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PersenseError(f"{path}: checkpoint lacks {len(missing)} detector weights ({shown})")
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:
        raise PersenseError(f"{path}: weights do not fit {config.model_type}: {str(exc).splitlines()[0]}") from exc
    return model.eval()
