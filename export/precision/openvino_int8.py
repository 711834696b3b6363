"""The SAM encoder in INT8 for OpenVINO (`--openvino-int8`): NNCF post-training quantisation calibrated on
persense-synth scenes.

NNCF's transformer scheme quantises the encoder's matrix products (weights per channel, activations per tensor
from the calibration statistics) and keeps LayerNorm, softmax and GELU in float; every layer's weights keep 7 bits
(`OverflowFix.ENABLE`; NNCF's default does the first layer only) so that the u8s8 products cannot saturate on CPUs
without VNNI (AVX2 only: as for ONNX Runtime, export/precision/int8.py). The result is an OpenVINO IR
(`sam_encoder_ov_int8.xml`, its weights in `.bin`, hashed as the manifest's data file) that `--backend openvino
--precision int8` runs; its error against the FP32 ONNX model on held-out scenes, run as the runtime runs it, is
recorded in `extra["int8_error"]` (docs/DESIGN.md "OpenVINO INT8").
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from persense.export.artefacts import reusable_variant, variant_extra
from persense.export.precision.error import compare_outputs
from persense.runtime.artefact_names import OV_INT8, RUNS_IN, variant_name
from persense.runtime.backends.openvino_engine import INSTALL_HINT, OvEngine
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.datasets.synth import random_template, render_scene
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.manifest import Artefact, Manifest, sha256_file

log = logging.getLogger(__name__)

CALIBRATION = (1, 24)  # (seed, scenes) of the calibration set (16 gave vit_b cosine 0.9997: docs/DESIGN.md)
HELD_OUT = (99, 3)  # (seed, scenes) the recorded error is measured on
SCENE_SIDES = (384, 1025)  # scene width and height drawn from this range (SAM pads them into its 1024 frame)
SCENE_COUNTS = (5, 60)  # instances per scene drawn from this range


def synth_images(seed: int, scenes: int) -> Iterator[np.ndarray]:
    """Encoder inputs of seeded persense-synth scenes of random sizes, object classes and instance counts."""
    rng = np.random.default_rng(seed)
    for _ in range(scenes):
        size = (int(rng.integers(*SCENE_SIDES)), int(rng.integers(*SCENE_SIDES)))
        scene = render_scene(rng, random_template(rng), int(rng.integers(*SCENE_COUNTS)), size)
        yield SamTransform(scene.image.shape[:2]).image_tensor(scene.image)


def ov_int8_method() -> str:
    """The quantisation call, as recorded in the entry (`extra["method"]`): a change re-makes the artefact."""
    seed, scenes = CALIBRATION
    return (
        f"nncf.quantize(openvino, model_type=TRANSFORMER, overflow_fix=ENABLE, persense-synth seed={seed} "
        f"scenes={scenes} sides={SCENE_SIDES} counts={SCENE_COUNTS})"
    )


def quantise_openvino(src: Path, xml: Path) -> None:
    """Write NNCF's INT8 form of ONNX model `src` as the OpenVINO IR `xml` (+ `.bin`)."""
    try:
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    except ImportError as exc:
        raise PersenseError(f"--openvino-int8 needs OpenVINO and NNCF; {INSTALL_HINT}") from exc
    nncf.set_log_level(logging.ERROR)
    seed, scenes = CALIBRATION
    model = ov.Core().read_model(str(src))
    dataset = nncf.Dataset(list(synth_images(seed, scenes)))
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout carries the written paths only
        quantised = nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=scenes,
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),  # 7-bit weights
        )
    ov.save_model(quantised, str(xml), compress_to_fp16=False)


def measure_ov_error(src: Path, engine: OvEngine) -> dict[str, Any]:
    """The quantised encoder's embeddings on held-out scenes against the FP32 ONNX model on ONNX Runtime."""
    seed, scenes = HELD_OUT
    reference = OrtEngine(src, arena=False)
    pairs = [(reference.run({"image": x}), engine.run({"image": x})) for x in synth_images(seed, scenes)]
    return {
        "backend": f"openvino-cpu ({engine.precision_hint} outside the quantised products)",
        "reference": "fp32 onnx on onnxruntime-cpu",
        "inputs": f"openvino_int8.synth_images(seed={seed}, scenes={scenes})",
        "outputs": {
            name: compare_outputs(np.stack([r[name] for r, _ in pairs]), np.stack([c[name] for _, c in pairs]), name)
            for name in pairs[0][0]
        },
    }


def convert_ov_int8(name: str, artefact: Artefact, folder: Path) -> Artefact:
    """Write `<name>_ov_int8.xml/.bin` from FP32 artefact `name`; its manifest entry with the measured error."""
    start = time.perf_counter()
    src = folder / artefact.file
    xml = folder / (variant_name(Path(artefact.file).stem, OV_INT8) + ".xml")
    quantise_openvino(src, xml)
    engine = OvEngine(xml, "int8")
    extra = variant_extra(artefact, time.perf_counter() - start, method=ov_int8_method())
    extra.update(data_file=xml.with_suffix(".bin").name, data_sha256=sha256_file(xml.with_suffix(".bin")))
    extra["int8_error"] = measure_ov_error(src, engine)
    log.info("wrote %s (%.1f s)", xml.name, time.perf_counter() - start)
    return Artefact(
        file=xml.name,
        sha256=sha256_file(xml),
        kind=artefact.kind,
        precision="int8",
        model_type=artefact.model_type,
        source_checkpoint=artefact.source_checkpoint,
        opset=None,
        inputs=engine.inputs,
        outputs=engine.outputs,
        extra=extra,
    )


def ov_int8_artefacts(artefacts: dict[str, Artefact], folder: Path, previous: Manifest | None) -> dict[str, Artefact]:
    """`--openvino-int8`: the OpenVINO INT8 entry of SAM's FP32 encoder, reusing one made the same way from the same
    file."""
    made = {}
    for name, artefact in artefacts.items():
        if name in RUNS_IN[OV_INT8]:
            entry = reusable_variant(previous, name, artefact, OV_INT8)
            reuse = entry is not None and entry.extra.get("method") == ov_int8_method()
            made[variant_name(name, OV_INT8)] = entry if reuse else convert_ov_int8(name, artefact, folder)
    return made
