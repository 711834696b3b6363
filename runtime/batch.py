"""Running the pipeline over a PerSense-D style dataset: resumable, atomic per image, with progress."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from persense.runtime.counters import Counter, NpyDensityCounter
from persense.runtime.errors import PersenseError
from persense.runtime.evaluate import class_names
from persense.runtime.imageio import read_mask, read_rgb, write_image
from persense.runtime.pipeline import PerSensePipeline

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What a dataset run did: images segmented, images already done (resumed), per-image failures."""

    segmented: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def class_jobs(data_dir: Path, pred_dir: Path, ref_idx: str) -> Iterable[tuple[str, Path, Path, list[Path]]]:
    """Per class: (name, reference image, reference mask, target images whose prediction is still missing).

    Every `NN.jpg` of the class is a target, the reference included, as the original's loop does.
    """
    for name in class_names(data_dir / "Images"):
        folder = data_dir / "Images" / name
        reference, mask = folder / f"{ref_idx}.jpg", folder / f"{ref_idx}.png"
        if not reference.is_file() or not mask.is_file():
            raise PersenseError(f"{folder}: no reference pair {ref_idx}.jpg / {ref_idx}.png")
        todo = [p for p in sorted(folder.glob("*.jpg")) if not (pred_dir / name / f"{p.stem}.png").is_file()]
        yield name, reference, mask, todo


def run_dataset(data_dir: Path, pred_dir: Path, pipeline: PerSensePipeline, ref_idx: str = "00",
                density_for: Callable[[str, str], Path] | None = None, progress: bool = True) -> BatchReport:
    """Segment every image without a prediction yet; each prediction is written atomically when complete.

    `density_for(class, stem)` gives a .npy density map per image (the npy counter); otherwise the
    pipeline's own counter is used. An interrupted run (even kill -9) resumes where it stopped.
    """
    report = BatchReport()
    own_counter: Counter = pipeline.counter
    jobs = list(class_jobs(data_dir, pred_dir, ref_idx))
    report.skipped = count_images(data_dir) - sum(len(todo) for *_, todo in jobs)
    bar = tqdm(total=sum(len(todo) for *_, todo in jobs), unit="image", disable=not progress, file=sys.stderr)
    for name, reference, mask, todo in jobs:
        if not todo:
            continue
        ref_image = read_rgb(reference)
        target = pipeline.reference(ref_image, read_mask(mask, expected_size=ref_image.shape[:2]))
        for path in todo:
            try:
                pipeline.counter = NpyDensityCounter(density_for(name, path.stem)) if density_for else own_counter
                result = pipeline.segment(read_rgb(path), target)
                write_image(pred_dir / name / f"{path.stem}.png", result.union)
                report.segmented += 1
            except PersenseError as exc:
                report.failed[str(path)] = str(exc)
                log.error("%s: %s", path, exc)
            bar.update(1)
    bar.close()
    pipeline.counter = own_counter
    return report


def count_images(data_dir: Path) -> int:
    """Number of target images in the dataset (for the progress bar)."""
    return sum(len(list((data_dir / "Images" / n).glob("*.jpg"))) for n in class_names(data_dir / "Images"))
