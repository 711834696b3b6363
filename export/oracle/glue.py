"""IDM and PPSM written the way the original scripts run them (per contour, per point), for the oracle.

These are the oracle for the vectorised runtime versions; the only departures from the original are
the ones that would crash or produce NaN (documented in persense.runtime.pipeline.idm / ppsm), handled the
same way here so both can be compared on every input.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch


def centroid(contour: np.ndarray) -> tuple[int, int]:
    """The original's contour centroid: moments, +1e-15 in the denominator, int() truncation."""
    moments = cv2.moments(contour)
    return int(moments["m10"] / (moments["m00"] + 1e-15)), int(moments["m01"] / (moments["m00"] + 1e-15))


def idm_points(density: np.ndarray, image_size: tuple[int, int], threshold: int) -> tuple[np.ndarray, int]:
    """Candidate (x, y) points as DSALVANet/utils/PerSense_modules.py:IDM computes them, line by line.

    Returns the (N, 2) points and how many of them (at the front) are children of composite contours.
    A map without contrast (the original's NaN) or without contours gives no points.
    """
    h, w = image_size
    density = cv2.resize(density.astype(np.float32), (w, h))
    low, high = density.min(), density.max()
    if not high > low:
        return np.empty((0, 2)), 0
    density = np.stack(((density - low) / (high - low),) * 3, axis=-1)
    gray = cv2.cvtColor((density * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    binary = cv2.threshold(gray, threshold, 255, cv2.THRESH_BINARY)[1]
    eroded = cv2.erode(binary, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)), iterations=1)
    contours = cv2.findContours(eroded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return np.empty((0, 2)), 0
    areas = [cv2.contourArea(c) for c in contours]
    limit = np.mean(areas) + 2.0 * np.std(areas)
    points = []
    for contour, area in zip(contours, areas):
        if area <= limit:
            continue
        filled = np.zeros_like(gray)
        cv2.drawContours(filled, [contour], -1, (255, 255, 255), thickness=cv2.FILLED)
        dist = cv2.distanceTransform(filled, cv2.DIST_L2, 3)
        peaks = np.uint8(cv2.threshold(dist, 0.5 * dist.max(), 255, cv2.THRESH_BINARY)[1])
        for child in cv2.findContours(peaks, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]:
            points.append(centroid(child))
    children = len(points)
    points.extend(centroid(c) for c in contours)
    return np.array(points, dtype=np.float64).reshape(-1, 2), children


def ppsm_points(
    similarity: torch.Tensor, points: np.ndarray, count: float, boxes: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """Points kept by persense.py:point_prompt_select (one comparison per point, then per box); `boxes`: the
    second detection's float32 xyxy boxes a point must lie in (edges included), None for no box test."""
    max_conf = similarity.max()
    if count == 0:
        return []  # the original divides by zero here: threshold inf, nothing passes
    divisor = math.sqrt(4) if count == 1 else count / math.sqrt(2)
    threshold = max_conf / torch.tensor([divisor], dtype=torch.float32, device=similarity.device)
    kept = []
    for x, y in points:
        pnt = (int(x), int(y))
        if not bool(similarity[pnt[1], pnt[0]] >= threshold):
            continue
        if boxes is None or any(b[0] <= pnt[0] <= b[2] and b[1] <= pnt[1] <= b[3] for b in np.float32(boxes)):
            kept.append(pnt)
    return kept
