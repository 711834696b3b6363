"""mIoU over a PerSense-D style dataset, computed exactly as the original `eval_miou.py`.

What is reproduced (docs/ALGORITHM.md §8):
- classes are the sorted sub-folders of `data/Images` whose names do not contain ".DS"
  (plain files there are ignored; the original would have counted them as empty classes);
- ground truth = sorted `rglob("*.png")` of the class folder (the reference mask included),
  predictions = sorted `rglob("*.png")` of `pred/<class>`, paired by sorted position (`zip`);
- a pair is skipped when `ref_idx` occurs anywhere in the ground-truth path. The path is taken
  relative to the data folder (`Images/<class>/...`): the original matched `./data/Images/...`,
  the same thing with its default prefix, while an absolute prefix such as `/runs/2400/` would
  otherwise skip every file;
- masks are `BGR2GRAY(imread(path)) > 0`; shapes must match; class IoU = ΣI / (ΣU + 1e-10);
  mIoU = unweighted mean over classes, both reported ×100 like the original prints them.

What is added: warnings (never a change of the result) when `zip` truncates unequal lists, when
position pairs files with different names, when a non-reference file is skipped because `ref_idx`
occurs elsewhere in its path, and when a class has no prediction folder or no evaluated pair.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.imageio import read_raw
from persense.runtime.metrics import summed_iou


@dataclass(frozen=True)
class ClassResult:
    """IoU of one class (percent) with its image-pair count and pixel sums."""

    iou: float
    images: int
    intersection: int
    union: int


@dataclass(frozen=True)
class EvalResult:
    """mIoU (percent), per-class results and the warnings raised while computing them."""

    miou: float
    classes: dict[str, ClassResult]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        """The JSON report: {"miou", "classes": {name: {"iou", "images", "intersection", "union"}}, "warnings"}."""
        return {
            "miou": self.miou,
            "classes": {name: asdict(r) for name, r in self.classes.items()},
            "warnings": list(self.warnings),
        }


def read_eval_mask(path: Path) -> np.ndarray:
    """A mask as the original reads it: gray(imread(path, colour)) > 0, as an HxW bool array."""
    return cv2.cvtColor(read_raw(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY) > 0


def class_names(images_dir: Path) -> list[str]:
    """Sorted class folder names under `images_dir`, skipping names that contain ".DS"."""
    return sorted(e.name for e in os.scandir(images_dir) if e.is_dir() and ".DS" not in e.name)


def _pngs(folder: Path) -> list[Path]:
    """Sorted `*.png` files anywhere under `folder` (none when it does not exist)."""
    return sorted(p for p in folder.rglob("*.png") if p.is_file())


def _pair_counts(gt: Path, pred: Path) -> tuple[int, int]:
    """Intersection and union pixel counts of one ground-truth / prediction pair."""
    gt_mask, pred_mask = read_eval_mask(gt), read_eval_mask(pred)
    if gt_mask.shape != pred_mask.shape:
        raise PersenseError(
            f"size mismatch: ground truth {gt} is {gt_mask.shape[1]}x{gt_mask.shape[0]} but prediction "
            f"{pred} is {pred_mask.shape[1]}x{pred_mask.shape[0]}; predictions must have the image's size"
        )
    return int(np.count_nonzero(gt_mask & pred_mask)), int(np.count_nonzero(gt_mask | pred_mask))


def _listing(items: list[str], limit: int = 3) -> str:
    """A short comma-separated list for a warning."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def evaluate_class(data_dir: Path, pred_dir: Path, name: str, ref_idx: str = "00") -> tuple[ClassResult, list[str]]:
    """IoU of one class and the warnings about its pairing."""
    gt_class, pred_class = data_dir / "Images" / name, pred_dir / name
    gts, preds = _pngs(gt_class), _pngs(pred_class)
    warnings: list[str] = []
    if not pred_class.is_dir():
        warnings.append(f"{name}: no prediction folder {pred_class}")
    elif len(gts) != len(preds):
        warnings.append(
            f"{name}: {len(gts)} ground-truth masks but {len(preds)} predictions; pairing by "
            f"sorted position stops after {min(len(gts), len(preds))} (as eval_miou.py's zip)"
        )
    intersection = union = images = 0
    odd_skips: list[str] = []
    renamed: list[str] = []
    for gt, pred in zip(gts, preds):
        gt_path = gt.relative_to(data_dir).as_posix()
        if ref_idx in gt_path:
            if gt.stem != ref_idx:
                odd_skips.append(gt_path)
            continue
        if gt.relative_to(gt_class) != pred.relative_to(pred_class):
            renamed.append(f"{gt.relative_to(gt_class)} <-> {pred.relative_to(pred_class)}")
        pair_i, pair_u = _pair_counts(gt, pred)
        intersection, union, images = intersection + pair_i, union + pair_u, images + 1
    if odd_skips:
        warnings.append(
            f"{name}: skipped non-reference ground truth because '{ref_idx}' occurs in its path "
            f"(as eval_miou.py does): {_listing(odd_skips)}"
        )
    if renamed:
        warnings.append(
            f"{name}: {len(renamed)} pairs join files of different names by sorted position: {_listing(renamed)}"
        )
    if images == 0:
        warnings.append(f"{name}: no image pair evaluated; its IoU is 0 and still counts in the mean")
    result = ClassResult(
        iou=100 * summed_iou(intersection, union), images=images, intersection=intersection, union=union
    )
    return result, warnings


def miou(data_dir: Path, pred_dir: Path, ref_idx: str = "00") -> EvalResult:
    """mIoU of the predictions in `pred_dir/<class>` against `data_dir/Images/<class>`, as eval_miou.py."""
    data_dir, pred_dir = Path(data_dir), Path(pred_dir)
    images_dir = data_dir / "Images"
    if not images_dir.is_dir():
        raise PersenseError(
            f"{images_dir}: no such folder; --data must hold Images/<class>/NN.png "
            "(pass the parent of the Images folder)"
        )
    if not pred_dir.is_dir():
        raise PersenseError(f"{pred_dir}: no such prediction folder")
    names = class_names(images_dir)
    if not names:
        raise PersenseError(f"{images_dir}: no class folders")
    classes: dict[str, ClassResult] = {}
    warnings: list[str] = []
    for name in names:
        classes[name], class_warnings = evaluate_class(data_dir, pred_dir, name, ref_idx)
        warnings += class_warnings
    mean = 100 * sum(summed_iou(r.intersection, r.union) for r in classes.values()) / len(classes)
    return EvalResult(miou=mean, classes=classes, warnings=warnings)
