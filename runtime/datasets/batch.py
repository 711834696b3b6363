"""Running the pipeline over a PerSense-D style dataset: resumable, atomic per image, with progress."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from persense.runtime.api import PerSense, Reference
from persense.runtime.datasets.evaluate import class_names
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import stale_temporaries, write_image

log = logging.getLogger(__name__)

DensityFor = Callable[[str, str], Path]  # (class, image stem) -> .npy density map


@dataclass(frozen=True)
class PipelineSpec:
    """Everything needed to open a `PerSense` anywhere (a Ray worker included): plain, picklable values."""

    engines: Path
    backend: str = "auto"
    counter: str = "sam"
    threads: int | None = None
    precision: str = "fp32"
    cache_dir: Path | None = None  # reference cache folder (None: the per-user default where it opens)
    cache: bool = True  # False: --no-cache
    method: str = "persense"  # persense or persense++

    def open(self) -> PerSense:
        """Open and verify the engines and the counter, with the reference cache asked for."""
        return PerSense.open(
            self.engines,
            self.backend,
            self.precision,
            self.counter,
            self.threads,
            cache_dir=self.cache_dir,
            cache=self.cache,
            method=self.method,
        )


@dataclass
class BatchReport:
    """What a dataset run did: images segmented, images already done (resumed), per-image failures."""

    segmented: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClassJob:
    """One class of a run: its reference pair and the target images whose prediction is still missing."""

    name: str
    reference: Path
    mask: Path
    todo: list[Path]


def class_jobs(data_dir: Path, pred_dir: Path, ref_idx: str) -> Iterable[ClassJob]:
    """Per class, the reference pair and the targets without a prediction.

    Every `NN.jpg` of the class is a target, the reference included, as the original's loop does.
    """
    for name in class_names(data_dir / "Images"):
        folder = data_dir / "Images" / name
        reference, mask = folder / f"{ref_idx}.jpg", folder / f"{ref_idx}.png"
        if not reference.is_file() or not mask.is_file():
            raise PersenseError(f"{folder}: no reference pair {ref_idx}.jpg / {ref_idx}.png")
        todo = [p for p in sorted(folder.glob("*.jpg")) if not prediction_path(pred_dir, name, p).is_file()]
        yield ClassJob(name, reference, mask, todo)


def plan(data_dir: Path, pred_dir: Path, ref_idx: str) -> tuple[list[ClassJob], int]:
    """The classes with work left, and how many images already have a prediction; stale temp files removed."""
    jobs = list(class_jobs(data_dir, pred_dir, ref_idx))
    for job in jobs:
        remove_stale_temporaries(pred_dir, job)
    skipped = count_images(data_dir) - sum(len(job.todo) for job in jobs)
    return [job for job in jobs if job.todo], skipped


def prediction_path(pred_dir: Path, name: str, image: Path) -> Path:
    """Where the prediction of `image` of class `name` goes."""
    return pred_dir / name / f"{image.stem}.png"


def remove_stale_temporaries(pred_dir: Path, job: ClassJob) -> None:
    """Delete temp files an interrupted run left for images still to do (one run per prediction folder)."""
    for image in job.todo:
        final = prediction_path(pred_dir, job.name, image)
        for stale in stale_temporaries(final):
            stale.unlink(missing_ok=True)


def segment_file(ps: PerSense, image: Path, reference: Reference, density: Path | None) -> np.ndarray:
    """The union mask of one image file, with the .npy density map `density` when given."""
    return ps.segment(image, reference, density=density).union


def progress_bar(total: int, progress: bool) -> tqdm:
    """The per-image progress bar on stderr."""
    return tqdm(total=total, unit="image", disable=not progress, file=sys.stderr)


def run_dataset(
    data_dir: Path,
    pred_dir: Path,
    ps: PerSense,
    ref_idx: str = "00",
    density_for: DensityFor | None = None,
    progress: bool = True,
) -> BatchReport:
    """Segment every image without a prediction yet; each prediction is written atomically when complete.

    `density_for(class, stem)` gives a .npy density map per image (the npy counter); otherwise the
    engines' own counter is used. An interrupted run (even kill -9) resumes where it stopped; an image
    that failed has no prediction, so the next run tries it again.
    """
    jobs, skipped = plan(data_dir, pred_dir, ref_idx)
    report = BatchReport(skipped=skipped)
    with progress_bar(sum(len(job.todo) for job in jobs), progress) as bar:
        for job in jobs:
            reference = ps.reference(job.reference, job.mask)
            for path in job.todo:
                density = density_for(job.name, path.stem) if density_for else None
                try:
                    write_image(prediction_path(pred_dir, job.name, path), segment_file(ps, path, reference, density))
                    report.segmented += 1
                except PersenseError as exc:
                    record_failure(report, path, str(exc))
                bar.update(1)
    return report


def record_failure(report: BatchReport, path: Path, message: str) -> None:
    """Note one image that could not be segmented (persense-eval lists them at the end of the run)."""
    report.failed[str(path)] = message
    log.info("%s: %s", path, message)


def count_images(data_dir: Path) -> int:
    """Number of target images in the dataset (for the progress bar)."""
    return sum(len(list((data_dir / "Images" / n).glob("*.jpg"))) for n in class_names(data_dir / "Images"))
