"""The numbers the checks and benchmarks report: mask IoU, cosine similarity, latency percentiles (numpy only).

One definition each, used by export's parity and precision checks, the benchmarks, the dataset
evaluation and the tests. Where callers have different conventions (an empty mask pair, a zero vector,
how the median of an even count is formed), the convention is a parameter or a separately named
function, so each caller keeps its numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

EVAL_EPSILON = 1e-10  # the original eval_miou.py's guard in ΣI / (ΣU + 1e-10)


def mask_iou(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    """IoU of two masks of the same shape (nonzero is inside), over all their elements; `empty` when both are
    empty."""
    union = np.logical_or(a, b).sum()
    return empty if union == 0 else float(np.logical_and(a, b).sum() / union)


def mask_ious(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> np.ndarray:
    """Per-mask IoU (float64) of two stacks of masks [..., H, W], flattened to [N]; `empty` where both are empty."""
    first, second = np.asarray(a), np.asarray(b)
    first = first.reshape(-1, first.shape[-2] * first.shape[-1])
    second = second.reshape(first.shape)
    inter = np.logical_and(first, second).sum(axis=1)
    union = np.logical_or(first, second).sum(axis=1)
    return np.where(union == 0, empty, inter / np.maximum(union, 1))


def mean_mask_iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean IoU of the masks logits > 0 over every mask (last two axes); two empty masks count as 1."""
    return float(np.mean(mask_ious(reference > 0, candidate > 0)))


def summed_iou(intersection: int, union: int, epsilon: float = EVAL_EPSILON) -> float:
    """eval_miou.py's IoU of pixel counts summed over images: ΣI / (ΣU + 1e-10), so 0 when both are empty."""
    return intersection / (union + epsilon)


def cosine(a: np.ndarray, b: np.ndarray, zero: float | None = 1.0) -> float:
    """Cosine similarity of two arrays, flattened, in float64.

    `zero` is the value when either norm is 0 (1.0: the parity checks' convention); None divides anyway,
    giving nan (with numpy's warning), as the GPU parity check always did.
    """
    first = np.asarray(a, dtype=np.float64).ravel()
    second = np.asarray(b, dtype=np.float64).ravel()
    norms = np.linalg.norm(first) * np.linalg.norm(second)
    if zero is not None and norms == 0.0:
        return zero
    return float(first @ second / norms)


def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile, by np.percentile's default linear interpolation, in float64."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def midpoint_median(samples: Sequence[float]) -> float:
    """statistics.median: the middle sample, or (a + b) / 2 of the two middle ones for an even count.

    percentile(samples, 50) forms the latter as b - (b - a) / 2, which can differ in the last bit.
    """
    return statistics.median(samples)


def latency_summary(samples: Sequence[float] | np.ndarray, digits: int = 3, midpoint: bool = False) -> dict[str, float]:
    """p50, p90, min and max of timing samples, each rounded to `digits` decimals.

    p90 is percentile(samples, 90); p50 is percentile(samples, 50), or midpoint_median(samples) with
    midpoint=True (the GPU parity check's encoder latencies).
    """
    values = np.asarray(samples, dtype=np.float64)
    p50 = midpoint_median(list(samples)) if midpoint else percentile(values, 50)
    return {
        "p50": round(p50, digits),
        "p90": round(percentile(values, 90), digits),
        "min": round(float(values.min()), digits),
        "max": round(float(values.max()), digits),
    }
