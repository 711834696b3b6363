"""TensorRT: profiles, content-hash engine files, stale-engine refusal, and clear errors without TensorRT.

Everything up to the last section runs without TensorRT (manifest entries are built by hand); the GPU
section builds and runs a real engine and is skipped, with the reason, where TensorRT or a GPU is absent.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from persense.export.precision.tensorrt import (
    PROMPT_BATCH_MAX,
    build_engine,
    fp16_artefacts,
    input_profiles,
    record_engine,
)
from persense.runtime.backends.choice import open_engine
from persense.runtime.backends.trt_engine import (
    check_engine_current,
    engine_name,
    open_trt_engine,
    stale_reason,
    tensorrt_unavailable_reason,
)
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Artefact, Manifest, TensorSpec
from persense.runtime.models.sam import DECODER_IO, ENCODER_IO

TRT_REASON = tensorrt_unavailable_reason()
needs_trt = pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT unavailable: {TRT_REASON}")
without_trt = pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is usable here")


def onnx_entry(kind: str, io: tuple[list[TensorSpec], list[TensorSpec]], sha: str = "a" * 64) -> Artefact:
    """A hand-made FP32 ONNX manifest entry."""
    return Artefact(
        file=f"{kind}.onnx",
        sha256=sha,
        kind=kind,
        precision="fp32",
        model_type="tiny",
        source_checkpoint="random",
        opset=20,
        inputs=io[0],
        outputs=io[1],
        extra={"source_key": "tiny:random:0"},
    )


def engine_entry(source: Artefact, version: str = "10.7.0", capability: str = "9.0") -> Artefact:
    """A hand-made engine entry built from `source`."""
    return Artefact(
        file=f"{source.kind}.0123456789ab.engine",
        sha256="b" * 64,
        kind=source.kind,
        precision="fp16",
        model_type="tiny",
        source_checkpoint="random",
        opset=20,
        inputs=source.inputs,
        outputs=source.outputs,
        extra={
            "tensorrt_version": version,
            "compute_capability": capability,
            "onnx_sha256": source.sha256,
            "profiles": {},
        },
    )


def test_decoder_profile_covers_one_to_at_least_256_prompts() -> None:
    profiles = input_profiles(onnx_entry("sam_decoder", DECODER_IO))
    assert set(profiles) == {"point_coords", "point_labels", "mask_input", "has_mask_input", "persam_weight"}
    low, opt, high = profiles["point_coords"]
    assert low == [1, 1, 2] and high[0] >= 256 and high[0] == PROMPT_BATCH_MAX and low[0] <= opt[0] <= high[0]
    assert profiles["mask_input"][2] == [PROMPT_BATCH_MAX, 1, 256, 256]
    assert input_profiles(onnx_entry("sam_encoder", ENCODER_IO)) == {}


def test_counter_profile_covers_the_window_batch_and_exemplars() -> None:
    io = (
        [TensorSpec("windows", ("N", 3, 384, 384), "float32"), TensorSpec("exemplars", (1, "K", 3, 64, 64), "float32")],
        [TensorSpec("density", ("N", 384, 384), "float32")],
    )
    profiles = input_profiles(onnx_entry("counter_countr", io))
    assert profiles["windows"][0][0] == 1 and profiles["windows"][2][0] >= 256
    assert profiles["exemplars"][2] == [1, 5, 3, 64, 64]


def test_a_dynamic_axis_without_a_range_is_refused() -> None:
    io = ([TensorSpec("x", ("Q", 3), "float32")], [TensorSpec("y", ("Q", 3), "float32")])
    with pytest.raises(PersenseError, match="no TensorRT profile range for axis 'Q'"):
        input_profiles(onnx_entry("sam_decoder", io))


def test_engine_files_are_named_by_content_hash_and_recorded(tmp_path: Path) -> None:
    source = onnx_entry("sam_decoder", DECODER_IO)
    first = record_engine(source, tmp_path, b"plan one", {"tensorrt_version": "10.7.0", "compute_capability": "9.0"})
    assert first.file == f"sam_decoder.{hashlib.sha256(b'plan one').hexdigest()[:12]}.engine"
    assert (tmp_path / first.file).read_bytes() == b"plan one"
    assert first.sha256 == hashlib.sha256(b"plan one").hexdigest() and first.precision == "fp16"
    assert first.extra["onnx_sha256"] == source.sha256 and first.extra["tensorrt_version"] == "10.7.0"
    assert first.inputs == source.inputs and first.extra["source_key"] == source.extra["source_key"]
    second = record_engine(source, tmp_path, b"plan two", {})
    assert [p.name for p in tmp_path.glob("*.engine")] == [second.file]  # the older plan is removed


def test_stale_reason_names_what_changed() -> None:
    source = onnx_entry("sam_decoder", DECODER_IO)
    engine = engine_entry(source)
    assert stale_reason(engine, "10.7.0", "9.0", source) is None
    assert "TensorRT 10.7.0" in stale_reason(engine, "10.8.0", "9.0", source)
    assert "compute capability 9.0, this GPU is 8.9" in stale_reason(engine, "10.7.0", "8.9", source)
    assert "older sam_decoder.onnx" in stale_reason(engine, "10.7.0", "9.0", replace(source, sha256="c" * 64))


def test_stale_or_missing_engines_are_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    source = onnx_entry("sam_decoder", DECODER_IO)
    manifest = Manifest(tmp_path, "tiny", {}, {"sam_decoder": source, "sam_decoder_trt": engine_entry(source)})
    assert check_engine_current(manifest, "sam_decoder", "10.7.0", "9.0") is manifest.artefacts["sam_decoder_trt"]
    assert engine_name("sam_decoder") == "sam_decoder_trt" == engine_name("sam_decoder_trt")
    with pytest.raises(
        PersenseError,
        match=r"stale TensorRT engine \(built with TensorRT 10.7.0.*"
        r"persense-export --fp16 --out",
    ):
        check_engine_current(manifest, "sam_decoder", "10.9.1", "9.0")
    with pytest.raises(PersenseError, match="compute capability"):
        check_engine_current(manifest, "sam_decoder", "10.7.0", "8.6")
    with pytest.raises(PersenseError, match="no TensorRT engine 'sam_encoder_trt'.*persense-export --fp16"):
        check_engine_current(manifest, "sam_encoder", "10.7.0", "9.0")


@without_trt
def test_trt_backend_fails_clearly_without_tensorrt(tmp_path: Path) -> None:
    source = onnx_entry("sam_decoder", DECODER_IO)
    manifest = Manifest(tmp_path, "tiny", {}, {"sam_decoder": source, "sam_decoder_trt": engine_entry(source)})
    for opener in (
        lambda: open_trt_engine(manifest, "sam_decoder"),
        lambda: open_engine(manifest, "sam_decoder", "trt"),
    ):
        with pytest.raises(PersenseError, match="needs TensorRT and an NVIDIA GPU: .*--backend ort-cuda or ort-cpu"):
            opener()


@without_trt
def test_engine_build_fails_clearly_without_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(PersenseError, match="cannot build a TensorRT engine for sam_decoder.onnx: .*"):
        build_engine(onnx_entry("sam_decoder", DECODER_IO), tmp_path)


@without_trt
def test_fp16_step_writes_fp16_models_and_says_why_no_engines(tiny_engines: Path, tmp_path: Path) -> None:
    from persense.runtime.manifest import load_manifest

    folder = tmp_path / "engines"
    shutil.copytree(tiny_engines, folder)
    manifest = load_manifest(folder)
    added, note = fp16_artefacts(manifest.artefacts, folder, manifest)
    assert sorted(added) == ["sam_decoder_fp16", "sam_encoder_fp16"]
    assert all((folder / a.file).is_file() and a.precision == "fp16" for a in added.values())
    assert note is not None and note.startswith("TensorRT engines not built: ") and "\n" not in note
    assert TRT_REASON in note


@without_trt
def test_fp16_step_writes_no_fp16_counter(tmp_path: Path) -> None:
    counter = replace(onnx_entry("sam_decoder", DECODER_IO), file="counter_countr.onnx")  # never read: not converted
    added, note = fp16_artefacts({"counter_countr": counter}, tmp_path)
    assert added == {} and note is not None


# --- with TensorRT and a GPU ---------------------------------------------------------------------


@needs_trt
def test_decoder_engine_builds_runs_and_matches_onnx_runtime(tiny_engines: Path, tmp_path: Path) -> None:
    from persense.export.precision.error import compare_outputs, sample_feeds
    from persense.runtime.backends.trt_engine import compute_capability, tensorrt_version
    from persense.runtime.manifest import load_manifest

    folder = tmp_path / "engines"
    shutil.copytree(tiny_engines, folder)
    manifest = load_manifest(folder)
    source = manifest.artefact("sam_decoder")
    engine = build_engine(source, folder)
    assert engine.extra["tensorrt_version"] == tensorrt_version()
    assert engine.extra["compute_capability"] == compute_capability()
    assert (folder / "trt_timing.cache").is_file()
    assert build_engine(source, folder, previous=engine) is engine  # current engines are reused
    manifest.artefacts["sam_decoder_trt"] = engine
    manifest.save()
    trt = open_trt_engine(manifest, "sam_decoder")
    for batch in (1, PROMPT_BATCH_MAX):
        feeds = sample_feeds(source, seed=batch, dims={"B": batch})
        ref = open_engine(manifest, "sam_decoder").run(feeds)
        got = trt.run(feeds)
        assert got["low_res_masks"].shape == (batch, 256, 256)
        assert compare_outputs(ref["low_res_masks"], got["low_res_masks"], "low_res_masks")["mask_iou"] >= 0.97
    manifest.artefacts["sam_decoder_trt"] = replace(engine, extra={**engine.extra, "tensorrt_version": "0.0.0"})
    with pytest.raises(PersenseError, match="stale TensorRT engine"):
        open_trt_engine(manifest, "sam_decoder")
