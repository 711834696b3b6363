"""persense.runtime must never import torch (it is what gets deployed)."""

import pkgutil
import subprocess
import sys

import persense.runtime


def test_importing_every_runtime_module_does_not_import_torch():
    modules = [m.name for m in pkgutil.walk_packages(persense.runtime.__path__, "persense.runtime.")]
    assert "persense.runtime.pipeline.flow" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(leaked))\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"runtime imported torch: {done.stdout} {done.stderr}"
