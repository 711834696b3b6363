"""persense-eval --run --ray: a local Ray instance with two workers gives the single-process outputs."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from eval_runs import predictions, run_eval, tiny_dataset

from persense.runtime.datasets.ray_batch import import_ray
from persense.runtime.errors import PersenseError

HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (optional extra: pip install 'persense[ray]')")
def test_local_ray_with_two_workers_equals_single_process(tiny_engines: Path, tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path / "data", classes=2, images=2)
    single, distributed = tmp_path / "single", tmp_path / "ray"
    assert run_eval(data, single, tiny_engines) == (6, 0)
    first = sorted(single.glob("*/*.png"))[0].relative_to(single)
    (distributed / first.parent).mkdir(parents=True)
    shutil.copy(single / first, distributed / first)  # resume: Ray segments only the other five

    assert run_eval(data, distributed, tiny_engines, "--ray", "--ray-workers", "2") == (5, 1)
    assert predictions(distributed) == predictions(single)


def test_ray_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PersenseError, match=r"pip install 'persense\[ray\]'"):
        import_ray()
