"""Dataset runs over a Ray cluster: an actor pool with one engine set per actor, references shared.

Ray is an optional extra (`pip install 'persense[ray]'`), imported only when a run asks for it. The
driver plans the run with the resume rule of `run_dataset` (only images without a prediction), has
one actor encode each class's reference once (the small `Reference` stays in Ray's object store and
every task gets it by reference; the actor looks it up in, and adds it to, the reference cache, which
the workers share when `--cache-dir` is on a shared filesystem), hands image paths to the pool, and writes each
returned union mask atomically itself. One writer: the prediction folder needs no shared filesystem, a worker lost
mid-image leaves nothing behind, and the PNG bytes come from the same code as a single-process run.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from persense.runtime.api import PerSense, Reference
from persense.runtime.backends.table import TABLE
from persense.runtime.datasets.batch import (
    BatchReport,
    ClassJob,
    DensityFor,
    PipelineSpec,
    plan,
    prediction_path,
    progress_bar,
    record_failure,
    segment_file,
)
from persense.runtime.errors import PersenseError
from persense.runtime.imageio import write_image

LOCAL = "local"  # --ray without an address: start a private local Ray instance


class ImageTask(NamedTuple):
    """One image to segment: its class, its file and its optional .npy density map (absolute paths)."""

    name: str
    image: Path
    density: Path | None


class Outcome(NamedTuple):
    """What an actor returns for a task: the union mask, or the user error that stopped it."""

    task: ImageTask
    union: np.ndarray | None
    error: str | None


class SegmentActor:
    """One `PerSense` per Ray actor: engines opened once, then images segmented by path."""

    def __init__(self, spec: PipelineSpec, log_level: int) -> None:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("persense").setLevel(log_level)
        self.ps: PerSense | None = None
        self.error: str | None = None
        try:
            self.ps = spec.open()
        except PersenseError as exc:  # kept for ready(): a creation error would come back as a long traceback
            self.error = str(exc)

    def ready(self) -> str | None:
        """None once the engines are open, else the user error that stopped them."""
        return self.error

    def reference(self, reference: Path, mask: Path) -> Reference:
        """The encoded reference of one class."""
        return self.ps.reference(reference, mask)

    def segment(self, task: ImageTask, reference: Reference) -> Outcome:
        """The union mask of one image (user errors are returned, not raised)."""
        try:
            return Outcome(task, segment_file(self.ps, task.image, reference, task.density), None)
        except PersenseError as exc:
            return Outcome(task, None, str(exc))


def import_ray() -> ModuleType:
    """The ray module, or a user error that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise PersenseError(f"--ray needs Ray: pip install 'persense[ray]' ({exc})") from exc
    return ray


def connect(ray: ModuleType, address: str, workers: int, cpus_per_worker: int) -> None:
    """Start a private local Ray instance sized for the workers, or join the cluster at `address`."""
    if address == LOCAL:
        ray.init(
            address=LOCAL, num_cpus=workers * cpus_per_worker, include_dashboard=False, logging_level=logging.ERROR
        )
    else:
        ray.init(address=address, logging_level=logging.WARNING)


def start_actors(ray: ModuleType, spec: PipelineSpec, workers: int, log_level: int) -> list[Any]:
    """`workers` actors with their engines open, each reserving its threads' CPUs (and a GPU for a GPU backend)."""
    gpus = 1 if spec.backend in TABLE and TABLE[spec.backend].on_gpu else 0  # Ray gives each actor its own GPU
    remote = ray.remote(SegmentActor).options(num_cpus=spec.threads, num_gpus=gpus)
    actors = [remote.remote(spec, log_level) for _ in range(workers)]
    errors = [error for error in ray.get([actor.ready.remote() for actor in actors]) if error]
    if errors:
        raise PersenseError(errors[0])
    return actors


def share_references(ray: ModuleType, actors: list[Any], jobs: list[ClassJob]) -> dict[str, Any]:
    """Per class, an object-store reference to its encoded `Reference`, computed once by one actor of the pool."""
    refs = {job.name: actors[i % len(actors)].reference.remote(job.reference, job.mask) for i, job in enumerate(jobs)}
    get(ray, list(refs.values()))  # surfaces a bad reference pair before any image
    return refs


def get(ray: ModuleType, refs: Any) -> Any:
    """ray.get, re-raising a user error of a worker as the PersenseError it was."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, PersenseError):
            raise exc.cause from None
        raise


def run_dataset_ray(
    data_dir: Path,
    pred_dir: Path,
    spec: PipelineSpec,
    address: str = LOCAL,
    workers: int = 2,
    ref_idx: str = "00",
    density_for: DensityFor | None = None,
    progress: bool = True,
    log_level: int = logging.WARNING,
) -> BatchReport:
    """`run_dataset` over `workers` Ray actors at `address` (`local`: a private instance); same outputs."""
    ray = import_ray()
    data_dir, pred_dir = Path(data_dir).absolute(), Path(pred_dir).absolute()
    jobs, skipped = plan(data_dir, pred_dir, ref_idx)
    report = BatchReport(skipped=skipped)
    if not jobs:
        return report
    cache_dir = None if spec.cache_dir is None else Path(spec.cache_dir).expanduser().absolute()
    spec = replace(spec, engines=Path(spec.engines).absolute(), threads=spec.threads or 1, cache_dir=cache_dir)
    connect(ray, address, workers, spec.threads)
    try:
        actors = start_actors(ray, spec, workers, log_level)
        references = share_references(ray, actors, jobs)
        tasks = [(task_of(job.name, path, density_for), references[job.name]) for job in jobs for path in job.todo]
        pool = ray.util.ActorPool(actors)
        with progress_bar(len(tasks), progress) as bar:
            for outcome in pool.map_unordered(lambda actor, args: actor.segment.remote(*args), tasks):
                store(outcome, pred_dir, report)
                bar.update(1)
    finally:
        ray.shutdown()
    return report


def task_of(name: str, image: Path, density_for: DensityFor | None) -> ImageTask:
    """The task of one image, with absolute paths (workers may start in another folder)."""
    density = Path(density_for(name, image.stem)).absolute() if density_for else None
    return ImageTask(name, image, density)


def store(outcome: Outcome, pred_dir: Path, report: BatchReport) -> None:
    """Write a returned union mask atomically, or record the failure."""
    task = outcome.task
    if outcome.error is not None:
        record_failure(report, task.image, outcome.error)
        return
    write_image(prediction_path(pred_dir, task.name, task.image), outcome.union)
    report.segmented += 1
