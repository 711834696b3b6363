"""The SAM-only counter on synthetic embeddings with a known number of objects."""

from __future__ import annotations

import numpy as np
import pytest

from persense.runtime.counters.base import CountRequest
from persense.runtime.counters.sam_prototype import SamPrototypeCounter
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import SamTransform
from persense.runtime.pipeline.idm import candidate_points

COUNT_RTOL = 0.15  # stated accuracy on these scenes (measured: at most 10 % over)


def embedding_scene(rows: int, cols: int, radius: float, size=(768, 1024), seed=0, noise=0.3):
    """SAM-like features: objects (one feature vector + noise) on a grid over a background vector + noise."""
    rng = np.random.default_rng(seed)
    transform = SamTransform(size)
    scale = 1024 / max(size)
    obj, background = rng.normal(size=256), rng.normal(size=256)
    emb = background[:, None, None] + noise * rng.normal(size=(256, 64, 64))
    gh, gw = (int(np.ceil(s / 16)) for s in transform.input_size)
    yy, xx = np.mgrid[:64, :64] + 0.5
    centres = []
    for i in range(rows):
        for j in range(cols):
            cy = (i + 0.5) * gh / rows + rng.uniform(-0.5, 0.5)
            cx = (j + 0.5) * gw / cols + rng.uniform(-0.5, 0.5)
            inside = np.hypot(yy - cy, xx - cx) <= radius
            emb[:, inside] = obj[:, None] + noise * rng.normal(size=(256, int(inside.sum())))
            centres.append((cx * 16 / scale, cy * 16 / scale))
    centres = np.array(centres)
    r = radius * 16 / scale
    box = np.array([centres[0, 0] - r, centres[0, 1] - r, centres[0, 0] + r, centres[0, 1] + r])
    request = CountRequest(np.zeros(size + (3,), np.uint8), box[None], transform, emb[None].astype(np.float32))
    return request, centres, r


@pytest.mark.parametrize("rows,cols,radius", [(3, 3, 4.0), (4, 5, 2.5), (6, 8, 1.8), (8, 10, 1.2), (9, 12, 1.2)])
def test_counts_synthetic_scenes_within_the_stated_error(rows, cols, radius):
    request, centres, r = embedding_scene(rows, cols, radius)
    density = SamPrototypeCounter().count(request)
    assert abs(density.count - len(centres)) <= COUNT_RTOL * len(centres)
    assert abs(float(density.map.sum()) - density.count) < 1e-3 * density.count
    points = candidate_points(density.map, request.transform.original_size, density.idm_threshold)
    nearest = np.hypot(*(points[:, None, :] - centres[None, :, :]).transpose(2, 0, 1)).min(axis=0)
    assert np.mean(nearest <= r) >= 0.9  # IDM finds (almost) every object from this density


def test_uniform_features_give_no_spurious_objects():
    request, _, _ = embedding_scene(1, 1, 3.0)
    request.embedding = np.ones_like(request.embedding)
    assert SamPrototypeCounter().count(request).count <= 1


def test_needs_the_embedding():
    request, _, _ = embedding_scene(2, 2, 3.0)
    request.embedding = None
    with pytest.raises(PersenseError, match="embedding"):
        SamPrototypeCounter().count(request)
