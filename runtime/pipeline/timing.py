"""Per-stage wall-clock timing shared by the runtime pipeline, the reference and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = (
    "reference_encoding",
    "image_encoding",
    "location_prior",
    "exemplar_cascade",
    "counter",
    "idm",
    "ppsm",
    "feedback",
    "final_decoding",
    "merge",
)


class StageTimer:
    """Accumulates milliseconds per named stage."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body of a `with` block and add it to `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0

    def total(self) -> float:
        """Sum over stages in milliseconds."""
        return sum(self.ms.values())
