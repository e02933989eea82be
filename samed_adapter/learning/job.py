"""A learning job: a new version of an adapter from a datastore's ``final`` labels, served only if it is better.

:class:`LearningJob` takes the adapter's serving version (or adopts the catalog's file as version
1), splits the datastore's final items by a seed into training and held-out images (the held-out
ones are never trained on), checks every label against its image and the adapter's classes,
fine-tunes on Ray Train (:func:`samed_adapter.training.ray_job.fine_tune`), scores the current
and the new version on the held-out images with the labels `segment` gives, checks that no item
changed meanwhile, and records the new version (:meth:`VersionStore.add`) with its figures and
lineage, serving only if its held-out mean Dice is at least the current one's less ``threshold``
and the version it was compared with still serves (an admin's rollback meanwhile wins).

Nothing is written as a version until that last step, which is atomic: a job stopped, failed or
killed half-way leaves the versions as they were, and every job trains in its own fresh folder
(``<versions>/.jobs/NAME/<id>``, removed when the job ends).
"""

from __future__ import annotations

import fcntl
import math
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..adapter_file.adapter import Adapter
from ..datastore import FINAL, Item, check_label, check_unchanged, record
from ..io.volumes import read_image
from ..training.config import TrainConfig
from ..training.data import split_cases
from ..training.ray_job import ENGINES, FineTuneSpec, fine_tune
from .versions import Version, VersionStore

__all__ = ["JOBS_FOLDER", "JobOptions", "JobResult", "JobState", "LearningJob", "LearningJobError",
           "ParentMissingError", "TooFewItemsError", "claim_folder", "remove_killed"]

PathLike = Union[str, os.PathLike]
#: the folder under the versions root where jobs train (one fresh folder per job)
JOBS_FOLDER = ".jobs"
#: the file in a job's folder that the job holds locked while it runs (free: the job was killed)
RUNNING = ".running"
#: a job folder whose lock file is missing or free and this old (seconds) was left by a killed job;
#: a younger one may belong to a job starting at this moment, between making the file and locking it
UNLOCKED_GRACE_S = 60.0


class LearningJobError(ValueError):
    """A learning job was refused before it trained; the message says why and what to do."""


class TooFewItemsError(LearningJobError):
    """Fewer final labels than one held-out image plus one to train on."""


class ParentMissingError(LearningJobError):
    """The adapter to start from has no file (neither a serving version nor the catalog's file)."""


@dataclass(frozen=True)
class JobOptions:
    """What a learning job does (MONAI Label's train ``params`` map onto these: see :meth:`from_params`).

    Attributes:
        epochs: training epochs over the training images' slices.
        holdout: fraction of the final-labelled images held out (at least one, never trained on).
        seed: fixes the split (and the training's data order and augmentation).
        threshold: Dice points (percent) the new version's held-out mean Dice may be below the
            current one's and still serve (0: not lower; negative: must be better by that much).
        workers: Ray Train workers (DistributedDataParallel when more than one).
        device: ``cpu`` or ``cuda`` (one GPU per worker on Ray).
        batch_size, base_lr, warmup_iters: the training schedule (``training.config.TrainConfig``).
        engine: ``ray`` (Ray Train's TorchTrainer) or ``local`` (this process, one worker).
        cpus: CPUs each Ray Train worker reserves (its torch threads).
        gpus: with ``device="cuda"``, the GPU each worker reserves (a fraction shares one with the
            serving replicas; workers no node can hold wait for one).
    """

    epochs: int = 10
    holdout: float = 0.2
    seed: int = 0
    threshold: float = 0.0
    workers: int = 1
    device: str = "cpu"
    batch_size: int = 8
    base_lr: float = 0.005
    warmup_iters: int = 10
    engine: str = "ray"
    cpus: float = 1.0
    gpus: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "workers", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LearningJobError(f"{name} must be a whole number of at least 1, got {value!r}")
        if isinstance(self.warmup_iters, bool) or not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise LearningJobError(f"warmup_iters must be a whole number of at least 0, got {self.warmup_iters!r}")
        if not isinstance(self.holdout, (int, float)) or not 0.0 < self.holdout < 1.0:
            raise LearningJobError(f"holdout must be a fraction between 0 and 1 (e.g. 0.2), got {self.holdout!r}")
        for name in ("threshold", "base_lr", "cpus", "gpus"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                raise LearningJobError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not self.base_lr > 0 or self.cpus < 0 or not 0 < self.gpus <= 1:
            raise LearningJobError(f"base_lr must be above 0, cpus at least 0 and gpus in (0, 1], got "
                                   f"{self.base_lr!r}, {self.cpus!r}, {self.gpus!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise LearningJobError(f"device must be cpu or cuda, got {self.device!r}")
        if self.engine not in ENGINES:
            raise LearningJobError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "local" and self.workers != 1:
            raise LearningJobError("the local engine trains with one worker; use engine=ray for several")

    @classmethod
    def from_params(cls, params: dict[str, Any], **defaults: Any) -> "JobOptions":
        """Options from a request's JSON ``params`` (MONAI Label's ``max_epochs`` is ``epochs``);
        keys this job does not know (MONAI Label's ``client_id``, ...) are ignored."""
        known = {f for f in cls.__dataclass_fields__ if f != "engine"}
        values = {**defaults}
        for key, value in params.items():
            key = "epochs" if key == "max_epochs" else key
            if key in known:
                values[key] = value
        return cls(**values)


@dataclass(frozen=True)
class _Plan:
    """What :meth:`LearningJob.prepare` found: the version to start from (None: the catalog's file),
    its adapter, the split, and the checksums of every item as they were read."""

    parent: Optional[Version]
    adapter: Adapter
    train: list[Item]
    holdout: list[Item]
    seen: dict[str, tuple[str, str]]


@dataclass(frozen=True)
class JobResult:
    """What a job made: the version recorded (None when stopped) and whether it serves."""

    version: Optional[Version]
    serving: bool
    figures: dict[str, Any]
    stopped: bool = False


@dataclass
class JobState:
    """A job's state and progress, safe to read from another thread while it runs (:meth:`to_dict`)."""

    adapter: str
    epochs: int
    status: str = "RUNNING"  # MONAI Label's words: RUNNING, DONE, STOPPED, ERROR
    phase: str = "checking"  # checking, training (scoring included), stopping, saving, then the status
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None
    progress: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record from the workers (loss; validation Dice as a fraction, given in percent here)."""
        entry = {"epoch": record["epoch"]}
        if "loss" in record:
            entry["loss"] = record["loss"]
        if record.get("val_mean_dice") is not None:
            entry["holdout_dice"] = 100.0 * record["val_mean_dice"]
        with self._lock:
            self.phase = "stopping" if self.phase == "stopping" else "training"
            self.progress = [p for p in self.progress if p["epoch"] != entry["epoch"]] + [entry]
            self.progress.sort(key=lambda p: p["epoch"])

    def set(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``GET /train/{model}`` answers (MONAI Label's ``status``/``start_ts`` keys too)."""
        with self._lock:
            last = self.progress[-1] if self.progress else {}
            return {"adapter": self.adapter, "status": self.status, "phase": self.phase,
                    "start_ts": self.started, "end_ts": self.finished,
                    "epoch": last.get("epoch", 0), "total_epochs": self.epochs, "loss": last.get("loss"),
                    "holdout_dice": last.get("holdout_dice"), "progress": [dict(p) for p in self.progress],
                    "result": dict(self.result), "error": self.error}


class LearningJob:
    """One run from a datastore's final labels to a recorded version of adapter ``name``.

    Args:
        datastore: a :class:`~samed_adapter.datastore.FolderDatastore` (``training_items()``).
        versions: where the adapter's versions are kept.
        name: the adapter.
        sam: how the workers get the stock SAM (:class:`~samed_adapter.segment.pipeline.SamSource`).
        options: see :class:`JobOptions`.
        catalog_file: the adapter's file as the server or command line was given it, adopted as
            version 1 when no version is recorded yet.
        work_root: where jobs train (default ``<versions root>/.jobs``).
    """

    def __init__(self, datastore: Any, versions: VersionStore, name: str, sam: Any,
                 options: JobOptions = JobOptions(), *, catalog_file: Optional[PathLike] = None,
                 work_root: Optional[PathLike] = None) -> None:
        self.datastore, self.versions, self.name, self.sam, self.options = datastore, versions, name, sam, options
        self.catalog_file = None if catalog_file is None else Path(catalog_file)
        self.work_root = Path(work_root) if work_root is not None else versions.root / JOBS_FOLDER
        self.state = JobState(name, options.epochs)
        self._stop = threading.Event()
        self._plan: Optional[_Plan] = None

    def stop(self) -> None:
        """Ask the job to stop (it ends at the next slice or epoch; nothing is recorded)."""
        self._stop.set()
        if self.state.status == "RUNNING":
            self.state.set(phase="stopping")

    def prepare(self) -> "_Plan":
        """The checks a job makes before it trains, made once (a server runs them before it answers the
        request): the adapter to start from, the split, every label, and the items' checksums.

        Raises:
            EmptyDatastoreError, TooFewItemsError, ParentMissingError, LabelClassError,
            LabelGridError, VersionFileError: refused (nothing written).
        """
        if self._plan is None:
            parent = self.versions.serving(self.name)  # None: the catalog's file, adopted once a version is made
            adapter = self.versions.load(self.name, parent.version) if parent else self._catalog_adapter()
            items = self.datastore.training_items()
            train, holdout = self.split(items)
            self.check_labels(items, adapter)
            # What it trains and scores on, hashed before the workers read them.
            self._plan = _Plan(parent, adapter, train, holdout, record(items))
        return self._plan

    def run(self) -> JobResult:
        """Run the job to its end (preparing it first if :meth:`prepare` was not called); the state
        says how it went.

        Raises:
            what :meth:`prepare` raises (nothing written);
            DatastoreChangedError: an item changed while it trained (no version recorded);
            FineTuneError: the training failed on a worker, or Ray Train did.
        """
        try:
            result = self._run(self.prepare())
        except BaseException as err:
            self.state.set(status="ERROR", phase="ERROR", error=str(err).splitlines()[0] if str(err) else
                           type(err).__name__, finished=time.time())
            raise
        status = "STOPPED" if result.stopped else "DONE"
        self.state.set(status=status, phase=status, finished=time.time(), result=_public(result))
        return result

    def _run(self, plan: "_Plan") -> JobResult:
        jobs = self.work_root / self.name
        remove_killed(jobs)
        folder = jobs / f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        running = claim_folder(folder)
        try:
            self.state.set(phase="training")
            parent_file = plan.parent.path if plan.parent else self.catalog_file
            run = fine_tune(self._spec(parent_file, plan.train, plan.holdout, folder / "train"),
                            engine=self.options.engine, num_workers=self.options.workers,
                            use_gpu=self.options.device.startswith("cuda") and self.options.engine == "ray",
                            cpus_per_worker=self.options.cpus, gpus_per_worker=self.options.gpus,
                            on_epoch=self.state.epoch,
                            should_stop=self._stop.is_set)
            if run.stopped:
                return JobResult(None, False, {}, stopped=True)
            self.state.set(phase="saving")
            check_unchanged(self.datastore, plan.seen)  # DatastoreChangedError: nothing is recorded
            figures = self._figures(run, len(plan.train), len(plan.holdout))
            current, new = figures["holdout_dice"]["current"], figures["holdout_dice"]["new"]
            serve = current is not None and new is not None and new >= current - self.options.threshold
            parent = plan.parent or self._adopt(plan.adapter)
            version = self.versions.add(
                self.name, Adapter.load(run.adapter), parent=parent.version, figures=figures,
                items=[{"image": i.image_id, "image_checksum": plan.seen[i.image_id][0],
                        "label_checksum": plan.seen[i.image_id][1]} for i in plan.train],
                holdout=[i.image_id for i in plan.holdout], serve=serve, datastore=str(self.datastore.root))
            return JobResult(version, version.serving, figures)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            os.close(running)

    def _catalog_adapter(self) -> Adapter:
        """The catalog's file's adapter (no version recorded yet).

        Raises:
            ParentMissingError: there is no catalog file to start from.
        """
        if self.catalog_file is None or not self.catalog_file.is_file():
            where = f" (no file at {self.catalog_file})" if self.catalog_file is not None else ""
            raise ParentMissingError(f"adapter {self.name!r} has no version to start from{where}: serve or pass "
                                     f"its file (--adapter {self.name}=FILE, or a file {self.name}.safetensors in "
                                     "--adapters FOLDER)")
        return Adapter.load(self.catalog_file)

    def _adopt(self, trained_from: Adapter) -> Version:
        """Version 1, the catalog's file, recorded now that a version is made from it (a refused or
        stopped job records nothing); it must still hold the adapter the job started from."""
        first = self.versions.adopt(self.name, self.catalog_file)
        if first.fingerprint != trained_from.fingerprint:
            raise ParentMissingError(f"adapter {self.name!r}: its file {self.catalog_file} changed while the job "
                                     "trained (or version 1 is another adapter); start the job again")
        return first

    def split(self, items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
        """(training, held-out) items by ``options.seed``: at least one held out, one to train on.

        Raises:
            TooFewItemsError: fewer than two images with a final label.
        """
        if len(items) < 2:
            raise TooFewItemsError(f"{self.datastore.root}: {len(items)} image(s) with a final label; a job holds "
                                   "out at least one and trains on the rest, so it needs at least 2: submit more "
                                   "corrected labels")
        by_id = {i.image_id: i for i in items}
        train, held = split_cases(sorted(by_id), self.options.holdout, self.options.seed)
        return [by_id[i] for i in train], [by_id[i] for i in held]

    def check_labels(self, items: Sequence[Item], adapter: Adapter) -> None:
        """Every final label on its image's grid and holding only the adapter's classes.

        Raises:
            LabelGridError, LabelClassError: names the image id and what to do.
        """
        for item in items:
            check_label(read_image(item.label), read_image(item.image), adapter.config,
                        name=f"the {FINAL} label of image {item.image_id!r}")

    def _spec(self, parent: Path, train: Sequence[Item], holdout: Sequence[Item], out: Path) -> FineTuneSpec:
        o = self.options
        config = TrainConfig(output_dir=str(Path(out).absolute()), batch_size=o.batch_size, max_epochs=o.epochs, stop_epoch=o.epochs,
                             base_lr=o.base_lr, warmup_iters=o.warmup_iters, seed=o.seed, progress=False)
        # Absolute: Ray Train's workers do not run in this process's working folder.
        pairs = lambda chosen: tuple((i.image_id, str(Path(i.image).absolute()), str(Path(i.label).absolute()))  # noqa: E731
                                     for i in chosen)
        return FineTuneSpec(str(Path(parent).absolute()), self.sam, pairs(train), pairs(holdout), config, o.device)

    def _figures(self, run: Any, n_train: int, n_holdout: int) -> dict[str, Any]:
        percent = lambda v: None if v is None else 100.0 * v  # noqa: E731
        scores = {k: run.scores.get(k, {}) for k in ("parent", "new")}
        last = run.epochs[-1] if run.epochs else {}
        return {
            "holdout_dice": {"current": percent(scores["parent"].get("mean_dice")),
                             "new": percent(scores["new"].get("mean_dice"))},
            "holdout_class_dice": {"current": [percent(d) for d in scores["parent"].get("class_dice", [])],
                                   "new": [percent(d) for d in scores["new"].get("class_dice", [])]},
            "threshold": self.options.threshold, "epochs": self.options.epochs, "loss": last.get("loss"),
            "seconds": round(run.seconds, 3), "train_images": n_train, "holdout_images": n_holdout,
            "seed": self.options.seed, "workers": self.options.workers, "device": self.options.device,
        }


def _public(result: JobResult) -> dict[str, Any]:
    """A result as the job's state shows it: the version made (``NAME@N``), whether it serves, its figures."""
    if result.version is None:
        return {"stopped": result.stopped}
    return {"version": result.version.version, "ref": result.version.ref, "serving": result.serving,
            "fingerprint": result.version.fingerprint, "figures": result.figures}


def claim_folder(folder: Path) -> int:
    """Make a job's ``folder`` and lock its :data:`RUNNING` file; the open descriptor holds the lock
    until the job ends or its process dies, so a folder whose lock is free was left by a killed job."""
    folder.mkdir(parents=True)
    running = os.open(folder / RUNNING, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(running, fcntl.LOCK_EX)
    return running


def remove_killed(jobs: Path) -> list[Path]:
    """Remove the folders under ``jobs`` that killed jobs left (their lock free: no process holds
    it), and return them; a running job's folder, held by any process on this machine, stays.

    A killed job never recorded a version (that is its last step, and atomic), so what it left is
    only its training files.
    """
    removed: list[Path] = []
    if not jobs.is_dir():
        return removed
    for folder in sorted(p for p in jobs.iterdir() if p.is_dir()):
        try:
            held = os.open(folder / RUNNING, os.O_RDWR)
        except FileNotFoundError:  # killed between making the folder and its lock file, or making them now
            if time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a job runs there
        else:
            # A lock file made a moment ago may be about to be locked by the job that made it.
            if time.time() - os.fstat(held).st_mtime > UNLOCKED_GRACE_S:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        finally:
            os.close(held)
    return removed
