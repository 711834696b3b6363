"""persense.PerSense: the application API on the tiny engines (references, segment, save/load, threads)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from persense import PerSense, PersenseError, Reference
from persense.runtime.pipeline.flow import PerSensePipeline

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def ps(tiny_engines) -> PerSense:
    return PerSense.open(tiny_engines, backend="ort-cpu", threads=2)


@pytest.fixture(scope="module")
def apple(ps, scene) -> Reference:
    return ps.reference(scene["image"], scene["reference"] > 0)


@pytest.fixture(scope="module")
def result(ps, apple, scene_files):
    return ps.segment(scene_files["image"], apple, density=scene_files["density"])


def test_import_persense_loads_neither_torch_nor_onnxruntime():
    code = "import sys, persense; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_segment_matches_the_pipeline_it_wraps(ps, apple, result, scene, scene_files):
    from persense.runtime.counters.base import NpyDensityCounter
    from persense.runtime.imageio import read_rgb

    pipeline = PerSensePipeline(ps.sam, NpyDensityCounter(scene_files["density"]))
    expected = pipeline.segment(
        read_rgb(scene_files["image"]), pipeline.reference(scene["image"], scene["reference"] > 0)
    )
    assert len(result.points) >= 12 and result.count == expected.count
    np.testing.assert_array_equal(result.points, expected.points)
    np.testing.assert_array_equal(result.union, expected.union)
    np.testing.assert_array_equal(result.labels, expected.labels)
    assert result.decoder_launches == expected.decoder_launches > 0


def test_paths_and_arrays_give_the_same_reference(ps, apple, scene_files, scene):
    from persense.runtime.imageio import read_rgb

    from_files = ps.reference(scene_files["image"], scene_files["mask"])
    from_arrays = ps.reference(read_rgb(scene_files["image"]), scene["reference"])  # 0/255 uint8 mask
    np.testing.assert_array_equal(from_files.target.embedding, from_arrays.target.embedding)
    assert apple.manifest == ps.manifest.digest() and apple.precision == "fp32" and apple.backend == "ort-cpu"


def test_instance_masks_are_whole_masks_whose_union_is_the_union(result):
    masks = list(result.instance_masks())
    assert len(masks) == len(result.points)
    np.testing.assert_array_equal(np.logical_or.reduce(masks), result.union > 0)
    for index, mask in enumerate(masks):
        assert mask.dtype == bool and mask.shape == result.union.shape
        assert mask[result.labels == index + 1].all()  # the label map keeps a part of each mask
    with pytest.raises(IndexError):
        result.instance_mask(len(masks))


def test_reference_save_load_round_trip(ps, apple, result, scene_files, tmp_path):
    path = apple.save(tmp_path / "apple.npz")
    loaded = Reference.load(path)
    np.testing.assert_array_equal(loaded.target.embedding, apple.target.embedding)
    np.testing.assert_array_equal(loaded.target.feature, apple.target.feature)
    assert (loaded.manifest, loaded.precision, loaded.backend) == (apple.manifest, "fp32", "ort-cpu")
    again = ps.segment(scene_files["image"], loaded, density=scene_files["density"])
    np.testing.assert_array_equal(again.union, result.union)


def test_reference_from_other_engines_is_refused(ps, apple, tmp_path):
    other = Reference(apple.target, "0123456789abcdef", "fp32", "ort-cpu")
    with pytest.raises(PersenseError, match="other engines"):
        ps.segment(np.zeros((64, 64, 3), np.uint8), other)
    other.save(tmp_path / "other.npz")
    with pytest.raises(PersenseError, match="other engines"):
        ps.segment(np.zeros((64, 64, 3), np.uint8), Reference.load(tmp_path / "other.npz"))
    with pytest.raises(PersenseError, match="other engines"):
        ps.segment(np.zeros((64, 64, 3), np.uint8), Reference(apple.target, apple.manifest, "int8", "ort-cpu"))


@pytest.mark.parametrize("damage", ["text", "flip", "truncate", "other_npz"])
def test_damaged_reference_files_are_refused(apple, tmp_path, damage):
    path = apple.save(tmp_path / "apple.npz")
    if damage == "text":
        path.write_text("not a reference\n")
    elif damage == "flip":  # a changed number (same layout): the checksum catches it
        np.savez(
            path,
            embedding=apple.target.embedding + np.float32(1e-3),
            feature=apple.target.feature,
            meta=np.load(path)["meta"],
        )
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    else:
        np.savez(path, density=np.zeros((4, 4)))
    with pytest.raises(PersenseError, match=str(path.name)):
        Reference.load(path)


def test_array_inputs_are_checked_like_files(ps, scene):
    image, mask = scene["image"], scene["reference"]
    with pytest.raises(PersenseError, match="same size"):
        ps.reference(image, mask[:-1])
    with pytest.raises(PersenseError, match="empty"):
        ps.reference(image, np.zeros_like(mask))
    with pytest.raises(PersenseError, match="not binary"):
        ps.reference(image, np.arange(mask.size).reshape(mask.shape) % 3)
    with pytest.raises(PersenseError, match="image array"):
        ps.reference(image[..., :2], mask)
    with pytest.raises(PersenseError, match="pixel type"):
        ps.reference(image.astype(np.float32), mask)
    with pytest.raises(PersenseError, match="no such file"):
        ps.reference("missing.jpg", mask)


def test_open_refuses_bad_options(tiny_engines, tmp_path):
    with pytest.raises(PersenseError, match="precision"):
        PerSense.open(tiny_engines, precision="fp8")
    with pytest.raises(PersenseError, match="threads"):
        PerSense.open(tiny_engines, threads=0)
    with pytest.raises(PersenseError):
        PerSense.open(tmp_path)  # no manifest


def test_one_persense_shared_by_four_threads_gives_the_sequential_results(ps, apple, scene, scene_files):
    from conftest import draw_scene

    images = [draw_scene(seed=seed)["image"] for seed in (1, 2)]
    jobs = [(image, density) for image in images for density in (scene["density"], None)]  # 4 concurrent calls

    def run(job):
        image, density = job
        return ps.segment(image, apple, density=density)

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, jobs))
    for one, other in zip(sequential, threaded, strict=True):
        np.testing.assert_array_equal(one.points, other.points)
        np.testing.assert_array_equal(one.labels, other.labels)
        assert one.count == other.count and one.decoder_launches == other.decoder_launches
    assert ps.counter.name == "sam"  # a per-call density never replaced the shared counter


def _readme_snippet() -> str:
    """The code block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    return textwrap.dedent(re.search(r"```python\n(.*?)```", section, re.S).group(1))


def test_readme_python_api_snippet_runs(tiny_engines, scene_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet's relative paths: engines/, ref.jpg, ref_mask.png, crowd.jpg
    shutil.copytree(tiny_engines, tmp_path / "engines")
    shutil.copy(scene_files["image"], tmp_path / "ref.jpg")
    shutil.copy(scene_files["mask"], tmp_path / "ref_mask.png")
    shutil.copy(scene_files["image"], tmp_path / "crowd.jpg")
    namespace: dict = {}
    exec(compile(_readme_snippet(), str(README), "exec"), namespace)
    assert (tmp_path / "apple.npz").is_file() and (tmp_path / "crowd_mask.png").is_file()
    assert namespace["result"].union.shape == namespace["result"].labels.shape


def test_reference_cache_serves_a_second_encoding_bit_identical(tiny_engines, scene, scene_files, tmp_path):
    cached = PerSense.open(tiny_engines, backend="ort-cpu", threads=2, cache_dir=tmp_path / "cache")
    first = cached.reference(scene["image"], scene["reference"])
    again = cached.reference(scene["image"].copy(), scene["reference"].copy())  # same bytes, other arrays
    assert (first.source, again.source) == ("encoded", "cache") and first.key == again.key
    assert first.encoding_ms > 0 and again.encoding_ms == 0
    np.testing.assert_array_equal(again.target.embedding, first.target.embedding)
    np.testing.assert_array_equal(again.target.feature, first.target.feature)
    assert (again.manifest, again.precision, again.backend) == (first.manifest, "fp32", "ort-cpu")
    as_bool = cached.reference(scene["image"], scene["reference"] > 0)  # same pixels, other dtype: its own key
    assert as_bool.source == "encoded" and as_bool.key != first.key
    from_files = cached.reference(scene_files["image"], scene_files["mask"])
    assert from_files.key == cached.cache_key(scene_files["image"], scene_files["mask"]) != first.key
    assert cached.reference(str(scene_files["image"]), str(scene_files["mask"])).source == "cache"
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_cache_off_and_loaded_references_say_where_they_came_from(tiny_engines, scene, apple, tmp_path):
    uncached = PerSense.open(tiny_engines, backend="ort-cpu", threads=2, cache_dir=tmp_path / "c", cache=False)
    fresh = uncached.reference(scene["image"], scene["reference"] > 0)
    assert fresh.source == "encoded" and fresh.key is None and not (tmp_path / "c").exists()
    np.testing.assert_array_equal(fresh.target.embedding, apple.target.embedding)
    loaded = Reference.load(apple.save(tmp_path / "apple.npz"))
    assert loaded.source == "file" and loaded.key is None and loaded.encoding_ms == 0


def test_cache_key_follows_the_precision(tiny_engines, scene, tmp_path):
    from persense.export.cli import main as export

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    assert export(["--model", "tiny", "--seed", "0", "--out", str(engines), "--int8", "-q"]) == 0
    fp32 = PerSense.open(engines, backend="ort-cpu", threads=2, cache_dir=tmp_path / "cache")
    int8 = PerSense.open(engines, backend="ort-cpu", precision="int8", threads=2, cache_dir=tmp_path / "cache")
    assert fp32.reference(scene["image"], scene["reference"]).source == "encoded"
    from_int8 = int8.reference(scene["image"], scene["reference"])
    assert from_int8.source == "encoded" and from_int8.precision == "int8"
    assert int8.reference(scene["image"], scene["reference"]).source == "cache"
    assert len(list((tmp_path / "cache").iterdir())) == 2
