"""The backend table is the one statement of what each backend means; nothing else compares backend names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from persense.runtime.backends.choice import resolve_backend
from persense.runtime.backends.openvino_engine import OV_PRECISIONS
from persense.runtime.backends.table import AUTO, BACKENDS, PRECISIONS, TABLE, backend
from persense.runtime.errors import PersenseError

ROOT = Path(__file__).resolve().parents[1]
NAMES = set(TABLE)
TABLE_MODULES = {ROOT / "runtime/backends/table.py", ROOT / "runtime/backends/choice.py"}
REPORTS = {ROOT / "benchmarks/gpu_report.py"}  # selects the result rows of one backend by name


def test_the_table_states_each_backend() -> None:
    assert BACKENDS == (AUTO, "ort-cpu", "ort-cuda", "trt", "openvino")
    assert [row.name for row in TABLE.values()] == list(TABLE)
    assert {row.name for row in TABLE.values() if row.on_gpu} == {"ort-cuda", "trt"}
    assert {row.name: row.decode_chunk for row in TABLE.values()} == {
        "ort-cpu": 4,
        "ort-cuda": 256,
        "trt": 256,
        "openvino": 4,
    }
    assert {row.name for row in TABLE.values() if row.serialised} == {"trt"}
    assert {row.name: row.side for row in TABLE.values()}["openvino"] == "ort-cpu"
    assert backend("trt").run_precision("fp32") == "fp16" and backend("ort-cpu").run_precision("int8") == "int8"
    assert backend("trt").fallback == "ort-cuda"
    assert set(backend("openvino").precisions) == set(OV_PRECISIONS)
    assert all(set(row.precisions) <= set(PRECISIONS) for row in TABLE.values())


def test_unknown_backends_are_refused_with_the_choices() -> None:
    with pytest.raises(PersenseError, match="unknown backend 'cuda'; choose one of auto, ort-cpu"):
        backend("cuda")
    with pytest.raises(PersenseError, match="unknown backend"):
        resolve_backend("tensorrt")


def _backend_comparisons(path: Path) -> list[int]:
    """Lines of `path` that compare something with a backend name (==, !=, or `in` a literal list of names);
    a name looked up in data (`"trt" in artefact.extra["backends"]`) is not a rule about backends."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and not (
            isinstance(node.ops[0], ast.In | ast.NotIn) and not isinstance(node.comparators[0], ast.Tuple | ast.List)
        ):
            values = [node.left, *node.comparators]
            constants = {v.value for v in values if isinstance(v, ast.Constant)}
            for v in values:
                if isinstance(v, ast.Tuple | ast.List | ast.Set):
                    constants |= {e.value for e in v.elts if isinstance(e, ast.Constant)}
            if constants & NAMES:
                lines.append(node.lineno)
    return lines


def test_no_module_compares_backend_names() -> None:
    found = {
        str(path.relative_to(ROOT)): lines
        for folder in ("runtime", "export", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if path not in TABLE_MODULES | REPORTS and (lines := _backend_comparisons(path))
    }
    assert found == {}
