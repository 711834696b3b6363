"""The one place that imports segment-anything's `modeling` package.

segment-anything's top-level `__init__` imports torchvision (unusable with the CPU torch wheel), so
the `modeling` subpackage is loaded under a private name straight from its files.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PRIVATE_NAME = "_persense_sam_modeling"


def _load() -> ModuleType:
    """Import segment_anything/modeling without executing segment_anything/__init__.py."""
    if _PRIVATE_NAME in sys.modules:
        return sys.modules[_PRIVATE_NAME]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install 'persense[export]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "modeling"
    module_spec = importlib.util.spec_from_file_location(
        _PRIVATE_NAME, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_PRIVATE_NAME] = module
    module_spec.loader.exec_module(module)
    return module


modeling = _load()
Sam = modeling.Sam
ImageEncoderViT = modeling.ImageEncoderViT
PromptEncoder = modeling.PromptEncoder
MaskDecoder = modeling.MaskDecoder
TwoWayTransformer = modeling.TwoWayTransformer
LayerNorm2d = modeling.common.LayerNorm2d
