"""The export package's import graph has no cycle, and precision steps depend on the manifest-entry module."""

from __future__ import annotations

import ast
from pathlib import Path

EXPORT = Path(__file__).resolve().parents[1] / "export"
PACKAGE = "persense.export"


def export_imports(source: str) -> set[str]:
    """Modules of persense.export that a module's source imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.split(".")[2] for name in names if name.startswith(PACKAGE + ".")}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module name -> the export modules it imports, for every module of export/."""
    modules = {path.stem for path in EXPORT.glob("*.py")}
    return {path.stem: export_imports(path.read_text()) & modules - {path.stem} for path in EXPORT.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        """Depth-first search from `module`."""
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_sees_function_level_imports() -> None:
    graph = {"a": export_imports("from persense.export import b\n"),
             "b": export_imports("def f():\n    from persense.export.c import g\n"),
             "c": export_imports("import persense.export.a\n")}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_export_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"exporter", "fp16", "int8", "trt_build", "parity", "artefacts"} <= set(graph)
    assert find_cycle(graph) is None


def test_manifest_entries_depend_on_no_export_step() -> None:
    graph = import_graph()
    assert graph["artefacts"] == set()
    for step in ("fp16", "int8", "trt_build", "exporter"):
        assert "artefacts" in graph[step]
    assert "exporter" not in graph["fp16"] | graph["int8"] | graph["trt_build"] | graph["parity"]
