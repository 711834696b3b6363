"""The package's floor plan: no import cycle between modules or between subpackages, layers that only import
downwards (benchmarks -> export -> runtime), precision steps that depend on the manifest-entry module, and no
folder of more than 12 modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "persense": ROOT / "persense",
    "persense.runtime": ROOT / "runtime",
    "persense.export": ROOT / "export",
    "persense.benchmarks": ROOT / "benchmarks",
}
LAYERS = ("persense.runtime", "persense.export", "persense.benchmarks")  # each may import only those before it
MAX_MODULES = 12


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (subpackages as `pkg.__init__`)."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            if package == "persense" and path.parent != folder:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            modules[".".join((package, *parts))] = path
    return modules


def imports(source: str, known: set[str]) -> set[str]:
    """Modules of `known` that a source imports, at module level or inside functions (`from a import b` counts
    as importing a.b where a.b is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known and f"{name}.__init__" not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name if name in known else f"{name}.__init__")
                break
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = module_files()
    known = set(files)
    return {name: imports(path.read_text(), known) - {name} for name, path in files.items()}


def package_of(module: str) -> str:
    """The (sub)package a module lives in."""
    return module.rpartition(".")[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Subpackage -> subpackages it imports, for the subpackages of runtime/ and export/ (layers are checked
    apart, and a package's own __init__ is not an import of its contents)."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = package_of(module)
        if source.count(".") < 2 or module.endswith(".__init__"):
            continue
        out.setdefault(source, set())
        out[source] |= {package_of(t) for t in targets if package_of(t).count(".") >= 2} - {source}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of names (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        """Depth-first search from `node`."""
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_sees_function_level_and_package_imports() -> None:
    known = {"persense.export.a", "persense.export.b", "persense.export.c", "persense.export.__init__"}
    graph = {
        "persense.export.a": imports("from persense.export import b\n", known),
        "persense.export.b": imports("def f():\n    from persense.export.c import g\n", known),
        "persense.export.c": imports("import persense.export.a\n", known),
    }
    assert find_cycle(graph) == ["persense.export.a", "persense.export.b", "persense.export.c", "persense.export.a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert imports("from persense.export import PersenseError\n", known) == {"persense.export.__init__"}


def test_no_module_import_cycle() -> None:
    graph = import_graph()
    assert {"persense.export.exporter", "persense.export.precision.fp16", "persense.runtime.api"} <= set(graph)
    assert find_cycle(graph) is None


def test_no_subpackage_import_cycle() -> None:
    graph = package_graph(import_graph())
    assert {"persense.runtime.backends", "persense.export.sam"} <= set(graph)
    assert find_cycle(graph) is None


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    allowed = LAYERS[: LAYERS.index(layer) + 1]
    for module, targets in import_graph().items():
        if module.startswith(layer + "."):
            wrong = {t for t in targets if not t.startswith(allowed)}
            assert not wrong, f"{module} imports {wrong}"


def test_manifest_entries_depend_on_no_export_step() -> None:
    graph = import_graph()
    export = "persense.export."
    assert graph[export + "artefacts"] <= {m for m in graph if m.startswith("persense.runtime.")}
    for step in ("precision.fp16", "precision.int8", "precision.tensorrt", "exporter"):
        assert export + "artefacts" in graph[export + step]
    for step in ("precision.fp16", "precision.int8", "precision.tensorrt", "parity"):
        assert export + "exporter" not in graph[export + step]


def test_no_folder_holds_more_than_twelve_modules() -> None:
    for folder in FOLDERS.values():
        for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            modules = [p for p in sub.glob("*.py") if p.name != "__init__.py"]
            assert len(modules) <= MAX_MODULES, f"{sub.relative_to(ROOT)} holds {len(modules)} modules"
