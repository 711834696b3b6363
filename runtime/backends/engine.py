"""The Engine protocol every backend implements, and the default thread count."""

from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np

from persense.runtime.manifest import TensorSpec

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Anything that maps named input arrays to named output arrays."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on host arrays and return host arrays by output name."""
        ...


def default_threads() -> int:
    """Intra-op threads: PERSENSE_THREADS if set, else every core this process may use."""
    env = os.environ.get("PERSENSE_THREADS")
    return int(env) if env else len(os.sched_getaffinity(0))
