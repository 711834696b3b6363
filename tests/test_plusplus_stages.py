"""PerSense++'s runtime stages (runtime/plusplus: hybrid IDM, IMRM, diversity selection) against the PyTorch
oracle of persense++.py (export/oracle) on many random inputs, and literal statements of the original's rules
on constructed cases (SPEC-PLUSPLUS §2, §4, §6)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from persense.export.oracle import diversity as oracle_diversity
from persense.export.oracle import hybrid_idm as oracle_idm
from persense.export.oracle.imrm import imrm as oracle_imrm
from persense.runtime.errors import PersenseError
from persense.runtime.pipeline.idm import candidate_points
from persense.runtime.plusplus.diversity import _remove_overlaps, select_exemplars
from persense.runtime.plusplus.hybrid_idm import hybrid_points
from persense.runtime.plusplus.imrm import refine

THRESHOLDS = [oracle_idm.DSALVANET_THRESHOLD, oracle_idm.COUNTR_THRESHOLD]


@pytest.fixture(autouse=True)
def one_thread():
    """The oracle's KMeans on one thread too, as the runtime's: same results on these few samples, and no
    OpenMP start-up per fit (10-100x the clustering on a loaded machine)."""
    with threadpool_limits(limits=1):
        yield


# --- hybrid IDM (§2) ---------------------------------------------------------------------------------------


def gaussians(shape: tuple[int, int], centres: np.ndarray, sigmas: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """Sum of isotropic Gaussian blobs at (x, y) centres, float32."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for (x, y), sigma, amp in zip(centres, sigmas, amps):
        out += np.float32(amp) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / np.float32(2 * sigma**2))
    return out


def random_density(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """Blobs of mixed sizes (touching ones, composite contours), sometimes at another resolution than the image."""
    height, width = (int(v) for v in rng.integers(24, 160, 2))
    count = int(rng.integers(0, 25))
    centres = rng.uniform(0, 1, (count, 2)) * [width, height]
    density = gaussians((height, width), centres, rng.uniform(1.0, 7.0, count), rng.uniform(0.3, 1.0, count))
    if rng.random() < 0.3:  # a counter's map at its own resolution, resized by the IDM
        density = cv2.resize(density, (int(rng.integers(8, 2 * width)), int(rng.integers(8, 2 * height))))
    return density, (height, width)


def oracle_points(density: np.ndarray, image_size: tuple[int, int], threshold: int) -> np.ndarray:
    return np.array(oracle_idm.hybrid_idm(density, image_size, threshold), dtype=np.float64).reshape(-1, 2)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_hybrid_points_equal_the_oracle_in_set_order(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    total = 0
    for _ in range(150):
        density, size = random_density(rng)
        got = hybrid_points(density, size, threshold)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, oracle_points(density, size, threshold))
        total += len(got)
    assert total > 1000  # the random maps do give points


def test_touching_blobs_only_the_peak_part_separates() -> None:
    density = gaussians((80, 120), np.array([(50, 40), (72, 40)]), np.array([8, 8]), np.array([1, 1]))
    assert candidate_points(density, (80, 120), 30).tolist() == [[61.0, 40.0]]  # one contour: one centroid
    got = hybrid_points(density, (80, 120), 30)
    assert sorted(got.tolist()) == [[51, 40], [61, 40], [71, 40]]  # + the two maxima, no duplicates
    np.testing.assert_array_equal(got, oracle_points(density, (80, 120), 30))


def test_a_composite_contour_adds_its_children_once() -> None:
    density = np.zeros((200, 300), np.float32)
    for i in range(8):  # small contours keep the mean + 2 std area limit below the dumbbell's area
        cv2.circle(density, (20 + 35 * i, 20), 6, 0.8, -1)
    cv2.circle(density, (80, 130), 30, 0.8, -1)
    cv2.circle(density, (150, 130), 30, 0.8, -1)
    cv2.rectangle(density, (80, 126), (150, 134), 0.8, -1)  # a thin bridge: distance < 0.5 max there
    density[100, 200] = 1.0  # the only peak above a flat plateau
    got = hybrid_points(density, (200, 300), 30)
    assert {(80, 130), (149, 130), (115, 130), (200, 100)} <= set(map(tuple, got.astype(int).tolist()))
    assert len(got) == len(set(map(tuple, got.tolist())))
    np.testing.assert_array_equal(got, oracle_points(density, (200, 300), 30))


def test_the_order_is_the_python_set_order_not_sorted() -> None:
    centres = np.array([(20, 30), (70, 25), (130, 40), (40, 90), (100, 95), (140, 100), (61, 60)])
    density = gaussians((120, 160), centres, np.full(7, 5.0), np.ones(7))
    got = [tuple(p) for p in hybrid_points(density, (120, 160), 30).astype(int).tolist()]
    assert got == [(20, 30), (140, 100), (70, 25), (40, 90), (130, 40), (100, 95), (61, 60)]  # pinned
    assert got != sorted(got)


def test_degenerate_maps_as_candidate_points() -> None:
    for flat in [np.zeros((40, 50)), np.full((40, 50), 3.0), np.zeros((0, 0))]:
        assert hybrid_points(flat, (40, 50), 30).shape == (0, 2)
    with pytest.raises(PersenseError, match="2-D"):
        hybrid_points(np.zeros((1, 40, 50)), (40, 50), 30)
    with pytest.raises(PersenseError, match="NaN"):
        hybrid_points(np.full((40, 50), np.nan), (40, 50), 30)


# --- IMRM (§6) ---------------------------------------------------------------------------------------------

SCENE = (120, 160)


def rectangles(boxes: list[list[int] | None]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Masks drawn as inclusive xyxy rectangles (None: empty) -> (masks, areas, NaN-for-empty boxes)."""
    masks = []
    for box in boxes:
        mask = np.zeros(SCENE, bool)
        if box is not None:
            mask[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
        masks.append(mask)
    areas = np.array([m.sum() for m in masks])
    return masks, areas, np.array([[np.nan] * 4 if b is None else b for b in boxes], np.float64)


def assert_imrm_matches_oracle(boxes: list[list[int] | None], detections: np.ndarray | None):
    masks, areas, mask_boxes = rectangles(boxes)
    expected = oracle_imrm(masks, detections)
    got = refine(areas, mask_boxes, detections)
    assert got.kept.tolist() == expected.kept and got.reasons == expected.reasons
    assert got.threshold == expected.threshold and got.majority == expected.majority
    assert got.independent_boxes[:, [1, 0, 3, 2]].tolist() == expected.independent_boxes  # xyxy vs yxyx
    np.testing.assert_array_equal(got.areas, expected.areas)
    return got


def random_scene(rng: np.random.Generator) -> tuple[list[list[int] | None], np.ndarray | None]:
    """Small rectangles with some big outliers and empty masks; detections on some masks, random or nested."""
    height, width = SCENE
    boxes: list[list[int] | None] = []
    for _ in range(int(rng.integers(2, 12))):
        if rng.random() < 0.05:
            boxes.append(None)
            continue
        w, h = (int(v) for v in (rng.integers(30, 100, 2) if rng.random() < 0.2 else rng.integers(1, 15, 2)))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        boxes.append([x0, y0, x0 + w - 1, y0 + h - 1])
    if rng.random() < 0.15:
        return boxes, None
    detections = []
    for _ in range(int(rng.integers(0, 6))):
        box = boxes[int(rng.integers(len(boxes)))]
        if box is not None and rng.random() < 0.5:  # a detection on a mask, jittered
            detections.append(np.array(box) + rng.uniform(-3, 3, 4))
        else:
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            detections.append([x0, y0, x0 + rng.uniform(0, 80), y0 + rng.uniform(0, 80)])
    detections = np.array(detections, np.float32).reshape(-1, 4)
    if len(detections) and rng.random() < 0.3:  # a box nested inside another
        detections = np.concatenate([detections, detections[:1] + [1, 1, -1, -1]]).astype(np.float32)
    return boxes, detections


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # equal areas: fewer distinct points
def test_imrm_equals_the_oracle_on_random_scenes() -> None:
    rng = np.random.default_rng(5)
    rejected = rescued = 0
    for _ in range(100):
        got = assert_imrm_matches_oracle(*random_scene(rng))
        rejected += int((~got.kept).sum())
        rescued += sum("rescued" in r for r in got.reasons)
    assert rejected > 20 and rescued > 3  # both branches are exercised


def test_imrm_outlier_rescued_by_an_independent_box_or_rejected() -> None:
    small = [[10 * i, 5, 10 * i + 9, 14] for i in range(5)]  # five 100-pixel masks
    big = [60, 40, 109, 79]  # 2000 pixels; threshold (100 + 0) + (100 + 0) = 200
    detections = np.array([[60.5, 40.2, 109.9, 79.0], [0, 5, 9, 14]], np.float32)  # both independent
    got = assert_imrm_matches_oracle([*small, big], detections)
    assert got.threshold == 200.0 and got.kept.all() and "rescued (best IoU 1.000)" in got.reasons[-1]
    nested = np.concatenate([detections, [[70, 50, 80, 60]]]).astype(np.float32)  # inside the big mask's box
    got = assert_imrm_matches_oracle([*small, big], nested)
    assert got.kept.tolist() == [True] * 5 + [False]  # its box contains another: no longer independent
    assert got.independent_boxes.tolist() == [[0, 5, 9, 14], [70, 50, 80, 60]]
    assert got.summary()["rejected"] == [{"index": 5, "area": 2000.0, "reason": got.reasons[5]}]
    for few in [None, detections[:1]]:  # no detection, or one: no independent boxes, nothing rescues
        got = assert_imrm_matches_oracle([*small, big], few)
        assert not got.kept[-1] and got.reasons[-1].endswith("no independent detection box to rescue it")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_imrm_count_tie_takes_label_zero() -> None:
    got = assert_imrm_matches_oracle([[0, 0, 9, 9], [20, 0, 29, 9], [0, 20, 39, 59], [50, 20, 89, 59]], None)
    assert got.majority == 0  # two masks per cluster: np.argmax over the counts takes the first label
    assert got.summary()["majority_label"] == 0 and got.kept.all()
    with pytest.raises(ValueError, match=">= 2 masks"):
        refine(np.array([5]), np.array([[0, 0, 1, 4]], np.float64), None)  # one mask is written as it is


# --- diversity-aware exemplar selection (§4) ---------------------------------------------------------------


class Projection:
    """A deterministic stand-in for the RoI features: a seeded random projection of the int()-cast box, ReLU'd
    (non-negative as ResNet's), counting its calls."""

    def __init__(self, seed: int) -> None:
        self.weights = np.random.default_rng(seed).normal(size=(4, 64)).astype(np.float32)
        self.calls = 0

    def __call__(self, boxes: list[list[int]]) -> np.ndarray:
        self.calls += 1
        coords = np.array([[int(v) for v in box] for box in boxes], np.float32).reshape(-1, 4)
        return np.maximum(np.sin(coords / 17.0) @ self.weights, 0).astype(np.float32)


def assert_selection_matches_oracle(boxes: np.ndarray, scores: np.ndarray, reference: list[int], seed: int = 0):
    expected = oracle_diversity.select_exemplars(boxes.tolist(), scores.tolist(), reference, Projection(seed))
    features = Projection(seed)
    got = select_exemplars(boxes, scores, reference, features)
    assert got.boxes.tolist() == expected.boxes and got.scores.tolist() == expected.scores  # bit for bit
    assert got.clustered == expected.clustered and got.regions == expected.regions
    assert [boxes[i].astype(int).tolist() for i in got.lines] == expected.boxes
    assert features.calls == 1  # every box and the reference in one call
    return got, expected


def random_lines(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """K feedback lines: random boxes (zero sides, duplicates, equal sizes), scores around 0 and 0.8 with ties."""
    count = int(rng.integers(1, 25))
    if rng.random() < 0.4:  # nested boxes of all sizes: the tertiles' picks overlap
        y0, x0 = rng.integers(50, 60, (2, count))
        h, w = rng.integers(5, 60, (2, count))
    else:
        y0, x0 = rng.integers(0, 200, (2, count))
        h, w = rng.integers(0, 40, (2, count))
    boxes = np.stack([y0, x0, y0 + h, x0 + w], axis=1).astype(np.float64)
    if rng.random() < 0.3:
        boxes[rng.integers(count)] = boxes[0]  # a duplicate line
    if rng.random() < 0.2:
        boxes[:, 2:] = boxes[:, :2] + 10  # equal areas: one exemplar
    if rng.random() < 0.3:
        scores = rng.choice([rng.uniform(-0.2, 1.0), 0.9, 0.5], count)  # tied scores
    else:
        scores = rng.uniform(-0.2, 1.0, count)
    return boxes, scores, [int(v) for v in rng.integers(0, 200, 4)]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # duplicate boxes, fewer points
def test_selection_equals_the_oracle_on_random_lines() -> None:
    rng = np.random.default_rng(2)
    seen = dict.fromkeys(["clustered", "few", "inf", "misaligned", "overlaps", "one"], 0)
    for case in range(200):
        boxes, scores, reference = random_lines(rng)
        got, expected = assert_selection_matches_oracle(boxes, scores, reference, case)
        pool = scores[scores > 0] if (scores > 0).any() else scores
        seen["clustered"] += got.clustered
        seen["few"] += len(boxes) < 3
        seen["inf"] += bool(np.isinf(got.scores).any())
        seen["misaligned"] += got.clustered and (pool > 0.8).sum() >= 3 and (pool <= 0.8).any()
        by_size = [[int(v) for v in b["coords"]] for b in oracle_diversity.by_size(expected.scored)]
        seen["overlaps"] += by_size != expected.boxes  # overlap removal changed the tertiles' picks
        seen["one"] += len(got.boxes) == 1
    assert min(seen.values()) >= 5, seen  # every quirk is exercised


def test_an_area_at_the_mean_scores_infinity() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 20, 10, 40], [0, 50, 10, 80]], np.float64)  # areas 100, 200, 300
    got, _ = assert_selection_matches_oracle(boxes, np.array([0.9, 0.9, 0.9]), [0, 0, 10, 10])
    assert 1 in got.lines.tolist() and got.scores[got.lines.tolist().index(1)] == np.inf  # ln|200 - 200| = -inf
    assert "inf" in got.summary()["exemplar_scores"]  # JSON has no infinity: written as a string


def test_equal_areas_give_one_exemplar_first_in_scored_order() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 30, 10, 40], [30, 0, 40, 10], [30, 30, 40, 40]], np.float64)
    got, expected = assert_selection_matches_oracle(boxes, np.array([0.9, 0.95, 0.85, 0.9]), [0, 0, 10, 10])
    assert len(got.boxes) == 1 and got.scores[0] == np.inf  # all "small", all +inf: the first scored box
    assert got.boxes[0].tolist() == [int(v) for v in expected.scored[0]["coords"]]


def test_few_lines_form_one_region_with_similarity_one() -> None:
    """K < 3 never reaches the selection in the pipeline (the header box and the K boxes are used as they are),
    but it is defined as the original's: one region, no KMeans; likewise fewer than 3 boxes scoring > 0."""
    for boxes, scores in [([[0, 0, 10, 20]], [0.9]), ([[0, 0, 10, 20], [5, 5, 9, 9], [0, 0, 4, 4]], [0.9, 0.7, -0.1])]:
        got, _ = assert_selection_matches_oracle(np.array(boxes, np.float64), np.array(scores), [0, 0, 10, 10])
        assert not got.clustered and got.regions == {0: [i for i, s in enumerate(scores) if s > 0]}
    with pytest.raises(ValueError, match="K >= 1"):
        select_exemplars(np.zeros((0, 4)), np.zeros(0), [0, 0, 1, 1], Projection(0))


def test_overlap_removal_refills_by_position_and_re_adds_a_removed_box() -> None:
    a, b, c, d, e = [0, 0, 100, 100], [0, 0, 80, 80], [300, 300, 310, 310], [10, 10, 80, 80], [200, 200, 250, 250]
    coords = np.array([a, b, c, d, e], np.float64)
    weighted = np.array([1.0, 0.9, 5.0, 0.8, 0.1])
    # IoU(a, b) = 0.64 -> b (smaller) goes; IoU(b, d) = 0.77 -> d goes; IoU(a, d) = 0.49 stays. Refill from
    # position 3 (the selection's length): d comes back, then e; c, the best score, is never tried.
    assert _remove_overlaps([0, 1, 3], coords, weighted) == [0, 3, 4]
    entries = [{"coords": [float(v) for v in box], "score": s} for box, s in zip(coords, weighted)]
    assert oracle_diversity.remove_overlaps([entries[i] for i in [0, 1, 3]], entries) == [entries[i] for i in [0, 3, 4]]


def test_refill_skips_a_box_equal_to_a_selected_one() -> None:
    """The original's `in` compares the scored dicts by value: a duplicate line of a selected box is skipped."""
    a, b, e = [0, 0, 100, 100], [0, 0, 80, 80], [200, 200, 250, 250]
    coords = np.array([a, b, a, e], np.float64)
    for weighted, expected in [
        ([1.0, 0.9, 1.0, 0.1], [0, 3]),  # b goes; position 2 equals a: skipped; e added
        # a scored differently, position 2 is added; it covers a exactly (equal areas: the first of the pair, a,
        # goes) and the refill from position 4 finds nothing
        ([1.0, 0.9, 0.7, 0.1], [2, 3]),
    ]:
        assert _remove_overlaps([0, 1], coords, np.array(weighted)) == expected
        entries = [{"coords": [float(v) for v in box], "score": s} for box, s in zip(coords, weighted)]
        assert oracle_diversity.remove_overlaps(entries[:2], entries) == [entries[i] for i in expected]
