"""The PerSense++ oracle (export/oracle: hybrid_idm, gating, diversity, imrm, plusplus) against literal statements
of persense++.py's rules (SPEC-PLUSPLUS §2-§6) on constructed cases, and one end-to-end run on the tiny SAM."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage.feature import peak_local_max
from sklearn.cluster import KMeans

from persense.export.features.resnet import build_resnet
from persense.export.oracle import diversity, gating, hybrid_idm, imrm
from persense.export.oracle.plusplus import DECODE_BATCH, OraclePlusPlus
from persense.runtime.counters.base import NpyDensityCounter


def gaussian(shape: tuple[int, int], centres: list[tuple[int, int]], sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) for cx, cy in centres)


def to_gray(density: np.ndarray) -> np.ndarray:
    return (density / density.max() * 255).astype(np.uint8)


# --- hybrid IDM (§2) ---------------------------------------------------------------------------------------


def test_touching_blobs_are_separated_by_the_peak_part_only():
    gray = to_gray(gaussian((80, 120), [(50, 40), (72, 40)], 8))
    children, centroids = hybrid_idm.contour_points(gray, 30)
    assert children == [] and centroids == [(61, 40)]  # one contour above 30: one centroid between the blobs
    assert hybrid_idm.peak_points(gray) == [(51, 40), (71, 40)]  # (x=col, y=row) of the two maxima
    assert sorted(hybrid_idm.hybrid_points(gray, 30)) == [(51, 40), (61, 40), (71, 40)]  # both parts, no duplicates


def test_a_composite_contour_is_split_by_the_distance_transform():
    gray = np.zeros((200, 300), np.uint8)
    for i in range(8):  # small contours keep the mean + 2 std area limit below the dumbbell's area
        cv2.circle(gray, (20 + 35 * i, 20), 6, 200, -1)
    cv2.circle(gray, (80, 130), 30, 200, -1)
    cv2.circle(gray, (150, 130), 30, 200, -1)
    cv2.rectangle(gray, (80, 126), (150, 134), 200, -1)  # a thin bridge: distance < 0.5 max there
    children, centroids = hybrid_idm.contour_points(gray, 30)
    assert sorted(children) == [(80, 130), (149, 130)]  # the two discs' centres (int-truncated moments)
    assert len(centroids) == 9 and (115, 130) in centroids  # every contour's centroid, the composite one too
    points = hybrid_idm.hybrid_points(gray, 30)
    assert set(points) >= {(80, 130), (149, 130), (115, 130)} and len(points) == len(set(points))


def test_points_come_in_the_original_sets_iteration_order():
    gray = to_gray(gaussian((120, 160), [(20, 30), (70, 25), (130, 40), (40, 90), (100, 95), (140, 100), (61, 60)], 5))
    # the original, literally: a set, composite children, then every centroid, then peaks as numpy ints
    children, centroids = hybrid_idm.contour_points(gray, 30)
    coord_set = set()
    for point in children + centroids:
        coord_set.add(point)
    for y, x in peak_local_max(gray, min_distance=5, threshold_abs=gray.mean() + 2 * gray.std()):
        coord_set.add((x, y))
    points = hybrid_idm.hybrid_points(gray, 30)
    assert points == [(int(x), int(y)) for x, y in coord_set]
    # pinned: neither sorted nor the insertion order
    assert points == [(20, 30), (140, 100), (70, 25), (40, 90), (130, 40), (100, 95), (61, 60)]
    assert centroids[0] == (140, 100)


def test_idm_thresholds_inputs_and_a_flat_map():
    gray = np.zeros((60, 60), np.uint8)
    cv2.circle(gray, (30, 30), 8, 25, -1)  # above CounTR's 20, below DSALVANet's 30
    gray[0, 0] = 255  # only for the peak part
    assert hybrid_idm.contour_points(gray, hybrid_idm.DSALVANET_THRESHOLD)[1] == []
    assert hybrid_idm.contour_points(gray, hybrid_idm.COUNTR_THRESHOLD)[1] == [(30, 30)]
    rgb = np.repeat(gray[..., None] / 255.0, 3, axis=2)
    assert np.array_equal(hybrid_idm.countr_gray(rgb), gray)
    assert hybrid_idm.hybrid_idm(np.ones((8, 8)), (32, 32), 30) == []  # no contrast: no points (original: NaN)
    small = np.zeros((16, 16), np.float32)
    small[8, 8] = 1.0
    gray = hybrid_idm.dsalvanet_gray(small, (64, 48))  # resized to (W=48, H=64), min-max, truncating x255
    assert gray.shape == (64, 48) and gray.max() == 255 and gray.min() == 0


# --- gating (§3) -------------------------------------------------------------------------------------------


def test_gating_is_inclusive_order_preserving_and_falls_back():
    boxes = np.array([[10, 20, 30, 40], [50.5, 0, 60, 10]], dtype=np.float32)
    points = [(30, 40), (10, 20), (31, 40), (50, 5), (51, 5), (20, 19)]
    assert gating.gate(points, boxes) == [(30, 40), (10, 20), (51, 5)]  # edges kept; 50 < 50.5 is outside
    assert gating.gate_or_all(points, boxes)[1] is False
    assert gating.gate_or_all(points, np.zeros((0, 4))) == (points, True)  # no boxes: nothing kept -> all
    assert gating.gate_or_all([(0, 0)], boxes) == ([(0, 0)], True)
    assert gating.gate_or_all(points, None) == (points, False)  # no second detection: no gating


# --- diversity (§4) ----------------------------------------------------------------------------------------


def coord_features(boxes: list[list[int]]) -> np.ndarray:
    """A stand-in for the RoI features: the box itself (what KMeans and cosine similarity see)."""
    return np.array([[b[0] + 1, b[1] + 2, b[2] + 3, b[3] + 4] for b in boxes], dtype=np.float32)


def entry(coords: list[float], score: float) -> dict:
    return {"coords": [float(v) for v in coords], "score": score}


def test_log_of_zero_gives_an_infinite_score():
    boxes = [[0, 0, 10, 10], [0, 20, 10, 40], [0, 50, 10, 80]]  # areas 100, 200, 300: mean 200
    result = diversity.select_exemplars(boxes, [0.9, 0.9, 0.9], [0, 0, 10, 10], coord_features)
    scores = {tuple(b["coords"]): b["score"] for b in result.scored}
    assert scores[(0.0, 20.0, 10.0, 40.0)] == np.inf
    assert np.isfinite(scores[(0.0, 0.0, 10.0, 10.0)]) and np.isfinite(scores[(0.0, 50.0, 10.0, 80.0)])
    assert result.clustered and [0, 20, 10, 40] in result.boxes
    assert any(line.endswith(" inf\n") for line in result.lines())


def test_equal_areas_give_one_exemplar():
    boxes = [[0, 0, 10, 10], [0, 30, 10, 40], [30, 0, 40, 10], [30, 30, 40, 40]]
    result = diversity.select_exemplars(boxes, [0.9, 0.95, 0.85, 0.9], [0, 0, 10, 10], coord_features)
    assert len(result.boxes) == 1  # every area <= p33: all "small"; every score +inf: the first in list order
    assert result.boxes[0] == [int(v) for v in result.scored[0]["coords"]]


def test_similarities_are_misaligned_after_the_high_scorer_filter():
    regions = {0: [entry([0, 0, 10, 10], 0.5), entry([0, 20, 10, 30], 0.9), entry([20, 0, 30, 10], 0.9)]}
    regions[1] = [entry([20, 20, 30, 30], 0.9)]
    chosen = diversity.high_scorers(regions)
    assert [len(v) for v in chosen.values()] == [2, 1]
    similarities = {0: [0.0, 1.0, 0.5], 1: [1.0]}

    def same(boxes):  # every feature equal: cosine with the reference is 1
        return np.ones((len(boxes), 4), dtype=np.float32)

    scored = diversity.weighted_scores(chosen, similarities, [0, 0, 10, 10], same, mean_area=101.0, mean_aspect=1.0)
    # |100 - 101| = 1 -> ln 1 = 0; aspect deviation 0; the box at filtered index 0 takes similarities[0][0] = 0.0
    assert [b["score"] for b in scored] == [0.25 * 0.0 + 0.25, 0.25 * 1.0 + 0.25, 0.25 * 1.0 + 0.25]
    few = {0: [entry([0, 0, 10, 10], 0.9), entry([0, 20, 10, 30], 0.5)], 1: [entry([20, 20, 30, 30], 0.7)]}
    assert diversity.high_scorers(few) is few  # fewer than 3 high scorers: the unfiltered regions


def test_overlap_removal_refills_by_position_and_re_adds_a_removed_box():
    a, b, c = entry([0, 0, 100, 100], 1.0), entry([0, 0, 80, 80], 0.9), entry([300, 300, 310, 310], 5.0)
    d, e = entry([10, 10, 80, 80], 0.8), entry([200, 200, 250, 250], 0.1)
    # IoU(a, b) = 0.64 -> b (smaller) goes; IoU(b, d) = 0.77 -> d goes; IoU(a, d) = 0.49 stays
    assert diversity.box_iou(a["coords"], d["coords"])[0] == 0.49
    result = diversity.remove_overlaps([a, b, d], [a, b, c, d, e])
    # refill from position 3 (len of the selection): d comes back, then e; c (the best score) is never tried
    assert result == [a, d, e]


def test_cluster_takes_score_positive_boxes_and_zero_sides():
    entries = [entry([0, 0, 10, 20], 0.9), entry([0, 0, 0, 5], 0.9), entry([0, 0, 4, 4], -0.1)]
    regions, sims, clustered, mean_area, mean_aspect = diversity.cluster(entries, coord_features)
    assert not clustered and regions == {0: entries[:2]} and sims == {0: [1, 1]}  # < 3 boxes with score > 0
    assert mean_area == 100.0 and mean_aspect == (2.0 + 5.0) / 2  # zero side counted as 1 (original: raises)


def test_roi_align_on_a_hand_computed_map():
    feature = torch.tensor([[10.0 * y + x for x in range(4)] for y in range(4)]).reshape(1, 1, 4, 4)
    rois = torch.tensor(
        [
            [0, 0, 0, 2, 2],  # samples at 0.5 and 1.5 on each axis: bilinear of 10y + x -> 10 + 1
            [0, -4, -4, -2, -2],  # every sample below -1: 0
            [0, 3, 3, 5, 5],  # 3.5 clamps to row/col 3; 4.5 > 4 is outside: 33 / 4
            [0, 1, 1, 1, 1],  # size max(0, 1) = 1: samples at 1.25, 1.75 -> 15 + 1.5
        ]
    )
    out = diversity.roi_align(feature, rois, output_size=1, spatial_scale=1.0, sampling_ratio=2)
    assert out.flatten().tolist() == [11.0, 0.0, 8.25, 16.5]
    out = diversity.roi_align(feature, torch.tensor([[0.0, 0, 0, 6, 6]]), output_size=3, spatial_scale=0.5)
    # scale 0.5: ROI 0..3, bins of 1, samples at 0.25 and 0.75 inside each: bin (i, j) = 10 (i + .5) + (j + .5)
    assert torch.allclose(out[0, 0], torch.tensor([[10.0 * (i + 0.5) + j + 0.5 for j in range(3)] for i in range(3)]))


def test_resnet_has_torchvisions_state_dict_layout():
    resnet = build_resnet(seed=1)
    state = resnet.state_dict()
    # 53 convolutions (1 + 16 blocks x 3 + 4 downsample) + 53 BatchNorms x 5 tensors + fc weight, bias = 320
    assert len(state) == 53 + 53 * 5 + 2 == 320
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer2.3.conv2.weight",
        "layer3.5.bn3.bias",
        "layer4.0.downsample.1.weight",
        "layer4.2.conv3.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in state
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1) and state["fc.weight"].shape == (1000, 2048)
    assert not any(k.startswith("layer4.1.downsample") for k in state)
    old_file = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 files
    loaded = build_resnet(old_file, seed=2).state_dict()
    assert torch.equal(loaded["layer3.5.bn3.bias"], state["layer3.5.bn3.bias"])
    with pytest.raises(Exception, match="not a torchvision ResNet-50"):
        build_resnet({"conv1.weight": state["conv1.weight"]})
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3)).astype(np.uint8)
    features = diversity.RoiFeatures(resnet, image)
    assert features.feature_map.shape == (1, 2048, 7, 7)
    vectors = features([[0, 0, 89, 119], [10, 20, 30, 40]])
    assert vectors.shape == (2, 2048) and vectors.dtype == np.float32 and (vectors >= 0).all()  # after ReLU


# --- IMRM (§6) ---------------------------------------------------------------------------------------------


def square(size: int, y: int, x: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y : y + side, x : x + side] = True
    return mask


def test_imrm_rescues_an_outlier_with_an_independent_box_and_drops_another():
    masks = [square(300, 200 + 12 * (i // 4), 12 * (i % 4), 10) for i in range(8)]  # 8 x area 100
    masks += [square(300, 0, 0, 60), square(300, 100, 100, 60)]  # two outliers, area 3600
    detections = np.array(
        [[0, 0, 59, 59], [0, 200, 30, 230], [0, 0, 299, 299]], dtype=np.float32
    )  # xyxy; the last contains the others: not independent
    result = imrm.imrm(masks, detections)
    # majority: the 8 small areas, mu 100, sigma 0; q1 = q3 = 100, IQR 0: threshold (100 + 0) + (100 + 0)
    assert result.threshold == 200.0
    assert result.independent_boxes == [[0, 0, 59, 59], [200, 0, 230, 30]]
    assert result.kept == [True] * 8 + [True, False]  # IoU 1.0 with [0, 0, 59, 59]; the other has none >= 0.8
    assert "rescued" in result.reasons[8] and "rejected" in result.reasons[9]
    assert imrm.imrm(masks, detections[:1]).kept == [True] * 8 + [False, False]  # one box: no independent boxes


def test_imrm_count_tie_takes_label_zero():
    masks = [square(100, 0, 0, 10), square(100, 20, 20, 10), square(100, 0, 50, 30), square(100, 50, 0, 31)]
    result = imrm.imrm(masks, None)
    areas = np.array([100, 100, 900, 961], dtype=np.float32).reshape(-1, 1)
    labels = KMeans(n_clusters=2, random_state=0, n_init=10).fit(areas).labels_
    assert result.majority == 0 and np.bincount(labels).tolist() == [2, 2]
    majority = areas[labels == 0].flatten()
    q1, q3 = np.percentile(areas.flatten(), [25, 75])
    assert result.threshold == pytest.approx((majority.mean() + 2 * majority.std()) + (q3 + 2 * (q3 - q1)))


# --- end to end (§1, §5) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tiny_sam, scene):
    return OraclePlusPlus(tiny_sam, NpyDensityCounter.from_array(scene["density"]), resnet_seed=0)


# the random tiny SAM gives identical feedback boxes: KMeans(3) finds 2 distinct clusters and says so
@pytest.mark.filterwarnings("ignore:Number of distinct clusters:sklearn.exceptions.ConvergenceWarning")
def test_end_to_end_with_diversity_selection(oracle, scene):
    height, width = scene["image"].shape[:2]
    target = oracle.reference(scene["image"], scene["reference"] > 0)
    detections = np.concatenate([scene["centres"] - 20, scene["centres"] + 20], axis=1).astype(np.float32)
    result = oracle.segment(scene["image"], target, detections=detections)
    assert result.union.shape == (height, width) and result.union.dtype == np.uint8
    assert set(np.unique(result.union)) <= {0, 255}
    for points in (result.first_idm_points, result.second_idm_points):
        assert points and len(set(points)) == len(points)
        assert all(0 <= x < width and 0 <= y < height for x, y in points)
    assert len(result.feedback_lines) >= 3 and result.diversity is not None  # K >= 3: diversity selection
    assert 1 <= len(result.diversity.boxes) <= 3 and len(result.exemplars) == len(result.diversity.boxes)
    n = len(result.points)
    assert result.imrm is not None and len(result.imrm.kept) == len(result.imrm.reasons) == n == len(result.kept)
    assert len(result.imrm.independent_boxes) == len(detections)
    first = result.first_pass_points
    assert result.decoder_prompts == 3 + 2 * first + n
    batches = -(-first // DECODE_BATCH) * 2 + -(-n // DECODE_BATCH)
    assert result.decoder_launches == 3 + batches


def test_end_to_end_few_feedback_lines_keep_the_cascade_box(oracle, scene):
    target = oracle.reference(scene["image"], scene["reference"] > 0)
    cx, cy = scene["centres"][5]
    gate = np.array([[cx - 20, cy - 20, cx + 20, cy + 20]], dtype=np.float32)  # one disc: <= 2 points
    result = oracle.segment(scene["image"], target, gating_boxes=gate)
    k = len(result.feedback_lines)
    assert 1 <= k < 3 and result.diversity is None
    header = [int(v) for v in result.header_line.split()[:4]]  # y0 x0 y1 x1
    assert result.exemplars.shape == (1 + k, 4)
    assert result.exemplars[0].tolist() == [header[1], header[0], header[3], header[2]]
    for row, line in zip(result.exemplars[1:], result.feedback_lines):
        y0, x0, y1, x1 = (int(v) for v in line.split()[:4])
        assert row.tolist() == [x0, y0, x1, y1]  # point order, unsorted
    assert all(abs(x - cx) <= 20 and abs(y - cy) <= 20 for x, y in result.points)
