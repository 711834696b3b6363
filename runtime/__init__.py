"""Torch-free PerSense runtime: engines, pre/post-processing, IDM, PPSM and the pipeline."""

from persense.runtime.errors import PersenseError

__all__ = ["PersenseError"]
