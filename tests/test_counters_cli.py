"""Both original counters end to end: persense-export --counter, then persense-infer --counter, random weights."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from persense.export.cli import main as export
from persense.runtime.cli.infer import main as infer


@pytest.fixture(scope="module")
def engines_with_counters(tiny_engines, tmp_path_factory):
    """The tiny SAM engines plus a tiny CounTR and a full DSALVANet, added by two export runs."""
    folder = tmp_path_factory.mktemp("engines_counters")
    shutil.copytree(tiny_engines, folder, dirs_exist_ok=True)
    base = ["--model", "tiny", "--seed", "0", "--out", str(folder), "-q"]
    assert export(base + ["--counter", "countr", "--counter-config", "tiny"]) == 0
    assert export(base + ["--counter", "dsalvanet"]) == 0
    return folder


def test_manifest_lists_sam_and_both_counters(engines_with_counters):
    artefacts = json.loads((engines_with_counters / "manifest.json").read_text())["artefacts"]
    assert {"sam_encoder", "sam_decoder", "counter_countr", "counter_dsalvanet"} <= set(artefacts)
    assert artefacts["counter_dsalvanet"]["extra"]["lvam"] == "mu"


@pytest.mark.parametrize("counter,threshold_kind", [("countr", "float"), ("dsalvanet", "integer")])
def test_infer_runs_with_each_counter(engines_with_counters, scene_files, tmp_path, capsys, counter, threshold_kind):
    out = tmp_path / counter
    assert (
        infer(
            [
                str(scene_files["image"]),
                str(scene_files["image"]),
                str(scene_files["mask"]),
                "--engines",
                str(engines_with_counters),
                "--counter",
                counter,
                "--out",
                str(out),
                "--json",
                "--threads",
                "2",
                "-q",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["counter"] == counter and math.isfinite(summary["count_estimate"])
    if threshold_kind == "integer":  # DSALVANet's count is ceil(sum)
        assert summary["count_estimate"] == int(summary["count_estimate"])
    assert (out / "mask.png").is_file() and summary["timings_ms"]["counter"] > 0
