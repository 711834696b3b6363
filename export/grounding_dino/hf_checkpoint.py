"""Loading Grounding DINO weights from a Hugging Face checkpoint folder, strictly, with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from persense.export.checkpoints import list_keys
from persense.runtime.errors import PersenseError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _checked_folder(folder: Path) -> None:
    """Refuse a path that is not a checkpoint folder with config.json and a weights file."""
    if not folder.exists():
        raise PersenseError(f"{folder}: detector checkpoint not found")
    if not folder.is_dir():
        raise PersenseError(
            f"{folder}: expected a Hugging Face checkpoint folder (config.json, model.safetensors "
            f"or pytorch_model.bin, tokenizer files) or an original .pth checkpoint"
        )
    if not (folder / "config.json").is_file():
        raise PersenseError(f"{folder}: no config.json; not a Hugging Face Grounding DINO checkpoint folder")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise PersenseError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def load_hf_folder(folder: Path) -> Any:
    """GroundingDinoForObjectDetection from a checkpoint folder; every weight of the model must be in it."""
    import json

    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from persense.export.grounding_dino.trace import exportable_config

    _checked_folder(folder)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (ValueError, OSError) as exc:
        raise PersenseError(f"{folder / 'config.json'}: unreadable ({exc})") from exc
    if model_type != GroundingDinoConfig.model_type:
        raise PersenseError(f"{folder}: config.json is a {model_type!r} model, not Grounding DINO")
    config = exportable_config(GroundingDinoConfig.from_pretrained(folder))
    try:
        model, info = GroundingDinoForObjectDetection.from_pretrained(
            folder, config=config, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise PersenseError(f"{folder}: cannot load the detector weights ({str(exc).splitlines()[0]})") from exc
    missing = sorted(k for k in info.get("missing_keys", ()) if "relative_position_index" not in k)
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    if missing:
        raise PersenseError(f"{folder}: checkpoint lacks {len(missing)} detector weights ({list_keys(missing)})")
    if mismatched:
        raise PersenseError(f"{folder}: {len(mismatched)} weights have the wrong shape ({list_keys(mismatched)})")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        log.warning("%s: %d weights not used by the detector (%s)", folder, len(unexpected), list_keys(unexpected))
    return model.eval()
