"""INT8 (dynamic quantisation) SAM models: exported, recorded with their error, selectable at run time."""

from __future__ import annotations

import json

import cv2
import numpy as np

from persense.runtime.cli.infer import main as infer

INT8_MASK_IOU = 0.9  # tiny random model vs its FP32 export (measured 0.98); vit_b measured in the bench


def test_int8_export_and_inference(int8_engines, scene_files, tmp_path, capsys):
    folder = int8_engines
    artefacts = json.loads((folder / "manifest.json").read_text())["artefacts"]
    assert artefacts["sam_encoder_int8"]["precision"] == "int8"
    assert artefacts["sam_encoder_int8"]["extra"]["fp32_sha256"] == artefacts["sam_encoder"]["sha256"]
    assert artefacts["sam_encoder_int8"]["extra"]["int8_error"]["outputs"]["image_embeddings"]["cosine"] >= 0.99
    unions = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / precision
        assert (
            infer(
                [
                    str(scene_files["image"]),
                    str(scene_files["image"]),
                    str(scene_files["mask"]),
                    "--engines",
                    str(folder),
                    "--density",
                    str(scene_files["density"]),
                    "--precision",
                    precision,
                    "--out",
                    str(out),
                    "--threads",
                    "2",
                    "-q",
                ]
            )
            == 0
        )
        unions[precision] = cv2.imread(str(out / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    capsys.readouterr()
    intersection = np.logical_and(unions["fp32"], unions["int8"]).sum()
    assert intersection / max(np.logical_or(unions["fp32"], unions["int8"]).sum(), 1) >= INT8_MASK_IOU
