"""persense: PerSense as deployable engines (export in persense.export, torch-free runtime in persense.runtime).

`persense.PerSense` and `persense.Reference` (persense.runtime.api) are the application API; they are
imported on first use, so `import persense` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PerSense", "PersenseError", "Reference", "__version__"]

if TYPE_CHECKING:
    from persense.runtime.api import PerSense, Reference
    from persense.runtime.errors import PersenseError


def __getattr__(name: str) -> Any:
    """PerSense, Reference and PersenseError, imported when first asked for."""
    if name in ("PerSense", "Reference"):
        from persense.runtime import api

        return getattr(api, name)
    if name == "PersenseError":
        from persense.runtime.errors import PersenseError

        return PersenseError
    raise AttributeError(f"module 'persense' has no attribute {name!r}")
