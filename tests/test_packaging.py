"""Exactly one ONNX Runtime build: the install extras, and the check the runtime makes before importing onnxruntime."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest
import tomllib

from persense.runtime.backends import ort_check
from persense.runtime.backends.choice import resolve_backend
from persense.runtime.backends.ort_check import Build, choose_build
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.errors import PersenseError

ROOT = Path(__file__).resolve().parents[1]
SITE, OTHER = Path("/venv/site-packages"), Path("/tmp/site")
CPU, GPU = Build("onnxruntime", "1.32.0", SITE), Build("onnxruntime-gpu", "1.31.1", SITE)


class FakeDist:
    """The parts of importlib.metadata.Distribution that ort_check reads."""

    def __init__(self, name: str, files: list[str] | None, location: Path = SITE, top_level: str = "") -> None:
        self.metadata = {"Name": name}
        self.version = "1.0"
        self.files = None if files is None else [PurePosixPath(f) for f in files]
        self._location, self._top_level = location, top_level

    def locate_file(self, path: str) -> Path:
        return self._location / path

    def read_text(self, name: str) -> str | None:
        return self._top_level if name == "top_level.txt" else None


@pytest.fixture
def fresh_check():
    """check_onnxruntime's per-process cache emptied before and after the test."""
    ort_check.check_onnxruntime.cache_clear()
    yield
    ort_check.check_onnxruntime.cache_clear()


def test_builds_are_found_by_the_module_they_install(monkeypatch: pytest.MonkeyPatch) -> None:
    dists = [
        FakeDist("onnxruntime", ["onnxruntime/__init__.py", "onnxruntime/capi/_pybind_state.py"]),
        FakeDist("onnxruntime_gpu", ["onnxruntime/__init__.py"], OTHER),
        FakeDist("onnxruntime-extensions", ["onnxruntime_extensions/__init__.py"]),
        FakeDist("onnxruntime-openvino", None, OTHER, top_level="onnxruntime\n"),
        FakeDist("onnxruntime", ["onnxruntime/__init__.py"]),  # the same folder twice on sys.path
        FakeDist("numpy", ["numpy/__init__.py"]),
    ]
    monkeypatch.setattr(ort_check.metadata, "distributions", lambda: iter(dists))
    builds = ort_check.installed_builds()
    assert [(b.name, b.location) for b in builds] == [
        ("onnxruntime", SITE.resolve()),
        ("onnxruntime-gpu", OTHER.resolve()),
        ("onnxruntime-openvino", OTHER.resolve()),
    ]


def test_none_installed_names_both_extras() -> None:
    with pytest.raises(
        PersenseError,
        match=r"not installed: install exactly one: pip install 'persense\[cpu\]', "
        r"or 'persense\[gpu\]'",
    ):
        choose_build([], None)


def test_one_build_is_used() -> None:
    assert choose_build([GPU], SITE) is GPU


def test_two_builds_in_one_folder_are_refused_with_the_fix() -> None:
    with pytest.raises(PersenseError) as error:
        choose_build([CPU, GPU], SITE)
    message = str(error.value)
    assert "onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are installed together" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu, then install exactly one" in message
    assert "\n" not in message


def test_a_build_shadowed_on_sys_path_is_allowed() -> None:
    carried = Build("onnxruntime-gpu", "1.31.1", OTHER)
    assert choose_build([CPU, carried], OTHER) is carried
    assert choose_build([CPU, carried], SITE) is CPU


def test_builds_found_but_module_from_elsewhere_is_refused() -> None:
    with pytest.raises(PersenseError, match="overwrite each other"):
        choose_build([CPU, Build("onnxruntime-gpu", "1.31.1", OTHER)], Path("/src/onnxruntime-checkout"))


@pytest.mark.usefixtures("fresh_check")
def test_the_runtime_checks_before_it_imports_onnxruntime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ort_check, "installed_builds", lambda: [CPU, GPU])
    monkeypatch.setattr(ort_check, "module_root", lambda: SITE)
    with pytest.raises(PersenseError, match="installed together"):
        OrtEngine(tmp_path / "model.onnx")
    with pytest.raises(PersenseError, match="installed together"):
        resolve_backend("auto")
    assert resolve_backend("ort-cpu") == "ort-cpu"  # an explicit backend needs no import yet


@pytest.mark.usefixtures("fresh_check")
def test_this_environment_has_exactly_one_build(capsys: pytest.CaptureFixture[str]) -> None:
    build = ort_check.check_onnxruntime()
    assert build.name.startswith("onnxruntime") and build.location == ort_check.module_root()
    assert ort_check.main(["--require-provider", "CPUExecutionProvider"]) == 0
    assert capsys.readouterr().out.startswith(f"{build} in ")
    assert ort_check.main(["--require-provider", "NoSuchExecutionProvider"]) == 2
    assert capsys.readouterr().err.startswith(f"ort_check: error: {build} lists no NoSuchExecutionProvider")


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    """Core dependencies and extras from pyproject.toml, as distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> list[str]:
        return [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements]

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def test_only_the_cpu_and_gpu_extras_bring_onnxruntime() -> None:
    core, extras = _extras()
    owners = {name: [d for d in deps if d.startswith("onnxruntime")] for name, deps in {"core": core, **extras}.items()}
    assert owners.pop("cpu") == ["onnxruntime"] and owners.pop("gpu") == ["onnxruntime-gpu"]
    assert not any(owners.values()), owners


def test_ci_installs_as_the_readme_says_and_checks_the_gpu_build() -> None:
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    install = re.search(r"\.venv/bin/pip install -e '(\.\[[a-z,]+\])'", readme)
    assert install is not None and "cpu" in install.group(1).split("[")[1].rstrip("]").split(",")
    assert f".venv/bin/pip install --quiet -e '{install.group(1)}'" in ci
    assert re.search(r"-e '\.\[gpu\]'", ci) and "--require-provider CUDAExecutionProvider" in ci
