"""persense: PerSense as deployable engines (export in persense.export, torch-free runtime in persense.runtime)."""

__version__ = "0.1.0"
